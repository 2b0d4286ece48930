#include <gtest/gtest.h>

#include <filesystem>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/models/classifier.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/scheduler_config.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::TempDir;

namespace {
NoisyClassifierConfig tiny_config() {
  NoisyClassifierConfig c;
  c.sample_size = 16;
  c.block_out_channels = {8, 16};
  c.down_block_types = {"DownBlock2D", "AttnDownBlock2D"};
  c.layers_per_block = 1;
  c.norm_num_groups = 4;
  c.attention_head_dim = 4;
  c.num_classes = 3;
  return c;
}
}  // namespace

TEST(NoisyClassifier, ShapesAndSize) {
  NoisyClassifier clf{NoisyClassifierConfig{}};
  torch::NoGradGuard no_grad;
  auto logits = clf->forward(torch::randn({5, 1, 32, 32}), torch::tensor({0.0, 10.5, 200.0, 640.25, 999.0}));
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{5, 10}));
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
  // About a tenth of the reference UNet's parameters (Dhariwal & Nichol use a smaller trunk for the classifier).
  UNet2DModel unet(reference_unet_config());
  double ratio = double(parameter_count(*clf)) / double(parameter_count(*unet));
  EXPECT_GT(ratio, 0.07);
  EXPECT_LT(ratio, 0.14);
  std::cout << "classifier " << parameter_count(*clf) << " parameters, reference UNet " << parameter_count(*unet) << "\n";
  // The classifier matched to the reference UNet is the default one.
  EXPECT_EQ(classifier_config_for(reference_unet_config(), 10), NoisyClassifierConfig{});
  auto names = state_dict(*clf);
  EXPECT_TRUE(names.count("down_blocks.1.attentions.0.to_q.weight"));
  EXPECT_TRUE(names.count("time_embedding.linear_1.weight"));
  EXPECT_TRUE(names.count("linear_out.weight"));
  EXPECT_FALSE(names.count("class_embedding.weight"));
  EXPECT_FALSE(names.count("up_blocks.0.resnets.0.conv1.weight"));
}

TEST(NoisyClassifier, ConfigRoundTripAndErrors) {
  auto json = tiny_config().to_json();
  EXPECT_EQ(json["_class_name"], "DiffuseNoisyClassifier");
  json["note"] = "kept";
  auto back = NoisyClassifierConfig::from_json(json);
  EXPECT_EQ(back.to_json()["note"], "kept");
  EXPECT_EQ(back.block_out_channels, tiny_config().block_out_channels);
  json["num_classes"] = 1;
  EXPECT_THROW(NoisyClassifier{NoisyClassifierConfig::from_json(json)}, std::invalid_argument);
  json["num_classes"] = 3;
  json["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D"};
  EXPECT_THROW(NoisyClassifier{NoisyClassifierConfig::from_json(json)}, std::invalid_argument);
}

TEST(NoisyClassifier, SaveLoadRoundTrip) {
  torch::manual_seed(0);
  NoisyClassifier clf(tiny_config());
  TempDir tmp;
  auto dir = tmp.str();
  save_classifier(clf, dir + "/classifier");
  auto again = load_classifier(dir + "/classifier", torch::kCPU);
  EXPECT_EQ(again->config(), clf->config());
  auto x = torch::randn({3, 1, 16, 16});
  auto t = torch::tensor({1, 50, 999});
  clf->eval();
  again->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(clf->forward(x, t), again->forward(x, t)));
  // A UNet folder is not a classifier.
  try {
    load_classifier(std::string(DIFFUSE_FIXTURES) + "/diffusers/unet", torch::kCPU);
    ADD_FAILURE() << "loaded a UNet as a classifier";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not a diffuse noisy classifier"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// Classifier guidance needs grad_x log p(y | x_t, t): it exists, and equals a central finite difference
// (float64, a random direction).
TEST(NoisyClassifier, GradientWithRespectToInput) {
  torch::manual_seed(1);
  NoisyClassifier clf(tiny_config());
  clf->to(torch::kFloat64);
  clf->eval();
  auto x = torch::randn({2, 1, 16, 16}, torch::kFloat64).requires_grad_(true);
  auto t = torch::tensor({30.5, 800.0}, torch::kFloat64);
  auto y = torch::tensor({0, 2});
  auto log_p = [&](const torch::Tensor& input) {
    return torch::log_softmax(clf->forward(input, t), 1).gather(1, y.unsqueeze(1)).sum();
  };
  auto grad = torch::autograd::grad({log_p(x)}, {x})[0];
  ASSERT_TRUE(grad.defined());
  EXPECT_GT(grad.abs().max().item<double>(), 0);
  auto dir = torch::randn_like(x);
  const double h = 1e-5;
  torch::NoGradGuard no_grad;
  double numeric = (log_p(x + h * dir) - log_p(x - h * dir)).item<double>() / (2 * h);
  double analytic = (grad * dir).sum().item<double>();
  EXPECT_NEAR(numeric, analytic, 1e-6 * std::max(1.0, std::abs(analytic)));
}
