// AutoencoderKL throughput on a Fashion-MNIST-sized config (32x32x1, channels 32/64/128, 1 layer per block,
// 4 latent channels: latents 4x8x8): encode, decode and training-step (encode, posterior sample, decode,
// L1 + KL, backward, Adam) images/s, best of `iters` runs after one warm-up.
//
// usage: vae_bench [--batch 64] [--iters 5] [--threads N] [--device cpu]
#include <algorithm>
#include <iostream>
#include <string>
#include <thread>

#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/util/runtime.h"
#include "diffuse/models/vae.h"

namespace {

template <class F>
double best_seconds(int iters, torch::Device device, F&& f) {
  f();  // warm-up
  double best = 1e30;
  for (int i = 0; i < iters; ++i) best = std::min(best, bench::seconds(device, f));
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t batch = 64;
  int iters = 5;
  int threads = int(std::thread::hardware_concurrency());
  std::string device_name = "cpu";
  if (!bench::parse_options(argc, argv,
                            {{"--batch", bench::to(batch)},
                             {"--iters", bench::to(iters)},
                             {"--threads", bench::to(threads)},
                             {"--device", bench::to(device_name)}}))
    return 2;
  torch::set_num_threads(threads);
  torch::Device device = diffuse::parse_device(device_name);
  diffuse::AutoencoderKLConfig config;
  config.in_channels = config.out_channels = 1;
  config.sample_size = 32;
  config.block_out_channels = {32, 64, 128};
  config.down_block_types.assign(3, "DownEncoderBlock2D");
  config.up_block_types.assign(3, "UpDecoderBlock2D");
  config.norm_num_groups = 32;
  torch::manual_seed(0);
  diffuse::AutoencoderKL model(config);
  model->to(device);
  std::cout << "device " << device << ", threads " << torch::get_num_threads() << ", batch " << batch << ", "
            << diffuse::parameter_count(*model) << " parameters\n";

  auto x = (torch::rand({batch, 1, 32, 32}) * 2 - 1).to(device);
  torch::Tensor z;
  {
    torch::NoGradGuard no_grad;
    z = model->encode(x).mean;
    double enc = best_seconds(iters, device, [&] { model->encode(x); });
    double dec = best_seconds(iters, device, [&] { model->decode(z); });
    std::cout << "encode: " << double(batch) / enc << " images/s\n";
    std::cout << "decode: " << double(batch) / dec << " images/s\n";
  }
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(1e-4));
  double step = best_seconds(iters, device, [&] {
    adam.zero_grad();
    auto posterior = model->encode(x);
    auto loss = (model->decode(posterior.sample()) - x).abs().mean() + 1e-6 * posterior.kl().mean();
    loss.backward();
    adam.step();
  });
  std::cout << "train step: " << double(batch) / step << " images/s\n";
}
