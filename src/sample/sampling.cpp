// Samplers (include/diffuse/sample/sampling.h).
//
// Notation: a step goes from timestep t with (a, s) to t_next with (a', s'), a^2 + s^2 = 1;
// lambda = log(a / s) (half the log-SNR), h = lambda' - lambda >= 0, q = exp(-h) = (a s') / (a' s) in [0, 1].
// s > 0 at every training timestep and a' > 0 at every target (only t = T - 1 can have a = 0, and no step
// ends there), so q is always a finite ratio: q = 0 both on the first step from SNR 0 (a = 0,
// lambda = -inf) and on a step to the clean data (s' = 0, lambda' = +inf). Every update below is
// written with q, a, s, a', s' and is exact at those limits; none divides by a.
#include "diffuse/sample/sampling.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace diffuse {

// ---------------------------------------------------------------------------------------------------
// Samplers

DdpmVariance parse_ddpm_variance(const std::string& name) {
  if (name == "fixed_small") return DdpmVariance::fixed_small;
  if (name == "fixed_large") return DdpmVariance::fixed_large;
  throw std::invalid_argument("unknown DDPM variance '" + name + "' (expected fixed_small or fixed_large)");
}

std::string to_string(DdpmVariance v) { return v == DdpmVariance::fixed_small ? "fixed_small" : "fixed_large"; }

namespace {

// One step's noise levels: the current timestep and its target.
struct Step {
  int64_t i, t, t_next;          // t_next = -1 on the last step
  double ab, a, s;               // alpha_bar, a, s at t
  double ab_next, a_next, s_next;
  double q() const { return a * s_next / (a_next * s); }  // exp(-h), in [0, 1]
  double h() const { double e = q(); return e > 0 ? -std::log(e) : std::numeric_limits<double>::infinity(); }
  int64_t eval_next() const { return t_next >= 0 ? t_next : 0; }  // the timestep whose level the target has,
                                                                    // when the target is not alpha_bar = 1
};

// Validates the timestep list and turns it into steps with their (a, s) pairs.
std::vector<Step> make_steps(const Schedule& schedule, const std::vector<int64_t>& ts, const SamplerOptions& o) {
  const int64_t T = schedule.T();
  if (ts.empty()) throw std::invalid_argument("sampler: empty timestep list (expected 1 <= S <= T timesteps)");
  std::vector<Step> steps;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t t = ts[i];
    if (t < 0 || t >= T)
      throw std::invalid_argument("sampler: timestep " + std::to_string(t) + " outside the schedule's [0, " +
                                  std::to_string(T - 1) + "]");
    if (i > 0 && t >= ts[i - 1])
      throw std::invalid_argument("sampler: timesteps must be strictly descending, got " +
                                  std::to_string(ts[i - 1]) + " then " + std::to_string(t));
    Step st;
    st.i = int64_t(i);
    st.t = t;
    st.t_next = i + 1 < ts.size() ? ts[i + 1] : -1;
    st.ab = schedule.alpha_bar_at(t);
    if (!(st.ab < 1.0))
      throw std::invalid_argument("sampler: alpha_bar[" + std::to_string(t) + "] = 1 (no noise at that timestep)");
    st.ab_next = st.t_next >= 0 ? schedule.alpha_bar_at(st.t_next) : (o.set_alpha_to_one ? 1.0 : schedule.alpha_bar_at(0));
    if (!(st.ab_next > 0.0))
      throw std::invalid_argument("sampler: a step cannot end at SNR 0 (alpha_bar = 0 at timestep " +
                                  std::to_string(st.t_next) + ")");
    st.a = std::sqrt(st.ab);
    st.s = std::sqrt(1.0 - st.ab);
    st.a_next = std::sqrt(st.ab_next);
    st.s_next = std::sqrt(1.0 - st.ab_next);
    steps.push_back(st);
  }
  return steps;
}

torch::Tensor step_noise(const torch::Tensor& x, const SamplerOptions& o, int64_t step) {
  return make_noise(x.sizes().slice(1), x.size(0), o.seed, o.first_image, uint32_t(step + 1), x.device())
      .to(x.scalar_type());
}

void notify(const SamplerOptions& o, const Step& st, int64_t n_steps, const torch::Tensor& x,
            const torch::Tensor& x0) {
  if (o.callback) o.callback(StepInfo{st.i, n_steps, st.t, st.t_next, x, x0});
}

double eta_or(const SamplerOptions& o, double fallback, const char* sampler) {
  const double eta = std::isnan(o.eta) ? fallback : o.eta;
  if (!(eta >= 0.0) || !std::isfinite(eta))
    throw std::invalid_argument(std::string(sampler) + ": eta must be finite and >= 0, got " + std::to_string(eta));
  return eta;
}

// The family x' = a' x0 + sqrt(s'^2 - sigma^2) eps + sigma z, where sigma(step) is the std of the fresh noise:
// DDIM (eq. 12 of Song et al. 2021), Euler and Euler ancestral.
template <class NoiseStd>
torch::Tensor ddim_family(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x_T,
                          const SamplerOptions& o, NoiseStd noise_std) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.schedule, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.t);
    const double sigma = noise_std(st);
    x = st.a_next * e.x0 + std::sqrt(std::max(0.0, st.s_next * st.s_next - sigma * sigma)) * e.eps;
    if (sigma > 0) x = x + sigma * step_noise(x, o, st.i);
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

// DPM-Solver++(2M) and its SDE variant in one loop, eta = 0 being the ODE (k-diffusion sample_dpmpp_2m_sde
// with midpoint; Lu et al. 2022, "DPM-Solver++", Algorithm 2 and eq. for the SDE solver). In (a, s):
//   x' = (s'/s) q^eta x + a' (1 - q^(1+eta)) [x0 + (1 / (2 r)) (x0 - x0_prev)] + s' sqrt(1 - q^(2 eta)) z,
// r = h_prev / h. At eta = 0 and without the bracket's second term this is the DDIM step
// x' = a' x0 + s' eps; at a = 0 (q = 0) it is x' = a' x0 + s' (z or x); a step to s' = 0 gives x' = a' x0.
// The second-order term is dropped where it is undefined (first step; previous step from lambda = -inf, where
// 1 / r = 0; a step to lambda = +inf, where 1 / r = inf) and on the last step when lower_order_final and
// fewer than 15 steps (diffusers 0.25).
torch::Tensor dpmpp_2m_loop(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x_T,
                            const SamplerOptions& o, double eta) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.schedule, ts, o);
  const int64_t n = int64_t(steps.size());
  auto x = x_T;
  torch::Tensor x0_prev;
  double h_prev = 0;
  for (const auto& st : steps) {
    Estimate e = d(x, st.t);
    const double q = st.q(), h = st.h();
    const double q_eta = std::pow(q, eta);  // pow(0, 0) = 1: the ODE keeps x
    const double c_x0 = st.a_next * (1.0 - q * q_eta);
    const bool final_low = o.lower_order_final && st.i == n - 1 && n < 15;
    const bool second = x0_prev.defined() && std::isfinite(h_prev) && std::isfinite(h) && h > 0 && !final_low;
    auto x0 = second ? e.x0 + (h / (2.0 * h_prev)) * (e.x0 - x0_prev) : e.x0;
    auto x_next = (st.s_next / st.s * q_eta) * x + c_x0 * x0;
    const double noise = st.s_next * std::sqrt(std::max(0.0, 1.0 - q_eta * q_eta));
    if (noise > 0) x_next = x_next + noise * step_noise(x, o, st.i);
    x = x_next;
    x0_prev = e.x0;
    h_prev = h;
    notify(o, st, n, x, e.x0);
  }
  return x;
}

}  // namespace

// Posterior q(x_prev | x_t, x0) of the spaced chain (Ho et al. 2020, eqs. 6-7), beta = 1 - alpha_bar / alpha_bar_prev:
//   mu = (a' beta / s^2) x0 + (a / a') (s'^2 / s^2) x_t         (x0 form, Lin et al. 2023 section 3.4)
//   var = beta s'^2 / s^2 (fixed_small) or beta (fixed_large).
// a / a' = sqrt(1 - beta) divides by a', which is > 0 at every target. Ho et al.'s Algorithm 2 adds no noise
// on its last step (z = 0 at t = 1); neither does this.
torch::Tensor sample_ddpm(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x_T,
                          const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.schedule, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.t);
    const double beta = 1.0 - st.ab / st.ab_next, s2 = st.s * st.s, s2_next = st.s_next * st.s_next;
    auto mean = (st.a_next * beta / s2) * e.x0 + (st.a / st.a_next * s2_next / s2) * x;
    const double var = o.variance == DdpmVariance::fixed_small ? beta * s2_next / s2 : beta;
    const bool last = st.i + 1 == int64_t(steps.size());
    x = last || var <= 0 ? mean : mean + std::sqrt(var) * step_noise(x, o, st.i);
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

// Song et al. 2021, eq. 12 and 16: sigma = eta (s' / s) sqrt(1 - alpha_bar / alpha_bar').
torch::Tensor sample_ddim(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x,
                          const SamplerOptions& o) {
  const double eta = eta_or(o, 0.0, "ddim");
  if (eta > 1.0) throw std::invalid_argument("ddim: eta must lie in [0, 1], got " + std::to_string(eta));
  return ddim_family(d, ts, x, o, [eta](const Step& st) {
    return eta * (st.s_next / st.s) * std::sqrt(std::max(0.0, 1.0 - st.ab / st.ab_next));
  });
}

// Euler ancestral (k-diffusion get_ancestral_step) moved from the VE variable x / a to x: with
// sigma_k = s_k / a_k, sigma_next / sigma = q, k-diffusion's sigma_up = min(sigma', eta sigma' sqrt(1 - q^2)) and
// sigma_down = sqrt(sigma'^2 - sigma_up^2); its Euler step to sigma_down, x/a <- x0 + sigma_down eps, then
// x/a += sigma_up z, is in x = a' (x/a): x' = a' x0 + a' sigma_down eps + a' sigma_up z, and a' sigma' = s'. So the
// fresh noise has std s' min(1, eta sqrt(1 - q^2)), finite at a = 0 (q = 0). Since
// 1 - q^2 = (1 - alpha_bar / alpha_bar') / s^2, this equals DDIM's sigma for eta <= 1.
torch::Tensor sample_euler_ancestral(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x,
                                     const SamplerOptions& o) {
  const double eta = eta_or(o, 1.0, "euler_ancestral");
  return ddim_family(d, ts, x, o, [eta](const Step& st) {
    const double q = st.q();
    return st.s_next * std::min(1.0, eta * std::sqrt(std::max(0.0, 1.0 - q * q)));
  });
}

// Euler on the probability-flow ODE d(x/a)/d sigma = eps (Song et al. 2021, eq. 14; k-diffusion sample_euler)
// is x'/a' = x/a + (sigma' - sigma) eps, i.e. x' = a' x0 + s' eps: the DDIM step, which stays finite at a = 0.
torch::Tensor sample_euler(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x,
                           const SamplerOptions& o) {
  return ddim_family(d, ts, x, o, [](const Step&) { return 0.0; });
}

// Heun's method (Karras et al. 2022, Algorithm 1) on the probability-flow ODE in the angle phi = atan2(s, a)
// (a = cos phi, s = sin phi; Salimans & Ho 2022, section 4): x_phi = cos(phi) x0 + sin(phi) eps has velocity
// dx/dphi = v, and the ODE that keeps the marginals moves with its conditional mean, dx/dphi = v^ = a eps^ - s x0^.
// phi runs over [0, pi/2], both ends included, and v^ is finite there, so unlike k-diffusion's variable
// sigma = s / a (infinite at SNR 0, where Heun's correction gets an infinite weight) every step is ordinary:
//   x~ = x + (phi' - phi) v^(x, t),   x' = x + (phi' - phi) (v^(x, t) + v^(x~, t')) / 2.
// Measured on Gaussian data (16 to 128 trailing steps, linear, cosine and zero-SNR scaled_linear schedules) it
// is second order with 2.5 to 11 times smaller errors than the trapezoid rule in sigma (only where a > 0), in
// rho = a / s, or in lambda with exponential weights. A step to s' = 0 would need the
// network at the clean level, which it does not have: that step is the DDIM step x' = a' x0 + s' eps (exact
// for a constant (x0, eps)), as k-diffusion takes an Euler step to sigma = 0.
torch::Tensor sample_heun(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x_T,
                          const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.schedule, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.t);
    if (st.s_next > 0) {
      const double dphi = std::atan2(st.s_next, st.a_next) - std::atan2(st.s, st.a);
      auto v = st.a * e.eps - st.s * e.x0;
      auto x_pred = x + dphi * v;
      Estimate e_next = d(x_pred, st.eval_next());
      x = x + (0.5 * dphi) * (v + st.a_next * e_next.eps - st.s_next * e_next.x0);
    } else {
      x = st.a_next * e.x0 + st.s_next * e.eps;
    }
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

torch::Tensor sample_dpmpp_2m(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x,
                              const SamplerOptions& o) {
  return dpmpp_2m_loop(d, ts, x, o, 0.0);
}

torch::Tensor sample_dpmpp_2m_sde(const Denoiser& d, const std::vector<int64_t>& ts, const torch::Tensor& x,
                                  const SamplerOptions& o) {
  return dpmpp_2m_loop(d, ts, x, o, eta_or(o, 1.0, "dpmpp_2m_sde"));
}

const std::vector<std::string>& sampler_names() {
  static const std::vector<std::string> names = {"ddpm",  "ddim",     "euler",       "euler_ancestral",
                                                 "heun",  "dpmpp_2m", "dpmpp_2m_sde"};
  return names;
}

std::string canonical_sampler_name(const std::string& name) {
  if (name == "euler_a") return "euler_ancestral";
  if (name == "dpmpp2m" || name == "dpm++2m" || name == "dpm++_2m") return "dpmpp_2m";
  if (name == "dpmpp2m_sde" || name == "dpm++2m_sde" || name == "dpm++_2m_sde") return "dpmpp_2m_sde";
  return name;
}

Sampler get_sampler(const std::string& name_in) {
  const std::string name = canonical_sampler_name(name_in);
  if (name == "ddpm") return sample_ddpm;
  if (name == "ddim") return sample_ddim;
  if (name == "euler") return sample_euler;
  if (name == "euler_ancestral") return sample_euler_ancestral;
  if (name == "heun") return sample_heun;
  if (name == "dpmpp_2m") return sample_dpmpp_2m;
  if (name == "dpmpp_2m_sde") return sample_dpmpp_2m_sde;
  std::ostringstream list;
  for (const auto& n : sampler_names()) list << (list.tellp() > 0 ? ", " : "") << n;
  throw std::invalid_argument("unknown sampler '" + name_in + "' (expected one of " + list.str() + ")");
}

bool is_stochastic(const std::string& name_in) {
  get_sampler(name_in);  // validates
  const std::string name = canonical_sampler_name(name_in);
  return name == "ddpm" || name == "euler_ancestral" || name == "dpmpp_2m_sde";
}

}  // namespace diffuse
