// transformers' modeling_clip.py: CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPTextTransformer.
#include "diffuse/text/clip_text.h"

#include <filesystem>
#include <set>
#include <stdexcept>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"
#include "io/json_fields.h"

namespace diffuse {
namespace {

namespace nn = torch::nn;
using json_config::refuse;

// A named container without parameters of its own (transformers' text_model, embeddings, encoder, ...).
std::shared_ptr<nn::Module> holder(nn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<nn::Module>());
}

class ClipLayerImpl : public nn::Module {
 public:
  ClipLayerImpl(const ClipTextConfig& c) : heads_(c.num_attention_heads), quick_gelu_(c.hidden_act == "quick_gelu") {
    const int64_t d = c.hidden_size;
    auto attn = holder(*this, "self_attn");
    q_proj = attn->register_module("q_proj", nn::Linear(d, d));
    k_proj = attn->register_module("k_proj", nn::Linear(d, d));
    v_proj = attn->register_module("v_proj", nn::Linear(d, d));
    out_proj = attn->register_module("out_proj", nn::Linear(d, d));
    layer_norm1 = register_module("layer_norm1", nn::LayerNorm(nn::LayerNormOptions({d}).eps(c.layer_norm_eps)));
    auto mlp = holder(*this, "mlp");
    fc1 = mlp->register_module("fc1", nn::Linear(d, c.intermediate_size));
    fc2 = mlp->register_module("fc2", nn::Linear(c.intermediate_size, d));
    layer_norm2 = register_module("layer_norm2", nn::LayerNorm(nn::LayerNormOptions({d}).eps(c.layer_norm_eps)));
  }

  // x: [N, L, D]; mask: [L, L], 0 where a position may attend, -inf above the diagonal.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask) {
    const int64_t n = x.size(0), l = x.size(1), d = x.size(2), dh = d / heads_;
    auto h = layer_norm1(x);
    auto split = [&](const torch::Tensor& t) { return t.view({n, l, heads_, dh}).transpose(1, 2); };
    auto q = split(q_proj(h)), k = split(k_proj(h)), v = split(v_proj(h));
    auto scores = torch::matmul(q, k.transpose(-1, -2)) * (1.0 / std::sqrt(double(dh))) + mask;
    auto attended = torch::matmul(scores.softmax(-1), v).transpose(1, 2).reshape({n, l, d});
    auto y = x + out_proj(attended);
    auto m = fc1(layer_norm2(y));
    m = quick_gelu_ ? m * torch::sigmoid(1.702 * m) : torch::gelu(m);
    return y + fc2(m);
  }

 private:
  int64_t heads_;
  bool quick_gelu_;
  nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
};
TORCH_MODULE(ClipLayer);

// Keys of transformers' configs that do not change CLIPTextModel's forward pass at inference.
const std::set<std::string> kInertKeys = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "projection_dim",
    "bos_token_id", "pad_token_id", "attention_dropout", "dropout", "initializer_factor", "initializer_range",
    "_commit_hash", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "id2label",
    "label2id", "tie_word_embeddings", "is_decoder", "is_encoder_decoder", "_attn_implementation_autoset"};

}  // namespace

ClipTextConfig sd15_text_encoder_config() {
  ClipTextConfig c;
  c.hidden_size = 768;
  c.intermediate_size = 3072;
  c.num_attention_heads = 12;
  return c;
}

ClipTextConfig ClipTextConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("a text encoder config must be a JSON object");
  ClipTextConfig c;
  json_config::Reader r(j);
  r("vocab_size", c.vocab_size);
  r("hidden_size", c.hidden_size);
  r("intermediate_size", c.intermediate_size);
  r("num_hidden_layers", c.num_hidden_layers);
  r("num_attention_heads", c.num_attention_heads);
  r("max_position_embeddings", c.max_position_embeddings);
  r("hidden_act", c.hidden_act);
  r("layer_norm_eps", c.layer_norm_eps);
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) r("eos_token_id", c.eos_token_id);
  const auto unread = r.unread(kInertKeys);
  for (const auto& [key, value] : unread.items())
    refuse(key, value.dump(), "no such key: diffuse's CLIPTextModel does not know what it changes");
  if (j.contains("architectures") && j["architectures"].is_array())
    for (const auto& a : j["architectures"])
      if (a != "CLIPTextModel")
        refuse("architectures", a.dump(), "CLIPTextModel (a projection head such as CLIPTextModelWithProjection's is "
                                          "not what SD 1.x / 2.x pipelines use)");
  c.json = j;
  return c;
}

nlohmann::json ClipTextConfig::to_json() const {
  nlohmann::json j = json.empty() ? nlohmann::json{{"architectures", {"CLIPTextModel"}}, {"model_type", "clip_text_model"}}
                                  : json;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["max_position_embeddings"] = max_position_embeddings;
  j["hidden_act"] = hidden_act;
  j["layer_norm_eps"] = layer_norm_eps;
  j["eos_token_id"] = eos_token_id;
  return j;
}

void ClipTextConfig::validate() const {
  auto positive = [](const char* key, int64_t v, int64_t hi) {
    if (v <= 0 || v > hi) refuse(key, std::to_string(v), "a count in [1, " + std::to_string(hi) + "]");
  };
  positive("vocab_size", vocab_size, 1 << 24);
  positive("hidden_size", hidden_size, 65536);
  positive("intermediate_size", intermediate_size, 1 << 18);
  positive("num_hidden_layers", num_hidden_layers, 256);
  positive("num_attention_heads", num_attention_heads, 1024);
  positive("max_position_embeddings", max_position_embeddings, 1 << 16);
  if (hidden_size % num_attention_heads)
    refuse("num_attention_heads", std::to_string(num_attention_heads), "a divisor of hidden_size");
  if (hidden_act != "quick_gelu" && hidden_act != "gelu") refuse("hidden_act", hidden_act, "quick_gelu or gelu");
  if (!(layer_norm_eps > 0)) refuse("layer_norm_eps", std::to_string(layer_norm_eps), "a positive number");
}

ClipTextModelImpl::ClipTextModelImpl(const ClipTextConfig& config) : config_(config) {
  config_.validate();
  const int64_t d = config_.hidden_size;
  auto text_model = holder(*this, "text_model");
  auto embeddings = holder(*text_model, "embeddings");
  token_embedding = embeddings->register_module("token_embedding", nn::Embedding(config_.vocab_size, d));
  position_embedding = embeddings->register_module("position_embedding", nn::Embedding(config_.max_position_embeddings, d));
  auto encoder = holder(*text_model, "encoder");
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) layers->push_back(ClipLayer(config_));
  encoder->register_module("layers", layers);
  final_layer_norm = text_model->register_module(
      "final_layer_norm", nn::LayerNorm(nn::LayerNormOptions({d}).eps(config_.layer_norm_eps)));
}

ClipTextOutput ClipTextModelImpl::forward(const torch::Tensor& ids_in) {
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(1) >= 1 && ids_in.size(1) <= config_.max_position_embeddings,
              "the text encoder takes token ids [N, L] with 1 <= L <= ", config_.max_position_embeddings, ", got ",
              ids_in.sizes());
  const auto device = token_embedding->weight.device();
  auto ids = ids_in.to(device, torch::kLong);
  TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < config_.vocab_size),
              "token ids must lie in [0, ", config_.vocab_size, ") (the tokenizer and text encoder do not match)");
  const int64_t l = ids.size(1);
  auto positions = torch::arange(l, torch::TensorOptions().dtype(torch::kLong).device(device));
  ClipTextOutput out;
  auto x = token_embedding(ids) + position_embedding(positions).unsqueeze(0);
  out.hidden_states.push_back(x);
  auto mask = torch::full({l, l}, -std::numeric_limits<float>::infinity(), x.options()).triu(1);
  for (auto& layer : *layers) {
    x = layer->as<ClipLayer>()->forward(x, mask);
    out.hidden_states.push_back(x);
  }
  out.last_hidden_state = final_layer_norm(x);
  // The pooled row: legacy configs (eos_token_id 2) take the largest id, as transformers does; others the first eos.
  auto eos = config_.eos_token_id == 2 ? ids.argmax(-1) : (ids == config_.eos_token_id).to(torch::kInt).argmax(-1);
  out.pooler_output = out.last_hidden_state.index({torch::arange(ids.size(0), ids.options()), eos});
  return out;
}

torch::Tensor ClipTextModelImpl::encode(const torch::Tensor& ids, int64_t clip_skip) {
  TORCH_CHECK(clip_skip >= 0 && clip_skip < config_.num_hidden_layers, "clip_skip must lie in [0, ",
              config_.num_hidden_layers - 1, "], got ", clip_skip);
  auto out = forward(ids);
  if (clip_skip == 0) return out.last_hidden_state;
  return final_layer_norm(out.hidden_states[out.hidden_states.size() - 1 - size_t(clip_skip)]);
}

ClipTextModel load_clip_text_model(const std::string& folder, torch::Device device) {
  namespace fs = std::filesystem;
  const auto config_path = (fs::path(folder) / "config.json").string();
  if (!fs::exists(config_path))
    throw std::runtime_error("cannot read '" + config_path + "': no such file (a text_encoder/ folder holds config.json "
                             "and model.safetensors)");
  ClipTextConfig config;
  try {
    config = ClipTextConfig::from_json(load_json(config_path));
    config.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + config_path + "': " + e.what());
  }
  const auto weights = find_weights_file(
      folder, {"model.safetensors", "model.fp16.safetensors"},
      fs::exists(fs::path(folder) / "pytorch_model.bin")
          ? " (only pytorch_model.bin, a pickle diffuse does not read: convert it to safetensors)"
          : "");
  auto tensors = load_safetensors(weights);
  tensors.erase("text_model.embeddings.position_ids");  // a buffer older transformers versions saved: arange(L)
  check_finite_weights(tensors, weights);
  ClipTextModel model(config);
  load_state_dict(*model, tensors, weights);
  model->to(device);
  model->eval();
  return model;
}

void save_clip_text_model(ClipTextModel& model, const std::string& folder) {
  write_model_folder(*model, model->config().to_json(), folder, "model.safetensors");
}

}  // namespace diffuse
