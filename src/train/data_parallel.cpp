// The trainer's side of data parallelism (docs/distributed.md): devices and threads per rank, rank 0's
// failures and stop signals seen by all, replicas checked, rank 0's state shared. The c10d layer itself is
// diffuse/train/distributed.h.
#include <cstdlib>
#include <thread>

#include "diffuse/io/safetensors.h"
#include "diffuse/util/runtime.h"
#include "train/optimizer_step.h"
#include "train/train_internal.h"

namespace diffuse::detail {

// Data parallelism (docs/distributed.md): with several processes --device cuda means cuda:LOCAL_RANK.
torch::Device rank_device(torch::Device device, const DistEnv& env) {
  prepare_device(device);
  if (!env.enabled() || !device.is_cuda()) return device;
  if (device.has_index())
    throw std::invalid_argument("--device " + device.str() + " names one GPU, but " + std::to_string(env.world_size) +
                                " processes train together; pass --device cuda (rank r uses cuda:LOCAL_RANK) and "
                                "choose GPUs with CUDA_VISIBLE_DEVICES");
  const int64_t gpus = int64_t(torch::cuda::device_count());
  if (env.local_rank >= gpus)
    throw std::invalid_argument("LOCAL_RANK " + std::to_string(env.local_rank) + " has no GPU: this machine has " +
                                std::to_string(gpus) + " (start at most that many processes per machine)");
  return torch::Device(torch::kCUDA, c10::DeviceIndex(env.local_rank));
}

// CPU ranks on one machine share its cores (torchrun likewise sets OMP_NUM_THREADS=1 by default).
void set_threads(const LoopOptions& o, const DistEnv& env, torch::Device device) {
  if (o.threads > 0) {
    torch::set_num_threads(o.threads);
    return;
  }
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  if (!env.enabled() || !device.is_cpu() || std::getenv("OMP_NUM_THREADS") || !local) return;
  const int per_machine = std::max(1, std::atoi(local));
  torch::set_num_threads(std::max(1, int(std::thread::hardware_concurrency()) / per_machine));
}

// The signal that stops the run: any rank's SIGINT/SIGTERM, the lowest rank's winning, seen by all at once.
int agreed_stop_signal(Distributed& dist, int local_signal) {
  if (!dist.enabled()) return local_signal;
  auto flags = torch::zeros({dist.world_size()}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  flags[dist.rank()] = double(local_signal);
  std::vector<torch::Tensor> v = {flags};
  dist.all_reduce_sum(v);
  auto cpu = flags.cpu();
  for (int64_t r = 0; r < dist.world_size(); ++r)
    if (cpu[r].item<double>() != 0) return int(cpu[r].item<double>());
  return 0;
}

// Replicas stay identical only if every rank applied the same averaged gradients: checked at each checkpoint.
void check_replicas(Distributed& dist, Task& task, int64_t step) {
  if (!dist.enabled()) return;
  torch::NoGradGuard ng;
  double sum = 0;
  for (auto* m : {&task.model(), &task.ema()})
    for (const auto& p : m->parameters()) sum += p.to(torch::kFloat64).sum().item<double>();
  std::vector<torch::Tensor> root = {torch::tensor({sum}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()))};
  dist.broadcast(root);
  if (dist.all_reduce_sum(root[0].item<double>() == sum ? 0.0 : 1.0) != 0)
    throw std::runtime_error("rank " + std::to_string(dist.rank()) + ": the model replicas differ at step " +
                             std::to_string(step) + " (a bug: the ranks applied different updates); nothing written");
}

// Data parallel: every rank takes rank 0's first step, weights, EMA weights and (resuming) optimizer state.
void share_rank_zero_state(Session& s, Task& task, const LoopOptions& o) {
  auto& dist = *s.dist;
  s.start = int64_t(dist.all_reduce_sum(s.main ? double(s.start) : 0.0));
  dist.broadcast_module(task.model());
  dist.broadcast_module(task.ema());
  if (s.resumed) {  // in the checkpoint's form (optimizer.safetensors)
    std::string state = s.main ? serialize_safetensors(adamw_state_tensors(*s.optimizer, task.model())) : "";
    dist.broadcast_bytes(state);
    if (!s.main)
      load_adamw_state(*s.optimizer, task.model(), parse_safetensors(state, "rank 0's optimizer state"),
                       "rank 0's optimizer state");
  }
  // Dropout draws from the default generator: a stream of its own per rank (rank 0 keeps one process's).
  if (!s.main) torch::manual_seed(mix_seed(o.seed, 0xd15ULL + uint64_t(s.env.rank), uint64_t(s.start)));
}

}  // namespace diffuse::detail
