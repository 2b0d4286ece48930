#include "diffuse/models/blocks.h"

#include <cstring>
#include <filesystem>
#include <limits>
#include <sstream>
#include <stdexcept>

#include <torch/torch.h>

#include "diffuse/models/attention.h"
#include "diffuse/models/transformer.h"
#include "util/torch_compat.h"

namespace diffuse {
namespace {

namespace nn = torch::nn;

// GroupNorm followed by SiLU, the pre-activation of every resnet and of the UNet's output head.
// Without autograd the SiLU runs in place (it saves one activation-sized allocation per call).
torch::Tensor silu_no_grad_inplace(torch::Tensor x) { return torch::GradMode::is_enabled() ? torch::silu(x) : torch::silu_(x); }
torch::Tensor norm_silu(nn::GroupNorm& norm, const torch::Tensor& x) { return silu_no_grad_inplace(norm(x)); }

nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride = 1, int64_t padding = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(padding));
}

nn::GroupNorm group_norm(int64_t groups, int64_t channels, double eps) {
  TORCH_CHECK(groups > 0 && channels % groups == 0, "GroupNorm: ", channels, " channels are not divisible into ",
              groups, " groups (choose norm_num_groups dividing every entry of block_out_channels)");
  return nn::GroupNorm(nn::GroupNormOptions(groups, channels).eps(eps));
}

// The dtype of the innermost ConvolutionDtype guard on this thread (Undefined: none).
thread_local torch::ScalarType guarded_conv_dtype = torch::ScalarType::Undefined;

}  // namespace

ConvolutionDtype::ConvolutionDtype(torch::ScalarType dtype) : outer_(guarded_conv_dtype) { guarded_conv_dtype = dtype; }
ConvolutionDtype::~ConvolutionDtype() { guarded_conv_dtype = outer_; }
torch::ScalarType ConvolutionDtype::current() { return guarded_conv_dtype; }

torch::Tensor convolve(nn::Conv2d& conv, const torch::Tensor& x) {
  const auto stored = conv->weight.scalar_type();
  const auto dtype = guarded_conv_dtype == torch::ScalarType::Undefined ? stored : guarded_conv_dtype;
  if (dtype == stored) return dtype == x.scalar_type() ? conv(x) : conv(x.to(dtype)).to(x.scalar_type());
  const auto& o = conv->options;
  const auto* padding = compat::conv2d_zero_padding(o);
  TORCH_CHECK(padding, "convolve: only numeric zero padding runs under a ConvolutionDtype guard");
  auto bias = conv->bias.defined() ? conv->bias.to(dtype) : torch::Tensor();
  return torch::conv2d(x.to(dtype), conv->weight.to(dtype), bias, o.stride(), *padding, o.dilation(), o.groups())
      .to(x.scalar_type());
}

torch::Tensor timestep_embedding(const torch::Tensor& t, int64_t dim, bool flip_sin_to_cos, double freq_shift,
                                 double scale, double max_period) {
  TORCH_CHECK(t.dim() == 1, "timesteps must be a 1-D tensor [N], got shape ", t.sizes());
  const int64_t half = dim / 2;
  TORCH_CHECK(half > 0 && half - freq_shift != 0, "timestep embedding: bad dim ", dim, " / freq_shift ", freq_shift);
  // The same float32 operations, in the same order, as diffusers' get_timestep_embedding.
  auto exponent = torch::arange(0, half, torch::TensorOptions().dtype(torch::kFloat32).device(t.device())) *
                  (-std::log(max_period));
  exponent = exponent / (double(half) - freq_shift);
  auto emb = t.to(torch::kFloat32).unsqueeze(1) * exponent.exp().unsqueeze(0);
  if (scale != 1.0) emb = emb * scale;
  emb = flip_sin_to_cos ? torch::cat({emb.cos(), emb.sin()}, -1) : torch::cat({emb.sin(), emb.cos()}, -1);
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1, 0, 0});
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim)
    : linear_1(register_module("linear_1", nn::Linear(in_channels, time_embed_dim))),
      linear_2(register_module("linear_2", nn::Linear(time_embed_dim, time_embed_dim))) {}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& x) { return linear_2(torch::silu(linear_1(x))); }

TimeScaleShift parse_time_scale_shift(const std::string& name) {
  if (name == "default") return TimeScaleShift::add;
  if (name == "scale_shift") return TimeScaleShift::scale_shift;
  throw std::invalid_argument("resnet_time_scale_shift '" + name + "' is not supported (use default or scale_shift)");
}

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetOptions& o) : options_(o) {
  norm1 = register_module("norm1", group_norm(o.groups, o.in_channels, o.eps));
  conv1 = register_module("conv1", conv3x3(o.in_channels, o.out_channels));
  if (o.temb_channels > 0) {
    int64_t proj = o.time_scale_shift == TimeScaleShift::scale_shift ? 2 * o.out_channels : o.out_channels;
    time_emb_proj = register_module("time_emb_proj", nn::Linear(o.temb_channels, proj));
  }
  norm2 = register_module("norm2", group_norm(o.groups, o.out_channels, o.eps));
  conv2 = register_module("conv2", conv3x3(o.out_channels, o.out_channels));
  if (o.in_channels != o.out_channels)
    conv_shortcut = register_module("conv_shortcut", nn::Conv2d(nn::Conv2dOptions(o.in_channels, o.out_channels, 1)));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  auto h = convolve(conv1, norm_silu(norm1, x));
  torch::Tensor t;
  if (time_emb_proj && temb.defined()) t = time_emb_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  if (options_.time_scale_shift == TimeScaleShift::scale_shift) {
    TORCH_CHECK(t.defined(), "ResnetBlock2D with scale_shift needs a time embedding");
    auto ss = t.chunk(2, 1);
    h = norm2(h) * (ss[0] + 1) + ss[1];
    h = silu_no_grad_inplace(h);
  } else {
    if (t.defined()) h = h + t;
    h = norm_silu(norm2, h);
  }
  if (options_.dropout > 0 && is_training()) h = torch::dropout(h, options_.dropout, true);
  h = convolve(conv2, h);
  auto skip = conv_shortcut ? convolve(conv_shortcut, x) : x;
  h = torch::GradMode::is_enabled() ? skip + h : h.add_(skip);
  return options_.output_scale_factor == 1.0 ? h : h / options_.output_scale_factor;
}

SpatialAttentionImpl::SpatialAttentionImpl(const AttentionOptions& o) : options_(o) {
  TORCH_CHECK(o.head_dim > 0 && o.channels % o.head_dim == 0, "attention: ", o.channels,
              " channels are not divisible by attention_head_dim ", o.head_dim);
  if (o.groups > 0) group_norm = register_module("group_norm", diffuse::group_norm(o.groups, o.channels, o.eps));
  to_q = register_module("to_q", nn::Linear(o.channels, o.channels));
  to_k = register_module("to_k", nn::Linear(o.channels, o.channels));
  to_v = register_module("to_v", nn::Linear(o.channels, o.channels));
  to_out_0 = nn::Linear(o.channels, o.channels);
  register_module("to_out", nn::ModuleList(to_out_0));
}

torch::Tensor SpatialAttentionImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "attention expects NCHW input, got shape ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto normed = group_norm ? group_norm(x) : x;
  // The Q, K, V projections (diffusers' linear layers over the H*W positions) as one 1x1 convolution with the
  // three weights stacked: it runs on oneDNN in the input's memory format, without transposes.
  auto qkv = torch::conv2d(normed, torch::cat({to_q->weight, to_k->weight, to_v->weight}).view({3 * c, c, 1, 1}),
                           torch::cat({to_q->bias, to_k->bias, to_v->bias}));
  // [N, C, H, W] slices viewed as [N, H*W, C] (strided; no copies).
  auto seq = [&](int64_t i) { return qkv.narrow(1, i * c, c).flatten(2).transpose(1, 2); };
  auto out = multi_head_attention(seq(0), seq(1), seq(2), c / options_.head_dim,
                                  1.0 / std::sqrt(double(options_.head_dim)));
  out = torch::conv2d(out.transpose(1, 2).view({n, c, h, w}), to_out_0->weight.view({c, c, 1, 1}), to_out_0->bias);
  out = torch::GradMode::is_enabled() ? out + x : out.add_(x);
  return options_.rescale_output_factor == 1.0 ? out : out / options_.rescale_output_factor;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t padding)
    : padding_(padding), conv(register_module("conv", conv3x3(channels, channels, 2, padding))) {}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  return convolve(conv, padding_ == 0 ? torch::constant_pad_nd(x, {0, 1, 0, 1}) : x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels) : conv(register_module("conv", conv3x3(channels, channels))) {}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x) {
  return convolve(conv, torch::upsample_nearest2d(x, {2 * x.size(2), 2 * x.size(3)}));
}

namespace {
ResnetBlock2D make_resnet(const BlockOptions& o, int64_t in, int64_t out, double output_scale_factor = 1.0) {
  ResnetOptions r;
  r.in_channels = in;
  r.out_channels = out;
  r.temb_channels = o.temb_channels;
  r.groups = o.groups;
  r.eps = o.eps;
  r.dropout = o.dropout;
  r.output_scale_factor = output_scale_factor;
  r.time_scale_shift = o.time_scale_shift;
  return ResnetBlock2D(r);
}
// The attention of a block: a Transformer2D when the options ask for cross-attention, else SpatialAttention.
std::shared_ptr<torch::nn::Module> make_attention(const BlockOptions& o, int64_t channels, int64_t groups,
                                                  double factor = 1.0) {
  if (o.transformer_heads > 0) {
    TransformerOptions t;
    t.channels = channels;
    t.heads = o.transformer_heads;
    t.context_dim = o.cross_attention_dim;
    t.groups = o.groups;
    t.linear_projection = o.use_linear_projection;
    t.upcast = o.upcast_attention;
    return Transformer2D(t).ptr();
  }
  AttentionOptions a;
  a.channels = channels;
  a.head_dim = o.head_dim;
  a.groups = groups;
  a.eps = o.eps;
  a.rescale_output_factor = factor;
  return SpatialAttention(a).ptr();
}

torch::Tensor attend(const std::shared_ptr<torch::nn::Module>& attention, const torch::Tensor& x,
                     const torch::Tensor& context) {
  if (auto* t = attention->as<Transformer2D>()) return t->forward(x, context);
  return attention->as<SpatialAttention>()->forward(x);
}
}  // namespace

DownBlockImpl::DownBlockImpl(const BlockOptions& o, int64_t in_channels, int64_t out_channels, int64_t layers,
                             bool attention, bool downsample, int64_t downsample_padding) {
  for (int64_t i = 0; i < layers; ++i) {
    resnets->push_back(make_resnet(o, i == 0 ? in_channels : out_channels, out_channels));
    if (attention) attentions->push_back(make_attention(o, out_channels, o.groups));
  }
  if (downsample) downsamplers->push_back(Downsample2D(out_channels, downsample_padding));
  register_module("resnets", resnets);
  if (attention) register_module("attentions", attentions);
  if (downsample) register_module("downsamplers", downsamplers);
}

torch::Tensor DownBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>* skips,
                                     const torch::Tensor& context) {
  for (size_t i = 0; i < resnets->size(); ++i) {
    x = resnets[i]->as<ResnetBlock2D>()->forward(x, temb);
    if (!attentions->is_empty()) x = attend(attentions[i], x, context);
    skips->push_back(x);
  }
  if (!downsamplers->is_empty()) {
    x = downsamplers[0]->as<Downsample2D>()->forward(x);
    skips->push_back(x);
  }
  return x;
}

UpBlockImpl::UpBlockImpl(const BlockOptions& o, int64_t in_channels, int64_t prev_output_channels,
                         int64_t out_channels, int64_t layers, bool attention, bool upsample) {
  for (int64_t i = 0; i < layers; ++i) {
    int64_t skip_channels = i == layers - 1 ? in_channels : out_channels;
    int64_t resnet_in = i == 0 ? prev_output_channels : out_channels;
    resnets->push_back(make_resnet(o, resnet_in + skip_channels, out_channels));
    if (attention) attentions->push_back(make_attention(o, out_channels, o.groups));
  }
  if (upsample) upsamplers->push_back(Upsample2D(out_channels));
  register_module("resnets", resnets);
  if (attention) register_module("attentions", attentions);
  if (upsample) register_module("upsamplers", upsamplers);
}

torch::Tensor UpBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb, std::vector<torch::Tensor>* skips,
                                   const torch::Tensor& context) {
  for (size_t i = 0; i < resnets->size(); ++i) {
    TORCH_CHECK(!skips->empty(), "UpBlock: ran out of skip connections");
    x = torch::cat({x, skips->back()}, 1);
    skips->pop_back();
    x = resnets[i]->as<ResnetBlock2D>()->forward(x, temb);
    if (!attentions->is_empty()) x = attend(attentions[i], x, context);
  }
  if (!upsamplers->is_empty()) x = upsamplers[0]->as<Upsample2D>()->forward(x);
  return x;
}

MidBlockImpl::MidBlockImpl(const BlockOptions& o, int64_t channels, bool attention, int64_t attn_groups,
                           double output_scale_factor, int64_t layers) {
  resnets->push_back(make_resnet(o, channels, channels, output_scale_factor));
  for (int64_t i = 0; i < layers; ++i) {
    if (attention) attentions->push_back(make_attention(o, channels, attn_groups, output_scale_factor));
    resnets->push_back(make_resnet(o, channels, channels, output_scale_factor));
  }
  if (attention) register_module("attentions", attentions);
  register_module("resnets", resnets);
}

torch::Tensor MidBlockImpl::forward(torch::Tensor x, const torch::Tensor& temb, const torch::Tensor& context) {
  x = resnets[0]->as<ResnetBlock2D>()->forward(x, temb);
  for (size_t i = 1; i < resnets->size(); ++i) {
    if (!attentions->is_empty()) x = attend(attentions[i - 1], x, context);
    x = resnets[i]->as<ResnetBlock2D>()->forward(x, temb);
  }
  return x;
}

}  // namespace diffuse
