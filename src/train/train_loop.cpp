// The training loop: sessions over one or several processes, the step, checkpoints, signals and the log.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>
#include <thread>

#include "diffuse/train/distributed.h"
#include "diffuse/io/files.h"
#include "diffuse/util/progress.h"
#include "diffuse/util/runtime.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/train/train.h"
#include "train/loss_log.h"
#include "train/cuda_graph.h"
#include "train/optimizer_step.h"
#include "util/torch_compat.h"
#include "train/train_internal.h"

namespace diffuse::detail {

namespace {


volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// Installs SIGINT/SIGTERM handlers that only set a flag; restores the previous handlers on destruction.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  static int caught() { return g_stop_signal; }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};


double lr_at(const LoopOptions& o, int64_t step) {
  // Linear warmup over `warmup` steps, then constant or a half cosine to min_lr at the last step.
  if (o.warmup > 0 && step < o.warmup) return o.lr * double(step + 1) / double(o.warmup);
  if (o.lr_schedule == "constant") return o.lr;
  double span = double(std::max<int64_t>(1, o.steps - o.warmup));
  double progress = std::min(1.0, double(step - o.warmup) / span);
  return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * progress));
}

void validate_loop(const LoopOptions& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.steps < 1) bad("--steps must be at least 1, got " + std::to_string(o.steps));
  if (o.batch < 1) bad("--batch must be at least 1, got " + std::to_string(o.batch));
  if (!(o.lr > 0) || !std::isfinite(o.lr)) bad("--lr must be a positive number, got " + std::to_string(o.lr));
  if (o.warmup < 0) bad("--warmup must be >= 0");
  if (o.lr_schedule != "constant" && o.lr_schedule != "cosine")
    bad("unknown --lr-schedule '" + o.lr_schedule + "' (expected constant or cosine)");
  if (!(o.min_lr >= 0 && o.min_lr <= o.lr)) bad("--min-lr must be in [0, lr]");
  if (!(o.weight_decay >= 0)) bad("--weight-decay must be >= 0");
  if (!(o.grad_clip >= 0)) bad("--grad-clip must be >= 0 (0 disables clipping)");
  if (!(o.ema_decay >= 0 && o.ema_decay < 1)) bad("--ema-decay must be in [0, 1), got " + std::to_string(o.ema_decay));
  if (o.checkpoint_every < 1) bad("--checkpoint-every must be at least 1");
  if (o.log_every < 1) bad("--log-every must be at least 1");
  if (!(o.dist_timeout > 0) || !std::isfinite(o.dist_timeout))
    bad("--dist-timeout must be a positive number of seconds, got " + std::to_string(o.dist_timeout));
}

bool all_finite(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (const auto& p : m.parameters())
    if (!torch::isfinite(p).all().item<bool>()) return false;
  return true;
}

at::Generator device_generator(torch::Device device) { return at::globalContext().defaultGenerator(device); }

// The generator of one of a step's draws, seeded from (run seed, step, use): on the CPU a fresh one; on a GPU
// the device's default generator, reseeded (host-side only), so the draws happen there without a copy. (On a
// GPU the model's dropout draws from it next: every rank's dropout stream then starts from the step's seed.)
at::Generator step_generator(torch::Device device, uint64_t seed) {
  if (device.is_cpu()) return cpu_generator(seed);
  auto g = device_generator(device);
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_current_seed(seed);
  return g;
}

std::map<std::string, torch::Tensor> rng_states(torch::Device device) {
  std::map<std::string, torch::Tensor> out;
  {
    auto g = device_generator(torch::kCPU);
    std::lock_guard<std::mutex> lock(g.mutex());
    out["cpu"] = g.get_state();
  }
  if (!device.is_cpu()) {
    auto g = device_generator(device);
    std::lock_guard<std::mutex> lock(g.mutex());
    out["device"] = g.get_state();
  }
  return out;
}

void restore_rng_states(const std::map<std::string, torch::Tensor>& states, torch::Device device) {
  auto set = [](at::Generator g, const torch::Tensor& s) {
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(s);
  };
  if (states.count("cpu")) set(device_generator(torch::kCPU), states.at("cpu"));
  if (!device.is_cpu() && states.count("device")) set(device_generator(device), states.at("device"));
}

// Data parallelism (docs/distributed.md): with several processes --device cuda means cuda:LOCAL_RANK.
torch::Device rank_device(const std::string& name, const DistEnv& env) {
  torch::Device device = parse_device(name);
  if (!env.enabled() || !device.is_cuda()) return device;
  if (device.has_index())
    throw std::invalid_argument("--device " + name + " names one GPU, but " + std::to_string(env.world_size) +
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

// Per-example losses and timesteps [k, shard] of k steps, widened to the global batch's rows [k, global] from
// every rank's (for the log).
std::pair<torch::Tensor, torch::Tensor> gather_rows(Distributed& dist, const Shard& shard, const torch::Tensor& per_example,
                                                    const torch::Tensor& t) {
  const int64_t k = per_example.size(0);
  auto all = torch::zeros({2, k, shard.global}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  all[0].narrow(1, shard.begin, shard.size).copy_(per_example);
  all[1].narrow(1, shard.begin, shard.size).copy_(t);
  std::vector<torch::Tensor> v = {all};
  dist.all_reduce_sum(v);
  return {all[0].to(torch::kFloat32), all[1].to(torch::kInt64)};
}

// The signal that stops the run: any rank's SIGINT/SIGTERM, the lowest rank's winning, seen by all at once.
int agreed_stop_signal(Distributed& dist) {
  if (!dist.enabled()) return StopSignals::caught();
  auto flags = torch::zeros({dist.world_size()}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  flags[dist.rank()] = double(StopSignals::caught());
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

// What the loop holds from start to end: the process group, this rank's rows, the optimizer, where it starts.
struct Session {
  DistEnv env;
  torch::Device device = torch::kCPU;
  std::shared_ptr<Distributed> dist;
  Shard shard;
  fs::path run;
  bool main = true, resumed = false;
  int64_t start = 0;
  std::unique_ptr<torch::optim::AdamW> optimizer;
};

// Checks the options against the processes and picks this rank's device and threads.
Session start_session(const LoopOptions& o) {
  validate_loop(o);
  Session s;
  s.env = DistEnv::from_environment();
  if (o.batch % s.env.world_size != 0)
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is the global batch and must divide among " +
                                std::to_string(s.env.world_size) + " processes; pass a multiple of " +
                                std::to_string(s.env.world_size));
  s.device = rank_device(o.device, s.env);
  if (o.bf16 && !s.device.is_cuda())
    throw std::invalid_argument("--bf16 autocast needs --device cuda (on the CPU bf16 is slower than float32)");
  set_threads(o, s.env, s.device);
  return s;
}

// Data parallel: every rank takes rank 0's first step, weights, EMA weights and (resuming) optimizer state.
void share_rank_zero_state(Session& s, Task& task, const LoopOptions& o) {
  auto& dist = *s.dist;
  s.start = int64_t(dist.all_reduce_sum(s.main ? double(s.start) : 0.0));
  dist.broadcast_module(task.model());
  dist.broadcast_module(task.ema());
  if (s.resumed) {
    std::string state;
    if (s.main) {
      std::ostringstream os;
      torch::save(*s.optimizer, os);
      state = os.str();
    }
    dist.broadcast_bytes(state);
    if (!s.main) {
      std::istringstream is(state);
      torch::load(*s.optimizer, is, s.device);
    }
  }
  // Dropout draws from the default generator: a stream of its own per rank (rank 0 keeps one process's).
  if (!s.main) torch::manual_seed(mix_seed(o.seed, 0xd15ULL + uint64_t(s.env.rank), uint64_t(s.start)));
}

// Rank 0 alone reads and writes the run folder and creates or loads the task; every rank then gets its
// weights, optimizer state and first step.
void open_run(Session& s, Task& task, const LoopOptions& o, const nlohmann::json& options_json, const Dataset& data) {
  s.dist = std::make_shared<Distributed>(s.env, s.device,
                                         std::chrono::milliseconds(int64_t(std::ceil(o.dist_timeout * 1000))));
  s.main = s.dist->is_main();
  s.shard = Shard{s.env.rank * (o.batch / s.env.world_size), o.batch / s.env.world_size, o.batch};
  s.run = fs::path(o.out);
  s.resumed = o.resume;
  on_main_rank(*s.dist, "prepare the run folder '" + o.out + "'", [&] {
    s.resumed = prepare_run_folder(o, options_json);
    if (!s.resumed) return;
    auto state = load_json((s.run / "train_state" / "state.json").string());
    s.start = state.at("step").get<int64_t>();
    int64_t n = state.value("dataset_size", int64_t(-1));
    if (n != data.size())
      throw std::invalid_argument("cannot resume '" + o.out + "': the data set had " + std::to_string(n) +
                                  " images, now it has " + std::to_string(data.size()) + " (same --data needed)");
  });
  auto options = torch::optim::AdamWOptions(o.lr)
                     .betas({o.adam_beta1, o.adam_beta2})
                     .eps(o.adam_eps)
                     .weight_decay(o.weight_decay);
  on_main_rank(*s.dist, "load the checkpoint of '" + o.out + "'", [&] {
    if (s.resumed) {
      task.load(s.run, s.device);
    } else {
      torch::manual_seed(o.seed);
      task.create(s.device);
    }
    s.optimizer = std::make_unique<torch::optim::AdamW>(task.model().parameters(), options);
    if (s.resumed) {
      torch::load(*s.optimizer, (s.run / "train_state" / "optimizer.pt").string(), s.device);
      restore_rng_states(load_safetensors((s.run / "train_state" / "rng.safetensors").string()), s.device);
    }
    write_file_atomic((s.run / "run.json").string(), options_json.dump(2) + "\n");
  });
  if (!s.main) {
    torch::manual_seed(o.seed);
    task.create(s.device);  // overwritten by rank 0's weights below
    s.optimizer = std::make_unique<torch::optim::AdamW>(task.model().parameters(), options);
  }
  if (s.dist->enabled()) share_rank_zero_state(s, task, o);
}

// Writes the checkpoint of `step` (rank 0) after checking that the weights are finite and the replicas agree.
void write_checkpoint(Session& s, Task& task, const LoopOptions& o, const Dataset& data, const BatchSampler& sampler,
                      int64_t step, int64_t last_checkpoint) {
  if (!all_finite(task.model()) || !all_finite(task.ema()))
    throw NonFiniteLoss("the weights became NaN or infinite by step " + std::to_string(step) +
                            "; nothing was written, the last good checkpoint (step " +
                            std::to_string(last_checkpoint) + ") is kept in '" + o.out + "'",
                        step);
  check_replicas(*s.dist, task, step);
  if (!s.main) return;
  fs::path dir = s.run / kNewCheckpoint;
  fs::remove_all(dir);
  fs::create_directories(dir / "train_state");
  task.save(dir);
  torch::save(*s.optimizer, (dir / "train_state" / "optimizer.pt").string());
  save_safetensors((dir / "train_state" / "rng.safetensors").string(), rng_states(s.device));
  nlohmann::json state = {{"step", step},
                          {"epoch", step / sampler.steps_per_epoch()},
                          {"batch_in_epoch", step % sampler.steps_per_epoch()},
                          {"steps_per_epoch", sampler.steps_per_epoch()},
                          {"dataset_size", data.size()},
                          {"batch", o.batch},
                          {"seed", o.seed},
                          {"world_size", s.env.world_size},
                          {"kind", task.kind()}};
  write_file_atomic((dir / "train_state" / "state.json").string(), state.dump(2) + "\n");
  write_file_atomic((dir / kComplete).string(), std::to_string(step) + "\n");
  swap_in_checkpoint(s.run);
}

// The data where the steps run. On a GPU it is copied there once when it fits (kResidentBytes), each epoch's
// order is uploaded once and a step's indices are copied into a fixed tensor: a step gathers and flips its
// batch there without the host, and a CUDA graph can hold the gather.
class StepBatches {
 public:
  static constexpr int64_t kResidentBytes = int64_t(4) << 30;
  StepBatches(const Dataset& data, BatchSampler& sampler, torch::Device device, int64_t batch)
      : data_(data), sampler_(sampler), device_(device) {
    resident_ = !device.is_cpu() && data.images.numel() * int64_t(data.images.element_size()) <= kResidentBytes;
    if (!resident_) return;
    data_.images = data.images.to(device);
    data_.labels = data.labels.to(device);
    indices_ = torch::zeros({batch}, torch::TensorOptions(torch::kInt64).device(device));
  }
  bool resident() const { return resident_; }
  /// Makes global step `step`'s rows the batch that gather() returns.
  void stage(int64_t step) {
    step_ = step;
    if (!resident_) return;
    const int64_t per_epoch = sampler_.steps_per_epoch(), epoch = step / per_epoch;
    if (epoch != epoch_) {
      order_ = sampler_.permutation(epoch).to(device_);
      epoch_ = epoch;
    }
    indices_.copy_(order_.narrow(0, (step % per_epoch) * indices_.size(0), indices_.size(0)));
  }
  /// The staged batch. Resident on a GPU, its flips are drawn from `gen` (the step's generator); otherwise from
  /// a CPU generator of their own seed (mix_seed(seed, step, 1)).
  Batch gather(const LoopOptions& o, at::Generator& gen) {
    if (!resident_) return make_batch(data_, sampler_.indices(step_), o.hflip, mix_seed(o.seed, uint64_t(step_), 1), device_);
    return make_batch(data_, indices_, o.hflip, gen, device_);
  }

 private:
  Dataset data_;
  BatchSampler& sampler_;
  torch::Device device_;
  bool resident_ = false;
  int64_t epoch_ = -1, step_ = 0;
  torch::Tensor order_, indices_;
};

// What one optimisation step leaves on the device until it is read back.
struct StepOutcome {
  int64_t step = 0;  ///< 1-based
  double lr = 0;
  torch::Tensor grad_norm;         ///< 0-dim
  torch::Tensor per_example, t;    ///< this rank's rows
};

// Runs the optimisation steps on this rank's rows of each global batch: loss, backward, gradient averaging and
// clipping, AdamW, EMA. Nothing waits for the device (a NaN is found when the outcome is read back). On one GPU
// with the data resident, the loss-and-gradients part (fixed shapes, inputs in fixed tensors, draws from the
// device's generator) is captured once as a CUDA graph and replayed (LoopOptions::cuda_graphs).
class StepRunner {
 public:
  static constexpr int kGraphWarmup = 3;  // eager steps before the capture (cuDNN algorithms, autograd state)
  StepRunner(Session& s, Task& task, const LoopOptions& o, const Dataset& data, BatchSampler& sampler,
             GradientAverager& averager, std::vector<torch::Tensor> params)
      : s_(s), task_(task), o_(o), averager_(averager), params_(std::move(params)),
        batches_(data, sampler, s.device, o.batch), gen_(step_generator(s.device, o.seed)) {
    if (o.cuda_graphs && s.device.is_cuda() && !s.dist->enabled() && batches_.resident() && GraphedWork::available())
      graph_ = std::make_unique<GraphedWork>(s.device, kGraphWarmup, [this] { last_ = loss_and_gradients(); });
  }
  bool graphed() const { return graph_ != nullptr; }

  StepOutcome step(int64_t step) {
    StepOutcome r;
    r.step = step + 1;
    r.lr = lr_at(o_, step);
    batches_.stage(step);
    gen_ = step_generator(s_.device, mix_seed(o_.seed, uint64_t(step), 2));
    if (graph_) {
      graph_->run();  // the graph's outputs are overwritten by the next replay: keep copies
      r.per_example = last_.per_example.clone();
      r.t = last_.t.clone();
      r.grad_norm = last_.grad_norm.clone();
    } else {
      last_ = loss_and_gradients();
      r.per_example = last_.per_example;
      r.t = last_.t;
      r.grad_norm = last_.grad_norm;
    }
    adamw_step(*s_.optimizer, r.lr);
    update_ema(task_.ema(), task_.model(), o_.ema_decay, step);
    return r;
  }

 private:
  struct Gradients {
    torch::Tensor per_example, t, grad_norm;
  };
  Gradients loss_and_gradients() {
    auto batch = batches_.gather(o_, gen_);
    batch.images = s_.shard.rows(batch.images);
    batch.labels = s_.shard.rows(batch.labels);
    Gradients g;
    {
      CudaBf16Autocast autocast(o_.bf16);
      std::tie(g.per_example, g.t) = task_.loss(batch, s_.shard, gen_);
    }
    auto loss = g.per_example.mean();  // of the shard: the mean over ranks of its gradient is the global batch's
    compat::zero_grads(params_);       // in place: a graph's gradients stay where it captured them
    loss.backward();
    averager_.finish();
    g.grad_norm = clip_gradients(params_, o_.grad_clip > 0 ? o_.grad_clip : std::numeric_limits<double>::infinity());
    g.per_example = g.per_example.detach();
    return g;
  }

  Session& s_;
  Task& task_;
  const LoopOptions& o_;
  GradientAverager& averager_;
  std::vector<torch::Tensor> params_;
  StepBatches batches_;
  at::Generator gen_;
  Gradients last_;
  std::unique_ptr<GraphedWork> graph_;
};

// Steps whose numbers are still on the device. read_back() fetches them together (one wait) when the log, a
// checkpoint, a stop or the end needs them, stops the run at the first step whose loss or gradient norm is not
// finite (`nonfinite` throws), and has rank 0 append them to the log.
class PendingSteps {
 public:
  using NonFinite = std::function<void(int64_t step, const std::string& what)>;
  PendingSteps(Session& s, LossLog& log, const LoopOptions& o, NonFinite nonfinite)
      : s_(s), log_(log), o_(o), nonfinite_(std::move(nonfinite)), since_(std::chrono::steady_clock::now()) {}
  void add(StepOutcome out) { pending_.push_back(std::move(out)); }
  void read_back() {
    if (pending_.empty()) return;
    const int64_t k = int64_t(pending_.size());
    std::vector<torch::Tensor> norms, rows, ts;
    for (const auto& p : pending_) {
      norms.push_back(p.grad_norm.to(torch::kFloat64).reshape({1}));
      rows.push_back(p.per_example.to(torch::kFloat32));
      ts.push_back(p.t.to(rows.back().device()));
    }
    auto per_example = torch::stack(rows), t = torch::stack(ts);
    if (s_.dist->enabled()) std::tie(per_example, t) = gather_rows(*s_.dist, s_.shard, per_example, t);
    auto numbers = torch::cat({per_example.mean(1).to(torch::kFloat64), torch::cat(norms).to(per_example.device())}).cpu();
    per_example = per_example.cpu();
    t = t.cpu();
    const double* v = numbers.data_ptr<double>();
    for (int64_t i = 0; i < k; ++i) {
      const int64_t step = pending_[size_t(i)].step;
      if (!std::isfinite(v[i])) nonfinite_(step, "the loss is " + std::to_string(v[i]));
      if (!std::isfinite(v[k + i])) nonfinite_(step, "the gradient norm is " + std::to_string(v[k + i]));
      if (!s_.main) continue;
      log_.add(v[i], per_example[i], t[i], v[k + i], o_.batch);
      if (log_.due(step) || step == o_.steps) log_.write(step, pending_[size_t(i)].lr);
    }
    last_loss_ = v[k - 1];
    auto now = std::chrono::steady_clock::now();
    rate_ = double(k * o_.batch) / std::max(1e-9, std::chrono::duration<double>(now - since_).count());
    since_ = now;
    pending_.clear();
  }
  double last_loss() const { return last_loss_; }   ///< of the latest step read back (NaN before the first)
  double images_per_s() const { return rate_; }     ///< over the steps of the latest read-back

 private:
  Session& s_;
  LossLog& log_;
  const LoopOptions& o_;
  NonFinite nonfinite_;
  std::vector<StepOutcome> pending_;
  std::chrono::steady_clock::time_point since_;
  double last_loss_ = std::numeric_limits<double>::quiet_NaN(), rate_ = 0;
};

void announce(const Session& s, const LoopOptions& o, Progress& progress) {
  if (s.resumed)
    progress.message("resuming '" + o.out + "' at step " + std::to_string(s.start) +
                     (s.dist->enabled() ? " with " + std::to_string(s.env.world_size) + " processes" : ""));
  else if (s.dist->enabled())
    progress.message("data parallel: " + std::to_string(s.env.world_size) + " processes (" + s.dist->backend() + "), " +
                     std::to_string(s.shard.size) + " of " + std::to_string(o.batch) + " images per step each");
}

}  // namespace

void copy_weights(torch::nn::Module& to, torch::nn::Module& from) {
  torch::NoGradGuard ng;
  auto t = to.parameters(), f = from.parameters();
  for (size_t i = 0; i < t.size(); ++i) t[i].copy_(f[i]);
}

TrainResult run_loop(Task& task, const LoopOptions& o, const nlohmann::json& options_json, const Dataset& data,
                     const TrainHooks& hooks) {
  Session s = start_session(o);
  BatchSampler sampler(data.size(), o.batch, o.seed);  // validates the batch size against the data
  open_run(s, task, o, options_json, data);
  task.model().train();
  LossLog log(s.run, task.T(), o.log_every);
  if (s.main) log.open(s.start, !s.resumed);
  Progress progress(o.progress && s.main, s.start, o.steps, o.log_every);
  announce(s, o, progress);
  int64_t last_checkpoint = s.resumed ? s.start : -1;
  PendingSteps pending(s, log, o, [&](int64_t step, const std::string& what) {
    progress.finish();
    std::string kept = last_checkpoint >= 0 ? "the last good checkpoint (step " + std::to_string(last_checkpoint) +
                                                  ") is kept in '" + o.out + "'"
                                            : "no checkpoint was written yet";
    throw NonFiniteLoss(what + " at step " + std::to_string(step) + "; stopped without saving, " + kept +
                            " (lower --lr, check the data, or raise --grad-clip's strictness)",
                        step);
  });
  auto checkpoint = [&](int64_t step) {
    pending.read_back();
    write_checkpoint(s, task, o, data, sampler, step, last_checkpoint);
    last_checkpoint = step;
    if (!s.main) return;
    try {
      log.plot(s.run / "loss.png");
    } catch (const std::exception& e) {
      progress.message(std::string("warning: loss plot not drawn: ") + e.what());
    }
  };

  StopSignals signals;
  TrainResult result;
  result.run_dir = o.out;
  result.start_step = result.step = s.start;
  result.rank = s.env.rank;
  result.world_size = s.env.world_size;
  auto params = task.model().parameters();
  GradientAverager averager(s.dist, params);  // no-op for one process
  StepRunner runner(s, task, o, data, sampler, averager, params);
  if (runner.graphed()) progress.message("CUDA graph: steps after the first " + std::to_string(StepRunner::kGraphWarmup) +
                                         " replay one captured graph (--cuda-graphs false: eager)");
  auto t_begin = std::chrono::steady_clock::now();
  for (int64_t step = s.start; step < o.steps; ++step) {
    const double lr = lr_at(o, step);
    pending.add(runner.step(step));
    const int64_t done = result.step = step + 1;
    if (log.due(done) || done == o.steps) pending.read_back();
    std::ostringstream fields;
    fields << "loss " << std::setprecision(4) << pending.last_loss() << "  " << std::fixed << std::setprecision(1)
           << pending.images_per_s() << " img/s  lr " << std::scientific << std::setprecision(2) << lr;
    progress.update(done, fields.str());
    if (done % o.checkpoint_every == 0 || done == o.steps) checkpoint(done);
    if (hooks.on_step) hooks.on_step(TrainStepInfo{done, pending.last_loss(), lr, pending.images_per_s()});
    if (int sig = agreed_stop_signal(*s.dist)) {
      if (last_checkpoint != done) checkpoint(done);
      result.interrupted = true;
      result.signal = sig;
      progress.message("stopped by signal " + std::to_string(sig) + " at step " + std::to_string(done) +
                       "; checkpoint written, continue with --resume");
      break;
    }
  }
  pending.read_back();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
  result.images_per_s = double(result.step - s.start) * double(o.batch) / std::max(seconds, 1e-9);
  result.last_loss = pending.last_loss();
  if (last_checkpoint != result.step) checkpoint(result.step);
  s.dist->barrier();  // the run ends when rank 0's last checkpoint is written
  progress.finish();
  return result;
}

}  // namespace diffuse::detail
