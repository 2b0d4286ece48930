// Training throughput of the whole trainer (diffuse::train: batching, noising, UNet forward + backward, AdamW,
// gradient clipping, EMA) on the reference config (32x32x1, channels 64/128/128, 2 layers per block, attention
// at the middle level and in the mid block, 11 class embeddings) at batch 64, and data loading throughput.
// Prints images/s, GFLOP/s (a training step taken as 3 forward passes), the fraction of a same-run 2048x2048
// matrix product's GFLOP/s, and peak RSS.
//
// usage: train_bench [--batch 64] [--steps 8] [--threads N] [--data fashion-mnist|synthetic-shapes]
//                    [--conv-dtype fp32|bf16]
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/data/data.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet.h"
#include "diffuse/train/train.h"
#include "diffuse/util/runtime.h"

namespace {

using bench::Clock;
using bench::seconds_since;

// Decodes the data once, then times batching (index_select + flips); returns the seconds per batch.
double batching_seconds(const diffuse::Dataset& data, int64_t batch) {
  diffuse::BatchSampler sampler(data.size(), batch, 0);
  const int64_t batches = 2000;
  auto t0 = Clock::now();
  for (int64_t s = 0; s < batches; ++s)
    diffuse::make_batch(data, sampler.indices(s), true, uint64_t(s), torch::kCPU);
  const double batch_s = seconds_since(t0);
  std::cout << "batching (index_select + random flip): " << double(batches * batch) / batch_s << " images/s\n";
  return batch_s / double(batches);
}

// diffuse::train for `steps` steps in a temporary folder; returns the seconds per step after the first two, which
// warm up the allocator and the convolution primitives.
double trainer_seconds_per_step(const diffuse::TrainOptions& o, const diffuse::Dataset& data, int64_t* first_timed,
                                size_t* steps_seen) {
  std::vector<double> stamps;
  diffuse::TrainHooks hooks;
  auto t0 = Clock::now();
  hooks.on_step = [&](const diffuse::TrainStepInfo&) { stamps.push_back(seconds_since(t0)); };
  diffuse::train(o, data, hooks);
  std::filesystem::remove_all(o.loop.out);
  const size_t first = std::min<size_t>(2, stamps.size() - 2);
  *first_timed = int64_t(first) + 2;
  *steps_seen = stamps.size();
  return (stamps.back() - stamps[first]) / double(stamps.size() - 1 - first);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 64, steps = 8;
  std::string conv_dtype = "fp32";
  int threads = int(std::thread::hardware_concurrency());
  std::string source = std::filesystem::exists(std::string(diffuse::kFashionMnistDir) + "/train-images-idx3-ubyte.gz")
                           ? "fashion-mnist"
                           : "synthetic-shapes";
  if (!bench::parse_options(argc, argv,
                            {{"--batch", bench::to(batch)},
                             {"--steps", bench::to(steps)},
                             {"--threads", bench::to(threads)},
                             {"--data", bench::to(source)},
                             {"--conv-dtype", bench::to(conv_dtype)}}))
    return 2;
  std::cout << "runtime: " << diffuse::configure_cpu_runtime(argv, threads) << ", batch " << batch
            << ", convolutions in " << conv_dtype << "\n";
  double matmul = diffuse::matmul_gflops(2048, torch::kCPU);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s\n";

  diffuse::DataSpec spec;
  spec.source = source;
  auto t0 = Clock::now();
  auto data = diffuse::load_dataset(spec);
  double load_s = seconds_since(t0);
  std::cout << "data " << data.name << ": " << data.size() << " images decoded and fitted to 32x32 in " << load_s
            << " s (" << double(data.size()) / load_s << " images/s)\n";
  const double per_batch = batching_seconds(data, batch);

  diffuse::TrainOptions o;  // reference UNet, eps, linear schedule, AdamW, clipping, EMA
  o.data = spec;
  o.loop.steps = steps;
  o.loop.batch = batch;
  o.loop.progress = false;
  o.loop.checkpoint_every = 1 << 30;
  o.loop.log_every = 1 << 30;
  o.loop.threads = threads;
  o.loop.conv_dtype = diffuse::network_dtype(conv_dtype, "--conv-dtype");
  o.loop.out = (std::filesystem::temp_directory_path() / ("diffuse-train-bench-" + std::to_string(getpid()))).string();
  double flops = diffuse::unet_forward_flops(o.unet, 32, 32);
  {
    diffuse::UNet2DModel probe(o.unet);
    std::cout << "reference UNet: " << diffuse::parameter_count(*probe) << " parameters, " << flops / 1e9
              << " GFLOP per image forward\n";
  }
  int64_t first = 0;
  size_t seen = 0;
  const double per_step = trainer_seconds_per_step(o, data, &first, &seen);
  double ips = double(batch) / per_step;
  double gflops = ips * 3 * flops / 1e9;
  std::cout << "training (diffuse::train, steps " << first << ".." << seen << "): " << ips << " images/s, " << per_step
            << " s/step, " << gflops << " GFLOP/s, " << 100.0 * gflops / matmul << "% of the matmul rate\n";
  std::cout << "data share of a step: " << 100.0 * per_batch / per_step << "%\n";
  std::cout << "peak RSS: " << bench::peak_rss_mib() << " MiB\n";
}
