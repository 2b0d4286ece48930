// A training step on the device and the reading back of its numbers: the part of the loop that decides how busy
// a GPU stays (docs/cuda.md). The loop itself (run folder, checkpoints, signals) is train_loop.cpp. Not part of
// the public API.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "train/loss_log.h"
#include "train/train_internal.h"

namespace diffuse::detail {

class GraphedWork;

/// The generator of one of a step's draws, seeded from (run seed, step, use): on the CPU a fresh one; on a GPU
/// the device's default generator, reseeded (host-side only), so the draws happen there without a copy. (On a
/// GPU the model's dropout draws from it next: every rank's dropout stream then starts from the step's seed.)
at::Generator step_generator(torch::Device device, uint64_t seed);

/// The data where the steps run. On a GPU it is copied there once when it fits (kResidentBytes), each epoch's
/// order is uploaded once and a step's indices are copied into a fixed tensor: a step gathers and flips its
/// batch there without the host, and a CUDA graph can hold the gather.
class StepBatches {
 public:
  static constexpr int64_t kResidentBytes = int64_t(4) << 30;
  StepBatches(const Dataset& data, BatchSampler& sampler, torch::Device device, int64_t batch);
  bool resident() const { return resident_; }
  /// Makes global step `step`'s rows the batch that gather() returns.
  void stage(int64_t step);
  /// The staged batch. Resident on a GPU, its flips are drawn from `gen` (the step's generator); otherwise from
  /// a CPU generator of their own seed (mix_seed(seed, step, 1)), as make_batch always did.
  Batch gather(const LoopOptions& o, at::Generator& gen);

 private:
  Dataset data_;
  BatchSampler& sampler_;
  torch::Device device_;
  bool resident_ = false;
  int64_t epoch_ = -1, step_ = 0;
  torch::Tensor order_, indices_;
};

/// What one optimisation step leaves on the device until it is read back.
struct StepOutcome {
  int64_t step = 0;  ///< 1-based
  double lr = 0;
  torch::Tensor grad_norm;       ///< 0-dim
  torch::Tensor per_example, t;  ///< this rank's rows
};

/// Runs the optimisation steps on this rank's rows of each global batch: loss, backward, gradient averaging and
/// clipping, AdamW, EMA. Nothing waits for the device (a NaN is found when the outcome is read back). On one GPU
/// with the data resident, the loss-and-gradients part (fixed shapes, inputs in fixed tensors, draws from the
/// device's generator) is captured once as a CUDA graph and replayed (LoopOptions::cuda_graphs).
class StepRunner {
 public:
  static constexpr int kGraphWarmup = 3;  ///< eager steps before the capture (cuDNN algorithms, autograd state)
  StepRunner(Session& s, Task& task, const LoopOptions& o, const Dataset& data, BatchSampler& sampler,
             GradientAverager& averager, std::vector<torch::Tensor> params);
  ~StepRunner();
  bool graphed() const { return graph_ != nullptr; }
  StepOutcome step(int64_t step);

 private:
  struct Gradients {
    torch::Tensor per_example, t, grad_norm;
  };
  Gradients loss_and_gradients();

  Session& s_;
  Task& task_;
  const LoopOptions& o_;
  GradientAverager& averager_;
  std::vector<torch::Tensor> params_;
  StepBatches batches_;
  at::Generator gen_;
  Gradients last_;  ///< the graph's outputs (written by its capture, overwritten by each replay)
  std::unique_ptr<GraphedWork> graph_;
};

/// Steps whose numbers are still on the device. read_back() fetches them together (one wait) when the log, a
/// checkpoint, a stop or the end needs them, stops the run at the first step whose loss or gradient norm is not
/// finite (`nonfinite` throws), and has rank 0 append them to the log.
class PendingSteps {
 public:
  using NonFinite = std::function<void(int64_t step, const std::string& what)>;
  PendingSteps(Session& s, LossLog& log, const LoopOptions& o, NonFinite nonfinite);
  void add(StepOutcome out) { pending_.push_back(std::move(out)); }
  void read_back();
  double last_loss() const { return last_loss_; }  ///< of the latest step read back (NaN before the first)
  double images_per_s() const { return rate_; }    ///< over the steps of the latest read-back

 private:
  Session& s_;
  LossLog& log_;
  const LoopOptions& o_;
  NonFinite nonfinite_;
  std::vector<StepOutcome> pending_;
  std::chrono::steady_clock::time_point since_;
  double last_loss_ = std::numeric_limits<double>::quiet_NaN(), rate_ = 0;
};

}  // namespace diffuse::detail
