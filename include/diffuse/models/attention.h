// Multi-head scaled dot-product attention, the core of the UNet's and the autoencoder's attention blocks.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace diffuse {

/// Multi-head scaled dot-product attention (Vaswani et al. 2017) on q [N, Lq, heads * d], k and v
/// [N, Lk, heads * d]: softmax(Q K^T * scale) V per head, returned as [N, Lq, heads * d].
/// float32 CPU tensors take a fused kernel (one pass per query row, scores never materialised for the batch,
/// its own backward as in FlashAttention, Dao et al. 2022); on GPUs, LibTorch's fused scaled_dot_product_attention
/// (2.1 on); otherwise multi_head_attention_reference.
torch::Tensor multi_head_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   int64_t heads, double scale);
/// The same with batched matrix products, in chunks of the batch so that the score matrices stay in cache.
torch::Tensor multi_head_attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             int64_t heads, double scale);

}  // namespace diffuse
