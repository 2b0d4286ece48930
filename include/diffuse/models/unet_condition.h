// A text-conditioned UNet with the architecture, config.json keys and state-dict names of diffusers'
// UNet2DConditionModel as Stable Diffusion 1.x and 2.x use it (Rombach et al. 2022): resnets and Transformer2D
// blocks (self-attention, cross-attention to the text encoder's states, GEGLU) in CrossAttnDownBlock2D,
// UNetMidBlock2DCrossAttn and CrossAttnUpBlock2D. A unet/ folder written by diffusers loads here and gives the same
// outputs; one written here loads in diffusers.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"

namespace diffuse {

/// UNet2DConditionModel's config.json. Keys that SDXL, ControlNet-style or other variants use (addition_embed_type,
/// class_embed_type, transformer_layers_per_block > 1, dual_cross_attention, ...) are refused by from_json unless
/// they hold the value that leaves SD 1.x / 2.x's network unchanged; unknown keys are refused too, by name.
struct UNetConditionConfig {
  std::optional<int64_t> sample_size;
  int64_t in_channels = 4, out_channels = 4;
  bool center_input_sample = false, flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"};
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  int64_t layers_per_block = 2, downsample_padding = 1;
  double mid_block_scale_factor = 1, dropout = 0, norm_eps = 1e-5;
  int64_t norm_num_groups = 32, cross_attention_dim = 1280;
  /// Heads per level (diffusers' legacy attention_head_dim: an int for every level, or one entry per level).
  std::vector<int64_t> heads = {8, 8, 8, 8};
  bool use_linear_projection = false, upcast_attention = false;
  nlohmann::json json = nlohmann::json::object();  ///< every key as diffusers would write it

  static UNetConditionConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  /// Throws std::invalid_argument naming the key, its value and what is supported.
  void validate() const;
  bool cross_attention(size_t level) const { return down_block_types[level] == "CrossAttnDownBlock2D"; }
};

/// SD 1.5's unet/config.json (859.5M parameters) and SD 2.1's (865.9M: per-level heads 5, 10, 20, 20, linear
/// projections, cross_attention_dim 1024, sample size 96).
UNetConditionConfig sd15_unet_config();
UNetConditionConfig sd21_unet_config();

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNetConditionConfig& config);
  /// x [N, C, H, W] with H and W divisible by 2^(levels - 1); timesteps [N], [1] or a scalar; context [N, L,
  /// cross_attention_dim] (encoder_hidden_states).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& timesteps, const torch::Tensor& context);
  const UNetConditionConfig& config() const { return config_; }
  /// Gradient checkpointing (recompute.h) of each down, mid and up block while gradients are recorded: the
  /// activations inside a block are recomputed in the backward pass instead of kept. Not saved with the model.
  void set_gradient_checkpointing(bool on) { checkpointing_ = on; }

 private:
  /// The down, mid and up blocks, each through recomputed_in_backward.
  torch::Tensor checkpointed_blocks(torch::Tensor x, const torch::Tensor& emb, const torch::Tensor& ctx,
                                    std::vector<torch::Tensor>& skips);
  UNetConditionConfig config_;
  bool checkpointing_ = false;
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::ModuleList down_blocks, up_blocks;
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

/// Loads a diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors, or its .fp16
/// variant) onto `device`; F16, BF16 and F32 weights are read into float32. Errors name the file.
UNet2DConditionModel load_unet_condition(const std::string& folder, torch::Device device);
/// Writes the diffusers layout (float32), atomically.
void save_unet_condition(UNet2DConditionModel& model, const std::string& folder);

}  // namespace diffuse
