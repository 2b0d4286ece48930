// The noisy classifier of classifier guidance (Dhariwal & Nichol 2021, section 4 and appendix: "the
// downsampling trunk of the UNet with an attention pool"; here the pool is a global average): p(y | x_t, t)
// trained on noised images at random t. Its gradient w.r.t. x_t steers sampling (001 document).
// Built from the UNet's own blocks (down blocks + mid block, conditioned on the timestep embedding), then
// GroupNorm + SiLU, global average pooling and a linear layer to the class logits.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"
#include "diffuse/models/unet.h"

namespace diffuse {

/// config.json of a noisy classifier ("_class_name": "DiffuseNoisyClassifier"). The keys mean what they mean
/// in UNet2DModel's config; num_classes sizes the output. Defaults: about a tenth of the parameters of the
/// reference UNet (reference_unet_config()), for 32x32x1 inputs and 10 classes.
struct NoisyClassifierConfig {
  std::optional<int64_t> sample_size = 32;
  int64_t in_channels = 1;
  int64_t num_classes = 10;
  std::vector<std::string> down_block_types = {"DownBlock2D", "AttnDownBlock2D", "DownBlock2D"};
  std::vector<int64_t> block_out_channels = {32, 64, 64};
  int64_t layers_per_block = 2;
  std::optional<int64_t> attention_head_dim = 8;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::string resnet_time_scale_shift = "default";
  double dropout = 0.0;
  int64_t downsample_padding = 1;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  bool add_attention = true;  ///< attention in the mid block
  nlohmann::json extra = nlohmann::json::object();

  static constexpr const char* kClassName = "DiffuseNoisyClassifier";
  void validate() const;
  static NoisyClassifierConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  bool operator==(const NoisyClassifierConfig& other) const { return to_json() == other.to_json(); }
};

/// A classifier matched to a UNet: the UNet's input size, channels, block types and layers, with half its
/// channels (about a quarter of the encoder's parameters, a tenth of the whole UNet's).
NoisyClassifierConfig classifier_config_for(const UNetConfig& unet, int64_t num_classes);

class NoisyClassifierImpl : public torch::nn::Module {
 public:
  explicit NoisyClassifierImpl(const NoisyClassifierConfig& config);
  /// x [N, C, H, W] noised images; timesteps [N] (or scalar / [1]), float or integer, fractional allowed.
  /// Returns logits [N, num_classes].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& timesteps);
  const NoisyClassifierConfig& config() const { return config_; }

 private:
  NoisyClassifierConfig config_;
  torch::nn::Conv2d conv_in{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::ModuleList down_blocks;
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::Linear linear_out{nullptr};
};
TORCH_MODULE(NoisyClassifier);

/// Same folder format as the UNet (config.json + diffusion_pytorch_model.safetensors).
NoisyClassifier load_classifier(const std::string& folder, torch::Device device);
void save_classifier(NoisyClassifier& model, const std::string& folder);

}  // namespace diffuse
