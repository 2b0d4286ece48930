// The cross-attention pieces of diffusers' UNet2DConditionModel (attention.py, attention_processor.py,
// transformers/transformer_2d.py), with diffusers' submodule names so state dicts interoperate.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace diffuse {

struct TransformerOptions {
  int64_t channels = 0;             ///< inner dimension = heads * head width = the block's channels
  int64_t heads = 8;
  int64_t context_dim = 0;          ///< cross_attention_dim: the text encoder's width
  int64_t groups = 32;              ///< the GroupNorm before proj_in (eps 1e-6, as diffusers)
  bool linear_projection = false;   ///< proj_in / proj_out as Linear (SD 2.x) or 1x1 Conv2d (SD 1.x)
  bool upcast = false;              ///< attention products in float32 for bf16 / fp16 networks (upcast_attention)
};

/// diffusers Attention with bias-free Q, K, V (to_q, to_k, to_v, to_out.0): softmax(Q K^T / sqrt(d)) V over
/// `heads` heads, K and V from `context` (cross-attention) or from x itself (self-attention).
class CrossAttentionImpl : public torch::nn::Module {
 public:
  CrossAttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, bool upcast);
  /// x [N, L, query_dim]; context [N, Lc, context_dim] or undefined for self-attention.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {});

 private:
  int64_t heads_;
  bool upcast_;
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out_0{nullptr};
};
TORCH_MODULE(CrossAttention);

/// diffusers BasicTransformerBlock (norm_type layer_norm): x + attn1(norm1(x)), then + attn2(norm2(.), context),
/// then + ff(norm3(.)) with the GEGLU feed-forward of Shazeer 2020 (ff.net.0.proj, ff.net.2; inner width 4 x).
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit BasicTransformerBlockImpl(const TransformerOptions& options);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

 private:
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  CrossAttention attn1{nullptr}, attn2{nullptr};
  torch::nn::Linear geglu{nullptr}, ff_out{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

/// diffusers Transformer2DModel on continuous input (one BasicTransformerBlock): x + proj_out(block(proj_in(norm(x))))
/// over the H*W positions of an NCHW image.
class Transformer2DImpl : public torch::nn::Module {
 public:
  explicit Transformer2DImpl(const TransformerOptions& options);
  /// x [N, C, H, W]; context [N, L, context_dim] (the text encoder's hidden states).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

 private:
  TransformerOptions options_;
  torch::nn::GroupNorm norm{nullptr};
  torch::nn::Linear proj_in_linear{nullptr}, proj_out_linear{nullptr};
  torch::nn::Conv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};
  torch::nn::ModuleList transformer_blocks;
};
TORCH_MODULE(Transformer2D);

}  // namespace diffuse
