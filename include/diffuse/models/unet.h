// A UNet with the architecture, config.json keys and state-dict names of diffusers 0.25's UNet2DModel
// (the DDPM UNet of Ho et al. 2020 with the class-conditional time embedding of Dhariwal & Nichol 2021).
// A folder written by diffusers (config.json + diffusion_pytorch_model.safetensors) loads here and gives the
// same outputs; one written here loads in diffusers.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"

namespace diffuse {

/// UNet2DModel's config.json. Defaults are diffusers 0.25's; keys diffuse does not know are kept in `extra`
/// and written back. Supported: time_embedding_type "positional", act_fn "silu", down/upsample_type "conv",
/// class_embed_type null; anything else is refused by validate() with the supported values.
struct UNetConfig {
  std::optional<int64_t> sample_size;
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  bool center_input_sample = false;
  std::string time_embedding_type = "positional";
  double freq_shift = 0;
  bool flip_sin_to_cos = true;
  std::vector<std::string> down_block_types = {"DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                               "AttnDownBlock2D"};
  std::vector<std::string> up_block_types = {"AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"};
  std::vector<int64_t> block_out_channels = {224, 448, 672, 896};
  int64_t layers_per_block = 2;
  double mid_block_scale_factor = 1;
  int64_t downsample_padding = 1;
  std::string downsample_type = "conv";
  std::string upsample_type = "conv";
  double dropout = 0.0;
  std::string act_fn = "silu";
  std::optional<int64_t> attention_head_dim = 8;  ///< null: one head per block (head dim = channels)
  int64_t norm_num_groups = 32;
  std::optional<int64_t> attn_norm_num_groups;    ///< mid-block attention groups; null: see MidBlock
  double norm_eps = 1e-5;
  std::string resnet_time_scale_shift = "default";  ///< "default" or "scale_shift"
  bool add_attention = true;                        ///< attention in the mid block
  std::optional<std::string> class_embed_type;
  std::optional<int64_t> num_class_embeds;
  std::optional<int64_t> num_train_timesteps;
  nlohmann::json extra = nlohmann::json::object();  ///< other keys ("_class_name", ...), written back

  /// Throws std::invalid_argument naming the key, its value and what is supported.
  void validate() const;
  /// Reads diffusers' keys (missing ones take the defaults above); a key of the wrong type is an error naming it.
  static UNetConfig from_json(const nlohmann::json& j);
  /// Every diffusers key, plus `extra`; "_class_name" is UNet2DModel. "_use_default_values" is never written:
  /// diffusers would replace the listed keys by its defaults.
  nlohmann::json to_json() const;
  bool operator==(const UNetConfig& other) const { return to_json() == other.to_json(); }
};

/// The reference configuration of the training issue: 32x32x1, channels (64, 128, 128), 2 layers per block,
/// attention at the middle level and in the mid block, 11 class embeddings (10 classes + the null class).
UNetConfig reference_unet_config();

class UNet2DModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DModelImpl(const UNetConfig& config);
  /// x [N, C, H, W]; timesteps [N] (or a scalar / [1], broadcast), float or integer: the timestep *condition*,
  /// which may be fractional (e.g. E-TSDM); class_labels [N] int64, or undefined for no class embedding.
  /// A model with num_class_embeds requires labels; a model without refuses them (as diffusers).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& timesteps,
                        const torch::Tensor& class_labels = {});
  const UNetConfig& config() const { return config_; }

 private:
  UNetConfig config_;
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::Embedding class_embedding{nullptr};
  torch::nn::ModuleList down_blocks, up_blocks;
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DModel);

/// Loads a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) onto `device`.
/// Errors name the file and the fix; missing, unexpected or mis-shaped parameters are listed.
UNet2DModel load_unet(const std::string& folder, torch::Device device);
/// Writes the diffusers layout (config.json + diffusion_pytorch_model.safetensors, float32), atomically.
void save_unet(UNet2DModel& model, const std::string& folder);

/// Multiply-add FLOPs (2 per multiply-accumulate) of one image's forward pass at height x width: convolutions,
/// linear layers (time embedding, per-resnet projections, Q/K/V/out) and the attention products Q K^T and P V.
/// Normalisations and activations are not counted. For benchmarks' GFLOP/s.
double unet_forward_flops(const UNetConfig& config, int64_t height, int64_t width);

/// Timesteps as a [N] tensor on `device`: a scalar or a [1] tensor is broadcast to the batch.
torch::Tensor broadcast_timesteps(const torch::Tensor& timesteps, int64_t n, torch::Device device);

}  // namespace diffuse
