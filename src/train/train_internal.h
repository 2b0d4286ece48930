// The trainer's parts shared by its translation units (diffusion_task.cpp, classifier_task.cpp, vae_task.cpp and
// text_train.cpp: the tasks; train.cpp: losses and configs; train_loop.cpp: the loop;
// train_step.cpp: a step on the device; checkpoint.cpp: the run folder; train_options.cpp: run.json). Not part of the public API.
#pragma once

#include <torch/torch.h>

#include <exception>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "diffuse/data/data.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/train/distributed.h"
#include "diffuse/train/train.h"

namespace diffuse::detail {

namespace fs = std::filesystem;

// The rows [begin, begin + size) of a global batch of `global` examples that one rank trains on.
struct Shard {
  int64_t begin = 0, size = 0, global = 0;
  torch::Tensor rows(const torch::Tensor& t) const { return size == global ? t : t.narrow(0, begin, size); }
  /// `shard_shape` with its first dimension widened to the global batch.
  std::vector<int64_t> global_shape(torch::IntArrayRef shard_shape) const {
    auto s = shard_shape.vec();
    s[0] = global;
    return s;
  }
};

/// The options of a draw from `gen`: made on the generator's device (the CPU, or the GPU the step runs on).
inline torch::TensorOptions drawn_on(const at::Generator& gen, torch::ScalarType dtype) {
  return torch::TensorOptions(dtype).device(gen.device());
}

// What the loop trains: a model, its EMA copy, a loss and the folders a checkpoint holds.
class Task {
 public:
  virtual ~Task() = default;
  virtual std::string kind() const = 0;
  virtual void create(torch::Device device) = 0;
  virtual void load(const RunFolder& run, torch::Device device) = 0;
  virtual torch::nn::Module& model() = 0;
  virtual torch::nn::Module& ema() = 0;
  /// Per-example loss [n] (float32, on the device) and the timesteps [n] (int64) of `batch`: this rank's
  /// n = shard.size rows of the global batch. Random draws are made for the whole global batch from `gen`, on its
  /// device (as one process would), and then cut to the shard's rows, so sharding changes no number.
  virtual std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) = 0;
  /// Writes the model folders (and scheduler/) of a checkpoint into `dir`.
  virtual void save(const RunFolder& dir) = 0;
  virtual int64_t T() const = 0;
};

// What the loop holds from start to end: the process group, this rank's rows, the optimizer, where it starts.
struct Session {
  DistEnv env;
  torch::Device device = torch::kCPU;
  torch::ScalarType conv_dtype = torch::kFloat32;  ///< what the convolutions compute in (--conv-dtype)
  std::shared_ptr<Distributed> dist;
  Shard shard;
  RunFolder run{""};
  bool main = true, resumed = false;
  int64_t start = 0;
  nlohmann::json options;     ///< the run's options (run.json), recorded in each checkpoint's state.json
  nlohmann::json log_window;  ///< resuming: the loss log's partial row at the checkpoint (LossLog::window)
  std::unique_ptr<torch::optim::AdamW> optimizer;
};


// ---- data parallelism (data_parallel.cpp)

/// This rank's device: with several processes --device cuda means cuda:LOCAL_RANK (a numbered GPU is refused).
torch::Device rank_device(torch::Device device, const DistEnv& env);
/// --threads, or with several CPU ranks on one machine its cores shared among them.
void set_threads(const LoopOptions& o, const DistEnv& env, torch::Device device);
// Runs `body` on rank 0 only; every rank then learns whether it threw (one collective), so a failure there
// stops all ranks at once instead of leaving them to time out.
template <class F>
void on_main_rank(Distributed& dist, const std::string& what, F&& body) {
  std::exception_ptr error;
  if (dist.is_main()) try {
      body();
    } catch (...) {
      error = std::current_exception();
    }
  if (dist.all_reduce_sum(error ? 1.0 : 0.0) == 0) return;
  if (error) std::rethrow_exception(error);
  throw RankZeroFailed("rank " + std::to_string(dist.rank()) + ": rank 0 failed to " + what + " (see its error)");
}

/// The signal that stops the run: any rank's SIGINT/SIGTERM (`local_signal` is this rank's, 0 for none), the
/// lowest rank's winning, seen by all at once.
int agreed_stop_signal(Distributed& dist, int local_signal);
/// Checks at a checkpoint that every rank holds the same weights (the same averaged gradients were applied).
void check_replicas(Distributed& dist, Task& task, int64_t step);
/// Every rank takes rank 0's first step, weights, EMA weights and (resuming) optimizer state.
void share_rank_zero_state(Session& s, Task& task, const LoopOptions& o);

/// Moves every component of a finished RUN/.checkpoint-new into RUN. Idempotent: a crash at any point
/// leaves either the old or the new version of each component, and running it again completes the swap.
void swap_in_checkpoint(const RunFolder& run);
/// Creates, replaces or reopens the run folder. Returns the checkpoint's train_state/state.json when resuming
/// (checked against `options_json`), nothing for a new run.
std::optional<nlohmann::json> prepare_run_folder(const LoopOptions& o, const nlohmann::json& options_json);

/// Copies `from`'s parameters and buffers into `to` (same architecture).
void copy_weights(torch::nn::Module& to, torch::nn::Module& from);

/// Trains `task` as `o` says: the run folder, resuming, data parallelism, checkpoints, the log.
TrainResult run_loop(Task& task, const LoopOptions& o, const nlohmann::json& options_json, const Dataset& data,
                     const TrainHooks& hooks);

}  // namespace diffuse::detail
