// Continuous time: samplers on levels (t, a, s) between the integer timesteps and on the rectified-flow path,
// the higher-order samplers (DPM-Solver++ 3M, UniPC), against diffusers 0.40 and against closed forms.
#include <gtest/gtest.h>

#include <cmath>

#include "diffuse/core/levels.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/unet.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/train/train.h"
#include "cli_util.h"
#include "test_util.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {

double max_abs(const torch::Tensor& x) { return x.abs().max().item<double>(); }

const std::string kDir = std::string(DIFFUSE_FIXTURES) + "/diffusers-0.40/";

// Data x0 ~ N(mu, s0^2 I). At any level, with m^2 = a^2 s0^2 + s^2: E[x0 | x] = mu + (a s0^2 / m^2)(x - a mu), and
// the probability-flow ODE carries x at one level to a' mu + (m' / m)(x - a mu) at another.
struct Gaussian {
  torch::Tensor mu = torch::linspace(-1.0, 1.5, 8, torch::kFloat64);
  double s0 = 0.5;

  Denoiser denoiser() const {
    Denoiser d;
    d.path = linear();
    auto mu_ = mu;
    const double s0_ = s0;
    d.fn = [mu_, s0_](const torch::Tensor& x, const Level& l) {
      const double m2 = l.a * l.a * s0_ * s0_ + l.s * l.s;
      auto x0 = mu_ + (l.a * s0_ * s0_ / m2) * (x - l.a * mu_);
      return Estimate{x0, (x - l.a * x0) / l.s};
    };
    return d;
  }
  torch::Tensor ode(const torch::Tensor& x, const Level& from, const Level& to) const {
    const double m = std::sqrt(from.a * from.a * s0 * s0 + from.s * from.s);
    const double m_to = std::sqrt(to.a * to.a * s0 * s0 + to.s * to.s);
    return to.a * mu + (m_to / m) * (x - from.a * mu);
  }
};

// S + 1 levels of a spacing, the last one the end: karras / exponential in sigma on a VP path, or uniform in
// sigma on the rectified-flow path (shift 3). The spacing's parameter r runs over [0, 1]; the first two steps, where
// multistep methods warm up with lower orders, have length 1 / S^2 in r, so that their local errors do not
// set the global order.
enum class Walk { karras, exponential, flow };
const char* name(Walk w) { return w == Walk::karras ? "karras" : w == Walk::exponential ? "exponential" : "flow"; }
std::pair<std::vector<Level>, Level> walk(Walk w, int64_t S) {
  std::vector<Level> all;
  const double warm = 1.0 / double(S * S);
  for (int64_t i = 0; i <= S; ++i) {
    const double r = i <= 2 ? double(i) * warm : 2 * warm + double(i - 2) / double(S - 2) * (1.0 - 2 * warm);
    if (w == Walk::flow) {
      all.push_back(flow_level(shift_sigma(0.8 + r * (0.05 - 0.8), 3.0), 1000));
    } else {
      const double lo = 0.03, hi = 30.0;
      const double sigma = w == Walk::karras ? std::pow(std::pow(hi, 1 / 7.0) + r * (std::pow(lo, 1 / 7.0) - std::pow(hi, 1 / 7.0)), 7.0)
                                             : std::exp(std::log(hi) + r * (std::log(lo) - std::log(hi)));
      all.push_back(vp_level_of_sigma(sigma, 0));
    }
  }
  Level end = all.back();
  all.pop_back();
  return {all, end};
}

double ode_error(const std::string& sampler, Walk w, int64_t S, SamplerOptions o = {}) {
  Gaussian g;
  auto [levels, end] = walk(w, S);
  auto x_T = make_noise({8}, 16, 3).to(torch::kFloat64);
  o.lower_order_final = false;
  auto x = get_sampler(sampler)(g.denoiser(), Timesteps(levels, end), x_T, o);
  return max_abs(x - g.ode(x_T, levels.front(), end));
}

}  // namespace

// The fixture UNet at t = 0.25, 123.5 and 998.75: the network takes real timesteps.
TEST(DiffusersParity040, NetworkAtFractionalTimesteps) {
  auto unet = load_unet(kDir + "unet", torch::kCPU);
  unet->eval();
  auto f = load_safetensors(kDir + "sampler_loops.safetensors");
  torch::NoGradGuard no_grad;
  auto out = unet->forward(f.at("frac.x"), f.at("frac.timesteps"), f.at("frac.class_labels"));
  const double diff = max_abs(out - f.at("frac.out"));
  std::cout << "fractional timesteps: max |diffuse - diffusers| = " << diff << "\n";
  EXPECT_LT(diff, 1e-4);
}

// diffusers 0.40's UniPC (bh2 order 2 on a zero-SNR v model, bh1 order 3 on an eps model), DPM-Solver++ 3M and
// flow-matching Euler with shift 3, each a full loop with the fixture UNet, run on the levels of the
// scheduler's own sigmas; and the levels diffuse builds itself for the flow loop.
TEST(DiffusersParity040, SamplerLoops) {
  auto unet = load_unet(kDir + "unet", torch::kCPU);
  unet->eval();
  auto f = load_safetensors(kDir + "sampler_loops.safetensors");
  auto cases = parse_json(read_file(kDir + "sampler_loops.json"));
  ASSERT_EQ(cases.size(), 4u);
  Network net = [&](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    return unet->forward(x, t, labels);
  };
  for (const auto& c : cases) {
    const std::string name = c.at("name"), cls = c.at("scheduler");
    const auto& jc = c.at("scheduler_config");
    const bool flow = c.at("kind") == "flow";
    const auto sigmas = f.at(name + ".sigmas"), times = f.at(name + ".timesteps");
    std::vector<Level> levels;
    for (int64_t i = 0; i < times.size(0); ++i) {
      const double sigma = sigmas[i].item<double>(), t = times[i].item<double>();
      levels.push_back(flow ? Level{t, 1.0 - sigma, sigma} : vp_level_of_sigma(sigma, t));
    }
    const Level end = Level{-1, 1, 0};
    ASSERT_EQ(sigmas[-1].item<double>(), 0.0) << name;
    if (flow) {  // diffuse's own flow levels
      auto mine = flow_levels(jc.at("num_train_timesteps"), c.at("num_inference_steps"), jc.at("shift"));
      for (size_t i = 0; i < mine.size(); ++i) {
        EXPECT_NEAR(mine[i].s, levels[i].s, 1e-6) << name << " sigma " << i;
        EXPECT_NEAR(mine[i].t, levels[i].t, 1e-3) << name << " t " << i;
      }
    }
    const Prediction p = flow ? Prediction::flow : parse_prediction(jc.at("prediction_type"));
    auto labels = torch::tensor(c.at("class_labels").get<std::vector<int64_t>>(), torch::kLong);
    Denoiser d = make_denoiser(net, p, linear(), {}, labels);
    SamplerOptions o;
    std::string sampler = "euler";
    if (cls == "UniPCMultistepScheduler") {
      sampler = "unipc";
      o.order = jc.at("solver_order");
      o.unipc_variant = parse_unipc_variant(jc.at("solver_type"));
    } else if (cls == "DPMSolverMultistepScheduler") {
      sampler = "dpmpp_3m";
    }
    auto x = get_sampler(sampler)(d, Timesteps(levels, end), f.at(name + ".init_noise"), o);
    const auto& want = f.at(name + ".sample");
    if (name == "unipc_bh1_o3_eps_linspace") {
      // diffusers 0.40 returns NaN here: on the last step to sigma 0, bh1's B(h) = -h = -inf multiplies a zero
      // correction (scheduling_unipc_multistep.py, multistep_uni_p_bh_update: x_t_ - alpha_t * B_h * pred_res with
      // pred_res = 0). diffuse's last step is the limit x = a' x0; the loop is finite.
      EXPECT_TRUE(torch::isnan(want).all().item<bool>()) << "the fixture no longer holds diffusers' NaN";
      EXPECT_TRUE(torch::isfinite(x).all().item<bool>()) << name;
      continue;
    }
    const double diff = max_abs(x - want), scale = max_abs(want);
    std::cout << name << ": max |diffuse - diffusers| = " << diff << " (max |sample| " << scale << ")\n";
    EXPECT_LT(diff, 1e-4 + 1e-6 * scale) << name;  // float32 rounding: the eps loop's x reaches 717
  }
}

// Orders of convergence on Gaussian data, where the probability-flow ODE's output is known exactly: the error
// ratio between S and 2S steps is about 2^p for a method of order p, on karras and exponential sigma spacings of a
// variance-preserving path and on the (shifted) rectified-flow path. UniPC-p with its corrector is of order p + 1.
// diffusers' DPM-Solver++ 3M is second order (its D2 weight is half the Taylor one, see src/sample/sampling.cpp);
// with dpmpp3_taylor it is third order.
TEST(SamplerConvergence, HigherOrdersOnSigmaSpacingsAndFlowPaths) {
  struct Case {
    std::string sampler;
    int order;
    UniPcVariant variant;
    double p;
    bool taylor = false;
  };
  const std::vector<Case> cases = {{"euler", 0, UniPcVariant::bh2, 1},    {"heun", 0, UniPcVariant::bh2, 2},
                                   {"dpmpp_2m", 0, UniPcVariant::bh2, 2}, {"dpmpp_3m", 0, UniPcVariant::bh2, 2},
                                   {"dpmpp_3m", 0, UniPcVariant::bh2, 3, true},
                                   {"unipc", 1, UniPcVariant::bh2, 2},    {"unipc", 2, UniPcVariant::bh2, 3},
                                   {"unipc", 2, UniPcVariant::bh1, 3},    {"unipc", 3, UniPcVariant::bh1, 4}};
  for (Walk w : {Walk::karras, Walk::exponential, Walk::flow}) {
    for (const auto& c : cases) {
      SamplerOptions o;
      if (c.order) o.order = c.order;
      o.unipc_variant = c.variant;
      o.dpmpp3_taylor = c.taylor;
      const int64_t S = w == Walk::flow ? 256 : 64;  // the flow walk's steps near SNR 0 are long: asymptotic later
      const double e1 = ode_error(c.sampler, w, S, o), e2 = ode_error(c.sampler, w, 2 * S, o);
      const double p = std::log2(e1 / e2);
      std::cout << c.sampler << (c.taylor ? " taylor" : "") << (c.order ? " order " + std::to_string(c.order) + " " + to_string(c.variant) : "")
                << " on " << name(w) << ": errors " << e1 << ", " << e2 << ", order " << p << "\n";
      EXPECT_GT(p, c.p - 0.3) << c.sampler << " " << c.order << " on " << name(w);
    }
  }
}

// Sigma spacings on the schedule's own range: karras and exponential from sigma[T - 1] to sigma[0], network times by
// log-sigma interpolation; with zero terminal SNR the exact SNR-0 point first, then the finite range.
TEST(SpacedLevels, SigmaSpacingsAndTheZeroSnrRule) {
  const Schedule lin = linear();
  for (Spacing sp : {Spacing::karras, Spacing::exponential}) {
    auto levels = spaced_levels(lin, 10, sp);
    ASSERT_EQ(levels.size(), 10u);
    EXPECT_NEAR(levels.front().t, 999.0, 1e-9);
    EXPECT_NEAR(levels.back().t, 0.0, 1e-9);
    EXPECT_NEAR(levels.front().s / levels.front().a, std::sqrt((1 - lin.alpha_bar_at(999)) / lin.alpha_bar_at(999)), 1e-9);
    for (const auto& l : levels) EXPECT_NEAR(l.a * l.a + l.s * l.s, 1.0, 1e-12);
    for (size_t i = 1; i < levels.size(); ++i) EXPECT_LT(levels[i].t, levels[i - 1].t);
  }
  // Exponential: equal steps in log sigma, i.e. in lambda.
  auto e = spaced_levels(lin, 5, Spacing::exponential);
  auto lambda = [](const Level& l) { return std::log(l.a / l.s); };
  for (size_t i = 2; i < e.size(); ++i)
    EXPECT_NEAR(lambda(e[i]) - lambda(e[i - 1]), lambda(e[1]) - lambda(e[0]), 1e-9);
  // Karras with rho: sigma^(1/rho) linear.
  auto k = spaced_levels(lin, 5, Spacing::karras, 0, 7.0);
  auto root = [](const Level& l) { return std::pow(l.s / l.a, 1 / 7.0); };
  for (size_t i = 2; i < k.size(); ++i) EXPECT_NEAR(root(k[i]) - root(k[i - 1]), root(k[1]) - root(k[0]), 1e-9);
  // sigma_to_t inverts the schedule at integer points and interpolates log sigma between them.
  for (int64_t t : {0, 1, 417, 998, 999}) {
    const double ab = lin.alpha_bar_at(t);
    EXPECT_NEAR(sigma_to_t(lin, std::sqrt((1 - ab) / ab)), double(t), 1e-6) << t;
  }
  const double l1 = 0.5 * std::log((1 - lin.alpha_bar_at(400)) / lin.alpha_bar_at(400));
  const double l2 = 0.5 * std::log((1 - lin.alpha_bar_at(401)) / lin.alpha_bar_at(401));
  EXPECT_NEAR(sigma_to_t(lin, std::exp(0.25 * l1 + 0.75 * l2)), 400.75, 1e-9);
  // Zero terminal SNR: the SNR-0 point, then S - 1 levels over [sigma[0], sigma[T - 2]].
  const Schedule z = rescale_zero_terminal_snr(scaled_linear());
  auto zl = spaced_levels(z, 6, Spacing::karras);
  ASSERT_EQ(zl.size(), 6u);
  EXPECT_EQ(zl[0].a, 0.0);
  EXPECT_EQ(zl[0].t, 999.0);
  EXPECT_NEAR(zl[1].t, 998.0, 1e-6);
  EXPECT_NEAR(zl.back().t, 0.0, 1e-9);
  EXPECT_NEAR(spaced_levels(z, 6, Spacing::karras, 0, 7.0, true)[2].t, std::nearbyint(zl[2].t), 0);
  diffuse::testing::expect_error([&] { spaced_timesteps(1000, 10, Spacing::karras); }, "sigma spacing");
  // Beta quantiles against closed forms: Beta(1, 1) is uniform, Beta(1/2, 1/2) the arcsine law sin^2(pi p / 2);
  // Beta(0.6, 0.6) is symmetric about 1/2.
  for (double p : {0.0, 0.1, 0.37, 0.5, 0.9, 1.0}) {
    EXPECT_NEAR(beta_quantile(p, 1, 1), p, 1e-12) << p;
    EXPECT_NEAR(beta_quantile(p, 0.5, 0.5), std::pow(std::sin(M_PI * p / 2), 2), 1e-10) << p;
    EXPECT_NEAR(beta_quantile(p, 0.6, 0.6) + beta_quantile(1 - p, 0.6, 0.6), 1.0, 1e-10) << p;
  }
  auto b = spaced_levels(lin, 7, Spacing::beta);
  EXPECT_NEAR(b.front().s / b.front().a, std::sqrt((1 - lin.alpha_bar_at(999)) / lin.alpha_bar_at(999)), 1e-9);
  EXPECT_NEAR(b.back().t, 0.0, 1e-9);
  const double mid = b[3].s / b[3].a, hi = b[0].s / b[0].a, lo = b[6].s / b[6].a;
  EXPECT_NEAR(mid, 0.5 * (hi + lo), 1e-9);  // the median quantile: halfway in sigma
}

// Every sampler on every path and sigma spacing, from SNR 0 (zero-terminal-SNR VP, rectified flow from sigma 1) to
// the clean data: finite (accuracy is SamplerConvergence's).
TEST(ZeroSnr, EverySamplerOnSigmaSpacingsAndFlowPathsIsFinite) {
  Gaussian g;
  auto x_T = make_noise({8}, 4, 5).to(torch::kFloat64);
  const Schedule z = rescale_zero_terminal_snr(scaled_linear());
  std::vector<std::pair<std::string, std::vector<Level>>> walks = {
      {"karras", spaced_levels(z, 12, Spacing::karras)},
      {"exponential", spaced_levels(z, 12, Spacing::exponential)},
      {"flow", flow_levels(1000, 12, 3.0)},
      {"flow karras", flow_levels(1000, 12, 3.0, Spacing::karras)}};
  walks[2].second.front() = flow_level(1.0, 1000);  // exactly SNR 0 (flow_levels starts there too)
  for (const auto& [name, levels] : walks) {
    ASSERT_EQ(levels.front().a, 0.0) << name;
    for (const auto& sampler : sampler_names()) {
      if (!runs_from_snr_zero(sampler)) continue;  // plms, pndm, heun_sigma, lms: Plms.*, DiffusersParity040Classes.*
      for (auto variant : {UniPcVariant::bh1, UniPcVariant::bh2}) {
        SamplerOptions o;
        o.order = 3;
        o.unipc_variant = variant;
        auto x = get_sampler(sampler)(g.denoiser(), Timesteps(levels), x_T, o);
        EXPECT_TRUE(torch::isfinite(x).all().item<bool>()) << sampler << " on " << name;
      }
    }
  }
  // Conversions at the ends of the flow path: t = 0 (clean) and t = 1 (noise), every pair of types.
  auto x0 = torch::randn({3}, torch::kFloat64), eps = torch::randn({3}, torch::kFloat64);
  for (double sigma : {0.0, 1.0, 0.3}) {
    const double a = 1 - sigma, s = sigma;
    auto at = torch::scalar_tensor(a, torch::kFloat64), st = torch::scalar_tensor(s, torch::kFloat64);
    auto x = a * x0 + s * eps;
    auto u = target(Prediction::flow, x0, eps, at, st);
    EXPECT_TRUE(torch::allclose(convert(Prediction::flow, Prediction::x0, u, x, at, st), x0)) << sigma;
    EXPECT_TRUE(torch::allclose(convert(Prediction::flow, Prediction::eps, u, x, at, st), eps)) << sigma;
    if (sigma > 0) EXPECT_TRUE(torch::allclose(convert(Prediction::x0, Prediction::flow, x0, x, at, st), u)) << sigma;
    if (sigma < 1) EXPECT_TRUE(torch::allclose(convert(Prediction::eps, Prediction::flow, eps, x, at, st), u)) << sigma;
    auto v = target(Prediction::v, x0, eps, at, st);
    EXPECT_TRUE(torch::allclose(convert(Prediction::v, Prediction::flow, v, x, at, st), u)) << sigma;
    EXPECT_TRUE(torch::allclose(convert(Prediction::flow, Prediction::v, u, x, at, st), v)) << sigma;
  }
}

// The same loops through generate() and `diffuse sample`: a scheduler_config.json with the loop's class and
// settings beside the fixture's unet/ is all diffuse needs to sample as diffusers did (one image per class label).
TEST(DiffusersParity040, SchedulerConfigsDriveGenerate) {
  auto f = load_safetensors(kDir + "sampler_loops.safetensors");
  auto cases = parse_json(read_file(kDir + "sampler_loops.json"));
  diffuse::testing::TempDir dir;
  for (const auto& c : cases) {
    const std::string name = c.at("name");
    if (name == "unipc_bh1_o3_eps_linspace") continue;  // diffusers' NaN, see SamplerLoops
    auto jc = c.at("scheduler_config");
    jc["_class_name"] = c.at("scheduler");
    const std::string config = dir / (name + ".json");
    write_file_atomic(config, jc.dump());
    LoadOptions lo;
    lo.scheduler_file = config;
    lo.vae = "none";
    auto run = load_run(kDir + "unet", lo);
    const auto labels = c.at("class_labels").get<std::vector<int64_t>>();
    double worst = 0;
    for (size_t i = 0; i < labels.size(); ++i) {
      GenerateOptions g;
      g.steps = c.at("num_inference_steps");
      g.n = 1;
      g.class_id = labels[i];
      g.init_noise = f.at(name + ".init_noise").narrow(0, int64_t(i), 1);
      auto out = generate(run, g);
      if (i == 0) {
        const auto want_t = f.at(name + ".timesteps");
        ASSERT_EQ(int64_t(out.timesteps.size()), want_t.size(0)) << name;
        for (size_t k = 0; k < out.timesteps.size(); ++k)
          EXPECT_NEAR(out.timesteps[k], want_t[int64_t(k)].item<double>(), 1e-3) << name << " step " << k;
      }
      worst = std::max(worst, max_abs(out.images[0] - f.at(name + ".sample")[int64_t(i)]));
    }
    std::cout << name << " (" << sampler_for(run.scheduler) << ") through generate(): max |diffuse - diffusers| = "
              << worst << "\n";
    // diffusers replaces alpha_bar = 0 by 2^-24 on zero-SNR schedules (a = 2^-12 at t = 999); diffuse samples the
    // exact SNR-0 point. With diffusers' sigmas (SamplerLoops) the loop agrees to 2e-6; this is the constant's effect.
    EXPECT_LT(worst, name.find("zsnr") != std::string::npos ? 2e-3 : 1e-3) << name;
    if (name != "flow_euler_shift3") continue;
    // And from the command line: --init-noise in, --save-raw out.
    save_safetensors(dir / "noise.safetensors", {{"noise", f.at(name + ".init_noise").narrow(0, 0, 1).contiguous()}});
    auto r = diffuse::testing::run_cli("sample --model " + kDir + "unet --scheduler " + config + " --vae none --steps 10 "
                                       "--n 1 --class " + std::to_string(labels[0]) + " --init-noise " +
                                       (dir / "noise.safetensors") + " --save-raw " + (dir / "raw.safetensors") +
                                       " --no-images --quiet --out " + (dir / "out"));
    ASSERT_EQ(r.code, 0) << r.output;
    auto raw = load_safetensors(dir / "raw.safetensors").at("sample");
    const double cli = max_abs(raw[0] - f.at(name + ".sample")[0]);
    std::cout << name << " through diffuse sample: max |diffuse - diffusers| = " << cli << "\n";
    EXPECT_LT(cli, 1e-4);
  }
}

// A run's scheduler config must load in the diffusers class it names (DDIMScheduler): no flow target there, and
// no sigma spacing as its timestep_spacing.
TEST(Train, RefusesWhatItsSchedulerConfigCannotHold) {
  diffuse::testing::expect_error([] { make_scheduler_config({}, Prediction::flow, Spacing::trailing, {}); }, "flow");
  diffuse::testing::expect_error([] { make_scheduler_config({}, Prediction::v, Spacing::karras, {}); }, "karras");
  EXPECT_NO_THROW(make_scheduler_config({}, Prediction::v, Spacing::trailing, {}));
}

// A rectified-flow run: FlowMatchEulerDiscreteScheduler config with its shift, the flow target, and samples that
// generate() draws from it with the config's Euler (and any other sampler) are finite; the path's options are checked.
TEST(Train, RectifiedFlowRunSamplesAsFlowMatching) {
  diffuse::testing::TempDir dir;
  auto r = diffuse::testing::run_cli(
      "train --data synthetic-shapes --synthetic-count 32 --size 16 --channels 8,16 --attention-levels none "
      "--layers-per-block 1 --norm-groups 4 --batch 8 --steps 3 --path rectified-flow --prediction flow --flow-shift 3 "
      "--timestep-density logit-normal --quiet --out " + (dir / "rf"));
  ASSERT_EQ(r.code, 0) << r.output;
  auto config = SchedulerConfig::load(dir / "rf/scheduler/scheduler_config.json");
  EXPECT_EQ(config.extra.at("_class_name"), "FlowMatchEulerDiscreteScheduler");
  EXPECT_EQ(config.extra.at("shift"), 3.0);
  EXPECT_EQ(config.prediction_type, Prediction::flow);
  EXPECT_FALSE(parse_json(read_file(dir / "rf/scheduler/scheduler_config.json")).contains("beta_schedule"));
  EXPECT_EQ(sampler_for(config), "euler");
  LoadOptions lo;
  auto run = load_run(dir / "rf", lo);
  for (const std::string sampler : {"", "unipc", "dpmpp_3m"}) {
    GenerateOptions g;
    g.sampler = sampler;
    g.steps = 4;
    g.n = 2;
    auto out = generate(run, g);
    EXPECT_TRUE(torch::isfinite(out.images).all().item<bool>()) << sampler;
    EXPECT_DOUBLE_EQ(out.timesteps.front(), 1000.0) << sampler;  // sigma 1: the exact SNR-0 point
  }
  // The analyses walk the flow path's grid (they refused a flow run before).
  for (const std::string what : {"loss --points 5", "lipschitz --dt 100 --dense-until 0 --stride 400"}) {
    auto an = diffuse::testing::run_cli("analyze " + what + " --model " + (dir / "rf") + " --n 4 --out " + (dir / "an"));
    ASSERT_EQ(an.code, 0) << what << "\n" << an.output;
    EXPECT_NE(an.output.find("rectified flow"), std::string::npos) << an.output;
  }
  const auto loss_csv = read_file(dir / "an/loss_per_t.csv");
  EXPECT_NE(loss_csv.find("\n999,1000,"), std::string::npos) << loss_csv;  // the last grid point: sigma 1, t = 1000
  for (auto [args, needle] : {std::pair<const char*, const char*>{"--path rectified-flow", "--prediction flow"},
                              {"--prediction flow", "--path rectified-flow"},
                              {"--path rectified-flow --prediction flow --etsdm-t-tilde 100 --etsdm-n 5", "E-TSDM"},
                              {"--path rectified-flow --prediction flow --timestep-density beta", "{uniform,logit-normal}"},
                              {"--path curved", "{vp,rectified-flow}"},
                              {"--flow-shift 3", "--flow-shift shapes the rectified-flow path"},
                              {"--timestep-density logit-normal", "--timestep-density shapes"},
                              {"--path rectified-flow --prediction flow --logit-std 2", "--timestep-density logit-normal"}}) {
    auto bad = diffuse::testing::run_cli("train --data synthetic-shapes --synthetic-count 32 --size 16 --channels 8,16 "
                                         "--attention-levels none --norm-groups 4 --steps 1 --quiet " + std::string(args) +
                                         " --out " + (dir / "bad"));
    EXPECT_NE(bad.code, 0) << args;
    EXPECT_NE(bad.output.find(needle), std::string::npos) << args << "\n" << bad.output;
  }
}

namespace {
// The scheduler classes of tests/fixtures/diffusers-0.40-classes (diffusers 0.40, the UNet of ../diffusers-0.40), each
// sampled through generate() from its config as diffusers' loop does: a DDIMScheduler whose leading walk with
// steps_offset 0 ends on a zero-length step at t = 0, PNDMScheduler as PLMS (skip_prk_steps, Stable Diffusion's) and
// with its Runge-Kutta warm-up, LMSDiscreteScheduler, HeunDiscreteScheduler (eps with karras sigmas, v on linspace,
// both starting from init_noise_sigma), DPM-Solver++ and UniPC with karras sigmas ending at sigma_min.
TEST(DiffusersParity040Classes, EverySchedulerClassSamplesAsDiffusers) {
  const std::string classes = std::string(DIFFUSE_FIXTURES) + "/diffusers-0.40-classes/";
  auto f = load_safetensors(classes + "sampler_loops.safetensors");
  auto cases = parse_json(read_file(classes + "sampler_loops.json"));
  diffuse::testing::TempDir dir;
  int checked = 0;
  for (const auto& c : cases) {
    const std::string name = c.at("name"), cls = c.at("scheduler");
    auto jc = c.at("scheduler_config");
    jc["_class_name"] = cls;
    write_file_atomic(dir / "config.json", jc.dump());
    LoadOptions lo;
    lo.scheduler_file = dir / "config.json";
    lo.vae = "none";
    auto run = load_run(kDir + "unet", lo);
    const auto labels = c.at("class_labels").get<std::vector<int64_t>>();
    GenerateOptions g;
    g.steps = c.at("num_inference_steps");
    g.n = 1;
    for (size_t i = 0; i < labels.size(); ++i) {
      g.class_id = labels[i];
      g.init_noise = f.at(name + ".init_noise").narrow(0, int64_t(i), 1);
      const auto out = generate(run, g);
      EXPECT_TRUE(out.notes.empty()) << name << ": " << (out.notes.empty() ? "" : out.notes[0]);
      if (name == "ddim_no_alpha_one_offset0") ASSERT_EQ(out.timesteps.back(), 0.0);
      const double diff = max_abs(out.images[0] - f.at(name + ".sample")[int64_t(i)]);
      std::cout << name << " (" << out.sampler << ") image " << i << ": max |diffuse - diffusers| = " << diff << "\n";
      EXPECT_LT(diff, 1e-4) << name;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 8);
}

// diffuse's own angle-space heun on a HeunDiscreteScheduler config says that it is not the class's sampler.
TEST(DiffusersParity040Classes, AngleHeunOnAHeunConfigSaysSo) {
  const std::string classes = std::string(DIFFUSE_FIXTURES) + "/diffusers-0.40-classes/";
  auto cases = parse_json(read_file(classes + "sampler_loops.json"));
  diffuse::testing::TempDir dir;
  for (const auto& c : cases) {
    if (c.at("scheduler") != "HeunDiscreteScheduler") continue;
    auto jc = c.at("scheduler_config");
    jc["_class_name"] = "HeunDiscreteScheduler";
    write_file_atomic(dir / "config.json", jc.dump());
    LoadOptions lo;
    lo.scheduler_file = dir / "config.json";
    lo.vae = "none";
    auto run = load_run(kDir + "unet", lo);
    GenerateOptions g;
    g.steps = 3;
    g.n = 1;
    g.sampler = "heun";
    const auto out = generate(run, g);
    ASSERT_FALSE(out.notes.empty());
    EXPECT_NE(out.notes[0].find("heun_sigma"), std::string::npos) << out.notes[0];
    return;
  }
  FAIL() << "no HeunDiscreteScheduler case in the fixture";
}
}  // namespace
