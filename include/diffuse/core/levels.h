// Noise levels: the points a sampler walks, on a discrete variance-preserving schedule or a rectified-flow path.
//
// A level is the time t the network is conditioned on and the pair (a, s) of x_t = a x0 + s eps there. On a
// discrete schedule, integer t gives a_t = sqrt(alpha_bar[t]); a sigma spacing (karras, exponential) picks
// sigma = s / a values and conditions the network on the fractional t found by interpolating log sigma between
// the integer points (diffusers' _sigma_to_t). On the rectified-flow path a = 1 - sigma, s = sigma and the
// network sees t = sigma * T (diffusers' FlowMatchEulerDiscreteScheduler, T = num_train_timesteps).
#pragma once

#include <cstdint>
#include <vector>

#include "diffuse/core/schedule.h"

namespace diffuse {

/// A point of the noise path: the network's time t and x_t = a x0 + s eps there (a, s >= 0, not both 0).
/// Variance-preserving levels have a^2 + s^2 = 1; rectified flow has a + s = 1.
struct Level {
  double t = 0;
  double a = 0, s = 1;
};

/// The level of integer training timestep t of a discrete variance-preserving schedule (t checked).
Level level_at(const Schedule& schedule, int64_t t);
/// The variance-preserving level of sigma = s / a (sigma = inf: SNR 0) at network time t.
Level vp_level_of_sigma(double sigma, double t);
/// The fractional timestep of sigma = s / a on `schedule`: log sigma interpolated linearly between the integer
/// timesteps that bracket it, clamped to [0, T - 1] (diffusers' _sigma_to_t). Infinite sigma: T - 1.
double sigma_to_t(const Schedule& schedule, double sigma);

/// The walk of S steps for any spacing, with the end level (the clean data). Integer spacings (leading,
/// linspace, trailing) give the levels of spaced_timesteps. Sigma spacings go from the schedule's largest finite
/// sigma to its smallest, sigma_max = sigma[T - 1] (sigma[T - 2] on a zero-terminal-SNR schedule) and
/// sigma_min = sigma[0]: karras (Karras et al. 2022, eq. 5, rho), exponential (uniform in log sigma) and beta
/// (Lee et al. 2024, "Beta sampling is all you need": sigma linear in the Beta(0.6, 0.6) quantiles, as diffusers'
/// use_beta_sigmas). On a
/// zero-terminal-SNR schedule the first level is the exact SNR-0 point (t = T - 1, a = 0) and the S - 1 others
/// follow the spacing over the finite range. round_t rounds each level's network time to an integer (as
/// diffusers' DPMSolverMultistep and UniPC do with use_karras_sigmas) while keeping the spacing's sigma.
std::vector<Level> spaced_levels(const Schedule& schedule, int64_t S, Spacing spacing, int64_t steps_offset = 0,
                                 double rho = 7.0, bool round_t = false);

/// S sigmas of a sigma spacing (karras with rho, exponential, beta) from hi down to lo, both included.
std::vector<double> spaced_sigmas(Spacing spacing, int64_t S, double hi, double lo, double rho = 7.0);
/// The quantile function of Beta(a, b) at p in [0, 1] (bisection on the regularised incomplete beta function).
double beta_quantile(double p, double a, double b);

/// diffusers' FlowMatchEulerDiscreteScheduler time shift: sigma -> shift sigma / (1 + (shift - 1) sigma).
double shift_sigma(double sigma, double shift);
/// The rectified-flow level of sigma in [0, 1]: a = 1 - sigma, s = sigma, t = sigma * T.
Level flow_level(double sigma, int64_t T);
/// FlowMatchEulerDiscreteScheduler.set_timesteps (no dynamic shifting): training sigmas k / T (k = 1..T) shifted,
/// then S sigmas linearly from 1 to the smallest shifted training sigma, shifted again, then 0 (the end level).
/// karras (rho 7), exponential and beta respace those S sigmas between their first (1: SNR 0, the exact point) and
/// last, as use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas do; other spacings are refused.
std::vector<Level> flow_levels(int64_t T, int64_t S, double shift, Spacing spacing = Spacing::linspace);

/// DPMSolverMultistepScheduler's and UniPCMultistepScheduler's linspace (rounded) and leading (+ steps_offset)
/// timesteps: S + 1 points over [0, T - 1], the last (t = 0 side) dropped.
std::vector<int64_t> multistep_timesteps(int64_t T, int64_t S, Spacing spacing, int64_t steps_offset);
/// The sigma-space classes' linspace (Euler, Euler ancestral, Heun, LMS): fractional t = linspace(T - 1, 0, S), sigma
/// interpolated linearly between the integer points (np.interp), the level of that sigma.
std::vector<Level> sigma_linspace_levels(const Schedule& schedule, int64_t S);

}  // namespace diffuse
