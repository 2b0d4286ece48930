// The Stable Diffusion UNet's step: an SD-1.5-shaped UNet2DConditionModel (859.5M parameters, random weights) or
// SD 2.1's (--config sd21), batch 2 (one CFG pair) at 64x64 latents, text states [2, 77, D]: seconds per forward
// (a sampler step), and with --train 1 per training step (forward + backward + AdamW), peak RSS. Variants: --dtype
// fp32|bf16 (the whole network's weights and activations), --conv-dtype bf16 (a float32 network's convolutions
// only, convolutions_to), --channels-last 0|1, --gradient-checkpointing 0|1 (training: each block recomputed in the
// backward pass). diffusers' figures for the same steps are measured beside it by bench/sd_compare.sh (sampling) and
// bench/sd_train_compare.sh (training) (docs/RESULTS.md).
//
// On a GPU, --cuda-graphs 1 also replays the forward as a CUDA graph (generate()'s graphed network), and the peak of
// the caching allocator is printed beside each figure; diffusers' eager step with SDPA on the same GPU is the figure
// to compare with (bench/sd_gpu_compare.sh, docs/cuda.md).
// --write-pipeline DIR writes a random-weight SD-1.5-shaped StableDiffusionPipeline folder (the UNet, CLIP ViT-L's
// text tower, SD's autoencoder; tokenizer, scheduler and model_index.json copied from --like, a pipeline folder) for
// timing a whole text-to-image run with `diffuse sample`, and exits.
//
// usage: sd_unet_bench [--config sd15|sd21] [--batch 2] [--size 64] [--iters 3] [--dtype fp32] [--conv-dtype fp32]
//                      [--channels-last 0] [--train 0] [--gradient-checkpointing 0] [--threads N] [--device cpu|cuda]
//                      [--cuda-graphs 0] | --write-pipeline DIR --like tests/fixtures/text-to-image/sd1/pipe
#include <filesystem>
#include <iostream>
#include <sstream>
#include <string>

#include <torch/torch.h>

#ifdef DIFFUSE_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "bench_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet_condition.h"
#include "diffuse/models/vae.h"
#include "diffuse/text/clip_text.h"
#include "diffuse/util/runtime.h"
#include "sample/graphed_network.h"

namespace fs = std::filesystem;

namespace {

// "; peak GPU memory X GiB" since the last call (the caching allocator's peak of allocated bytes), or "" off a GPU.
std::string gpu_peak(torch::Device device) {
#ifdef DIFFUSE_BENCH_CUDA
  if (!device.is_cuda()) return "";
  const auto index = device.has_index() ? device.index() : c10::DeviceIndex(0);
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  c10::cuda::CUDACachingAllocator::resetPeakStats(index);
  std::ostringstream s;
  s << "; peak GPU memory " << double(stats.allocated_bytes[0].peak) / double(1 << 30) << " GiB";
  return s.str();
#else
  return "";
#endif
}

// A random-weight SD-1.5-shaped pipeline folder: diffuse's own writers, the small files of `like`.
void write_pipeline(const std::string& folder, const std::string& like) {
  fs::create_directories(folder);
  for (const char* part : {"tokenizer", "scheduler"})
    fs::copy(like + "/" + part, folder + "/" + part, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  fs::copy_file(like + "/model_index.json", folder + "/model_index.json", fs::copy_options::overwrite_existing);
  torch::manual_seed(0);
  {
    diffuse::UNet2DConditionModel unet(diffuse::sd15_unet_config());
    diffuse::save_unet_condition(unet, folder + "/unet");
  }
  diffuse::ClipTextModel te(diffuse::sd15_text_encoder_config());
  diffuse::save_clip_text_model(te, folder + "/text_encoder");
  diffuse::AutoencoderKL vae(diffuse::sd_vae_config());
  diffuse::save_vae(vae, folder + "/vae");
  std::cout << "wrote a random-weight SD 1.5-shaped pipeline to " << folder << "\n";
}

torch::ScalarType dtype_of(const std::string& name) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kFloat16;
  throw std::invalid_argument("dtype must be fp32, bf16 or fp16, got " + name);
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "sd15", dtype = "fp32", conv_dtype = "fp32", device_name = "cpu", pipeline, like;
  int64_t batch = 2, size = 64, iters = 3, threads = 0;
  bool channels_last = false, train = false, checkpointing = false, graphs = false;
  if (!bench::parse_options(argc, argv, {{"--config", bench::to(config)}, {"--batch", bench::to(batch)},
                                         {"--size", bench::to(size)}, {"--iters", bench::to(iters)},
                                         {"--dtype", bench::to(dtype)}, {"--conv-dtype", bench::to(conv_dtype)},
                                         {"--channels-last", bench::to(channels_last)}, {"--train", bench::to(train)},
                                         {"--threads", bench::to(threads)}, {"--device", bench::to(device_name)},
                                         {"--gradient-checkpointing", bench::to(checkpointing)},
                                         {"--cuda-graphs", bench::to(graphs)},
                                         {"--write-pipeline", bench::to(pipeline)}, {"--like", bench::to(like)}}))
    return 2;
  const auto runtime = diffuse::configure_cpu_runtime(argv, int(threads));
  if (!pipeline.empty()) {
    if (like.empty()) throw std::invalid_argument("--write-pipeline needs --like PIPE (its tokenizer and scheduler)");
    write_pipeline(pipeline, like);
    return 0;
  }
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
    const diffuse::Network eager = [&](const torch::Tensor& xt, const torch::Tensor& tt, const diffuse::Conditioning& c) {
      return unet->forward(xt, tt, c.context);
    };
    diffuse::Conditioning cond;
    cond.context = context;
    for (bool graphed : {false, true}) {
      if (graphed && !graphs) break;
      const auto net = graphed ? diffuse::detail::graphed_network(eager) : eager;
      gpu_peak(device);
      best = 1e30, mean = 0;
      for (int64_t i = 0; i <= iters + (graphed ? 2 : 0); ++i) {  // graphed: 2 eager calls and the capture first
        const double s = bench::seconds(device, [&] { net(x, t, cond); });
        if (i < (graphed ? 3 : 1)) {
          std::cout << (graphed ? "graph warm-up / capture " : "first forward (warm-up) ") << s << " s\n";
          continue;
        }
        best = std::min(best, s);
        mean += s / double(iters);
      }
      std::cout << "forward (one CFG step)" << (graphed ? " as a CUDA graph" : "") << ": best " << best << " s, mean "
                << mean << " s; peak RSS " << bench::peak_rss_mib() / 1024.0 << " GiB" << gpu_peak(device) << "\n";
    }
    return 0;
  }
  unet->train();
  unet->set_gradient_checkpointing(checkpointing);
  std::cout << "gradient checkpointing " << (checkpointing ? "on" : "off") << "\n";
  torch::optim::AdamW adam(unet->parameters(), torch::optim::AdamWOptions(1e-5));
  auto target = torch::randn_like(x);
  gpu_peak(device);
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
            << bench::peak_rss_mib() / 1024.0 << " GiB" << gpu_peak(device) << "\n";
}
