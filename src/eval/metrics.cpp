#include "diffuse/eval/metrics.h"

#include <stdexcept>
#include <string>

#include <torch/torch.h>

namespace diffuse {
namespace {

torch::Tensor as_matrix(const torch::Tensor& x, const char* what) {
  if (x.dim() != 2)
    throw std::invalid_argument(std::string(what) + " must be an [N, D] feature matrix, got " +
                                std::to_string(x.dim()) + "-D");
  return x.to(torch::kFloat64);
}

// Symmetric PSD square root through eigh; tiny negative eigenvalues from rounding are clamped.
torch::Tensor sqrtm_psd(const torch::Tensor& m) {
  auto [w, v] = at::linalg_eigh(m, "L");
  return (v * w.clamp_min(0).sqrt().unsqueeze(0)).matmul(v.transpose(0, 1));
}

torch::Tensor cubic_kernel(const torch::Tensor& x, const torch::Tensor& y) {
  return (x.matmul(y.transpose(0, 1)) / double(x.size(1)) + 1.0).pow(3);
}

}  // namespace

FeatureStats feature_stats(const torch::Tensor& features) {
  auto x = as_matrix(features, "features");
  if (x.size(0) < 2) throw std::invalid_argument("feature statistics need at least 2 samples, got " +
                                                 std::to_string(x.size(0)));
  FeatureStats s;
  s.count = x.size(0);
  s.mean = x.mean(0);
  auto c = x - s.mean;
  s.cov = c.transpose(0, 1).matmul(c) / double(s.count - 1);
  return s;
}

double frechet_distance(const FeatureStats& a, const FeatureStats& b) {
  if (a.mean.numel() != b.mean.numel())
    throw std::invalid_argument("feature dimensions differ: " + std::to_string(a.mean.numel()) + " and " +
                                std::to_string(b.mean.numel()));
  auto mean_a = a.mean.to(torch::kFloat64), mean_b = b.mean.to(b.mean.device(), torch::kFloat64);
  auto cov_a = a.cov.to(torch::kFloat64), cov_b = b.cov.to(cov_a.device(), torch::kFloat64);
  auto root_a = sqrtm_psd(cov_a);
  auto m = root_a.matmul(cov_b).matmul(root_a);
  m = 0.5 * (m + m.transpose(0, 1));
  auto tr_cross = at::linalg_eigvalsh(m, "L").clamp_min(0).sqrt().sum();
  auto d = (mean_a - mean_b.to(mean_a.device())).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_cross;
  return d.item<double>();
}

double mmd2_polynomial(const torch::Tensor& x_in, const torch::Tensor& y_in) {
  auto x = as_matrix(x_in, "real features"), y = as_matrix(y_in, "generated features").to(x.device());
  int64_t m = x.size(0), n = y.size(0);
  if (m < 2 || n < 2) throw std::invalid_argument("MMD needs at least 2 samples per set");
  auto kxx = cubic_kernel(x, x), kyy = cubic_kernel(y, y), kxy = cubic_kernel(x, y);
  // Unbiased estimator: drop the diagonals of the within-set terms.
  double sxx = (kxx.sum() - kxx.diagonal().sum()).item<double>() / double(m * (m - 1));
  double syy = (kyy.sum() - kyy.diagonal().sum()).item<double>() / double(n * (n - 1));
  double sxy = kxy.sum().item<double>() / double(m * n);
  return sxx + syy - 2.0 * sxy;
}

KidResult kernel_distance(const torch::Tensor& real, const torch::Tensor& fake, int64_t subsets,
                          int64_t subset_size, uint64_t seed) {
  auto x = as_matrix(real, "real features"), y = as_matrix(fake, "generated features");
  int64_t size = std::min({subset_size, x.size(0), y.size(0)});
  if (size < 2) throw std::invalid_argument("KID needs at least 2 samples in each set");
  auto gen = at::detail::createCPUGenerator(seed);
  std::vector<double> values;
  for (int64_t i = 0; i < subsets; ++i) {
    auto ix = torch::randperm(x.size(0), gen, torch::kLong).slice(0, 0, size).to(x.device());
    auto iy = torch::randperm(y.size(0), gen, torch::kLong).slice(0, 0, size).to(y.device());
    values.push_back(mmd2_polynomial(x.index_select(0, ix), y.index_select(0, iy)));
  }
  auto v = torch::tensor(values, torch::kFloat64);
  return {v.mean().item<double>(), subsets > 1 ? v.std().item<double>() : 0.0};
}

ScoreResult inception_score(const torch::Tensor& probs_in, int64_t splits) {
  auto p = as_matrix(probs_in, "class probabilities");
  if (splits < 1 || p.size(0) < splits)
    throw std::invalid_argument("inception score needs at least one sample per split (" +
                                std::to_string(p.size(0)) + " samples, " + std::to_string(splits) + " splits)");
  std::vector<double> scores;
  auto chunks = p.chunk(splits, 0);
  for (auto& c : chunks) {
    auto marginal = c.mean(0, true);
    // KL with the convention 0 log 0 = 0.
    auto kl = torch::where(c > 0, c * (c.log() - marginal.log()), torch::zeros_like(c)).sum(1);
    scores.push_back(std::exp(kl.mean().item<double>()));
  }
  auto v = torch::tensor(scores, torch::kFloat64);
  return {v.mean().item<double>(), splits > 1 ? v.std().item<double>() : 0.0};
}

namespace {
// Squared distance of each row of `ref` to its k-th nearest neighbour in `ref` (itself excluded).
torch::Tensor kth_radius2(const torch::Tensor& ref, int64_t k) {
  auto d = torch::cdist(ref, ref).pow(2);
  return std::get<0>(d.kthvalue(k + 1, 1));  // the first value is the point itself (distance 0)
}
// Share of `query` rows within some ball of `ref` (radius^2 per ref row).
double coverage(const torch::Tensor& ref, const torch::Tensor& radius2, const torch::Tensor& query) {
  auto d = torch::cdist(query, ref).pow(2);
  return (d <= radius2.unsqueeze(0)).any(1).to(torch::kFloat64).mean().item<double>();
}
}  // namespace

PrecisionRecall precision_recall(const torch::Tensor& real_in, const torch::Tensor& fake_in, int64_t k) {
  auto real = as_matrix(real_in, "real features"), fake = as_matrix(fake_in, "generated features").to(real.device());
  if (real.size(0) <= k || fake.size(0) <= k)
    throw std::invalid_argument("precision/recall with k = " + std::to_string(k) + " needs more than k samples per set");
  PrecisionRecall pr;
  pr.precision = coverage(real, kth_radius2(real, k), fake);
  pr.recall = coverage(fake, kth_radius2(fake, k), real);
  return pr;
}

double wasserstein1(const torch::Tensor& a_in, const torch::Tensor& b_in) {
  auto a = std::get<0>(a_in.flatten().to(torch::kCPU, torch::kFloat64).sort());
  auto b = std::get<0>(b_in.flatten().to(torch::kCPU, torch::kFloat64).sort());
  if (a.numel() == 0 || b.numel() == 0) throw std::invalid_argument("W1 needs non-empty samples");
  // Integrate |F_a(x) - F_b(x)| over the merged breakpoints.
  auto all = std::get<0>(torch::cat({a, b}).sort());
  auto fa = torch::searchsorted(a, all, false, true).to(torch::kFloat64) / double(a.numel());
  auto fb = torch::searchsorted(b, all, false, true).to(torch::kFloat64) / double(b.numel());
  auto widths = all.slice(0, 1) - all.slice(0, 0, -1);
  return ((fa - fb).abs().slice(0, 0, -1) * widths).sum().item<double>();
}

DecileCoverage extreme_decile_share(const torch::Tensor& data, const torch::Tensor& samples) {
  auto d = data.flatten().to(torch::kCPU, torch::kFloat64);
  auto s = samples.flatten().to(torch::kCPU, torch::kFloat64);
  if (d.numel() < 10 || s.numel() == 0) throw std::invalid_argument("decile shares need at least 10 data values");
  double lo = d.quantile(0.1).item<double>(), hi = d.quantile(0.9).item<double>();
  return {(s < lo).to(torch::kFloat64).mean().item<double>(), (s > hi).to(torch::kFloat64).mean().item<double>()};
}

}  // namespace diffuse
