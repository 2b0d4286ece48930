#include "diffuse/models/unet_condition.h"

#include <set>
#include <stdexcept>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/recompute.h"
#include "diffuse/models/unet.h"
#include "models/config_json.h"

namespace diffuse {
namespace {

using json_config::refuse;

const std::set<std::string> kDownBlocks = {"DownBlock2D", "CrossAttnDownBlock2D"};
const std::set<std::string> kUpBlocks = {"UpBlock2D", "CrossAttnUpBlock2D"};

// Keys of UNet2DConditionModel that SD 1.x / 2.x leave at these values; any other value builds another network.
const nlohmann::json& neutral_keys() {
  static const nlohmann::json keys = {
      {"act_fn", "silu"}, {"addition_embed_type", nullptr}, {"addition_time_embed_dim", nullptr},
      {"attention_type", "default"}, {"class_embed_type", nullptr}, {"class_embeddings_concat", false},
      {"conv_in_kernel", 3}, {"conv_out_kernel", 3}, {"cross_attention_norm", nullptr},
      {"dual_cross_attention", false}, {"encoder_hid_dim", nullptr}, {"encoder_hid_dim_type", nullptr},
      {"mid_block_only_cross_attention", nullptr}, {"mid_block_type", "UNetMidBlock2DCrossAttn"},
      {"num_attention_heads", nullptr}, {"num_class_embeds", nullptr}, {"only_cross_attention", false},
      {"projection_class_embeddings_input_dim", nullptr}, {"resnet_out_scale_factor", 1.0},
      {"resnet_skip_time_act", false}, {"resnet_time_scale_shift", "default"},
      {"reverse_transformer_layers_per_block", nullptr}, {"time_cond_proj_dim", nullptr},
      {"time_embedding_act_fn", nullptr}, {"time_embedding_dim", nullptr}, {"time_embedding_type", "positional"},
      {"timestep_post_act", nullptr}, {"transformer_layers_per_block", 1}};
  return keys;
}
// Keys that do not change the network.
const std::set<std::string> kInertKeys = {"_class_name", "_diffusers_version", "_name_or_path",
                                          "addition_embed_type_num_heads", "_use_default_values"};

bool is_neutral(const std::string& key, const nlohmann::json& v) {
  const auto& want = neutral_keys().at(key);
  if (v == want || (key == "act_fn" && v == "swish")) return true;
  if (!v.is_array() || v.empty()) return false;  // a per-level list holding the neutral value everywhere
  for (const auto& e : v)
    if (e != want) return false;
  return true;
}

const auto condition_fields = [](auto& c, auto&& f) {
  f("sample_size", c.sample_size);
  f("in_channels", c.in_channels);
  f("out_channels", c.out_channels);
  f("center_input_sample", c.center_input_sample);
  f("flip_sin_to_cos", c.flip_sin_to_cos);
  f("freq_shift", c.freq_shift, json_config::Style::integral);
  f("down_block_types", c.down_block_types);
  f("up_block_types", c.up_block_types);
  f("block_out_channels", c.block_out_channels);
  f("layers_per_block", c.layers_per_block);
  f("downsample_padding", c.downsample_padding);
  f("mid_block_scale_factor", c.mid_block_scale_factor, json_config::Style::integral);
  f("dropout", c.dropout);
  f("norm_eps", c.norm_eps);
  f("norm_num_groups", c.norm_num_groups);
  f("cross_attention_dim", c.cross_attention_dim);
  f("use_linear_projection", c.use_linear_projection);
  f("upcast_attention", c.upcast_attention);
};

}  // namespace

UNetConditionConfig UNetConditionConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("a UNet config must be a JSON object");
  UNetConditionConfig c;
  json_config::Reader r(j);
  condition_fields(c, r);
  std::optional<int64_t> one_head_count;
  if (j.contains("attention_head_dim")) {
    const auto& a = j["attention_head_dim"];
    if (a.is_array()) {
      json_config::convert("attention_head_dim", a, c.heads);
    } else {
      int64_t n = 8;
      json_config::convert("attention_head_dim", a, n);
      one_head_count = n;
    }
  }
  if (one_head_count || !j.contains("attention_head_dim"))
    c.heads.assign(c.block_out_channels.size(), one_head_count.value_or(8));
  auto read_elsewhere = kInertKeys;
  read_elsewhere.insert("attention_head_dim");
  const auto unread = r.unread(read_elsewhere);
  for (const auto& [key, value] : unread.items()) {
    if (!neutral_keys().contains(key))
      refuse(key, value.dump(), "no such key: diffuse does not know what it changes in UNet2DConditionModel");
    if (!is_neutral(key, value))
      refuse(key, value.dump(), neutral_keys().at(key).dump() + ", the value of Stable Diffusion 1.x / 2.x (" +
                                    (key == "num_attention_heads" ? std::string("diffusers itself refuses it for this class: "
                                                                                "give attention_head_dim")
                                                                  : std::string("diffuse does not build the network it asks for")) +
                                    ")");
  }
  if (j.contains("_class_name") && j["_class_name"] != "UNet2DConditionModel")
    refuse("_class_name", j["_class_name"].dump(), "UNet2DConditionModel");
  c.json = j;
  return c;
}

nlohmann::json UNetConditionConfig::to_json() const {
  nlohmann::json j = json_config::with_defaults(json, neutral_keys());
  j["_class_name"] = "UNet2DConditionModel";
  if (!j.contains("_diffusers_version")) j["_diffusers_version"] = "0.40.0";
  j.erase("_use_default_values");
  condition_fields(*this, json_config::Writer(j));
  const bool same = std::all_of(heads.begin(), heads.end(), [&](int64_t h) { return h == heads[0]; });
  j["attention_head_dim"] = same && !(json.contains("attention_head_dim") && json["attention_head_dim"].is_array())
                                ? nlohmann::json(heads[0])
                                : nlohmann::json(heads);
  return j;
}

void UNetConditionConfig::validate() const {
  json_config::check_levels(block_out_channels, down_block_types, up_block_types, kDownBlocks, kUpBlocks,
                            norm_num_groups);
  const size_t levels = block_out_channels.size();
  for (size_t i = 0; i < levels; ++i)
    if ((down_block_types[i] == "CrossAttnDownBlock2D") != (up_block_types[levels - 1 - i] == "CrossAttnUpBlock2D"))
      refuse("up_block_types", up_block_types[levels - 1 - i],
             "the mirror of down_block_types (cross-attention at the same levels on both sides)");
  using json_config::kMaxChannels;
  if (in_channels <= 0 || in_channels > kMaxChannels) refuse("in_channels", std::to_string(in_channels), "a count in [1, 65536]");
  if (out_channels <= 0 || out_channels > kMaxChannels) refuse("out_channels", std::to_string(out_channels), "a count in [1, 65536]");
  if (layers_per_block <= 0 || layers_per_block > json_config::kMaxLayersPerBlock)
    refuse("layers_per_block", std::to_string(layers_per_block), "1 to 64");
  if (sample_size && (*sample_size <= 0 || *sample_size > json_config::kMaxSampleSize))
    refuse("sample_size", std::to_string(*sample_size), "1 to 16384");
  if (cross_attention_dim <= 0 || cross_attention_dim > kMaxChannels)
    refuse("cross_attention_dim", std::to_string(cross_attention_dim), "one width in [1, 65536]");
  if (heads.size() != levels)
    refuse("attention_head_dim", std::to_string(heads.size()) + " entries", "an int or one entry per level");
  for (size_t i = 0; i < levels; ++i)
    if (heads[i] <= 0 || block_out_channels[i] % heads[i])
      refuse("attention_head_dim", std::to_string(heads[i]),
             "head counts dividing each level's channels (diffusers' legacy name: it counts heads)");
  if (downsample_padding < 0) refuse("downsample_padding", std::to_string(downsample_padding), "0 or more");
  if (!(dropout >= 0 && dropout < 1)) refuse("dropout", std::to_string(dropout), "a probability in [0, 1)");
  if (!(norm_eps > 0)) refuse("norm_eps", std::to_string(norm_eps), "a positive number");
  if (mid_block_scale_factor == 0) refuse("mid_block_scale_factor", "0", "a non-zero factor");
  if (block_out_channels[0] % 2 != 0) refuse("block_out_channels[0]", std::to_string(block_out_channels[0]), "an even count");
}

UNetConditionConfig sd15_unet_config() {
  UNetConditionConfig c;
  c.sample_size = 64;
  c.cross_attention_dim = 768;
  return c;
}

UNetConditionConfig sd21_unet_config() {
  UNetConditionConfig c;
  c.sample_size = 96;
  c.cross_attention_dim = 1024;
  c.heads = {5, 10, 20, 20};
  c.use_linear_projection = true;
  c.upcast_attention = true;
  c.json = {{"attention_head_dim", c.heads}};
  return c;
}

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConditionConfig& config) : config_(config) {
  config_.validate();
  const auto& ch = config_.block_out_channels;
  const int64_t levels = int64_t(ch.size()), temb = ch[0] * 4;
  auto options = [&](size_t level, bool cross_attention) {
    auto o = json_config::block_options(temb, config_.norm_num_groups, config_.norm_eps, config_.dropout, "default",
                                        std::nullopt, ch[level]);
    o.transformer_heads = cross_attention ? config_.heads[level] : 0;
    o.cross_attention_dim = config_.cross_attention_dim;
    o.use_linear_projection = config_.use_linear_projection;
    o.upcast_attention = config_.upcast_attention;
    return o;
  };
  conv_in = register_module("conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(config_.in_channels, ch[0], 3).padding(1)));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], temb));
  for (int64_t i = 0, out = ch[0]; i < levels; ++i) {
    const int64_t in = out;
    out = ch[size_t(i)];
    down_blocks->push_back(DownBlock(options(size_t(i), config_.cross_attention(size_t(i))), in, out,
                                     config_.layers_per_block, config_.cross_attention(size_t(i)), i + 1 < levels,
                                     config_.downsample_padding));
  }
  register_module("down_blocks", down_blocks);
  mid_block = register_module("mid_block", MidBlock(options(size_t(levels - 1), true), ch.back(), true,
                                                    config_.norm_num_groups, config_.mid_block_scale_factor));
  int64_t out = ch.back();
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t prev = out;
    const size_t level = size_t(levels - 1 - i);
    out = ch[level];
    const int64_t in = ch[size_t(std::max<int64_t>(levels - 2 - i, 0))];
    const bool cross = config_.up_block_types[size_t(i)] == "CrossAttnUpBlock2D";
    up_blocks->push_back(UpBlock(options(level, cross), in, prev, out, config_.layers_per_block + 1, cross, i + 1 < levels));
  }
  register_module("up_blocks", up_blocks);
  conv_norm_out = register_module(
      "conv_norm_out", torch::nn::GroupNorm(torch::nn::GroupNormOptions(config_.norm_num_groups, ch[0]).eps(config_.norm_eps)));
  conv_out = register_module("conv_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(ch[0], config_.out_channels, 3).padding(1)));
}

torch::Tensor UNet2DConditionModelImpl::forward(const torch::Tensor& x_in, const torch::Tensor& timesteps,
                                                const torch::Tensor& context) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == config_.in_channels, "UNet expects input [N, ", config_.in_channels,
              ", H, W], got ", x_in.sizes());
  const int64_t n = x_in.size(0), down = int64_t(1) << (config_.block_out_channels.size() - 1);
  TORCH_CHECK(x_in.size(2) % down == 0 && x_in.size(3) % down == 0, "UNet input height and width must be divisible by ",
              down, ", got ", x_in.size(2), "x", x_in.size(3), " (latent sizes: image sizes divided by the VAE's factor)");
  TORCH_CHECK(context.defined() && context.dim() == 3 && context.size(0) == n &&
                  context.size(2) == config_.cross_attention_dim,
              "this UNet attends to text states [", n, ", L, ", config_.cross_attention_dim, "] (cross_attention_dim), got ",
              context.defined() ? context.sizes() : torch::IntArrayRef{});
  auto x = config_.center_input_sample ? 2 * x_in - 1.0 : x_in;
  auto t = broadcast_timesteps(timesteps, n, x.device());
  auto emb = time_embedding(timestep_embedding(t, config_.block_out_channels[0], config_.flip_sin_to_cos,
                                               config_.freq_shift).to(x.scalar_type()));
  auto ctx = context.to(x.device(), x.scalar_type());
  x = convolve(conv_in, x);
  std::vector<torch::Tensor> skips{x};
  if (checkpointing_ && torch::GradMode::is_enabled()) {
    x = checkpointed_blocks(x, emb, ctx, skips);
  } else {
    for (auto& block : *down_blocks) x = block->as<DownBlock>()->forward(x, emb, &skips, ctx);
    x = mid_block->forward(x, emb, ctx);
    for (auto& block : *up_blocks) x = block->as<UpBlock>()->forward(x, emb, &skips, ctx);
  }
  auto h = conv_norm_out(x);
  return convolve(conv_out, torch::GradMode::is_enabled() ? torch::silu(h) : torch::silu_(h));
}

torch::Tensor UNet2DConditionModelImpl::checkpointed_blocks(torch::Tensor x, const torch::Tensor& emb,
                                                           const torch::Tensor& ctx, std::vector<torch::Tensor>& skips) {
  // A down block's output is its last skip, so only the skips leave it (no tensor twice).
  for (auto& block : *down_blocks) {
    auto* b = block->as<DownBlock>();
    auto outs = recomputed_in_backward(
        [b](const std::vector<torch::Tensor>& in) {
          std::vector<torch::Tensor> local;
          b->forward(in[0], in[1], &local, in[2]);
          return local;
        },
        {x, emb, ctx});
    skips.insert(skips.end(), outs.begin(), outs.end());
    x = outs.back();
  }
  auto* mid = mid_block.get();
  x = recomputed_in_backward([mid](const std::vector<torch::Tensor>& in) { return std::vector<torch::Tensor>{mid->forward(in[0], in[1], in[2])}; },
                             {x, emb, ctx})[0];
  for (auto& block : *up_blocks) {
    auto* b = block->as<UpBlock>();
    const auto taken = size_t(b->skips_taken());
    std::vector<torch::Tensor> inputs = {x, emb, ctx};
    inputs.insert(inputs.end(), skips.end() - long(taken), skips.end());
    skips.resize(skips.size() - taken);
    x = recomputed_in_backward(
        [b](const std::vector<torch::Tensor>& in) {
          std::vector<torch::Tensor> local(in.begin() + 3, in.end());
          return std::vector<torch::Tensor>{b->forward(in[0], in[1], &local, in[2])};
        },
        inputs)[0];
  }
  return x;
}

UNet2DConditionModel load_unet_condition(const std::string& folder, torch::Device device) {
  namespace fs = std::filesystem;
  auto json = read_model_config(folder);
  const std::string path = (fs::path(folder) / kConfigFile).string();
  check_model_kind(json, path, {"UNet2DConditionModel", "a UNet2DConditionModel", "pass a pipeline's unet/ folder", true});
  UNetConditionConfig config;
  try {
    config = UNetConditionConfig::from_json(json);
    config.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
  const auto weights = find_weights_file(
      folder, {kWeightsFile, "diffusion_pytorch_model.fp16.safetensors"},
      fs::exists(fs::path(folder) / "diffusion_pytorch_model.safetensors.index.json")
          ? ": sharded weights are not read yet, merge the shards into one file"
          : "");
  UNet2DConditionModel model(config);
  auto tensors = load_safetensors(weights);
  check_finite_weights(tensors, weights);
  load_state_dict(*model, tensors, weights);
  model->to(device);
  return model;
}

void save_unet_condition(UNet2DConditionModel& model, const std::string& folder) {
  write_model_folder(*model, model->config().to_json(), folder);
}

}  // namespace diffuse
