#include "diffuse/core/prediction.h"

#include <stdexcept>

#include <torch/torch.h>

namespace diffuse {

Prediction parse_prediction(const std::string& name) {
  if (name == "eps" || name == "epsilon") return Prediction::eps;
  if (name == "v" || name == "v_prediction") return Prediction::v;
  if (name == "x0" || name == "sample") return Prediction::x0;
  if (name == "flow" || name == "flow_prediction") return Prediction::flow;
  throw std::invalid_argument("unknown prediction type '" + name + "' (expected eps, v, x0 or flow)");
}

std::string to_string(Prediction p) {
  switch (p) {
    case Prediction::eps: return "eps";
    case Prediction::v: return "v";
    case Prediction::x0: return "x0";
    case Prediction::flow: return "flow";
  }
  return "?";
}

std::string diffusers_name(Prediction p) {
  switch (p) {
    case Prediction::eps: return "epsilon";
    case Prediction::v: return "v_prediction";
    case Prediction::x0: return "sample";
    case Prediction::flow: return "flow_prediction";
  }
  return "?";
}

torch::Tensor target(Prediction p, const torch::Tensor& x0, const torch::Tensor& eps, const torch::Tensor& a,
                     const torch::Tensor& s) {
  switch (p) {
    case Prediction::eps: return eps;
    case Prediction::x0: return x0;
    case Prediction::v: return a * eps - s * x0;
    case Prediction::flow: return eps - x0;
  }
  throw std::logic_error("bad prediction type");
}

namespace {
void require_signal(const torch::Tensor& a) {
  if ((a == 0).any().item<bool>())
    throw std::domain_error(
        "an eps prediction cannot be converted to x0 or v at SNR = 0 (a_t = 0: x_t holds no signal); "
        "use a v or x0 model on zero-terminal-SNR schedules (Lin et al. 2023, section 3.2)");
}
}  // namespace

// Every conversion solves x_t = a x0 + s eps together with the output's definition, without assuming a^2 + s^2 = 1
// (r2 = a^2 + s^2 is 1 on variance-preserving paths, where the division by it is exact in float32 for the 0-dim
// float64 (a, s) of a sampler step).
torch::Tensor convert(Prediction from, Prediction to, const torch::Tensor& pred, const torch::Tensor& x_t,
                      const torch::Tensor& a, const torch::Tensor& s) {
  if (from == to) return pred;
  if (to == Prediction::flow) {  // u = eps - x0
    if (from == Prediction::x0) return (x_t - (a + s) * pred) / s;
    if (from == Prediction::eps) {
      require_signal(a);
      return ((a + s) * pred - x_t) / a;
    }
    return convert(from, Prediction::eps, pred, x_t, a, s) - convert(from, Prediction::x0, pred, x_t, a, s);
  }
  switch (from) {
    case Prediction::v: {  // [a s; -s a] (x0, eps) = (x_t, v)
      const auto r2 = a * a + s * s;
      if (to == Prediction::x0) return (a * x_t - s * pred) / r2;
      return (s * x_t + a * pred) / r2;
    }
    case Prediction::x0: {
      if (to == Prediction::eps) return (x_t - a * pred) / s;
      return (a * x_t - (a * a + s * s) * pred) / s;  // v = a eps - s x0 = (a x_t - (a^2 + s^2) x0) / s
    }
    case Prediction::eps:
      require_signal(a);
      if (to == Prediction::x0) return (x_t - s * pred) / a;
      return ((a * a + s * s) * pred - s * x_t) / a;  // v = a eps - s (x_t - s eps) / a
    case Prediction::flow: {  // [a s; -1 1] (x0, eps) = (x_t, u); determinant a + s > 0 on every path
      const auto x0 = (x_t - s * pred) / (a + s);
      if (to == Prediction::x0) return x0;
      const auto eps = (x_t + a * pred) / (a + s);
      if (to == Prediction::eps) return eps;
      return a * eps - s * x0;
    }
  }
  throw std::logic_error("bad prediction type");
}

LossWeight parse_loss_weight(const std::string& name) {
  if (name == "uniform") return LossWeight::uniform;
  if (name == "eps" || name == "eps-equivalent" || name == "snr") return LossWeight::eps;
  if (name == "v" || name == "v-equivalent" || name == "snr+1") return LossWeight::v;
  if (name == "min-snr" || name == "min_snr") return LossWeight::min_snr;
  if (name == "truncated" || name == "truncated-snr") return LossWeight::truncated;
  throw std::invalid_argument("unknown loss weight '" + name +
                              "' (expected uniform, eps, v, min-snr or truncated)");
}

std::string to_string(LossWeight w) {
  switch (w) {
    case LossWeight::uniform: return "uniform";
    case LossWeight::eps: return "eps";
    case LossWeight::v: return "v";
    case LossWeight::min_snr: return "min-snr";
    case LossWeight::truncated: return "truncated";
  }
  return "?";
}

namespace {
// ||target error||^2 = factor * ||x0 error||^2.
torch::Tensor target_factor(Prediction target, const torch::Tensor& snr) {
  switch (target) {
    case Prediction::eps: return snr;
    case Prediction::v: return snr + 1.0;
    case Prediction::x0: return torch::ones_like(snr);
    case Prediction::flow: return (snr.sqrt() + 1.0).square();  // u - u^ = -((a + s) / s)(x0 - x0^)
  }
  throw std::logic_error("bad prediction type");
}
}  // namespace

torch::Tensor x0_weight(LossWeight w, Prediction target, const torch::Tensor& snr, double gamma) {
  switch (w) {
    case LossWeight::uniform: return target_factor(target, snr);
    case LossWeight::eps: return snr.clone();
    case LossWeight::v: return snr + 1.0;
    case LossWeight::min_snr:
      if (!(gamma > 0)) throw std::invalid_argument("min-SNR gamma must be positive, got " + std::to_string(gamma));
      return snr.clamp_max(gamma);
    case LossWeight::truncated: return snr.clamp_min(1.0);
  }
  throw std::logic_error("bad loss weight");
}

torch::Tensor loss_weight(LossWeight w, Prediction target, const torch::Tensor& snr, double gamma) {
  if (target == Prediction::eps && (snr == 0).any().item<bool>())
    throw std::domain_error(
        "eps prediction is meaningless at SNR = 0 (the last timestep of a zero-terminal-SNR schedule): "
        "train with --prediction v (or x0), Lin et al. 2023 section 3.2");
  if (w == LossWeight::uniform) return torch::ones_like(snr);
  return x0_weight(w, target, snr, gamma) / target_factor(target, snr);
}

torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps, double a, double s) {
  return a * x0 + s * eps;
}

torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps, const torch::Tensor& a,
                        const torch::Tensor& s) {
  std::vector<int64_t> shape(size_t(x0.dim()), 1);
  shape[0] = x0.size(0);
  return a.view(shape) * x0 + s.view(shape) * eps;
}

}  // namespace diffuse
