#include "diffuse/eval/analysis.h"

#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

#include "diffuse/core/noise.h"

namespace diffuse {

// ---------------------------------------------------------------- brightness

torch::Tensor image_brightness(const torch::Tensor& images) {
  if (!images.defined() || images.dim() < 1 || images.size(0) == 0)
    throw std::invalid_argument("brightness needs a non-empty batch of images [N, ...]");
  auto x = images.to(torch::kCPU, torch::kFloat64);
  return x.dim() == 1 ? x : x.flatten(1).mean(1);
}

BrightnessReport compare_brightness(const torch::Tensor& data, const torch::Tensor& samples, int64_t bins, double lo,
                                    double hi) {
  if (bins < 1 || !(hi > lo)) throw std::invalid_argument("brightness histogram needs bins >= 1 and hi > lo");
  auto d = image_brightness(data), s = image_brightness(samples);
  BrightnessReport r;
  r.data_count = d.numel();
  r.sample_count = s.numel();
  r.data_mean = d.mean().item<double>();
  r.sample_mean = s.mean().item<double>();
  r.data_std = d.std(/*unbiased=*/false).item<double>();
  r.sample_std = s.std(/*unbiased=*/false).item<double>();
  r.w1 = wasserstein1(d, s);
  r.share = extreme_decile_share(d, s);
  r.data_p10 = d.quantile(0.1).item<double>();
  r.data_p90 = d.quantile(0.9).item<double>();
  const double width = (hi - lo) / double(bins);
  for (int64_t i = 0; i <= bins; ++i) r.bin_edges.push_back(lo + width * double(i));
  auto density = [&](const torch::Tensor& v) {
    // Bin i holds [edge_i, edge_i+1); the last bin also holds hi.
    auto idx = ((v - lo) / width).floor().to(torch::kLong);
    auto inside = (v >= lo).logical_and(v <= hi);
    idx = idx.clamp(0, bins - 1).masked_select(inside);
    auto counts = torch::zeros({bins}, torch::kFloat64).index_add_(0, idx, torch::ones({idx.numel()}, torch::kFloat64));
    counts = counts / (double(v.numel()) * width);
    return std::vector<double>(counts.data_ptr<double>(), counts.data_ptr<double>() + bins);
  };
  r.data_density = density(d);
  r.sample_density = density(s);
  return r;
}

// ---------------------------------------------------------------- loss per timestep

namespace {

struct Noised {
  torch::Tensor x0, eps, x_t, a, s;
};

// x0[first : first + n] noised at `level` with image i's fixed noise (make_noise stream 0: independent of t and batching).
Noised noise_at(const torch::Tensor& x0_all, int64_t first, int64_t n, const Level& level, uint64_t seed) {
  Noised r;
  r.x0 = x0_all.slice(0, first, first + n).to(torch::kFloat32);
  auto shape = r.x0.sizes().slice(1);
  r.eps = make_noise(shape, n, seed, first).to(r.x0.device());
  r.a = torch::scalar_tensor(level.a, torch::kFloat64);
  r.s = torch::scalar_tensor(level.s, torch::kFloat64);
  r.x_t = add_noise(r.x0, r.eps, level.a, level.s);
  return r;
}

// The network's time condition at `level` (the E-TSDM map of its t).
double condition_at(const EtsdmConfig& etsdm, const Level& level) {
  return etsdm.condition(torch::full({1}, level.t, torch::kFloat64)).item<double>();
}

void check_inputs(const torch::Tensor& x0, const torch::Tensor& labels, const NoisePath& path,
                  const std::vector<int64_t>& ts, const LossOptions& o) {
  if (!x0.defined() || x0.dim() < 2 || x0.size(0) == 0) throw std::invalid_argument("the analysis needs images [N, ...]");
  if (labels.defined() && labels.numel() != x0.size(0))
    throw std::invalid_argument(std::to_string(labels.numel()) + " labels for " + std::to_string(x0.size(0)) + " images");
  if (o.batch < 1) throw std::invalid_argument("batch must be >= 1");
  for (auto t : ts)
    if (t < 0 || t >= path.T())
      throw std::invalid_argument("timestep " + std::to_string(t) + " outside [0, " + std::to_string(path.T() - 1) + "]");
}

double squared_sum(const torch::Tensor& d) { return d.to(torch::kFloat64).pow(2).sum().item<double>(); }

}  // namespace

std::vector<LossRow> loss_per_timestep(const Network& net, Prediction prediction, const NoisePath& path,
                                       const EtsdmConfig& etsdm, const torch::Tensor& x0, const torch::Tensor& labels,
                                       const std::vector<int64_t>& timesteps, const LossOptions& o) {
  check_inputs(x0, labels, path, timesteps, o);
  torch::NoGradGuard no_grad;
  const int64_t n = x0.size(0);
  const double elements = double(x0.numel());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<LossRow> rows;
  for (auto t : timesteps) {
    const Level level = path.level(t);
    LossRow row;
    row.t = t;
    row.condition = condition_at(etsdm, level);
    row.snr = level.a * level.a / (level.s * level.s);
    // An eps error d is an x0 error -s d / a and a v error (a^2 + s^2) d / a (1 / a on a VP path: (SNR + 1) / SNR).
    const double norm = level.a * level.a + level.s * level.s;
    row.ratio_predicted = level.a > 0 ? norm * norm / (level.a * level.a) : std::numeric_limits<double>::infinity();
    double own = 0, e_eps = 0, e_v = 0, e_x0 = 0;
    bool has_x0 = true;
    for (int64_t first = 0; first < n; first += o.batch) {
      int64_t count = std::min(o.batch, n - first);
      auto b = noise_at(x0, first, count, level, o.seed);
      auto y = labels.defined() ? labels.slice(0, first, first + count) : labels;
      auto out = call_network(net, etsdm, b.x_t, level.t, y);
      own += squared_sum(out - target(prediction, b.x0, b.eps, b.a, b.s));
      e_eps += squared_sum(to_eps(prediction, out, b.x_t, b.a, b.s) - b.eps);
      // An eps output at a_t = 0 carries nothing about x0 (and so v): convert() refuses it.
      if (prediction == Prediction::eps && level.a == 0.0) {
        has_x0 = false;
        continue;
      }
      e_v += squared_sum(to_v(prediction, out, b.x_t, b.a, b.s) - target(Prediction::v, b.x0, b.eps, b.a, b.s));
      e_x0 += squared_sum(to_x0(prediction, out, b.x_t, b.a, b.s) - b.x0);
    }
    row.loss_own = own / elements;
    row.loss_eps = e_eps / elements;
    row.loss_v = has_x0 ? e_v / elements : nan;
    row.loss_x0 = has_x0 ? e_x0 / elements : nan;
    row.ratio_measured = row.loss_v / row.loss_eps;
    rows.push_back(row);
  }
  return rows;
}

std::vector<int64_t> loss_timestep_grid(int64_t T, int64_t points) {
  if (T < 1 || points < 2) throw std::invalid_argument("the loss grid needs T >= 1 and at least 2 points");
  std::set<int64_t> ts;
  for (int64_t i = 0; i < points; ++i) {
    double u = -M_PI / 2 + M_PI * double(i) / double(points - 1);  // arcsine spacing: dense at both ends
    ts.insert(std::llround((std::sin(u) + 1.0) / 2.0 * double(T - 1)));
  }
  return {ts.begin(), ts.end()};
}

// ---------------------------------------------------------------- Lipschitz constant

std::vector<LipschitzRow> lipschitz_per_timestep(const Network& net, Prediction prediction, const NoisePath& path,
                                                 const EtsdmConfig& etsdm, const torch::Tensor& x0,
                                                 const torch::Tensor& labels,
                                                 const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                                 const LossOptions& o) {
  std::vector<int64_t> all;
  for (auto [t, t2] : pairs) {
    if (t == t2) throw std::invalid_argument("K(t, t') needs t != t', got t = t' = " + std::to_string(t));
    all.push_back(t);
    all.push_back(t2);
  }
  check_inputs(x0, labels, path, all, o);
  torch::NoGradGuard no_grad;
  const int64_t n = x0.size(0);
  std::vector<LipschitzRow> rows;
  for (auto [t, t2] : pairs) {
    const Level l1 = path.level(t), l2 = path.level(t2);
    LipschitzRow row;
    row.t = t;
    row.t2 = t2;
    row.condition = condition_at(etsdm, l1);
    row.condition2 = condition_at(etsdm, l2);
    auto a2 = torch::scalar_tensor(l2.a, torch::kFloat64);
    auto s2 = torch::scalar_tensor(l2.s, torch::kFloat64);
    double norm_sum = 0;
    for (int64_t first = 0; first < n; first += o.batch) {
      int64_t count = std::min(o.batch, n - first);
      auto b = noise_at(x0, first, count, l1, o.seed);
      auto y = labels.defined() ? labels.slice(0, first, first + count) : labels;
      auto e1 = to_eps(prediction, call_network(net, etsdm, b.x_t, l1.t, y), b.x_t, b.a, b.s);
      auto e2 = to_eps(prediction, call_network(net, etsdm, b.x_t, l2.t, y), b.x_t, a2, s2);
      norm_sum += (e1 - e2).to(torch::kFloat64).flatten(1).norm(2, 1).sum().item<double>();
    }
    row.K = norm_sum / double(n) / double(std::llabs(t2 - t));
    rows.push_back(row);
  }
  return rows;
}

std::vector<std::pair<int64_t, int64_t>> lipschitz_grid(int64_t T, int64_t dt, int64_t dense_until, int64_t stride) {
  if (dt < 1 || dt >= T) throw std::invalid_argument("lipschitz grid: dt must lie in [1, T-1], got " + std::to_string(dt));
  if (stride < 1) throw std::invalid_argument("lipschitz grid: stride must be >= 1");
  std::vector<std::pair<int64_t, int64_t>> pairs;
  int64_t t = 0;
  for (; t < std::min(dense_until, T - dt); t += dt) pairs.emplace_back(t, t + dt);
  for (t = std::max<int64_t>(t, ((dense_until + stride - 1) / stride) * stride); t + dt < T; t += stride)
    pairs.emplace_back(t, t + dt);
  return pairs;
}

}  // namespace diffuse
