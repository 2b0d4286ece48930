// The metrics of a sample set against the reference statistics, and their formats (diffuse/eval/features.h).
#include "diffuse/eval/features.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "diffuse/util/runtime.h"
#include "eval/features_internal.h"

namespace diffuse {

using detail::check_images;
using detail::device_of;

int64_t min_eval_samples(int64_t feature_dim) { return 2 * feature_dim; }

namespace {
// k-NN radii need sets of equal size (their scale depends on it); cdist of 5000 x 5000 float64 is 200 MB.
constexpr int64_t kMaxPrecisionRecall = 5000;

torch::Tensor seeded_subset(const torch::Tensor& x, int64_t count, uint64_t seed) {
  if (count >= x.size(0)) return x;
  auto idx = torch::randperm(x.size(0), cpu_generator(seed), torch::kLong).slice(0, 0, count);
  return x.index_select(0, idx.to(x.device()));
}
}  // namespace

MetricSet compute_metrics(const torch::Tensor& features, const torch::Tensor& probs, const torch::Tensor& labels,
                          const torch::Tensor& real_features, const FeatureStats& real_stats, const EvalOptions& o) {
  MetricSet m;
  m.count = features.size(0);
  m.reference_count = real_features.size(0);
  const int64_t minimum = min_eval_samples(features.size(1));
  if (m.count < minimum)
    throw std::invalid_argument(std::to_string(m.count) + " images are too few for a stable " +
                                std::to_string(features.size(1)) + "x" + std::to_string(features.size(1)) +
                                " feature covariance: FID-FMNIST needs at least " + std::to_string(minimum) +
                                " (2 x the feature dimension; 5000 or more for numbers to compare)");
  m.fid = frechet_distance(feature_stats(features), real_stats);
  m.kid = kernel_distance(real_features, features, o.kid_subsets, o.kid_subset_size, mix_seed(o.seed, 0x41d));
  m.inception = inception_score(probs, std::min(o.is_splits, m.count));
  int64_t n_pr = std::min({m.count, m.reference_count, kMaxPrecisionRecall});
  m.pr = precision_recall(seeded_subset(real_features, n_pr, mix_seed(o.seed, 0x9e1)),
                          seeded_subset(features, n_pr, mix_seed(o.seed, 0x9e2)), o.pr_k);
  if (labels.defined()) {
    auto l = labels.to(torch::kCPU, torch::kLong);
    auto valid = (l >= 0).logical_and(l < probs.size(1));
    m.labelled = valid.sum().item<int64_t>();
    if (m.labelled > 0)
      m.class_accuracy = probs.argmax(1).eq(l).logical_and(valid).sum().item<double>() / double(m.labelled);
  }
  return m;
}

EvalResult evaluate_samples(FeatureEvaluator& e, const torch::Tensor& images, const torch::Tensor& labels,
                            const EvalOptions& o) {
  check_images(e.net->config(), images);
  const int64_t minimum = min_eval_samples(e.net->config().feature_dim);
  if (images.size(0) < minimum)
    throw std::invalid_argument(std::to_string(images.size(0)) + " images are too few for a stable feature covariance: "
                                "FID-FMNIST needs at least " + std::to_string(minimum) +
                                " (2 x the feature dimension; 5000 or more for numbers to compare)");
  if (labels.defined() && labels.numel() != images.size(0))
    throw std::invalid_argument(std::to_string(labels.numel()) + " labels for " + std::to_string(images.size(0)) + " images");
  const auto& ref = e.reference;
  auto out = extract_features(e.net, images);
  EvalResult r;
  r.samples = compute_metrics(out.features, out.probs, labels, ref.features, ref.stats, o);

  // The floor: a fixed split of the reference into halves A and B; min(N, |A|) images of A play the samples.
  auto perm = torch::randperm(ref.features.size(0), cpu_generator(0xf100), torch::kLong);
  const int64_t half = ref.features.size(0) / 2;
  auto a = perm.slice(0, 0, half), b = perm.slice(0, half);
  a = a.slice(0, 0, std::min(half, images.size(0)));
  auto fa = ref.features.index_select(0, a), fb = ref.features.index_select(0, b);
  torch::Tensor pa;
  {
    torch::NoGradGuard no_grad;
    e.net->eval();
    auto device = device_of(*e.net);
    pa = torch::softmax(e.net->logits(fa.to(device)), 1).cpu();
  }
  if (fa.size(0) < minimum)
    throw std::invalid_argument("the reference has too few images (" + std::to_string(ref.features.size(0)) +
                                ") for the floor: it needs 2 x " + std::to_string(minimum));
  r.floor = compute_metrics(fa, pa, ref.labels.index_select(0, a), fb, feature_stats(fb), o);
  return r;
}

namespace {
nlohmann::json metric_json(const MetricSet& m) {
  nlohmann::json j = {{"count", m.count},
                      {"reference_count", m.reference_count},
                      {"fid_fmnist", m.fid},
                      {"kid_mean", m.kid.mean},
                      {"kid_std", m.kid.std},
                      {"is_fmnist_mean", m.inception.mean},
                      {"is_fmnist_std", m.inception.std},
                      {"precision", m.pr.precision},
                      {"recall", m.pr.recall},
                      {"labelled", m.labelled}};
  j["class_accuracy"] = m.class_accuracy >= 0 ? nlohmann::json(m.class_accuracy) : nlohmann::json(nullptr);
  return j;
}

std::string number(double v, int precision) {
  std::ostringstream s;
  s << std::setprecision(precision) << v;
  return s.str();
}

struct Row {
  std::string name, samples, floor;
};
std::vector<Row> rows(const EvalResult& r, bool pretty) {
  auto pm = [&](double m, double s) { return pretty ? number(m, 5) + " ± " + number(s, 2) : number(m, 8); };
  auto acc = [&](const MetricSet& m) { return m.class_accuracy >= 0 ? number(m.class_accuracy, pretty ? 4 : 8) : std::string(pretty ? "-" : ""); };
  std::vector<Row> v = {
      {"FID-FMNIST", number(r.samples.fid, pretty ? 5 : 10), number(r.floor.fid, pretty ? 5 : 10)},
      {"KID-FMNIST", pm(r.samples.kid.mean, r.samples.kid.std), pm(r.floor.kid.mean, r.floor.kid.std)},
      {"IS-FMNIST", pm(r.samples.inception.mean, r.samples.inception.std), pm(r.floor.inception.mean, r.floor.inception.std)},
      {"precision", number(r.samples.pr.precision, pretty ? 4 : 8), number(r.floor.pr.precision, pretty ? 4 : 8)},
      {"recall", number(r.samples.pr.recall, pretty ? 4 : 8), number(r.floor.pr.recall, pretty ? 4 : 8)},
      {"class_accuracy", acc(r.samples), acc(r.floor)},
      {"count", std::to_string(r.samples.count), std::to_string(r.floor.count)},
      {"reference_count", std::to_string(r.samples.reference_count), std::to_string(r.floor.reference_count)}};
  if (!pretty) {
    v.insert(v.begin() + 2, {"KID-FMNIST_std", number(r.samples.kid.std, 8), number(r.floor.kid.std, 8)});
    v.insert(v.begin() + 4, {"IS-FMNIST_std", number(r.samples.inception.std, 8), number(r.floor.inception.std, 8)});
  }
  return v;
}
}  // namespace

nlohmann::json to_json(const EvalResult& r) {
  return {{"samples", metric_json(r.samples)}, {"floor", metric_json(r.floor)}};
}

std::string to_csv(const EvalResult& r) {
  std::ostringstream s;
  s << "metric,samples,floor\n";
  for (const auto& row : rows(r, false)) s << row.name << "," << row.samples << "," << row.floor << "\n";
  return s.str();
}

std::string format_table(const EvalResult& r) {
  std::ostringstream s;
  s << std::left << std::setw(16) << "metric" << std::setw(26) << "samples"
    << "floor (real test half vs half)\n";
  for (const auto& row : rows(r, true)) {
    // "±" is two bytes but one column.
    int pad = 26 + (row.samples.find("±") != std::string::npos ? 1 : 0);
    s << std::setw(16) << row.name << std::setw(pad) << row.samples << row.floor << "\n";
  }
  return s.str();
}

}  // namespace diffuse
