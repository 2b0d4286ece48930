// Training diffusion models and noisy classifiers: the loss, the loop, run folders and checkpoints.
//
// Diffusion loss (Ho et al. 2020, generalised by the 000 document): (t, a_t, s_t) drawn from the noise path
// (noise_path.h: t ~ U{0..T-1} on a discrete schedule; on rectified flow sigma from its density, a = 1 - sigma, s =
// sigma, t = sigma T), eps ~ N(0, I),
//   x_t = a_t x0 + s_t eps,   loss = w(t) * mean_{C,H,W} (model(x_t, f(t), y) - target)^2
// with target eps, v = a_t eps - s_t x0, x0 or flow eps - x0 (prediction.h), w(t) = loss_weight(...) (stated on the x0
// error, converted to the target), f the E-TSDM condition map (Yang et al. 2024; identity when off) and y
// the class label, replaced by the null class with probability label_dropout (Ho & Salimans 2022).
// Offset noise (Guttenberg 2023, the baseline of Lin et al. 2023 section 5): eps + strength * delta,
// delta ~ N(0, 1) per image and channel, used both to noise and as the eps target.
//
// A run folder (diffusers layout, loadable by diffusers' UNet2DModel.from_pretrained / DDIMScheduler):
//   run.json                                    the options of the run (TrainOptions::to_json)
//   unet/config.json, unet/diffusion_pytorch_model.safetensors        raw weights
//   unet_ema/...                                                       EMA weights (same format)
//   scheduler/scheduler_config.json             schedule, prediction type, spacing, E-TSDM settings
//   train_state/state.json, optimizer.safetensors, rng.safetensors    step, optimizer, RNG states
//   log.csv, loss.png                           loss per step and per timestep decile
// (a classifier run has classifier/ and classifier_ema/ instead of unet/ and unet_ema/, plus accuracy.csv;
// an autoencoder run has vae/ and vae_ema/, no scheduler/, no timestep columns, plus reconstruction.csv).
// Checkpoints are written into RUN/.checkpoint-new and then swapped in component by component after a
// COMPLETE marker; an interrupted swap is finished by the next reader (finish_interrupted_checkpoint).
#pragma once

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffuse/train/lr_schedule.h"
#include "diffuse/models/classifier.h"
#include "diffuse/data/data.h"
#include "diffuse/core/noise_path.h"
#include "diffuse/core/prediction.h"
#include "diffuse/core/schedule.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/models/unet.h"
#include "diffuse/models/vae.h"

namespace diffuse {

// ---------------------------------------------------------------- losses

/// Per-example loss [N]: weight [N] * mean over C, H, W of (pred - target(prediction, x0, eps, a, s))^2.
/// a, s: [N, 1, 1, 1]. The loss every trainer step minimises (averaged over the batch).
torch::Tensor per_example_loss(Prediction prediction, const torch::Tensor& pred, const torch::Tensor& x0,
                               const torch::Tensor& eps, const torch::Tensor& a, const torch::Tensor& s,
                               const torch::Tensor& weight);

/// eps + strength * delta, delta ~ N(0, 1) of shape [N, C, 1, 1] drawn from `gen` (offset noise).
torch::Tensor offset_noise(const torch::Tensor& eps, double strength, at::Generator& gen);

/// The scheduler_config.json of a training run: the schedule (diffusers keys; cosine with --zero-snr and
/// cosine_noclip are stored as trained_betas since diffusers has no name for them), prediction type,
/// sampling spacing and E-TSDM settings. config.schedule() equals make_schedule(spec).
/// The FlowMatchEulerDiscreteScheduler config of a rectified-flow run (num_train_timesteps T, shift).
SchedulerConfig make_flow_scheduler_config(int64_t T, double shift);
SchedulerConfig make_scheduler_config(const ScheduleSpec& spec, Prediction prediction, Spacing spacing,
                                      const EtsdmConfig& etsdm);

// ---------------------------------------------------------------- options

/// UNet size options of the CLI, turned into a diffusers UNet2DModel config by make_unet_config.
struct UNetShape {
  std::vector<int64_t> channels = {64, 128, 128};  ///< block_out_channels
  int64_t layers_per_block = 2;
  std::vector<int64_t> attention_levels = {1};     ///< down levels (0-based) with attention; up mirrored
  bool mid_attention = true;
  int64_t attention_head_dim = 8;
  int64_t norm_groups = 32;
  double dropout = 0.0;
  std::string time_scale_shift = "default";        ///< default or scale_shift
};
/// size x size x channels input; num_classes > 0 adds num_classes + 1 class embeddings (the last is the null
/// class of classifier-free guidance). The defaults with (32, 1, 10) give reference_unet_config().
UNetConfig make_unet_config(const UNetShape& shape, int64_t size, int64_t channels, int64_t num_classes);
/// The noisy classifier of train-classifier from the same shape options: the UNet's encoder half (DownBlock2D,
/// AttnDownBlock2D at the attention levels, the mid block), size x size x channels input, num_classes outputs.
NoisyClassifierConfig make_classifier_config(const UNetShape& shape, int64_t size, int64_t channels, int64_t num_classes);
/// The autoencoder of train-vae from the same shape options (block_out_channels, layers_per_block, norm groups, mid
/// attention) with the data's channels and size; the rest (latent_channels, scaling_factor, ...) from `base`.
AutoencoderKLConfig make_vae_config(const UNetShape& shape, int64_t size, int64_t channels, AutoencoderKLConfig base);

/// What every trainer shares: optimisation, seeds, the run folder and its checkpoints.
struct LoopOptions {
  int64_t steps = 10000;
  int64_t batch = 64;                   ///< images per optimizer step (the global batch: all ranks together)
  /// Gradient accumulation: each rank's rows of a step's batch go through the network in this many equal parts whose
  /// gradients add up before the one optimizer step (less memory; batch / world size must divide by it). The draws
  /// are those of the whole batch, so the step equals the unaccumulated one up to float summation order.
  int64_t accumulate = 1;
  double lr = 2e-4;
  int64_t warmup = 200;                 ///< linear warmup from 0 over this many steps
  LrSchedule lr_schedule = LrSchedule::cosine;  ///< from lr after warmup to min_lr at the last step, or constant
  double min_lr = 0.0;
  double weight_decay = 0.0;            ///< AdamW's decoupled weight decay (Loshchilov & Hutter 2019)
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_eps = 1e-8;
  double grad_clip = 1.0;               ///< max global gradient norm; 0: no clipping
  double ema_decay = 0.9999;            ///< EMA decay at step k: min(ema_decay, (1 + k) / (10 + k))
  bool hflip = false;                   ///< random horizontal flips
  uint64_t seed = 0;

  std::string out;                      ///< the run folder
  bool resume = false;                  ///< continue the run in `out` from its last checkpoint
  bool overwrite = false;               ///< replace an existing run folder
  /// cpu, cuda (one process: the current GPU; several: cuda:LOCAL_RANK each) or cuda:N; run.json spells it so
  torch::Device device = torch::kCPU;
  bool bf16 = false;                    ///< bf16 autocast of the forward pass (CUDA; a CPU with LibTorch 2.x)
  bool cuda_graphs = true;              ///< one process on a GPU: replay the step's loss and gradients as a
                                        ///< captured CUDA graph (builds against a CUDA LibTorch 2.x)
  bool channels_last = false;           ///< the networks' convolution weights, activations, gradients and AdamW
                                        ///< state in channels-last (NHWC) layout; checkpoints are the same
  /// bfloat16: convolutions compute in it from the float32 weights (ConvolutionDtype; fast on CPUs with AMX or
  /// AVX-512 BF16; float16 on a GPU), the rest, gradients, AdamW and EMA stay float32; not with bf16. run.json:
  /// "fp32", "bf16" or "fp16"
  torch::ScalarType conv_dtype = torch::kFloat32;
  int64_t checkpoint_every = 1000;
  int64_t log_every = 50;               ///< rows of log.csv (and progress lines when stderr is no TTY)
  bool progress = true;                 ///< progress line on stderr
  int threads = 0;                      ///< >0: torch::set_num_threads (0 with several local processes on the
                                        ///< CPU: cores / LOCAL_WORLD_SIZE unless OMP_NUM_THREADS is set)
  double dist_timeout = 300;            ///< seconds a collective may wait for another rank (data parallel)

  nlohmann::json to_json() const;
  static LoopOptions from_json(const nlohmann::json& j);
};

/// The learning rate of 0-based step `step` of a run with options `o` (lr_schedule.h's lr_at of its lr, min_lr,
/// warmup, steps and lr_schedule).
double lr_at(const LoopOptions& o, int64_t step);

/// A loop option that may change when a run resumes (every other option must equal run.json's): its key in
/// run.json, its command-line flag, and how it is taken from the new options. The one list behind the
/// resume check of run.json, the CLI's check of the flags given with --resume and its help text.
struct ResumableOption {
  std::string key, flag;
  std::function<void(LoopOptions& stored, const LoopOptions& given)> take;
  bool every_resume = false;  ///< taken on every resume (it describes the invocation), given or not
};
const std::vector<ResumableOption>& resumable_options();

struct TrainOptions {
  DataSpec data;
  UNetConfig unet = reference_unet_config();
  ScheduleSpec schedule;
  Prediction prediction = Prediction::eps;
  LossWeight loss_weight = LossWeight::uniform;
  double min_snr_gamma = 5.0;
  EtsdmConfig etsdm;
  double offset_noise = 0.0;
  double label_dropout = 0.1;            ///< only with num_class_embeds
  Spacing spacing = Spacing::trailing;   ///< stored for samplers in scheduler_config.json
  /// The noise path: vp (the discrete schedule above, integer timesteps) or rectified_flow (x_t = (1 - sigma) x0 +
  /// sigma eps with real sigma in (0, 1], the network conditioned on sigma * schedule.T, prediction flow; the run's
  /// scheduler config is a FlowMatchEulerDiscreteScheduler). run.json: "vp" / "rectified-flow".
  PathKind path = PathKind::vp;
  double flow_shift = 1.0;               ///< rectified flow: sigma -> shift sigma / (1 + (shift - 1) sigma), trained and sampled
  /// Rectified flow: the density of the unshifted sigma (uniform, or logit-normal with logit_mean and logit_std).
  TimeDensity timestep_density = TimeDensity::uniform;
  double logit_mean = 0.0, logit_std = 1.0;
  bool rectified_flow() const { return path == PathKind::rectified_flow; }
  /// The path these options train on (the schedule's, or the rectified flow of schedule.T, flow_shift and the
  /// density); throws for impossible values.
  NoisePath noise_path() const;
  /// Latent diffusion: the autoencoder folder the data were encoded with (informational; the run keeps its own
  /// copy in vae/). Empty: pixel space.
  std::string vae;
  LoopOptions loop;

  nlohmann::json to_json() const;
  static TrainOptions from_json(const nlohmann::json& j);
};

/// The autoencoder's reconstruction error: |x_hat - x| (l1) or (x_hat - x)^2 (l2).
enum class Reconstruction { l1, l2 };
std::string to_string(Reconstruction r);                  ///< "l1", "l2"
Reconstruction parse_reconstruction(const std::string& name);  ///< throws naming the choices

/// The autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1, without the patch discriminator and
/// perceptual loss): per image, loss = mean_{C,H,W} rec(x_hat - x) + kl_weight * KL(q(z|x) || N(0, I)) / (C H W),
/// rec = |.| (l1) or (.)^2 (l2), x_hat = decode(z), z ~ q(z|x) reparameterised. Dividing both terms of LDM's
/// summed loss by the pixel count keeps LDM's kl_weight values (1e-6 for its KL-f8 model).
struct VaeTrainOptions {
  DataSpec data;
  AutoencoderKLConfig vae;               ///< in/out channels and sample_size must fit the data
  Reconstruction reconstruction = Reconstruction::l1;
  double kl_weight = 1e-6;
  int64_t heldout = 1000;                ///< held-out images for the final PSNR report
  /// Training images (evenly spaced through the data) on which every checkpoint measures the scaling factor
  /// that it stores in vae/config.json and vae_ema/config.json (measure_scaling_factor).
  int64_t scale_images = 256;
  LoopOptions loop;

  nlohmann::json to_json() const;
  static VaeTrainOptions from_json(const nlohmann::json& j);
};

struct ClassifierTrainOptions {
  DataSpec data;
  NoisyClassifierConfig classifier;
  ScheduleSpec schedule;                 ///< must be the diffusion model's schedule at sampling time
  int64_t heldout = 2000;                ///< held-out images for the accuracy table
  /// Latent diffusion: the autoencoder folder whose latents the classifier sees, and its vae_fingerprint (a
  /// resumed run refuses a changed autoencoder). Empty: pixel space.
  std::string vae, vae_fingerprint;
  LoopOptions loop;

  nlohmann::json to_json() const;
  static ClassifierTrainOptions from_json(const nlohmann::json& j);
};

// ---------------------------------------------------------------- running

/// A NaN or infinite loss (or gradient): training stopped before the optimizer step and wrote nothing.
struct NonFiniteLoss : std::runtime_error {
  NonFiniteLoss(const std::string& what, int64_t step) : std::runtime_error(what), step(step) {}
  int64_t step;  ///< the 1-based step whose loss was not finite
};

/// On a rank other than 0 of a data-parallel run: rank 0 failed (and reports why); this rank stops too.
struct RankZeroFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// What TrainHooks::on_step sees after each training step (StepInfo in sampling.h is a sampler step).
/// The loop waits for the device only when it reads the steps back (log rows, checkpoints, the end), so `loss`
/// is that of the latest step read back (NaN before the first) and `images_per_s` its window's rate.
struct TrainStepInfo {
  int64_t step = 0;        ///< steps completed
  double loss = 0;
  double lr = 0;           ///< of this step
  double images_per_s = 0;
};

struct TrainResult {
  int64_t start_step = 0;    ///< where this invocation began (the checkpoint's step when resuming)
  int64_t step = 0;          ///< steps completed (and checkpointed)
  bool interrupted = false;  ///< stopped by SIGINT/SIGTERM after checkpointing
  int signal = 0;            ///< the signal that stopped it
  double last_loss = 0;
  double images_per_s = 0;   ///< over the steps of this invocation (global batch: all ranks together)
  std::string run_dir;
  int64_t rank = 0, world_size = 1;  ///< this process in a data-parallel run (docs/distributed.md)
};

struct TrainHooks {
  /// Called after each optimizer step (after any checkpoint of that step).
  std::function<void(const TrainStepInfo&)> on_step;
};

/// Trains a UNet on `data` (already fitted to the model: see load_dataset). Creates loop.out (refusing an
/// existing folder unless loop.resume or loop.overwrite), checkpoints every loop.checkpoint_every steps, at
/// the end and on SIGINT/SIGTERM. With loop.resume, continues from the last checkpoint; the options that
/// change the result must equal those in run.json. Bit-identical on the CPU to an uninterrupted run.
/// Throws NonFiniteLoss (last good checkpoint kept), std::invalid_argument for impossible options.
///
/// Data parallel when RANK/WORLD_SIZE/... are set (torchrun, or launch_local): loop.batch is the global batch
/// (divisible by WORLD_SIZE). Every rank draws the global batch's indices, timesteps and noise exactly as one
/// process would and trains on its rows [rank B/W, (rank + 1) B/W); shard-mean gradients are averaged across
/// ranks (GradientAverager), which equals the full-batch gradient of the mean loss. Rank 0 alone touches the
/// run folder and reports progress; weights, EMA and optimizer state go from rank 0 to the others at the start
/// (also on resume), so a checkpoint resumes with any process count. A failed or stopped rank stops all
/// (collectives time out after loop.dist_timeout seconds).
/// Latent diffusion: `data` holds scaled latents (encode_dataset / cached_latents), options.vae names the
/// autoencoder and `vae` is it; every checkpoint then also writes RUN/vae/ (a diffusers pipeline's layout), which
/// `diffuse sample` decodes through.
TrainResult train(const TrainOptions& options, const Dataset& data, const TrainHooks& hooks = {},
                  AutoencoderKL vae = nullptr);

/// Trains a noisy classifier on x_t at t ~ U{0..T-1}; at the end prints (to `report`, when given) and writes
/// RUN/accuracy.csv: accuracy on `heldout` noised at timesteps in each tenth of [0, T).
TrainResult train_classifier(const ClassifierTrainOptions& options, const Dataset& data, const Dataset& heldout,
                             std::ostream* report = nullptr, const TrainHooks& hooks = {});

/// Trains an AutoencoderKL. The run folder holds vae/ and vae_ema/ (diffusers folders whose scaling_factor is
/// measured at each checkpoint), train_state/, run.json, log.csv, loss.png. At the end, evaluates both on
/// `heldout` (reconstruction from the posterior mean, latent statistics before and after scaling), writes
/// RUN/reconstruction.csv and prints the table to `report` when given.
TrainResult train_vae(const VaeTrainOptions& options, const Dataset& data, const Dataset& heldout,
                      std::ostream* report = nullptr, const TrainHooks& hooks = {});

/// Throws what train() would throw about loop.out (exists without --resume/--overwrite, nothing to resume,
/// --overwrite of a folder that is not a run) without touching anything: lets a CLI fail before loading data.
void check_run_folder(const LoopOptions& loop);

/// Completes a checkpoint swap cut short by a crash (RUN/.checkpoint-new with its COMPLETE marker) and
/// removes an incomplete one. Called by train() and safe to call before loading a run folder.
void finish_interrupted_checkpoint(const std::string& run_dir);

/// The step of the last checkpoint in a run folder (train_state/state.json); throws naming the file.
int64_t checkpoint_step(const std::string& run_dir);

}  // namespace diffuse
