// Analyses behind `diffuse analyze`: image brightness of samples against data (003 document), the loss per
// timestep in every prediction target (000 document) and the Lipschitz constant of eps in t (002 document).
//
// Notation as in schedule.h: x_t = a_t x0 + s_t eps, SNR = a_t^2 / s_t^2, v = a_t eps - s_t x0. The analyses in t
// walk the grid of the model's noise path (noise_path.h): a discrete schedule's timesteps, or on a rectified-flow
// path t = 0..T-1 at sigma = (t + 1) / T, the network conditioned on sigma T.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diffuse/sample/denoiser.h"
#include "diffuse/eval/metrics.h"
#include "diffuse/core/noise_path.h"
#include "diffuse/core/prediction.h"

namespace diffuse {

// ---------------------------------------------------------------- brightness

/// Mean of each image over C, H, W: float64 [N] on the CPU, in the images' own range ([-1, 1]).
torch::Tensor image_brightness(const torch::Tensor& images);

struct BrightnessReport {
  int64_t data_count = 0, sample_count = 0;
  double data_mean = 0, sample_mean = 0;
  double data_std = 0, sample_std = 0;  ///< spread of the per-image brightness (population std, divisor N)
  double w1 = 0;                     ///< 1-Wasserstein distance between the two brightness distributions
  DecileCoverage share;              ///< samples below the data's 10% / above its 90% quantile (0.1 each ideally)
  double data_p10 = 0, data_p90 = 0; ///< those quantiles
  std::vector<double> bin_edges;     ///< bins + 1 edges over [lo, hi]
  std::vector<double> data_density, sample_density;  ///< histogram densities (integrate to 1 inside [lo, hi])
};
/// Brightness of `data` and `samples` (either images [N, C, H, W] or per-image values [N]) compared:
/// W1, extreme-decile shares and `bins` histogram densities over [lo, hi].
BrightnessReport compare_brightness(const torch::Tensor& data, const torch::Tensor& samples, int64_t bins = 40,
                                    double lo = -1.0, double hi = 1.0);

// ---------------------------------------------------------------- loss per timestep

/// Losses at one timestep: the mean over images and pixels of the squared error of the model's output in
/// its own target, and of the same output converted to each target (prediction.h). Conversions that do
/// not exist at that t (an eps model at SNR 0 says nothing about x0 or v) are NaN.
struct LossRow {
  int64_t t = 0;
  double condition = 0;             ///< the time the network saw (E-TSDM map of t; sigma T on a flow path)
  double snr = 0;
  double loss_own = 0;              ///< in the model's own target (what training minimised, weight 1)
  double loss_eps = 0, loss_v = 0, loss_x0 = 0;
  double ratio_measured = 0;        ///< loss_v / loss_eps
  double ratio_predicted = 0;       ///< (a^2 + s^2)^2 / a^2: (SNR + 1) / SNR on a VP path (000 document); inf at SNR 0
};

struct LossOptions {
  int64_t batch = 64;
  uint64_t seed = 0;                ///< the noise of image i at timestep t depends only on (seed, i, t)
};

/// For each t in `timesteps`: x_t = a_t x0 + s_t eps at the path's level(t) with fixed noise, the network called as
/// sampling calls it (condition etsdm.condition of the level's t, `labels` or undefined), errors measured against
/// eps, v and x0.
std::vector<LossRow> loss_per_timestep(const Network& net, Prediction prediction, const NoisePath& path,
                                       const EtsdmConfig& etsdm, const torch::Tensor& x0, const torch::Tensor& labels,
                                       const std::vector<int64_t>& timesteps, const LossOptions& options = {});

/// `points` timesteps spread over [0, T-1], denser at both ends (where the ratio changes fastest): evenly
/// spaced in the arcsine of 2t/(T-1) - 1; always includes 0 and T-1; distinct and ascending.
std::vector<int64_t> loss_timestep_grid(int64_t T, int64_t points);

// ---------------------------------------------------------------- Lipschitz constant in t

/// K(t, t') = E_{x_t} || eps(x_t, t) - eps(x_t, t') ||_2 / |t - t'| (002 document; Yang et al. 2024, eq. 3),
/// x_t drawn at t, t and t' points of the path's grid. eps(x, t) is the model's output converted to eps at timestep t, with the network
/// conditioned on etsdm.condition(t) exactly as sampling conditions it: with E-TSDM, K is 0 for t and t'
/// inside one interval and the jump at an edge divided by |t - t'| across it.
struct LipschitzRow {
  int64_t t = 0, t2 = 0;
  double condition = 0, condition2 = 0;  ///< the network's timestep conditions at t and t2
  double K = 0;
};
std::vector<LipschitzRow> lipschitz_per_timestep(const Network& net, Prediction prediction, const NoisePath& path,
                                                 const EtsdmConfig& etsdm, const torch::Tensor& x0,
                                                 const torch::Tensor& labels,
                                                 const std::vector<std::pair<int64_t, int64_t>>& pairs,
                                                 const LossOptions& options = {});

/// Pairs (t, t + dt) for t = 0, dt, 2 dt, ... below `dense_until`, then every `stride` up to T - 1 - dt:
/// the full resolution near t = 0 where the Lipschitz singularity lives, a coarse grid elsewhere.
std::vector<std::pair<int64_t, int64_t>> lipschitz_grid(int64_t T, int64_t dt = 1, int64_t dense_until = 100,
                                                        int64_t stride = 25);

}  // namespace diffuse
