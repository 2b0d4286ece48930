// The training loop: sessions over one or several processes, the step, checkpoints, signals and the log.
#include <unistd.h>

#include <chrono>
#include <cmath>
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
#include "diffuse/models/model_folder.h"
#include "diffuse/train/train.h"
#include "train/loss_log.h"
#include "train/optimizer_step.h"
#include "train/train_step.h"
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

void validate_loop(const LoopOptions& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.steps < 1) bad("--steps must be at least 1, got " + std::to_string(o.steps));
  if (o.batch < 1) bad("--batch must be at least 1, got " + std::to_string(o.batch));
  if (o.accumulate < 1) bad("--accumulate must be at least 1, got " + std::to_string(o.accumulate));
  if (!(o.lr > 0) || !std::isfinite(o.lr)) bad("--lr must be a positive number, got " + std::to_string(o.lr));
  if (o.warmup < 0) bad("--warmup must be >= 0");
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

// Checks the options against the processes and picks this rank's device and threads.
Session start_session(const LoopOptions& o) {
  validate_loop(o);
  Session s;
  s.env = DistEnv::from_environment();
  if (o.batch % s.env.world_size != 0)
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is the global batch and must divide among " +
                                std::to_string(s.env.world_size) + " processes; pass a multiple of " +
                                std::to_string(s.env.world_size));
  if ((o.batch / s.env.world_size) % o.accumulate != 0)
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " gives " + std::to_string(o.batch / s.env.world_size) +
                                " images per process, which --accumulate " + std::to_string(o.accumulate) +
                                " does not divide into equal parts");
  s.device = rank_device(o.device, s.env);
  check_network_dtype(o.conv_dtype, s.device, "--conv-dtype");
  s.conv_dtype = o.conv_dtype;
  if (s.conv_dtype != torch::kFloat32 && o.bf16)
    throw std::invalid_argument("--conv-dtype " + network_dtype_name(o.conv_dtype) + " with --bf16: autocast already runs the "
                                "convolutions in bf16; pass one of them");
  if (o.bf16 && !s.device.is_cuda() && !(s.device.is_cpu() && cpu_runs_bf16_networks()))
    throw std::invalid_argument("--bf16 autocast on " + s.device.str() + " needs --device cuda or, on a CPU, "
                                "LibTorch 2.x (1.13's fails in group_norm); here --conv-dtype bf16 runs the "
                                "convolutions alone in bf16");
  set_threads(o, s.env, s.device);
  return s;
}

// The AdamW step count the checkpoint's optimizer state holds (every training step applies one update), or -1.
int64_t optimizer_steps(torch::optim::AdamW& optimizer) {
  int64_t steps = -1;
  for (const auto& entry : optimizer.state())
    steps = std::max<int64_t>(steps, static_cast<const torch::optim::AdamWParamState&>(*entry.second).step());
  return steps;
}

// Rank 0 of a resumed run: the optimizer state and the RNG states of the checkpoint, checked against its step.
void load_train_state(Session& s, Task& task, const LoopOptions& o) {
  const std::string optimizer = s.run.optimizer_state().string();
  if (fs::exists(optimizer))
    load_adamw_state(*s.optimizer, task.model(), load_safetensors(optimizer), optimizer);
  else  // a checkpoint of diffuse before 2026-11-27
    torch::load(*s.optimizer, s.run.legacy_optimizer_state().string(), s.device);
  restore_rng_states(load_safetensors(s.run.rng_state().string()), s.device);
  const int64_t updates = optimizer_steps(*s.optimizer);
  if (updates >= 0 && updates != s.start)
    throw std::invalid_argument("cannot resume '" + o.out + "': train_state/state.json says step " +
                                std::to_string(s.start) + " but its optimizer state has taken " +
                                std::to_string(updates) + " steps (an edited or mixed-up train_state)");
}

// Rank 0 alone reads and writes the run folder and creates or loads the task; every rank then gets its
// weights, optimizer state and first step.
void open_run(Session& s, Task& task, const LoopOptions& o, const nlohmann::json& options_json, const Dataset& data) {
  // run.json records the run, not this invocation: resume and overwrite are stored false, so that a resumed run
  // folder ends byte-identical to an uninterrupted one.
  s.options = options_json;
  if (s.options.contains("loop")) s.options["loop"]["resume"] = s.options["loop"]["overwrite"] = false;
  s.dist = std::make_shared<Distributed>(s.env, s.device,
                                         std::chrono::milliseconds(int64_t(std::ceil(o.dist_timeout * 1000))));
  s.main = s.dist->is_main();
  s.shard = Shard{s.env.rank * (o.batch / s.env.world_size), o.batch / s.env.world_size, o.batch};
  s.run = RunFolder(o.out);
  s.resumed = o.resume;
  on_main_rank(*s.dist, "prepare the run folder '" + o.out + "'", [&] {
    const auto checkpoint = prepare_run_folder(o, options_json);
    s.resumed = checkpoint.has_value();
    if (!s.resumed) return;
    const auto& state = *checkpoint;
    s.start = state.at("step").get<int64_t>();
    s.log_window = state.value("log_window", nlohmann::json());
    int64_t n = state.value("dataset_size", int64_t(-1));
    if (n != data.size())
      throw std::invalid_argument("cannot resume '" + o.out + "': the data set had " + std::to_string(n) +
                                  " images, now it has " + std::to_string(data.size()) + " (same --data needed)");
  });
  auto options = torch::optim::AdamWOptions(o.lr)
                     .betas({o.adam_beta1, o.adam_beta2})
                     .eps(o.adam_eps)
                     .weight_decay(o.weight_decay);
  auto lay_out_and_make_optimizer = [&] {
    if (o.channels_last) {  // first: AdamW's state takes its parameters' layout
      to_channels_last(task.model());
      to_channels_last(task.ema());
    }
    s.optimizer = std::make_unique<torch::optim::AdamW>(task.model().parameters(), options);
  };
  on_main_rank(*s.dist, "load the checkpoint of '" + o.out + "'", [&] {
    if (s.resumed) {
      task.load(s.run, s.device);
    } else {
      torch::manual_seed(o.seed);
      task.create(s.device);
    }
    lay_out_and_make_optimizer();
    if (s.resumed) load_train_state(s, task, o);
    write_file_atomic(s.run.run_json().string(), s.options.dump(2) + "\n");
  });
  if (!s.main) {
    torch::manual_seed(o.seed);
    task.create(s.device);  // overwritten by rank 0's weights below
    lay_out_and_make_optimizer();
  }
  if (s.dist->enabled()) share_rank_zero_state(s, task, o);
}

// Writes the checkpoint of `step` (rank 0) after checking that the weights are finite and the replicas agree.
void write_checkpoint(Session& s, Task& task, const LoopOptions& o, const Dataset& data, const BatchSampler& sampler,
                      int64_t step, int64_t last_checkpoint, const nlohmann::json& log_window) {
  if (!all_finite(task.model()) || !all_finite(task.ema()))
    throw NonFiniteLoss("the weights became NaN or infinite by step " + std::to_string(step) +
                            "; nothing was written, the last good checkpoint (step " +
                            std::to_string(last_checkpoint) + ") is kept in '" + o.out + "'",
                        step);
  check_replicas(*s.dist, task, step);
  if (!s.main) return;
  const RunFolder dir = s.run.new_checkpoint();
  fs::remove_all(dir.root);
  fs::create_directories(dir.train_state());
  task.save(dir);
  // Safetensors written by write_file_atomic: the same state gives the same bytes, and a full disk is reported with
  // the path while the last checkpoint is kept (LibTorch's own writer aborted the process there).
  save_safetensors(dir.optimizer_state().string(), adamw_state_tensors(*s.optimizer, task.model()));
  save_safetensors(dir.rng_state().string(), rng_states(s.device));
  nlohmann::json state = {{"step", step},
                          {"epoch", step / sampler.steps_per_epoch()},
                          {"batch_in_epoch", step % sampler.steps_per_epoch()},
                          {"steps_per_epoch", sampler.steps_per_epoch()},
                          {"dataset_size", data.size()},
                          {"batch", o.batch},
                          {"seed", o.seed},
                          {"world_size", s.env.world_size},
                          {"threads", torch::get_num_threads()},
                          {"kind", task.kind()},
                          {"options", s.options},
                          {"log_window", log_window}};
  write_file_atomic(dir.state_json().string(), state.dump(2) + "\n");
  write_file_atomic(dir.complete_marker().string(), std::to_string(step) + "\n");
  swap_in_checkpoint(s.run);
}

void announce(const Session& s, const LoopOptions& o, Progress& progress) {
  if (s.resumed)
    progress.message("resuming '" + o.out + "' at step " + std::to_string(s.start) +
                     (s.dist->enabled() ? " with " + std::to_string(s.env.world_size) + " processes" : ""));
  else if (s.dist->enabled())
    progress.message("data parallel: " + std::to_string(s.env.world_size) + " processes (" + s.dist->backend() + "), " +
                     std::to_string(s.shard.size) + " of " + std::to_string(o.batch) + " images per step each");
}

// Writes the checkpoints (the pending steps read back first) and the loss plot, and knows the last one written.
class Checkpointer {
 public:
  Checkpointer(Session& s, Task& task, const LoopOptions& o, const Dataset& data, const BatchSampler& sampler,
               LossLog& log, Progress& progress)
      : s_(s), task_(task), o_(o), data_(data), sampler_(sampler), log_(log), progress_(progress),
        last_(s.resumed ? s.start : -1) {}
  int64_t last() const { return last_; }
  /// What a stop without saving leaves behind, for its message.
  std::string kept() const {
    return last_ >= 0 ? "the last good checkpoint (step " + std::to_string(last_) + ") is kept in '" + o_.out + "'"
                      : "no checkpoint was written yet";
  }
  void write(int64_t step, PendingSteps& pending) {
    pending.read_back();
    write_checkpoint(s_, task_, o_, data_, sampler_, step, last_, log_.window());
    last_ = step;
    if (!s_.main) return;
    try {
      log_.plot(s_.run.loss_plot());
    } catch (const std::exception& e) {
      progress_.message(std::string("warning: loss plot not drawn: ") + e.what());
    }
  }

 private:
  Session& s_;
  Task& task_;
  const LoopOptions& o_;
  const Dataset& data_;
  const BatchSampler& sampler_;
  LossLog& log_;
  Progress& progress_;
  int64_t last_;
};

// The progress line's fields after a step: the latest loss and rate read back, the step's learning rate.
std::string step_fields(const PendingSteps& pending, double lr) {
  std::ostringstream fields;
  if (std::isnan(pending.last_loss()))
    fields << "loss -  img/s -";  // nothing read back yet (the first log row)
  else
    fields << "loss " << std::setprecision(4) << pending.last_loss() << "  " << std::fixed << std::setprecision(1)
           << pending.images_per_s() << " img/s";
  fields << "  lr " << std::scientific << std::setprecision(2) << lr;
  return fields.str();
}

TrainResult first_result(const Session& s, const LoopOptions& o) {
  TrainResult result;
  result.run_dir = o.out;
  result.start_step = result.step = s.start;
  result.rank = s.env.rank;
  result.world_size = s.env.world_size;
  return result;
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
  LossLog log(s.run.log_csv(), task.T(), o.log_every);
  if (s.main) {
    log.open(s.start, !s.resumed);
    if (s.resumed) log.restore_window(s.log_window);
  }
  Progress progress(o.progress && s.main, s.start, o.steps, o.log_every);
  announce(s, o, progress);
  Checkpointer checkpoints(s, task, o, data, sampler, log, progress);
  PendingSteps pending(s, log, o, [&](int64_t step, const std::string& what) {
    progress.finish();
    throw NonFiniteLoss(what + " at step " + std::to_string(step) + "; stopped without saving, " + checkpoints.kept() +
                            " (lower --lr, check the data, or raise --grad-clip's strictness)",
                        step);
  });
  StopSignals signals;
  TrainResult result = first_result(s, o);
  auto params = task.model().parameters();
  GradientAverager averager(s.dist, params, 16 << 20, unsigned(o.accumulate));  // no-op for one process
  StepRunner runner(s, task, o, data, sampler, averager, params);
  if (runner.graphed()) progress.message("CUDA graph: steps after the first " + std::to_string(StepRunner::kGraphWarmup) +
                                         " replay one captured graph (--cuda-graphs false: eager)");
  auto t_begin = std::chrono::steady_clock::now();
  for (int64_t step = s.start; step < o.steps; ++step) {
    auto outcome = runner.step(step);
    const double lr = outcome.lr;
    pending.add(std::move(outcome));
    const int64_t done = result.step = step + 1;
    if (log.due(done) || done == o.steps) pending.read_back();
    progress.update(done, step_fields(pending, lr));
    if (done % o.checkpoint_every == 0 || done == o.steps) checkpoints.write(done, pending);
    if (hooks.on_step) hooks.on_step(TrainStepInfo{done, pending.last_loss(), lr, pending.images_per_s()});
    if (int sig = agreed_stop_signal(*s.dist, StopSignals::caught())) {
      if (checkpoints.last() != done) checkpoints.write(done, pending);
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
  if (checkpoints.last() != result.step) checkpoints.write(result.step, pending);
  s.dist->barrier();  // the run ends when rank 0's last checkpoint is written
  progress.finish();
  return result;
}

}  // namespace diffuse::detail
