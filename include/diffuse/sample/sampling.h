// Samplers: functions over a denoiser (k-diffusion style; multistep history is a local variable).
//
// Every sampler walks a descending list of noise levels (Timesteps): integer training timesteps
// (spaced_timesteps in schedule.h), or levels (t, a, s) given directly (sigma spacings, fractional
// timesteps, a rectified-flow path; spaced_levels in core/levels.h), and one final step to the end
// level: the clean data (a = 1, s = 0), or for integer timesteps without set_alpha_to_one alpha_bar[0]
// (diffusers' DDIMScheduler convention; DPMSolverMultistepScheduler with final_sigmas_type sigma_min too).
// All updates are written in (a, s) and q = exp(-h) = (a s_next) / (a_next s), h = lambda_next - lambda,
// lambda = log(a / s): never through sigma = s / a, never dividing by a, and never assuming a^2 + s^2 = 1, so
// one code serves variance-preserving and rectified-flow paths. They are exact on zero-terminal-SNR schedules:
// the first step from a = 0 (lambda = -inf, q = 0) is the limit of each formula, and a step to s_next = 0
// (lambda = +inf, q = 0) is too. Multistep methods (dpmpp_*, unipc) keep no history point at lambda = -inf and
// take a first-order step where h is infinite (their higher-order terms have no finite limit there).
//
// Several classical samplers coincide on variance-preserving models (derivations in src/sample/sampling.cpp):
// euler == ddim (eta 0) and euler_ancestral (eta) == ddim (eta) for eta <= 1; ddpm with fixed_small
// variance == ddim with eta 1 (except that ddpm adds no noise on its last step). They are kept as
// separate entries because users ask for them by name, and the tests check the identities. On a
// rectified-flow path euler is diffusers' FlowMatchEulerDiscreteScheduler step x' = x + (sigma' - sigma) u.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "diffuse/core/prediction.h"
#include "diffuse/sample/denoiser.h"
#include "diffuse/core/noise.h"

namespace diffuse {

/// What a sampler walks, from noise to data (see the top of this file).
struct Timesteps {
  /// Integer training timesteps of the denoiser's schedule, strictly descending; the end level follows
  /// SamplerOptions::set_alpha_to_one.
  Timesteps(std::vector<int64_t> timesteps) : integer(std::move(timesteps)) {}
  Timesteps(std::initializer_list<int64_t> timesteps) : integer(timesteps) {}
  /// Levels given directly (strictly decreasing noise: a s_next < a_next s), then the end level.
  Timesteps(std::vector<Level> levels, Level end = Level{-1, 1, 0}) : levels(std::move(levels)), end(end) {}

  std::vector<int64_t> integer;
  std::vector<Level> levels;
  Level end{-1, 1, 0};
};

/// What a per-step callback sees, after step `step` (0-based) of `steps`.
struct StepInfo {
  int64_t step = 0, steps = 0;
  double t = 0, t_next = 0;    ///< the step went from t to t_next (-1: the final target)
  Level level, next;           ///< the levels of t and of the step's target
  torch::Tensor x;             ///< the sample after the step
  torch::Tensor x0;            ///< the denoiser's x0 estimate at (x_t, t) that the step used
};
using StepCallback = std::function<void(const StepInfo&)>;

enum class DdpmVariance { fixed_small, fixed_large };
DdpmVariance parse_ddpm_variance(const std::string& name);  ///< fixed_small, fixed_large
std::string to_string(DdpmVariance v);

enum class UniPcVariant { bh1, bh2 };
UniPcVariant parse_unipc_variant(const std::string& name);  ///< bh1, bh2
std::string to_string(UniPcVariant v);

struct SamplerOptions {
  /// Noise level of the stochastic samplers; NaN means the sampler's default (ddim 0, euler_ancestral 1,
  /// dpmpp_2m_sde and dpmpp_3m_sde 1). Ignored by the deterministic euler, heun, dpmpp_2m, dpmpp_3m and unipc.
  double eta = std::numeric_limits<double>::quiet_NaN();
  DdpmVariance variance = DdpmVariance::fixed_small;  ///< ddpm only
  bool set_alpha_to_one = true;    ///< integer timesteps: the final step goes to alpha_bar = 1; false: alpha_bar[0]
  /// dpmpp_* and unipc: first-order last step (and at most second order on the one before) when fewer than 15
  /// steps (diffusers' lower_order_final).
  bool lower_order_final = true;
  /// The steps of the whole walk when the levels given are its tail (image to image): diffusers counts these for
  /// lower_order_final's "fewer than 15"; 0: the levels given are the whole walk.
  int64_t walk_steps = 0;
  int order = 2;                   ///< unipc: the solver order, 1 to 3 (diffusers' solver_order)
  /// plms: what the network predicts (eps or v): PNDMScheduler combines the raw outputs of its steps.
  Prediction prediction = Prediction::eps;
  /// dpmpp_3m*: weigh the second divided difference by its Taylor coefficient, twice diffusers' (which makes the
  /// method third order; diffusers' is second order, see src/sample/sampling.cpp). Off: diffusers' update.
  bool dpmpp3_taylor = false;
  UniPcVariant unipc_variant = UniPcVariant::bh2;  ///< unipc: B(h) = h (bh1) or e^h - 1 (bh2)
  bool unipc_corrector = true;     ///< unipc: apply the UniC corrector after every step but the last
  uint64_t seed = 0;               ///< per-step noise of stochastic samplers, see make_noise
  int64_t first_image = 0;         ///< global index of the batch's first image, see make_noise
  StepCallback callback;           ///< called after every step when set
};

/// (denoiser, descending timesteps or levels, x_T, options) -> the final sample. x_T is not modified.
/// Throws std::invalid_argument for an empty, non-descending or out-of-range timestep list.
using Sampler = std::function<torch::Tensor(const Denoiser&, const Timesteps& timesteps, const torch::Tensor& x,
                                            const SamplerOptions&)>;

/// Ancestral sampling (Ho et al. 2020, Algorithm 2) over the spaced timesteps: the posterior
/// q(x_prev | x_t, x0) with its mean in the x0 form (Lin et al. 2023, section 3.4 / SEEDS 003 item 4);
/// variance beta_tilde (fixed_small) or beta (fixed_large). No noise on the last step.
torch::Tensor sample_ddpm(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// DDIM (Song et al. 2021, eq. 12): x_prev = a_prev x0 + sqrt(s_prev^2 - sigma^2) eps + sigma z,
/// sigma = eta (s_prev / s) sqrt(1 - alpha_bar / alpha_bar_prev).
torch::Tensor sample_ddim(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// Euler's method on the probability-flow ODE (k-diffusion sample_euler); equal to DDIM with eta 0.
torch::Tensor sample_euler(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                           const SamplerOptions& options = {});
/// Euler ancestral (k-diffusion sample_euler_ancestral, eta default 1).
torch::Tensor sample_euler_ancestral(const Denoiser& d, const Timesteps& timesteps,
                                     const torch::Tensor& x, const SamplerOptions& options = {});
/// Heun's second-order method (Karras et al. 2022, Algorithm 1) on the probability-flow ODE in the angle
/// phi = atan2(s, a) of x / sqrt(a^2 + s^2), dx/dphi = v^ (finite at both SNR 0 and the clean end); two denoiser
/// calls per step, one on a step that ends at s = 0 (a DDIM step).
torch::Tensor sample_heun(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers' DPMSolverMultistepScheduler with
/// solver_order 2, midpoint, lower_order_final).
torch::Tensor sample_dpmpp_2m(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                              const SamplerOptions& options = {});
/// DPM-Solver++(2M) SDE (k-diffusion sample_dpmpp_2m_sde, midpoint; diffusers' sde-dpmsolver++ at eta 1).
torch::Tensor sample_dpmpp_2m_sde(const Denoiser& d, const Timesteps& timesteps,
                                  const torch::Tensor& x, const SamplerOptions& options = {});

/// DPM-Solver++(3M) (Lu et al. 2022; diffusers' DPMSolverMultistepScheduler with solver_order 3, dpmsolver++):
/// first order on the first step, the 2M midpoint step on the second, the three-point update after (k-diffusion's
/// sample_dpmpp_3m_sde at eta 0 from its third step on). As diffusers writes it, that update is second order;
/// options.dpmpp3_taylor makes it third order.
torch::Tensor sample_dpmpp_3m(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                              const SamplerOptions& options = {});
/// DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde, eta default 1), warmed up as sample_dpmpp_3m.
torch::Tensor sample_dpmpp_3m_sde(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                                  const SamplerOptions& options = {});
/// UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler with predict_x0): the UniP-p predictor of order
/// options.order (warmed up from 1) and the UniC corrector, B(h) of options.unipc_variant. bh1's corrector has no
/// finite limit on a step from SNR 0 and is skipped there; bh2's is its exact limit.
torch::Tensor sample_unipc(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                           const SamplerOptions& options = {});

/// PNDMScheduler's pseudo linear multistep method (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
/// on Manifolds"; diffusers' step_plms, skip_prk_steps): Adams-Bashforth combinations (orders 1 to 4) of the network's
/// raw outputs (options.prediction: eps, or v converted to eps at the step's start as diffusers does) through the
/// DDIM transfer, with diffusers' second call at the second timestep (a Heun-like first step): S + 1 network calls
/// for S integer timesteps, each step going from t to t - T / S (not to the next listed timestep where a linspace
/// walk differs). The transfer divides by a_t, as PNDM's does: refused at zero terminal SNR (a = 0), and for a walk
/// that starts mid-schedule (image to image).
torch::Tensor sample_plms(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});

/// PNDMScheduler with its pseudo Runge-Kutta warm-up (skip_prk_steps false, diffusers' default): three RK4 steps of
/// four calls over the first four timesteps, then PLMS's Adams-Bashforth steps of order 4 (S + 9 network calls for S
/// timesteps, S >= 4). The same transfer and refusals as sample_plms.
torch::Tensor sample_pndm(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// diffusers' HeunDiscreteScheduler: Heun's method in sigma = s / a on z = x / a (Karras et al. 2022, Algorithm 1,
/// gamma 0); the last step, to s = 0, is an Euler (DDIM) step. sample_heun integrates in the angle instead and is
/// more accurate per step (docs/cli.md). Refuses a start at SNR 0 (sigma infinite).
torch::Tensor sample_heun_sigma(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                                const SamplerOptions& options = {});
/// diffusers' LMSDiscreteScheduler: the linear multistep method of order 4 in sigma = s / a (coefficients integrated
/// exactly). Refuses a start at SNR 0.
torch::Tensor sample_lms(const Denoiser& d, const Timesteps& timesteps, const torch::Tensor& x,
                         const SamplerOptions& options = {});

/// One row of the sampler table: every sampler diffuse has, the spellings it accepts, and what --help says.
struct SamplerInfo {
  std::string name;
  std::vector<std::string> aliases;
  Sampler fn;
  bool stochastic = false;  ///< draws noise after the initial x_T (at its default eta)
  /// runs from SNR 0 (a = 0, zero terminal SNR); false for the classes that divide by a (plms, pndm) or step in
  /// sigma = s / a (heun_sigma, lms), which refuse such a start naming the fix
  bool from_snr_zero = true;
  /// takes a last step of length 0 (the walk's last level equals its end: DDIMScheduler's set_alpha_to_one false
  /// from t = 0, karras with final_sigmas_type sigma_min) as the diffusers class does: the identity, after the
  /// clamp or correction of that last call; the others refuse such a walk
  bool zero_length_end = true;
  std::string help;
};
/// The one table behind sampler_names, get_sampler, canonical_sampler_name, is_stochastic and the CLI's help.
const std::vector<SamplerInfo>& sampler_table();
/// The table's names, in its order.
const std::vector<std::string>& sampler_names();
/// The sampler of that name or alias; throws std::invalid_argument listing the names.
Sampler get_sampler(const std::string& name);
/// The sampler's own name for one of its aliases (euler_a, dpm++2m, ...); others unchanged.
std::string canonical_sampler_name(const std::string& name);
/// Whether the named sampler draws noise after the initial x_T (for its default eta).
bool is_stochastic(const std::string& name);
/// Whether the named sampler can start at SNR 0 (SamplerInfo::from_snr_zero).
bool runs_from_snr_zero(const std::string& name);
/// Whether the named sampler takes a zero-length last step (SamplerInfo::zero_length_end).
bool takes_zero_length_end(const std::string& name);
/// "name: help" lines of the table, for --help.
std::string sampler_help();

}  // namespace diffuse
