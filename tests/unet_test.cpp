#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/models/unet.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::TempDir;
using diffuse::testing::expect_error;
using diffuse::testing::expect_names_and_shapes;

namespace {

const std::string kUnetDir = std::string(DIFFUSE_FIXTURES) + "/diffusers/unet";
const std::string kForward = std::string(DIFFUSE_FIXTURES) + "/diffusers/unet_forward.safetensors";

UNetConfig fixture_config() { return UNetConfig::from_json(load_json(kUnetDir + "/config.json")); }

}  // namespace

TEST(UNet, StateDictNamesAndShapesEqualDiffusers) {
  auto reference = load_safetensors(kUnetDir + "/diffusion_pytorch_model.safetensors");
  UNet2DModel model(fixture_config());
  auto ours = state_dict(*model);
  ASSERT_NO_FATAL_FAILURE(expect_names_and_shapes(ours, reference));
  EXPECT_TRUE(ours.count("down_blocks.1.attentions.0.to_q.weight"));
  EXPECT_TRUE(ours.count("class_embedding.weight"));
}

TEST(UNet, ForwardMatchesDiffusers) {
  auto io = load_safetensors(kForward);
  auto model = load_unet(kUnetDir, torch::kCPU);
  model->eval();
  torch::Tensor out_no_grad, out_grad;
  {
    torch::NoGradGuard no_grad;
    out_no_grad = model->forward(io["x"], io["timesteps"], io["class_labels"]);
  }
  out_grad = model->forward(io["x"], io["timesteps"], io["class_labels"]);  // the autograd code path
  double err = (out_no_grad - io["out"]).abs().max().item<double>();
  EXPECT_LT(err, 2e-5) << "max abs difference to diffusers";
  std::cout << "max abs difference to diffusers 0.25: " << err << "\n";
  EXPECT_LT((out_grad.detach() - io["out"]).abs().max().item<double>(), 2e-5);
  EXPECT_GT(io["out"].abs().max().item<double>(), 0.1);  // the reference is not trivially small
  // Channels-last input gives the same function.
  torch::NoGradGuard no_grad;
  auto cl = model->forward(io["x"].contiguous(at::MemoryFormat::ChannelsLast), io["timesteps"], io["class_labels"]);
  EXPECT_LT((cl - io["out"]).abs().max().item<double>(), 2e-5);
}

// ConvolutionDtype(bf16) runs a float32 UNet's convolutions in bf16 from its float32 weights: the forward equals,
// bit for bit, the same UNet's with its convolution weights stored in bf16 (convolutions_to, what sampling with
// --conv-dtype does); the weights' gradients stay float32 and within bf16's rounding of float32's; the guard's
// scope ends with it.
TEST(UNet, ConvolutionDtypeGuardComputesConvolutionsInBf16) {
  auto io = load_safetensors(kForward);
  auto model = load_unet(kUnetDir, torch::kCPU);
  auto forward = [&] { return model->forward(io["x"], io["timesteps"], io["class_labels"]); };
  const auto fp32_out = forward();
  fp32_out.square().sum().backward();
  std::map<std::string, torch::Tensor> fp32_grads;
  for (const auto& p : model->named_parameters()) fp32_grads[p.key()] = p.value().grad().clone();
  model->zero_grad();
  torch::Tensor guarded;
  {
    ConvolutionDtype bf16(torch::kBFloat16);
    guarded = forward();
  }
  guarded.square().sum().backward();
  EXPECT_EQ(guarded.scalar_type(), torch::kFloat32);
  EXPECT_GT((guarded - fp32_out).abs().max().item<double>(), 0.0);  // bf16 did run
  EXPECT_LT((guarded - fp32_out).abs().max().item<double>(), 0.05 * fp32_out.abs().max().item<double>());
  int64_t conv_weights = 0;
  for (const auto& p : model->named_parameters()) {
    const auto& g = p.value().grad();
    ASSERT_EQ(g.scalar_type(), torch::kFloat32) << p.key();
    const auto& want = fp32_grads.at(p.key());
    EXPECT_LT((g - want).norm().item<double>(), 0.05 * want.norm().item<double>() + 1e-6) << p.key();
    conv_weights += p.value().dim() == 4;
  }
  EXPECT_GT(conv_weights, 5);
  EXPECT_TRUE(forward().equal(fp32_out));  // the guard's scope has ended
  torch::NoGradGuard no_grad;
  convolutions_to(*model, torch::kBFloat16);
  EXPECT_TRUE(forward().equal(guarded.detach()));
}

// Float timesteps (E-TSDM conditions) are embedded as they are: integral floats equal the integer path,
// fractional ones give a distinct, finite output.
TEST(UNet, FloatAndFractionalTimesteps) {
  auto io = load_safetensors(kForward);
  auto model = load_unet(kUnetDir, torch::kCPU);
  model->eval();
  torch::NoGradGuard no_grad;
  auto x = io["x"], labels = io["class_labels"];
  auto a = model->forward(x, io["timesteps"], labels);
  auto b = model->forward(x, io["timesteps"].to(torch::kFloat32), labels);
  EXPECT_TRUE(torch::equal(a, b));
  auto t17 = model->forward(x, torch::full({4}, 17.0), labels);
  auto t17_5 = model->forward(x, torch::full({4}, 17.5), labels);
  auto t18 = model->forward(x, torch::full({4}, 18.0), labels);
  EXPECT_TRUE(torch::isfinite(t17_5).all().item<bool>());
  EXPECT_GT((t17_5 - t17).abs().max().item<double>(), 0);
  EXPECT_GT((t17_5 - t18).abs().max().item<double>(), 0);
  // A scalar timestep is broadcast to the batch.
  EXPECT_TRUE(torch::equal(model->forward(x, torch::tensor(17.0), labels), t17));
}

// get_timestep_embedding against its closed form, evaluated in double precision.
TEST(UNet, TimestepEmbeddingClosedForm) {
  auto t = torch::tensor({0.0, 0.25, 17.5, 999.0});
  for (bool flip : {false, true})
    for (double shift : {0.0, 1.0})
      for (int64_t dim : {32, 33}) {
        auto emb = timestep_embedding(t, dim, flip, shift).to(torch::kFloat64);
        ASSERT_EQ(emb.sizes(), (std::vector<int64_t>{4, dim}));
        const int64_t half = dim / 2;
        for (int64_t n = 0; n < 4; ++n)
          for (int64_t i = 0; i < half; ++i) {
            double f = std::exp(-std::log(10000.0) * double(i) / (double(half) - shift));
            double ph = t[n].item<double>() * f;
            double first = flip ? std::cos(ph) : std::sin(ph), second = flip ? std::sin(ph) : std::cos(ph);
            // float32 phases of t ~ 1000 carry ~1e-4 rad of rounding
            EXPECT_NEAR(emb[n][i].item<double>(), first, 2e-4) << n << " " << i;
            EXPECT_NEAR(emb[n][half + i].item<double>(), second, 2e-4) << n << " " << i;
          }
        if (dim % 2) EXPECT_EQ(emb.select(1, dim - 1).abs().max().item<double>(), 0.0);
      }
}

TEST(UNet, ConfigRoundTrip) {
  auto json = load_json(kUnetDir + "/config.json");
  json["my_extension"] = {{"kept", true}};
  auto config = UNetConfig::from_json(json);
  EXPECT_EQ(config.block_out_channels, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(config.num_class_embeds, std::optional<int64_t>(11));
  EXPECT_EQ(config.norm_num_groups, 8);
  EXPECT_FALSE(config.attn_norm_num_groups.has_value());
  auto out = config.to_json();
  EXPECT_EQ(out["my_extension"]["kept"], true);
  EXPECT_EQ(out["_class_name"], "UNet2DModel");
  EXPECT_FALSE(out.contains("_use_default_values"));  // diffusers would override the listed keys
  // Every key diffusers wrote comes back with its value.
  for (const auto& [key, value] : json.items())
    if (key != "_use_default_values") EXPECT_EQ(out[key], value) << key;
  EXPECT_EQ(UNetConfig::from_json(out), config);
  // Missing keys take diffusers' defaults.
  auto defaults = UNetConfig::from_json(nlohmann::json::object());
  EXPECT_EQ(defaults.block_out_channels, (std::vector<int64_t>{224, 448, 672, 896}));
  EXPECT_EQ(defaults.attention_head_dim, std::optional<int64_t>(8));
  EXPECT_EQ(defaults.norm_num_groups, 32);
}

TEST(UNet, RefusesUnsupportedConfigs) {
  auto bad = [](const char* key, nlohmann::json value) {
    auto json = load_json(kUnetDir + "/config.json");
    json[key] = value;
    expect_error([&] { UNet2DModel model(UNetConfig::from_json(json)); }, key);
  };
  bad("down_block_types", {"DownBlock2D", "CrossAttnDownBlock2D"});
  bad("up_block_types", {"AttnUpBlock2D"});
  bad("time_embedding_type", "fourier");
  bad("class_embed_type", "timestep");
  bad("resnet_time_scale_shift", "spatial");
  bad("downsample_type", "resnet");
  bad("act_fn", "gelu");
  bad("norm_num_groups", 5);
  bad("attention_head_dim", 7);
  bad("layers_per_block", "two");
  bad("block_out_channels", 32);
  bad("dropout", 1.5);
  // Sizes that would build modules until memory runs out, or convert a float to an integer out of range, are
  // refused before anything is allocated.
  bad("layers_per_block", int64_t(1) << 40);
  bad("in_channels", 1e300);
  bad("in_channels", 18446744073709551615ull);
  bad("sample_size", 1 << 20);
  bad("num_class_embeds", int64_t(1) << 40);
  bad("block_out_channels", std::vector<int64_t>(17, 32));
  bad("block_out_channels", std::vector<int64_t>{int64_t(1) << 40, 64});
}

// diffusers uses attention_head_dim only where it builds attention: 24 divides neither 64 nor 128 of a level
// without attention, but a config with attention only at a 48-channel level is fine.
TEST(UNet, HeadDimensionCheckedOnlyWhereAttentionIs) {
  UNetConfig c;
  c.sample_size = 8;
  c.in_channels = c.out_channels = 1;
  c.block_out_channels = {32, 48};
  c.layers_per_block = 1;
  c.down_block_types = {"DownBlock2D", "AttnDownBlock2D"};
  c.up_block_types = {"AttnUpBlock2D", "UpBlock2D"};
  c.norm_num_groups = 8;
  c.attention_head_dim = 24;
  c.add_attention = true;  // the mid block sits at the last level (48 channels)
  UNet2DModel model(c);
  EXPECT_EQ(model->forward(torch::randn({1, 1, 8, 8}), torch::tensor({3L})).sizes(), (std::vector<int64_t>{1, 1, 8, 8}));
  c.down_block_types = {"AttnDownBlock2D", "DownBlock2D"};  // now attention at 32 channels: 24 does not divide them
  c.up_block_types = {"UpBlock2D", "AttnUpBlock2D"};
  expect_error([&] { UNet2DModel bad(c); }, "attention_head_dim");
}

TEST(UNet, ScaleShiftAndMidBlockVariants) {
  auto config = fixture_config();
  config.resnet_time_scale_shift = "scale_shift";
  config.dropout = 0.1;
  UNet2DModel model(config);
  auto sd = state_dict(*model);
  EXPECT_EQ(sd.at("down_blocks.0.resnets.0.time_emb_proj.weight").sizes(), (std::vector<int64_t>{64, 128}));
  // diffusers' UNetMidBlock2D: with scale_shift and no attn_norm_num_groups the attention has no group norm.
  EXPECT_FALSE(sd.count("mid_block.attentions.0.group_norm.weight"));
  EXPECT_TRUE(sd.count("down_blocks.1.attentions.0.group_norm.weight"));
  config.attn_norm_num_groups = 4;
  EXPECT_TRUE(state_dict(*UNet2DModel(config)).count("mid_block.attentions.0.group_norm.weight"));
  config.add_attention = false;
  config.num_class_embeds.reset();
  auto plain = state_dict(*UNet2DModel(config));
  EXPECT_FALSE(plain.count("mid_block.attentions.0.to_q.weight"));
  EXPECT_FALSE(plain.count("class_embedding.weight"));

  // Dropout acts in training mode only.
  torch::manual_seed(0);
  auto x = torch::randn({2, 1, 16, 16});
  auto t = torch::tensor({3, 500});
  auto labels = torch::tensor({1, 2});
  torch::NoGradGuard no_grad;
  model->train();
  auto a = model->forward(x, t, labels), b = model->forward(x, t, labels);
  EXPECT_GT((a - b).abs().max().item<double>(), 0);
  model->eval();
  EXPECT_TRUE(torch::equal(model->forward(x, t, labels), model->forward(x, t, labels)));
}

TEST(UNet, SaveThenLoadGivesIdenticalOutputs) {
  auto io = load_safetensors(kForward);
  auto model = load_unet(kUnetDir, torch::kCPU);
  TempDir tmp;
  auto dir = tmp.str();
  save_unet(model, dir + "/unet");
  auto again = load_unet(dir + "/unet", torch::kCPU);
  EXPECT_EQ(again->config(), model->config());
  model->eval();
  again->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(model->forward(io["x"], io["timesteps"], io["class_labels"]),
                           again->forward(io["x"], io["timesteps"], io["class_labels"])));
  // The file holds diffusers' names and float32 tensors only.
  auto written = load_safetensors(dir + "/unet/diffusion_pytorch_model.safetensors");
  auto reference = load_safetensors(kUnetDir + "/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(written.size(), reference.size());
  for (const auto& [name, t] : reference) {
    EXPECT_EQ(written.at(name).scalar_type(), torch::kFloat32);
    EXPECT_TRUE(torch::equal(written.at(name), t)) << name;
  }
  EXPECT_EQ(load_json(dir + "/unet/config.json")["_class_name"], "UNet2DModel");
  std::filesystem::remove_all(dir);
}

// Older diffusers wrote attention weights as query/key/value/proj_attn; diffusers renames them on load
// (modeling_utils._convert_deprecated_attention_blocks), and so does diffuse.
TEST(UNet, LoadsDeprecatedAttentionNames) {
  auto reference = load_safetensors(kUnetDir + "/diffusion_pytorch_model.safetensors");
  std::map<std::string, torch::Tensor> old_names;
  int64_t renamed = 0;
  for (const auto& [name, t] : reference) {
    std::string n = name;
    for (auto [now, before] : {std::pair<std::string, std::string>{".to_q.", ".query."}, {".to_k.", ".key."},
                               {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}}) {
      auto at = n.find(now);
      if (at != std::string::npos) {
        n = n.substr(0, at) + before + n.substr(at + now.size());
        ++renamed;
        break;
      }
    }
    old_names[n] = t;
  }
  ASSERT_GT(renamed, 0);
  UNet2DModel model(fixture_config());
  load_state_dict(*model, old_names, "old-names.safetensors");
  auto loaded = state_dict(*model);
  for (const auto& [name, t] : reference) EXPECT_TRUE(torch::equal(loaded.at(name), t)) << name;
}

TEST(UNet, LoadErrorsNameTheProblem) {
  TempDir tmp;
  auto dir = tmp.str();
  expect_error([&] { load_unet(dir + "/nowhere", torch::kCPU); }, "config.json");
  // Weights that do not match the config: the mismatch is listed.
  std::filesystem::create_directories(dir + "/m");
  auto json = load_json(kUnetDir + "/config.json");
  write_file_atomic(dir + "/m/config.json", json.dump());
  expect_error([&] { load_unet(dir + "/m", torch::kCPU); }, "diffusion_pytorch_model.safetensors");
  std::filesystem::copy_file(kUnetDir + "/diffusion_pytorch_model.safetensors",
                             dir + "/m/diffusion_pytorch_model.safetensors");
  json["layers_per_block"] = 2;
  write_file_atomic(dir + "/m/config.json", json.dump());
  expect_error([&] { load_unet(dir + "/m", torch::kCPU); }, "missing: down_blocks.0.resnets.1");
  json["layers_per_block"] = 1;
  json["block_out_channels"] = {32, 128};
  write_file_atomic(dir + "/m/config.json", json.dump());
  expect_error([&] { load_unet(dir + "/m", torch::kCPU); }, "mis-shaped");
  json["block_out_channels"] = {32, 64};
  json["_class_name"] = "UNet2DConditionModel";
  write_file_atomic(dir + "/m/config.json", json.dump());
  expect_error([&] { load_unet(dir + "/m", torch::kCPU); }, "not a UNet2DModel");
  json["_class_name"] = "UNet2DModel";
  json["norm_eps"] = "small";
  write_file_atomic(dir + "/m/config.json", json.dump());
  expect_error([&] { load_unet(dir + "/m", torch::kCPU); }, "norm_eps");
  std::filesystem::remove_all(dir);
}

TEST(UNet, InputChecks) {
  auto model = load_unet(kUnetDir, torch::kCPU);
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 1, 16, 16});
  auto t = torch::tensor({1, 2});
  expect_error([&] { model->forward(x, t); }, "class-conditional");
  expect_error([&] { model->forward(x, t, torch::tensor({0, 11})); }, "[0, 11)");
  expect_error([&] { model->forward(torch::randn({2, 3, 16, 16}), t, torch::tensor({0, 1})); }, "input");
  expect_error([&] { model->forward(torch::randn({2, 1, 15, 16}), t, torch::tensor({0, 1})); }, "divisible");
  expect_error([&] { model->forward(x, torch::tensor({1, 2, 3}), torch::tensor({0, 1})); }, "timesteps");
  auto config = fixture_config();
  config.num_class_embeds.reset();
  UNet2DModel unconditional(config);
  expect_error([&] { unconditional->forward(x, t, torch::tensor({0, 1})); }, "without class embedding");
}

// Every parameter takes part in the forward pass and receives a gradient.
TEST(UNet, EveryParameterGetsAGradient) {
  auto config = fixture_config();
  config.resnet_time_scale_shift = "scale_shift";
  config.attn_norm_num_groups = 8;
  UNet2DModel model(config);
  torch::manual_seed(0);
  auto out = model->forward(torch::randn({2, 1, 16, 16}), torch::tensor({3.5, 700.0}), torch::tensor({0, 10}));
  out.pow(2).mean().backward();
  for (const auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0) << p.key();
  }
}

TEST(UNet, ReferenceConfigSize) {
  UNet2DModel model(reference_unet_config());
  int64_t n = parameter_count(*model);
  EXPECT_GT(n, 6'000'000);
  EXPECT_LT(n, 7'000'000);
  torch::NoGradGuard no_grad;
  auto out = model->forward(torch::randn({2, 1, 32, 32}), torch::tensor({1, 999}), torch::tensor({0, 10}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 1, 32, 32}));
}

// The FLOP count against a hand computation for one level, C = 8 at 4x4 (16 pixels), time embedding 32:
// time MLP 2*8*32 + 2*32*32 = 2560; conv_in 2*1*8*9*16 = 2304; down resnet 2*(2*8*8*9*16) + 2*32*8 = 37376;
// mid 2 resnets 74752 + attention 4*2*8*8*16 + 2*2*16*16*8 = 16384; up 2 resnets on 16 channels
// 2*(2*16*8*9*16 + 2*8*8*9*16 + 2*16*8*16 + 2*32*8) = 119808; conv_out 2304.
TEST(UNet, ForwardFlops) {
  UNetConfig c;
  c.in_channels = c.out_channels = 1;
  c.block_out_channels = {8};
  c.down_block_types = {"DownBlock2D"};
  c.up_block_types = {"UpBlock2D"};
  c.layers_per_block = 1;
  c.norm_num_groups = 4;
  c.attention_head_dim = 4;
  EXPECT_DOUBLE_EQ(unet_forward_flops(c, 4, 4), 255488.0);
  // The training issue's figure for the reference config: about 3.0 GFLOP per 32x32 image.
  EXPECT_NEAR(unet_forward_flops(reference_unet_config(), 32, 32) / 1e9, 3.0, 0.3);
}
