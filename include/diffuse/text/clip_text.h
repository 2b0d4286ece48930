// CLIP's text transformer (Radford et al. 2021) in transformers' CLIPTextModel layout: a Stable Diffusion
// pipeline's text_encoder/ folder (config.json + model.safetensors) loads here and gives the same hidden states.
//   SD 1.x: OpenAI CLIP ViT-L/14's text tower (12 layers, width 768, quick_gelu);
//   SD 2.x: OpenCLIP ViT-H/14's (23 layers as shipped, width 1024, gelu).
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

/// CLIPTextConfig's keys that shape the network. Keys of transformers' PretrainedConfig that do not change the
/// forward pass (ids of special tokens but eos, dropout at inference, initialisation, dtype, names) are accepted;
/// any other key is refused by from_json, naming it.
struct ClipTextConfig {
  int64_t vocab_size = 49408, hidden_size = 512, intermediate_size = 2048, num_hidden_layers = 12,
          num_attention_heads = 8, max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  ///< quick_gelu (x sigmoid(1.702 x), SD 1.x) or gelu (erf form, SD 2.x)
  double layer_norm_eps = 1e-5;
  int64_t eos_token_id = 2;  ///< 2: the legacy value, where the pooler takes the position of the largest id
  nlohmann::json json = nlohmann::json::object();  ///< the file as read, written back by to_json

  static ClipTextConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  void validate() const;
};

/// Stable Diffusion 1.x's text encoder: CLIP ViT-L/14's text tower (768 wide, 12 layers of 12 heads, quick_gelu).
ClipTextConfig sd15_text_encoder_config();

/// What a text-encoder call returns: every hidden state, the final one normed, the pooled vector.
struct ClipTextOutput {
  torch::Tensor last_hidden_state;             ///< [N, L, D]: final_layer_norm of the last layer's output
  torch::Tensor pooler_output;                 ///< [N, D]: last_hidden_state at each sequence's eos
  std::vector<torch::Tensor> hidden_states;    ///< [0] the embeddings, [i] after layer i (no final norm)
};

class ClipTextModelImpl : public torch::nn::Module {
 public:
  explicit ClipTextModelImpl(const ClipTextConfig& config);
  /// ids: int64 [N, L], L <= max_position_embeddings. A causal mask, no padding mask (as SD pipelines call it).
  ClipTextOutput forward(const torch::Tensor& ids);
  /// What diffusers' encode_prompt gives the UNet: last_hidden_state (clip_skip 0), or final_layer_norm of the
  /// output clip_skip layers before the last (clip_skip >= 1; diffusers' clip_skip).
  torch::Tensor encode(const torch::Tensor& ids, int64_t clip_skip = 0);
  const ClipTextConfig& config() const { return config_; }

 private:
  ClipTextConfig config_;
  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextModel);

/// Loads a transformers CLIPTextModel folder: config.json and model.safetensors (or, when that is absent, the
/// model.fp16.safetensors variant). F16, BF16 and F32 weights are read into float32. Errors name the file.
ClipTextModel load_clip_text_model(const std::string& folder, torch::Device device);
/// Writes config.json and model.safetensors (float32, transformers' names), atomically.
void save_clip_text_model(ClipTextModel& model, const std::string& folder);

}  // namespace diffuse
