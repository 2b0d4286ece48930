#include "diffuse/models/classifier.h"
#include "diffuse/models/model_folder.h"

#include <numeric>
#include <stdexcept>

#include <torch/torch.h>

#include "models/config_json.h"

namespace diffuse {

namespace {
// The checks the classifier shares with the UNet run on the equivalent UNet config.
UNetConfig as_unet_config(const NoisyClassifierConfig& c) {
  auto u = json_config::with_encoder_of<UNetConfig>(c);
  u.out_channels = 1;
  u.up_block_types.assign(c.down_block_types.size(), "UpBlock2D");
  return u;
}
}  // namespace

void NoisyClassifierConfig::validate() const {
  if (num_classes < 2) json_config::refuse("num_classes", std::to_string(num_classes), "at least 2");
  as_unet_config(*this).validate();
}

namespace {
// Every key of NoisyClassifierConfig, once: read by from_json, written by to_json.
const auto classifier_fields = [](auto& c, auto&& f) {
  json_config::encoder_fields(c, f);
  f("num_classes", c.num_classes);
};
}  // namespace

NoisyClassifierConfig NoisyClassifierConfig::from_json(const nlohmann::json& j) {
  return json_config::read_config<NoisyClassifierConfig>(j, "a classifier config", classifier_fields);
}

nlohmann::json NoisyClassifierConfig::to_json() const {
  nlohmann::json base = extra;
  base["_class_name"] = kClassName;
  return json_config::write_config(*this, base, classifier_fields);
}

NoisyClassifierConfig classifier_config_for(const UNetConfig& unet, int64_t num_classes) {
  auto c = json_config::with_encoder_of<NoisyClassifierConfig>(unet);
  c.num_classes = num_classes;
  c.dropout = NoisyClassifierConfig().dropout;  // the classifier's own, not the diffusion model's
  c.block_out_channels.clear();
  int64_t groups = unet.norm_num_groups, head_dim = unet.attention_head_dim.value_or(0);
  for (auto ch : unet.block_out_channels) {
    int64_t half = std::max<int64_t>(ch / 2, 2);
    c.block_out_channels.push_back(half);
    groups = std::gcd(groups, half);
    if (head_dim) head_dim = std::gcd(head_dim, half);
  }
  c.norm_num_groups = groups;
  c.attention_head_dim = head_dim ? std::optional<int64_t>(head_dim) : std::nullopt;
  return c;
}

NoisyClassifierImpl::NoisyClassifierImpl(const NoisyClassifierConfig& config) : config_(config) {
  config_.validate();
  const auto& ch = config_.block_out_channels;
  const int64_t temb = ch[0] * 4;
  auto options = [&](int64_t channels) { return json_config::encoder_block_options(config_, channels); };
  conv_in = register_module(
      "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(config_.in_channels, ch[0], 3).padding(1)));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], temb));
  json_config::add_down_blocks(down_blocks, options, ch, config_.layers_per_block, config_.down_block_types,
                               config_.downsample_padding);
  register_module("down_blocks", down_blocks);
  int64_t attn_groups = config_.resnet_time_scale_shift == "default" ? config_.norm_num_groups : 0;
  mid_block = register_module("mid_block", MidBlock(options(ch.back()), ch.back(), config_.add_attention,
                                                    attn_groups, 1.0));
  conv_norm_out = register_module("conv_norm_out", torch::nn::GroupNorm(torch::nn::GroupNormOptions(
                                                       config_.norm_num_groups, ch.back()).eps(config_.norm_eps)));
  linear_out = register_module("linear_out", torch::nn::Linear(ch.back(), config_.num_classes));
}

torch::Tensor NoisyClassifierImpl::forward(const torch::Tensor& x_in, const torch::Tensor& timesteps) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == config_.in_channels, "classifier expects input [N, ",
              config_.in_channels, ", H, W], got ", x_in.sizes());
  const int64_t n = x_in.size(0);
  auto t = broadcast_timesteps(timesteps, n, x_in.device());
  auto emb = time_embedding(timestep_embedding(t, config_.block_out_channels[0], config_.flip_sin_to_cos,
                                               config_.freq_shift).to(x_in.scalar_type()));
  auto x = convolve(conv_in, x_in);
  std::vector<torch::Tensor> skips;
  for (auto& block : *down_blocks) {
    x = block->as<DownBlock>()->forward(x, emb, &skips);
    skips.clear();
  }
  x = mid_block(x, emb);
  x = torch::silu(conv_norm_out(x)).mean({2, 3});
  return linear_out(x);
}

NoisyClassifier load_classifier(const std::string& folder, torch::Device device) {
  return load_model_folder<NoisyClassifier, NoisyClassifierConfig>(
      folder, device,
      {NoisyClassifierConfig::kClassName, std::string("a diffuse noisy classifier (\"") + NoisyClassifierConfig::kClassName + "\")",
       "train one with diffuse train-classifier", true});
}

void save_classifier(NoisyClassifier& model, const std::string& folder) {
  write_model_folder(*model, model->config().to_json(), folder);
}

}  // namespace diffuse
