// UNet throughput on the training issue's reference config (32x32x1, channels 64/128/128, 2 layers per block,
// attention at the middle level and in the mid block, 11 classes): forward images/s, training-step images/s
// (forward + backward + AdamW), GFLOP/s, fraction of a same-run 2048x2048 matrix product, peak RSS.
//
// usage: unet_bench [--batch 64] [--iters 5] [--threads N] [--channels-last 0|1] [--train 0|1] [--device cpu]
//                   [--conv-dtype fp32|bf16]
// Runs under configure_cpu_runtime (runtime.h); compare images per CPU-second when the machine is shared.
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet.h"
#include "diffuse/util/runtime.h"

namespace {

struct Timing {
  double best = 1e30, mean = 0, cpu = 0;  // wall seconds (best, mean), CPU seconds per run (mean)
};

template <class F>
Timing time_it(int iters, torch::Device device, F&& f) {
  Timing t;
  const double cpu0 = bench::cpu_seconds();
  for (int i = 0; i < iters; ++i) {
    const double dt = bench::seconds(device, f);
    t.best = std::min(t.best, dt);
    t.mean += dt / iters;
  }
  t.cpu = (bench::cpu_seconds() - cpu0) / iters;
  return t;
}

void report(const char* what, const Timing& t, int64_t batch, double flops_per_image, double matmul) {
  double ips = double(batch) / t.best;
  double gflops = ips * flops_per_image / 1e9;
  std::cout << what << ": " << ips << " images/s (best of runs; mean " << double(batch) / t.mean << "), " << gflops
            << " GFLOP/s, " << 100.0 * gflops / matmul << "% of the 2048x2048 matmul rate; "
            << double(batch) / t.cpu << " images per CPU-second\n";
}

struct Setup {
  int64_t batch = 64;
  int iters = 5, threads = 0;
  bool channels_last = false, train = true;
  std::string device_name = "cpu", conv_dtype = "fp32";
};

// forward + backward + AdamW on fixed inputs, after one warm-up step.
void train_steps(diffuse::UNet2DModel& model, const Setup& o, const torch::Tensor& x, const torch::Tensor& t,
                 const torch::Tensor& labels, double flops, double matmul, torch::Device device) {
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
  auto tr = time_it(std::max(1, o.iters / 2), device, step);
  // A training step costs about 3 forward passes (forward, and backward for inputs and weights).
  report("train step", tr, o.batch, 3 * flops, matmul);
  std::cout << "peak RSS after training: " << bench::peak_rss_mib() << " MiB\n";
}

}  // namespace

int main(int argc, char** argv) {
  Setup o;
  if (!bench::parse_options(argc, argv,
                            {{"--batch", bench::to(o.batch)},
                             {"--iters", bench::to(o.iters)},
                             {"--threads", bench::to(o.threads)},
                             {"--channels-last", bench::to(o.channels_last)},
                             {"--train", bench::to(o.train)},
                             {"--device", bench::to(o.device_name)},
                             {"--conv-dtype", bench::to(o.conv_dtype)}}))
    return 2;
  const std::string runtime = diffuse::configure_cpu_runtime(argv, o.threads);
  torch::Device device = diffuse::parse_device(o.device_name);
  diffuse::ConvolutionDtype conv_dtype(diffuse::parse_network_dtype(o.conv_dtype, device, "--conv-dtype"));
  const auto memory_format = o.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;

  auto config = diffuse::reference_unet_config();
  torch::manual_seed(0);
  diffuse::UNet2DModel model(config);
  model->to(device);
  const double flops = diffuse::unet_forward_flops(config, 32, 32);
  std::cout << "reference UNet: " << diffuse::parameter_count(*model) << " parameters, " << flops / 1e9
            << " GFLOP per image forward; batch " << o.batch << ", " << runtime << ", "
            << (o.channels_last ? "channels-last" : "NCHW") << ", convolutions in " << o.conv_dtype << ", device "
            << device << "\n";

  const double matmul = diffuse::matmul_gflops(2048, device);
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s; load average " << load[0]
            << " (other processes share the cores when it exceeds the thread count)\n";

  auto opts = torch::TensorOptions().device(device);
  auto x = torch::randn({o.batch, 1, 32, 32}, opts).contiguous(memory_format);
  auto t = torch::randint(0, 1000, {o.batch}, opts.dtype(torch::kLong)).to(torch::kFloat32);
  auto labels = torch::randint(0, 11, {o.batch}, opts.dtype(torch::kLong));

  model->eval();
  {
    c10::InferenceMode guard;
    model->forward(x, t, labels);  // warm-up: allocator, oneDNN primitives
    auto fwd = time_it(o.iters, device, [&] { model->forward(x, t, labels); });
    report("forward", fwd, o.batch, flops, matmul);
  }
  std::cout << "peak RSS after forward: " << bench::peak_rss_mib() << " MiB\n";
  if (o.train) train_steps(model, o, x, t, labels, flops, matmul, device);
}
