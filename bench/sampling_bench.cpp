// Sampling throughput on the training issue's reference UNet (32x32x1, channels 64/128/128, 2 layers per block,
// attention at the middle level and in the mid block, 11 classes; random weights): image-steps per second
// with and without classifier-free guidance, the sampler's own cost beside the network's, the network's
// GFLOP/s as a fraction of the machine's 2048x2048 float32 matrix-product rate, peak RSS.
//
// usage: sampling_bench [--batch 64] [--steps 10] [--sampler ddim] [--threads N] [--channels-last 0|1]
//                       [--device cpu] [--network 0|1 (0: only the samplers' own arithmetic)]
#include <algorithm>
#include <iostream>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/util/runtime.h"

namespace {

using bench::seconds;

struct Setup {
  int64_t batch = 64, steps = 10;
  std::string sampler = "ddim", device_name = "cpu";
  int threads = int(std::thread::hardware_concurrency());
  bool channels_last = false, network = true;
  at::MemoryFormat memory_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

// The reference UNet's forward alone at the batch size (for the sampler's overhead); returns its seconds.
double network_alone(diffuse::UNet2DModel& unet, const Setup& o, const torch::Tensor& x_T, const torch::Tensor& labels,
                     double flops, double matmul, torch::Device device) {
  torch::NoGradGuard no_grad;
  const auto memory_format = o.memory_format();
  auto t = torch::full({o.batch}, 500.0, torch::kFloat32).to(device);
  unet->forward(x_T.contiguous(memory_format), t, labels.to(device));  // warm-up
  const double s = seconds(device, [&] { unet->forward(x_T.contiguous(memory_format), t, labels.to(device)); });
  const double gflops = double(o.batch) / s * flops / 1e9;
  std::cout << "network forward alone: " << double(o.batch) / s << " images/s, " << gflops << " GFLOP/s = "
            << 100.0 * gflops / matmul << "% of the matmul rate\n";
  return s;
}

// The sampler with the network, without and with classifier-free guidance.
void with_network(diffuse::UNet2DModel& unet, const Setup& o, const torch::Tensor& x_T, const torch::Tensor& labels,
                  double flops, double matmul, torch::Device device) {
  const double forward_s = network_alone(unet, o, x_T, labels, flops, matmul, device);
  const auto memory_format = o.memory_format();
  int64_t calls = 0, images = 0;
  diffuse::Network net = [&](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning& conditioning) {
    const auto& l = conditioning.labels;
    ++calls;
    images += x.size(0);
    return unet->forward(x.contiguous(memory_format), t, l);
  };
  auto schedule = diffuse::rescale_zero_terminal_snr(diffuse::linear(1000));
  auto ts = diffuse::spaced_timesteps(1000, o.steps, diffuse::Spacing::trailing);
  auto sampler = diffuse::get_sampler(o.sampler);
  for (bool cfg : {false, true}) {
    diffuse::Network model = cfg ? diffuse::classifier_free_guidance(net, {7.5, 0.7, 10}) : net;
    auto d = diffuse::make_denoiser(model, diffuse::Prediction::v, schedule, {}, labels);
    calls = images = 0;
    const double s = seconds(device, [&] { sampler(d, ts, x_T, {}); });
    const double image_steps = double(o.batch * o.steps) / s;
    const double network_s = double(images) / double(o.batch) * forward_s;
    const double gflops = double(images) * flops / s / 1e9;
    std::cout << (cfg ? "with CFG (w 7.5, phi 0.7)" : "without guidance") << ": " << image_steps
              << " image-steps/s (" << s << " s for " << o.batch << " images x " << o.steps << " steps; " << calls
              << " network calls on " << images << " images; network alone would take " << network_s
              << " s, so the sampler and guidance add " << 100.0 * (s - network_s) / network_s << "%); " << gflops
              << " GFLOP/s = " << 100.0 * gflops / matmul << "% of the matmul rate\n";
  }
}

// Each sampler's own arithmetic: a network that returns zeros; best of 3 runs of 20 steps.
void sampler_arithmetic(const Setup& o, const torch::Tensor& x_T, const torch::Tensor& labels, torch::Device device) {
  diffuse::Network zeros = [](const torch::Tensor& x, const torch::Tensor&, const diffuse::Conditioning&) {
    return torch::zeros_like(x);
  };
  auto schedule = diffuse::rescale_zero_terminal_snr(diffuse::linear(1000));
  auto cheap = diffuse::make_denoiser(zeros, diffuse::Prediction::v, schedule, {}, labels);
  auto ts20 = diffuse::spaced_timesteps(1000, 20, diffuse::Spacing::trailing);
  for (const auto& name : diffuse::sampler_names()) {
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep)
      best = std::min(best, seconds(device, [&] { diffuse::get_sampler(name)(cheap, ts20, x_T, {}); }));
    std::cout << name << " arithmetic without the network: " << best / 20.0 * 1e3 << " ms per step of " << o.batch
              << " images\n";
  }
  const double noise_s = seconds(torch::kCPU, [&] { diffuse::make_noise({1, 32, 32}, o.batch, 1, 0, 1); });
  std::cout << "make_noise for one step of " << o.batch << " 32x32 images: " << noise_s * 1e3 << " ms\n";
}

}  // namespace

int main(int argc, char** argv) {
  Setup o;
  if (!bench::parse_options(argc, argv,
                            {{"--batch", bench::to(o.batch)},
                             {"--steps", bench::to(o.steps)},
                             {"--sampler", bench::to(o.sampler)},
                             {"--threads", bench::to(o.threads)},
                             {"--channels-last", bench::to(o.channels_last)},
                             {"--device", bench::to(o.device_name)},
                             {"--network", bench::to(o.network)}}))
    return 2;
  const std::string runtime = diffuse::configure_cpu_runtime(argv, o.threads);
  const torch::Device device = diffuse::parse_device(o.device_name);

  auto config = diffuse::reference_unet_config();
  torch::manual_seed(0);
  diffuse::UNet2DModel unet(config);
  unet->to(device);
  unet->eval();
  const double flops = diffuse::unet_forward_flops(config, 32, 32);
  const double matmul = diffuse::matmul_gflops(2048, device);
  std::cout << "matmul 2048x2048 float32: " << matmul << " GFLOP/s\n";
  std::cout << "reference UNet: " << diffuse::parameter_count(*unet) << " parameters, " << flops / 1e9
            << " GFLOP per image forward; batch " << o.batch << ", " << o.steps << " steps of " << o.sampler << ", "
            << runtime << ", " << (o.channels_last ? "channels-last" : "NCHW") << ", device " << device << "\n";
  auto labels = torch::arange(o.batch, torch::kLong).remainder(10);
  auto x_T = diffuse::make_noise({1, 32, 32}, o.batch, 0).to(device);
  if (o.network) with_network(unet, o, x_T, labels, flops, matmul, device);
  sampler_arithmetic(o, x_T, labels, device);
  std::cout << "peak RSS: " << bench::peak_rss_mib() << " MiB\n";
}
