// Reproducible noise (include/diffuse/core/noise.h).
#include "diffuse/core/noise.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

namespace diffuse {

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  // Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", Philox-4x32 with 10 rounds.
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
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

torch::Tensor make_noise(torch::IntArrayRef shape_per_image, int64_t n, uint64_t seed, int64_t first_image,
                         uint32_t stream) {
  if (n < 0 || first_image < 0)
    throw std::invalid_argument("make_noise: image count and first image must be >= 0");
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), shape_per_image.begin(), shape_per_image.end());
  auto out = torch::empty(shape, torch::kFloat32);
  const int64_t d = n == 0 ? 0 : out.numel() / n;
  float* data = out.data_ptr<float>();
  const std::array<uint32_t, 2> key{uint32_t(seed), uint32_t(seed >> 32)};
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr double k2m32 = 1.0 / 4294967296.0;
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
