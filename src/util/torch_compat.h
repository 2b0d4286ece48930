// The few places where LibTorch 1.13 (Debian 12) and 2.x (Debian 13's 2.6, PyTorch 2.x installs) differ.
// Everything else in diffuse is written once against the API both versions share (at::linalg_eigh and
// friends, not torch::linalg, which 2.x no longer ships as a header).
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/nn/options/conv.h>
#include <torch/version.h>

#include <string>
#include <vector>

#define DIFFUSE_TORCH2 (TORCH_VERSION_MAJOR >= 2)

namespace diffuse::compat {

// Whether bf16 autocast runs on the CPU: 2.x's does; 1.13's fails in group_norm, so diffuse refuses it there.
constexpr bool kCpuBf16Autocast = DIFFUSE_TORCH2;

// bf16 autocast of a device type's ops (1.13: CUDA only, in its "GPU" spelling, deprecated in 2.x).
inline void set_bf16_autocast(at::DeviceType type, bool enabled) {
#if DIFFUSE_TORCH2
  at::autocast::set_autocast_dtype(type, at::kBFloat16);
  at::autocast::set_autocast_enabled(type, enabled);
#else
  TORCH_CHECK(type == at::kCUDA, "bf16 autocast on the CPU needs LibTorch 2.x");
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
  at::autocast::set_enabled(enabled);
#endif
}

// Fused attention (FlashAttention / memory-efficient kernels) on q, k, v [N, heads, L, d], where the LibTorch
// has at::scaled_dot_product_attention with a scale argument (2.1 on); an undefined tensor where it has not.
inline at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale);
#else
  (void)q, (void)k, (void)v, (void)scale;
  return {};
#endif
}

// A 2-D convolution's zero padding in pixels, as at::conv2d takes it (the options hold c10::variants in 1.13 and
// 2.0, std::variants from 2.1 on); nullptr for the "valid" / "same" spellings and the reflect, replicate and
// circular modes, which diffuse's networks do not use.
inline const torch::ExpandingArray<2>* conv2d_zero_padding(const torch::nn::detail::ConvNdOptions<2>& o) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  using std::get_if;
#else
  using c10::get_if;
#endif
  if (!get_if<torch::enumtype::kZeros>(&o.padding_mode())) return nullptr;
  return get_if<torch::ExpandingArray<2>>(&o.padding());
}

// tensors[i] *= scale for a 0-dim tensor `scale` on their device, without reading it back (2.1 on: one
// multi-tensor launch; 1.13: one multiplication per tensor).
inline void foreach_mul_(std::vector<at::Tensor>& tensors, const at::Tensor& scale) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  at::_foreach_mul_(tensors, scale);
#else
  for (auto& t : tensors) t.mul_(scale);
#endif
}

// Zeroes the gradients of `params` in place (those that have one), as 1.13's Optimizer::zero_grad() does; 2.x's
// sets them to None instead, which would move them between steps.
inline void zero_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
#if DIFFUSE_TORCH2
  if (!grads.empty()) at::_foreach_zero_(grads);
#else
  for (auto& g : grads) g.zero_();
#endif
}

// A TCPStore (server or client). 2.x asks for its libuv server by default, which a LibTorch built without
// libuv (Debian 13's) refuses: then the classic server, which speaks the same protocol to every client.
inline c10::intrusive_ptr<c10d::TCPStore> make_tcp_store(const std::string& host, c10d::TCPStoreOptions options) {
#if DIFFUSE_TORCH2
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (const std::exception& e) {
    if (!options.useLibUV || std::string(e.what()).find("libuv") == std::string::npos) throw;
    options.useLibUV = false;
  }
#endif
  return c10::make_intrusive<c10d::TCPStore>(host, options);
}

// A c10d process group over one backend (ProcessGroupGloo for CPU tensors, ProcessGroupNCCL for CUDA).
// In 1.13 the backend is itself the ProcessGroup. In 2.x backends derive from c10d::Backend and a
// ProcessGroup dispatches each collective to the backend registered for the tensors' device type, which is
// how torch.distributed.init_process_group assembles it.
template <class BackendImpl>
c10::intrusive_ptr<c10d::ProcessGroup> process_group(c10::intrusive_ptr<BackendImpl> backend,
                                                     const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                     int size, c10::DeviceType device) {
#if DIFFUSE_TORCH2
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  const auto type = device == c10::DeviceType::CUDA ? c10d::ProcessGroup::BackendType::NCCL
                                                    : c10d::ProcessGroup::BackendType::GLOO;
  group->setDefaultBackend(type);
  group->setBackend(device, type, c10::intrusive_ptr<c10d::Backend>(std::move(backend)));
  return group;
#else
  (void)store, (void)rank, (void)size, (void)device;
  return backend;
#endif
}

}  // namespace diffuse::compat
