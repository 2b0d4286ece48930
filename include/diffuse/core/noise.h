// Reproducible Gaussian noise: image i's noise is a pure function of (seed, i, stream), whatever the batch,
// device or thread count. The sampler's initial noise, its per-step noise, the autoencoder's posterior draws
// and the analyses all draw from here.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>

namespace diffuse {

/// Standard normal noise for images first_image .. first_image + n - 1, float32 [n, shape_per_image...]
/// on `device`. Element j of image i is a pure function of (seed, i, stream, j): Philox4x32-10 (Salmon et
/// al. 2011) keyed by the seed, counter (j / 4, i, stream), Box-Muller to normals. So image i's noise does
/// not depend on the batch size, the batch's position, the device or the thread count. Stream 0 is the
/// initial noise; stochastic samplers draw step k's noise from stream k + 1.
/// The CPU computes it element by element; other devices run the same recipe as tensor operations there
/// (make_noise_by_tensor_ops), so no host work or copy enters a GPU sampler's loop.
torch::Tensor make_noise(torch::IntArrayRef shape_per_image, int64_t n, uint64_t seed, int64_t first_image = 0,
                         uint32_t stream = 0, torch::Device device = torch::kCPU);
/// The stream of the noise that samples an autoencoder's posterior for image to image (no sampler step reaches it).
constexpr uint32_t kEncoderNoiseStream = 0xffffffffu;

/// make_noise's recipe as whole-tensor integer operations on `device` (Philox's 32x32-bit products from
/// 16-bit halves in int64, Box-Muller in float64): what make_noise runs off the CPU. The same numbers up to
/// the last bit of float64 log/sqrt/cos/sin before rounding to float32 (checked on the CPU against make_noise).
torch::Tensor make_noise_by_tensor_ops(torch::IntArrayRef shape_per_image, int64_t n, uint64_t seed,
                                       int64_t first_image, uint32_t stream, torch::Device device);

/// One Philox4x32-10 block (exposed for its known-answer test).
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

}  // namespace diffuse
