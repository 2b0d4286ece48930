#include "diffuse/core/etsdm.h"

#include <torch/torch.h>

namespace diffuse {

torch::Tensor EtsdmConfig::condition(const torch::Tensor& t) const {
  auto tf = t.to(torch::kFloat32);
  if (!enabled()) return tf;
  // E-TSDM (Yang et al. 2024, section 4): one shared condition per interval of [0, t_tilde).
  double width = double(t_tilde) / double(n);
  auto td = t.to(torch::kFloat64);
  auto edge = (td / width).floor() * width;
  return torch::where(td < double(t_tilde), edge, td).to(torch::kFloat32);
}

}  // namespace diffuse
