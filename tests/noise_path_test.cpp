// The noise path (noise_path.h): a discrete schedule's draws and grid as the trainer always drew them, the rectified
// flow's shifted densities against closed forms, sampling levels and the path a scheduler config names.
#include <gtest/gtest.h>

#include <cmath>

#include "diffuse/core/noise_path.h"
#include "test_util.h"
#include <torch/torch.h>

using namespace diffuse;
using diffuse::testing::error_of;

TEST(NoisePath, DiscreteScheduleDrawsIntegerTimestepsWithTheirTableValues) {
  const Schedule schedule = rescale_zero_terminal_snr(scaled_linear());
  const NoisePath path(schedule);
  EXPECT_TRUE(path.is_vp());
  EXPECT_EQ(path.T(), 1000);
  auto gen = at::detail::createCPUGenerator(5);
  auto reference = at::detail::createCPUGenerator(5);
  const auto drawn = path.draw(4096, gen);
  EXPECT_TRUE(torch::equal(drawn, torch::randint(0, 1000, {4096}, reference, torch::kInt64)));  // what train() drew
  const auto p = path.points(drawn);
  EXPECT_TRUE(torch::equal(p.timestep, drawn));
  EXPECT_TRUE(torch::equal(p.time, drawn.to(torch::kFloat64)));
  EXPECT_TRUE(torch::equal(p.a, schedule.a().to(torch::kFloat32).index_select(0, drawn)));
  EXPECT_TRUE(torch::equal(p.s, schedule.s().to(torch::kFloat32).index_select(0, drawn)));
  EXPECT_TRUE(torch::equal(p.snr, schedule.snr().index_select(0, drawn)));
  EXPECT_TRUE(torch::equal(path.snr(), schedule.snr()));
  const Level l = path.level(999);
  EXPECT_EQ(l.a, 0.0);  // zero terminal SNR
  EXPECT_EQ(l.t, 999.0);
  EXPECT_EQ(path.levels(10, Spacing::trailing).front().t, 999.0);
  EXPECT_NE(error_of([&] { path.level(1000); }), "");
}

// sigma = shift u / (1 + (shift - 1) u): for u ~ U(0, 1], E[sigma] = shift / k (1 - ln(1 + k) / k) with k = shift - 1;
// for the logit-normal density (shift 1) the median of sigma is sigmoid(mean).
TEST(NoisePath, RectifiedFlowDensitiesMatchClosedForms) {
  const int64_t T = 1000, n = 200000;
  const auto uniform = NoisePath::rectified_flow(T, 3.0);
  auto gen = at::detail::createCPUGenerator(11);
  const auto sigma = uniform.draw(n, gen);
  EXPECT_EQ(sigma.scalar_type(), torch::kFloat64);
  EXPECT_GT(sigma.min().item<double>(), 0.0);
  EXPECT_LE(sigma.max().item<double>(), 1.0);
  const double k = 2.0, mean = 3.0 / k * (1.0 - std::log(1.0 + k) / k);  // 0.67604
  EXPECT_NEAR(sigma.mean().item<double>(), mean, 0.002);  // standard error 0.0005
  const auto p = uniform.points(sigma);
  EXPECT_TRUE(torch::allclose((p.a + p.s).to(torch::kFloat64), torch::ones({n}, torch::kFloat64), 0, 1e-7));
  EXPECT_TRUE(torch::equal(p.time, sigma * double(T)));
  EXPECT_TRUE(torch::equal(p.timestep, (sigma * double(T)).floor().clamp(0, T - 1).to(torch::kInt64)));
  EXPECT_TRUE(torch::allclose(p.snr, ((1 - sigma) / sigma).square()));

  const auto logit = NoisePath::rectified_flow(T, 1.0, {TimeDensity::logit_normal, 0.5, 1.0});
  const auto s2 = logit.draw(n, gen);
  EXPECT_NEAR(s2.median().item<double>(), 1.0 / (1.0 + std::exp(-0.5)), 0.004);  // 0.6225

  // The grid: sigma = (i + 1) / T, unshifted; SNR 0 at its end; sampling walks the shifted flow_levels.
  const Level l = uniform.level(249);
  EXPECT_DOUBLE_EQ(l.s, 0.25);
  EXPECT_DOUBLE_EQ(l.a, 0.75);
  EXPECT_DOUBLE_EQ(l.t, 250.0);
  EXPECT_EQ(uniform.snr()[T - 1].item<double>(), 0.0);
  EXPECT_NEAR(uniform.snr()[249].item<double>(), 9.0, 1e-12);
  const auto walk = uniform.levels(8, Spacing::linspace), reference = flow_levels(T, 8, 3.0);
  ASSERT_EQ(walk.size(), reference.size());
  for (size_t i = 0; i < walk.size(); ++i) EXPECT_EQ(walk[i].s, reference[i].s);
  EXPECT_NE(error_of([&] { uniform.schedule(); }).find("rectified-flow"), std::string::npos);
  EXPECT_NE(error_of([] { NoisePath::rectified_flow(1000, 0.0); }).find("shift"), std::string::npos);
  EXPECT_NE(error_of([] { NoisePath::rectified_flow(1000, 1.0, {TimeDensity::logit_normal, 0, -1}); }).find("std"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_path_kind("curved"); }).find("vp or rectified-flow"), std::string::npos);
  EXPECT_NE(error_of([] { parse_time_density("beta"); }).find("uniform or logit-normal"), std::string::npos);
  EXPECT_EQ(to_string(parse_path_kind("rectified-flow")), "rectified-flow");
  EXPECT_EQ(to_string(parse_time_density("logit-normal")), "logit-normal");
}

TEST(NoisePath, OfASchedulerConfig) {
  auto flow = SchedulerConfig::from_json({{"_class_name", "FlowMatchEulerDiscreteScheduler"}, {"num_train_timesteps", 500},
                                          {"shift", 3.0}});
  const auto f = NoisePath::of(flow);
  EXPECT_EQ(f.kind(), PathKind::rectified_flow);
  EXPECT_EQ(f.T(), 500);
  EXPECT_EQ(f.shift(), 3.0);
  auto ddim = SchedulerConfig::from_json({{"_class_name", "DDIMScheduler"}, {"beta_schedule", "scaled_linear"},
                                          {"beta_start", 0.00085}, {"beta_end", 0.012}});
  const auto v = NoisePath::of(ddim);
  EXPECT_TRUE(v.is_vp());
  EXPECT_TRUE(torch::equal(v.schedule().alpha_bar, ddim.schedule().alpha_bar));
}
