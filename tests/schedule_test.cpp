#include <gtest/gtest.h>

#include "diffuse/core/schedule.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {
// Relative agreement to `digits` significant digits.
void expect_sig(double got, double want, int digits) {
  EXPECT_NEAR(got / want, 1.0, 0.5 * std::pow(10.0, 1 - digits)) << "got " << got << " want " << want;
}
}  // namespace

// Lin et al. 2023, Table 1: terminal SNR and sqrt(alpha_bar_T) at T = 1000.
TEST(Schedule, Table1Linear) {
  auto s = linear();
  expect_sig(s.snr_at(999), 4.035993e-05, 6);
  expect_sig(s.a_at(999), 0.006353, 4);
}
TEST(Schedule, Table1Cosine) {
  // The paper's cosine row was computed in float32, as diffusers does; float64 agrees to 5 digits.
  auto ab = diffusers_alphas_cumprod("squaredcos_cap_v2", 1000, 1e-4, 0.02, false).to(torch::kFloat64);
  double last = ab[999].item<double>();
  expect_sig(last / (1 - last), 2.428735e-09, 6);
  expect_sig(std::sqrt(last), 4.928220e-05, 6);
  auto s = cosine();
  expect_sig(s.snr_at(999), 2.428735e-09, 5);
  expect_sig(s.a_at(999), 4.9282e-05, 5);
}

TEST(Schedule, DiffusersFloat32MatchesFloat64) {
  for (std::string n : {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"}) {
    for (bool zero : {false, true}) {
      auto f32 = diffusers_alphas_cumprod(n, 1000, n == "scaled_linear" ? 0.00085 : 1e-4,
                                          n == "scaled_linear" ? 0.012 : 0.02, zero)
                     .to(torch::kFloat64);
      auto f64 = make_schedule({n == "squaredcos_cap_v2" ? "cosine" : n, 1000, -1, -1, false});
      if (zero) f64 = rescale_zero_terminal_snr(f64);
      EXPECT_TRUE(torch::allclose(f32, f64.alpha_bar, 1e-4, 1e-6)) << n << " zero=" << zero;
      if (zero) EXPECT_EQ(f32[999].item<double>(), 0.0) << n;
    }
  }
}
TEST(Schedule, Table1StableDiffusion) {
  auto s = scaled_linear();
  expect_sig(s.snr_at(999), 4.68e-03, 3);
  expect_sig(s.a_at(999), 0.068265, 5);
  expect_sig(s.s_at(999), 0.997667, 6);  // x_T = 0.068265 x0 + 0.997667 eps (eq. 10)
}

TEST(Schedule, DerivedQuantitiesAreConsistent) {
  for (auto s : {linear(), scaled_linear(), cosine(), sigmoid(), cosine(1000, 0.0)}) {
    auto sum = s.a().pow(2) + s.s().pow(2);
    EXPECT_TRUE(torch::allclose(sum, torch::ones_like(sum), 0, 1e-15));
    auto again = from_betas(s.betas());
    EXPECT_TRUE(torch::allclose(again.alpha_bar, s.alpha_bar, 1e-12, 1e-15));
    EXPECT_TRUE((s.alpha_bar.slice(0, 1) <= s.alpha_bar.slice(0, 0, -1)).all().item<bool>());
  }
}

TEST(Schedule, LinearBetasAreTheDefinition) {
  auto b = linear(1000).betas();
  EXPECT_NEAR(b[0].item<double>(), 1e-4, 1e-15);
  EXPECT_NEAR(b[999].item<double>(), 0.02, 1e-15);
  EXPECT_NEAR(b[500].item<double>(), 1e-4 + 500.0 / 999.0 * (0.02 - 1e-4), 1e-15);
  auto sd = scaled_linear(1000).betas();
  double r = std::sqrt(0.00085) + 250.0 / 999.0 * (std::sqrt(0.012) - std::sqrt(0.00085));
  EXPECT_NEAR(sd[250].item<double>(), r * r, 1e-15);
}

TEST(Schedule, CosineClipAndNoClip) {
  auto clipped = cosine(1000);
  EXPECT_NEAR(clipped.betas()[999].item<double>(), 0.999, 1e-12);
  auto free = cosine(1000, 0.0);
  EXPECT_EQ(free.alpha_bar_at(999), 0.0);
  EXPECT_TRUE(free.zero_terminal_snr());
  // Before the clip acts the two agree.
  EXPECT_NEAR(free.alpha_bar_at(500), clipped.alpha_bar_at(500), 1e-15);
}

// Algorithm 1 of Lin et al. 2023: keeps sqrt(alpha_bar[0]), makes the last exactly 0, linear in between.
TEST(Schedule, RescaleZeroTerminalSnrInvariants) {
  for (auto s : {linear(), scaled_linear(), cosine(), sigmoid()}) {
    auto r = rescale_zero_terminal_snr(s);
    EXPECT_EQ(r.alpha_bar_at(999), 0.0);
    EXPECT_TRUE(r.zero_terminal_snr());
    EXPECT_NEAR(r.a_at(0), s.a_at(0), 1e-15);
    EXPECT_EQ(r.snr_at(999), 0.0);
    // sqrt(alpha_bar) is an affine map of the original one.
    auto a = s.a(), b = r.a();
    double k = (b[0] - b[500]).item<double>() / (a[0] - a[500]).item<double>();
    auto pred = b[0] + (a - a[0]) * k;
    EXPECT_TRUE(torch::allclose(pred, b, 0, 1e-12));
    // betas derived from ratios, beta_0 from alpha_bar_0, last beta exactly 1.
    auto betas = r.betas();
    EXPECT_NEAR(betas[0].item<double>(), 1 - r.alpha_bar_at(0), 1e-15);
    EXPECT_EQ(betas[999].item<double>(), 1.0);
    EXPECT_TRUE(torch::isfinite(r.log_snr().slice(0, 0, 999)).all().item<bool>());
  }
}

TEST(Schedule, MakeScheduleValidates) {
  EXPECT_THROW(make_schedule({"nope", 1000}), std::invalid_argument);
  EXPECT_THROW(make_schedule({"linear", 1}), std::invalid_argument);
  EXPECT_THROW(make_schedule({"linear", 1000, 0.0, 0.02}), std::invalid_argument);
  EXPECT_THROW(make_schedule({"linear", 1000, 1e-4, 1.5}), std::invalid_argument);
  EXPECT_THROW(from_betas(std::vector<double>{0.1, -0.1, 0.2}), std::invalid_argument);
  EXPECT_THROW(from_betas(std::vector<double>{0.1, 1.2}), std::invalid_argument);
  auto z = make_schedule({"cosine", 1000, -1, -1, true});
  EXPECT_TRUE(z.zero_terminal_snr());
  EXPECT_NEAR(z.alpha_bar_at(10), cosine(1000, 0.0).alpha_bar_at(10), 1e-15);  // cosine: drop the clip
  auto sd = make_schedule({"scaled_linear", 1000, -1, -1, true});
  EXPECT_TRUE(torch::equal(sd.alpha_bar, rescale_zero_terminal_snr(scaled_linear()).alpha_bar));
}

TEST(Schedule, ContinuousViewMatchesGridAndInterpolatesLogSnr) {
  for (auto s : {linear(), rescale_zero_terminal_snr(scaled_linear())}) {
    ContinuousSchedule c(s);
    auto idx = torch::tensor({0, 1, 250, 998, 999}, torch::kLong);
    auto tau = idx.to(torch::kFloat64) / 999.0;
    auto [a, sg] = c.a_s(tau);
    EXPECT_TRUE(torch::allclose(a, s.a().index_select(0, idx), 0, 1e-12));
    EXPECT_TRUE(torch::allclose(a.pow(2) + sg.pow(2), torch::ones_like(a), 0, 1e-12));
    // Halfway between grid points: the mean of the two log-SNRs.
    auto mid = (torch::tensor({100.5}, torch::kFloat64)) / 999.0;
    auto l = c.log_snr(mid);
    auto ls = s.log_snr();
    EXPECT_NEAR(l.item<double>(), 0.5 * (ls[100] + ls[101]).item<double>(), 1e-9);
    // On the last interval of a zero-SNR schedule the result stays finite and in (0, a[998]).
    auto [a_end, s_end] = c.a_s(torch::tensor({998.5 / 999.0}, torch::kFloat64));
    EXPECT_TRUE(std::isfinite(a_end.item<double>()));
    EXPECT_LE(a_end.item<double>(), s.a_at(998) + 1e-15);
  }
}

// Lin et al. 2023, Table 2 (T = 1000, S = 10), 0-indexed as implemented in diffusers.
TEST(Spacing, Table2) {
  using V = std::vector<int64_t>;
  EXPECT_EQ(spaced_timesteps(1000, 10, Spacing::leading), (V{900, 800, 700, 600, 500, 400, 300, 200, 100, 0}));
  EXPECT_EQ(spaced_timesteps(1000, 10, Spacing::linspace), (V{999, 888, 777, 666, 555, 444, 333, 222, 111, 0}));
  EXPECT_EQ(spaced_timesteps(1000, 10, Spacing::trailing), (V{999, 899, 799, 699, 599, 499, 399, 299, 199, 99}));
  EXPECT_EQ(spaced_timesteps(1000, 10, Spacing::leading, 1), (V{901, 801, 701, 601, 501, 401, 301, 201, 101, 1}));
}

TEST(Spacing, EveryStepCountIsValid) {
  for (int64_t T : {2, 7, 1000}) {
    for (int64_t S = 1; S <= T; S += (T > 100 ? 37 : 1)) {
      for (auto sp : {Spacing::leading, Spacing::linspace, Spacing::trailing}) {
        auto ts = spaced_timesteps(T, S, sp);
        ASSERT_EQ(int64_t(ts.size()), S);
        for (size_t i = 0; i < ts.size(); ++i) {
          EXPECT_GE(ts[i], 0);
          EXPECT_LT(ts[i], T);
          if (i) EXPECT_LT(ts[i], ts[i - 1]) << to_string(sp) << " T=" << T << " S=" << S;
        }
        // linspace with S = 1 is numpy.linspace(0, T-1, 1) = [0], as in diffusers.
        if (sp == Spacing::trailing || (sp == Spacing::linspace && S > 1)) EXPECT_EQ(ts.front(), T - 1);
      }
    }
  }
  auto all = spaced_timesteps(1000, 1000, Spacing::trailing);
  EXPECT_EQ(all.front(), 999);
  EXPECT_EQ(all.back(), 0);
}

TEST(Spacing, HalfwayValuesRoundToEvenLikeNumpy) {
  // T/S = 62.5: np.round(arange(1000, 0, -62.5)) - 1 rounds 937.5 -> 938, 812.5 -> 812.
  auto ts = spaced_timesteps(1000, 16, Spacing::trailing);
  EXPECT_EQ(ts[1], 937);
  EXPECT_EQ(ts[3], 811);
  // np.round(np.linspace(0, 999, 3)) = [0, 500, 999]
  EXPECT_EQ(spaced_timesteps(1000, 3, Spacing::linspace), (std::vector<int64_t>{999, 500, 0}));
}

TEST(Spacing, BadInput) {
  EXPECT_THROW(spaced_timesteps(1000, 0, Spacing::trailing), std::invalid_argument);
  EXPECT_THROW(spaced_timesteps(1000, 1001, Spacing::trailing), std::invalid_argument);
  EXPECT_THROW(spaced_timesteps(1000, 1000, Spacing::leading, 1), std::invalid_argument);
  EXPECT_THROW(parse_spacing("middle"), std::invalid_argument);
}
