// Distribution metrics on feature vectors and image statistics. All computed in float64 on the
// features' device; inputs are [N, D] feature matrices (or [N] values for the 1-D statistics).
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace diffuse {

/// Mean and covariance of features (unbiased covariance, float64), cached as reference statistics.
struct FeatureStats {
  torch::Tensor mean;  ///< [D]
  torch::Tensor cov;   ///< [D, D]
  int64_t count = 0;
};
/// Throws std::invalid_argument when there are fewer than 2 samples or the shape is not [N, D].
FeatureStats feature_stats(const torch::Tensor& features);

/// Fréchet distance between Gaussians (Heusel et al. 2017, eq. 6):
/// ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), with Tr((S1 S2)^{1/2}) computed as the sum of
/// square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2} (symmetric PSD, float64 eigh).
double frechet_distance(const FeatureStats& a, const FeatureStats& b);

/// Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
/// k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of `subset_size` from each set.
struct KidResult {
  double mean = 0, std = 0;
};
KidResult kernel_distance(const torch::Tensor& real, const torch::Tensor& fake, int64_t subsets = 100,
                          int64_t subset_size = 1000, uint64_t seed = 0);
/// Unbiased MMD^2 of one pair of sets with the cubic polynomial kernel.
double mmd2_polynomial(const torch::Tensor& x, const torch::Tensor& y);

/// Inception-Score analogue (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) from class
/// probabilities [N, C] (rows sum to 1), over `splits` equal splits: mean and std.
struct ScoreResult {
  double mean = 0, std = 0;
};
ScoreResult inception_score(const torch::Tensor& probs, int64_t splits = 10);

/// Improved precision and recall (Kynkäänniemi et al. 2019): a sample is inside a manifold when it
/// lies within the distance to the k-th nearest neighbour of some point of the other set.
struct PrecisionRecall {
  double precision = 0, recall = 0;
};
PrecisionRecall precision_recall(const torch::Tensor& real, const torch::Tensor& fake, int64_t k = 3);

/// 1-Wasserstein distance between two 1-D empirical distributions (integral of |F1 - F2|).
double wasserstein1(const torch::Tensor& a, const torch::Tensor& b);
/// Share of `samples` that fall below the 10% quantile and above the 90% quantile of `data`.
struct DecileCoverage {
  double darkest = 0, brightest = 0;  ///< 0.1 each when the distributions agree
};
DecileCoverage extreme_decile_share(const torch::Tensor& data, const torch::Tensor& samples);

}  // namespace diffuse
