#include "diffuse/models/transformer.h"

#include <cmath>

#include <torch/torch.h>

#include "diffuse/models/attention.h"
#include "diffuse/models/blocks.h"

namespace diffuse {

namespace nn = torch::nn;

CrossAttentionImpl::CrossAttentionImpl(int64_t query_dim, int64_t context_dim, int64_t heads, bool upcast)
    : heads_(heads), upcast_(upcast) {
  TORCH_CHECK(heads > 0 && query_dim % heads == 0, "attention: ", query_dim, " channels are not divisible into ", heads,
              " heads");
  to_q = register_module("to_q", nn::Linear(nn::LinearOptions(query_dim, query_dim).bias(false)));
  to_k = register_module("to_k", nn::Linear(nn::LinearOptions(context_dim, query_dim).bias(false)));
  to_v = register_module("to_v", nn::Linear(nn::LinearOptions(context_dim, query_dim).bias(false)));
  to_out_0 = nn::Linear(query_dim, query_dim);
  register_module("to_out", nn::ModuleList(to_out_0));
}

torch::Tensor CrossAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const auto& kv = context.defined() ? context : x;
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == x.size(0), "cross-attention context must be [", x.size(0),
              ", L, D], got ", kv.sizes());
  auto q = to_q(x), k = to_k(kv.to(x.scalar_type())), v = to_v(kv.to(x.scalar_type()));
  const auto dtype = x.scalar_type();
  if (upcast_ && dtype != torch::kFloat32) {
    q = q.to(torch::kFloat32);
    k = k.to(torch::kFloat32);
    v = v.to(torch::kFloat32);
  }
  const double scale = 1.0 / std::sqrt(double(q.size(2) / heads_));
  return to_out_0(multi_head_attention(q, k, v, heads_, scale).to(dtype));
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const TransformerOptions& o) {
  const int64_t c = o.channels;
  auto layer_norm = [&](const char* name) { return register_module(name, nn::LayerNorm(nn::LayerNormOptions({c}).eps(1e-5))); };
  norm1 = layer_norm("norm1");
  attn1 = register_module("attn1", CrossAttention(c, c, o.heads, o.upcast));
  norm2 = layer_norm("norm2");
  attn2 = register_module("attn2", CrossAttention(c, o.context_dim, o.heads, o.upcast));
  norm3 = layer_norm("norm3");
  // ff.net = [GEGLU (its proj), Dropout, Linear]: the names diffusers' FeedForward gives them.
  auto ff = register_module("ff", std::make_shared<nn::Module>());
  auto net = ff->register_module("net", std::make_shared<nn::Module>());
  auto geglu_holder = net->register_module("0", std::make_shared<nn::Module>());
  geglu = geglu_holder->register_module("proj", nn::Linear(c, 8 * c));
  ff_out = net->register_module("2", nn::Linear(4 * c, c));
}

torch::Tensor BasicTransformerBlockImpl::forward(const torch::Tensor& x_in, const torch::Tensor& context) {
  auto x = attn1(norm1(x_in)) + x_in;
  x = attn2(norm2(x), context) + x;
  auto gates = geglu(norm3(x)).chunk(2, -1);
  auto gated = torch::GradMode::is_enabled() ? gates[0] * torch::gelu(gates[1]) : torch::gelu(gates[1]).mul_(gates[0]);
  return ff_out(gated) + x;
}

Transformer2DImpl::Transformer2DImpl(const TransformerOptions& o) : options_(o) {
  const int64_t c = o.channels;
  TORCH_CHECK(o.groups > 0 && c % o.groups == 0, "Transformer2DModel: ", c, " channels are not divisible into ",
              o.groups, " groups");
  norm = register_module("norm", nn::GroupNorm(nn::GroupNormOptions(o.groups, c).eps(1e-6)));
  if (o.linear_projection)
    proj_in_linear = register_module("proj_in", nn::Linear(c, c));
  else
    proj_in_conv = register_module("proj_in", nn::Conv2d(nn::Conv2dOptions(c, c, 1)));
  transformer_blocks->push_back(BasicTransformerBlock(o));
  register_module("transformer_blocks", transformer_blocks);
  if (o.linear_projection)
    proj_out_linear = register_module("proj_out", nn::Linear(c, c));
  else
    proj_out_conv = register_module("proj_out", nn::Conv2d(nn::Conv2dOptions(c, c, 1)));
}

torch::Tensor Transformer2DImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  TORCH_CHECK(x.dim() == 4, "Transformer2DModel expects NCHW input, got ", x.sizes());
  TORCH_CHECK(context.defined(), "this UNet attends to a text context (encoder_hidden_states): pass one");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto y = norm(x);
  if (!options_.linear_projection) y = convolve(proj_in_conv, y);
  y = y.permute({0, 2, 3, 1}).reshape({n, h * w, c});
  if (options_.linear_projection) y = proj_in_linear(y);
  for (auto& block : *transformer_blocks) y = block->as<BasicTransformerBlock>()->forward(y, context);
  if (options_.linear_projection) y = proj_out_linear(y);
  y = y.reshape({n, h, w, c}).permute({0, 3, 1, 2});
  if (!options_.linear_projection) y = convolve(proj_out_conv, y.contiguous());
  return y + x;
}

}  // namespace diffuse
