// Samplers: functions over a denoiser (k-diffusion style; multistep history is a local variable).
//
// Every sampler walks a descending list of integer training timesteps (spaced_timesteps in schedule.h)
// and one final step to "t = -1", whose alpha_bar is 1 (the clean data) with set_alpha_to_one, else
// alpha_bar[0] (diffusers' DDIMScheduler convention; DPMSolverMultistepScheduler 0.25 uses alpha_bar[0]).
// All updates are written in (a, s) and q = exp(-h) = (a s_next) / (a_next s), h = lambda_next - lambda,
// lambda = log(a / s): never through sigma = s / a and never dividing by a. So they are exact on
// zero-terminal-SNR schedules: the first step from a = 0 (lambda = -inf, q = 0) is the limit of each
// formula, and a step to s_next = 0 (lambda = +inf, q = 0) is too.
//
// Several classical samplers coincide on variance-preserving models (derivations in src/sample/sampling.cpp):
// euler == ddim (eta 0) and euler_ancestral (eta) == ddim (eta) for eta <= 1; ddpm with fixed_small
// variance == ddim with eta 1 (except that ddpm adds no noise on its last step). They are kept as
// separate entries because users ask for them by name, and the tests check the identities.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "diffuse/sample/denoiser.h"
#include "diffuse/core/noise.h"

namespace diffuse {

/// What a per-step callback sees, after step `step` (0-based) of `steps`.
struct StepInfo {
  int64_t step = 0, steps = 0;
  int64_t t = 0, t_next = 0;   ///< the step went from t to t_next (-1: the final target)
  torch::Tensor x;             ///< the sample after the step
  torch::Tensor x0;            ///< the denoiser's x0 estimate at (x_t, t) that the step used
};
using StepCallback = std::function<void(const StepInfo&)>;

enum class DdpmVariance { fixed_small, fixed_large };
DdpmVariance parse_ddpm_variance(const std::string& name);  ///< fixed_small, fixed_large
std::string to_string(DdpmVariance v);

struct SamplerOptions {
  /// Noise level of the stochastic samplers; NaN means the sampler's default (ddim 0, euler_ancestral 1,
  /// dpmpp_2m_sde 1). Ignored by the deterministic euler, heun and dpmpp_2m.
  double eta = std::numeric_limits<double>::quiet_NaN();
  DdpmVariance variance = DdpmVariance::fixed_small;  ///< ddpm only
  bool set_alpha_to_one = true;    ///< the final step goes to alpha_bar = 1; false: to alpha_bar[0]
  bool lower_order_final = true;   ///< dpmpp_*: first-order last step when fewer than 15 steps (diffusers)
  uint64_t seed = 0;               ///< per-step noise of stochastic samplers, see make_noise
  int64_t first_image = 0;         ///< global index of the batch's first image, see make_noise
  StepCallback callback;           ///< called after every step when set
};

/// (denoiser, descending timesteps, x_T, options) -> the final sample. x_T is not modified.
/// Throws std::invalid_argument for an empty, non-descending or out-of-range timestep list.
using Sampler = std::function<torch::Tensor(const Denoiser&, const std::vector<int64_t>& timesteps,
                                            const torch::Tensor& x, const SamplerOptions&)>;

/// Ancestral sampling (Ho et al. 2020, Algorithm 2) over the spaced timesteps: the posterior
/// q(x_prev | x_t, x0) with its mean in the x0 form (Lin et al. 2023, section 3.4 / SEEDS 003 item 4);
/// variance beta_tilde (fixed_small) or beta (fixed_large). No noise on the last step.
torch::Tensor sample_ddpm(const Denoiser& d, const std::vector<int64_t>& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// DDIM (Song et al. 2021, eq. 12): x_prev = a_prev x0 + sqrt(s_prev^2 - sigma^2) eps + sigma z,
/// sigma = eta (s_prev / s) sqrt(1 - alpha_bar / alpha_bar_prev).
torch::Tensor sample_ddim(const Denoiser& d, const std::vector<int64_t>& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// Euler's method on the probability-flow ODE (k-diffusion sample_euler); equal to DDIM with eta 0.
torch::Tensor sample_euler(const Denoiser& d, const std::vector<int64_t>& timesteps, const torch::Tensor& x,
                           const SamplerOptions& options = {});
/// Euler ancestral (k-diffusion sample_euler_ancestral, eta default 1).
torch::Tensor sample_euler_ancestral(const Denoiser& d, const std::vector<int64_t>& timesteps,
                                     const torch::Tensor& x, const SamplerOptions& options = {});
/// Heun's second-order method (Karras et al. 2022, Algorithm 1) on the probability-flow ODE in the angle
/// phi = atan2(s, a), dx/dphi = v^ (finite at both SNR 0 and the clean end); two denoiser calls per step,
/// one on a step that ends at s = 0 (a DDIM step).
torch::Tensor sample_heun(const Denoiser& d, const std::vector<int64_t>& timesteps, const torch::Tensor& x,
                          const SamplerOptions& options = {});
/// DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers' DPMSolverMultistepScheduler with
/// solver_order 2, midpoint, lower_order_final).
torch::Tensor sample_dpmpp_2m(const Denoiser& d, const std::vector<int64_t>& timesteps, const torch::Tensor& x,
                              const SamplerOptions& options = {});
/// DPM-Solver++(2M) SDE (k-diffusion sample_dpmpp_2m_sde, midpoint; diffusers' sde-dpmsolver++ at eta 1).
torch::Tensor sample_dpmpp_2m_sde(const Denoiser& d, const std::vector<int64_t>& timesteps,
                                  const torch::Tensor& x, const SamplerOptions& options = {});

/// ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde.
const std::vector<std::string>& sampler_names();
/// The sampler of that name (also accepts euler_a, dpmpp2m, dpmpp2m_sde, dpm++2m, dpm++2m_sde);
/// throws std::invalid_argument listing the names.
Sampler get_sampler(const std::string& name);
/// The sampler's own name for one of its accepted spellings (euler_a, dpm++2m, ...); others unchanged.
std::string canonical_sampler_name(const std::string& name);
/// Whether the named sampler draws noise after the initial x_T (for its default eta).
bool is_stochastic(const std::string& name);

}  // namespace diffuse
