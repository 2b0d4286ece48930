// The building blocks of diffusers' UNet2DModel (diffusers 0.25: embeddings.py, resnet.py,
// attention_processor.py, unet_2d_blocks.py), with diffusers' submodule names so state dicts interoperate.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <map>
#include <string>
#include <vector>

namespace diffuse {

/// conv(x) computed in the convolution dtype: a ConvolutionDtype guard's on this thread when one is active, else
/// conv's weight's. x (and, under a guard, the weight and bias, differentiably) are cast to it and the result back
/// to x's dtype; nothing is cast when the dtypes agree. So a float32 network runs only its convolutions in
/// bfloat16 with convolutions_to(model, bf16) (weights stored in bf16: sampling) or under a guard (float32 master
/// weights whose gradients stay float32: training).
torch::Tensor convolve(torch::nn::Conv2d& conv, const torch::Tensor& x);

/// Every convolve() on this thread computes in `dtype` for the guard's scope (nested guards restore the outer
/// one): the mixed precision of `diffuse train --conv-dtype bf16`.
class ConvolutionDtype {
 public:
  explicit ConvolutionDtype(torch::ScalarType dtype);
  ~ConvolutionDtype();
  ConvolutionDtype(const ConvolutionDtype&) = delete;
  ConvolutionDtype& operator=(const ConvolutionDtype&) = delete;
  /// The dtype of the innermost guard on this thread (Undefined: none).
  static torch::ScalarType current();

 private:
  torch::ScalarType outer_;
};

/// Sinusoidal timestep embedding of DDPM (Ho et al. 2020, after Vaswani et al. 2017), exactly as diffusers'
/// get_timestep_embedding: freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)), i < dim/2;
/// emb = [sin(t freq), cos(t freq)] ([cos, sin] with flip_sin_to_cos), zero-padded to odd dim.
/// t: [N] of any real or integer dtype; fractional timesteps (E-TSDM conditions) are used as they are.
/// Returns float32 [N, dim] on t's device.
torch::Tensor timestep_embedding(const torch::Tensor& t, int64_t dim, bool flip_sin_to_cos, double freq_shift,
                                 double scale = 1.0, double max_period = 10000.0);

/// diffusers TimestepEmbedding: linear_2(silu(linear_1(x))).
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

/// How a ResnetBlock2D injects the time embedding: added before norm2 ("default"), or as
/// norm2(h) * (1 + scale) + shift ("scale_shift", the adaptive group norm of Dhariwal & Nichol 2021).
enum class TimeScaleShift { add, scale_shift };
TimeScaleShift parse_time_scale_shift(const std::string& name);  ///< "default" or "scale_shift"

struct ResnetOptions {
  int64_t in_channels = 0, out_channels = 0;
  int64_t temb_channels = 0;  ///< 0: no time embedding
  int64_t groups = 32;
  double eps = 1e-6;
  double dropout = 0.0;
  double output_scale_factor = 1.0;
  TimeScaleShift time_scale_shift = TimeScaleShift::add;
};

/// diffusers ResnetBlock2D: (shortcut(x) + conv2(drop(silu(norm2'(conv1(silu(norm1(x))), temb))))) / factor.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetOptions& options);
  /// temb: the time embedding [N, temb_channels] before the block's own SiLU, or undefined.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb);

 private:
  ResnetOptions options_;
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  torch::nn::Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

struct AttentionOptions {
  int64_t channels = 0;
  int64_t head_dim = 8;  ///< heads = channels / head_dim
  int64_t groups = 32;   ///< GroupNorm groups before the projections; 0: no group norm
  double eps = 1e-5;
  double rescale_output_factor = 1.0;
};

/// diffusers Attention over the H*W positions of an image (self-attention, residual connection):
/// out = (x + to_out(softmax(Q K^T / sqrt(d)) V)) / rescale_output_factor, Q K V from group_norm(x).
class SpatialAttentionImpl : public torch::nn::Module {
 public:
  explicit SpatialAttentionImpl(const AttentionOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  AttentionOptions options_;
  torch::nn::GroupNorm group_norm{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out_0{nullptr};
};
TORCH_MODULE(SpatialAttention);

/// diffusers Downsample2D (use_conv): a 3x3 stride-2 conv; padding 0 pads right and bottom by one first.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t padding);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  int64_t padding_;
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

/// diffusers Upsample2D (use_conv): nearest-neighbour 2x then a 3x3 conv.
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(int64_t channels);
  torch::Tensor forward(const torch::Tensor& x);

 private:
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

/// What the down, mid and up blocks share.
struct BlockOptions {
  int64_t temb_channels = 0;
  int64_t groups = 32;
  double eps = 1e-5;
  double dropout = 0.0;
  TimeScaleShift time_scale_shift = TimeScaleShift::add;
  int64_t head_dim = 8;  ///< attention head dimension (SpatialAttention)
  /// > 0: the blocks' attention is a Transformer2DModel of this many heads attending to a text context of
  /// cross_attention_dim (UNet2DConditionModel's CrossAttn blocks); 0: SpatialAttention (UNet2DModel's Attn blocks).
  int64_t transformer_heads = 0;
  int64_t cross_attention_dim = 0;
  bool use_linear_projection = false, upcast_attention = false;
};

/// DownBlock2D / AttnDownBlock2D: `layers` resnets (each followed by attention when `attention`),
/// then a Downsample2D unless it is the last block. Every layer's output is a skip connection.
class DownBlockImpl : public torch::nn::Module {
 public:
  DownBlockImpl(const BlockOptions& options, int64_t in_channels, int64_t out_channels, int64_t layers,
                bool attention, bool downsample, int64_t downsample_padding);
  /// Appends the block's skip outputs to `skips`. context: the text states a Transformer2D attends to, or undefined.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>* skips,
                        const torch::Tensor& context = {});

 private:
  torch::nn::ModuleList resnets, attentions, downsamplers;
};
TORCH_MODULE(DownBlock);

/// UpBlock2D / AttnUpBlock2D: `layers` resnets on [x, skip] concatenations (skips taken from the back of
/// `skips`), each followed by attention when `attention`, then an Upsample2D unless it is the last block.
class UpBlockImpl : public torch::nn::Module {
 public:
  UpBlockImpl(const BlockOptions& options, int64_t in_channels, int64_t prev_output_channels,
              int64_t out_channels, int64_t layers, bool attention, bool upsample);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>* skips,
                        const torch::Tensor& context = {});
  /// How many skips forward takes from the back of `skips`.
  int64_t skips_taken() const { return int64_t(resnets->size()); }

 private:
  torch::nn::ModuleList resnets, attentions, upsamplers;
};
TORCH_MODULE(UpBlock);

/// UNetMidBlock2D / UNetMidBlock2DCrossAttn: resnet, (attention, resnet) x layers. SpatialAttention has a group
/// norm of `attn_groups` groups (0: none); output_scale_factor applies to every resnet and SpatialAttention.
class MidBlockImpl : public torch::nn::Module {
 public:
  MidBlockImpl(const BlockOptions& options, int64_t channels, bool attention, int64_t attn_groups,
               double output_scale_factor, int64_t layers = 1);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& temb, const torch::Tensor& context = {});

 private:
  torch::nn::ModuleList resnets, attentions;
};
TORCH_MODULE(MidBlock);

}  // namespace diffuse
