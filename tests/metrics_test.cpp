#include <gtest/gtest.h>

#include "diffuse/eval/metrics.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {
FeatureStats gaussian_stats(const torch::Tensor& mean, const torch::Tensor& cov) { return {mean, cov, 1000}; }
}  // namespace

// For diagonal covariances the Fréchet distance is ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
TEST(Metrics, FrechetDiagonalClosedForm) {
  auto m1 = torch::tensor({0.0, 1.0, 2.0}, torch::kFloat64), m2 = torch::tensor({1.0, 1.0, 0.0}, torch::kFloat64);
  auto s1 = torch::tensor({1.0, 4.0, 9.0}, torch::kFloat64), s2 = torch::tensor({4.0, 4.0, 1.0}, torch::kFloat64);
  double want = 1 + 0 + 4 + (1 - 2) * (1 - 2) + 0 + (3 - 1) * (3 - 1);
  EXPECT_NEAR(frechet_distance(gaussian_stats(m1, s1.diag()), gaussian_stats(m2, s2.diag())), want, 1e-10);
}

// Rotating both Gaussians by one orthogonal matrix leaves the distance unchanged; identical stats give 0.
TEST(Metrics, FrechetRotationInvariantAndZeroOnSelf) {
  torch::manual_seed(0);
  auto q = std::get<0>(at::linalg_qr(torch::randn({6, 6}, torch::kFloat64)));
  auto s1 = torch::rand({6}, torch::kFloat64) + 0.1, s2 = torch::rand({6}, torch::kFloat64) + 0.1;
  auto m1 = torch::randn({6}, torch::kFloat64), m2 = torch::randn({6}, torch::kFloat64);
  double diag = frechet_distance(gaussian_stats(m1, s1.diag()), gaussian_stats(m2, s2.diag()));
  auto rot = [&](const torch::Tensor& s) { return q.matmul(s.diag()).matmul(q.t()); };
  double rotated = frechet_distance(gaussian_stats(q.matmul(m1), rot(s1)), gaussian_stats(q.matmul(m2), rot(s2)));
  EXPECT_NEAR(diag, rotated, 1e-9);
  auto x = torch::randn({200, 6}, torch::kFloat64);
  auto st = feature_stats(x);
  EXPECT_NEAR(frechet_distance(st, st), 0.0, 1e-9);
  EXPECT_THROW(feature_stats(torch::randn({1, 6})), std::invalid_argument);
  EXPECT_THROW(feature_stats(torch::randn({10})), std::invalid_argument);
}

// The unbiased MMD^2 against a direct triple loop over the kernel's definition.
TEST(Metrics, Mmd2MatchesDefinition) {
  torch::manual_seed(1);
  auto x = torch::randn({5, 3}, torch::kFloat64), y = torch::randn({4, 3}, torch::kFloat64) + 0.5;
  auto k = [](const torch::Tensor& a, const torch::Tensor& b) {
    return std::pow(a.dot(b).item<double>() / 3.0 + 1.0, 3);
  };
  double sxx = 0, syy = 0, sxy = 0;
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 5; ++j)
      if (i != j) sxx += k(x[i], x[j]);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      if (i != j) syy += k(y[i], y[j]);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 4; ++j) sxy += k(x[i], y[j]);
  double want = sxx / 20 + syy / 12 - 2 * sxy / 20;
  EXPECT_NEAR(mmd2_polynomial(x, y), want, 1e-10);
  // Same distribution: the unbiased estimate is centred on 0; shifted: clearly positive.
  auto a = torch::randn({4000, 8}, torch::kFloat64), b = torch::randn({4000, 8}, torch::kFloat64);
  auto same = kernel_distance(a, b, 20, 500);
  EXPECT_LT(std::abs(same.mean), 4 * same.std / std::sqrt(20.0) + 1e-3);
  EXPECT_GT(kernel_distance(a, b + 0.5, 20, 500).mean, 0.05);
}

TEST(Metrics, InceptionScoreBounds) {
  int C = 10, N = 1000;
  auto uniform = torch::full({N, C}, 1.0 / C, torch::kFloat64);
  EXPECT_NEAR(inception_score(uniform, 10).mean, 1.0, 1e-12);
  auto labels = torch::arange(N) % C;
  auto onehot = torch::one_hot(labels, C).to(torch::kFloat64);
  EXPECT_NEAR(inception_score(onehot, 10).mean, double(C), 1e-9);  // confident and evenly spread: C
  auto collapsed = torch::one_hot(torch::zeros({N}, torch::kLong), C).to(torch::kFloat64);
  EXPECT_NEAR(inception_score(collapsed, 10).mean, 1.0, 1e-12);
  EXPECT_THROW(inception_score(uniform.slice(0, 0, 5), 10), std::invalid_argument);
}

TEST(Metrics, PrecisionRecallOnKnownConfigurations) {
  torch::manual_seed(2);
  auto real = torch::randn({300, 4}, torch::kFloat64);
  auto same = precision_recall(real, real.clone(), 3);
  EXPECT_EQ(same.precision, 1.0);
  EXPECT_EQ(same.recall, 1.0);
  auto far = precision_recall(real, real + 100.0, 3);
  EXPECT_EQ(far.precision, 0.0);
  EXPECT_EQ(far.recall, 0.0);
  // Mode collapse: every generated sample sits next to real point 0. Precision stays 1, recall is the
  // share of real points inside the generated samples' tiny balls: point 0 alone.
  auto collapsed = real[0].unsqueeze(0) + 1e-3 * torch::randn({150, 4}, torch::kFloat64);
  auto pr = precision_recall(real, collapsed, 3);
  EXPECT_EQ(pr.precision, 1.0);
  EXPECT_NEAR(pr.recall, 1.0 / 300, 1e-12);
  EXPECT_THROW(precision_recall(real, real.slice(0, 0, 3), 3), std::invalid_argument);
}

TEST(Metrics, Wasserstein1AndDeciles) {
  auto a = torch::tensor({0.0, 1.0, 2.0, 3.0}, torch::kFloat64);
  EXPECT_NEAR(wasserstein1(a, a + 0.25), 0.25, 1e-12);  // a shift moves every quantile
  EXPECT_NEAR(wasserstein1(a, a), 0.0, 1e-15);
  // Unequal sizes: {0} against {0, 1}: F differs by 1/2 on [0, 1).
  EXPECT_NEAR(wasserstein1(torch::tensor({0.0}), torch::tensor({0.0, 1.0})), 0.5, 1e-12);
  torch::manual_seed(4);
  auto data = torch::rand({10000}, torch::kFloat64);
  auto same = extreme_decile_share(data, torch::rand({10000}, torch::kFloat64));
  EXPECT_NEAR(same.darkest, 0.1, 0.015);
  EXPECT_NEAR(same.brightest, 0.1, 0.015);
  auto middle = extreme_decile_share(data, torch::full({100}, 0.5, torch::kFloat64));
  EXPECT_EQ(middle.darkest, 0.0);
  EXPECT_EQ(middle.brightest, 0.0);
}
