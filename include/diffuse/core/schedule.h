// Noise schedules as data: alpha_bar[t] for t = 0..T-1 in double precision, everything else derived.
//
// Notation (variance preserving, discrete time):
//   alpha_bar[t] = prod_{s<=t} (1 - beta[s]),  a_t = sqrt(alpha_bar[t]),  s_t = sqrt(1 - alpha_bar[t]),
//   x_t = a_t x0 + s_t eps,  SNR(t) = a_t^2 / s_t^2.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

/// A discrete variance-preserving noise schedule. Holds only alpha_bar (float64, CPU, length T);
/// a, s, SNR, log-SNR and betas are computed from it on demand.
struct Schedule {
  torch::Tensor alpha_bar;

  int64_t T() const { return alpha_bar.size(0); }
  torch::Tensor betas() const;    ///< beta[0] = 1 - alpha_bar[0], beta[t] = 1 - alpha_bar[t] / alpha_bar[t-1]
  torch::Tensor a() const;        ///< sqrt(alpha_bar)
  torch::Tensor s() const;        ///< sqrt(1 - alpha_bar)
  torch::Tensor snr() const;      ///< alpha_bar / (1 - alpha_bar); 0 where alpha_bar = 0
  torch::Tensor log_snr() const;  ///< log(SNR); -inf where SNR = 0

  double alpha_bar_at(int64_t t) const;  ///< checked scalar access
  double a_at(int64_t t) const { return std::sqrt(alpha_bar_at(t)); }
  double s_at(int64_t t) const { return std::sqrt(1.0 - alpha_bar_at(t)); }
  double snr_at(int64_t t) const;
  bool zero_terminal_snr() const { return alpha_bar_at(T() - 1) == 0.0; }
};

/// DDPM's linear betas (Ho et al. 2020): beta from beta_start to beta_end, linear in t.
Schedule linear(int64_t T = 1000, double beta_start = 1e-4, double beta_end = 0.02);
/// Stable Diffusion's schedule: beta linear in sqrt(beta) from sqrt(beta_start) to sqrt(beta_end).
Schedule scaled_linear(int64_t T = 1000, double beta_start = 0.00085, double beta_end = 0.012);
/// Nichol & Dhariwal's cosine schedule (diffusers "squaredcos_cap_v2"):
/// beta_t = min(1 - f(t+1)/f(t), max_beta), f(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2).
/// max_beta <= 0 disables the clip, which gives zero terminal SNR (Lin et al. 2023, section 3.1).
Schedule cosine(int64_t T = 1000, double max_beta = 0.999, double s = 0.008);
/// diffusers' "sigmoid": beta = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start.
Schedule sigmoid(int64_t T = 1000, double beta_start = 1e-4, double beta_end = 0.02);
/// From explicit betas, each in (0, 1]; a final beta of exactly 1 gives zero terminal SNR.
Schedule from_betas(const std::vector<double>& betas);
Schedule from_betas(const torch::Tensor& betas);

/// Algorithm 1 of Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed"):
/// shift and scale sqrt(alpha_bar) so that its first value is kept and its last becomes exactly 0.
Schedule rescale_zero_terminal_snr(const Schedule& schedule);

/// alphas_cumprod exactly as diffusers 0.25 computes it: betas in float32 (torch.linspace in float32 for
/// linear and scaled_linear; cosine and sigmoid as diffusers builds them), cumprod in float32, and the
/// zero-SNR rescale done on those float32 values. Use it for bit-level parity with diffusers; the
/// Schedule functions above compute the same curves in float64. Returns float32 [T] on the CPU.
torch::Tensor diffusers_alphas_cumprod(const std::string& beta_schedule, int64_t T, double beta_start,
                                       double beta_end, bool rescale_zero_snr);

/// Names accepted by make_schedule / the CLI: linear, scaled_linear, cosine (squaredcos_cap_v2),
/// cosine_noclip, sigmoid.
const std::vector<std::string>& schedule_names();

struct ScheduleSpec {
  std::string name = "linear";
  int64_t T = 1000;
  double beta_start = -1;  ///< <0: the schedule's own default
  double beta_end = -1;
  bool zero_snr = false;
};
/// Builds a named schedule; throws std::invalid_argument naming the bad value.
Schedule make_schedule(const ScheduleSpec& spec);

/// The continuous-time view of a discrete schedule: tau in [0, 1] maps to the fractional index
/// tau * (T - 1), interpolated linearly in log-SNR (in a_t on an interval that ends at SNR 0,
/// where log-SNR is -inf). Works on any device. Not used by the trainer or the samplers (which walk the discrete
/// schedule's levels or levels.h's); kept as the continuous view of a schedule for library users, tested in
/// schedule_test.
struct ContinuousSchedule {
  explicit ContinuousSchedule(const Schedule& schedule);
  /// a(tau), s(tau) for a tensor of tau in [0, 1] (any device, float32 or float64 out like tau).
  std::pair<torch::Tensor, torch::Tensor> a_s(const torch::Tensor& tau) const;
  torch::Tensor log_snr(const torch::Tensor& tau) const;

 private:
  torch::Tensor log_snr_;  // float64 [T]
  torch::Tensor a_;        // float64 [T]
};

/// Timestep spacing: which of the T training timesteps a sampler with S steps walks.
/// Section 3.3 and Table 2 of Lin et al. 2023, 0-indexed as implemented in diffusers. karras, exponential and beta
/// are sigma spacings between the integer timesteps (spaced_levels in levels.h).
enum class Spacing { leading, linspace, trailing, karras, exponential, beta };
inline bool is_sigma_spacing(Spacing s) { return s == Spacing::karras || s == Spacing::exponential || s == Spacing::beta; }
Spacing parse_spacing(const std::string& name);
std::string to_string(Spacing spacing);
/// Descending timesteps. leading: arange(0, T, T/S) + steps_offset; linspace: round(linspace(0, T-1, S));
/// trailing: round(arange(T, 0, -T/S)) - 1. Throws for S outside [1, T] and for a sigma spacing.
std::vector<int64_t> spaced_timesteps(int64_t T, int64_t S, Spacing spacing, int64_t steps_offset = 0);

}  // namespace diffuse
