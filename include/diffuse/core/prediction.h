// Prediction targets (eps, v, x0), their exact conversions and SNR-based loss weights.
//
// With x_t = a x0 + s eps (a^2 + s^2 = 1) and v = a eps - s x0 (Salimans & Ho 2022):
//   x0 = a x_t - s v,  eps = s x_t + a v                    exact for every t, SNR = 0 included
//   eps = (x_t - a x0) / s                                   s > 0 at every training timestep
//   x0 = (x_t - s eps) / a                                   singular at a = 0: refused there
// The tensors a and s broadcast against x_t (e.g. shape [N, 1, 1, 1]).
//
// The fourth type, flow, is the rectified-flow velocity u = eps - x0 (Liu et al. 2022; Stable Diffusion 3's and
// diffusers' "flow_prediction": on the path a = 1 - t, s = t it is dx_t/dt). Its conversions solve
// [a s; -1 1] (x0, eps) = (x_t, u), whose determinant a + s never vanishes, so they are exact on any path:
//   x0 = (x_t - s u) / (a + s),  eps = (x_t + a u) / (a + s).
// The v conversions divide by a^2 + s^2 (1 on variance-preserving paths), so they too hold on any path.
#pragma once

#include <torch/types.h>

#include <string>

namespace diffuse {

enum class Prediction { eps, v, x0, flow };

/// Accepts diffuse's names (eps, v, x0, flow) and diffusers' (epsilon, v_prediction, sample, flow_prediction).
Prediction parse_prediction(const std::string& name);
std::string to_string(Prediction p);        ///< eps, v, x0, flow
std::string diffusers_name(Prediction p);   ///< epsilon, v_prediction, sample, flow_prediction

/// The forward process x_t = a x0 + s eps: with one (a, s) for the batch, or with per-example a and s [N]
/// (broadcast over the other axes of x0). The one place diffuse noises data (training, analyses).
torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps, double a, double s);
torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& eps, const torch::Tensor& a,
                        const torch::Tensor& s);

/// The training target of a prediction type for a given clean sample and noise.
torch::Tensor target(Prediction p, const torch::Tensor& x0, const torch::Tensor& eps, const torch::Tensor& a,
                     const torch::Tensor& s);

/// Converts a model output of type `from` at x_t into the quantity `to`.
/// eps -> x0 and eps -> v need a > 0 and throw std::domain_error at SNR = 0 (information is lost there).
torch::Tensor convert(Prediction from, Prediction to, const torch::Tensor& pred, const torch::Tensor& x_t,
                      const torch::Tensor& a, const torch::Tensor& s);
inline torch::Tensor to_x0(Prediction from, const torch::Tensor& pred, const torch::Tensor& x_t,
                           const torch::Tensor& a, const torch::Tensor& s) {
  return convert(from, Prediction::x0, pred, x_t, a, s);
}
inline torch::Tensor to_eps(Prediction from, const torch::Tensor& pred, const torch::Tensor& x_t,
                            const torch::Tensor& a, const torch::Tensor& s) {
  return convert(from, Prediction::eps, pred, x_t, a, s);
}
inline torch::Tensor to_v(Prediction from, const torch::Tensor& pred, const torch::Tensor& x_t,
                          const torch::Tensor& a, const torch::Tensor& s) {
  return convert(from, Prediction::v, pred, x_t, a, s);
}

/// Loss weights are stated on the x0 error and converted to the network's target.
/// Since ||eps - eps^||^2 = SNR ||x0 - x0^||^2 and ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2 (000 document),
/// a weight w(SNR) on the x0 error is w / SNR on an eps error, w / (SNR + 1) on a v error.
///   uniform:  plain MSE on the target            (w = SNR, SNR + 1 or 1 for eps, v, x0)
///   eps:      eps-equivalent, w = SNR            (DDPM's "simple" loss)
///   v:        v-equivalent,   w = SNR + 1
///   min_snr:  w = min(SNR, gamma)                (Hang et al. 2023, Min-SNR-gamma)
///   truncated:w = max(SNR, 1)                    (Salimans & Ho 2022, truncated SNR)
/// A flow target's error is ((a + s) / s)^2 = (sqrt(SNR) + 1)^2 times the x0 error on any path.
enum class LossWeight { uniform, eps, v, min_snr, truncated };
LossWeight parse_loss_weight(const std::string& name);
std::string to_string(LossWeight w);

/// The per-example weight on the squared error of `target` for each SNR value in `snr`.
/// Finite at SNR = 0 for v and x0 targets; an eps target at SNR = 0 is refused (std::domain_error):
/// eps carries no information there (Lin et al. 2023, section 3.2).
torch::Tensor loss_weight(LossWeight w, Prediction target, const torch::Tensor& snr, double gamma = 5.0);
/// The weight on the x0 error that a loss weight stands for (the same function for every target).
torch::Tensor x0_weight(LossWeight w, Prediction target, const torch::Tensor& snr, double gamma = 5.0);

}  // namespace diffuse
