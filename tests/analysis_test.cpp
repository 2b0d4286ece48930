// diffuse analyze: brightness statistics on constructed images, the loss per timestep of the exact denoiser of
// Gaussian data (closed form), K(t, t') of networks with a known t-derivative, and the CLI end to end.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "cli_util.h"
#include "diffuse/io/files.h"
#include "diffuse/eval/analysis.h"
#include "diffuse/io/image_io.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/core/scheduler_config.h"
#include "test_util.h"
#include <torch/torch.h>

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::fixture;
using diffuse::testing::run_cli;
using diffuse::testing::TempDir;

// Images of constant value d_i = -0.9 + 1.8 i / 99 against the same shifted by 0.1: W1 = 0.1; torch's linear
// quantiles put the data's 10% / 90% points at -0.72 / 0.72, so 5 shifted values lie below and 16 above.
TEST(AnalyzeBrightness, ConstructedImages) {
  auto values = torch::linspace(-0.9, 0.9, 100, torch::kFloat64);
  auto data = values.view({100, 1, 1, 1}).expand({100, 3, 4, 4}).contiguous();
  auto samples = (data + 0.1).clamp(-1, 1);
  auto r = compare_brightness(data, samples, 20);
  EXPECT_NEAR(r.w1, 0.1, 1e-12);
  EXPECT_NEAR(r.data_p10, -0.72, 1e-12);
  EXPECT_NEAR(r.data_p90, 0.72, 1e-12);
  EXPECT_DOUBLE_EQ(r.share.darkest, 0.05);
  EXPECT_DOUBLE_EQ(r.share.brightest, 0.16);  // d_i > 0.62: i = 84..99
  EXPECT_NEAR(r.sample_mean - r.data_mean, 0.1, 1e-12);
  // 100 evenly spaced values with step h: population variance (n^2 - 1) h^2 / 12; the shift keeps it.
  EXPECT_NEAR(r.data_std, std::sqrt(9999.0 / 12.0) * 1.8 / 99.0, 1e-12);
  EXPECT_NEAR(r.sample_std, r.data_std, 1e-12);
  ASSERT_EQ(r.bin_edges.size(), 21u);
  double mass_d = 0, mass_s = 0;
  for (size_t i = 0; i < 20; ++i) mass_d += r.data_density[i] * 0.1, mass_s += r.sample_density[i] * 0.1;
  EXPECT_NEAR(mass_d, 1.0, 1e-12);
  EXPECT_NEAR(mass_s, 1.0, 1e-12);
  EXPECT_EQ(r.sample_density[0], 0.0);  // no sample below -0.8
  EXPECT_GT(r.sample_density[19], 0.0);
  // The mean over channels: a colour image with channels (-1, 0, 1) has brightness 0.
  auto rgb = torch::tensor({-1.0, 0.0, 1.0}).view({1, 3, 1, 1}).expand({1, 3, 2, 2});
  EXPECT_NEAR(image_brightness(rgb)[0].item<double>(), 0.0, 1e-12);
  EXPECT_NE(error_of([] { compare_brightness(torch::zeros({0, 1, 2, 2}), torch::zeros({3, 1, 2, 2})); }), "");
}

namespace {

// Data x0 ~ N(0, sigma^2 I). The exact denoiser: E[eps | x_t] = s x_t / (a^2 sigma^2 + s^2), so per element
// E||eps - eps^||^2 = a^2 sigma^2 / (a^2 sigma^2 + s^2) and E||x0 - x0^||^2 = sigma^2 s^2 / (a^2 sigma^2 + s^2).
constexpr double kSigma = 0.5;

Network exact_network(const Schedule& schedule, Prediction prediction) {
  return [schedule, prediction](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning&) {
    int64_t step = std::llround(t[0].item<double>());
    double a = schedule.a_at(step), s = schedule.s_at(step), var = a * a * kSigma * kSigma + s * s;
    auto eps = x * (s / var);
    auto x0 = x * (a * kSigma * kSigma / var);
    auto at = torch::scalar_tensor(a, torch::kFloat64), st = torch::scalar_tensor(s, torch::kFloat64);
    return prediction == Prediction::eps ? eps : prediction == Prediction::x0 ? x0 : target(Prediction::v, x0, eps, at, st);
  };
}

torch::Tensor gaussian_data(int64_t n) {
  auto gen = at::detail::createCPUGenerator(7);
  return torch::randn({n, 1, 8, 8}, gen) * kSigma;
}

}  // namespace

TEST(AnalyzeLoss, ExactDenoiserOfGaussianDataMatchesClosedForm) {
  auto x0 = gaussian_data(2000);
  for (bool zero_snr : {false, true}) {
    auto schedule = zero_snr ? rescale_zero_terminal_snr(scaled_linear()) : linear();
    auto ts = loss_timestep_grid(schedule.T(), 12);
    for (auto p : {Prediction::eps, Prediction::v, Prediction::x0}) {
      if (zero_snr && p == Prediction::eps) continue;
      auto rows = loss_per_timestep(exact_network(schedule, p), p, schedule, {}, x0, {}, ts, {512, 3});
      ASSERT_EQ(rows.size(), ts.size());
      for (const auto& r : rows) {
        double a = schedule.a_at(r.t), s = schedule.s_at(r.t), var = a * a * kSigma * kSigma + s * s;
        double eps = a * a * kSigma * kSigma / var, x0e = kSigma * kSigma * s * s / var, v = eps + x0e;
        // 128000 squared Gaussian errors: relative standard error about 0.4%.
        EXPECT_NEAR(r.loss_eps, eps, 0.03 * eps + 1e-12) << to_string(p) << " t " << r.t;
        EXPECT_NEAR(r.loss_x0, x0e, 0.03 * x0e + 1e-12) << to_string(p) << " t " << r.t;
        EXPECT_NEAR(r.loss_v, v, 0.03 * v) << to_string(p) << " t " << r.t;
        double own = p == Prediction::eps ? r.loss_eps : p == Prediction::v ? r.loss_v : r.loss_x0;
        EXPECT_NEAR(r.loss_own, own, 1e-6 * own + 1e-12);
        // The 000 document's identity, exact for the converted errors of one model wherever SNR > 0.
        if (r.snr > 0) EXPECT_NEAR(r.ratio_measured / r.ratio_predicted, 1.0, 1e-4) << to_string(p) << " t " << r.t;
      }
      if (zero_snr) {  // at SNR 0: v = -x0, so L_v = L_x0 = sigma^2 and eps is exact
        EXPECT_EQ(rows.back().t, 999);
        EXPECT_NEAR(rows.back().loss_v, kSigma * kSigma, 0.03 * kSigma * kSigma);
        EXPECT_LT(rows.back().loss_eps, 1e-10);
        EXPECT_TRUE(std::isinf(rows.back().ratio_predicted));
      }
    }
  }
  // An eps model at SNR 0 says nothing about x0: those columns are NaN, the eps loss is measured.
  auto schedule = rescale_zero_terminal_snr(linear());
  auto rows = loss_per_timestep(exact_network(schedule, Prediction::eps), Prediction::eps, schedule, {}, x0.slice(0, 0, 64),
                                {}, {998, 999});
  EXPECT_TRUE(std::isnan(rows[1].loss_x0));
  EXPECT_TRUE(std::isnan(rows[1].loss_v));
  EXPECT_FALSE(std::isnan(rows[0].loss_x0));
  EXPECT_NEAR(rows[1].loss_eps, 0.0, 1e-10);
}

// The same closed forms on a rectified-flow path (a = 1 - sigma, s = sigma, the network conditioned on sigma T), for
// the exact flow model u = E[eps - x0 | x_t]: the eps and x0 errors as above, the v error sigma^2 (a^2 + s^2)^2 / var,
// so L_v / L_eps = (a^2 + s^2)^2 / a^2, what the row predicts.
TEST(AnalyzeLoss, RectifiedFlowPathMatchesClosedForm) {
  const int64_t T = 1000;
  const auto path = NoisePath::rectified_flow(T, 3.0);
  Network net = [T](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning&) {
    const double sigma = t[0].item<double>() / double(T), a = 1 - sigma, s = sigma, var = a * a * kSigma * kSigma + s * s;
    return x * (s / var) - x * (a * kSigma * kSigma / var);
  };
  auto x0 = gaussian_data(2000);
  auto ts = loss_timestep_grid(T, 12);
  auto rows = loss_per_timestep(net, Prediction::flow, path, {}, x0, {}, ts, {512, 3});
  ASSERT_EQ(rows.size(), ts.size());
  for (const auto& r : rows) {
    const double sigma = double(r.t + 1) / double(T), a = 1 - sigma, s = sigma, var = a * a * kSigma * kSigma + s * s;
    EXPECT_DOUBLE_EQ(r.condition, sigma * double(T));
    const double eps = a * a * kSigma * kSigma / var, x0e = kSigma * kSigma * s * s / var;
    const double v = kSigma * kSigma * std::pow(a * a + s * s, 2) / var;
    EXPECT_NEAR(r.loss_eps, eps, 0.03 * eps + 1e-12) << " t " << r.t;
    EXPECT_NEAR(r.loss_x0, x0e, 0.03 * x0e + 1e-12) << " t " << r.t;
    EXPECT_NEAR(r.loss_v, v, 0.03 * v) << " t " << r.t;
    EXPECT_NEAR(r.loss_own * s * s, r.loss_x0, 1e-4 * r.loss_x0) << " t " << r.t;  // x0^ - x0 = -s (u^ - u) on a + s = 1
    if (a > 0) EXPECT_NEAR(r.ratio_measured / r.ratio_predicted, 1.0, 1e-4) << " t " << r.t;
  }
  EXPECT_EQ(rows.back().t, T - 1);  // sigma 1: SNR 0, x0 known only as -u there
  EXPECT_TRUE(std::isinf(rows.back().ratio_predicted));
  // K(t, t') of the same model on the flow grid: finite, and the grid's ends are refused beyond T - 1.
  auto k = lipschitz_per_timestep(net, Prediction::flow, path, {}, x0.slice(0, 0, 16), {}, {{0, 1}, {500, 510}});
  EXPECT_TRUE(std::isfinite(k[0].K) && std::isfinite(k[1].K));
  EXPECT_DOUBLE_EQ(k[1].condition2, 511.0);
  EXPECT_NE(error_of([&] { loss_per_timestep(net, Prediction::flow, path, {}, x0, {}, {T}); }), "");
}

TEST(AnalyzeLoss, TimestepGrid) {
  auto g = loss_timestep_grid(1000, 50);
  EXPECT_EQ(g.front(), 0);
  EXPECT_EQ(g.back(), 999);
  EXPECT_TRUE(std::is_sorted(g.begin(), g.end()));
  EXPECT_EQ(std::adjacent_find(g.begin(), g.end()), g.end());
  EXPECT_LT(g[1] - g[0], g[25] - g[24]);  // denser at the ends
  EXPECT_EQ(loss_timestep_grid(10, 100).size(), 10u);
}

namespace {
// eps(x, c) = g(c) * 1 with g(c) = c^2 / 1000: K(t, t') = sqrt(D) |g(c(t')) - g(c(t))| / |t' - t|.
Network quadratic_in_t() {
  return [](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning&) {
    return torch::ones_like(x) * (t.to(x.dtype()).pow(2) / 1000.0).view({-1, 1, 1, 1});
  };
}
}  // namespace

TEST(AnalyzeLipschitz, KnownDerivativeInT) {
  auto schedule = linear();
  auto x0 = gaussian_data(8);
  const double root_d = 8.0;  // sqrt(1 * 8 * 8)
  auto pairs = lipschitz_grid(1000, 1, 10, 100);
  auto rows = lipschitz_per_timestep(quadratic_in_t(), Prediction::eps, schedule, {}, x0, {}, pairs, {3, 0});
  ASSERT_EQ(rows.size(), pairs.size());
  for (const auto& r : rows) EXPECT_NEAR(r.K, root_d * double(r.t + r.t2) / 1000.0, 1e-4 * r.K) << r.t;  // float32 g(t)

  // With E-TSDM (t~ = 100, n = 5) the network sees the interval's left edge: K is 0 inside an interval and the
  // jump g(20) - g(0) = 0.4 across the edge at 20; from t~ on it is the plain derivative again.
  EtsdmConfig etsdm{100, 5};
  auto erows = lipschitz_per_timestep(quadratic_in_t(), Prediction::eps, schedule, etsdm, x0, {},
                                      {{5, 6}, {19, 20}, {39, 40}, {150, 151}}, {});
  EXPECT_NEAR(erows[0].K, 0.0, 1e-9);
  EXPECT_NEAR(erows[1].K, root_d * 0.4, 1e-4);
  EXPECT_NEAR(erows[2].K, root_d * (1600.0 - 400.0) / 1000.0, 1e-4);
  EXPECT_NEAR(erows[3].K, root_d * 301.0 / 1000.0, 1e-4);
  EXPECT_DOUBLE_EQ(erows[1].condition, 0.0);
  EXPECT_DOUBLE_EQ(erows[1].condition2, 20.0);

  // A v network conditioned on nothing: eps = s_t x_t + a_t v depends on t only through (a_t, s_t).
  Network zero_v = [](const torch::Tensor& x, const torch::Tensor&, const diffuse::Conditioning&) { return torch::zeros_like(x); };
  auto vrows = lipschitz_per_timestep(zero_v, Prediction::v, schedule, {}, x0, {}, {{500, 510}}, {});
  auto eps = make_noise({1, 8, 8}, 8, 0);
  auto x_t = schedule.a_at(500) * x0 + schedule.s_at(500) * eps;
  double expected = x_t.flatten(1).norm(2, 1).mean().item<double>() * std::abs(schedule.s_at(510) - schedule.s_at(500)) / 10.0;
  EXPECT_NEAR(vrows[0].K, expected, 1e-5 * expected);

  EXPECT_NE(error_of([&] { lipschitz_per_timestep(zero_v, Prediction::v, schedule, {}, x0, {}, {{3, 3}}, {}); }), "");
  EXPECT_NE(error_of([&] { lipschitz_per_timestep(zero_v, Prediction::v, schedule, {}, x0, {}, {{999, 1000}}, {}); }).find("1000"),
            std::string::npos);
}

TEST(AnalyzeLipschitz, GridTilesNearZero) {
  auto pairs = lipschitz_grid(1000, 2, 100, 50);
  ASSERT_GE(pairs.size(), 50u);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(pairs[i].first, 2 * i);
    EXPECT_EQ(pairs[i].second, 2 * i + 2);
  }
  EXPECT_EQ(pairs[50].first, 100);
  EXPECT_EQ(pairs[51].first, 150);
  EXPECT_EQ(pairs.back().first, 950);
  EXPECT_LT(pairs.back().second, 1000);
}

// The three subcommands end to end on the diffusers fixture UNet (16x16, v prediction, zero SNR).
TEST(CliAnalyze, EndToEnd) {
  TempDir dir;
  auto model = "--model " + fixture("diffusers/unet") + " --scheduler " + fixture("scheduler/fixed_scheduler_config.json");
  auto loss = run_cli("analyze loss " + model + " --data fashion-mnist --n 4 --points 5 --out " + dir / "a");
  ASSERT_EQ(loss.code, 0) << loss.output;
  EXPECT_TRUE(fs::exists(dir / "a/loss_per_t.png"));
  auto csv = read_file(dir / "a/loss_per_t.csv");
  EXPECT_EQ(csv.rfind("t,condition,snr,loss_own,loss_eps,loss_v,loss_x0,", 0), 0u);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 6);

  auto lip = run_cli("analyze lipschitz " + model + " --data fashion-mnist --n 2 --dt 5 --dense-until 10 --stride 400 --out " + dir / "a");
  ASSERT_EQ(lip.code, 0) << lip.output;
  auto lcsv = read_file(dir / "a/lipschitz.csv");
  EXPECT_EQ(lcsv.rfind("t,t2,condition,condition2,K\n0,5,", 0), 0u) << lcsv;
  EXPECT_TRUE(fs::exists(dir / "a/lipschitz.png"));

  fs::create_directories(dir / "s");
  for (int i = 0; i < 20; ++i)
    write_png(dir / ("s/0000" + std::to_string(10 + i) + ".png"), torch::full({1, 32, 32}, -1.0 + 0.1 * i));
  auto br = run_cli("analyze brightness --samples " + dir / "s" + " --data fashion-mnist:test --limit 500");
  ASSERT_EQ(br.code, 0) << br.output;
  EXPECT_NE(br.output.find("W1"), std::string::npos);
  // The outputs go to analysis/ beside the images, so the folder still evaluates as samples afterwards.
  for (auto f : {"brightness.csv", "brightness.json", "brightness.png"})
    EXPECT_TRUE(fs::exists(dir / "s/analysis" + "/" + f)) << f;
  EXPECT_FALSE(fs::exists(dir / "s/brightness.png"));
  auto j = load_json(dir / "s/analysis/brightness.json");
  EXPECT_EQ(j["sample_count"].get<int64_t>(), 20);
  EXPECT_EQ(j["data_count"].get<int64_t>(), 500);

  auto bad = run_cli("analyze loss --model " + dir / "nothing");
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.output.find("does not exist"), std::string::npos) << bad.output;
  auto nodata = run_cli("analyze loss " + model + " --n 2");
  EXPECT_EQ(nodata.code, 1);
  EXPECT_NE(nodata.output.find("--data"), std::string::npos) << nodata.output;
}
