// The noise path (diffuse/core/noise_path.h): variance preserving or rectified flow, for training and sampling.
#include "diffuse/core/noise_path.h"

#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

#include "diffuse/core/scheduler_class.h"

namespace diffuse {

std::string to_string(PathKind kind) { return kind == PathKind::vp ? "vp" : "rectified-flow"; }

PathKind parse_path_kind(const std::string& name) {
  if (name == "vp") return PathKind::vp;
  if (name == "rectified-flow") return PathKind::rectified_flow;
  throw std::invalid_argument("path must be vp or rectified-flow, got '" + name + "'");
}

std::string to_string(TimeDensity density) { return density == TimeDensity::uniform ? "uniform" : "logit-normal"; }

TimeDensity parse_time_density(const std::string& name) {
  if (name == "uniform") return TimeDensity::uniform;
  if (name == "logit-normal") return TimeDensity::logit_normal;
  throw std::invalid_argument("timestep density must be uniform or logit-normal, got '" + name + "'");
}

NoisePath::NoisePath(Schedule schedule) : kind_(PathKind::vp), schedule_(std::move(schedule)) {
  T_ = schedule_.T();
  a_ = schedule_.a().to(torch::kFloat32);
  s_ = schedule_.s().to(torch::kFloat32);
  snr_ = schedule_.snr();
}

NoisePath NoisePath::rectified_flow(int64_t T, double shift, FlowDensity density) {
  if (T < 2) throw std::invalid_argument("a rectified-flow path needs T >= 2 training timesteps, got " + std::to_string(T));
  if (!(shift > 0) || !std::isfinite(shift))
    throw std::invalid_argument("the flow shift must be positive and finite, got " + std::to_string(shift));
  if (!(density.logit_std > 0) || !std::isfinite(density.logit_std) || !std::isfinite(density.logit_mean))
    throw std::invalid_argument("the logit-normal density needs a positive std and a finite mean");
  NoisePath p;
  p.kind_ = PathKind::rectified_flow;
  p.T_ = T;
  p.shift_ = shift;
  p.density_ = density;
  return p;
}

NoisePath NoisePath::of(const SchedulerConfig& config) {
  if (!flow_matching_class(config.extra.value("_class_name", std::string()))) return NoisePath(config.schedule());
  const auto shift = config.extra.find("shift");
  return rectified_flow(config.num_train_timesteps,
                        shift == config.extra.end() || shift->is_null() ? 1.0 : shift->get<double>());
}

const Schedule& NoisePath::schedule(const std::string& what) const {
  if (!is_vp())
    throw std::invalid_argument(what + " needs the discrete timesteps of a variance-preserving schedule; a "
                                "rectified-flow path has none (its levels are real sigmas)");
  return schedule_;
}

Level NoisePath::level(int64_t i) const {
  if (is_vp()) return level_at(schedule_, i);
  if (i < 0 || i >= T_)
    throw std::invalid_argument("timestep " + std::to_string(i) + " lies outside the path's [0, " + std::to_string(T_ - 1) + "]");
  return flow_level(double(i + 1) / double(T_), T_);
}

torch::Tensor NoisePath::snr() const {
  if (is_vp()) return schedule_.snr();
  auto sigma = torch::arange(1, T_ + 1, torch::kFloat64) / double(T_);
  return ((1.0 - sigma) / sigma).square();
}

std::vector<Level> NoisePath::levels(int64_t S, Spacing spacing, int64_t steps_offset) const {
  return is_vp() ? spaced_levels(schedule_, S, spacing, steps_offset) : flow_levels(T_, S, shift_, spacing);
}

torch::Tensor NoisePath::draw(int64_t n, at::Generator& gen) const {
  const auto on = [&](torch::ScalarType dtype) { return torch::TensorOptions(dtype).device(gen.device()); };
  if (is_vp()) return torch::randint(0, T_, {n}, gen, on(torch::kInt64));
  auto raw = density_.kind == TimeDensity::uniform
                 ? 1.0 - torch::rand({n}, gen, on(torch::kFloat64))  // (0, 1]
                 : torch::sigmoid(density_.logit_mean + density_.logit_std * torch::randn({n}, gen, on(torch::kFloat64)));
  return shift_ * raw / (1.0 + (shift_ - 1.0) * raw);
}

PathPoints NoisePath::points(const torch::Tensor& drawn) const {
  PathPoints p;
  if (is_vp()) {
    p.timestep = drawn;
    const auto t = drawn.to(device_);
    p.time = t.to(torch::kFloat64);
    p.a = a_.index_select(0, t);
    p.s = s_.index_select(0, t);
    p.snr = snr_.index_select(0, t);
    return p;
  }
  const auto sigma = drawn.to(device_);
  p.timestep = (drawn * double(T_)).floor().clamp(0, double(T_ - 1)).to(torch::kInt64);
  p.time = sigma * double(T_);
  p.a = (1.0 - sigma).to(torch::kFloat32);
  p.s = sigma.to(torch::kFloat32);
  p.snr = ((1.0 - sigma) / sigma).square();
  return p;
}

NoisePath NoisePath::to(torch::Device device) const {
  NoisePath p = *this;
  p.device_ = device;
  if (a_.defined()) {
    p.a_ = a_.to(device);
    p.s_ = s_.to(device);
    p.snr_ = snr_.to(device);
  }
  return p;
}

}  // namespace diffuse
