// Denoisers: a network, its prediction type and its timestep condition map, seen by samplers as
// estimates of x0 and eps; guidance wraps them.
//
// Notation as in schedule.h: x_t = a_t x0 + s_t eps with a_t = sqrt(alpha_bar[t]), s_t = sqrt(1 - alpha_bar[t]).
//
//   Conditioning  what a network is conditioned on besides x_t and t: class labels and/or a text context.
//   Network     the model in its own prediction space: (x_t, t_condition, conditioning) -> eps, v or x0.
//   Level       a point of the noise path: the time t the network is conditioned on (real: an integer training
//               timestep, a fractional one between them, or a flow model's sigma * 1000) and x_t = a x0 + s eps.
//   Denoiser    (x_t, level) -> Estimate {x0, eps}. Samplers call only this; an integer timestep of the
//               denoiser's schedule stands for its level.
//   guidance    classifier-free guidance wraps a Network (it acts on the model output, in prediction
//               space); classifier guidance wraps a Denoiser (it acts on the score). They compose:
//                 classifier_guidance(make_denoiser(classifier_free_guidance(net, cfg), ...), ...)
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>

#include "diffuse/core/etsdm.h"
#include "diffuse/core/levels.h"
#include "diffuse/core/noise_path.h"
#include "diffuse/core/prediction.h"
#include "diffuse/core/schedule.h"

namespace diffuse {

/// What a network is conditioned on besides x_t and t, per image, carried untouched from the batch or the prompt to
/// the network (k-diffusion's extra_args, diffusers' class_labels / encoder_hidden_states). Samplers never look
/// inside; classifier-free guidance builds its unconditional half from it (the null class, or uncond_context).
struct Conditioning {
  torch::Tensor labels;          ///< int64 [N] class labels, or undefined
  torch::Tensor context;         ///< float [N, L, D] text encoder states (encoder_hidden_states), or undefined
  torch::Tensor uncond_context;  ///< [N, L, D]: the negative (or empty) prompt's states, CFG's unconditional half

  Conditioning() = default;
  /// Class labels alone (implicit: a label tensor is a conditioning, as before text existed).
  Conditioning(torch::Tensor class_labels) : labels(std::move(class_labels)) {}
  static Conditioning text(torch::Tensor context, torch::Tensor uncond_context = {});
  bool empty() const { return !labels.defined() && !context.defined(); }
  /// Every tensor moved to `device` (undefined ones stay undefined).
  Conditioning to(torch::Device device) const;
  /// Throws std::invalid_argument naming `what` unless every defined tensor has n rows (labels int64 [n], contexts
  /// [n, L, D] of one shape).
  void check(int64_t n, const char* what) const;
};

/// A network in its own prediction space. x: [N, ...]; t_condition: float32 [N], the timestep the
/// network is conditioned on (t itself, or its E-TSDM map); conditioning: labels and/or text context of N images
/// (empty for an unconditional model). Returns a tensor shaped like x.
using Network = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t_condition,
                                            const Conditioning& conditioning)>;

/// net(x_t, etsdm.condition(t), conditioning) for a batch at one time t (conditioning moved to x_t's device),
/// its output's shape checked against x_t's: the one place the network is conditioned. A real t is passed on as
/// float32, so an integer t gives exactly what it always did.
torch::Tensor call_network(const Network& net, const EtsdmConfig& etsdm, const torch::Tensor& x_t, double t,
                           const Conditioning& conditioning);



/// A denoiser's answer at x_t. The pair is consistent: x_t = a_t x0 + s_t eps (to rounding).
struct Estimate {
  torch::Tensor x0, eps;
};

/// A callable (x_t, level) -> Estimate for a batch at one level. `path` is the noise path the network was trained
/// on: integer timesteps are points of its grid (a discrete schedule's timesteps; noise_path.h).
struct Denoiser {
  NoisePath path;
  std::function<Estimate(const torch::Tensor& x_t, const Level& level)> fn;

  /// The level of training timestep t (path.level(t), checked), then fn.
  Estimate operator()(const torch::Tensor& x_t, int64_t t) const;
  /// Checks the level (finite t, a and s >= 0, s > 0: no network call at the clean data), then fn.
  Estimate operator()(const torch::Tensor& x_t, const Level& level) const;
};

/// The model as a denoiser: calls net(x_t, etsdm.condition(t), labels) at the level's t and converts its output
/// with the level's (a, s) by the exact forms of prediction.h: v -> x0 = a x_t - s v, eps = s x_t + a v; x0 -> eps =
/// (x_t - a x0) / s; eps -> x0 = (x_t - s eps) / a; flow -> x0 = (x_t - s u) / (a + s), eps = (x_t + a u) / (a + s).
/// Nothing divides by a_t except eps -> x0, so an
/// eps model at SNR 0 (a_t = 0, where eps carries no information about x0) throws std::domain_error
/// naming the fix (Lin et al. 2023, section 3.2). `conditioning`: of the N images (moved to x_t's device), or
/// empty for an unconditional model.
Denoiser make_denoiser(Network net, Prediction prediction, NoisePath path, EtsdmConfig etsdm = {},
                       Conditioning conditioning = {});

/// Classifier-free guidance (Ho & Salimans 2022) with the rescale of Lin et al. 2023, Algorithm 2.
struct CfgOptions {
  double scale = 1.0;        ///< w: 0 unconditional, 1 conditional, > 1 guided
  double rescale = 0.0;      ///< phi in [0, 1]: 0 plain CFG, Lin et al. use 0.7
  int64_t null_label = -1;   ///< the unconditional class; by convention num_class_embeds - 1. Required for labels.
};

/// Lin et al. 2023, Algorithm 2 on model outputs: cfg = uncond + w (cond - uncond);
/// factor = std(cond) / std(cfg), the standard deviations taken per sample over all but the batch
/// axis; returns cfg * (phi * factor + 1 - phi).
torch::Tensor cfg_combine(const torch::Tensor& cond, const torch::Tensor& uncond, double scale, double rescale);

/// Wraps a conditional network: one call of `net` on the batch [x; x] with labels [labels; null_label] and text
/// contexts [context; uncond_context] (the negative or empty prompt's), combined by cfg_combine. The combination acts on the model output in its own
/// prediction space, as diffusers' pipelines and Lin et al. do; without rescale this is the same in
/// every space (the conversions are affine in the output at fixed x_t), with rescale the std ratio is
/// that of the network's target (v for a v model). The wrapped network refuses an empty conditioning, and a text
/// context without its unconditional half.
Network classifier_free_guidance(Network net, CfgOptions options);

/// A noisy classifier: (x_t [N, ...], t [N]) -> logits [N, C], t int64 at integer times, float32 between them.
/// Differentiable in x_t.
using Classifier = std::function<torch::Tensor(const torch::Tensor& x_t, const torch::Tensor& t)>;

/// grad_x log p(y | x_t, t) = d/dx_t log_softmax(classifier(x_t, t))[y], per sample, shaped like x_t.
/// Runs with autograd enabled whatever the caller's grad mode; returns a tensor without history.
torch::Tensor classifier_log_prob_grad(const Classifier& classifier, const torch::Tensor& x_t, double t,
                                       const torch::Tensor& labels);

/// What clip_x0 does with eps once x0 is clamped.
enum class ClipEps {
  /// eps stays the network's: diffusers' clip_sample in DDIMScheduler.step (use_clipped_model_output False,
  /// scheduling_ddim.py: pred_epsilon is recomputed only when that flag is set) and DDPMScheduler.
  keep,
  /// eps = (x_t - a_t x0) / s_t, so the pair stays consistent: guided-diffusion's clip_denoised (ADM's DDIM), and
  /// what the sigma-space classes' derivative (z - x0) / sigma amounts to (HeunDiscreteScheduler's clip_sample).
  recompute,
};

/// The x0 estimate clamped to [-range, range], eps kept (diffusers' DDIM meaning, the default) or recomputed. What
/// keeps an eps model usable where a_t is tiny: there x0 = (x_t - s_t eps) / a_t multiplies the network's eps error
/// by s_t / a_t (157 at t = 999 of the linear schedule). Pixel data in [-1, 1] only; not for latents (their range is
/// not [-1, 1]). range > 0.
Denoiser clip_x0(Denoiser denoiser, double range, ClipEps eps = ClipEps::keep);

/// Classifier guidance (Dhariwal & Nichol 2021, section 4.2, eq. 14): the score is shifted by
/// scale * grad_x log p(y | x_t), i.e. eps' = eps - scale * s_t * grad and, to keep the pair consistent,
/// x0' = x0 + scale * (s_t^2 / a_t) * grad. Every sampler sees this shifted pair (for DDIM it is
/// Algorithm 2 of that paper; for DDPM it shifts the posterior mean by (a_prev beta_t / a_t) * scale * grad,
/// the x0 form of the same score shift). At SNR 0 (a_t = 0) x_t is independent of y, so the exact
/// gradient is zero: the classifier is not evaluated there and the estimate passes through unchanged.
/// `labels`: the target class of each image, int64 [N]; their range is checked against the classifier's
/// classes on the first step only (the check reads them back, a wait for the device).
Denoiser classifier_guidance(Denoiser denoiser, Classifier classifier, torch::Tensor labels, double scale);

}  // namespace diffuse
