// Fine-tuning a Stable Diffusion pipeline's UNet on images with captions (Lin et al. 2023's recipe as options:
// zero terminal SNR, v prediction, trailing steps; offset noise as their baseline).
//
// Per step, as diffusers' train_text_to_image.py: z = (mean + std n) * scaling_factor from each image's posterior
// (n ~ N(0, I) drawn per step; mean and std cached once per image, and per mirrored image with hflip), t ~ U{0..T-1},
// eps ~ N(0, I) (+ offset noise), x_t = a_t z + s_t eps, the UNet conditioned on the caption's text states (the
// frozen text encoder's last hidden states, cached; the empty caption's with probability caption_dropout), and the
// loss of train.h (target eps / v / x0, loss_weight) on the pipeline's schedule (rescaled with zero_snr).
//
// The run folder is a diffusers pipeline (StableDiffusionPipeline.from_pretrained loads it): model_index.json,
// unet/ and unet_ema/, scheduler/ (a DDIMScheduler config: the pipeline's betas, the trained prediction type, zero
// SNR, the sampling spacing), text_encoder/, tokenizer/ and vae/ as they were (copied from a pipeline folder,
// written from a single file), plus diffuse's run.json, train_state/, log.csv and loss.png (train.h).
#pragma once

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <string>
#include <vector>

#include "diffuse/data/captions.h"
#include "diffuse/core/prediction.h"
#include "diffuse/core/schedule.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/train/train.h"

namespace diffuse {

struct TextTrainOptions {
  /// The pipeline to continue: a diffusers folder (model_index.json), a diffuse text run, or a single-file
  /// checkpoint (then tokenizer, and v_prediction / single_file_config as diffuse sample takes them).
  std::string model;
  std::string tokenizer, single_file_config;
  bool source_v_prediction = false;
  std::string data;  ///< the caption folder
  CaptionFolderOptions captions;
  /// What the UNet learns to predict. Unset: the pipeline's own (its scheduler's prediction_type).
  std::optional<Prediction> prediction;
  bool zero_snr = false;                 ///< rescale the pipeline's schedule to zero terminal SNR
  Spacing spacing = Spacing::trailing;   ///< stored in scheduler/ for sampling
  LossWeight loss_weight = LossWeight::uniform;
  double min_snr_gamma = 5.0;
  double offset_noise = 0.0;
  double caption_dropout = 0.0;          ///< probability of training on the empty caption instead
  /// Recompute each UNet block's activations in the backward pass instead of keeping them (less memory, about
  /// a third more time per step). Not with dropout in the UNet.
  bool gradient_checkpointing = false;
  LoopOptions loop;                      ///< loop.hflip: mirror images (their latents cached both ways)

  nlohmann::json to_json() const;
  static TextTrainOptions from_json(const nlohmann::json& j);
  /// Whether a run.json belongs to a text fine-tune.
  static bool is_text_run(const nlohmann::json& j);
};

/// What the steps read: the pipeline (its UNet is the one trained) and the cached latents and text states.
struct TextTrainData {
  LoadedRun pipeline;
  std::string source_folder;  ///< the pipeline folder whose frozen components are copied (empty: a single file)
  SchedulerConfig scheduler;  ///< what the run trains on and writes (finetune_scheduler_config)
  Dataset moments;            ///< images: [N, 2C, h, w] posterior mean and std (and [.., 4C, ..] with hflip: then
                              ///< the mirror's), labels: row of `states`
  torch::Tensor states;       ///< [N, L, D] text states of each caption
  torch::Tensor empty_states; ///< [1, L, D] of the empty caption
  std::vector<std::string> notes;
};

/// Loads the pipeline (the run's own copy when resuming), the caption folder, and the latents and text states
/// through the cache in `cache_dir` (per image and per caption, keyed by the image's pixels and the caption's
/// token ids with the autoencoder's or text encoder's fingerprint: a changed file is recomputed, the rest read).
/// Progress and cache counts go to `report` when given.
TextTrainData prepare_text_training(const TextTrainOptions& options, const std::string& cache_dir,
                                    std::ostream* report = nullptr);

/// model_index.json of a Stable Diffusion 1.x / 2.x pipeline folder as a fine-tune writes it: unet, vae,
/// text_encoder, tokenizer, a DDIMScheduler, no safety checker (what StableDiffusionPipeline.from_pretrained loads).
nlohmann::json stable_diffusion_model_index();

/// The scheduler config a fine-tune writes: `source`'s schedule with `prediction`, zero SNR and `spacing`, as a
/// DDIMScheduler (another class is named in `notes`: diffuse samples the run as DDIM).
SchedulerConfig finetune_scheduler_config(const SchedulerConfig& source, Prediction prediction, bool zero_snr,
                                          Spacing spacing, std::vector<std::string>* notes = nullptr);

/// Fine-tunes data.pipeline.text_unet (trained in place) into options.loop.out: the loop of train.h (resume,
/// checkpoints, EMA, data parallel, bf16 / conv dtype, gradient accumulation, loss log).
TrainResult train_text(const TextTrainOptions& options, const TextTrainData& data, const TrainHooks& hooks = {});

}  // namespace diffuse
