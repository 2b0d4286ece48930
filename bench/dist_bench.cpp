// Data-parallel scaling of diffuse::train on this machine: images/s of the whole trainer (sharded global batch,
// forward + backward, bucketed Gloo all-reduce overlapping backward, AdamW, EMA, the per-step loss gather and
// stop agreement) with 1 process and with N processes on loopback, and the scaling efficiency.
//
// On a machine with C cores the honest comparison keeps the cores fixed: 1 process x C threads against
// N processes x C/N threads. The classic efficiency ips(N procs) / (N * ips(1 proc)) is printed with equal
// threads per process (1 x C/N threads against N x C/N), which is what adding machines would give.
//
// usage: dist_bench [--nproc 2] [--batch 32] [--steps 10] [--channels 32,64,64]
//   (internally re-runs itself as the ranks: dist_bench --worker THREADS RESULT_FILE ...)
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/data/data.h"
#include "diffuse/train/distributed.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/train.h"
#include "diffuse/models/unet.h"

namespace fs = std::filesystem;

namespace {

struct Config {
  int64_t batch = 32, steps = 10, warmup_steps = 2;
  std::string channels = "32,64,64";
};

std::vector<int64_t> parse_channels(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

// Milliseconds of one all-reduce of all of the model's gradients (float32, one flat buffer) between the ranks,
// median of 10, on a group of its own (MASTER_PORT + 1) before training starts; 0 for one process.
double gradient_allreduce_ms(const diffuse::UNetConfig& config) {
  auto env = diffuse::DistEnv::from_environment();
  if (!env.enabled()) return 0;
  env.master_port += 1;
  diffuse::Distributed dist(env, torch::kCPU, std::chrono::seconds(60));
  diffuse::UNet2DModel model(config);
  std::vector<torch::Tensor> flat = {torch::zeros({diffuse::parameter_count(*model)})};
  std::vector<double> ms;
  for (int i = 0; i < 11; ++i) {
    dist.barrier();
    auto t0 = std::chrono::steady_clock::now();
    dist.all_reduce_sum(flat);
    if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// One rank: trains `steps` steps and (rank 0) writes images/s over the steps after the warmup into `result`.
int worker(const Config& c, int threads, const std::string& result) {
  diffuse::DataSpec spec;
  spec.source = "synthetic-shapes";
  spec.synthetic_count = 2048;
  auto data = diffuse::load_dataset(spec);
  diffuse::TrainOptions o;
  o.data = spec;
  diffuse::UNetShape shape;
  shape.channels = parse_channels(c.channels);
  o.unet = diffuse::make_unet_config(shape, 32, data.channels(), data.num_classes);
  o.loop.steps = c.steps;
  o.loop.batch = c.batch;
  o.loop.progress = false;
  o.loop.checkpoint_every = 1 << 30;
  o.loop.log_every = 1 << 30;
  o.loop.threads = threads;
  o.loop.overwrite = true;
  o.loop.out = result + ".run";
  std::vector<double> stamps;
  auto t0 = std::chrono::steady_clock::now();
  diffuse::TrainHooks hooks;
  hooks.on_step = [&](const diffuse::TrainStepInfo&) {
    stamps.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  const double allreduce_ms = gradient_allreduce_ms(o.unet);
  auto r = diffuse::train(o, data, hooks);
  if (r.rank != 0) return 0;
  fs::remove_all(o.loop.out);
  const size_t first = size_t(std::min<int64_t>(c.warmup_steps, int64_t(stamps.size()) - 2));
  const double per_step = (stamps.back() - stamps[first]) / double(stamps.size() - 1 - first);
  std::ofstream(result) << double(c.batch) / per_step << " " << allreduce_ms << " " << per_step * 1e3 << "\n";
  return 0;
}

// Runs `nproc` ranks of `threads` threads each and returns rank 0's images/s.
double measure(const Config& c, int nproc, int threads) {
  const std::string result = (fs::temp_directory_path() / ("diffuse-dist-bench-" + std::to_string(getpid()) + "-" +
                                                           std::to_string(nproc) + "x" + std::to_string(threads)))
                                 .string();
  std::vector<std::string> args = {"--worker",   std::to_string(threads), result,         "--batch",
                                   std::to_string(c.batch), "--steps", std::to_string(c.steps), "--channels",
                                   c.channels};
  // One process still goes through the launcher: every configuration pays the same start-up.
  int code = diffuse::launch_local(nproc, args);
  if (code != 0) throw std::runtime_error("the ranks failed with status " + std::to_string(code));
  double ips = 0, allreduce_ms = 0, step_ms = 0;
  std::ifstream(result) >> ips >> allreduce_ms >> step_ms;
  fs::remove(result);
  std::cout << "  " << nproc << " process" << (nproc > 1 ? "es" : "  ") << " x " << threads << " thread"
            << (threads > 1 ? "s" : " ") << ": " << std::fixed << std::setprecision(2) << ips << " images/s ("
            << step_ms << " ms/step";
  if (nproc > 1) std::cout << "; one all-reduce of every gradient, outside training: " << allreduce_ms << " ms";
  std::cout << ")\n" << std::flush;
  return ips;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  int nproc = 2, threads = 0;
  std::string result;
  bool is_worker = false;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--worker" && i + 2 < argc) {
      is_worker = true;
      threads = std::stoi(argv[++i]);
      result = argv[++i];
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "option " << key << " needs a value\n";
      return 2;
    }
    std::string value = argv[++i];
    if (key == "--nproc") nproc = std::stoi(value);
    else if (key == "--batch") c.batch = std::stoll(value);
    else if (key == "--steps") c.steps = std::stoll(value);
    else if (key == "--channels") c.channels = value;
    else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }
  if (is_worker) {
    diffuse::configure_cpu_runtime(nullptr, threads);  // threads, malloc settings (the policy is inherited)
    return worker(c, threads, result);
  }
  setenv("OMP_WAIT_POLICY", "PASSIVE", 0);  // idle OpenMP workers sleep instead of taking the other rank's core

  const int cores = int(std::thread::hardware_concurrency());
  const int per_rank = std::max(1, cores / nproc);
  std::cout << "dist_bench: UNet channels " << c.channels << ", 32x32x1 synthetic shapes, global batch " << c.batch
            << ", " << c.steps << " steps (images/s over steps " << c.warmup_steps + 1 << ".." << c.steps << "), "
            << cores << " cores, Gloo on 127.0.0.1\n";
  const double same_cores = measure(c, 1, cores);
  const double one = per_rank == cores ? same_cores : measure(c, 1, per_rank);
  const double many = measure(c, nproc, per_rank);
  std::cout << std::setprecision(3) << "same cores (" << nproc << " x " << per_rank << " threads vs 1 x " << cores
            << "): speed-up " << many / same_cores << "\n"
            << "scaling efficiency (" << nproc << " x " << per_rank << " threads vs 1 x " << per_rank
            << ", ideal 1): " << many / (double(nproc) * one) << "\n";
}
