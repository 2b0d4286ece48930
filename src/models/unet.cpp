#include "diffuse/models/unet.h"
#include "diffuse/models/model_folder.h"

#include <set>
#include <stdexcept>

#include <torch/torch.h>

#include "models/config_json.h"

namespace diffuse {

namespace {
const std::set<std::string> kDownBlocks = {"DownBlock2D", "AttnDownBlock2D"};
const std::set<std::string> kUpBlocks = {"UpBlock2D", "AttnUpBlock2D"};
}  // namespace

void UNetConfig::validate() const {
  using json_config::refuse;
  json_config::check_levels(block_out_channels, down_block_types, up_block_types, kDownBlocks, kUpBlocks,
                            norm_num_groups);
  using json_config::kMaxChannels;
  if (in_channels <= 0 || in_channels > kMaxChannels) refuse("in_channels", std::to_string(in_channels), "a count in [1, 65536]");
  if (out_channels <= 0 || out_channels > kMaxChannels) refuse("out_channels", std::to_string(out_channels), "a count in [1, 65536]");
  if (layers_per_block <= 0 || layers_per_block > json_config::kMaxLayersPerBlock)
    refuse("layers_per_block", std::to_string(layers_per_block), "1 to 64");
  if (sample_size && (*sample_size <= 0 || *sample_size > json_config::kMaxSampleSize))
    refuse("sample_size", std::to_string(*sample_size), "1 to 16384");
  if (time_embedding_type != "positional") refuse("time_embedding_type", time_embedding_type, "positional");
  if (act_fn != "silu" && act_fn != "swish") refuse("act_fn", act_fn, "silu");
  if (downsample_type != "conv") refuse("downsample_type", downsample_type, "conv");
  if (upsample_type != "conv") refuse("upsample_type", upsample_type, "conv");
  if (class_embed_type) refuse("class_embed_type", *class_embed_type, "null (with num_class_embeds for labels)");
  if (num_class_embeds && (*num_class_embeds <= 0 || *num_class_embeds > json_config::kMaxClasses))
    refuse("num_class_embeds", std::to_string(*num_class_embeds), "a count in [1, 2^20] or null");
  if (resnet_time_scale_shift != "default" && resnet_time_scale_shift != "scale_shift")
    refuse("resnet_time_scale_shift", resnet_time_scale_shift, "default or scale_shift");
  if (downsample_padding < 0) refuse("downsample_padding", std::to_string(downsample_padding), "0 or more");
  if (!(dropout >= 0 && dropout < 1)) refuse("dropout", std::to_string(dropout), "a probability in [0, 1)");
  if (!(norm_eps > 0)) refuse("norm_eps", std::to_string(norm_eps), "a positive number");
  if (mid_block_scale_factor == 0) refuse("mid_block_scale_factor", "0", "a non-zero factor");
  if (block_out_channels[0] % 2 != 0 || freq_shift == double(block_out_channels[0] / 2))
    refuse("block_out_channels[0]", std::to_string(block_out_channels[0]),
           "an even count, not 2 * freq_shift (it sizes the timestep embedding)");
  // Only levels with attention use the head dimension (diffusers builds no attention elsewhere).
  const size_t levels = block_out_channels.size();
  for (size_t i = 0; i < levels; ++i) {
    const bool attention = down_block_types[i] == "AttnDownBlock2D" || up_block_types[levels - 1 - i] == "AttnUpBlock2D" ||
                           (add_attention && i + 1 == levels);
    const int64_t c = block_out_channels[i];
    if (attention && attention_head_dim && (*attention_head_dim <= 0 || c % *attention_head_dim != 0))
      refuse("attention_head_dim", std::to_string(*attention_head_dim),
             "a divisor of the channels of every level with attention (" + std::to_string(c) + ")");
  }
  if (attn_norm_num_groups && (*attn_norm_num_groups <= 0 || block_out_channels.back() % *attn_norm_num_groups))
    refuse("attn_norm_num_groups", std::to_string(*attn_norm_num_groups),
           "null or a divisor of the last block_out_channels entry");
}

namespace {
// Every key of UNetConfig, once: read by from_json, written by to_json.
const auto unet_fields = [](auto& c, auto&& f) {
  json_config::encoder_fields(c, f);
  f("out_channels", c.out_channels);
  f("center_input_sample", c.center_input_sample);
  f("time_embedding_type", c.time_embedding_type);
  f("up_block_types", c.up_block_types);
  f("mid_block_scale_factor", c.mid_block_scale_factor, json_config::Style::integral);
  f("downsample_type", c.downsample_type);
  f("upsample_type", c.upsample_type);
  f("act_fn", c.act_fn);
  f("attn_norm_num_groups", c.attn_norm_num_groups);
  f("class_embed_type", c.class_embed_type);
  f("num_class_embeds", c.num_class_embeds);
  f("num_train_timesteps", c.num_train_timesteps);
};
}  // namespace

UNetConfig UNetConfig::from_json(const nlohmann::json& j) {
  return json_config::read_config<UNetConfig>(j, "a UNet config", unet_fields, {"_use_default_values"});
}

nlohmann::json UNetConfig::to_json() const {
  const nlohmann::json identity = {{"_class_name", "UNet2DModel"}, {"_diffusers_version", "0.25.0"}};
  return json_config::write_config(*this, json_config::with_defaults(extra, identity), unet_fields);
}

UNetConfig reference_unet_config() {
  UNetConfig c;
  c.sample_size = 32;
  c.in_channels = 1;
  c.out_channels = 1;
  c.block_out_channels = {64, 128, 128};
  c.down_block_types = {"DownBlock2D", "AttnDownBlock2D", "DownBlock2D"};
  c.up_block_types = {"UpBlock2D", "AttnUpBlock2D", "UpBlock2D"};
  c.layers_per_block = 2;
  c.norm_num_groups = 32;
  c.num_class_embeds = 11;
  return c;
}

UNet2DModelImpl::UNet2DModelImpl(const UNetConfig& config) : config_(config) {
  config_.validate();
  const auto& ch = config_.block_out_channels;
  const int64_t levels = int64_t(ch.size()), temb = ch[0] * 4;
  auto options = [&](int64_t channels) { return json_config::encoder_block_options(config_, channels); };
  conv_in = register_module(
      "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(config_.in_channels, ch[0], 3).padding(1)));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], temb));
  if (config_.num_class_embeds)
    class_embedding = register_module("class_embedding", torch::nn::Embedding(*config_.num_class_embeds, temb));

  json_config::add_down_blocks(down_blocks, options, ch, config_.layers_per_block, config_.down_block_types,
                               config_.downsample_padding);
  register_module("down_blocks", down_blocks);

  // UNetMidBlock2D: without attn_norm_num_groups its attention has group norm only with "default".
  int64_t attn_groups = config_.attn_norm_num_groups.value_or(
      config_.resnet_time_scale_shift == "default" ? config_.norm_num_groups : 0);
  mid_block = register_module("mid_block", MidBlock(options(ch.back()), ch.back(), config_.add_attention,
                                                    attn_groups, config_.mid_block_scale_factor));

  int64_t out = ch.back();
  for (int64_t i = 0; i < levels; ++i) {
    int64_t prev = out;
    out = ch[levels - 1 - i];
    int64_t in = ch[std::max<int64_t>(levels - 2 - i, 0)];
    up_blocks->push_back(UpBlock(options(out), in, prev, out, config_.layers_per_block + 1,
                                 config_.up_block_types[i] == "AttnUpBlock2D", i + 1 < levels));
  }
  register_module("up_blocks", up_blocks);

  conv_norm_out = register_module(
      "conv_norm_out", torch::nn::GroupNorm(torch::nn::GroupNormOptions(config_.norm_num_groups, ch[0]).eps(config_.norm_eps)));
  conv_out = register_module(
      "conv_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(ch[0], config_.out_channels, 3).padding(1)));
}

torch::Tensor broadcast_timesteps(const torch::Tensor& timesteps, int64_t n, torch::Device device) {
  TORCH_CHECK(timesteps.defined(), "timesteps are undefined");
  TORCH_CHECK(timesteps.dim() == 0 || (timesteps.dim() == 1 && (timesteps.size(0) == n || timesteps.size(0) == 1)),
              "timesteps must be a scalar or have shape [", n, "] to match the batch, got ", timesteps.sizes());
  return timesteps.reshape({-1}).expand({n}).to(device);
}

torch::Tensor UNet2DModelImpl::forward(const torch::Tensor& x_in, const torch::Tensor& timesteps,
                                       const torch::Tensor& class_labels) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == config_.in_channels, "UNet expects input [N, ",
              config_.in_channels, ", H, W], got ", x_in.sizes());
  const int64_t n = x_in.size(0), down = int64_t(1) << (config_.block_out_channels.size() - 1);
  TORCH_CHECK(x_in.size(2) % down == 0 && x_in.size(3) % down == 0, "UNet input height and width must be divisible by ",
              down, " (2^(levels - 1)), got ", x_in.size(2), "x", x_in.size(3), " (pad the images)");
  auto x = config_.center_input_sample ? 2 * x_in - 1.0 : x_in;

  auto t = broadcast_timesteps(timesteps, n, x.device());
  auto emb = time_embedding(timestep_embedding(t, config_.block_out_channels[0], config_.flip_sin_to_cos,
                                               config_.freq_shift).to(x.scalar_type()));
  if (class_embedding) {
    TORCH_CHECK(class_labels.defined(), "this UNet is class-conditional (num_class_embeds = ",
                *config_.num_class_embeds, "): pass class labels");
    TORCH_CHECK(class_labels.dim() == 1 && class_labels.size(0) == n, "class_labels must have shape [", n,
                "], got ", class_labels.sizes());
    // Checked where it costs no wait: labels already on a GPU are checked by the embedding's own device assert.
    TORCH_CHECK(!class_labels.device().is_cpu() || class_labels.numel() == 0 ||
                    (class_labels.min().item<int64_t>() >= 0 &&
                     class_labels.max().item<int64_t>() < *config_.num_class_embeds),
                "class labels must lie in [0, ", *config_.num_class_embeds, ")");
    auto labels = class_labels.to(x.device(), torch::kLong);
    emb = emb + class_embedding(labels).to(emb.scalar_type());
  } else {
    TORCH_CHECK(!class_labels.defined(), "class labels were passed to a UNet without class embedding "
                                         "(num_class_embeds is null in its config)");
  }

  x = convolve(conv_in, x);
  std::vector<torch::Tensor> skips{x};
  for (auto& block : *down_blocks) x = block->as<DownBlock>()->forward(x, emb, &skips);
  x = mid_block(x, emb);
  for (auto& block : *up_blocks) x = block->as<UpBlock>()->forward(x, emb, &skips);
  auto h = conv_norm_out(x);
  return convolve(conv_out, torch::GradMode::is_enabled() ? torch::silu(h) : torch::silu_(h));
}

namespace {
// FLOPs of the pieces, per image: 2 * multiply-accumulates.
double conv_flops(int64_t in, int64_t out, int64_t k, int64_t pixels) { return 2.0 * in * out * k * k * pixels; }
double resnet_flops(int64_t in, int64_t out, int64_t temb, bool scale_shift, int64_t pixels) {
  return conv_flops(in, out, 3, pixels) + conv_flops(out, out, 3, pixels) +
         (in != out ? conv_flops(in, out, 1, pixels) : 0.0) + 2.0 * temb * out * (scale_shift ? 2 : 1);
}
double attention_flops(int64_t c, int64_t pixels) {
  return 4 * 2.0 * c * c * pixels + 2 * 2.0 * double(pixels) * pixels * c;
}
}  // namespace

double unet_forward_flops(const UNetConfig& c, int64_t height, int64_t width) {
  c.validate();
  const auto& ch = c.block_out_channels;
  const int64_t levels = int64_t(ch.size()), temb = ch[0] * 4;
  const bool ss = c.resnet_time_scale_shift == "scale_shift";
  double flops = 2.0 * ch[0] * temb + 2.0 * temb * temb;  // time embedding MLP
  int64_t h = height, w = width;
  flops += conv_flops(c.in_channels, ch[0], 3, h * w);
  for (int64_t i = 0; i < levels; ++i) {
    const bool attn = c.down_block_types[i] == "AttnDownBlock2D";
    for (int64_t l = 0; l < c.layers_per_block; ++l) {
      flops += resnet_flops(l == 0 ? (i == 0 ? ch[0] : ch[i - 1]) : ch[i], ch[i], temb, ss, h * w);
      if (attn) flops += attention_flops(ch[i], h * w);
    }
    if (i + 1 < levels) {
      h = (h + 2 * c.downsample_padding - 3 + (c.downsample_padding == 0)) / 2 + 1;
      w = (w + 2 * c.downsample_padding - 3 + (c.downsample_padding == 0)) / 2 + 1;
      flops += conv_flops(ch[i], ch[i], 3, h * w);
    }
  }
  flops += 2 * resnet_flops(ch.back(), ch.back(), temb, ss, h * w) +
           (c.add_attention ? attention_flops(ch.back(), h * w) : 0.0);
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t out = ch[levels - 1 - i], prev = i == 0 ? ch.back() : ch[levels - i],
                  in = ch[std::max<int64_t>(levels - 2 - i, 0)];
    const bool attn = c.up_block_types[i] == "AttnUpBlock2D";
    for (int64_t l = 0; l <= c.layers_per_block; ++l) {
      int64_t skip = l == c.layers_per_block ? in : out;
      flops += resnet_flops((l == 0 ? prev : out) + skip, out, temb, ss, h * w);
      if (attn) flops += attention_flops(out, h * w);
    }
    if (i + 1 < levels) {
      h *= 2;
      w *= 2;
      flops += conv_flops(out, out, 3, h * w);
    }
  }
  return flops + conv_flops(ch[0], c.out_channels, 3, h * w);
}

UNet2DModel load_unet(const std::string& folder, torch::Device device) {
  return load_model_folder<UNet2DModel, UNetConfig>(folder, device,
                                                    {"UNet2DModel", "a UNet2DModel", "pass the model's unet/ folder"});
}

void save_unet(UNet2DModel& model, const std::string& folder) {
  write_model_folder(*model, model->config().to_json(), folder);
}

}  // namespace diffuse
