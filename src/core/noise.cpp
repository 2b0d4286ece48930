// Reproducible noise (include/diffuse/core/noise.h).
#include "diffuse/core/noise.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

namespace diffuse {

namespace {
// Philox-4x32's multipliers and Weyl key increments; Box-Muller's constants.
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double k2m32 = 1.0 / 4294967296.0;
}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  // Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", Philox-4x32 with 10 rounds.
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kW0;
      k[1] += kW1;
    }
    const uint64_t p0 = uint64_t(kM0) * c[0], p1 = uint64_t(kM1) * c[2];
    c = {uint32_t(p1 >> 32) ^ c[1] ^ k[0], uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k[1], uint32_t(p0)};
  }
  return c;
}

namespace {

void check_counts(int64_t n, int64_t first_image) {
  if (n < 0 || first_image < 0)
    throw std::invalid_argument("make_noise: image count and first image must be >= 0");
}

// (hi, lo) 32-bit halves of m * a for int64 tensors a holding values below 2^32, without 64-bit overflow:
// m * a = (m * a_hi) 2^16 + m * a_lo with both products below 2^48.
std::pair<torch::Tensor, torch::Tensor> mulhilo(uint32_t m, const torch::Tensor& a) {
  const int64_t mm = int64_t(m);
  auto lo_part = torch::bitwise_and(a, 0xffff).mul_(mm);
  auto mid = torch::div(a, 65536, "floor").mul_(mm).add_(torch::div(lo_part, 65536, "floor"));
  auto hi = torch::div(mid, 65536, "floor");
  auto lo = torch::bitwise_and(mid, 0xffff).mul_(65536).add_(torch::bitwise_and(lo_part, 0xffff));
  return {hi, lo};
}

}  // namespace

torch::Tensor make_noise_by_tensor_ops(torch::IntArrayRef shape_per_image, int64_t n, uint64_t seed,
                                       int64_t first_image, uint32_t stream, torch::Device device) {
  check_counts(n, first_image);
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), shape_per_image.begin(), shape_per_image.end());
  int64_t d = 1;
  for (auto v : shape_per_image) d *= v;
  if (n == 0 || d == 0) return torch::empty(shape, torch::TensorOptions(torch::kFloat32).device(device));
  const int64_t groups = (d + 3) / 4;
  const auto i64 = torch::TensorOptions(torch::kInt64).device(device);
  auto image = torch::arange(first_image, first_image + n, i64).unsqueeze(1);
  // The counter (j / 4, image low, image high, stream), broadcast to [n, groups].
  torch::Tensor c0 = torch::arange(groups, i64).unsqueeze(0).expand({n, groups}),
                c1 = torch::bitwise_and(image, int64_t(0xffffffffLL)).expand({n, groups}),
                c2 = torch::div(image, int64_t(1) << 32, "floor").expand({n, groups}),
                c3 = torch::full({n, groups}, int64_t(stream), i64);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    auto [hi0, lo0] = mulhilo(kM0, c0);
    auto [hi1, lo1] = mulhilo(kM1, c2);
    c0 = torch::bitwise_xor(torch::bitwise_xor(hi1, c1), int64_t(k0));
    c1 = lo1;
    c2 = torch::bitwise_xor(torch::bitwise_xor(hi0, c3), int64_t(k1));
    c3 = lo0;
  }
  // Box-Muller on the pairs (c0, c1) and (c2, c3), u in (0, 1].
  auto normals = [](const torch::Tensor& r_u, const torch::Tensor& r_angle) {
    auto radius = r_u.to(torch::kFloat64).add_(1.0).mul_(k2m32).log_().mul_(-2.0).sqrt_();
    auto angle = r_angle.to(torch::kFloat64).mul_(kTwoPi * k2m32);
    return std::make_pair(radius * angle.cos(), radius * angle.sin());
  };
  auto [z0, z1] = normals(c0, c1);
  auto [z2, z3] = normals(c2, c3);
  auto out = torch::stack({z0, z1, z2, z3}, 2).to(torch::kFloat32).view({n, 4 * groups});
  return out.narrow(1, 0, d).reshape(shape);
}

torch::Tensor make_noise(torch::IntArrayRef shape_per_image, int64_t n, uint64_t seed, int64_t first_image,
                         uint32_t stream, torch::Device device) {
  if (!device.is_cpu()) return make_noise_by_tensor_ops(shape_per_image, n, seed, first_image, stream, device);
  check_counts(n, first_image);
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), shape_per_image.begin(), shape_per_image.end());
  auto out = torch::empty(shape, torch::kFloat32);
  const int64_t d = n == 0 ? 0 : out.numel() / n;
  float* data = out.data_ptr<float>();
  const std::array<uint32_t, 2> key{uint32_t(seed), uint32_t(seed >> 32)};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint64_t image = uint64_t(first_image + k);
      float* row = data + k * d;
      for (int64_t j = 0; j < d; j += 4) {
        auto r = philox4x32_10({uint32_t(j / 4), uint32_t(image), uint32_t(image >> 32), stream}, key);
        // Box-Muller on two pairs: u in (0, 1] keeps the logarithm finite.
        for (int pair = 0; pair < 2; ++pair) {
          const double u = (double(r[2 * pair]) + 1.0) * k2m32, angle = kTwoPi * double(r[2 * pair + 1]) * k2m32;
          const double radius = std::sqrt(-2.0 * std::log(u));
          if (j + 2 * pair < d) row[j + 2 * pair] = float(radius * std::cos(angle));
          if (j + 2 * pair + 1 < d) row[j + 2 * pair + 1] = float(radius * std::sin(angle));
        }
      }
    }
  });
  return out;
}

}  // namespace diffuse
