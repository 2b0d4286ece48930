#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "cli_util.h"
#include "diffuse/io/files.h"
#include "diffuse/core/scheduler_config.h"
#include <torch/torch.h>

using namespace diffuse;
using diffuse::testing::fixture;

namespace {
std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_" + name;
}
void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }
}  // namespace

TEST(SchedulerConfig, ReadsStableDiffusion21) {
  auto c = SchedulerConfig::load(fixture("scheduler/sd21_scheduler_config.json"));
  EXPECT_EQ(c.num_train_timesteps, 1000);
  EXPECT_EQ(c.beta_schedule, "scaled_linear");
  EXPECT_EQ(c.prediction_type, Prediction::v);
  EXPECT_EQ(c.timestep_spacing, Spacing::leading);  // diffusers' default when the key is absent
  EXPECT_EQ(c.steps_offset, 1);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_FALSE(c.trained_betas.has_value());
  EXPECT_EQ(c.ignored_keys(), std::vector<std::string>{"skip_prk_steps"});
  EXPECT_TRUE(torch::equal(c.schedule().alpha_bar, scaled_linear().alpha_bar));
}

TEST(SchedulerConfig, RoundTripKeepsUnknownKeys) {
  auto j = load_json(fixture("scheduler/sd15_scheduler_config.json"));
  j["some_future_key"] = {{"nested", 1}};
  auto c = SchedulerConfig::from_json(j);
  c.etsdm = {100, 5};
  auto path = temp_path("sched.json");
  c.save(path);
  auto back = SchedulerConfig::load(path);
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_EQ(back.extra["some_future_key"]["nested"], 1);
  EXPECT_EQ(back.extra["_class_name"], "PNDMScheduler");
  EXPECT_EQ(back.etsdm.t_tilde, 100);
  EXPECT_EQ(back.etsdm.n, 5);
  auto saved = load_json(path);
  EXPECT_EQ(saved["prediction_type"], "epsilon");
  EXPECT_EQ(saved["timestep_spacing"], "leading");
  // Every key of the original file survives.
  for (auto it = j.begin(); it != j.end(); ++it) EXPECT_TRUE(saved.contains(it.key())) << it.key();
  std::remove(path.c_str());
}

TEST(SchedulerConfig, TrainedBetasAndZeroSnr) {
  nlohmann::json j = {{"num_train_timesteps", 4}, {"trained_betas", {0.1, 0.2, 0.3, 0.4}},
                      {"rescale_betas_zero_snr", true}, {"prediction_type", "v_prediction"}};
  auto c = SchedulerConfig::from_json(j);
  auto s = c.schedule();
  EXPECT_EQ(s.T(), 4);
  EXPECT_TRUE(s.zero_terminal_snr());
  EXPECT_NEAR(s.alpha_bar_at(0), 0.9, 1e-15);
  EXPECT_EQ(SchedulerConfig::from_json(c.to_json()).to_json(), c.to_json());
}

TEST(SchedulerConfig, ClipSampleAndItsRange) {
  auto c = SchedulerConfig::from_json({{"clip_sample", true}, {"clip_sample_range", 2.5}});
  EXPECT_TRUE(c.clip_sample);
  EXPECT_EQ(c.clip_sample_range, 2.5);
  EXPECT_EQ(c.to_json()["clip_sample_range"], 2.5);
  EXPECT_TRUE(c.extra.empty());  // a known key, not kept as an unknown one
  EXPECT_EQ(SchedulerConfig::from_json(nlohmann::json::object()).clip_sample_range, 1.0);  // diffusers' default
  EXPECT_THROW(SchedulerConfig::from_json({{"clip_sample_range", 0.0}}), std::invalid_argument);
}

TEST(SchedulerConfig, BadInputNamesTheProblem) {
  auto expect_error = [](const nlohmann::json& j, const std::string& needle) {
    try {
      SchedulerConfig::from_json(j);
      ADD_FAILURE() << "accepted " << j.dump();
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({{"beta_schedule", "quadratic"}}, "quadratic");
  expect_error({{"num_train_timesteps", 1}}, "num_train_timesteps");
  expect_error({{"prediction_type", "noise"}}, "noise");
  expect_error({{"timestep_spacing", "middle"}}, "middle");
  expect_error({{"beta_start", 0.0}}, "(0, 1)");
  expect_error({{"beta_end", 1.5}}, "(0, 1)");
  expect_error({{"num_train_timesteps", "many"}}, "num_train_timesteps");
  expect_error({{"num_train_timesteps", 1e300}}, "num_train_timesteps");     // no float-to-int overflow
  expect_error({{"num_train_timesteps", int64_t(1) << 40}}, "num_train_timesteps");
  expect_error({{"steps_offset", INT64_MAX - 1}}, "steps_offset");            // no signed overflow later
  expect_error({{"steps_offset", 2.5}}, "steps_offset");
  expect_error({{"num_train_timesteps", 3}, {"trained_betas", {0.1, 0.2}}}, "trained_betas");
  expect_error({{"num_train_timesteps", 2}, {"trained_betas", {0.1, 1.5}}}, "beta[1]");
  expect_error(nlohmann::json::array(), "object");

  EXPECT_THROW(SchedulerConfig::load(temp_path("missing.json")), std::runtime_error);
  auto bad = temp_path("bad.json");
  write(bad, "{\"num_train_timesteps\": 1000,");
  try {
    SchedulerConfig::load(bad);
    ADD_FAILURE();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos);
  }
  std::remove(bad.c_str());
}

TEST(SchedulerConfig, EtsdmConditionMap) {
  EtsdmConfig e{100, 5};  // edges 0, 20, 40, 60, 80
  auto t = torch::tensor({0, 1, 19, 20, 21, 39, 40, 79, 80, 99, 100, 101, 999}, torch::kLong);
  auto f = e.condition(t);
  std::vector<float> want = {0, 0, 0, 20, 20, 20, 40, 60, 80, 80, 100, 101, 999};
  EXPECT_TRUE(torch::equal(f, torch::tensor(want)));
  EXPECT_TRUE(torch::equal(EtsdmConfig{}.condition(t), t.to(torch::kFloat32)));
  EXPECT_THROW(SchedulerConfig::from_json({{"diffuse_etsdm_t_tilde", 1000}, {"diffuse_etsdm_n", 5}}),
               std::invalid_argument);
}

// Keys whose default depends on the class (diffusers/schedulers/scheduling_*.py __init__): a config without them
// means what that class means (issue: Euler and DPM-Solver configs without timestep_spacing were read as
// leading, 0.12 to 0.82 off; DDIM configs without clip_sample as unclipped, 355.6 off).
TEST(SchedulerConfig, ClassDefaultsOfAbsentKeys) {
  auto of = [](const char* cls) { return SchedulerConfig::from_json({{"_class_name", cls}}); };
  for (const char* cls : {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                          "DPMSolverMultistepScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler"}) {
    EXPECT_EQ(of(cls).timestep_spacing, Spacing::linspace) << cls;
    EXPECT_FALSE(of(cls).clip_sample) << cls;
  }
  for (const char* cls : {"DDIMScheduler", "DDPMScheduler"}) {
    EXPECT_EQ(of(cls).timestep_spacing, Spacing::leading) << cls;
    EXPECT_TRUE(of(cls).clip_sample) << cls;
  }
  EXPECT_EQ(of("PNDMScheduler").timestep_spacing, Spacing::leading);
  EXPECT_FALSE(of("PNDMScheduler").clip_sample);
  // Present keys win; the class name survives the round trip, so a written config means the same again.
  auto c = SchedulerConfig::from_json({{"_class_name", "DDIMScheduler"}, {"clip_sample", false}, {"timestep_spacing", "trailing"}});
  EXPECT_FALSE(c.clip_sample);
  EXPECT_EQ(c.timestep_spacing, Spacing::trailing);
  auto again = SchedulerConfig::from_json(of("EulerDiscreteScheduler").to_json());
  EXPECT_EQ(again.timestep_spacing, Spacing::linspace);
}

// diffusers (Python's json module) writes non-finite floats as bare NaN / Infinity / -Infinity, e.g.
// DPMSolverMultistepScheduler's "lambda_min_clipped": -Infinity; they are read, kept and written back so.
TEST(SchedulerConfig, ReadsAndWritesPythonsNonFiniteNumbers) {
  auto path = temp_path("nonfinite.json");
  write(path, R"({"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                  "odd": [NaN, Infinity, 1.5], "text": "NaN and -Infinity stay text", "beta_end": 0.012})");
  auto c = SchedulerConfig::load(path);
  EXPECT_EQ(c.extra["lambda_min_clipped"].get<double>(), -std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(c.extra["odd"][0].get<double>()));
  EXPECT_EQ(c.extra["odd"][1].get<double>(), std::numeric_limits<double>::infinity());
  EXPECT_EQ(c.extra["text"], "NaN and -Infinity stay text");
  EXPECT_EQ(c.beta_end, 0.012);
  c.save(path);
  const auto text = read_file(path);
  EXPECT_NE(text.find("\"lambda_min_clipped\": -Infinity"), std::string::npos) << text;
  EXPECT_NE(text.find("NaN,"), std::string::npos) << text;
  EXPECT_NE(text.find("\"NaN and -Infinity stay text\""), std::string::npos) << text;
  EXPECT_EQ(SchedulerConfig::load(path).extra["lambda_min_clipped"].get<double>(),
            -std::numeric_limits<double>::infinity());
  std::remove(path.c_str());
}
