// The small text-to-image model of experiments/08-zero-snr-finetune, made from the library: Fashion-MNIST with a
// per-image brightness (fashion-mnist-brightness) written as a caption folder whose captions name the class and the
// brightness ("a dark photo of a sneaker"), and a Stable Diffusion-shaped pipeline folder to train from scratch: an
// RGB autoencoder trained by train-vae, the shared fixtures' tiny CLIP text encoder and tokenizer, a freshly
// initialised UNet2DConditionModel (2 levels, cross-attention on the first, 4x8x8 latents), and SD 1.x's scheduler
// settings (scaled_linear betas, eps, leading spacing, steps_offset 1): the flawed baseline of Lin et al. 2023.
//
// usage: fmnist_text_pipeline captions DIR COUNT          the first COUNT training images, 32x32 RGB PNG + .txt;
//                                                         prints the images and mean brightness per caption kind
//        fmnist_text_pipeline prompts KIND FILE           dark | bright | plain | data: a prompt file (data: the
//                                                         captions of the first 1000 test images, in order)
//        fmnist_text_pipeline pipeline OUT VAE TEXT_PIPE  assembles the pipeline folder (TEXT_PIPE: a pipeline
//                                                         whose text_encoder/ and tokenizer/ are copied)
//        fmnist_text_pipeline grey SAMPLES OUT            the sample PNGs as 1-channel images (luminance), for
//                                                         diffuse eval's Fashion-MNIST feature network
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "diffuse/core/scheduler_config.h"
#include "diffuse/data/data.h"
#include "diffuse/io/files.h"
#include "diffuse/io/image_io.h"
#include "diffuse/models/unet_condition.h"
#include "diffuse/models/vae.h"
#include "diffuse/train/text_train.h"

namespace fs = std::filesystem;

namespace {

// The caption kind of an image from its mean brightness in [-1, 1]: the thirds of the range.
std::string kind_of(double mean) { return mean < -1.0 / 3 ? "dark" : mean > 1.0 / 3 ? "bright" : "plain"; }

std::string caption(const std::string& kind, int64_t label) {
  std::string name = diffuse::fashion_mnist_classes()[size_t(label)];
  for (auto& c : name) c = char(std::tolower(static_cast<unsigned char>(c)));
  return (kind == "plain" ? "a photo of a " : "a " + kind + " photo of a ") + name;
}

int captions(const std::string& dir, int64_t count) {
  diffuse::DataSpec spec;
  spec.source = "fashion-mnist-brightness";
  spec.limit = count;
  auto data = diffuse::load_dataset(spec);
  fs::create_directories(dir);
  std::map<std::string, std::pair<int64_t, double>> stats;
  for (int64_t i = 0; i < data.size(); ++i) {
    auto img = data.images[i].repeat({3, 1, 1});
    const double mean = data.images[i].mean().item<double>();
    const auto kind = kind_of(mean);
    char stem[32];
    std::snprintf(stem, sizeof stem, "%06lld", static_cast<long long>(i));
    diffuse::write_png(dir + "/" + stem + ".png", img);
    diffuse::write_file_atomic(dir + "/" + stem + ".txt", caption(kind, data.labels[i].item<int64_t>()) + "\n");
    stats[kind].first += 1;
    stats[kind].second += mean;
  }
  std::cout << "kind,images,mean_brightness\n";
  for (const auto& [kind, s] : stats) std::cout << kind << "," << s.first << "," << s.second / double(s.first) << "\n";
  return 0;
}

int prompts(const std::string& kind, const std::string& file) {
  std::ofstream out(file);
  if (kind == "data") {
    diffuse::DataSpec spec;
    spec.source = "fashion-mnist-brightness";
    spec.limit = 1000;
    auto data = diffuse::load_dataset(spec, true);
    for (int64_t i = 0; i < data.size(); ++i)
      out << caption(kind_of(data.images[i].mean().item<double>()), data.labels[i].item<int64_t>()) << "\n";
  } else {
    for (int64_t label = 0; label < 10; ++label) out << caption(kind, label) << "\n";
  }
  return out ? 0 : 1;
}

int pipeline(const std::string& out, const std::string& vae, const std::string& text_pipe) {
  fs::create_directories(out);
  for (const char* part : {"text_encoder", "tokenizer"})
    fs::copy(fs::path(text_pipe) / part, fs::path(out) / part, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  auto autoencoder = diffuse::load_vae(diffuse::resolve_vae_folder(vae), torch::kCPU);
  diffuse::save_vae(autoencoder, out + "/vae");
  const int64_t text_width = diffuse::load_json(text_pipe + "/text_encoder/config.json").at("hidden_size").get<int64_t>();
  auto j = diffuse::load_json(text_pipe + "/unet/config.json");
  j["sample_size"] = 32 / autoencoder->config().downsample_factor();
  j["in_channels"] = j["out_channels"] = autoencoder->config().latent_channels;
  j["block_out_channels"] = {64, 128};
  j["down_block_types"] = {"CrossAttnDownBlock2D", "DownBlock2D"};
  j["up_block_types"] = {"UpBlock2D", "CrossAttnUpBlock2D"};
  j["layers_per_block"] = 1;
  j["norm_num_groups"] = 16;
  j["attention_head_dim"] = 4;
  j["cross_attention_dim"] = text_width;
  torch::manual_seed(0);
  diffuse::UNet2DConditionModel unet(diffuse::UNetConditionConfig::from_json(j));
  diffuse::save_unet_condition(unet, out + "/unet");
  diffuse::SchedulerConfig s;  // SD 1.x: scaled_linear, eps, leading, steps_offset 1
  s.beta_schedule = "scaled_linear";
  s.beta_start = 0.00085;
  s.beta_end = 0.012;
  s.steps_offset = 1;
  s.set_alpha_to_one = false;
  s.extra["_class_name"] = "DDIMScheduler";
  fs::create_directories(out + "/scheduler");
  s.save(out + "/scheduler/scheduler_config.json");
  diffuse::write_file_atomic(out + "/model_index.json", diffuse::stable_diffusion_model_index().dump(2) + "\n");
  std::cout << "wrote " << out << "\n";
  return 0;
}

int grey(const std::string& samples, const std::string& out) {
  fs::create_directories(out);
  int64_t n = 0;
  for (const auto& e : fs::directory_iterator(samples)) {
    const auto name = e.path().filename().string();
    if (e.path().extension() != ".png" || name == "grid.png") continue;
    diffuse::write_png((fs::path(out) / name).string(), diffuse::read_image(e.path().string(), 1));
    ++n;
  }
  std::cout << "wrote " << n << " grey images to " << out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "captions" && argc == 4) return captions(argv[2], std::stoll(argv[3]));
    if (mode == "prompts" && argc == 4) return prompts(argv[2], argv[3]);
    if (mode == "pipeline" && argc == 5) return pipeline(argv[2], argv[3], argv[4]);
    if (mode == "grey" && argc == 4) return grey(argv[2], argv[3]);
    std::cerr << "usage: fmnist_text_pipeline captions DIR COUNT | prompts dark|bright|plain|data FILE | "
                 "pipeline OUT VAE TEXT_PIPE | grey SAMPLES OUT\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
