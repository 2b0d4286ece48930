// Classifier-free guidance (Lin et al. 2023, Algorithm 2) against hand computations, its single batched
// network call, and classifier guidance (Dhariwal & Nichol 2021) against a linear-logit classifier whose
// gradient is known in closed form.
#include <gtest/gtest.h>

#include <cmath>

#include "diffuse/sample/denoiser.h"
#include "diffuse/sample/sampling.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {

double max_abs(const torch::Tensor& x) { return x.abs().max().item<double>(); }

torch::Tensor t64(std::vector<double> v, std::vector<int64_t> shape) {
  return torch::tensor(v, torch::kFloat64).reshape(shape);
}

// Ideal x0 network for data N(mu, s0^2 I), as in sampling_test.cpp.
Network gaussian_x0_network(const Schedule& sch, torch::Tensor mu, double s0) {
  return [sch, mu, s0](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning&) {
    const int64_t t = int64_t(std::llround(tc[0].item<double>()));
    const double a = sch.a_at(t), s = sch.s_at(t);
    return torch::Tensor(mu + (a * s0 * s0 / (a * a * s0 * s0 + s * s)) * (x - a * mu));
  };
}

// logits = x_flat W^T + b, so grad_x log softmax_y = W_y - sum_c p_c W_c.
struct LinearClassifier {
  torch::Tensor W, b;  // [C, D], [C]
  int64_t* calls = nullptr;
  Classifier fn() const {
    auto W_ = W, b_ = b;
    auto calls_ = calls;
    return [W_, b_, calls_](const torch::Tensor& x, const torch::Tensor& t) {
      EXPECT_EQ(t.scalar_type(), torch::kLong);
      if (calls_) ++*calls_;
      return torch::Tensor(torch::matmul(x.flatten(1), W_.t()) + b_);
    };
  }
  torch::Tensor grad(const torch::Tensor& x, const torch::Tensor& y) const {
    auto p = torch::softmax(torch::matmul(x.flatten(1), W.t()) + b, 1);
    return (W.index_select(0, y) - torch::matmul(p, W)).reshape(x.sizes());
  }
};

LinearClassifier make_classifier(int64_t classes, int64_t d) {
  auto W = torch::linspace(-1.0, 1.0, classes * d, torch::kFloat64).reshape({classes, d}).sin() * 2.0;
  return {W, torch::linspace(-0.5, 0.5, classes, torch::kFloat64)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Classifier-free guidance

// Algorithm 2 of Lin et al. 2023 by hand, w = 3, phi = 0.7, unbiased std per sample over C, H, W:
//   sample 0: cfg = 3 {1,3,1,3} = {3,9,3,9}, std ratio 1/3, factor 0.7/3 + 0.3 = 0.5333.. -> {1.6,4.8,1.6,4.8}
//   sample 1: cfg = 1 + 3 {1,1,3,3} = {4,4,10,10}, std ratio 1/3 -> {2.1333.., 2.1333.., 5.3333.., 5.3333..}
//   sample 2: cfg = {3,2,1,0} + 3 ({0,1,2,3} - {3,2,1,0}) = {-6,-1,4,9}; std(cond) = sqrt(5/3),
//             std(cfg) = sqrt(125/3), ratio 0.2, factor 0.7 * 0.2 + 0.3 = 0.44 -> {-2.64, -0.44, 1.76, 3.96}
TEST(CfgRescale, MatchesHandComputation) {
  auto cond = t64({1, 3, 1, 3, 2, 2, 4, 4, 0, 1, 2, 3}, {3, 1, 2, 2});
  auto uncond = t64({0, 0, 0, 0, 1, 1, 1, 1, 3, 2, 1, 0}, {3, 1, 2, 2});
  auto want = t64({1.6, 4.8, 1.6, 4.8, 32.0 / 15, 32.0 / 15, 80.0 / 15, 80.0 / 15, -2.64, -0.44, 1.76, 3.96},
                  {3, 1, 2, 2});
  EXPECT_LT(max_abs(cfg_combine(cond, uncond, 3.0, 0.7) - want), 1e-12);
  // phi = 0 is plain CFG; phi = 1 restores the conditional output's std exactly.
  auto plain = uncond + 3.0 * (cond - uncond);
  EXPECT_LT(max_abs(cfg_combine(cond, uncond, 3.0, 0.0) - plain), 1e-12);
  auto full = cfg_combine(cond, uncond, 3.0, 1.0);
  EXPECT_LT(max_abs(full.std({1, 2, 3}) - cond.std({1, 2, 3})), 1e-12);
  // w = 1 is the conditional output, w = 0 the unconditional one, whatever phi.
  EXPECT_LT(max_abs(cfg_combine(cond, uncond, 1.0, 0.7) - cond), 1e-12);
  EXPECT_LT(max_abs(cfg_combine(cond, uncond, 0.0, 0.0) - uncond), 1e-12);
  // A constant guided output is left as it is instead of becoming NaN.
  auto flat = torch::ones({1, 1, 2, 2}, torch::kFloat64);
  EXPECT_TRUE(torch::isfinite(cfg_combine(flat, flat * 0, 2.0, 0.7)).all().item<bool>());
}

// The conditional and unconditional passes are one network call on the batch [x; x], labels [y; null].
TEST(ClassifierFreeGuidance, OneBatchedCallWithTheNullLabel) {
  int64_t calls = 0;
  torch::Tensor seen_labels, seen_t;
  Network net = [&](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    ++calls;
    seen_labels = labels;
    seen_t = tc;
    auto scale = (1.0 + labels.to(torch::kFloat64)).view({-1, 1, 1, 1});
    return torch::Tensor(x * scale + x * x * 0.1 + tc.to(torch::kFloat64).view({-1, 1, 1, 1}) / 1000.0);
  };
  auto x = make_noise({1, 3, 3}, 2, 7).to(torch::kFloat64);
  auto labels = torch::tensor({2, 5}, torch::kLong);
  auto tc = torch::full({2}, 321.0, torch::kFloat32);
  auto guided = classifier_free_guidance(net, {7.5, 0.7, 10});
  auto out = guided(x, tc, labels);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(torch::equal(seen_labels, torch::tensor({2, 5, 10, 10}, torch::kLong)));
  EXPECT_EQ(seen_t.size(0), 4);
  auto cond = net(x, tc, labels), uncond = net(x, tc, torch::full({2}, 10, torch::kLong));
  EXPECT_LT(max_abs(out - cfg_combine(cond, uncond, 7.5, 0.7)), 1e-12);

  calls = 0;
  auto same = classifier_free_guidance(net, {1.0, 0.7, 10})(x, tc, labels);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen_labels.size(0), 2);  // w = 1 needs no unconditional pass
  EXPECT_LT(max_abs(same - cond), 1e-15);

  // Without a null label, labels cannot be guided (a text context brings its own unconditional half instead).
  EXPECT_THROW(classifier_free_guidance(net, {7.5, 0.7, -1})(x, tc, labels), std::invalid_argument);
  EXPECT_THROW(classifier_free_guidance(net, {7.5, 1.5, 10}), std::invalid_argument);
  EXPECT_THROW(guided(x, tc, torch::Tensor()), std::invalid_argument);
}

// Inside a sampler: one network call per step, on twice the batch, for any prediction type.
TEST(ClassifierFreeGuidance, SamplesWithOneCallPerStep) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  int64_t calls = 0, batch = 0;
  Network net = [&](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    ++calls;
    batch = x.size(0);
    return torch::Tensor(0.5 * x + 0.1 * labels.to(x.dtype()).view({-1, 1}));
  };
  auto labels = torch::tensor({0, 1, 2}, torch::kLong);
  auto d = make_denoiser(classifier_free_guidance(net, {5.0, 0.7, 3}), Prediction::v, sch, {}, labels);
  auto x = sample_dpmpp_2m(d, spaced_timesteps(1000, 12, Spacing::trailing), make_noise({4}, 3, 1));
  EXPECT_EQ(calls, 12);
  EXPECT_EQ(batch, 6);
  EXPECT_TRUE(torch::isfinite(x).all().item<bool>());
}

// ---------------------------------------------------------------------------------------------------
// Classifier guidance

TEST(ClassifierGuidance, GradientOfLogProbabilityIsExact) {
  auto clf = make_classifier(3, 6);
  auto x = make_noise({1, 2, 3}, 4, 11).to(torch::kFloat64);
  auto y = torch::tensor({0, 1, 2, 1}, torch::kLong);
  auto g = classifier_log_prob_grad(clf.fn(), x, 400, y);
  EXPECT_EQ(g.sizes(), x.sizes());
  EXPECT_FALSE(g.requires_grad());
  EXPECT_LT(max_abs(g - clf.grad(x, y)), 1e-12);
  // Sign: a small step along the gradient raises log p(y | x) by |g|^2 * step to first order.
  auto log_p = [&](const torch::Tensor& z) {
    return torch::log_softmax(torch::matmul(z.flatten(1), clf.W.t()) + clf.b, 1).gather(1, y.view({-1, 1})).view(-1);
  };
  const double step = 1e-6;
  auto gain = (log_p(x + step * g) - log_p(x)) / step;
  EXPECT_LT(max_abs(gain - g.flatten(1).pow(2).sum(1)), 1e-4);
  EXPECT_TRUE((gain > 0).all().item<bool>());
  // Works under NoGradGuard, as inside samplers.
  torch::NoGradGuard no_grad;
  EXPECT_LT(max_abs(classifier_log_prob_grad(clf.fn(), x, 400, y) - clf.grad(x, y)), 1e-12);
  EXPECT_THROW(classifier_log_prob_grad(clf.fn(), x, 400, torch::tensor({0, 1, 3, 1}, torch::kLong)),
               std::invalid_argument);
}

// eps' = eps - scale s grad, x0' = x0 + scale (s^2 / a) grad (Dhariwal & Nichol 2021, eq. 14 with Tweedie's
// x0 = (x + s^2 score) / a); the pair stays consistent. At SNR 0 the classifier is not consulted.
TEST(ClassifierGuidance, ShiftsTheScoreByScaleTimesGradient) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto mu = torch::linspace(-1.0, 1.0, 6, torch::kFloat64);
  auto base = make_denoiser(gaussian_x0_network(sch, mu, 0.5), Prediction::x0, sch);
  int64_t calls = 0;
  auto clf = make_classifier(3, 6);
  clf.calls = &calls;
  auto y = torch::tensor({2, 0}, torch::kLong);
  const double scale = 3.0;
  auto guided = classifier_guidance(base, clf.fn(), y, scale);
  auto x = make_noise({6}, 2, 3).to(torch::kFloat64);
  for (int64_t t : {10, 500, 998}) {
    const double a = sch.a_at(t), s = sch.s_at(t);
    auto e = base(x, t), eg = guided(x, t);
    auto g = clf.grad(x, y);
    EXPECT_LT(max_abs(eg.eps - (e.eps - scale * s * g)), 1e-12) << t;
    EXPECT_LT(max_abs(eg.x0 - (e.x0 + scale * s * s / a * g)), 1e-9) << t;
    EXPECT_LT(max_abs(a * eg.x0 + s * eg.eps - x), 1e-12) << t;
  }
  EXPECT_EQ(calls, 3);
  auto e999 = base(x, 999), eg999 = guided(x, 999);
  EXPECT_EQ(calls, 3);
  EXPECT_TRUE(torch::equal(e999.x0, eg999.x0));
  EXPECT_TRUE(torch::equal(e999.eps, eg999.eps));
}

// A class outside the classifier's is refused at the first guided step (the only step that checks the range).
TEST(ClassifierGuidance, RefusesAClassOutsideTheClassifiersAtTheFirstStep) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto base = make_denoiser(gaussian_x0_network(sch, torch::zeros({6}, torch::kFloat64), 0.5), Prediction::x0, sch);
  auto guided = classifier_guidance(base, make_classifier(3, 6).fn(), torch::tensor({0, 3}, torch::kLong), 2.0);
  auto x = make_noise({6}, 2, 3).to(torch::kFloat64);
  EXPECT_NO_THROW(guided(x, 999));  // SNR 0: the classifier is not consulted
  try {
    guided(x, 500);
    ADD_FAILURE() << "class 3 of a 3-class classifier was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("outside the classifier's 3 classes"), std::string::npos) << e.what();
  }
}

// DDPM sees the guidance as a posterior-mean shift of (a' beta / a) scale grad: same noise, two runs.
TEST(ClassifierGuidance, DdpmMeanShift) {
  auto sch = linear(1000);
  auto mu = torch::linspace(-1.0, 1.0, 6, torch::kFloat64);
  auto base = make_denoiser(gaussian_x0_network(sch, mu, 0.5), Prediction::x0, sch);
  auto clf = make_classifier(3, 6);
  auto y = torch::tensor({1, 2}, torch::kLong);
  auto guided = classifier_guidance(base, clf.fn(), y, 2.0);
  auto x = make_noise({6}, 2, 3).to(torch::kFloat64);
  torch::Tensor first[2];
  for (int i = 0; i < 2; ++i) {
    SamplerOptions o;
    o.seed = 4;
    o.callback = [&](const StepInfo& info) {
      if (info.step == 0) first[i] = info.x;
    };
    sample_ddpm(i == 0 ? base : guided, {600, 300}, x, o);
  }
  const double a = sch.a_at(600), a1 = sch.a_at(300);
  const double beta = 1.0 - sch.alpha_bar_at(600) / sch.alpha_bar_at(300);
  EXPECT_LT(max_abs(first[1] - first[0] - (a1 * beta / a) * 2.0 * clf.grad(x, y)), 1e-9);
}

// End to end: guided samples score higher on the target class, with or without classifier-free guidance,
// from SNR 0, for every sampler.
TEST(ClassifierGuidance, RaisesTheTargetClassProbabilityAndComposesWithCfg) {
  auto sch = rescale_zero_terminal_snr(linear(1000));
  auto mu = torch::zeros({6}, torch::kFloat64);
  auto clf = make_classifier(3, 6);
  const int64_t n = 64;
  auto y = torch::full({n}, 1, torch::kLong);
  auto x_T = make_noise({6}, n, 5).to(torch::kFloat64);
  auto log_p = [&](const torch::Tensor& z) {
    return torch::log_softmax(torch::matmul(z, clf.W.t()) + clf.b, 1).select(1, 1).mean().item<double>();
  };
  int64_t net_calls = 0;
  auto ideal = gaussian_x0_network(sch, mu, 0.5);
  Network conditional = [&](const torch::Tensor& x, const torch::Tensor& tc, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    ++net_calls;
    return ideal(x, tc, labels);
  };
  auto ts = spaced_timesteps(1000, 20, Spacing::trailing);
  for (const auto& name : sampler_names()) {
    if (!runs_from_snr_zero(name)) continue;  // plms, pndm, heun_sigma, lms: Plms.*, DiffusersParity040Classes.*
    auto plain = make_denoiser(conditional, Prediction::x0, sch, {}, y);
    auto with_cfg = make_denoiser(classifier_free_guidance(conditional, {3.0, 0.7, 2}), Prediction::x0, sch, {}, y);
    SamplerOptions o;
    o.seed = 1;
    const double unguided = log_p(get_sampler(name)(plain, ts, x_T, o));
    const double guided = log_p(get_sampler(name)(classifier_guidance(plain, clf.fn(), y, 1.0), ts, x_T, o));
    net_calls = 0;
    auto both = get_sampler(name)(classifier_guidance(with_cfg, clf.fn(), y, 1.0), ts, x_T, o);
    EXPECT_GT(guided, unguided + 0.1) << name;
    EXPECT_GT(log_p(both), unguided + 0.1) << name;
    EXPECT_TRUE(torch::isfinite(both).all().item<bool>()) << name;
    EXPECT_EQ(net_calls, name == "heun" ? 39 : 20) << name;
  }
}

// ---------------------------------------------------------------------------------------------------
// Clipping the x0 estimate (clip_sample)

// An eps network that is off by 0.05 at t = 999 of the linear schedule: x0 = (x_t - s eps) / a turns that into
// an x0 error of 0.05 s / a (about 7.9) per pixel; clip_x0 clamps x0 to [-1, 1] and recomputes eps from it.
TEST(ClipX0, ClampsX0AndKeepsThePairConsistent) {
  auto sch = linear(1000);
  auto x0_true = torch::linspace(-0.9, 0.9, 8, torch::kFloat64).reshape({2, 1, 2, 2});
  auto eps_true = torch::linspace(1.0, -1.0, 8, torch::kFloat64).reshape({2, 1, 2, 2});
  Network off = [&](const torch::Tensor& x, const torch::Tensor&, const diffuse::Conditioning&) {
    return torch::Tensor(eps_true + 0.05);
  };
  auto plain = make_denoiser(off, Prediction::eps, sch);
  auto clipped = clip_x0(plain, 1.0, diffuse::ClipEps::recompute);
  // The default is diffusers' DDIM meaning: x0 clamped, the network's eps kept.
  {
    auto kept = clip_x0(plain, 1.0);
    const double a = sch.a_at(999), s = sch.s_at(999);
    auto x_t = a * x0_true + s * eps_true;
    EXPECT_TRUE(torch::equal(kept(x_t, 999).eps, plain(x_t, 999).eps));
    EXPECT_LE(max_abs(kept(x_t, 999).x0), 1.0);
  }
  for (int64_t t : {0, 500, 999}) {
    const double a = sch.a_at(t), s = sch.s_at(t);
    auto x_t = a * x0_true + s * eps_true;
    auto e = plain(x_t, t), c = clipped(x_t, t);
    auto want_x0 = ((x_t - s * (eps_true + 0.05)) / a).clamp(-1.0, 1.0);
    EXPECT_LT(max_abs(c.x0 - want_x0), 1e-9) << t;
    EXPECT_LT(max_abs(a * c.x0 + s * c.eps - x_t), 1e-12) << t;  // consistent pair
    EXPECT_LE(max_abs(c.x0), 1.0) << t;
    if (t == 999) {
      EXPECT_GT(max_abs(e.x0), 5.0);  // unclipped: the amplified error
    }
    if (max_abs(e.x0) <= 1.0) EXPECT_LT(max_abs(c.x0 - e.x0), 1e-12) << t;  // inside the range: unchanged
  }
  EXPECT_THROW(clip_x0(plain, 0.0), std::invalid_argument);
}

namespace {
// Classifier-free guidance on a text context: one call on [x; x] with contexts [context; uncond_context], combined
// by cfg_combine; a context without its unconditional half is refused.
TEST(ClassifierFreeGuidance, TextContextBatchesThePromptAndTheNegativePrompt) {
  using namespace diffuse;
  torch::Tensor seen;
  Network net = [&](const torch::Tensor& x, const torch::Tensor&, const Conditioning& c) {
    seen = c.context;
    return torch::Tensor(x + c.context.mean({1, 2}).view({-1, 1, 1, 1}));
  };
  auto x = torch::randn({2, 4, 3, 3});
  auto tc = torch::full({2}, 500.0f);
  auto context = torch::randn({2, 5, 8}), negative = torch::randn({2, 5, 8});
  auto guided = classifier_free_guidance(net, {5.0, 0.0, -1});
  auto out = guided(x, tc, Conditioning::text(context, negative));
  ASSERT_EQ(seen.size(0), 4);
  EXPECT_TRUE(torch::equal(seen, torch::cat({context, negative})));
  auto cond = net(x, tc, Conditioning::text(context)), uncond = net(x, tc, Conditioning::text(negative));
  EXPECT_LT((out - cfg_combine(cond, uncond, 5.0, 0.0)).abs().max().item<double>(), 1e-6);
  EXPECT_THROW(guided(x, tc, Conditioning::text(context)), std::invalid_argument);
}
}  // namespace
