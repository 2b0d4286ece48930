// diffuse sample: images from a trained model (a diffuse run folder, a diffusers UNet2DModel folder, or a Stable
// Diffusion pipeline folder with prompts) with any sampler, spacing, classifier-free guidance (with rescale and
// negative prompts) and classifier guidance.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "diffuse/io/files.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/models/classifier.h"
#include "diffuse/sample/denoiser.h"
#include "diffuse/io/image_io.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/util/progress.h"
#include "diffuse/util/runtime.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/models/unet.h"
#include "diffuse/models/vae.h"
#include <torch/torch.h>

namespace fs = std::filesystem;

namespace diffuse::cli {
namespace {

struct SampleOptions {
  std::string model, out = "samples", sampler, spacing, unipc_variant, device = "cpu", dtype = "fp32", conv_dtype = "fp32", classifier, init_noise, save_raw, vae;
  std::string scheduler_path, weights = "auto", variance = "fixed_small";
  std::string prompt, negative_prompt, prompts_file, negative_prompts_file, text_normalization = "transformers";
  std::string init_image, tokenizer, single_file_config;
  double strength = 0.8;
  bool v_prediction = false;
  int64_t clip_skip = 0, height = 0, width = 0;
  int64_t steps = 25, n = 16, batch = 64, class_id = -1, null_class = -1, grid_cols = 0;
  double cfg = 1.0, cfg_rescale = 0.0, classifier_scale = 0.0, eta = std::numeric_limits<double>::quiet_NaN();
  double clip_sample = std::numeric_limits<double>::quiet_NaN();  ///< NaN: the scheduler config's; 0: off
  uint64_t seed = 0;
  int order = 0;
  bool no_images = false, quiet = false, dpmpp3_taylor = false, cuda_graphs = false, channels_last = false, tf32 = false;
};

torch::Tensor load_init_noise(const std::string& file) {
  auto tensors = load_safetensors(file);
  auto it = tensors.find("noise");
  if (it == tensors.end()) it = tensors.find("init_noise");
  if (it == tensors.end()) throw std::invalid_argument("'" + file + "' has no tensor named 'noise'");
  return it->second.to(torch::kFloat32);
}

// A prompt option (`text`) or the lines of a prompt file (`file`, one prompt per line; empty lines kept only where
// they mean something: an empty negative prompt).
std::vector<std::string> prompts_of(const std::string& text, const std::string& file, const char* flag,
                                    const char* file_flag, bool keep_empty) {
  if (!text.empty() && !file.empty())
    throw std::invalid_argument(std::string("pass ") + flag + " or " + file_flag + " FILE, not both");
  if (file.empty()) return text.empty() ? std::vector<std::string>{} : std::vector<std::string>{text};
  std::istringstream lines(read_file(file));
  std::vector<std::string> prompts;
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (keep_empty || !line.empty()) prompts.push_back(line);
  }
  if (prompts.empty()) throw std::invalid_argument("'" + file + "' holds no prompt (one per line)");
  return prompts;
}

GenerateOptions generate_options(const SampleOptions& o, torch::Device device) {
  GenerateOptions g;
  g.prompts = prompts_of(o.prompt, o.prompts_file, "--prompt", "--prompts", false);
  g.negative_prompts = prompts_of(o.negative_prompt, o.negative_prompts_file, "--negative-prompt", "--negative-prompts", true);
  g.clip_skip = o.clip_skip;
  g.height = o.height;
  g.width = o.width;
  if (!o.init_image.empty()) {
    g.init_images = read_image(o.init_image, 3).unsqueeze(0);
    g.strength = o.strength;
  }
  g.sampler = o.sampler;
  g.steps = o.steps;
  if (!o.spacing.empty()) g.spacing = parse_spacing(o.spacing);
  g.order = o.order;
  if (!o.unipc_variant.empty()) g.unipc_variant = parse_unipc_variant(o.unipc_variant);
  g.dpmpp3_taylor = o.dpmpp3_taylor;
  g.n = o.n;
  g.batch = o.batch;
  g.class_id = o.class_id;
  g.null_class = o.null_class;
  g.cfg = o.cfg;
  g.cfg_rescale = o.cfg_rescale;
  g.classifier_scale = o.classifier_scale;
  g.eta = o.eta;
  g.variance = parse_ddpm_variance(o.variance);
  g.clip_sample = o.clip_sample;
  g.seed = o.seed;
  g.cuda_graphs = o.cuda_graphs;
  if (!o.classifier.empty()) {
    fs::path c(o.classifier);
    const auto folder = RunFolder(c).network("classifier");
    g.classifier = load_classifier(fs::exists(folder) ? folder.string() : c.string(), device);
    g.classifier->eval();
  }
  if (!o.init_noise.empty()) g.init_noise = load_init_noise(o.init_noise);
  return g;
}

// An earlier `diffuse sample` into the same folder may have left more numbered images (and a labels.csv) than
// this one writes: removed, so that `diffuse eval` never counts another run's images.
void remove_earlier_samples(const fs::path& out) {
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    const bool numbered = name.size() == 10 && name.compare(6, 4, ".png") == 0 &&
                          std::all_of(name.begin(), name.begin() + 6, [](char c) { return c >= '0' && c <= '9'; });
    if ((numbered || name == "labels.csv") && entry.is_regular_file()) fs::remove(entry.path());
  }
}

// The "parameters" text of a PNG (the convention of AUTOMATIC1111's web UI, which other tools read): the prompt,
// the negative prompt, then the settings.
std::string png_parameters(const SampleOptions& o, const Generated& g, int64_t i) {
  std::ostringstream p;
  p << g.prompts[size_t(i)] << "\n";
  if (!g.negative_prompts[size_t(i)].empty()) p << "Negative prompt: " << g.negative_prompts[size_t(i)] << "\n";
  p << "Steps: " << g.timesteps.size() << ", Sampler: " << g.sampler << ", Spacing: " << to_string(g.spacing)
    << ", CFG scale: " << o.cfg << ", CFG rescale: " << o.cfg_rescale << ", Seed: " << o.seed << ", Image index: " << i
    << ", Size: " << g.images.size(3) << "x" << g.images.size(2) << ", Model: " << fs::path(o.model).filename().string()
    << (o.clip_skip ? ", Clip skip: " + std::to_string(o.clip_skip) : "") << ", Generator: diffuse";
  return p.str();
}

void write_outputs(const SampleOptions& o, const LoadedRun& run, const Generated& g) {
  fs::create_directories(o.out);
  if (!o.no_images) remove_earlier_samples(o.out);
  if (!o.save_raw.empty()) {
    std::map<std::string, torch::Tensor> raw = {{"sample", g.images.contiguous()}};
    if (run.class_embeds > 0) raw["labels"] = torch::tensor(g.labels, torch::kLong);  // the class asked for (diffuse eval)
    if (g.latents.defined()) raw["latents"] = g.latents.contiguous();
    save_safetensors(o.save_raw, raw);
  }
  if (o.no_images) return;
  for (int64_t i = 0; i < o.n; ++i) {
    std::ostringstream name;
    name << std::setw(6) << std::setfill('0') << i << ".png";
    std::map<std::string, std::string> text;
    if (run.is_text()) text["parameters"] = png_parameters(o, g, i);
    write_png((fs::path(o.out) / name.str()).string(), g.images[i], text);
  }
  if (run.class_embeds > 0) {  // the class each image was asked for, read by diffuse eval
    std::ostringstream csv;
    csv << "file,class\n";
    for (int64_t i = 0; i < o.n; ++i) csv << std::setw(6) << std::setfill('0') << i << ".png," << g.labels[i] << "\n";
    write_file_atomic((fs::path(o.out) / "labels.csv").string(), csv.str());
  }
  GridOptions grid;
  grid.cols = o.grid_cols;
  grid.scale = g.images.size(2) <= 64 ? 2 : 1;
  if (run.class_embeds > 0)
    for (int64_t i = 0; i < o.n; ++i) grid.image_labels.push_back(std::to_string(g.labels[i]));
  write_grid_png((fs::path(o.out) / "grid.png").string(), g.images, grid);
}

void run_sample(const SampleOptions& o) {
  if (o.batch < 1) throw std::invalid_argument("--batch must be >= 1, got " + std::to_string(o.batch));
  warn_if_slow_blas();
  if (!o.quiet && o.dtype == "fp32" && o.conv_dtype == "fp32")
    suggest_bf16(o.device, "--dtype bf16 samples about 2.9x faster at the same FID");
  auto device = parse_device(o.device);
  LoadOptions lo;
  lo.weights = o.weights;
  lo.scheduler_file = o.scheduler_path;
  lo.vae = o.vae;
  lo.device = device;
  lo.dtype = parse_network_dtype(o.dtype, device);
  lo.channels_last = o.channels_last;
  lo.conv_dtype = parse_network_dtype(o.conv_dtype, device, "--conv-dtype");
  if (o.text_normalization != "transformers" && o.text_normalization != "clip")
    throw std::invalid_argument("--text-normalization must be transformers or clip, got '" + o.text_normalization + "'");
  lo.text_normalization = o.text_normalization == "clip" ? TextNormalization::clip : TextNormalization::transformers;
  lo.tokenizer = o.tokenizer;
  lo.v_prediction = o.v_prediction;
  lo.single_file_config = o.single_file_config;
  if (o.tf32) allow_tf32(device);
  auto g = generate_options(o, device);  // first: an unreadable prompt file is reported before the model loads
  auto run = load_run(o.model, lo);
  for (const auto& note : run.notes) std::cerr << "note: " << note << "\n";
  if (!run.vae.is_empty() && !o.quiet)
    std::cerr << "latent diffusion: decoding " << run.channels << "-channel latents ("
              << (o.height || o.width || !o.init_image.empty() ? std::string("of the requested size")
                                                               : std::to_string(run.height) + "x" + std::to_string(run.width))
              << ") through '" << run.vae_folder << "' (scaling_factor " << run.vae->config().scaling_factor << ")\n";
  const int64_t total = (o.n + o.batch - 1) / o.batch * o.steps;
  Progress progress(!o.quiet, 0, total, 1, "step");
  auto t0 = std::chrono::steady_clock::now();
  g.progress = [&](const GenerateProgress& p) {
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::ostringstream f;
    f << "t " << p.t << "  " << std::fixed << std::setprecision(1)
      << double(p.done) * double(std::min(o.batch, o.n)) / std::max(secs, 1e-9) << " image-steps/s";
    progress.update(p.done, f.str());
  };
  auto out = generate(run, g);
  progress.finish();
  for (const auto& note : out.notes) std::cerr << "note: " << note << "\n";
  write_outputs(o, run, out);
  const double secs = out.seconds;
  std::cout << "sampled " << o.n << " images (" << out.sampler << ", " << out.timesteps.size() << " steps, "
            << to_string(out.spacing) << ", first t " << out.timesteps.front() << (o.cfg != 1.0 ? ", cfg " : "")
            << (o.cfg != 1.0 ? std::to_string(o.cfg) : "")
            << (out.clip_range > 0 ? ", x0 clipped to +-" + std::to_string(out.clip_range) : "") << ") in " << std::fixed
            << std::setprecision(secs < 10 ? 3 : 1) << secs << " s: " << std::setprecision(1)
            << double(o.n) * double(out.timesteps.size()) / secs
            << " image-steps/s" << (o.no_images ? "" : "; wrote " + (fs::path(o.out) / "grid.png").string()) << "\n";
}

}  // namespace

void add_sample_command(CLI::App& app) {
  auto o = std::make_shared<SampleOptions>();
  auto* cmd = app.add_subcommand("sample", "Sample images from a trained model (diffuse run, diffusers UNet2DModel folder, "
                                           "or Stable Diffusion 1.x / 2.x pipeline folder with --prompt)");
  cmd->add_option("--model", o->model, "Run folder (unet_ema/ or unet/ + scheduler/), a diffusers UNet2DModel folder, or a "
                                       "diffusers StableDiffusionPipeline folder (model_index.json)")->required();
  cmd->add_option("--prompt", o->prompt, "Text-to-image: the prompt of every image");
  cmd->add_option("--prompts", o->prompts_file, "Text-to-image: a file of prompts, one per line (image i gets line i mod P)");
  cmd->add_option("--negative-prompt", o->negative_prompt, "Text-to-image: CFG's unconditional half (default: the empty "
                                                           "prompt); needs --cfg above 1");
  cmd->add_option("--negative-prompts", o->negative_prompts_file, "Text-to-image: a file of negative prompts, one per "
                                                                 "line (image i gets line i mod P; empty lines count)");
  cmd->add_option("--clip-skip", o->clip_skip, "Text-to-image: use the text encoder's states this many layers before "
                                               "the last (diffusers' clip_skip)")->capture_default_str();
  cmd->add_option("--text-normalization", o->text_normalization, "Tokenizer: transformers (what diffusers pipelines feed "
                  "the model) or clip (original CLIP's: no special-token or CJK split)")->capture_default_str();
  cmd->add_option("--height", o->height, "Image height in pixels (latent models: a multiple of the VAE's factor times "
                                         "the UNet's; default: the config's sample_size)");
  cmd->add_option("--width", o->width, "Image width in pixels (as --height)");
  cmd->add_option("--tokenizer", o->tokenizer, "Single-file checkpoints (--model FILE.safetensors in the original "
                                               "SD layout): the tokenizer/ folder to use (such files hold none)");
  cmd->add_flag("--v-prediction", o->v_prediction, "Single-file checkpoints: the model predicts v (SD 2.x 768-v models; "
                                                  "the file does not say)");
  cmd->add_option("--single-file-config", o->single_file_config, "Single-file checkpoints: a pipeline folder whose "
                  "configs (unet/, vae/, text_encoder/, scheduler/, tokenizer/) to use instead of the inferred ones");
  cmd->add_option("--init-image", o->init_image, "Image to image: start every image from this RGB image (PNG, JPEG, BMP; "
                                                 "its size must suit the model, as --height / --width)");
  cmd->add_option("--strength", o->strength, "Image to image: the fraction of the --steps walk to run, from the noise "
                                             "level int(steps * strength) steps before its end (diffusers' strength)")
      ->capture_default_str();
  cmd->add_option("--scheduler", o->scheduler_path, "scheduler_config.json (default: found beside the model)");
  cmd->add_option("--weights", o->weights, "auto (EMA when present), ema or raw")->capture_default_str();
  cmd->add_option("--sampler", o->sampler, sampler_help() + " (default: the scheduler config's class, e.g. "
                                           "UniPCMultistepScheduler -> unipc; ddim without one)");
  cmd->add_option("--order", o->order, "unipc's order 1-3 (default: the config's solver_order, else 2)");
  cmd->add_option("--unipc-variant", o->unipc_variant, "unipc's B(h): bh1 or bh2 (default: the config's solver_type, else bh2)");
  cmd->add_flag("--dpmpp3-taylor", o->dpmpp3_taylor, "dpmpp_3m*: weigh the second difference by its Taylor coefficient "
                                                     "(third order; diffusers' update, the default, is second order)");
  cmd->add_option("--steps", o->steps, "Sampling steps S (1..T)")->capture_default_str();
  cmd->add_option("--spacing", o->spacing, "leading, linspace, trailing, or the sigma spacings karras and exponential "
                                           "(default: the scheduler config's)");
  cmd->add_option("--clip-sample", o->clip_sample, "Clamp the x0 estimate to [-R, R] at every step and recompute eps, R > 0 "
                                                   "(0: off; default: clip_sample / clip_sample_range of the scheduler "
                                                   "config, with diffusers' meaning: eps kept). Keeps eps models usable "
                                                   "near SNR 0; pixel models only");
  cmd->add_option("--eta", o->eta, "Noise of ddim / euler_ancestral / dpmpp_2m_sde / dpmpp_3m_sde (default: the sampler's)");
  cmd->add_option("--ddpm-variance", o->variance, "fixed_small or fixed_large")->capture_default_str();
  cmd->add_option("--n", o->n, "Number of images")->capture_default_str();
  cmd->add_option("--batch", o->batch, "Images per forward batch (does not change the images)")->capture_default_str();
  cmd->add_option("--class", o->class_id, "Class of every image (default: classes in turn)");
  cmd->add_option("--null-class", o->null_class, "Unconditional label for CFG (default: the last class embedding)");
  cmd->add_option("--cfg", o->cfg, "Classifier-free guidance weight w (1 = off)")->capture_default_str();
  cmd->add_option("--cfg-rescale", o->cfg_rescale, "Guidance rescale phi (Lin et al. 2023, Algorithm 2; 0.7 there)")->capture_default_str();
  cmd->add_option("--classifier", o->classifier, "Noisy classifier run (diffuse train-classifier) for classifier guidance");
  cmd->add_option("--classifier-scale", o->classifier_scale, "Classifier guidance scale")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed: image i depends only on (seed, i)")->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option("--init-noise", o->init_noise, "Start from stored noise (safetensors, key 'noise', [N,C,H,W])");
  cmd->add_option("--save-raw", o->save_raw, "Store the final tensor (key 'sample', NCHW float32; a latent model's "
                                             "decoded images, its latents under 'latents') as safetensors");
  cmd->add_option("--vae", o->vae, "Latent models: the autoencoder to decode with (default: vae/ of the run or "
                                   "pipeline; 'none': no decoding, the PNGs show the latents)");
  cmd->add_option("--out", o->out, "Output folder: grid.png and one PNG per image")->capture_default_str();
  cmd->add_option("--grid-cols", o->grid_cols, "Images per grid row (default: square)");
  cmd->add_flag("--no-images", o->no_images, "Write no PNGs (with --save-raw)");
  cmd->add_flag("--quiet", o->quiet, "No progress line");
  cmd->add_option("--device", o->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "The UNet's precision: fp32, bf16 or fp16 (GPU); the sampler stays float32")
      ->capture_default_str();
  cmd->add_option("--conv-dtype", o->conv_dtype, "A float32 UNet's convolutions only in bf16 (or fp16 on a GPU); "
                  "norms and attention stay float32. 2-3x faster convolutions on CPUs with AMX or AVX512-BF16")
      ->capture_default_str();
  cmd->add_flag("--cuda-graphs", o->cuda_graphs, "GPU: capture the network's call once per batch shape as a CUDA graph "
                "and replay it (same numbers, fewer host launches; pays at small batches)");
  cmd->add_flag("--channels-last", o->channels_last, "Run the UNet in channels-last (NHWC) layout (GPU tensor cores)");
  cmd->add_flag("--tf32", o->tf32, "GPU: TF32 convolutions and matrix products for a float32 UNet (10-bit mantissa, "
                "PyTorch's default for cuDNN; diffuse's default is true float32)");
  cmd->callback([o] { run_sample(*o); });
}

}  // namespace diffuse::cli
