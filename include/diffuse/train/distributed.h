// Data-parallel training on PyTorch's c10d: Gloo on CPU, NCCL on CUDA (when LibTorch has it).
// Rendezvous through torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
// so `torchrun --no-python ... diffuse train ...` works; launch_local() starts N local processes.
#pragma once

#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace c10d {
class ProcessGroup;
class Store;
}  // namespace c10d

namespace torch::nn {
class Module;
}

namespace diffuse {

struct DistEnv {
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool enabled() const { return world_size > 1; }
  /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (all optional: absent = one process).
  /// Throws std::invalid_argument naming the variable for malformed or inconsistent values.
  static DistEnv from_environment();
};

/// One process's membership of the group. Every collective is blocking and bounded by `timeout`:
/// a rank that died or hangs makes the others throw std::runtime_error instead of waiting forever.
class Distributed {
 public:
  /// world_size 1 needs no network and makes every collective a no-op.
  Distributed(const DistEnv& env, torch::Device device, std::chrono::milliseconds timeout);
  ~Distributed();
  Distributed(const Distributed&) = delete;
  Distributed& operator=(const Distributed&) = delete;

  int64_t rank() const { return env_.rank; }
  int64_t world_size() const { return env_.world_size; }
  bool is_main() const { return env_.rank == 0; }
  bool enabled() const { return env_.world_size > 1; }
  std::string backend() const;

  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root = 0);  ///< in place, from root
  void broadcast_module(torch::nn::Module& module, int64_t root = 0);      ///< parameters and buffers
  void all_reduce_sum(std::vector<torch::Tensor>& tensors);                ///< in place
  double all_reduce_sum(double value);
  void barrier();
  /// Sends root's `bytes` (any length) to every rank, e.g. a serialized optimizer state.
  void broadcast_bytes(std::string& bytes, int64_t root = 0);
  /// Where collective buffers must live: the CUDA device for NCCL, else the CPU.
  torch::Device collective_device() const { return device_.is_cuda() ? device_ : torch::Device(torch::kCPU); }

  /// Launches an asynchronous sum over `flat`; wait() on the handle blocks until it is done.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };
  std::unique_ptr<Pending> all_reduce_sum_async(torch::Tensor flat);

 private:
  DistEnv env_;
  torch::Device device_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
};

/// DDP-style gradient averaging: parameters are grouped in buckets of about `bucket_bytes` in reverse
/// registration order (the order backward produces gradients); a hook on each parameter copies its
/// gradient into its bucket, and a full bucket's all-reduce starts while backward goes on. Buckets are
/// launched strictly in index order so every rank issues the same sequence of collectives.
/// Requirements: every parameter receives exactly one gradient per backward (no unused or shared
/// parameters; checked in finish()).
class GradientAverager {
 public:
  /// `passes`: backward passes per step (gradient accumulation): each parameter's gradients of the passes are
  /// summed and its bucket sent after the last.
  GradientAverager(std::shared_ptr<Distributed> dist, std::vector<torch::Tensor> params,
                   int64_t bucket_bytes = 16 << 20, unsigned passes = 1);
  ~GradientAverager();
  /// Call after the step's backward passes: waits for every bucket and writes the averaged gradients into .grad().
  void finish();
  int64_t bucket_count() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

/// Runs this program as `nproc` local processes with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
/// set (a free loopback port), forwarding `args` (argv without the launcher option). Returns the first
/// non-zero exit status, else 0. After a failure (named on stderr) the others get up to 2 s to notice and report
/// it themselves, then SIGTERM and SIGCONT, then SIGKILL after `grace`. An exit with 128 + SIGINT/SIGTERM (a
/// rank that checkpointed and stopped on a signal) stops nobody: the ranks agree on stopping themselves.
int launch_local(int nproc, const std::vector<std::string>& args,
                 std::chrono::milliseconds grace = std::chrono::seconds(10));

}  // namespace diffuse
