#include "diffuse/core/schedule.h"

#include <stdexcept>

#include <torch/torch.h>

namespace diffuse {
namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

std::string fmt(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

void check_T(int64_t T) {
  if (T < 2) throw std::invalid_argument("T must be at least 2, got " + std::to_string(T));
}

void check_beta_range(double beta_start, double beta_end) {
  for (double b : {beta_start, beta_end})
    if (!(b > 0.0 && b < 1.0))
      throw std::invalid_argument("beta_start and beta_end must lie in (0, 1), got " + fmt(beta_start) +
                                  " and " + fmt(beta_end));
}

}  // namespace

torch::Tensor Schedule::betas() const {
  auto prev = torch::cat({torch::ones({1}, kF64), alpha_bar.slice(0, 0, T() - 1)});
  return 1.0 - alpha_bar / prev;
}
torch::Tensor Schedule::a() const { return alpha_bar.sqrt(); }
torch::Tensor Schedule::s() const { return (1.0 - alpha_bar).sqrt(); }
torch::Tensor Schedule::snr() const { return alpha_bar / (1.0 - alpha_bar); }
torch::Tensor Schedule::log_snr() const { return snr().log(); }

double Schedule::alpha_bar_at(int64_t t) const {
  if (t < 0 || t >= T())
    throw std::out_of_range("timestep " + std::to_string(t) + " outside [0, " + std::to_string(T() - 1) + "]");
  return alpha_bar.data_ptr<double>()[t];
}

double Schedule::snr_at(int64_t t) const {
  double ab = alpha_bar_at(t);
  return ab / (1.0 - ab);
}

Schedule from_betas(const torch::Tensor& betas_in) {
  auto betas = betas_in.to(torch::kCPU, torch::kFloat64).contiguous();
  if (betas.dim() != 1) throw std::invalid_argument("betas must be a 1-D list");
  check_T(betas.size(0));
  auto bad = (betas <= 0) | (betas > 1) | betas.isnan();
  if (bad.any().item<bool>()) {
    int64_t i = bad.nonzero()[0][0].item<int64_t>();
    throw std::invalid_argument("beta[" + std::to_string(i) + "] = " + fmt(betas[i].item<double>()) +
                                " lies outside (0, 1]");
  }
  return Schedule{torch::cumprod(1.0 - betas, 0)};
}

Schedule from_betas(const std::vector<double>& betas) {
  return from_betas(torch::tensor(betas, kF64));
}

Schedule linear(int64_t T, double beta_start, double beta_end) {
  check_T(T);
  check_beta_range(beta_start, beta_end);
  return from_betas(torch::linspace(beta_start, beta_end, T, kF64));
}

Schedule scaled_linear(int64_t T, double beta_start, double beta_end) {
  check_T(T);
  check_beta_range(beta_start, beta_end);
  return from_betas(torch::linspace(std::sqrt(beta_start), std::sqrt(beta_end), T, kF64).pow(2));
}

Schedule cosine(int64_t T, double max_beta, double s) {
  check_T(T);
  // Nichol & Dhariwal 2021, eq. 17, as diffusers' betas_for_alpha_bar discretises it.
  auto f = [&](double t) {
    double c = std::cos((t + s) / (1.0 + s) * M_PI / 2.0);
    return c * c;
  };
  std::vector<double> betas(T);
  for (int64_t i = 0; i < T; ++i) {
    double b = 1.0 - f(double(i + 1) / T) / f(double(i) / T);
    betas[i] = max_beta > 0 ? std::min(b, max_beta) : std::min(b, 1.0);
  }
  return from_betas(betas);
}

Schedule sigmoid(int64_t T, double beta_start, double beta_end) {
  check_T(T);
  check_beta_range(beta_start, beta_end);
  auto x = torch::linspace(-6.0, 6.0, T, kF64);
  return from_betas(torch::sigmoid(x) * (beta_end - beta_start) + beta_start);
}

Schedule rescale_zero_terminal_snr(const Schedule& schedule) {
  // Algorithm 1 of Lin et al. 2023, done on sqrt(alpha_bar) directly (betas are derived).
  auto a = schedule.a();
  double a0 = a[0].item<double>();
  double aT = a[-1].item<double>();
  if (!(a0 > aT))
    throw std::invalid_argument("cannot rescale a schedule whose sqrt(alpha_bar) does not decrease");
  a = (a - aT) * (a0 / (a0 - aT));
  auto alpha_bar = a.pow(2);
  alpha_bar[-1] = 0.0;  // exactly, whatever the rounding of (aT - aT)
  return Schedule{alpha_bar};
}

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"linear", "scaled_linear", "cosine", "cosine_noclip",
                                                 "sigmoid"};
  return names;
}

Schedule make_schedule(const ScheduleSpec& spec) {
  check_T(spec.T);
  auto pick = [](double v, double dflt) { return v < 0 ? dflt : v; };
  const std::string& n = spec.name;
  Schedule out;
  if (n == "linear") {
    out = linear(spec.T, pick(spec.beta_start, 1e-4), pick(spec.beta_end, 0.02));
  } else if (n == "scaled_linear") {
    out = scaled_linear(spec.T, pick(spec.beta_start, 0.00085), pick(spec.beta_end, 0.012));
  } else if (n == "cosine" || n == "squaredcos_cap_v2") {
    out = cosine(spec.T, spec.zero_snr ? 0.0 : 0.999);
  } else if (n == "cosine_noclip") {
    out = cosine(spec.T, 0.0);
  } else if (n == "sigmoid") {
    out = sigmoid(spec.T, pick(spec.beta_start, 1e-4), pick(spec.beta_end, 0.02));
  } else {
    std::string list;
    for (auto& s : schedule_names()) list += (list.empty() ? "" : ", ") + s;
    throw std::invalid_argument("unknown schedule '" + n + "' (expected one of: " + list + ")");
  }
  // Cosine reaches SNR 0 by dropping its clip (Lin et al. section 3.1); the rest are rescaled.
  if (spec.zero_snr && !out.zero_terminal_snr()) out = rescale_zero_terminal_snr(out);
  return out;
}

// ---- continuous time ----

ContinuousSchedule::ContinuousSchedule(const Schedule& schedule)
    : log_snr_(schedule.log_snr()), a_(schedule.a()) {}

std::pair<torch::Tensor, torch::Tensor> ContinuousSchedule::a_s(const torch::Tensor& tau) const {
  auto T = log_snr_.size(0);
  auto ls = log_snr_.to(tau.device());
  auto ab = a_.to(tau.device());
  auto pos = tau.to(torch::kFloat64).clamp(0.0, 1.0) * double(T - 1);
  auto lo = pos.floor().clamp_max(T - 2).to(torch::kLong);
  auto frac = pos - lo.to(torch::kFloat64);
  auto l0 = ls.index_select(0, lo.flatten()).view_as(pos);
  auto l1 = ls.index_select(0, (lo + 1).flatten()).view_as(pos);
  // sigmoid(log-SNR) = alpha_bar: interpolate log-SNR, then a = sqrt(sigmoid(l)), s = sqrt(sigmoid(-l)).
  auto l = l0 + frac * (l1 - l0);
  auto a = torch::sigmoid(l).sqrt();
  auto s = torch::sigmoid(-l).sqrt();
  // On an interval that ends at SNR 0, log-SNR is -inf: interpolate a_t linearly there instead.
  auto terminal = torch::isinf(l1) | torch::isinf(l0);
  if (terminal.any().item<bool>()) {
    auto a0 = ab.index_select(0, lo.flatten()).view_as(pos);
    auto a1 = ab.index_select(0, (lo + 1).flatten()).view_as(pos);
    auto a_lin = a0 + frac * (a1 - a0);
    a = torch::where(terminal, a_lin, a);
    s = torch::where(terminal, (1.0 - a_lin.pow(2)).clamp_min(0.0).sqrt(), s);
  }
  return {a.to(tau.scalar_type()), s.to(tau.scalar_type())};
}

torch::Tensor ContinuousSchedule::log_snr(const torch::Tensor& tau) const {
  auto [a, s] = a_s(tau.to(torch::kFloat64));
  return (a.pow(2) / s.pow(2)).log().to(tau.scalar_type());
}

// ---- spacing ----

Spacing parse_spacing(const std::string& name) {
  if (name == "leading") return Spacing::leading;
  if (name == "linspace") return Spacing::linspace;
  if (name == "trailing") return Spacing::trailing;
  if (name == "karras") return Spacing::karras;
  if (name == "exponential") return Spacing::exponential;
  if (name == "beta") return Spacing::beta;
  throw std::invalid_argument("unknown timestep spacing '" + name +
                              "' (expected leading, linspace, trailing, karras, exponential or beta)");
}

std::string to_string(Spacing spacing) {
  switch (spacing) {
    case Spacing::leading: return "leading";
    case Spacing::linspace: return "linspace";
    case Spacing::trailing: return "trailing";
    case Spacing::karras: return "karras";
    case Spacing::exponential: return "exponential";
    case Spacing::beta: return "beta";
  }
  return "?";
}

std::vector<int64_t> spaced_timesteps(int64_t T, int64_t S, Spacing spacing, int64_t steps_offset) {
  check_T(T);
  if (S < 1 || S > T)
    throw std::invalid_argument("number of sampling steps must lie in [1, T = " + std::to_string(T) + "], got " +
                                std::to_string(S));
  if (is_sigma_spacing(spacing))
    throw std::invalid_argument(to_string(spacing) + " is a sigma spacing: its timesteps are fractional (spaced_levels)");
  std::vector<int64_t> ts(S);
  // np.round rounds half to even; std::nearbyint does the same in the default rounding mode.
  switch (spacing) {
    case Spacing::leading: {
      int64_t ratio = T / S;
      for (int64_t i = 0; i < S; ++i) ts[S - 1 - i] = i * ratio + steps_offset;
      if (ts.front() >= T)
        throw std::invalid_argument("leading spacing with steps_offset " + std::to_string(steps_offset) +
                                    " and S = " + std::to_string(S) + " walks t = " + std::to_string(ts.front()) +
                                    " >= T; use steps_offset 0 or trailing spacing");
      break;
    }
    case Spacing::linspace:
      // As numpy.linspace: i * step, with the last point exactly T - 1.
      for (int64_t i = 0; i < S; ++i) {
        double step = S == 1 ? 0.0 : double(T - 1) / double(S - 1);
        double v = i == S - 1 ? double(T - 1) : double(i) * step;
        ts[S - 1 - i] = S == 1 ? 0 : int64_t(std::nearbyint(v));
      }
      break;
    case Spacing::trailing: {
      double ratio = double(T) / double(S);
      for (int64_t i = 0; i < S; ++i) ts[i] = int64_t(std::nearbyint(double(T) - double(i) * ratio)) - 1;
      break;
    }
    case Spacing::karras:
    case Spacing::exponential:
    case Spacing::beta: break;
  }
  return ts;
}

}  // namespace diffuse

namespace diffuse {

torch::Tensor diffusers_alphas_cumprod(const std::string& beta_schedule, int64_t T, double beta_start,
                                       double beta_end, bool rescale_zero_snr) {
  check_T(T);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor betas;
  if (beta_schedule == "linear") {
    betas = torch::linspace(beta_start, beta_end, T, f32);
  } else if (beta_schedule == "scaled_linear") {
    betas = torch::linspace(std::sqrt(beta_start), std::sqrt(beta_end), T, f32).pow(2);
  } else if (beta_schedule == "squaredcos_cap_v2" || beta_schedule == "cosine") {
    betas = cosine(T).betas().to(torch::kFloat32);  // python floats, then torch.tensor(float32)
  } else if (beta_schedule == "sigmoid") {
    betas = torch::sigmoid(torch::linspace(-6, 6, T, f32)) * (beta_end - beta_start) + beta_start;
  } else {
    throw std::invalid_argument("unknown beta_schedule '" + beta_schedule + "'");
  }
  if (rescale_zero_snr) {  // diffusers' rescale_zero_terminal_snr, line by line (Algorithm 1)
    auto alphas_bar_sqrt = (1.0 - betas).cumprod(0).sqrt();
    auto a0 = alphas_bar_sqrt[0].clone();
    auto aT = alphas_bar_sqrt[-1].clone();
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT));
    auto alphas_bar = alphas_bar_sqrt.pow(2);
    auto alphas = torch::cat({alphas_bar.slice(0, 0, 1), alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, -1)});
    betas = 1.0 - alphas;
  }
  return (1.0 - betas).cumprod(0);
}

}  // namespace diffuse
