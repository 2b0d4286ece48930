// Sampling throughput on the training issue's reference UNet (32x32x1, channels 64/128/128, 2 layers per block,
// attention at the middle level and in the mid block, 11 classes; random weights): image-steps per second
// with and without classifier-free guidance, the sampler's own cost beside the network's, the network's
// GFLOP/s as a fraction of the machine's 2048x2048 float32 matrix-product rate, peak RSS.
//
// usage: sampling_bench [--batch 64] [--steps 10] [--sampler ddim] [--threads N] [--channels-last 0|1]
//                       [--device cpu] [--network 0|1 (0: only the samplers' own arithmetic)]
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/util/runtime.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/models/unet.h"

namespace {

using Clock = std::chrono::steady_clock;

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

template <class F>
double seconds(torch::Device device, F&& f) {
  auto t0 = Clock::now();
  f();
  if (device.is_cuda()) torch::cuda::synchronize();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 64, steps = 10;
  std::string sampler_name = "ddim", device_name = "cpu";
  int threads = int(std::thread::hardware_concurrency());
  bool channels_last = false, network = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i], value = argv[i + 1];
    if (key == "--batch") batch = std::stoll(value);
    else if (key == "--steps") steps = std::stoll(value);
    else if (key == "--sampler") sampler_name = value;
    else if (key == "--threads") threads = std::stoi(value);
    else if (key == "--channels-last") channels_last = value == "1";
    else if (key == "--device") device_name = value;
    else if (key == "--network") network = value == "1";
    else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }
  const std::string runtime = diffuse::configure_cpu_runtime(argv, threads);
  const torch::Device device = diffuse::parse_device(device_name);
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;

  auto config = diffuse::reference_unet_config();
  torch::manual_seed(0);
  diffuse::UNet2DModel unet(config);
  unet->to(device);
  unet->eval();
  const double flops = diffuse::unet_forward_flops(config, 32, 32);
  const double matmul = diffuse::matmul_gflops(2048, device);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s\n";
  std::cout << "reference UNet: " << diffuse::parameter_count(*unet) << " parameters, " << flops / 1e9
            << " GFLOP per image forward; batch " << batch << ", "
            << steps << " steps of " << sampler_name << ", " << runtime << ", "
            << (channels_last ? "channels-last" : "NCHW") << ", device " << device << "\n";

  int64_t calls = 0, images = 0;
  diffuse::Network net = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& labels) {
    ++calls;
    images += x.size(0);
    return unet->forward(x.contiguous(memory_format), t, labels);
  };
  auto schedule = diffuse::rescale_zero_terminal_snr(diffuse::linear(1000));
  auto labels = torch::arange(batch, torch::kLong).remainder(10);
  auto x_T = diffuse::make_noise({1, 32, 32}, batch, 0).to(device);
  auto ts = diffuse::spaced_timesteps(1000, steps, diffuse::Spacing::trailing);
  auto sampler = diffuse::get_sampler(sampler_name);

  // The network alone, for the sampler's overhead: one forward at the batch size.
  double forward_s = 0;
  if (network) {
    torch::NoGradGuard no_grad;
    auto t = torch::full({batch}, 500.0, torch::kFloat32).to(device);
    unet->forward(x_T.contiguous(memory_format), t, labels.to(device));  // warm-up
    forward_s = seconds(device, [&] { unet->forward(x_T.contiguous(memory_format), t, labels.to(device)); });
    const double gflops = double(batch) / forward_s * flops / 1e9;
    std::cout << "network forward alone: " << double(batch) / forward_s << " images/s, " << gflops << " GFLOP/s = "
              << 100.0 * gflops / matmul << "% of the matmul rate\n";
  }

  for (bool cfg : {false, true}) {
    if (!network) break;
    diffuse::Network model = cfg ? diffuse::classifier_free_guidance(net, {7.5, 0.7, 10}) : net;
    auto d = diffuse::make_denoiser(model, diffuse::Prediction::v, schedule, {}, labels);
    calls = images = 0;
    const double s = seconds(device, [&] { sampler(d, ts, x_T, {}); });
    const double image_steps = double(batch * steps) / s;
    const double network_s = double(images) / double(batch) * forward_s;
    const double gflops = double(images) * flops / s / 1e9;
    std::cout << (cfg ? "with CFG (w 7.5, phi 0.7)" : "without guidance") << ": " << image_steps
              << " image-steps/s (" << s << " s for " << batch << " images x " << steps << " steps; " << calls
              << " network calls on " << images << " images; network alone would take " << network_s
              << " s, so the sampler and guidance add " << 100.0 * (s - network_s) / network_s << "%); " << gflops
              << " GFLOP/s = " << 100.0 * gflops / matmul << "% of the matmul rate\n";
  }
  // Each sampler's own arithmetic: a network that returns zeros; best of 3 runs of 20 steps.
  diffuse::Network zeros = [](const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&) {
    return torch::zeros_like(x);
  };
  auto cheap = diffuse::make_denoiser(zeros, diffuse::Prediction::v, schedule, {}, labels);
  auto ts20 = diffuse::spaced_timesteps(1000, 20, diffuse::Spacing::trailing);
  for (const auto& name : diffuse::sampler_names()) {
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep)
      best = std::min(best, seconds(device, [&] { diffuse::get_sampler(name)(cheap, ts20, x_T, {}); }));
    std::cout << name << " arithmetic without the network: " << best / 20.0 * 1e3 << " ms per step of " << batch
              << " images\n";
  }
  const double noise_s = seconds(torch::kCPU, [&] { diffuse::make_noise({1, 32, 32}, batch, 1, 0, 1); });
  std::cout << "make_noise for one step of " << batch << " 32x32 images: " << noise_s * 1e3 << " ms\n";
  std::cout << "peak RSS: " << peak_rss_mib() << " MiB\n";
}
