// E-TSDM timestep sharing: the timestep condition a network sees near t = 0.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace diffuse {

/// E-TSDM (Yang et al., ICLR 2024, "Lipschitz singularities in diffusion models"): the network's
/// timestep condition is f(t) = the largest interval edge <= t on [0, t_tilde) split in n equal
/// intervals, and f(t) = t from t_tilde on. n = 0 disables it.
struct EtsdmConfig {
  int64_t t_tilde = 0;
  int64_t n = 0;
  bool enabled() const { return n > 0 && t_tilde > 0; }
  /// The network's timestep condition f(t) for true timesteps t (any device, integer or float):
  /// edges t_i = i * t_tilde / n; f(t) = max{t_i <= t} for t < t_tilde, f(t) = t otherwise.
  /// Returns float32 (edges may be fractional when n does not divide t_tilde); identity when disabled.
  torch::Tensor condition(const torch::Tensor& t) const;
};

}  // namespace diffuse
