#include <gtest/gtest.h>

#include "diffuse/core/prediction.h"
#include "diffuse/core/schedule.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {
struct Batch {
  torch::Tensor x0, eps, a, s, x_t, snr;
};

// A batch at the given timesteps of a schedule, float64 so identities can be checked tightly.
Batch make_batch(const Schedule& sched, const std::vector<int64_t>& ts, uint64_t seed) {
  torch::manual_seed(seed);
  auto t = torch::tensor(ts, torch::kLong);
  auto n = int64_t(ts.size());
  Batch b;
  b.x0 = torch::randn({n, 3, 4, 4}, torch::kFloat64);
  b.eps = torch::randn({n, 3, 4, 4}, torch::kFloat64);
  b.a = sched.a().index_select(0, t).view({n, 1, 1, 1});
  b.s = sched.s().index_select(0, t).view({n, 1, 1, 1});
  b.snr = sched.snr().index_select(0, t);
  b.x_t = b.a * b.x0 + b.s * b.eps;
  return b;
}

double per_example_sq(const torch::Tensor& e, int64_t i) { return e[i].pow(2).sum().item<double>(); }
}  // namespace

TEST(Prediction, Names) {
  EXPECT_EQ(parse_prediction("epsilon"), Prediction::eps);
  EXPECT_EQ(parse_prediction("v_prediction"), Prediction::v);
  EXPECT_EQ(parse_prediction("sample"), Prediction::x0);
  for (auto p : {Prediction::eps, Prediction::v, Prediction::x0}) {
    EXPECT_EQ(parse_prediction(to_string(p)), p);
    EXPECT_EQ(parse_prediction(diffusers_name(p)), p);
  }
  EXPECT_THROW(parse_prediction("noise"), std::invalid_argument);
}

// Every conversion recovers the true quantity from the true target, at random t and at SNR = 0.
TEST(Prediction, ConversionsRoundTripIncludingSnrZero) {
  auto sched = rescale_zero_terminal_snr(scaled_linear());
  torch::manual_seed(3);
  std::vector<int64_t> ts;
  for (int i = 0; i < 16; ++i) ts.push_back(torch::randint(0, 999, {1}).item<int64_t>());
  ts.push_back(0);
  ts.push_back(999);  // SNR = 0
  auto b = make_batch(sched, ts, 7);
  for (auto from : {Prediction::v, Prediction::x0}) {
    auto pred = target(from, b.x0, b.eps, b.a, b.s);
    for (auto to : {Prediction::eps, Prediction::v, Prediction::x0}) {
      auto want = target(to, b.x0, b.eps, b.a, b.s);
      auto got = convert(from, to, pred, b.x_t, b.a, b.s);
      EXPECT_TRUE(torch::allclose(got, want, 1e-9, 1e-9)) << to_string(from) << " -> " << to_string(to);
    }
  }
  // At SNR = 0 v is -x0 and x_t is eps: x0 = a x_t - s v = -v exactly.
  auto v = target(Prediction::v, b.x0, b.eps, b.a, b.s);
  auto last = int64_t(ts.size()) - 1;
  EXPECT_TRUE(torch::equal(to_x0(Prediction::v, v, b.x_t, b.a, b.s)[last], b.x0[last]));
}

TEST(Prediction, EpsConvertsWhereSignalExistsAndIsRefusedAtSnrZero) {
  auto sched = linear();
  auto b = make_batch(sched, {0, 10, 500, 999}, 11);
  auto eps = target(Prediction::eps, b.x0, b.eps, b.a, b.s);
  EXPECT_TRUE(torch::allclose(to_x0(Prediction::eps, eps, b.x_t, b.a, b.s), b.x0, 1e-6, 1e-8));
  EXPECT_TRUE(torch::allclose(to_v(Prediction::eps, eps, b.x_t, b.a, b.s), target(Prediction::v, b.x0, b.eps, b.a, b.s),
                              1e-6, 1e-8));
  auto z = make_batch(rescale_zero_terminal_snr(linear()), {5, 999}, 12);
  EXPECT_THROW(to_x0(Prediction::eps, z.eps, z.x_t, z.a, z.s), std::domain_error);
  EXPECT_NO_THROW(to_eps(Prediction::v, target(Prediction::v, z.x0, z.eps, z.a, z.s), z.x_t, z.a, z.s));
}

// 000 document: ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2 for one x0 error.
TEST(LossWeight, ErrorIdentitiesAcrossTargets) {
  auto sched = scaled_linear();
  auto b = make_batch(sched, {1, 100, 400, 800, 999}, 5);
  auto x0_hat = b.x0 + 0.3 * torch::randn_like(b.x0);
  auto x0_err = x0_hat - b.x0;
  // The same estimate expressed in each target (conversions from x0).
  auto eps_err = to_eps(Prediction::x0, x0_hat, b.x_t, b.a, b.s) - b.eps;
  auto v_err = to_v(Prediction::x0, x0_hat, b.x_t, b.a, b.s) - target(Prediction::v, b.x0, b.eps, b.a, b.s);
  for (int64_t i = 0; i < 5; ++i) {
    double snr = b.snr[i].item<double>(), e0 = per_example_sq(x0_err, i);
    EXPECT_NEAR(per_example_sq(eps_err, i) / e0, snr, 1e-9 * (1 + snr));
    EXPECT_NEAR(per_example_sq(v_err, i) / e0, snr + 1, 1e-9 * (1 + snr));
  }
}

// A weight stated on the x0 error gives the same loss whatever the network predicts.
TEST(LossWeight, SameX0WeightForEveryTarget) {
  auto sched = scaled_linear();
  auto b = make_batch(sched, {0, 3, 250, 700, 999}, 9);
  auto x0_hat = b.x0 + 0.2 * torch::randn_like(b.x0);
  std::map<Prediction, torch::Tensor> err;
  for (auto p : {Prediction::eps, Prediction::v, Prediction::x0})
    err[p] = (convert(Prediction::x0, p, x0_hat, b.x_t, b.a, b.s) - target(p, b.x0, b.eps, b.a, b.s))
                 .pow(2).flatten(1).sum(1);
  for (auto w : {LossWeight::eps, LossWeight::v, LossWeight::min_snr, LossWeight::truncated}) {
    auto ref = loss_weight(w, Prediction::x0, b.snr) * err[Prediction::x0];
    for (auto p : {Prediction::eps, Prediction::v}) {
      auto got = loss_weight(w, p, b.snr) * err[p];
      EXPECT_TRUE(torch::allclose(got, ref, 1e-8, 1e-10)) << to_string(w) << " on " << to_string(p);
    }
    EXPECT_TRUE(torch::allclose(ref, x0_weight(w, Prediction::x0, b.snr) * err[Prediction::x0]));
  }
  // The 000 document's statement: a v loss times SNR / (SNR + 1) is the eps loss.
  auto v_as_eps = loss_weight(LossWeight::eps, Prediction::v, b.snr);
  EXPECT_TRUE(torch::allclose(v_as_eps, b.snr / (b.snr + 1)));
  EXPECT_TRUE(torch::allclose(v_as_eps * err[Prediction::v], err[Prediction::eps], 1e-8, 1e-10));
  // Uniform is plain MSE on the target.
  EXPECT_TRUE(torch::equal(loss_weight(LossWeight::uniform, Prediction::v, b.snr), torch::ones_like(b.snr)));
}

TEST(LossWeight, ClosedForms) {
  auto snr = torch::tensor({0.0, 0.5, 1.0, 4.0, 5.0, 100.0}, torch::kFloat64);
  auto v = [&](LossWeight w, Prediction p, double g = 5.0) { return loss_weight(w, p, snr, g); };
  // min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR on eps, / (SNR + 1) on v.
  auto pos = snr.slice(0, 1);
  EXPECT_TRUE(torch::allclose(loss_weight(LossWeight::min_snr, Prediction::eps, pos), pos.clamp_max(5.0) / pos));
  EXPECT_TRUE(torch::allclose(v(LossWeight::min_snr, Prediction::v), snr.clamp_max(5.0) / (snr + 1)));
  EXPECT_TRUE(torch::allclose(v(LossWeight::min_snr, Prediction::v, 1.0), snr.clamp_max(1.0) / (snr + 1)));
  EXPECT_TRUE(torch::allclose(v(LossWeight::truncated, Prediction::v), snr.clamp_min(1.0) / (snr + 1)));
  EXPECT_TRUE(torch::allclose(v(LossWeight::v, Prediction::x0), snr + 1));
  // Finite at SNR = 0 for v and x0 targets.
  for (auto w : {LossWeight::uniform, LossWeight::eps, LossWeight::v, LossWeight::min_snr, LossWeight::truncated})
    for (auto p : {Prediction::v, Prediction::x0}) EXPECT_TRUE(torch::isfinite(v(w, p)).all().item<bool>());
  EXPECT_EQ(v(LossWeight::eps, Prediction::v)[0].item<double>(), 0.0);
  EXPECT_EQ(v(LossWeight::truncated, Prediction::v)[0].item<double>(), 1.0);
}

TEST(LossWeight, EpsTargetOnZeroSnrIsAnError) {
  auto snr = torch::tensor({0.0, 1.0}, torch::kFloat64);
  for (auto w : {LossWeight::uniform, LossWeight::eps, LossWeight::v, LossWeight::min_snr, LossWeight::truncated})
    EXPECT_THROW(loss_weight(w, Prediction::eps, snr), std::domain_error);
  EXPECT_THROW(loss_weight(LossWeight::min_snr, Prediction::v, snr, 0.0), std::invalid_argument);
  EXPECT_THROW(parse_loss_weight("snr-cubed"), std::invalid_argument);
  for (auto w : {LossWeight::uniform, LossWeight::eps, LossWeight::v, LossWeight::min_snr, LossWeight::truncated})
    EXPECT_EQ(parse_loss_weight(to_string(w)), w);
}
