// The noise path a model is trained on and sampled along, as one value: variance preserving (a discrete schedule,
// integer timesteps t = 0..T-1, a_t^2 + s_t^2 = 1) or rectified flow (a = 1 - sigma, s = sigma for real sigma in
// (0, 1], the network conditioned on sigma * T; Liu et al. 2022, Esser et al. 2024). The same value draws the
// training points (t, a, s) of a batch, gives the T points of its grid (analyses), and builds sampling levels.
//
// Notation as in schedule.h and levels.h: x_t = a x0 + s eps, SNR = a^2 / s^2.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diffuse/core/levels.h"
#include "diffuse/core/schedule.h"
#include "diffuse/core/scheduler_config.h"

namespace diffuse {

enum class PathKind { vp, rectified_flow };
std::string to_string(PathKind kind);           ///< "vp", "rectified-flow"
PathKind parse_path_kind(const std::string& name);  ///< throws naming the choices

/// The density of the unshifted training sigma of a rectified-flow path.
enum class TimeDensity {
  uniform,       ///< sigma ~ U(0, 1]
  logit_normal,  ///< sigma = sigmoid(mean + std n), n ~ N(0, 1) (Esser et al. 2024, SD3)
};
std::string to_string(TimeDensity density);              ///< "uniform", "logit-normal"
TimeDensity parse_time_density(const std::string& name);  ///< throws naming the choices

struct FlowDensity {
  TimeDensity kind = TimeDensity::uniform;
  double logit_mean = 0.0, logit_std = 1.0;
};

/// The training points of a batch: float32 a, s on the path's device; `time` the network's time before any E-TSDM
/// map (float64: VP t, flow sigma T); `timestep` int64, the integer bucket of each point (VP t, flow floor(sigma T)
/// clamped to T - 1: the loss log's column and the index of per-timestep tables); `snr` float64 a^2 / s^2.
struct PathPoints {
  torch::Tensor timestep, time, a, s, snr;
};

class NoisePath {
 public:
  /// An empty path (T = 0): something to assign to.
  NoisePath() = default;
  /// The variance-preserving path of a discrete schedule (implicit: a schedule is a path).
  NoisePath(Schedule schedule);
  /// The rectified-flow path of T training timesteps: training draws sigma from `density`, then shift it
  /// (sigma -> shift sigma / (1 + (shift - 1) sigma), diffusers' FlowMatchEulerDiscreteScheduler); sampling walks
  /// flow_levels with the same shift.
  static NoisePath rectified_flow(int64_t T, double shift = 1.0, FlowDensity density = {});
  /// The path a scheduler config describes: a FlowMatch class's rectified flow (its `shift`), else its schedule.
  static NoisePath of(const SchedulerConfig& config);

  PathKind kind() const { return kind_; }
  bool is_vp() const { return kind_ == PathKind::vp; }
  int64_t T() const { return T_; }
  double shift() const { return shift_; }
  const FlowDensity& density() const { return density_; }
  /// The discrete schedule of a VP path; a rectified-flow path has none and throws, naming `what` needs it.
  const Schedule& schedule(const std::string& what = "this") const;

  /// Point i of the grid, i in [0, T - 1]: VP level_at(schedule, i); rectified flow sigma = (i + 1) / T (unshifted:
  /// the grid covers the path evenly; diffusers' training sigmas before their shift), t = sigma T.
  Level level(int64_t i) const;
  /// SNR at every grid point, float64 [T] (0 where a = 0).
  torch::Tensor snr() const;
  /// S sampling levels spaced by `spacing`, noisiest first: VP spaced_levels (steps_offset for leading), rectified
  /// flow flow_levels with the path's shift. The end level is the clean data.
  std::vector<Level> levels(int64_t S, Spacing spacing, int64_t steps_offset = 0) const;

  /// n training draws from `gen`, made on its device: VP int64 t ~ U{0..T-1}; rectified flow the shifted sigma
  /// (float64). Cut a data-parallel shard from them, then call points().
  torch::Tensor draw(int64_t n, at::Generator& gen) const;
  /// The training points of draws (any rows of draw()'s result), on the device of the last to().
  PathPoints points(const torch::Tensor& drawn) const;
  /// A copy whose tables live on `device` (VP: a, s and SNR per timestep, for points()).
  NoisePath to(torch::Device device) const;

 private:
  PathKind kind_ = PathKind::vp;
  Schedule schedule_;
  int64_t T_ = 0;
  double shift_ = 1.0;
  FlowDensity density_;
  torch::Device device_ = torch::kCPU;
  torch::Tensor a_, s_, snr_;  // VP: float32 a and s, float64 SNR, [T] on device_
};

}  // namespace diffuse
