// Training throughput of the whole trainer (diffuse::train: batching, noising, UNet forward + backward, AdamW,
// gradient clipping, EMA) on the reference config (32x32x1, channels 64/128/128, 2 layers per block, attention
// at the middle level and in the mid block, 11 class embeddings) at batch 64, and data loading throughput.
// Prints images/s, GFLOP/s (a training step taken as 3 forward passes), the fraction of a same-run 2048x2048
// matrix product's GFLOP/s, and peak RSS.
//
// usage: train_bench [--batch 64] [--steps 8] [--threads N] [--data fashion-mnist|synthetic-shapes]
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/data/data.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/train.h"
#include "diffuse/models/unet.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 64, steps = 8;
  int threads = int(std::thread::hardware_concurrency());
  std::string source = std::filesystem::exists(std::string(diffuse::kFashionMnistDir) + "/train-images-idx3-ubyte.gz")
                           ? "fashion-mnist"
                           : "synthetic-shapes";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i], value = argv[i + 1];
    if (key == "--batch") batch = std::stoll(value);
    else if (key == "--steps") steps = std::stoll(value);
    else if (key == "--threads") threads = std::stoi(value);
    else if (key == "--data") source = value;
    else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }
  std::cout << "runtime: " << diffuse::configure_cpu_runtime(argv, threads) << ", batch " << batch << "\n";
  double matmul = diffuse::matmul_gflops(2048, torch::kCPU);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s\n";

  // ---- data: decode once, then batches by index_select
  diffuse::DataSpec spec;
  spec.source = source;
  auto t0 = Clock::now();
  auto data = diffuse::load_dataset(spec);
  double load_s = seconds_since(t0);
  std::cout << "data " << data.name << ": " << data.size() << " images decoded and fitted to 32x32 in " << load_s
            << " s (" << double(data.size()) / load_s << " images/s)\n";
  diffuse::BatchSampler sampler(data.size(), batch, 0);
  int64_t batches = 2000;
  t0 = Clock::now();
  for (int64_t s = 0; s < batches; ++s)
    diffuse::make_batch(data, sampler.indices(s), true, uint64_t(s), torch::kCPU);
  double batch_s = seconds_since(t0);
  std::cout << "batching (index_select + random flip): " << double(batches * batch) / batch_s << " images/s\n";

  // ---- the trainer
  diffuse::TrainOptions o;  // reference UNet, eps, linear schedule, AdamW, clipping, EMA
  o.data = spec;
  o.loop.steps = steps;
  o.loop.batch = batch;
  o.loop.progress = false;
  o.loop.checkpoint_every = 1 << 30;
  o.loop.log_every = 1 << 30;
  o.loop.threads = threads;
  o.loop.out = (std::filesystem::temp_directory_path() / ("diffuse-train-bench-" + std::to_string(getpid()))).string();
  double flops = diffuse::unet_forward_flops(o.unet, 32, 32);
  {
    diffuse::UNet2DModel probe(o.unet);
    std::cout << "reference UNet: " << diffuse::parameter_count(*probe) << " parameters, " << flops / 1e9
              << " GFLOP per image forward\n";
  }
  std::vector<double> stamps;
  diffuse::TrainHooks hooks;
  hooks.on_step = [&](const diffuse::TrainStepInfo&) { stamps.push_back(seconds_since(t0)); };
  t0 = Clock::now();
  diffuse::train(o, data, hooks);
  std::filesystem::remove_all(o.loop.out);
  // The first two steps warm up the allocator and the convolution primitives.
  size_t first = std::min<size_t>(2, stamps.size() - 2);
  double per_step = (stamps.back() - stamps[first]) / double(stamps.size() - 1 - first);
  double ips = double(batch) / per_step;
  double gflops = ips * 3 * flops / 1e9;
  std::cout << "training (diffuse::train, steps " << first + 2 << ".." << stamps.size() << "): " << ips
            << " images/s, " << per_step << " s/step, " << gflops << " GFLOP/s, " << 100.0 * gflops / matmul
            << "% of the matmul rate\n";
  std::cout << "data share of a step: " << 100.0 * (batch_s / double(batches)) / per_step << "%\n";
  std::cout << "peak RSS: " << peak_rss_mib() << " MiB\n";
}
