// UNet throughput on the training issue's reference config (32x32x1, channels 64/128/128, 2 layers per block,
// attention at the middle level and in the mid block, 11 classes): forward images/s, training-step images/s
// (forward + backward + AdamW), GFLOP/s, fraction of a same-run 2048x2048 matrix product, peak RSS.
//
// usage: unet_bench [--batch 64] [--iters 5] [--threads N] [--channels-last 0|1] [--train 0|1] [--device cpu]
// Runs under configure_cpu_runtime (runtime.h); compare images per CPU-second when the machine is shared.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/util/runtime.h"
#include "diffuse/models/unet.h"

namespace {

using Clock = std::chrono::steady_clock;

double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

struct Timing {
  double best = 1e30, mean = 0, cpu = 0;  // wall seconds (best, mean), CPU seconds per run (mean)
};

template <class F>
Timing time_it(int iters, torch::Device device, F&& f) {
  Timing t;
  const double cpu0 = cpu_seconds();
  for (int i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    f();
    if (device.is_cuda()) torch::cuda::synchronize();
    double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    t.best = std::min(t.best, dt);
    t.mean += dt / iters;
  }
  t.cpu = (cpu_seconds() - cpu0) / iters;
  return t;
}

void report(const char* what, const Timing& t, int64_t batch, double flops_per_image, double matmul) {
  double ips = double(batch) / t.best;
  double gflops = ips * flops_per_image / 1e9;
  std::cout << what << ": " << ips << " images/s (best of runs; mean " << double(batch) / t.mean << "), " << gflops
            << " GFLOP/s, " << 100.0 * gflops / matmul << "% of the 2048x2048 matmul rate; "
            << double(batch) / t.cpu << " images per CPU-second\n";
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 64;
  int iters = 5;
  int threads = 0;
  bool channels_last = false, train = true;
  std::string device_name = "cpu";
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i], value = argv[i + 1];
    if (key == "--batch") batch = std::stoll(value);
    else if (key == "--iters") iters = std::stoi(value);
    else if (key == "--threads") threads = std::stoi(value);
    else if (key == "--channels-last") channels_last = value == "1";
    else if (key == "--train") train = value == "1";
    else if (key == "--device") device_name = value;
    else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }
  const std::string runtime = diffuse::configure_cpu_runtime(argv, threads);
  torch::Device device = diffuse::parse_device(device_name);
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;

  auto config = diffuse::reference_unet_config();
  torch::manual_seed(0);
  diffuse::UNet2DModel model(config);
  model->to(device);
  const double flops = diffuse::unet_forward_flops(config, 32, 32);
  std::cout << "reference UNet: " << diffuse::parameter_count(*model) << " parameters, " << flops / 1e9
            << " GFLOP per image forward; batch " << batch << ", " << runtime << ", "
            << (channels_last ? "channels-last" : "NCHW") << ", device " << device << "\n";

  const double matmul = diffuse::matmul_gflops(2048, device);
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s; load average " << load[0]
            << " (other processes share the cores when it exceeds the thread count)\n";

  auto opts = torch::TensorOptions().device(device);
  auto x = torch::randn({batch, 1, 32, 32}, opts).contiguous(memory_format);
  auto t = torch::randint(0, 1000, {batch}, opts.dtype(torch::kLong)).to(torch::kFloat32);
  auto labels = torch::randint(0, 11, {batch}, opts.dtype(torch::kLong));

  model->eval();
  {
    c10::InferenceMode guard;
    model->forward(x, t, labels);  // warm-up: allocator, oneDNN primitives
    auto fwd = time_it(iters, device, [&] { model->forward(x, t, labels); });
    report("forward", fwd, batch, flops, matmul);
  }
  std::cout << "peak RSS after forward: " << peak_rss_mib() << " MiB\n";

  if (train) {
    model->train();
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-4));
    auto noise = torch::randn_like(x);
    auto step = [&] {
      opt.zero_grad();
      auto loss = torch::mse_loss(model->forward(x, t, labels), noise);
      loss.backward();
      opt.step();
    };
    step();
    auto tr = time_it(std::max(1, iters / 2), device, step);
    // A training step costs about 3 forward passes (forward, and backward for inputs and weights).
    report("train step", tr, batch, 3 * flops, matmul);
    std::cout << "peak RSS after training: " << peak_rss_mib() << " MiB\n";
  }
}
