// The Stable Diffusion UNet's step: an SD-1.5-shaped UNet2DConditionModel (859.5M parameters, random weights) or
// SD 2.1's (--config sd21), batch 2 (one CFG pair) at 64x64 latents, text states [2, 77, D]: seconds per forward
// (a sampler step), and with --train 1 per training step (forward + backward + AdamW), peak RSS. Variants: --dtype
// fp32|bf16 (the whole network's weights and activations), --conv-dtype bf16 (a float32 network's convolutions
// only, convolutions_to), --channels-last 0|1, --gradient-checkpointing 0|1 (training: each block recomputed in the
// backward pass). diffusers' figures for the same steps are measured beside it by bench/sd_compare.sh (sampling) and
// bench/sd_train_compare.sh (training) (docs/RESULTS.md).
//
// usage: sd_unet_bench [--config sd15|sd21] [--batch 2] [--size 64] [--iters 3] [--dtype fp32] [--conv-dtype fp32]
//                      [--channels-last 0] [--train 0] [--gradient-checkpointing 0] [--threads N] [--device cpu|cuda]
// (on a GPU, diffusers' eager step with SDPA is the figure to compare with: docs/cuda.md)
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet_condition.h"
#include "diffuse/util/runtime.h"

namespace {

torch::ScalarType dtype_of(const std::string& name) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kFloat16;
  throw std::invalid_argument("dtype must be fp32, bf16 or fp16, got " + name);
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "sd15", dtype = "fp32", conv_dtype = "fp32", device_name = "cpu";
  int64_t batch = 2, size = 64, iters = 3, threads = 0;
  bool channels_last = false, train = false, checkpointing = false;
  if (!bench::parse_options(argc, argv, {{"--config", bench::to(config)}, {"--batch", bench::to(batch)},
                                         {"--size", bench::to(size)}, {"--iters", bench::to(iters)},
                                         {"--dtype", bench::to(dtype)}, {"--conv-dtype", bench::to(conv_dtype)},
                                         {"--channels-last", bench::to(channels_last)}, {"--train", bench::to(train)},
                                         {"--threads", bench::to(threads)}, {"--device", bench::to(device_name)},
                                         {"--gradient-checkpointing", bench::to(checkpointing)}}))
    return 2;
  const auto runtime = diffuse::configure_cpu_runtime(argv, int(threads));
  torch::manual_seed(0);
  const auto c = config == "sd21" ? diffuse::sd21_unet_config() : diffuse::sd15_unet_config();
  auto t0 = bench::Clock::now();
  diffuse::UNet2DConditionModel unet(c);
  const double build_s = bench::seconds_since(t0);
  const torch::Device device(device_name);
  const auto net_dtype = dtype_of(dtype);
  unet->to(device, net_dtype);
  if (dtype_of(conv_dtype) != torch::kFloat32) diffuse::convolutions_to(*unet, dtype_of(conv_dtype));
  if (channels_last) diffuse::to_channels_last(*unet);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto x = torch::randn({batch, c.in_channels, size, size}).to(device, net_dtype).contiguous(format);
  auto context = torch::randn({batch, 77, c.cross_attention_dim}).to(device, net_dtype);
  auto t = torch::full({batch}, 500.0f, torch::TensorOptions().device(device));
  std::cout << "sd_unet_bench: " << config << " UNet2DConditionModel, " << diffuse::parameter_count(*unet)
            << " parameters (built in " << build_s << " s), batch " << batch << " at " << size << "x" << size
            << " latents, dtype " << dtype << ", conv-dtype " << conv_dtype << (channels_last ? ", channels-last" : "")
            << ", " << device << "; " << runtime << "\n";
  double best = 1e30, mean = 0;
  if (!train) {
    unet->eval();
    torch::NoGradGuard no_grad;
    for (int64_t i = 0; i <= iters; ++i) {
      const double s = bench::seconds(device, [&] { unet->forward(x, t, context); });
      if (i == 0) {
        std::cout << "first forward (warm-up) " << s << " s\n";
        continue;
      }
      best = std::min(best, s);
      mean += s / double(iters);
    }
    std::cout << "forward (one CFG step): best " << best << " s, mean " << mean << " s; peak RSS "
              << bench::peak_rss_mib() / 1024.0 << " GiB\n";
    return 0;
  }
  unet->train();
  unet->set_gradient_checkpointing(checkpointing);
  std::cout << "gradient checkpointing " << (checkpointing ? "on" : "off") << "\n";
  torch::optim::AdamW adam(unet->parameters(), torch::optim::AdamWOptions(1e-5));
  auto target = torch::randn_like(x);
  for (int64_t i = 0; i <= iters; ++i) {
    const double s = bench::seconds(device, [&] {
      adam.zero_grad();
      torch::mse_loss(unet->forward(x, t, context).to(torch::kFloat32), target.to(torch::kFloat32)).backward();
      adam.step();
    });
    if (i == 0) {
      std::cout << "first training step (warm-up) " << s << " s\n";
      continue;
    }
    best = std::min(best, s);
    mean += s / double(iters);
  }
  std::cout << "training step (forward + backward + AdamW): best " << best << " s, mean " << mean << " s; peak RSS "
            << bench::peak_rss_mib() / 1024.0 << " GiB\n";
}
