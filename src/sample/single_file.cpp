#include "diffuse/sample/single_file.h"

#include <filesystem>
#include <regex>
#include <set>
#include <stdexcept>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"

namespace fs = std::filesystem;

namespace diffuse {
namespace {

constexpr const char* kUnetPrefix = "model.diffusion_model.";
constexpr const char* kVaePrefix = "first_stage_model.";
constexpr const char* kClipPrefix = "cond_stage_model.transformer.";
constexpr const char* kOpenClipPrefix = "cond_stage_model.model.";

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t dot; (dot = s.find('.', start)) != std::string::npos; start = dot + 1) parts.push_back(s.substr(start, dot - start));
  parts.push_back(s.substr(start));
  return parts;
}

std::string join(const std::vector<std::string>& parts, size_t from) {
  std::string out;
  for (size_t i = from; i < parts.size(); ++i) out += (out.empty() ? "" : ".") + parts[i];
  return out;
}

bool is_index(const std::string& s) { return !s.empty() && s.size() < 6 && std::all_of(s.begin(), s.end(), ::isdigit); }

// LDM's ResBlock names inside a resnet.
std::string resnet_name(const std::string& rest) {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"in_layers.0.", "norm1."}, {"in_layers.2.", "conv1."}, {"out_layers.0.", "norm2."}, {"out_layers.3.", "conv2."},
      {"emb_layers.1.", "time_emb_proj."}, {"skip_connection.", "conv_shortcut."}};
  for (const auto& [from, to] : names)
    if (starts_with(rest, from)) return to + rest.substr(from.size());
  return "";
}

// The tensors whose name starts with `prefix`, the prefix removed.
std::map<std::string, torch::Tensor> under(const std::map<std::string, torch::Tensor>& all, const std::string& prefix) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : all)
    if (starts_with(name, prefix)) out[name.substr(prefix.size())] = t;
  return out;
}

const torch::Tensor& need(const std::map<std::string, torch::Tensor>& m, const std::string& name, const std::string& path) {
  const auto it = m.find(name);
  if (it == m.end())
    throw std::runtime_error("'" + path + "' has no tensor " + name + ": not a Stable Diffusion 1.x / 2.x checkpoint in "
                             "the original layout");
  return it->second;
}

// Renames every tensor by `rename` ("" = not in the map: an error naming it).
std::map<std::string, torch::Tensor> renamed(const std::map<std::string, torch::Tensor>& in, const std::string& prefix,
                                             const std::string& path,
                                             const std::function<std::string(const std::string&)>& rename) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : in) {
    const auto to = rename(name);
    if (to.empty())
      throw std::runtime_error("'" + path + "': tensor " + prefix + name + " is not part of a Stable Diffusion 1.x / 2.x "
                               "network (the single-file key map does not place it)");
    out[to] = t;
  }
  return out;
}

// ---- configs inferred from the shapes ----

UNetConditionConfig infer_unet(const std::map<std::string, torch::Tensor>& u, const std::string& path, bool sd2,
                               bool v_prediction) {
  UNetConditionConfig c;
  int64_t first_op = -1, last_input = 0;
  static const std::regex input(R"(input_blocks\.(\d+)\.(\d+)\.(.*))");
  for (const auto& [name, t] : u) {
    std::smatch m;
    if (!std::regex_match(name, m, input)) continue;
    const int64_t i = std::stoll(m[1]);
    last_input = std::max(last_input, i);
    if (starts_with(m[3].str(), "op.") && (first_op < 0 || i < first_op)) first_op = i;
  }
  if (first_op < 2) throw std::runtime_error("'" + path + "': cannot tell the UNet's levels (no input_blocks.N.0.op)");
  c.layers_per_block = first_op - 1;
  const int64_t levels = (last_input + 1) / first_op;
  c.block_out_channels.clear();
  c.down_block_types.clear();
  c.up_block_types.assign(size_t(levels), "");
  for (int64_t b = 0; b < levels; ++b) {
    const std::string block = "input_blocks." + std::to_string(1 + b * first_op);
    c.block_out_channels.push_back(need(u, block + ".0.in_layers.2.weight", path).size(0));
    const bool cross = u.count(block + ".1.proj_in.weight") > 0;
    c.down_block_types.push_back(cross ? "CrossAttnDownBlock2D" : "DownBlock2D");
    c.up_block_types[size_t(levels - 1 - b)] = cross ? "CrossAttnUpBlock2D" : "UpBlock2D";
  }
  const torch::Tensor conv_in = need(u, "input_blocks.0.0.weight", path);
  c.in_channels = conv_in.size(1);
  c.out_channels = need(u, "out.2.weight", path).size(0);
  const torch::Tensor proj_in = need(u, "input_blocks.1.1.proj_in.weight", path);
  c.use_linear_projection = proj_in.dim() == 2;
  c.cross_attention_dim = need(u, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", path).size(1);
  // Heads are not in the shapes: SD 1.x has 8 per level, SD 2.x heads of width 64 (its attention_head_dim [5, 10, 20,
  // 20] at 320, 640, 1280, 1280 channels).
  c.heads.clear();
  for (auto ch : c.block_out_channels) c.heads.push_back(sd2 ? std::max<int64_t>(1, ch / 64) : 8);
  if (sd2) c.json["attention_head_dim"] = c.heads;
  c.upcast_attention = sd2;
  c.sample_size = v_prediction ? 96 : 64;
  return c;
}

AutoencoderKLConfig infer_vae(const std::map<std::string, torch::Tensor>& v, const std::string& path, bool v_prediction) {
  AutoencoderKLConfig c;
  c.block_out_channels.clear();
  for (int64_t i = 0; v.count("encoder.down." + std::to_string(i) + ".block.0.conv1.weight"); ++i)
    c.block_out_channels.push_back(v.at("encoder.down." + std::to_string(i) + ".block.0.conv1.weight").size(0));
  if (c.block_out_channels.empty()) throw std::runtime_error("'" + path + "' has no autoencoder (first_stage_model.)");
  const size_t levels = c.block_out_channels.size();
  c.down_block_types.assign(levels, "DownEncoderBlock2D");
  c.up_block_types.assign(levels, "UpDecoderBlock2D");
  int64_t layers = 0;
  while (v.count("encoder.down.0.block." + std::to_string(layers) + ".conv1.weight")) ++layers;
  c.layers_per_block = layers;
  c.in_channels = need(v, "encoder.conv_in.weight", path).size(1);
  c.out_channels = need(v, "decoder.conv_out.weight", path).size(0);
  c.latent_channels = need(v, "decoder.conv_in.weight", path).size(1);
  c.sample_size = v_prediction ? 768 : 512;
  return c;
}

ClipTextConfig infer_text(const std::map<std::string, torch::Tensor>& t, bool openclip, const std::string& path) {
  ClipTextConfig c;
  const std::string token = openclip ? "token_embedding.weight" : "text_model.embeddings.token_embedding.weight";
  const std::string position = openclip ? "positional_embedding" : "text_model.embeddings.position_embedding.weight";
  c.vocab_size = need(t, token, path).size(0);
  c.hidden_size = need(t, token, path).size(1);
  c.max_position_embeddings = need(t, position, path).size(0);
  c.intermediate_size =
      need(t, openclip ? "transformer.resblocks.0.mlp.c_fc.weight" : "text_model.encoder.layers.0.mlp.fc1.weight", path).size(0);
  int64_t layers = 0;
  while (t.count(openclip ? "transformer.resblocks." + std::to_string(layers) + ".ln_1.weight"
                          : "text_model.encoder.layers." + std::to_string(layers) + ".layer_norm1.weight"))
    ++layers;
  c.num_hidden_layers = openclip && layers == 24 ? 23 : layers;  // diffusers drops OpenCLIP's resblocks.23
  c.num_attention_heads = std::max<int64_t>(1, c.hidden_size / 64);
  c.hidden_act = openclip ? "gelu" : "quick_gelu";
  c.json = {{"architectures", {"CLIPTextModel"}}, {"model_type", "clip_text_model"}, {"bos_token_id", 0},
            {"pad_token_id", 1}};
  return c;
}

// ---- the text encoders' key maps ----

std::map<std::string, torch::Tensor> openclip_to_transformers(const std::map<std::string, torch::Tensor>& t,
                                                               int64_t layers, const std::string& path,
                                                               std::vector<std::string>& skipped) {
  std::map<std::string, torch::Tensor> out;
  static const std::regex block(R"(transformer\.resblocks\.(\d+)\.(.*))");
  static const std::vector<std::pair<std::string, std::string>> parts = {
      {"ln_1.", "layer_norm1."}, {"ln_2.", "layer_norm2."}, {"mlp.c_fc.", "mlp.fc1."}, {"mlp.c_proj.", "mlp.fc2."},
      {"attn.out_proj.", "self_attn.out_proj."}};
  for (const auto& [name, tensor] : t) {
    std::smatch m;
    if (name == "token_embedding.weight") out["text_model.embeddings.token_embedding.weight"] = tensor;
    else if (name == "positional_embedding") out["text_model.embeddings.position_embedding.weight"] = tensor;
    else if (starts_with(name, "ln_final.")) out["text_model.final_layer_norm." + name.substr(9)] = tensor;
    else if (name == "text_projection" || name == "logit_scale") skipped.push_back(kOpenClipPrefix + name);
    else if (std::regex_match(name, m, block)) {
      const std::string layer = "text_model.encoder.layers." + m[1].str() + ".", rest = m[2];
      if (std::stoll(m[1]) >= layers) {
        skipped.push_back(std::string(kOpenClipPrefix) + "transformer.resblocks." + m[1].str() + ".*");
        continue;
      }
      if (starts_with(rest, "attn.in_proj_")) {  // q, k, v stacked along the output axis
        const auto qkv = tensor.chunk(3, 0);
        const std::string kind = rest.substr(13);  // weight or bias
        for (int i = 0; i < 3; ++i)
          out[layer + "self_attn." + std::string(i == 0 ? "q" : i == 1 ? "k" : "v") + "_proj." + kind] = qkv[size_t(i)];
        continue;
      }
      std::string mapped;
      for (const auto& [from, to] : parts)
        if (starts_with(rest, from)) mapped = to + rest.substr(from.size());
      if (mapped.empty())
        throw std::runtime_error("'" + path + "': tensor " + kOpenClipPrefix + name + " is not part of OpenCLIP's text tower");
      out[layer + mapped] = tensor;
    } else {
      throw std::runtime_error("'" + path + "': tensor " + kOpenClipPrefix + name + " is not part of OpenCLIP's text tower");
    }
  }
  return out;
}

nlohmann::json sd_scheduler_config(bool v_prediction) {
  return {{"_class_name", "DDIMScheduler"}, {"beta_start", 0.00085}, {"beta_end", 0.012},
          {"beta_schedule", "scaled_linear"}, {"num_train_timesteps", 1000}, {"clip_sample", false},
          {"set_alpha_to_one", false}, {"steps_offset", 1}, {"timestep_spacing", "leading"},
          {"prediction_type", v_prediction ? "v_prediction" : "epsilon"}};
}

// Tensors that belong to no network diffuse loads, named in a note: EMA copies and the schedule's buffers.
bool is_training_leftover(const std::string& name) {
  static const std::set<std::string> buffers = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
      "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
      "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
      "posterior_mean_coef2", "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates"};
  return buffers.count(name) || starts_with(name, "model_ema.") ||
         name == "cond_stage_model.transformer.text_model.embeddings.position_ids";
}

}  // namespace

std::string diffusers_unet_name(const std::string& original, int64_t layers) {
  const auto p = split(original);
  if (p.size() >= 3 && p[0] == "time_embed" && (p[1] == "0" || p[1] == "2"))
    return std::string("time_embedding.linear_") + (p[1] == "0" ? "1" : "2") + "." + join(p, 2);
  if (p.size() >= 3 && p[0] == "out" && (p[1] == "0" || p[1] == "2"))
    return std::string(p[1] == "0" ? "conv_norm_out." : "conv_out.") + join(p, 2);
  if (p.size() >= 3 && p[0] == "middle_block" && is_index(p[1])) {
    const int64_t i = std::stoll(p[1]);
    if (i == 1) return "mid_block.attentions.0." + join(p, 2);
    const auto r = resnet_name(join(p, 2));
    return (i == 0 || i == 2) && !r.empty() ? "mid_block.resnets." + std::to_string(i / 2) + "." + r : "";
  }
  if (p.size() < 4 || !is_index(p[1]) || !is_index(p[2])) return "";
  const int64_t i = std::stoll(p[1]), k = std::stoll(p[2]), span = layers + 1;
  const std::string rest = join(p, 3);
  if (p[0] == "input_blocks") {
    if (i == 0) return k == 0 ? "conv_in." + rest : "";
    const int64_t b = (i - 1) / span, j = (i - 1) % span;
    const std::string block = "down_blocks." + std::to_string(b) + ".";
    if (j == layers) return k == 0 && starts_with(rest, "op.") ? block + "downsamplers.0.conv." + rest.substr(3) : "";
    if (k == 0) return resnet_name(rest).empty() ? "" : block + "resnets." + std::to_string(j) + "." + resnet_name(rest);
    return k == 1 ? block + "attentions." + std::to_string(j) + "." + rest : "";
  }
  if (p[0] == "output_blocks") {
    const int64_t b = i / span, j = i % span;
    const std::string block = "up_blocks." + std::to_string(b) + ".";
    if (k == 0) return resnet_name(rest).empty() ? "" : block + "resnets." + std::to_string(j) + "." + resnet_name(rest);
    if (j == layers && starts_with(rest, "conv.") && (k == 1 || k == 2)) return block + "upsamplers.0.conv." + rest.substr(5);
    return k == 1 ? block + "attentions." + std::to_string(j) + "." + rest : "";
  }
  return "";
}

std::string diffusers_vae_name(const std::string& original, int64_t levels) {
  auto p = split(original);
  if (p.size() < 2) return "";
  if (p[0] == "quant_conv" || p[0] == "post_quant_conv") return original;
  if (p[0] != "encoder" && p[0] != "decoder") return "";
  const std::string side = p[0] + ".";
  auto resnet = [&](const std::string& rest) {
    return starts_with(rest, "nin_shortcut.") ? "conv_shortcut." + rest.substr(13) : rest;
  };
  if (p[1] == "conv_in" || p[1] == "conv_out") return original;
  if (p[1] == "norm_out") return side + "conv_norm_out." + join(p, 2);
  if (p[1] == "mid" && p.size() >= 4) {
    if (p[2] == "block_1" || p[2] == "block_2")
      return side + "mid_block.resnets." + (p[2] == "block_1" ? "0." : "1.") + resnet(join(p, 3));
    if (p[2] == "attn_1") {
      static const std::map<std::string, std::string> names = {
          {"norm", "group_norm"}, {"q", "to_q"}, {"k", "to_k"}, {"v", "to_v"}, {"proj_out", "to_out.0"}};
      const auto it = names.find(p[3]);
      return it == names.end() ? "" : side + "mid_block.attentions.0." + it->second + "." + join(p, 4);
    }
    return "";
  }
  const bool down = p[0] == "encoder" && p[1] == "down", up = p[0] == "decoder" && p[1] == "up";
  if ((!down && !up) || p.size() < 5 || !is_index(p[2])) return "";
  const int64_t level = std::stoll(p[2]);
  if (level >= levels) return "";
  const std::string block = side + (down ? "down_blocks." : "up_blocks.") + std::to_string(down ? level : levels - 1 - level) + ".";
  if (p[3] == "block" && is_index(p[4])) return block + "resnets." + p[4] + "." + resnet(join(p, 5));
  if ((p[3] == "downsample" || p[3] == "upsample") && p[4] == "conv")
    return block + (down ? "downsamplers" : "upsamplers") + ".0.conv." + join(p, 5);
  return "";
}

OriginalCheckpoint read_original_checkpoint(const std::string& path, const SingleFileOptions& o) {
  if (!(fs::path(path).extension() == ".safetensors"))
    throw std::invalid_argument("'" + path + "': diffuse reads single-file checkpoints in safetensors only (a .ckpt is a "
                                "pickle; convert it with a trusted tool first)");
  const auto all = load_safetensors(path);
  OriginalCheckpoint c;
  std::vector<std::string> leftover;
  std::map<std::string, torch::Tensor> networks;  // what the networks read: checked finite
  for (const auto& [name, t] : all) {
    const bool ours = starts_with(name, kUnetPrefix) || starts_with(name, kVaePrefix) ||
                      starts_with(name, kClipPrefix) || starts_with(name, kOpenClipPrefix);
    if (ours && name != "cond_stage_model.transformer.text_model.embeddings.position_ids") {
      networks.emplace(name, t);
      continue;
    }
    if (!is_training_leftover(name))
      throw std::runtime_error("'" + path + "': tensor " + name + " belongs to no Stable Diffusion 1.x / 2.x network "
                               "(SDXL and other models are not read)");
    leftover.push_back(name);
  }
  check_finite_weights(networks, path);
  if (!leftover.empty())
    c.notes.push_back(std::to_string(leftover.size()) + " tensors of '" + path + "' not used (EMA copies and schedule "
                      "buffers, e.g. " + leftover.front() + ")");
  const auto unet = under(all, kUnetPrefix), vae = under(all, kVaePrefix);
  auto clip = under(all, kClipPrefix);
  clip.erase("text_model.embeddings.position_ids");
  const auto openclip = under(all, kOpenClipPrefix);
  if (unet.empty() || vae.empty() || (clip.empty() == openclip.empty()))
    throw std::runtime_error("'" + path + "' is not a Stable Diffusion 1.x / 2.x checkpoint in the original layout (it "
                             "needs model.diffusion_model., first_stage_model. and one of cond_stage_model.transformer. "
                             "(SD 1.x) or cond_stage_model.model. (SD 2.x))");
  const bool sd2 = !openclip.empty();
  c.family = sd2 ? "SD 2.x" : "SD 1.x";
  if (o.config_folder.empty()) {
    c.unet_config = infer_unet(unet, path, sd2, o.v_prediction);
    c.vae_config = infer_vae(vae, path, o.v_prediction);
    c.text_config = infer_text(sd2 ? openclip : clip, sd2, path);
    c.scheduler_config = sd_scheduler_config(o.v_prediction);
    c.notes.push_back(c.family + " checkpoint: configs inferred from its tensors; sampled with DDIMScheduler, " +
                      (o.v_prediction ? std::string("v prediction (--v-prediction)") : std::string("eps prediction "
                      "(pass --v-prediction for a 768-v model)")));
  } else {
    const fs::path dir(o.config_folder);
    c.unet_config = UNetConditionConfig::from_json(load_json((dir / "unet" / "config.json").string()));
    c.vae_config = AutoencoderKLConfig::from_json(load_json((dir / "vae" / "config.json").string()));
    c.text_config = ClipTextConfig::from_json(load_json((dir / "text_encoder" / "config.json").string()));
    c.scheduler_config = load_json((dir / "scheduler" / "scheduler_config.json").string());
    if (o.v_prediction) c.scheduler_config["prediction_type"] = "v_prediction";
  }
  c.unet = renamed(unet, kUnetPrefix, path, [&](const std::string& n) {
    return diffusers_unet_name(n, c.unet_config.layers_per_block);
  });
  const int64_t levels = int64_t(c.vae_config.block_out_channels.size());
  c.vae = renamed(vae, kVaePrefix, path, [&](const std::string& n) { return diffusers_vae_name(n, levels); });
  for (auto& [name, t] : c.vae)  // the mid-block attention's 1x1 convolutions are linear layers in diffusers
    if (name.find(".attentions.0.to_") != std::string::npos && t.dim() == 4) t = t.flatten(1);
  std::vector<std::string> skipped;
  c.text_encoder = sd2 ? openclip_to_transformers(openclip, c.text_config.num_hidden_layers, path, skipped) : clip;
  if (!skipped.empty())
    c.notes.push_back("OpenCLIP tensors SD 2.x does not use skipped (as diffusers skips them): " + skipped.front() +
                      (skipped.size() > 1 ? " and " + std::to_string(skipped.size() - 1) + " more" : ""));
  return c;
}

}  // namespace diffuse
