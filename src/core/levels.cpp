// Noise levels (include/diffuse/core/levels.h).
#include "diffuse/core/levels.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace diffuse {

Level level_at(const Schedule& schedule, int64_t t) {
  if (t < 0 || t >= schedule.T())
    throw std::invalid_argument("timestep " + std::to_string(t) + " lies outside the schedule's [0, " +
                                std::to_string(schedule.T() - 1) + "]");
  const double ab = schedule.alpha_bar_at(t);
  return Level{double(t), std::sqrt(ab), std::sqrt(1.0 - ab)};
}

Level vp_level_of_sigma(double sigma, double t) {
  if (std::isinf(sigma)) return Level{t, 0.0, 1.0};
  const double a = 1.0 / std::sqrt(1.0 + sigma * sigma);  // diffusers' _sigma_to_alpha_sigma_t
  return Level{t, a, sigma * a};
}

namespace {
// log sigma[t] = -lambda[t] at each integer t; +inf where alpha_bar = 0.
std::vector<double> log_sigmas(const Schedule& schedule) {
  std::vector<double> out(size_t(schedule.T()));
  for (int64_t t = 0; t < schedule.T(); ++t) {
    const double ab = schedule.alpha_bar_at(t);
    out[size_t(t)] = ab > 0 ? 0.5 * std::log((1.0 - ab) / ab) : std::numeric_limits<double>::infinity();
  }
  return out;
}
}  // namespace

namespace {
// sigma_to_t on a precomputed table of log sigma (diffusers' _sigma_to_t).
double t_of_sigma(const std::vector<double>& ls, double sigma) {
  const int64_t T = int64_t(ls.size());
  if (std::isinf(sigma)) return double(T - 1);
  const double l = std::log(std::max(sigma, 1e-10));
  // low = the last index whose log sigma is <= l (log sigma increases with t), clipped to [0, T - 2].
  int64_t low = 0;
  for (int64_t t = 0; t < T; ++t)
    if (ls[size_t(t)] <= l) low = t;
  low = std::min(low, T - 2);
  const double lo = ls[size_t(low)], hi = ls[size_t(low + 1)];
  double w = std::isinf(hi) ? 0.0 : (lo - l) / (lo - hi);
  w = std::min(1.0, std::max(0.0, w));
  return (1.0 - w) * double(low) + w * double(low + 1);
}
}  // namespace

double sigma_to_t(const Schedule& schedule, double sigma) { return t_of_sigma(log_sigmas(schedule), sigma); }

namespace {
// The continued fraction of the regularised incomplete beta function (Lentz's method).
double beta_continued_fraction(double x, double a, double b) {
  const double tiny = 1e-300;
  double c = 1, d = 1 - (a + b) * x / (a + 1);
  d = 1 / (std::abs(d) < tiny ? tiny : d);
  double h = d;
  for (int m = 1; m <= 300; ++m) {
    for (int pass = 0; pass < 2; ++pass) {
      const double num = pass == 0 ? m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
                                   : -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1));
      d = 1 + num * d;
      d = 1 / (std::abs(d) < tiny ? tiny : d);
      c = 1 + num / c;
      if (std::abs(c) < tiny) c = tiny;
      h *= d * c;
      if (pass == 1 && std::abs(d * c - 1) < 1e-15) return h;
    }
  }
  return h;
}
// I_x(a, b).
double incomplete_beta(double x, double a, double b) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const double front = std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x));
  if (x < (a + 1) / (a + b + 2)) return front * beta_continued_fraction(x, a, b) / a;
  return 1 - front * beta_continued_fraction(1 - x, b, a) / b;
}
}  // namespace

double beta_quantile(double p, double a, double b) {
  if (!(p >= 0 && p <= 1)) throw std::invalid_argument("beta_quantile: p must lie in [0, 1]");
  double lo = 0, hi = 1;
  for (int i = 0; i < 200 && hi - lo > 1e-16; ++i) {
    const double mid = 0.5 * (lo + hi);
    (incomplete_beta(mid, a, b) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

std::vector<double> spaced_sigmas(Spacing spacing, int64_t S, double hi, double lo, double rho) {
  if (!(rho > 0) || !std::isfinite(rho)) throw std::invalid_argument("karras rho must be positive, got " + std::to_string(rho));
  std::vector<double> out;
  for (int64_t i = 0; i < S; ++i) {
    const double r = S == 1 ? 0.0 : double(i) / double(S - 1);
    if (spacing == Spacing::karras)
      out.push_back(std::pow(std::pow(hi, 1 / rho) + r * (std::pow(lo, 1 / rho) - std::pow(hi, 1 / rho)), rho));
    else if (spacing == Spacing::exponential)
      out.push_back(std::exp(std::log(hi) + r * (std::log(lo) - std::log(hi))));
    else if (spacing == Spacing::beta)  // diffusers' _convert_to_beta: quantiles of 1 - linspace(0, 1, S)
      out.push_back(lo + beta_quantile(1.0 - r, 0.6, 0.6) * (hi - lo));
    else
      throw std::invalid_argument(to_string(spacing) + " is not a sigma spacing");
  }
  return out;
}

std::vector<Level> spaced_levels(const Schedule& schedule, int64_t S, Spacing spacing, int64_t steps_offset, double rho,
                                 bool round_t) {
  const int64_t T = schedule.T();
  if (!is_sigma_spacing(spacing)) {
    std::vector<Level> out;
    for (int64_t t : spaced_timesteps(T, S, spacing, steps_offset)) out.push_back(level_at(schedule, t));
    return out;
  }
  if (S < 1 || S > T)
    throw std::invalid_argument("number of sampling steps must lie in [1, T = " + std::to_string(T) + "], got " +
                                std::to_string(S));
  std::vector<Level> out;
  const bool zero_snr = schedule.zero_terminal_snr();
  if (zero_snr) out.push_back(Level{double(T - 1), 0.0, 1.0});
  const auto ls = log_sigmas(schedule);
  const double sigma_min = std::exp(ls.front()), sigma_max = std::exp(ls[size_t(zero_snr ? T - 2 : T - 1)]);
  for (double sigma : spaced_sigmas(spacing, S - (zero_snr ? 1 : 0), sigma_max, sigma_min, rho)) {
    double t = t_of_sigma(ls, sigma);
    if (round_t) t = std::nearbyint(t);
    out.push_back(vp_level_of_sigma(sigma, t));
  }
  return out;
}

double shift_sigma(double sigma, double shift) { return shift * sigma / (1.0 + (shift - 1.0) * sigma); }

Level flow_level(double sigma, int64_t T) { return Level{sigma * double(T), 1.0 - sigma, sigma}; }

std::vector<Level> flow_levels(int64_t T, int64_t S, double shift, Spacing spacing) {
  if (spacing != Spacing::linspace && !is_sigma_spacing(spacing))
    throw std::invalid_argument("a rectified-flow model walks linspace (shifted) sigmas, or karras / exponential / beta ones; " +
                                to_string(spacing) + " is a spacing of integer timesteps");
  if (T < 1) throw std::invalid_argument("num_train_timesteps must be >= 1, got " + std::to_string(T));
  if (S < 1) throw std::invalid_argument("number of sampling steps must be >= 1, got " + std::to_string(S));
  if (!(shift > 0) || !std::isfinite(shift)) throw std::invalid_argument("flow shift must be positive, got " + std::to_string(shift));
  // diffusers: timesteps = linspace(sigma_max * T, sigma_min * T, S) with sigma_max = shifted 1 = 1 and
  // sigma_min = shifted 1 / T; sigmas = timesteps / T, shifted (again).
  const double t_max = 1.0 * double(T), t_min = shift_sigma(1.0 / double(T), shift) * double(T);
  std::vector<Level> out;
  for (int64_t i = 0; i < S; ++i) {
    const double t = S == 1 ? t_max : t_max + double(i) * (t_min - t_max) / double(S - 1);
    out.push_back(flow_level(shift_sigma(t / double(T), shift), T));
  }
  if (!is_sigma_spacing(spacing) || S < 2) return out;
  const auto sigmas = spaced_sigmas(spacing, S, out.front().s, out.back().s);
  for (int64_t i = 1; i < S; ++i) out[size_t(i)] = flow_level(sigmas[size_t(i)], T);  // the first stays sigma = 1
  return out;
}

std::vector<int64_t> multistep_timesteps(int64_t T, int64_t S, Spacing spacing, int64_t steps_offset) {
  if (S < 1 || S > T) throw std::invalid_argument("number of sampling steps must lie in [1, T = " + std::to_string(T) + "]");
  std::vector<int64_t> ts;
  const int64_t ratio = T / (S + 1);
  for (int64_t i = S; i >= 1; --i)
    ts.push_back(spacing == Spacing::linspace ? int64_t(std::nearbyint(double(i) * double(T - 1) / double(S)))
                                              : i * ratio + steps_offset);
  if (ts.front() >= T) throw std::invalid_argument("leading spacing with this steps_offset walks t >= T");
  return ts;
}

std::vector<Level> sigma_linspace_levels(const Schedule& schedule, int64_t S) {
  const int64_t T = schedule.T();
  if (S < 1 || S > T) throw std::invalid_argument("number of sampling steps must lie in [1, T = " + std::to_string(T) + "]");
  auto sigma_at = [&](int64_t t) {
    const double ab = schedule.alpha_bar_at(t);
    return ab > 0 ? std::sqrt((1 - ab) / ab) : std::numeric_limits<double>::infinity();
  };
  std::vector<Level> out;
  for (int64_t i = S - 1; i >= 0; --i) {
    const double t = S == 1 ? 0.0 : (i == S - 1 ? double(T - 1) : double(i) * double(T - 1) / double(S - 1));
    const int64_t lo = int64_t(std::floor(t));
    const double w = t - double(lo);
    const double sigma = w == 0 ? sigma_at(lo) : (1 - w) * sigma_at(lo) + w * sigma_at(lo + 1);
    out.push_back(vp_level_of_sigma(sigma, t));
  }
  return out;
}

}  // namespace diffuse
