// Samplers against closed forms: on Gaussian data N(mu, s0^2 I) the ideal denoiser and the exact output of
// the probability-flow ODE are known, so convergence orders, stochastic marginals and the SNR-0 limits can
// be checked exactly. Also reproducible noise (Philox known answers) and the sampler identities.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/levels.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/models/unet.h"
#include "test_util.h"
#include "util/torch_compat.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {

// Data x0 ~ N(mu, s0^2 I) with mu of shape [D]. With x_t = a x0 + s eps and m^2 = a^2 s0^2 + s^2:
//   E[x0 | x_t] = mu + (a s0^2 / m^2) (x_t - a mu),  E[eps | x_t] = (s / m^2) (x_t - a mu).
struct Gaussian {
  torch::Tensor mu;  // float64 [D]
  double s0;

  // The ideal network in prediction space p; it reads a, s of the timestep it is conditioned on.
  Network network(const Schedule& schedule, Prediction p, int64_t* calls = nullptr) const {
    auto mu_ = mu;
    double s0_ = s0;
    return [schedule, p, mu_, s0_, calls](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning&) {
      if (calls) ++*calls;
      const int64_t t = int64_t(std::llround(tc[0].item<double>()));
      EXPECT_TRUE(torch::equal(tc, torch::full_like(tc, double(t)))) << "one timestep per batch";
      const double a = schedule.a_at(t), s = schedule.s_at(t), m2 = a * a * s0_ * s0_ + s * s;
      auto xc = x - a * mu_;
      auto x0 = mu_ + (a * s0_ * s0_ / m2) * xc;
      auto eps = (s / m2) * xc;
      switch (p) {
        case Prediction::eps: return eps;
        case Prediction::x0: return x0;
        case Prediction::v: return a * eps - s * x0;
      }
      return x0;
    };
  }

  // The probability-flow ODE is affine in x and carries N(a mu, m^2) at one level to the same law at another,
  // so it maps x_T to a_f mu + (m_f / m_T) (x_T - a_T mu) (positive slope: a flow keeps orientation).
  torch::Tensor ode_solution(const torch::Tensor& x_T, double ab_T, double ab_f) const {
    const double a_T = std::sqrt(ab_T), s_T = std::sqrt(1 - ab_T), a_f = std::sqrt(ab_f), s_f = std::sqrt(1 - ab_f);
    const double m_T = std::sqrt(a_T * a_T * s0 * s0 + s_T * s_T), m_f = std::sqrt(a_f * a_f * s0 * s0 + s_f * s_f);
    return a_f * mu + (m_f / m_T) * (x_T - a_T * mu);
  }
};

Gaussian test_data(int64_t d = 8) {
  return {torch::linspace(-1.0, 1.5, d, torch::kFloat64), 0.5};
}

Schedule zero_snr_cosine(int64_t T) { return make_schedule({"cosine_noclip", T, -1, -1, false}); }

torch::Tensor noise64(int64_t n, int64_t d, uint64_t seed) {
  return make_noise({d}, n, seed).to(torch::kFloat64);
}

double max_abs(const torch::Tensor& x) { return x.abs().max().item<double>(); }

// Error against the exact ODE output for S sampling steps (trailing spacing, final level alpha_bar[0]).
double ode_error(const std::string& sampler, const Schedule& sch, int64_t S, Prediction p) {
  auto g = test_data();
  auto d = make_denoiser(g.network(sch, p), p, sch);
  auto x_T = noise64(16, 8, 3);
  SamplerOptions o;
  o.set_alpha_to_one = false;
  o.lower_order_final = false;
  auto ts = spaced_timesteps(sch.T(), S, Spacing::trailing);
  auto x = get_sampler(sampler)(d, ts, x_T, o);
  return max_abs(x - g.ode_solution(x_T, sch.alpha_bar_at(ts[0]), sch.alpha_bar_at(0)));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Reproducible noise

// Random123's kat_vectors for philox4x32_10 (counter, key -> output).
TEST(Noise, PhiloxKnownAnswers) {
  using A4 = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (A4{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}),
            (A4{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
            (A4{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(Noise, ImageDependsOnlyOnSeedAndIndex) {
  auto big = make_noise({3, 5, 7}, 6, 42);
  auto tail = make_noise({3, 5, 7}, 2, 42, 4);
  EXPECT_EQ(big.sizes(), (std::vector<int64_t>{6, 3, 5, 7}));
  EXPECT_TRUE(torch::equal(big.narrow(0, 4, 2), tail));
  EXPECT_TRUE(torch::equal(make_noise({3, 5, 7}, 1, 42, 1)[0], big[1]));
  EXPECT_FALSE(torch::equal(make_noise({3, 5, 7}, 6, 43), big));
  EXPECT_FALSE(torch::equal(make_noise({3, 5, 7}, 6, 42, 0, 1), big));
  EXPECT_FALSE(torch::equal(big[0], big[1]));
}

// The recipe GPUs run (integer tensor operations) against the element-by-element one, on the CPU: the same
// float32 numbers (an odd last-bit difference of float64 log/cos could move one across a rounding boundary).
TEST(Noise, TensorRecipeMatchesTheScalarOne) {
  for (auto [first, stream] : {std::pair<int64_t, uint32_t>{0, 0}, {5, 3}, {(int64_t(1) << 32) + 7, 11}}) {
    auto scalar = make_noise({3, 5, 7}, 6, 0x0123456789abcdefULL, first, stream);  // 105 values: not a multiple of 4
    auto tensor = make_noise_by_tensor_ops({3, 5, 7}, 6, 0x0123456789abcdefULL, first, stream, torch::kCPU);
    ASSERT_EQ(tensor.sizes(), scalar.sizes());
    EXPECT_LE((tensor - scalar).abs().max().item<double>(), 1e-6) << "first " << first;
    EXPECT_GE((tensor == scalar).to(torch::kFloat64).mean().item<double>(), 0.999) << "first " << first;
  }
  auto big = make_noise({1, 32, 32}, 64, 9, 0, 2);
  EXPECT_TRUE(torch::equal(make_noise_by_tensor_ops({1, 32, 32}, 64, 9, 0, 2, torch::kCPU), big));
}

// Where CUDA exists: image i's noise on the GPU is the CPU's.
TEST(Noise, SameOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto cpu = make_noise({4, 16, 16}, 32, 77, 3, 1);
  auto gpu = make_noise({4, 16, 16}, 32, 77, 3, 1, torch::kCUDA);
  EXPECT_TRUE(gpu.is_cuda());
  EXPECT_LE((gpu.cpu() - cpu).abs().max().item<double>(), 1e-6);
  EXPECT_GE((gpu.cpu() == cpu).to(torch::kFloat64).mean().item<double>(), 0.999);
}

TEST(Noise, StandardNormal) {
  auto z = make_noise({1000}, 200, 5).to(torch::kFloat64).flatten();  // 2e5 draws
  const double n = double(z.numel());
  EXPECT_NEAR(z.mean().item<double>(), 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(z.var().item<double>(), 1.0, 5.0 * std::sqrt(2.0 / n));
  // P(|z| < 1) = 0.682689, P(|z| < 2) = 0.954500; binomial std below 0.0011.
  EXPECT_NEAR((z.abs() < 1).to(torch::kFloat64).mean().item<double>(), 0.682689, 0.005);
  EXPECT_NEAR((z.abs() < 2).to(torch::kFloat64).mean().item<double>(), 0.954500, 0.003);
  EXPECT_NEAR((z * z * z).mean().item<double>(), 0.0, 5.0 * std::sqrt(15.0 / n));
  EXPECT_TRUE(torch::isfinite(z).all().item<bool>());
}

// ---------------------------------------------------------------------------------------------------
// Denoiser

TEST(Denoiser, ConvertsEveryPredictionToTheSameEstimate) {
  auto sch = linear(1000);
  auto g = test_data();
  auto x = noise64(4, 8, 1);
  for (int64_t t : {0, 10, 500, 999}) {
    auto ref = make_denoiser(g.network(sch, Prediction::x0), Prediction::x0, sch)(x, t);
    for (auto p : {Prediction::eps, Prediction::v}) {
      auto e = make_denoiser(g.network(sch, p), p, sch)(x, t);
      EXPECT_LT(max_abs(e.x0 - ref.x0), 1e-9) << to_string(p) << " t=" << t;
      EXPECT_LT(max_abs(e.eps - ref.eps), 1e-9) << to_string(p) << " t=" << t;
    }
    EXPECT_LT(max_abs(sch.a_at(t) * ref.x0 + sch.s_at(t) * ref.eps - x), 1e-12);
  }
}

TEST(Denoiser, EpsModelAtSnrZeroIsRefusedWithTheFix) {
  auto sch = zero_snr_cosine(1000);
  auto g = test_data();
  auto d = make_denoiser(g.network(sch, Prediction::eps), Prediction::eps, sch);
  auto x = noise64(2, 8, 1);
  EXPECT_NO_THROW(d(x, 998));
  try {
    d(x, 999);
    FAIL() << "expected std::domain_error";
  } catch (const std::domain_error& e) {
    EXPECT_NE(std::string(e.what()).find("v"), std::string::npos) << e.what();
  }
  EXPECT_THROW(d(x, 1000), std::invalid_argument);
  EXPECT_THROW(d(x, -1), std::invalid_argument);
}

// E-TSDM (Yang et al. 2024): the network is conditioned on f(t), the noise level stays that of t.
TEST(Denoiser, AppliesTheEtsdmConditionMap) {
  auto sch = linear(1000);
  std::vector<double> seen;
  Network net = [&](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning&) {
    EXPECT_EQ(tc.scalar_type(), torch::kFloat32);
    seen.push_back(tc[0].item<double>());
    return torch::zeros_like(x);
  };
  auto d = make_denoiser(net, Prediction::v, sch, EtsdmConfig{100, 5});
  auto x = noise64(2, 8, 1);
  auto ts = spaced_timesteps(1000, 50, Spacing::trailing);  // ..., 119, 99, 79, 59, 39, 19
  sample_ddim(d, ts, x);
  ASSERT_EQ(seen.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const double want = ts[i] >= 100 ? double(ts[i]) : std::floor(ts[i] / 20.0) * 20.0;
    EXPECT_EQ(seen[i], want) << "t=" << ts[i];
  }
  // The noise level is t's: with a v model outputting 0, x0 = a_t x_t.
  auto e = d(x, 99);
  EXPECT_LT(max_abs(e.x0 - sch.a_at(99) * x), 1e-12);
}

// ---------------------------------------------------------------------------------------------------
// Convergence to the exact probability-flow ODE solution

// DDIM / Euler are first order, Heun and DPM-Solver++(2M) second order: the error ratio between S and 2S
// steps tends to 2 and 4. T = 1024 with nested trailing grids; the cosine schedule without clip has zero
// terminal SNR, so those runs start at SNR 0.
TEST(SamplerConvergence, OrdersOnGaussianData) {
  struct Case {
    std::string sampler;
    double order;
  };
  for (const std::string schedule : {"cosine_noclip", "linear"}) {
    auto sch = make_schedule({schedule, 1024, -1, -1, false});
    for (const Case& c : {Case{"ddim", 1}, Case{"euler", 1}, Case{"heun", 2}, Case{"dpmpp_2m", 2}}) {
      for (auto p : {Prediction::v, Prediction::x0}) {
        const double e64 = ode_error(c.sampler, sch, 64, p), e128 = ode_error(c.sampler, sch, 128, p);
        const double want = std::pow(2.0, c.order);
        EXPECT_GT(e64 / e128, 0.85 * want) << c.sampler << " " << to_string(p) << " " << schedule << " " << e64;
        EXPECT_LT(e64 / e128, 1.15 * want) << c.sampler << " " << to_string(p) << " " << schedule << " " << e128;
        EXPECT_LT(e128, c.order == 1 ? 0.04 : 0.015) << c.sampler << " " << schedule;
      }
    }
  }
  // eps models, on a schedule that does not reach SNR 0.
  auto sch = linear(1024);
  const double e64 = ode_error("heun", sch, 64, Prediction::eps), e128 = ode_error("heun", sch, 128, Prediction::eps);
  EXPECT_NEAR(e64 / e128, 4.0, 0.6);
}

// diffusers' sigma-space methods on the same data, on a schedule without SNR 0 (sigma finite): heun_sigma
// (HeunDiscreteScheduler) is second order, lms (LMSDiscreteScheduler, order 4 warmed up from 1) higher; diffuse's
// angle-space heun makes the same calls with a smaller error (the ratio docs/cli.md states).
TEST(SamplerConvergence, SigmaSpaceHeunAndLms) {
  auto sch = linear(1024);
  for (auto p : {Prediction::eps, Prediction::v}) {
    const double h64 = ode_error("heun_sigma", sch, 64, p), h128 = ode_error("heun_sigma", sch, 128, p);
    const double a64 = ode_error("heun", sch, 64, p), a128 = ode_error("heun", sch, 128, p);
    const double l64 = ode_error("lms", sch, 64, p), l128 = ode_error("lms", sch, 128, p);
    std::cout << to_string(p) << ": heun_sigma " << h64 << " / " << h128 << ", heun (angle) " << a64 << " / " << a128
              << " (" << h64 / a64 << "x / " << h128 / a128 << "x smaller), lms " << l64 << " / " << l128 << "\n";
    EXPECT_NEAR(h64 / h128, 4.0, 0.6) << to_string(p);
    EXPECT_GT(l64 / l128, 4.0) << to_string(p);
    EXPECT_LT(a64, h64) << to_string(p);
    EXPECT_LT(a128, h128) << to_string(p);
  }
}

// With final level alpha_bar = 1 the last step jumps to E[x0 | x_t]; for one step from SNR 0 that is the data
// mean exactly, whatever the sampler (the last step adds no noise, as in Ho et al.'s Algorithm 2).
TEST(ZeroSnr, OneStepFromPureNoiseGivesTheDataMean) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto g = test_data();
  auto x_T = noise64(4, 8, 9);
  for (const auto& name : sampler_names()) {
    if (!runs_from_snr_zero(name)) continue;  // plms, pndm, heun_sigma, lms: Plms.*, DiffusersParity040Classes.*
    for (auto p : {Prediction::v, Prediction::x0})
      for (auto variance : {DdpmVariance::fixed_small, DdpmVariance::fixed_large}) {
        SamplerOptions o;
        o.variance = variance;
        auto x = get_sampler(name)(make_denoiser(g.network(sch, p), p, sch), {999}, x_T, o);
        EXPECT_LT(max_abs(x - g.mu), 1e-12) << name << " " << to_string(p);
      }
  }
}

// Lin et al. 2023: every sampler x spacing x prediction type on a zero-terminal-SNR schedule gives finite
// values at every step; a run that starts at t = T - 1 sees x0 = the data mean there (section 5.2: the model
// predicts the mean at SNR 0), and an eps model is refused at that timestep with the fix named.
TEST(ZeroSnr, EverySamplerSpacingAndPredictionIsFinite) {
  auto sch = rescale_zero_terminal_snr(scaled_linear(1000));
  auto g = test_data();
  auto x_T = noise64(3, 8, 4);
  for (const auto& name : sampler_names()) {
    for (auto spacing : {Spacing::leading, Spacing::linspace, Spacing::trailing})
      for (auto p : {Prediction::eps, Prediction::v, Prediction::x0})
        for (int64_t S : {1, 7, 25}) {
          auto ts = spaced_timesteps(1000, S, spacing);
          const std::string what = name + " " + to_string(spacing) + " " + to_string(p) + " S=" + std::to_string(S);
          SamplerOptions o;
          bool finite = true;
          torch::Tensor first_x0;
          o.callback = [&](const StepInfo& info) {
            finite = finite && torch::isfinite(info.x).all().item<bool>() && torch::isfinite(info.x0).all().item<bool>();
            if (info.step == 0) first_x0 = info.x0;
          };
          auto d = make_denoiser(g.network(sch, p), p, sch);
          if (!runs_from_snr_zero(name)) {  // plms, pndm, heun_sigma, lms: refused from SNR 0 (their loops: Plms.*)
            if (ts[0] == 999) EXPECT_ANY_THROW(get_sampler(name)(d, ts, x_T, o)) << what;
            continue;
          }
          if (p == Prediction::eps && ts[0] == 999) {
            EXPECT_THROW(get_sampler(name)(d, ts, x_T, o), std::domain_error) << what;
            continue;
          }
          auto x = get_sampler(name)(d, ts, x_T, o);
          EXPECT_TRUE(finite) << what;
          EXPECT_TRUE(torch::isfinite(x).all().item<bool>()) << what;
          if (ts[0] == 999) EXPECT_LT(max_abs(first_x0 - g.mu), 1e-12) << what;
        }
  }
}

// ---------------------------------------------------------------------------------------------------
// Stochastic samplers

namespace {
struct Moments {
  torch::Tensor mean;  // per dimension
  double var;          // pooled over dimensions
};
Moments moments(const torch::Tensor& x) {
  return {x.mean(0), (x - x.mean(0)).pow(2).sum().item<double>() / double(x.numel() - x.size(1))};
}
}  // namespace

// Point-mass data (s0 = 0): E[x0 | x_t] = mu exactly, so each step of DDPM (fixed_small), DDIM (any eta),
// Euler ancestral and DPM-Solver++(2M) SDE samples the exact reverse transition and the law after every
// step is N(a' mu, s'^2) (Song et al. 2021, eq. 7 for DDIM). Checked at every step, within sampling error.
TEST(StochasticSamplers, ExactMarginalsOnPointMassData) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  Gaussian g{torch::linspace(-1.0, 1.5, 8, torch::kFloat64), 0.0};
  const int64_t n = 4096;
  auto x_T = noise64(n, 8, 21);
  struct Case {
    std::string sampler;
    double eta;
  };
  for (const Case& c : {Case{"ddpm", NAN}, Case{"ddim", 0.5}, Case{"euler_ancestral", 1.0},
                        Case{"dpmpp_2m_sde", 1.0}, Case{"dpmpp_2m_sde", 0.5}}) {
    SamplerOptions o;
    o.eta = c.eta;
    o.seed = 8;
    auto ts = spaced_timesteps(1000, 10, Spacing::trailing);
    double worst_mean = 0, worst_var = 0;
    o.callback = [&](const StepInfo& info) {
      if (info.t_next < 0) return;  // the last step goes to alpha_bar = 1, where the law is a point
      const double a = sch.a_at(info.t_next), s = sch.s_at(info.t_next);
      auto m = moments(info.x);
      worst_mean = std::max(worst_mean, max_abs(m.mean - a * g.mu) / (s / std::sqrt(double(n))));
      worst_var = std::max(worst_var, std::abs(m.var / (s * s) - 1.0) / std::sqrt(2.0 / double(n * 8)));
    };
    get_sampler(c.sampler)(make_denoiser(g.network(sch, Prediction::v), Prediction::v, sch), ts, x_T, o);
    EXPECT_LT(worst_mean, 5.0) << c.sampler << " eta " << c.eta << ": mean off by that many standard errors";
    EXPECT_LT(worst_var, 5.0) << c.sampler << " eta " << c.eta << ": variance off by that many standard errors";
  }
}

// Gaussian data: DDPM (fixed_small) with the ideal denoiser is a linear Gaussian chain whose law follows from
// the Gaussian posterior q(x' | x_t, x0) written as a conditional of the joint law of (x', x_t) given x0:
//   mean a' x0 + (a/a') (s'^2/s^2) (x_t - a x0), variance s'^2 - (a/a')^2 s'^4 / s^2,
// with x0 = E[x0 | x_t]. The chain's mean and variance at S = 50 (where it is still 20% below the data's)
// are propagated in closed form and matched within sampling error; DDIM (eta 1) and Euler ancestral are the
// same chain, checked by identity below.
TEST(StochasticSamplers, DdpmMatchesItsExactChainMoments) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto g = test_data();
  const int64_t n = 16384, S = 50;
  auto x_T = noise64(n, 8, 31);
  auto ts = spaced_timesteps(1000, S, Spacing::trailing);
  SamplerOptions o;
  o.seed = 2;
  auto x = sample_ddpm(make_denoiser(g.network(sch, Prediction::v), Prediction::v, sch), ts, x_T, o);
  auto x_T_m = moments(x_T);
  auto mean = x_T_m.mean.clone();
  double var = x_T_m.var;
  for (size_t i = 0; i < ts.size(); ++i) {
    const double a = sch.a_at(ts[i]), s = sch.s_at(ts[i]);
    const double a1 = i + 1 < ts.size() ? sch.a_at(ts[i + 1]) : 1.0, s1 = i + 1 < ts.size() ? sch.s_at(ts[i + 1]) : 0.0;
    const double k = a * g.s0 * g.s0 / (a * a * g.s0 * g.s0 + s * s);  // x0^ = mu + k (x - a mu)
    const double c = (a / a1) * s1 * s1 / (s * s);                      // posterior: a1 x0 + c (x - a x0)
    const double slope = c + (a1 - c * a) * k;
    auto offset = (a1 - c * a) * (g.mu - k * a * g.mu);
    const double noise = i + 1 < ts.size() ? s1 * s1 - (a / a1) * (a / a1) * s1 * s1 * s1 * s1 / (s * s) : 0.0;
    mean = slope * mean + offset;
    var = slope * slope * var + noise;
  }
  auto m = moments(x);
  EXPECT_LT(max_abs(m.mean - mean), 5.0 * std::sqrt(var / double(n)));
  EXPECT_NEAR(m.var / var, 1.0, 5.0 * std::sqrt(2.0 / double(n * 8)));
  EXPECT_LT(var, 0.85 * g.s0 * g.s0);  // the chain is biased at S = 50, so the check above has teeth
}

// Gaussian data: the stochastic samplers' output law approaches N(mu, s0^2) as S grows (bias O(1/S)).
TEST(StochasticSamplers, ApproachTheDataLawAsStepsGrow) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto g = test_data();
  const int64_t n = 4096;
  auto x_T = noise64(n, 8, 41);
  auto d = make_denoiser(g.network(sch, Prediction::x0), Prediction::x0, sch);
  for (std::string name : {"ddpm", "ddpm_large", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}) {
    SamplerOptions o;
    o.seed = 3;
    if (name == "ddpm_large") o.variance = DdpmVariance::fixed_large;
    auto sampler = get_sampler(name == "ddpm_large" ? "ddpm" : name);
    double bias[2];
    for (int i = 0; i < 2; ++i) {
      auto x = sampler(d, spaced_timesteps(1000, i == 0 ? 25 : 250, Spacing::trailing), x_T, o);
      auto m = moments(x);
      bias[i] = std::abs(m.var / (g.s0 * g.s0) - 1.0);
      if (i == 1) {
        EXPECT_LT(max_abs(m.mean - g.mu), 5.0 * g.s0 / std::sqrt(double(n))) << name;
        EXPECT_LT(bias[1], 0.08) << name;
      }
    }
    EXPECT_LT(bias[1], bias[0]) << name;
  }
}

// ---------------------------------------------------------------------------------------------------
// Identities between samplers, noise reproducibility, evaluation counts, bad input

// On variance-preserving models: euler == ddim (eta 0); euler_ancestral (eta) == ddim (eta) for eta <= 1;
// ddpm (fixed_small) == ddim (eta 1); dpmpp_2m_sde at eta 0 == dpmpp_2m, dpmpp_3m_sde at eta 0 == dpmpp_3m.
// Different formulas, same numbers.
TEST(SamplerIdentities, ClassicalSamplersCoincide) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto g = test_data();
  auto d = make_denoiser(g.network(sch, Prediction::v), Prediction::v, sch);
  auto x_T = noise64(16, 8, 5);
  auto ts = spaced_timesteps(1000, 20, Spacing::linspace);
  auto run = [&](const std::string& name, double eta) {
    SamplerOptions o;
    o.eta = eta;
    o.seed = 77;
    return get_sampler(name)(d, ts, x_T, o);
  };
  EXPECT_LT(max_abs(run("euler", NAN) - run("ddim", NAN)), 1e-12);
  EXPECT_LT(max_abs(run("euler_ancestral", 0.3) - run("ddim", 0.3)), 1e-12);
  EXPECT_LT(max_abs(run("euler_ancestral", NAN) - run("ddim", 1.0)), 1e-12);
  EXPECT_LT(max_abs(run("ddpm", NAN) - run("ddim", 1.0)), 1e-12);
  EXPECT_LT(max_abs(run("dpmpp_2m_sde", 0.0) - run("dpmpp_2m", NAN)), 1e-12);
  EXPECT_LT(max_abs(run("dpmpp_3m_sde", 0.0) - run("dpmpp_3m", NAN)), 1e-12);
  EXPECT_LT(max_abs(run("unipc", NAN) - run("dpmpp_2m", NAN)), 0.05);  // two second-order-plus methods
  EXPECT_GT(max_abs(run("unipc", NAN) - run("dpmpp_2m", NAN)), 1e-6);
  EXPECT_GT(max_abs(run("ddim", 1.0) - run("ddim", 0.0)), 0.1);
  EXPECT_GT(max_abs(run("heun", NAN) - run("ddim", 0.0)), 1e-3);
}

// Image i depends only on (seed, i): a batch of 6 and a batch of 2 starting at image 4 agree bit for bit.
TEST(SamplerReproducibility, ImagesDoNotDependOnTheBatch) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto g = test_data();
  Gaussian g32{g.mu.to(torch::kFloat32), g.s0};
  auto d = make_denoiser(g32.network(sch, Prediction::v), Prediction::v, sch);
  auto ts = spaced_timesteps(1000, 10, Spacing::trailing);
  for (const auto& name : sampler_names()) {
    if (!runs_from_snr_zero(name)) continue;  // plms, pndm, heun_sigma, lms: Plms.*, DiffusersParity040Classes.*
    SamplerOptions all, part;
    all.seed = part.seed = 123;
    part.first_image = 4;
    auto big = get_sampler(name)(d, ts, make_noise({8}, 6, 9), all);
    auto small = get_sampler(name)(d, ts, make_noise({8}, 2, 9, 4), part);
    EXPECT_TRUE(torch::equal(big.narrow(0, 4, 2), small)) << name;
    EXPECT_TRUE(torch::equal(get_sampler(name)(d, ts, make_noise({8}, 6, 9), all), big)) << name << " rerun";
  }
}

TEST(Samplers, NetworkEvaluations) {
  auto sch = linear(1000);
  auto g = test_data();
  auto x_T = noise64(2, 8, 1);
  auto ts = spaced_timesteps(1000, 10, Spacing::trailing);
  for (bool to_one : {true, false})
    for (const auto& name : sampler_names()) {
      if (name == "plms") continue;  // S + 1 calls, the second timestep twice (Plms.*)
      int64_t calls = 0;
      SamplerOptions o;
      o.set_alpha_to_one = to_one;
      int64_t callbacks = 0;
      o.callback = [&](const StepInfo& info) {
        EXPECT_EQ(info.step, callbacks++);
        EXPECT_EQ(info.steps, 10);
        EXPECT_EQ(info.t, ts[info.step]);
      };
      get_sampler(name)(make_denoiser(g.network(sch, Prediction::eps, &calls), Prediction::eps, sch), ts, x_T, o);
      // Heun's second call is skipped on a step to s = 0; PNDM's warm-up makes 12 calls for its first 3 steps.
      const int64_t want = name == "heun" || name == "heun_sigma" ? (to_one ? 19 : 20) : name == "pndm" ? 19 : 10;
      EXPECT_EQ(calls, want) << name;
      EXPECT_EQ(callbacks, 10);
    }
}

// The table's zero_length_end is what each sampler does with a walk whose last level is its end (a leading walk to
// t = 0 with set_alpha_to_one false): those that take it end on finite samples, the others refuse the walk.
TEST(Samplers, ZeroLengthEndAsTheTableSays) {
  auto sch = linear(1000);
  auto g = test_data();
  auto x_T = noise64(2, 8, 1);
  const auto ts = spaced_timesteps(1000, 10, Spacing::leading);
  ASSERT_EQ(ts.back(), 0);
  SamplerOptions o;
  o.set_alpha_to_one = false;
  for (const auto& name : sampler_names()) {
    const auto run = [&] { return get_sampler(name)(make_denoiser(g.network(sch, Prediction::eps), Prediction::eps, sch), ts, x_T, o); };
    if (takes_zero_length_end(name)) {
      EXPECT_TRUE(torch::isfinite(run()).all().item<bool>()) << name;
    } else {
      EXPECT_NE(diffuse::testing::error_of(run).find("strictly decreasing"), std::string::npos) << name;
    }
  }
}

TEST(Samplers, BadInputIsRefused) {
  auto sch = linear(1000);
  auto g = test_data();
  auto d = make_denoiser(g.network(sch, Prediction::eps), Prediction::eps, sch);
  auto x = noise64(2, 8, 1);
  EXPECT_THROW(sample_ddim(d, {}, x), std::invalid_argument);
  EXPECT_THROW(sample_ddim(d, {10, 20}, x), std::invalid_argument);
  EXPECT_THROW(sample_ddim(d, {10, 10}, x), std::invalid_argument);
  EXPECT_THROW(sample_ddim(d, {1000, 10}, x), std::invalid_argument);
  SamplerOptions o;
  o.eta = 1.5;
  EXPECT_THROW(sample_ddim(d, {500, 10}, x, o), std::invalid_argument);
  o.eta = -1;
  EXPECT_THROW(sample_euler_ancestral(d, {500, 10}, x, o), std::invalid_argument);
  try {
    get_sampler("deis");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("dpmpp_2m_sde"), std::string::npos) << e.what();
  }
  EXPECT_EQ(get_sampler("euler_a")(d, {500}, x, {}).sizes(), x.sizes());
  EXPECT_TRUE(is_stochastic("ddpm"));
  EXPECT_FALSE(is_stochastic("dpmpp_2m"));
  EXPECT_THROW(parse_ddpm_variance("learned"), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------
// Parity with diffusers 0.25 (tests/fixtures/diffusers/README.md, made by generators/gen_fixtures_0.25.py): full DDIM loops
// (leading and trailing spacing, eps and v prediction, zero terminal SNR and not) and a DPM-Solver++(2M)
// loop with lower_order_final, all with the fixture UNet as the model.
TEST(DiffusersParity, FullSamplerLoops) {
  const std::string dir = std::string(DIFFUSE_FIXTURES) + "/diffusers/";
  auto unet = load_unet(dir + "unet", torch::kCPU);
  unet->eval();
  auto tensors = load_safetensors(dir + "sampler_loops.safetensors");
  // Python's json writes lambda_min_clipped as -Infinity, which is not JSON: read it as null.
  std::string text = read_file(dir + "sampler_loops.json");
  for (size_t at; (at = text.find("-Infinity")) != std::string::npos;) text.replace(at, 9, "null");
  auto cases = nlohmann::json::parse(text);
  ASSERT_EQ(cases.size(), 5u);
  Network net = [&](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    return unet->forward(x, t, labels);
  };
  for (const auto& c : cases) {
    const std::string name = c.at("name");
    const bool ddim = name.rfind("ddim", 0) == 0;
    auto cfg = SchedulerConfig::from_json(c.at("scheduler_config"));
    auto alpha_bar = diffusers_alphas_cumprod(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start,
                                              cfg.beta_end, cfg.rescale_betas_zero_snr);
    if (ddim) {
      // The fixture was made with PyTorch 1.13, whose float32 linspace (an FMA-vectorised kernel) rounds
      // some betas differently from 2.x's in the last bit: bit for bit against 1.13; against 2.x to float32
      // rounding accumulated over the running product (the zero-SNR rescale divides by a0 - aT, so the
      // difference is stated in absolute terms: alpha_bar is at most 1).
      const auto& want = tensors.at(name + ".alphas_cumprod");
      const double diff = max_abs(alpha_bar - want);
      std::cout << name << ": alphas_cumprod max |diffuse - diffusers| " << diff << "\n";
      if (DIFFUSE_TORCH2)
        EXPECT_LT(diff, 1e-6) << name;
      else
        EXPECT_TRUE(torch::equal(alpha_bar, want)) << name;
    }
    const auto ts = c.at("timesteps").get<std::vector<int64_t>>();
    const int64_t S = c.at("num_inference_steps").get<int64_t>();
    if (ddim) {
      EXPECT_EQ(spaced_timesteps(cfg.num_train_timesteps, S, cfg.timestep_spacing, cfg.steps_offset), ts) << name;
    } else {
      // DPMSolverMultistepScheduler's linspace: S + 1 points from 0 to T - 1, reversed, the last dropped.
      std::vector<int64_t> want;
      for (int64_t i = S; i >= 1; --i)
        want.push_back(int64_t(std::nearbyint(double(i) * double(cfg.num_train_timesteps - 1) / double(S))));
      EXPECT_EQ(want, ts) << name;
    }
    auto labels = torch::tensor(c.at("class_labels").get<std::vector<int64_t>>(), torch::kLong);
    auto d = make_denoiser(net, cfg.prediction_type, Schedule{alpha_bar.to(torch::kFloat64)}, {}, labels);
    SamplerOptions o;
    o.set_alpha_to_one = ddim ? cfg.set_alpha_to_one : false;  // DPMSolverMultistep 0.25 ends at alpha_bar[0]
    o.lower_order_final = true;
    auto x = (ddim ? sample_ddim : sample_dpmpp_2m)(d, ts, tensors.at(name + ".init_noise"), o);
    auto want = tensors.at(name + ".sample");
    const double diff = max_abs(x - want), scale = max_abs(want);
    EXPECT_LT(diff, 5e-6 * std::max(1.0, scale)) << name << ": max |diffuse - diffusers| = " << diff;
    std::cout << name << ": max |diffuse - diffusers| = " << diff << " (max |sample| " << scale << ")\n";
  }
}

// PNDMScheduler's PLMS (its agreement with diffusers is DiffusersParity040Classes): S + 1 network calls for S
// timesteps, the second timestep twice; integer timesteps only; a > 0 where it steps from (it divides by a, as
// diffusers does); eps or v outputs; no partial walk; and on Gaussian data it converges with the steps.
TEST(Plms, OwnRules) {
  auto sch = scaled_linear(1000);
  auto g = test_data();
  auto x_T = noise64(2, 8, 1);
  int64_t calls = 0;
  auto d = make_denoiser(g.network(sch, Prediction::eps, &calls), Prediction::eps, sch);
  auto ts = spaced_timesteps(1000, 10, Spacing::leading, 1);
  std::vector<double> called;
  SamplerOptions o;
  o.callback = [&](const StepInfo& info) { called.push_back(info.t); };
  sample_plms(d, ts, x_T, o);
  EXPECT_EQ(calls, 11);
  ASSERT_EQ(called.size(), 11u);
  EXPECT_EQ(called[1], called[2]);
  EXPECT_EQ(called[1], double(ts[1]));
  // Converges: 50 steps against 200 (the exact ODE solution is the limit), closer than 10 steps.
  auto x50 = sample_plms(d, spaced_timesteps(1000, 50, Spacing::leading, 1), x_T);
  auto x200 = sample_plms(d, spaced_timesteps(1000, 200, Spacing::leading, 1), x_T);
  auto x10 = sample_plms(d, ts, x_T);
  EXPECT_LT(max_abs(x50 - x200), 0.2 * max_abs(x10 - x200));
  // v outputs: diffusers combines the v's and converts the result at the step's start. With one call that is the eps
  // step exactly; with many, another multistep method on the same ODE: it converges to the same solution.
  SamplerOptions v;
  v.prediction = Prediction::v;
  auto dv = make_denoiser(g.network(sch, Prediction::v), Prediction::v, sch);
  EXPECT_LT(max_abs(sample_plms(dv, {951}, x_T, v) - sample_plms(d, {951}, x_T)), 1e-12);
  EXPECT_GT(max_abs(sample_plms(dv, ts, x_T, v) - x10), 1e-6);
  const auto reference = sample_plms(d, spaced_timesteps(1000, 1000, Spacing::leading), x_T);
  std::vector<double> errors;
  for (int64_t S : {10, 50, 200})
    errors.push_back(max_abs(sample_plms(dv, spaced_timesteps(1000, S, Spacing::leading, 1), x_T, v) - reference));
  EXPECT_LT(errors[1], errors[0]);
  EXPECT_LT(errors[2], errors[1]);
  // Refusals: zero terminal SNR, levels that are not integer timesteps, x0 outputs, a partial walk.
  auto z = rescale_zero_terminal_snr(scaled_linear(1000));
  auto dz = make_denoiser(g.network(z, Prediction::v), Prediction::v, z);
  EXPECT_THROW(sample_plms(dz, spaced_timesteps(1000, 10, Spacing::trailing), x_T, v), std::invalid_argument);
  EXPECT_THROW(sample_plms(d, Timesteps(spaced_levels(sch, 10, Spacing::karras)), x_T), std::invalid_argument);
  SamplerOptions x0;
  x0.prediction = Prediction::x0;
  EXPECT_THROW(sample_plms(d, ts, x_T, x0), std::invalid_argument);
  SamplerOptions part;
  part.walk_steps = 20;
  EXPECT_THROW(sample_plms(d, ts, x_T, part), std::invalid_argument);
}
