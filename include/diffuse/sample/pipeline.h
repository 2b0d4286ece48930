// Generation as a library call: a trained model's parts (load_run) and images from them (generate). This is
// what `diffuse sample` does; the CLI only parses options, calls these and writes files.
//
//   auto run = diffuse::load_run("runs/fm");                 // UNet, scheduler config, VAE of a latent run
//   diffuse::GenerateOptions g;
//   g.sampler = "dpmpp_2m"; g.steps = 25; g.n = 16; g.cfg = 3;
//   auto out = diffuse::generate(run, g);                    // out.images: [16, C, H, W] in [-1, 1]
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "diffuse/models/classifier.h"
#include "diffuse/sample/denoiser.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/core/schedule.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/models/unet.h"
#include "diffuse/models/unet_condition.h"
#include "diffuse/models/vae.h"
#include "diffuse/text/clip_text.h"
#include "diffuse/text/clip_tokenizer.h"

namespace diffuse {

/// Where the parts of a model folder live, in one place: a diffuse run folder (unet_ema/, unet/, scheduler/,
/// vae/ of a latent run), a diffusers pipeline folder (model_index.json, unet/, scheduler/, vae/ and for
/// text-to-image text_encoder/ and tokenizer/) or its unet/ folder, or a bare diffusers UNet2DModel folder
/// (config.json + weights, scheduler_config.json beside it).
struct ModelFolder {
  std::filesystem::path root;

  explicit ModelFolder(std::filesystem::path folder) : root(std::move(folder)) {}
  /// root/unet_ema (weights "auto" or "ema"), root/unet, or root itself. Throws naming the folder and the fix.
  std::string unet(const std::string& weights = "auto") const;
  /// scheduler/scheduler_config.json of the run, scheduler_config.json beside the model, or the parent's
  /// scheduler/. Throws when none exists.
  std::string scheduler_config() const;
  /// The autoencoder a latent model decodes through: the run's vae/, or a pipeline's vae/ beside
  /// model_index.json. Empty for a pixel model.
  std::string vae() const;
  std::filesystem::path run_json() const { return root / "run.json"; }
  /// The pipeline folder holding `unet_folder` (the one with model_index.json, or a diffuse run whose unet is
  /// text-conditioned): where text_encoder/ and tokenizer/ are. Empty when there is none.
  static std::string pipeline_of(const std::string& unet_folder);
};

struct LoadOptions {
  std::string weights = "auto";  ///< auto (EMA when present), ema or raw
  std::string scheduler_file;    ///< empty: ModelFolder::scheduler_config()
  std::string vae;               ///< empty: ModelFolder::vae(); "none": treat as a pixel model; else a folder
  torch::Device device = torch::kCPU;
  /// The UNet's weights and activations: float32, bfloat16 or float16 (parse_network_dtype). The sampler's
  /// arithmetic, the noise, guidance and the autoencoder stay float32: the network's input is cast down and its
  /// output back up.
  torch::ScalarType dtype = torch::kFloat32;
  /// The UNet's convolution weights and activations in channels-last (NHWC) layout: the layout GPUs'
  /// tensor-core convolutions take without transposing. The numbers are the same up to summation order.
  bool channels_last = false;
  /// A float32 UNet's convolutions only, in bfloat16 (or float16 on a GPU): their inputs are cast down and outputs
  /// back, while norms, attention and embeddings stay float32 (convolutions_to). On CPUs whose oneDNN has bf16
  /// kernels (AMX, AVX512-BF16) the convolutions, most of the network's time, run 2-3x faster; elsewhere slower.
  torch::ScalarType conv_dtype = torch::kFloat32;
  /// Text-to-image pipelines: the tokenizer's normalisation (transformers', which diffusers pipelines use, or
  /// original CLIP's).
  TextNormalization text_normalization = TextNormalization::transformers;
  /// Single-file checkpoints (a .safetensors file as `model`, read by read_original_checkpoint): the tokenizer
  /// folder (such files hold none), v prediction (they do not record it), and optionally a pipeline folder whose
  /// configs to use instead of the inferred ones.
  std::string tokenizer;
  bool v_prediction = false;
  std::string single_file_config;
};

/// A model ready to sample from. x_t has shape [channels, height, width] (latents for a latent model).
/// A text-to-image pipeline (Stable Diffusion 1.x / 2.x) holds text_unet, text_encoder and tokenizer instead of unet.
struct LoadedRun {
  UNet2DModel unet{nullptr};
  UNet2DConditionModel text_unet{nullptr};
  ClipTextModel text_encoder{nullptr};
  std::shared_ptr<const ClipTokenizer> tokenizer;
  std::vector<std::string> notes;  ///< what loading skipped or assumed (pipeline components not used), for stderr
  SchedulerConfig scheduler;
  AutoencoderKL vae{nullptr};  ///< empty for a pixel model
  std::string unet_folder, vae_folder;
  int64_t channels = 0, height = 0, width = 0;
  int64_t class_embeds = 0;    ///< 0: unconditional; else classes 0..class_embeds-2 and the null class last
  torch::Device device = torch::kCPU;
  torch::ScalarType dtype = torch::kFloat32;  ///< the UNet's (LoadOptions::dtype)
  bool channels_last = false;                 ///< LoadOptions::channels_last

  /// Any network given as a callable (network_run): sampled instead of a UNet.
  Network custom;

  /// The UNet (or the custom network) as a Network (eval mode, no gradient bookkeeping by the caller's guard).
  Network network() const;
  bool is_text() const { return !text_unet.is_empty(); }
};

/// The text encoder's states for each prompt ([P, L, D] on the run's device) as diffusers' encode_prompt gives
/// them: tokenized (padded / truncated to the tokenizer's model_max_length), then the CLIP text model, clip_skip
/// layers before the last. A prompt longer than the tokenizer's window adds a note to `notes` naming what was
/// dropped. Throws std::invalid_argument for invalid UTF-8.
torch::Tensor encode_prompts(const LoadedRun& run, const std::vector<std::string>& prompts, int64_t clip_skip = 0,
                             std::vector<std::string>* notes = nullptr);

/// Loads the UNet, its scheduler config and, for a latent model, its autoencoder, checking that they fit.
LoadedRun load_run(const std::string& model, const LoadOptions& options = {});

/// A model made of any network (x_t, t, conditioning) -> its prediction of `scheduler.prediction_type` (t: the
/// training timestep, possibly fractional), for generate(): the scheduler class's sampler and walk, classifier-free
/// guidance over class labels (class_embeds > 0: classes 0..class_embeds-2, the null class last), batching and the
/// (seed, image) noise, all as for a loaded UNet. x_t is [channels, height, width] per image.
LoadedRun network_run(Network network, SchedulerConfig scheduler, int64_t channels, int64_t height, int64_t width,
                      int64_t class_embeds = 0, torch::Device device = torch::kCPU);

/// What generate() reports while it runs: after each sampler step of each batch.
struct GenerateProgress {
  int64_t done = 0, total = 0;  ///< sampler steps over all batches
  int64_t t = 0;                ///< the timestep just left
};

struct GenerateOptions {
  std::string sampler;             ///< empty: the scheduler config's class (sampler_for), ddim without one
  int64_t steps = 25;
  std::optional<Spacing> spacing;  ///< default: the scheduler config's (use_karras_sigmas, ..., timestep_spacing)
  int order = 0;                   ///< unipc: 0 = the config's solver_order (UniPC class) or 2
  std::optional<UniPcVariant> unipc_variant;  ///< default: the config's solver_type or bh2
  bool dpmpp3_taylor = false;      ///< dpmpp_3m*: the third-order D2 weight (SamplerOptions::dpmpp3_taylor)
  int64_t n = 16, batch = 64;
  int64_t class_id = -1;           ///< -1: image i asks for class i mod (class_embeds - 1)
  std::vector<std::string> prompts;           ///< text-to-image: image i gets prompts[i mod P] (required)
  std::vector<std::string> negative_prompts;  ///< CFG's unconditional half: image i gets [i mod P]; none: ""
  int64_t clip_skip = 0;                      ///< diffusers' clip_skip: the text states clip_skip layers early
  int64_t height = 0, width = 0;   ///< image size in pixels (a latent model: a multiple of the VAE's factor); 0: the config's
  int64_t null_class = -1;         ///< -1: class_embeds - 1
  double cfg = 1.0, cfg_rescale = 0.0;
  NoisyClassifier classifier{nullptr};
  double classifier_scale = 0.0;
  double eta = std::numeric_limits<double>::quiet_NaN();          ///< NaN: the sampler's default
  DdpmVariance variance = DdpmVariance::fixed_small;
  double clip_sample = std::numeric_limits<double>::quiet_NaN();  ///< NaN: the scheduler config's; 0: off
  uint64_t seed = 0;               ///< image i starts from make_noise(..., seed, i) unless init_noise is given
  torch::Tensor init_noise;        ///< [>= n, C, H, W] float32: x_T of each image, instead of the seeded noise
  /// Image to image (SDEdit, Meng et al. 2022, as diffusers' img2img pipelines): [M, C, H, W] images in [-1, 1];
  /// image i starts from init_images[i mod M] (encoded by the VAE of a latent model, its posterior sampled with
  /// noise of (seed, i)), noised to the level the walk reaches after (1 - strength) of its steps, and is sampled
  /// from there (partial_walk_start). init_noise, when given, is the noise added.
  torch::Tensor init_images;
  double strength = 0.8;           ///< (0, 1]: the fraction of the walk image to image runs (diffusers' default)
  std::function<void(const GenerateProgress&)> progress;
  /// On a GPU: the network's call (with classifier-free guidance) captured once per batch shape as a CUDA graph
  /// and replayed at every later step (the first 2 calls of a shape run eagerly). Saves the host's kernel
  /// launches, which bound small batches; the samples are the same numbers. Refused on a CPU or in a build
  /// without CUDA graphs.
  bool cuda_graphs = false;
};

/// Throws std::invalid_argument naming the class or key when `config` asks for sampling diffuse does not do
/// (EDM, VE-SDE and consistency classes; thresholding, dynamic shifting and the like set to anything but their
/// neutral value; a sigma spacing key on a class that does not read it), with the edit that samples without it.
/// generate() checks.
void check_samplable(const SchedulerConfig& config);

/// Whether `sampler`'s last step, driven by `config`, ends at the clean data (alpha_bar = 1) or at alpha_bar[0],
/// as the diffusers class of that sampler does: DDIM and PNDM (plms, pndm) follow set_alpha_to_one;
/// DDPM, Euler, Euler ancestral, Heun and LMS end at sigma 0 (DDPMScheduler's "one", the others' final sigma 0);
/// DPM-Solver++ (DPMSolverMultistepScheduler) ends where final_sigmas_type says ("zero": clean data;
/// "sigma_min"), and without that key at the clean data (diffusers 0.26 on; 0.25 ended at alpha_bar[0]); UniPC the same.
bool final_step_to_clean_data(const std::string& sampler, const SchedulerConfig& config);

/// The sampler a scheduler config's diffusers class stands for: DDIMScheduler ddim, DDPMScheduler ddpm,
/// EulerDiscreteScheduler euler, EulerAncestralDiscreteScheduler euler_ancestral, HeunDiscreteScheduler heun_sigma,
/// LMSDiscreteScheduler lms, DPMSolverMultistepScheduler dpmpp_2m / dpmpp_3m (solver_order; _sde for
/// sde-dpmsolver++), UniPCMultistepScheduler unipc, FlowMatchEulerDiscreteScheduler euler, PNDMScheduler plms
/// (skip_prk_steps true) or pndm (false); ddim without a class; a class diffuse does not implement throws, naming it.
std::string sampler_for(const SchedulerConfig& config);

/// What a scheduler config implies for sampling, in one value: the sampler (sampler_for) and its options from the
/// config's keys (solver_order and solver_type of UniPC, lower_order_final, prediction_type for plms,
/// set_alpha_to_one). Forgetting one of these by hand changes results silently; generate() starts from this.
struct SamplerSettings {
  std::string sampler;
  SamplerOptions options;
};
SamplerSettings sampler_settings(const SchedulerConfig& config);

/// What x_T = scale * N(0, I) has as its scale for the config's class, at the walk's first level: diffusers'
/// init_noise_sigma written in x = a z. The sigma-space classes (Euler, Euler ancestral, Heun, LMS) start from
/// z = init_noise_sigma n with init_noise_sigma = sigma_max (linspace, trailing) or sqrt(sigma_max^2 + 1) (leading),
/// which is s or sqrt(a^2 + s^2) in x (s_max = 0.9977 for SD's schedule: a 0.23% smaller start); every other class
/// starts from n (1). generate() applies it.
double initial_noise_scale(const SchedulerConfig& config, const Level& first);

/// diffusers' scheduler.add_noise(x0, noise, t) for the config's class, at a level of its walk, in that class's own
/// frame: a x0 + s noise for the variance-preserving classes (DDPM, DDIM, PNDM, DPM-Solver, UniPC) and
/// FlowMatchEulerDiscreteScheduler's scale_noise ((1 - sigma) x0 + sigma noise); x0 + sigma noise, sigma = s / a, for
/// the sigma-space classes (Euler, Euler ancestral, Heun, LMS), whose scale_model_input then divides by
/// sqrt(sigma^2 + 1): the network sees a x0 + s noise either way (generate()'s image-to-image start). Throws where
/// the class's frame has no finite value (a sigma class at a = 0).
torch::Tensor add_noise(const SchedulerConfig& config, const torch::Tensor& x0, const torch::Tensor& noise,
                        const Level& level);

/// The levels a sampler walks for `steps` steps as the config's diffusers class would (the end level in `end`):
/// a FlowMatchEulerDiscreteScheduler config gives rectified-flow levels (shift); otherwise the spacing (default:
/// use_karras_sigmas / use_exponential_sigmas, else timestep_spacing) on the config's schedule, with each class's
/// own rule: DPMSolverMultistep and UniPC space linspace and leading over S + 1 points and drop the last, and round
/// a karras level's network time; Euler, Euler ancestral, Heun and LMS walk linspace at fractional timesteps with sigma
/// interpolated linearly between the integer points. The end is the clean data or alpha_bar[0]
/// (final_step_to_clean_data).
std::vector<Level> sampling_levels(const SchedulerConfig& config, const std::string& sampler, int64_t steps,
                                   std::optional<Spacing> spacing, Level& end);

/// Image to image: the first step of a walk of `steps` steps that (diffusers' img2img get_timesteps) runs
/// int(steps * strength) of them: steps - int(steps * strength). Throws std::invalid_argument when that leaves no
/// step or strength is outside (0, 1].
int64_t partial_walk_start(int64_t steps, double strength);

struct Generated {
  torch::Tensor images;    ///< [n, C, H, W] float32 on the CPU, the model's range ([-1, 1] for images)
  torch::Tensor latents;   ///< for a latent model: what the sampler produced, before decoding
  std::vector<int64_t> labels;     ///< the class image i asked for (-1 for an unconditional model)
  std::vector<std::string> prompts, negative_prompts;  ///< image i's (text-to-image)
  std::vector<std::string> notes;  ///< what the caller should tell the user (truncated prompts, substitutions)
  std::string sampler;             ///< the sampler used (GenerateOptions::sampler, or the config's)
  std::vector<double> timesteps;   ///< the network times walked, from noise to data
  Spacing spacing = Spacing::leading;
  double clip_range = 0;           ///< the x0 clamp used (0: none)
  double seconds = 0;              ///< sampling and decoding
};

/// Samples `options.n` images in batches: seeded noise by image index (so an image does not depend on the
/// batch size), classifier-free guidance on the network, classifier guidance on the denoiser, the sampler,
/// then decoding through the VAE of a latent model. Throws std::invalid_argument naming a bad option.
Generated generate(const LoadedRun& run, const GenerateOptions& options);

}  // namespace diffuse
