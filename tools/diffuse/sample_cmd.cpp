// diffuse sample: images from a trained model (a diffuse run folder or a diffusers UNet2DModel folder)
// with any sampler, spacing, classifier-free guidance (with rescale) and classifier guidance.
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "model_files.h"
#include "diffuse/classifier.h"
#include "diffuse/denoiser.h"
#include "diffuse/image_io.h"
#include "diffuse/progress.h"
#include "diffuse/runtime.h"
#include "diffuse/safetensors.h"
#include "diffuse/sampling.h"
#include "diffuse/scheduler_config.h"
#include "diffuse/unet.h"
#include "diffuse/vae.h"
#include <torch/torch.h>

namespace fs = std::filesystem;

namespace diffuse::cli {
namespace {

struct SampleOptions {
  std::string model, out = "samples", sampler = "ddim", spacing, device = "cpu", classifier, init_noise, save_raw, vae;
  std::string scheduler_path, weights = "auto", variance = "fixed_small";
  int64_t steps = 25, n = 16, batch = 64, class_id = -1, null_class = -1, grid_cols = 0;
  double cfg = 1.0, cfg_rescale = 0.0, classifier_scale = 0.0, eta = std::numeric_limits<double>::quiet_NaN();
  double clip_sample = std::numeric_limits<double>::quiet_NaN();  ///< NaN: the scheduler config's; 0: off
  uint64_t seed = 0;
  bool no_images = false, quiet = false;
};

// Latent diffusion: --vae, else the run's vae/ or a diffusers pipeline's (model_index.json) vae/; empty for pixel models.
std::string vae_folder(const SampleOptions& o) {
  if (o.vae == "none") return "";
  if (!o.vae.empty()) return resolve_vae_folder(o.vae);
  fs::path run(o.model);
  if (fs::exists(run / "vae" / "config.json")) return (run / "vae").string();  // a diffuse run
  // A diffusers pipeline folder's unet/ (model_index.json beside it): its vae/.
  if (fs::exists(run.parent_path() / "model_index.json") && fs::exists(run.parent_path() / "vae" / "config.json"))
    return (run.parent_path() / "vae").string();
  return "";
}

void run_sample(const SampleOptions& o) {
  warn_if_slow_blas();
  torch::NoGradGuard no_grad;
  auto device = parse_device(o.device);
  if (o.n < 1) throw std::invalid_argument("--n must be >= 1, got " + std::to_string(o.n));
  if (o.batch < 1) throw std::invalid_argument("--batch must be >= 1, got " + std::to_string(o.batch));
  if (o.cfg_rescale < 0 || o.cfg_rescale > 1)
    throw std::invalid_argument("--cfg-rescale must lie in [0, 1], got " + std::to_string(o.cfg_rescale));

  auto folder = unet_folder(o.model, o.weights);  // first: a missing model is the error to report
  auto config = SchedulerConfig::load(scheduler_file(o.model, o.scheduler_path));
  auto schedule = config.schedule();
  auto spacing = o.spacing.empty() ? config.timestep_spacing : parse_spacing(o.spacing);
  auto timesteps = spaced_timesteps(schedule.T(), o.steps, spacing, spacing == Spacing::leading ? config.steps_offset : 0);
  auto sampler = get_sampler(o.sampler);

  auto unet = load_unet(folder, device);
  unet->eval();
  const auto& uc = unet->config();
  if (!uc.sample_size) throw std::invalid_argument("the UNet config has no sample_size: cannot tell the image size");
  int64_t C = uc.in_channels, H = *uc.sample_size, W = *uc.sample_size;
  AutoencoderKL vae{nullptr};
  if (auto vf = vae_folder(o); !vf.empty()) {
    vae = load_vae(vf, device);
    vae->eval();
    if (vae->config().latent_channels != C)
      throw std::invalid_argument("the autoencoder '" + vf + "' has " + std::to_string(vae->config().latent_channels) +
                                  " latent channels but the UNet takes " + std::to_string(C) +
                                  " (pass the --vae the model was trained with, or --vae none)");
    if (!o.quiet)
      std::cerr << "latent diffusion: decoding " << C << "x" << H << "x" << W << " latents through '" << vf
                << "' (scaling_factor " << vae->config().scaling_factor << ")\n";
  }
  int64_t num_embeds = uc.num_class_embeds.value_or(0);
  int64_t null_class = o.null_class >= 0 ? o.null_class : num_embeds - 1;
  int64_t classes = num_embeds > 0 ? num_embeds - 1 : 0;  // the last embedding is the null class
  if (o.class_id >= 0 && (num_embeds == 0 || o.class_id >= num_embeds))
    throw std::invalid_argument("--class " + std::to_string(o.class_id) + " but the model has " +
                                std::to_string(num_embeds) + " class embeddings");
  if (o.cfg != 1.0 && num_embeds == 0)
    throw std::invalid_argument("--cfg needs a class-conditional model; this one has no class embeddings");
  if (o.classifier_scale != 0 && o.classifier.empty())
    throw std::invalid_argument("--classifier-scale needs --classifier RUN");

  Network net = [unet](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& labels) mutable {
    return unet->forward(x, t, labels);
  };
  if (o.cfg != 1.0) net = classifier_free_guidance(net, {o.cfg, o.cfg_rescale, null_class});
  NoisyClassifier classifier{nullptr};
  if (!o.classifier.empty()) {
    fs::path c(o.classifier);
    classifier = load_classifier(fs::exists(c / "classifier") ? (c / "classifier").string() : c.string(), device);
    classifier->eval();
    if (classifier->config().in_channels != C)
      throw std::invalid_argument("the classifier '" + o.classifier + "' takes " +
                                  std::to_string(classifier->config().in_channels) + " channels but the UNet's x_t has " +
                                  std::to_string(C) + (vae.is_empty() ? "" : " (a latent model needs a classifier "
                                                                              "trained on the same latents)"));
  }

  torch::Tensor init;
  if (!o.init_noise.empty()) {
    auto tensors = load_safetensors(o.init_noise);
    auto it = tensors.find("noise");
    if (it == tensors.end()) it = tensors.find("init_noise");
    if (it == tensors.end()) throw std::invalid_argument("'" + o.init_noise + "' has no tensor named 'noise'");
    init = it->second.to(torch::kFloat32);
    if (init.dim() != 4 || init.size(0) < o.n || init.size(1) != C || init.size(2) != H || init.size(3) != W)
      throw std::invalid_argument("'" + o.init_noise + "': noise must be [>= " + std::to_string(o.n) + ", " +
                                  std::to_string(C) + ", " + std::to_string(H) + ", " + std::to_string(W) + "]");
  }

  const double clip_range = std::isnan(o.clip_sample) ? (config.clip_sample ? config.clip_sample_range : 0.0) : o.clip_sample;
  if (!(clip_range >= 0)) throw std::invalid_argument("--clip-sample must be >= 0 (0: off), got " + std::to_string(clip_range));
  if (clip_range > 0 && !vae.is_empty())
    throw std::invalid_argument("--clip-sample clamps pixel values, but this model samples latents (pass --clip-sample 0)");

  std::vector<int64_t> labels(o.n, -1);
  for (int64_t i = 0; i < o.n; ++i)
    if (num_embeds > 0) labels[i] = o.class_id >= 0 ? o.class_id : (classes > 0 ? i % classes : 0);

  int64_t batches = (o.n + o.batch - 1) / o.batch;
  Progress progress(!o.quiet, 0, batches * int64_t(timesteps.size()), 1, "step");
  auto t0 = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> outputs;
  for (int64_t b = 0; b < batches; ++b) {
    int64_t first = b * o.batch, count = std::min(o.batch, o.n - first);
    auto x = init.defined() ? init.slice(0, first, first + count) : make_noise({C, H, W}, count, o.seed, first);
    x = x.to(device);
    torch::Tensor y;
    if (num_embeds > 0)
      y = torch::tensor(std::vector<int64_t>(labels.begin() + first, labels.begin() + first + count), torch::kLong).to(device);
    auto denoiser = make_denoiser(net, config.prediction_type, schedule, config.etsdm, y);
    if (clip_range > 0) denoiser = clip_x0(denoiser, clip_range);
    if (classifier) {
      Classifier clf = [classifier](const torch::Tensor& x_t, const torch::Tensor& t) mutable {
        return classifier->forward(x_t, t);
      };
      denoiser = classifier_guidance(denoiser, clf, y, o.classifier_scale);
    }
    SamplerOptions so;
    so.eta = o.eta;
    so.variance = parse_ddpm_variance(o.variance);
    so.set_alpha_to_one = config.set_alpha_to_one;
    so.seed = o.seed;
    so.first_image = first;
    int64_t done_before = b * int64_t(timesteps.size());
    so.callback = [&](const StepInfo& info) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      int64_t done = done_before + info.step + 1;
      std::ostringstream f;
      f << "t " << info.t << "  " << std::fixed << std::setprecision(1)
        << double(done) * double(o.batch > o.n ? o.n : o.batch) / std::max(secs, 1e-9) << " image-steps/s";
      progress.update(done, f.str());
    };
    outputs.push_back(sampler(denoiser, timesteps, x, so).to(torch::kCPU, torch::kFloat32));
  }
  progress.finish();
  auto images = torch::cat(outputs);
  torch::Tensor latents;
  if (!vae.is_empty()) {
    latents = images;
    std::vector<torch::Tensor> decoded;
    for (int64_t i = 0; i < latents.size(0); i += o.batch)
      decoded.push_back(vae->decode_scaled(latents.narrow(0, i, std::min(o.batch, latents.size(0) - i)).to(device))
                            .to(torch::kCPU, torch::kFloat32));
    images = torch::cat(decoded);
    H = images.size(2);
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  fs::create_directories(o.out);
  if (!o.save_raw.empty()) {
    std::map<std::string, torch::Tensor> raw = {{"sample", images.contiguous()}};
    if (num_embeds > 0) raw["labels"] = torch::tensor(labels, torch::kLong);  // the class asked for (diffuse eval)
    if (latents.defined()) raw["latents"] = latents.contiguous();
    save_safetensors(o.save_raw, raw);
  }
  if (!o.no_images) {
    for (int64_t i = 0; i < o.n; ++i) {
      std::ostringstream name;
      name << std::setw(6) << std::setfill('0') << i << ".png";
      write_png((fs::path(o.out) / name.str()).string(), images[i]);
    }
    if (num_embeds > 0) {  // the class each image was asked for, read by diffuse eval
      std::ostringstream csv;
      csv << "file,class\n";
      for (int64_t i = 0; i < o.n; ++i) csv << std::setw(6) << std::setfill('0') << i << ".png," << labels[i] << "\n";
      write_file_atomic((fs::path(o.out) / "labels.csv").string(), csv.str());
    }
    GridOptions g;
    g.cols = o.grid_cols;
    g.scale = H <= 64 ? 2 : 1;
    if (num_embeds > 0)
      for (int64_t i = 0; i < o.n; ++i) g.image_labels.push_back(std::to_string(labels[i]));
    write_grid_png((fs::path(o.out) / "grid.png").string(), images, g);
  }
  std::cout << "sampled " << o.n << " images (" << o.sampler << ", " << timesteps.size() << " steps, "
            << to_string(spacing) << ", first t " << timesteps.front() << (o.cfg != 1.0 ? ", cfg " : "")
            << (o.cfg != 1.0 ? std::to_string(o.cfg) : "")
            << (clip_range > 0 ? ", x0 clipped to +-" + std::to_string(clip_range) : "") << ") in " << std::fixed << std::setprecision(1) << secs
            << " s: " << double(o.n) * double(timesteps.size()) / secs << " image-steps/s"
            << (o.no_images ? "" : "; wrote " + (fs::path(o.out) / "grid.png").string()) << "\n";
}

}  // namespace

void add_sample_command(CLI::App& app) {
  auto o = std::make_shared<SampleOptions>();
  auto* cmd = app.add_subcommand("sample", "Sample images from a trained model (diffuse run or diffusers UNet2DModel folder)");
  cmd->add_option("--model", o->model, "Run folder (unet_ema/ or unet/ + scheduler/) or a diffusers UNet2DModel folder")->required();
  cmd->add_option("--scheduler", o->scheduler_path, "scheduler_config.json (default: found beside the model)");
  cmd->add_option("--weights", o->weights, "auto (EMA when present), ema or raw")->capture_default_str();
  cmd->add_option("--sampler", o->sampler, "ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde")->capture_default_str();
  cmd->add_option("--steps", o->steps, "Sampling steps S (1..T)")->capture_default_str();
  cmd->add_option("--spacing", o->spacing, "leading, linspace or trailing (default: the scheduler config's)");
  cmd->add_option("--clip-sample", o->clip_sample, "Clamp the x0 estimate to [-R, R] at every step, R > 0 (0: off; default: "
                                                   "clip_sample / clip_sample_range of the scheduler config). Keeps eps "
                                                   "models usable near SNR 0; pixel models only");
  cmd->add_option("--eta", o->eta, "Noise of ddim / euler_ancestral / dpmpp_2m_sde (default: the sampler's)");
  cmd->add_option("--ddpm-variance", o->variance, "fixed_small or fixed_large")->capture_default_str();
  cmd->add_option("--n", o->n, "Number of images")->capture_default_str();
  cmd->add_option("--batch", o->batch, "Images per forward batch (does not change the images)")->capture_default_str();
  cmd->add_option("--class", o->class_id, "Class of every image (default: classes in turn)");
  cmd->add_option("--null-class", o->null_class, "Unconditional label for CFG (default: the last class embedding)");
  cmd->add_option("--cfg", o->cfg, "Classifier-free guidance weight w (1 = off)")->capture_default_str();
  cmd->add_option("--cfg-rescale", o->cfg_rescale, "Guidance rescale phi (Lin et al. 2023, Algorithm 2; 0.7 there)")->capture_default_str();
  cmd->add_option("--classifier", o->classifier, "Noisy classifier run (diffuse train-classifier) for classifier guidance");
  cmd->add_option("--classifier-scale", o->classifier_scale, "Classifier guidance scale")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed: image i depends only on (seed, i)")->capture_default_str();
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
  cmd->callback([o] { run_sample(*o); });
}

}  // namespace diffuse::cli
