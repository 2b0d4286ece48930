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

#include <algorithm>
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

UniPcVariant parse_unipc_variant(const std::string& name) {
  if (name == "bh1") return UniPcVariant::bh1;
  if (name == "bh2") return UniPcVariant::bh2;
  throw std::invalid_argument("unknown UniPC variant '" + name + "' (expected bh1 or bh2)");
}

std::string to_string(UniPcVariant v) { return v == UniPcVariant::bh1 ? "bh1" : "bh2"; }

namespace {

// One step: from level `cur` (where the denoiser is called) to level `next`.
struct Step {
  int64_t i = 0;
  bool last = false;
  Level cur, next;
  double a = 0, s = 1, a_next = 1, s_next = 0;
  double q() const { return a * s_next / (a_next * s); }  // exp(-h), in [0, 1)
  double h() const { double e = q(); return e > 0 ? -std::log(e) : std::numeric_limits<double>::infinity(); }
  double lambda() const { return a > 0 ? std::log(a / s) : -std::numeric_limits<double>::infinity(); }
  double t_next() const { return last ? -1.0 : next.t; }
};

// The levels of an integer timestep list (validated against the schedule), with the end the options ask for.
std::vector<Level> integer_levels(const Schedule& schedule, const std::vector<int64_t>& ts, const SamplerOptions& o,
                                  Level& end) {
  const int64_t T = schedule.T();
  std::vector<Level> levels;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t t = ts[i];
    if (t < 0 || t >= T)
      throw std::invalid_argument("sampler: timestep " + std::to_string(t) + " outside the schedule's [0, " +
                                  std::to_string(T - 1) + "]");
    if (i > 0 && t >= ts[i - 1])
      throw std::invalid_argument("sampler: timesteps must be strictly descending, got " +
                                  std::to_string(ts[i - 1]) + " then " + std::to_string(t));
    if (!(schedule.alpha_bar_at(t) < 1.0))
      throw std::invalid_argument("sampler: alpha_bar[" + std::to_string(t) + "] = 1 (no noise at that timestep)");
    if (i > 0 && !(schedule.alpha_bar_at(t) > 0.0))
      throw std::invalid_argument("sampler: a step cannot end at SNR 0 (alpha_bar = 0 at timestep " +
                                  std::to_string(t) + ")");
    levels.push_back(level_at(schedule, t));
  }
  end = o.set_alpha_to_one ? Level{-1, 1, 0} : level_at(schedule, 0);
  return levels;
}

std::string describe(const Level& l) {
  return "(t = " + std::to_string(l.t) + ", a = " + std::to_string(l.a) + ", s = " + std::to_string(l.s) + ")";
}

// Validates the walk and turns it into steps. zero_length_last: the last step may end at its own level (DDIMScheduler
// with set_alpha_to_one false walking to t = 0, whose end is alpha_bar[0]: diffusers takes that step, x' = a x0 + s
// eps, which differs from x where x0 was clamped). Only samplers whose update is defined at h = 0 allow it.
std::vector<Step> make_steps(const NoisePath& path, const Timesteps& walk, const SamplerOptions& o,
                             bool zero_length_last = false) {
  if (walk.integer.empty() && walk.levels.empty())
    throw std::invalid_argument("sampler: empty timestep list (expected 1 <= S <= T timesteps)");
  if (!walk.integer.empty() && !walk.levels.empty())
    throw std::invalid_argument("sampler: give integer timesteps or levels, not both");
  Level end = walk.end;
  const auto levels =
      walk.integer.empty() ? walk.levels : integer_levels(path.schedule("a walk of integer timesteps"), walk.integer, o, end);
  std::vector<Step> steps;
  for (size_t i = 0; i < levels.size(); ++i) {
    Step st;
    st.i = int64_t(i);
    st.last = i + 1 == levels.size();
    st.cur = levels[i];
    st.next = st.last ? end : levels[i + 1];
    st.a = st.cur.a, st.s = st.cur.s, st.a_next = st.next.a, st.s_next = st.next.s;
    const bool finite = std::isfinite(st.a) && std::isfinite(st.s) && std::isfinite(st.a_next) &&
                        std::isfinite(st.s_next) && std::isfinite(st.cur.t);
    if (!finite || !(st.a >= 0) || !(st.s > 0) || !(st.s_next >= 0))
      throw std::invalid_argument("sampler: bad level " + describe(st.cur) + " or " + describe(st.next) +
                                  " (a >= 0, s > 0 where the network is called, all finite)");
    if (!(st.a_next > 0))
      throw std::invalid_argument("sampler: a step cannot end at SNR 0, level " + describe(st.next));
    const bool zero_length = zero_length_last && st.last && st.a * st.s_next == st.a_next * st.s;
    if (!(st.a * st.s_next < st.a_next * st.s) && !zero_length)
      throw std::invalid_argument("sampler: levels must have strictly decreasing noise, got " + describe(st.cur) +
                                  " then " + describe(st.next));
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
  if (o.callback) o.callback(StepInfo{st.i, n_steps, st.cur.t, st.t_next(), st.cur, st.next, x, x0});
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
torch::Tensor ddim_family(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o,
                          NoiseStd noise_std) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.path, ts, o, /*zero_length_last=*/true);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.cur);
    const double sigma = noise_std(st);
    x = st.a_next * e.x0 + std::sqrt(std::max(0.0, st.s_next * st.s_next - sigma * sigma)) * e.eps;
    if (sigma > 0) x = x + sigma * step_noise(x, o, st.i);
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

// The multistep history: the x0 estimates at earlier levels and their lambdas, newest first. A point at
// lambda = -inf (SNR 0) is not kept: every divided difference with it has the limit 0.
struct History {
  std::vector<torch::Tensor> x0;
  std::vector<double> lambda;
  void push(const torch::Tensor& e, double l, size_t keep) {
    if (!std::isfinite(l)) return;
    x0.insert(x0.begin(), e);
    lambda.insert(lambda.begin(), l);
    if (x0.size() > keep) x0.pop_back(), lambda.pop_back();
  }
  size_t size() const { return x0.size(); }
};

// DPM-Solver++ of order 2 (midpoint) or 3, its SDE variant at eta > 0 (Lu et al. 2022, "DPM-Solver++"; diffusers'
// multistep_dpm_solver_*_order_update with dpmsolver++, k-diffusion's sample_dpmpp_2m_sde / 3m_sde). In (a, s):
//   x' = (s'/s) q^eta x + a' (1 - q^(1+eta)) D0 + a' c1 D1 - a' c2 D2 + s' sqrt(1 - q^(2 eta)) z,
// with D0 the x0 estimate; second order (midpoint): D1 = (x0 - x0_prev) / r0, c1 = (1 - q^(1+eta)) / 2;
// third order: r0 = h0 / h, r1 = h1 / h, D1_0 = (x0 - x0_1) / r0, D1_1 = (x0_1 - x0_2) / r1,
// D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1), and with g = (1 + eta) h,
// c1 = phi2 = (e^-g - 1) / g + 1, c2 = phi3 = phi2 / g - 1/2. At eta = 0 these are diffusers' updates exactly.
// That c2 is half the Taylor coefficient: D2 estimates (h^2 / 2) x0''(lambda), and the exact integral
// a' e^-h int_0^h e^u (u^2 / 2) x0'' du weighs it by 1 - 2 (e^-h - 1 + h) / h^2 = 2 c2 (= h / 3 + O(h^2)), so
// diffusers', k-diffusion's and the DPM-Solver reference's 3M leave an O(h^3) local error and are second order
// (measured on Gaussian data: order 2.0 to 2.2, three times smaller errors than 2M). dpmpp3_taylor weighs D2 by
// 2 c2, which makes the method third order (measured 3.1 to 3.7) and departs from diffusers.
// The order warms up over the first steps, drops where h is infinite (a step to s' = 0; a step from SNR 0 has
// no history), and with lower_order_final and fewer than 15 steps is 1 on the last step and <= 2 on the one before.
torch::Tensor dpmpp_loop(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o,
                         int max_order, double eta) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.path, ts, o, /*zero_length_last=*/true);
  const int64_t n = int64_t(steps.size());
  auto x = x_T;
  History hist;
  for (const auto& st : steps) {
    Estimate e = d(x, st.cur);
    if (st.a * st.s_next == st.a_next * st.s) {
      // A zero-length last step (karras to sigma_min with final_sigmas_type sigma_min): diffusers' update there is
      // the identity at every order (h = 0), and the network is still called at that level.
      notify(o, st, n, x, e.x0);
      continue;
    }
    const double q = st.q(), h = st.h(), lambda = st.lambda();
    const double q_eta = std::pow(q, eta);  // pow(0, 0) = 1: the ODE keeps x
    const double one_minus = 1.0 - q * q_eta;
    int order = std::min<int>(max_order, int(hist.size()) + 1);
    if (!std::isfinite(h)) order = 1;
    const bool few = (o.walk_steps > 0 ? o.walk_steps : n) < 15;
    if (o.lower_order_final && few && st.i == n - 1) order = 1;
    if (o.lower_order_final && few && st.i == n - 2) order = std::min(order, 2);
    auto x0 = e.x0;
    if (order == 2) x0 = e.x0 + (h / (2.0 * (lambda - hist.lambda[0]))) * (e.x0 - hist.x0[0]);  // + D1 / 2
    auto x_next = (st.s_next / st.s * q_eta) * x + (st.a_next * one_minus) * x0;
    if (order == 3) {
      const double r0 = (lambda - hist.lambda[0]) / h, r1 = (hist.lambda[0] - hist.lambda[1]) / h;
      auto d1_0 = (e.x0 - hist.x0[0]) / r0, d1_1 = (hist.x0[0] - hist.x0[1]) / r1;
      auto d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1);
      auto d2 = (d1_0 - d1_1) / (r0 + r1);
      const double g = (1.0 + eta) * h, phi2 = std::expm1(-g) / g + 1.0, phi3 = phi2 / g - 0.5;
      x_next = x_next + (st.a_next * phi2) * d1 - (o.dpmpp3_taylor ? 2.0 : 1.0) * (st.a_next * phi3) * d2;
    }
    const double noise = st.s_next * std::sqrt(std::max(0.0, 1.0 - q_eta * q_eta));
    if (noise > 0) x_next = x_next + noise * step_noise(x, o, st.i);
    x = x_next;
    hist.push(e.x0, lambda, 2);
    notify(o, st, n, x, e.x0);
  }
  return x;
}

// Solves the k x k system A z = b (k <= 3) by Gaussian elimination with partial pivoting.
std::vector<double> solve_small(std::vector<std::vector<double>> A, std::vector<double> b) {
  const size_t k = b.size();
  for (size_t c = 0; c < k; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < k; ++r)
      if (std::abs(A[r][c]) > std::abs(A[p][c])) p = r;
    std::swap(A[c], A[p]);
    std::swap(b[c], b[p]);
    for (size_t r = c + 1; r < k; ++r) {
      const double f = A[r][c] / A[c][c];
      for (size_t j = c; j < k; ++j) A[r][j] -= f * A[c][j];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> z(k);
  for (size_t c = k; c-- > 0;) {
    double v = b[c];
    for (size_t j = c + 1; j < k; ++j) v -= A[c][j] * z[j];
    z[c] = v / A[c][c];
  }
  return z;
}

// One UniPC update from level (a, s, lambda) to (a', s'), over step size h (finite or not), in diffusers'
// predict_x0 form with hh = -h:
//   x' = (s'/s) x + a' (1 - q) m0 - a' B(h) sum_k rho_k D_k,  D_k = (m_k - m0) / r_k, r_k = (lambda_k - lambda) / h,
// where rho solves R rho = b: R[i][k] = r_k^i, b_i = i! h_phi_(i+1)(hh) / B(h) (diffusers'
// multistep_uni_p_bh_update / multistep_uni_c_bh_update; the predictor uses the first p - 1 rows and columns
// and rho = 1/2 at p = 2, the corrector all p rows with the new point as r = 1 and rho = 1/2 at p = 1).
struct UniPcTerms {
  double B = 0;
  std::vector<double> b;
};
UniPcTerms unipc_terms(double h, int order, UniPcVariant variant) {
  const double hh = -h, h_phi_1 = std::expm1(hh);
  UniPcTerms t;
  t.B = variant == UniPcVariant::bh1 ? hh : h_phi_1;
  double h_phi_k = h_phi_1 / hh - 1.0, factorial = 1.0;
  for (int i = 1; i <= order; ++i) {
    t.b.push_back(h_phi_k * factorial / t.B);
    factorial *= i + 1;
    h_phi_k = h_phi_k / hh - 1.0 / factorial;
  }
  return t;
}

// sum_k rho_k D_k over the history points (and, for the corrector, the new point with r = 1 and D = m_t - m0).
torch::Tensor unipc_correction(const std::vector<double>& rks, const std::vector<torch::Tensor>& ds, int order,
                               const UniPcTerms& terms, bool corrector) {
  std::vector<double> rho;
  if (!corrector && order == 2) rho = {0.5};
  else if (corrector && order == 1) rho = {0.5};
  else {
    const size_t k = corrector ? size_t(order) : size_t(order - 1);
    std::vector<std::vector<double>> R(k, std::vector<double>(k));
    std::vector<double> all_r = rks;
    all_r.push_back(1.0);
    for (size_t i = 0; i < k; ++i)
      for (size_t j = 0; j < k; ++j) R[i][j] = std::pow(all_r[j], double(i));
    rho = solve_small(R, std::vector<double>(terms.b.begin(), terms.b.begin() + long(k)));
  }
  torch::Tensor sum;
  for (size_t k = 0; k < ds.size() && k < rho.size(); ++k) sum = sum.defined() ? sum + rho[k] * ds[k] : rho[k] * ds[k];
  return sum;
}

// The UniPC update of step p from x with the x0 estimate m0 at its start: the predictor (m_t undefined) or, with
// the estimate m_t at the step's end, the corrector. The divided differences use history points 1 .. order - 1
// (point 0 is m0's level).
torch::Tensor unipc_update(const Step& p, const torch::Tensor& x, const torch::Tensor& m0, const History& hist,
                           int order, const UniPcTerms& terms, const torch::Tensor& m_t = {}) {
  auto out = (p.s_next / p.s) * x + (p.a_next * (1.0 - p.q())) * m0;
  const bool corrector = m_t.defined();
  if (!corrector && order < 2) return out;
  std::vector<double> rks;
  std::vector<torch::Tensor> ds;
  for (int k = 1; k < order; ++k) {
    rks.push_back((hist.lambda[size_t(k)] - p.lambda()) / p.h());
    ds.push_back((hist.x0[size_t(k)] - m0) / rks.back());
  }
  if (corrector) ds.push_back(m_t - m0);
  return out - (p.a_next * terms.B) * unipc_correction(rks, ds, order, terms, corrector);
}

// diffusers' sigma-space schedulers (HeunDiscreteScheduler, LMSDiscreteScheduler) integrate dz/dsigma = eps^ in
// z = x / a, sigma = s / a (k-diffusion's frame), which is infinite at SNR 0: their step cannot start there.
void require_finite_sigma(const Step& st, const char* sampler, const char* cls) {
  if (!(st.a > 0))
    throw std::invalid_argument(std::string(sampler) + ": " + cls + " steps in sigma = s / a, which is infinite at t = " +
                                std::to_string(st.cur.t) + " (zero terminal SNR); sample this schedule with heun, "
                                "ddim, dpmpp_2m or unipc");
}

// The integral over [from, to] of the Lagrange basis polynomial prod_{k != j} (tau - nodes[k]) / (nodes[j] - nodes[k]),
// exactly (LMSDiscreteScheduler integrates it with scipy's quad, exact for these degrees up to its tolerance).
double lagrange_integral(const std::vector<double>& nodes, size_t j, double from, double to) {
  std::vector<double> poly = {1.0};  // coefficients, lowest degree first
  for (size_t k = 0; k < nodes.size(); ++k) {
    if (k == j) continue;
    const double scale = 1.0 / (nodes[j] - nodes[k]);
    std::vector<double> next(poly.size() + 1, 0.0);
    for (size_t n = 0; n < poly.size(); ++n) {
      next[n + 1] += poly[n] * scale;
      next[n] -= poly[n] * nodes[k] * scale;
    }
    poly = next;
  }
  double integral = 0, p_to = to, p_from = from;
  for (size_t n = 0; n < poly.size(); ++n, p_to *= to, p_from *= from) integral += poly[n] * (p_to - p_from) / double(n + 1);
  return integral;
}

// The level of PNDM's target timestep t: t < 0 (past t = 0) is the walk's end.
Level pndm_level(const Schedule& schedule, const Level& end, int64_t t) { return t >= 0 ? level_at(schedule, t) : end; }

// PNDMScheduler._get_prev_sample: the DDIM transfer of x from training timestep `from` to `to` (< 0: the walk's end)
// with the output `out` (eps, or v converted to eps with this x at `from`). It divides by a_from, as PNDM does.
torch::Tensor pndm_transfer(const Schedule& schedule, const Level& end, Prediction prediction, const char* sampler,
                            const torch::Tensor& x, int64_t from, int64_t to, const torch::Tensor& out) {
  const Level f = level_at(schedule, from), p = pndm_level(schedule, end, to);
  if (!(f.a > 0))
    throw std::invalid_argument(std::string(sampler) + ": PNDMScheduler's step divides by sqrt(alpha_bar_t), which is 0 "
                                "at t = " + std::to_string(from) + " (zero terminal SNR); sample this schedule with ddim, "
                                "dpmpp_2m or unipc");
  const torch::Tensor eps = prediction == Prediction::v ? f.a * out + f.s * x : out;
  return p.a * ((x - f.s * eps) / f.a) + p.s * eps;
}

// PNDM's checks (both modes) and the walk's integer timesteps.
std::vector<int64_t> pndm_timesteps(const std::vector<Step>& steps, const SamplerOptions& o, const char* sampler) {
  if (o.walk_steps != 0 && o.walk_steps != int64_t(steps.size()))
    throw std::invalid_argument(std::string(sampler) + ": a walk that starts mid-schedule (image to image) is not "
                                "implemented: PNDMScheduler's call list and counter would start mid-way; pass --sampler ddim");
  if (o.prediction != Prediction::eps && o.prediction != Prediction::v)
    throw std::invalid_argument(std::string(sampler) + ": PNDMScheduler combines eps or v outputs, not " +
                                to_string(o.prediction));
  std::vector<int64_t> ts;
  for (const auto& st : steps) {
    if (st.cur.t != std::floor(st.cur.t))
      throw std::invalid_argument(std::string(sampler) + ": needs integer timesteps (PNDMScheduler's)");
    ts.push_back(int64_t(st.cur.t));
  }
  return ts;
}

// The raw network output PNDM combines: eps, or v = a eps - s x0 (exact for the denoiser's v -> (x0, eps) conversion).
torch::Tensor pndm_raw(const Estimate& e, const Level& at, Prediction prediction) {
  return prediction == Prediction::v ? at.a * e.eps - at.s * e.x0 : e.eps;
}

// Adams-Bashforth of the last outputs (oldest first), orders 1 to 4: PNDMScheduler.step_plms's weights.
torch::Tensor adams_bashforth(const std::vector<torch::Tensor>& e) {
  switch (e.size()) {
    case 1: return e[0];
    case 2: return (3 * e[1] - e[0]) / 2;
    case 3: return (23 * e[2] - 16 * e[1] + 5 * e[0]) / 12;
    default: return (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0]) / 24;
  }
}
}  // namespace

// Posterior q(x_prev | x_t, x0) of the spaced chain (Ho et al. 2020, eqs. 6-7), beta = 1 - alpha_bar / alpha_bar_prev:
//   mu = (a' beta / s^2) x0 + (a / a') (s'^2 / s^2) x_t         (x0 form, Lin et al. 2023 section 3.4)
//   var = beta s'^2 / s^2 (fixed_small) or beta (fixed_large).
// Written with q = (a s') / (a' s), which holds on any path: mu = (a' - a s' q / s) x0 + (s' q / s) x_t and
// fixed_small var = s'^2 (1 - q^2) (on a variance-preserving path 1 - q^2 = beta / s^2); fixed_large is
// beta = 1 - (a / a')^2. a / a' divides by a', which is > 0 at every target. Ho et al.'s Algorithm 2 adds no noise
// on its last step (z = 0 at t = 1); neither does this.
torch::Tensor sample_ddpm(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T,
                          const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.path, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.cur);
    const double q = st.q(), c_x = st.s_next * q / st.s;
    auto mean = (st.a_next - st.a * c_x) * e.x0 + c_x * x;
    const double ratio = st.a / st.a_next;
    const double var = o.variance == DdpmVariance::fixed_small ? st.s_next * st.s_next * (1.0 - q * q)
                                                               : 1.0 - ratio * ratio;
    x = st.last || var <= 0 ? mean : mean + std::sqrt(var) * step_noise(x, o, st.i);
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

// Song et al. 2021, eq. 12 and 16: sigma = eta (s' / s) sqrt(1 - alpha_bar / alpha_bar'), which is
// eta s' sqrt(1 - q^2) on a variance-preserving path (1 - q^2 = (1 - alpha_bar / alpha_bar') / s^2) and is taken as
// the definition on any path.
torch::Tensor sample_ddim(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x, const SamplerOptions& o) {
  const double eta = eta_or(o, 0.0, "ddim");
  if (eta > 1.0) throw std::invalid_argument("ddim: eta must lie in [0, 1], got " + std::to_string(eta));
  return ddim_family(d, ts, x, o, [eta](const Step& st) {
    const double q = st.q();
    return eta * st.s_next * std::sqrt(std::max(0.0, 1.0 - q * q));
  });
}

// Euler ancestral (k-diffusion get_ancestral_step) moved from the VE variable x / a to x: with
// sigma_k = s_k / a_k, sigma_next / sigma = q, k-diffusion's sigma_up = min(sigma', eta sigma' sqrt(1 - q^2)) and
// sigma_down = sqrt(sigma'^2 - sigma_up^2); its Euler step to sigma_down, x/a <- x0 + sigma_down eps, then
// x/a += sigma_up z, is in x = a' (x/a): x' = a' x0 + a' sigma_down eps + a' sigma_up z, and a' sigma' = s'. So the
// fresh noise has std s' min(1, eta sqrt(1 - q^2)), finite at a = 0 (q = 0). Since
// 1 - q^2 = (1 - alpha_bar / alpha_bar') / s^2, this equals DDIM's sigma for eta <= 1.
torch::Tensor sample_euler_ancestral(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x,
                                     const SamplerOptions& o) {
  const double eta = eta_or(o, 1.0, "euler_ancestral");
  return ddim_family(d, ts, x, o, [eta](const Step& st) {
    const double q = st.q();
    return st.s_next * std::min(1.0, eta * std::sqrt(std::max(0.0, 1.0 - q * q)));
  });
}

// Euler on the probability-flow ODE d(x/a)/d sigma = eps (Song et al. 2021, eq. 14; k-diffusion sample_euler)
// is x'/a' = x/a + (sigma' - sigma) eps, i.e. x' = a' x0 + s' eps: the DDIM step, which stays finite at a = 0.
// On the rectified-flow path (a = 1 - sigma, s = sigma) it is FlowMatchEulerDiscreteScheduler's
// x' = x + (sigma' - sigma) u, u = eps - x0: x + (sigma' - sigma)(eps - x0) = (1 - sigma') x0 + sigma' eps.
torch::Tensor sample_euler(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x, const SamplerOptions& o) {
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
// On a path with a^2 + s^2 != 1 the same holds for x / r, r = sqrt(a^2 + s^2), with (a / r, s / r) on the circle.
torch::Tensor sample_heun(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.path, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    Estimate e = d(x, st.cur);
    if (st.s_next > 0) {
      const double r = std::hypot(st.a, st.s), r_next = std::hypot(st.a_next, st.s_next);
      const double dphi = std::atan2(st.s_next, st.a_next) - std::atan2(st.s, st.a);
      auto v = (st.a / r) * e.eps - (st.s / r) * e.x0;  // d(x / r)/dphi at (x, t)
      auto x_pred = (r_next / r) * x + (r_next * dphi) * v;
      Estimate e_next = d(x_pred, st.next);
      auto v_next = (st.a_next / r_next) * e_next.eps - (st.s_next / r_next) * e_next.x0;
      x = r == 1.0 && r_next == 1.0 ? x + (0.5 * dphi) * (v + v_next)
                                    : (r_next / r) * x + (0.5 * r_next * dphi) * (v + v_next);
    } else {
      x = st.a_next * e.x0 + st.s_next * e.eps;
    }
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

torch::Tensor sample_dpmpp_2m(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x, const SamplerOptions& o) {
  return dpmpp_loop(d, ts, x, o, 2, 0.0);
}

torch::Tensor sample_dpmpp_2m_sde(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x,
                                  const SamplerOptions& o) {
  return dpmpp_loop(d, ts, x, o, 2, eta_or(o, 1.0, "dpmpp_2m_sde"));
}

torch::Tensor sample_dpmpp_3m(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x, const SamplerOptions& o) {
  return dpmpp_loop(d, ts, x, o, 3, 0.0);
}

torch::Tensor sample_dpmpp_3m_sde(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x,
                                  const SamplerOptions& o) {
  return dpmpp_loop(d, ts, x, o, 3, eta_or(o, 1.0, "dpmpp_3m_sde"));
}

// UniPC (diffusers' UniPCMultistepScheduler.step): at step i the model output m_t at the new level first corrects
// the sample the previous predictor produced (UniC of the previous step's order), then the predictor UniP of
// order min(order, points available, steps left under lower_order_final) moves on. The last step is not corrected
// (no model call follows it); a zero-length last step leaves the corrected sample as it is.
torch::Tensor sample_unipc(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o) {
  if (o.order < 1 || o.order > 3) throw std::invalid_argument("unipc: order must be 1, 2 or 3, got " + std::to_string(o.order));
  torch::NoGradGuard no_grad;
  auto steps = make_steps(d.path, ts, o, /*zero_length_last=*/true);
  const int64_t n = int64_t(steps.size());
  auto x = x_T;
  History hist;           // x0 estimates at finite-lambda levels, newest first
  torch::Tensor x_prev;   // the sample the last predictor started from
  torch::Tensor m_prev;   // the x0 estimate that predictor used
  int prev_order = 0;
  for (const auto& st : steps) {
    Estimate e = d(x, st.cur);
    if (o.unipc_corrector && st.i > 0) {
      const Step& p = steps[size_t(st.i - 1)];
      const double h = p.h();
      const bool finite = std::isfinite(h);
      if (finite || o.unipc_variant == UniPcVariant::bh2) {
        const int order = finite ? prev_order : 1;  // a finite h: hist.x0[0] is m_prev, older points follow
        // At h = inf (bh2, a step from SNR 0): B = -1, b_1 = 1, rho = 1/2, q = 0.
        const UniPcTerms terms = finite ? unipc_terms(h, order, o.unipc_variant) : UniPcTerms{-1.0, {1.0}};
        x = unipc_update(p, x_prev, m_prev, hist, order, terms, e.x0);
      }
    }
    hist.push(e.x0, st.lambda(), 3);
    m_prev = e.x0;
    int order = std::min<int>(o.order, int(hist.size()));
    if (o.lower_order_final) order = std::min<int64_t>(order, n - st.i);
    // A zero-length last step (karras to sigma_min) is the identity: diffusers' order-1 predictor there gives x (its
    // order 2 too; its order 3 without lower_order_final divides 0 by 0).
    if (!std::isfinite(st.h()) || hist.size() == 0 || st.h() == 0.0) order = 1;
    x_prev = x;
    x = unipc_update(st, x, e.x0, hist, order, order >= 2 ? unipc_terms(st.h(), order, o.unipc_variant) : UniPcTerms{});
    prev_order = order;
    notify(o, st, n, x, e.x0);
  }
  return x;
}

// PNDMScheduler.step_plms as diffusers writes it. Its call list repeats the second timestep: the first call's output
// steps t0 -> t0 - r (r = T / S) and is kept; the second, at t1 on that result, is averaged with it and the step is
// taken again from t0; then each call adds its output to the last four and steps with the Adams-Bashforth weights.
torch::Tensor sample_plms(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  const Schedule& schedule = d.path.schedule("plms");
  const auto steps = make_steps(d.path, ts, o, /*zero_length_last=*/true);  // t = 0 -> alpha_bar[0]: identity
  const int64_t n = int64_t(steps.size()), T = schedule.T(), ratio = T / n;
  std::vector<int64_t> calls = pndm_timesteps(steps, o, "plms");
  if (n >= 2) calls.insert(calls.begin() + 1, calls[1]);
  const Level end = steps.back().next;
  std::vector<torch::Tensor> outputs;  // the last four kept network outputs, oldest first
  torch::Tensor x = x_T, start;
  for (size_t k = 0; k < calls.size(); ++k) {
    const Level at = level_at(schedule, calls[k]);
    const Estimate e = d(x, at);
    const torch::Tensor raw = pndm_raw(e, at, o.prediction);
    int64_t from = calls[k], to = calls[k] - ratio;
    torch::Tensor out;
    if (k == 1) {  // the repeated call: averaged with the first, the first step taken again
      from = calls[k] + ratio, to = calls[k];
      if (from >= T) throw std::invalid_argument("plms: t + T / S = " + std::to_string(from) + " is outside the schedule");
      out = (raw + outputs[0]) / 2;
      x = start;
    } else {
      outputs.push_back(raw);
      if (outputs.size() > 4) outputs.erase(outputs.begin());
      if (k == 0) start = x;
      out = adams_bashforth(outputs);
    }
    x = pndm_transfer(schedule, end, o.prediction, "plms", x, from, to, out);
    Step st;
    st.i = int64_t(k);
    st.last = k + 1 == calls.size();
    st.cur = at;
    st.next = pndm_level(schedule, end, to);
    notify(o, st, int64_t(calls.size()), x, e.x0);
  }
  return x;
}

// PNDMScheduler with its pseudo Runge-Kutta warm-up (skip_prk_steps false, diffusers' default): step_prk's 12 calls
// over the walk's first 4 timesteps t0 > t1 > t2 > t3, three RK4 steps t_i -> t_i+1 whose stages are DDIM transfers
// from t_i (to t_i - h, t_i - h, t_i - 2h with h = T / S / 2, and the call points t_i+1 + h, as diffusers lists
// them), their outputs weighed 1/6, 1/3, 1/3, 1/6; each RK step's first output joins the history, and step_plms's
// Adams-Bashforth steps of 4 outputs then run from t3 on. S - 3 + 12 network calls; the callback sees each RK step
// and each PLMS step (S in all).
torch::Tensor sample_pndm(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  const Schedule& schedule = d.path.schedule("pndm");
  const auto steps = make_steps(d.path, ts, o, /*zero_length_last=*/true);  // t = 0 -> alpha_bar[0]: identity
  const int64_t n = int64_t(steps.size()), T = schedule.T(), ratio = T / n, h = T / n / 2;
  const std::vector<int64_t> walk = pndm_timesteps(steps, o, "pndm");
  if (n < 4)
    throw std::invalid_argument("pndm: the Runge-Kutta warm-up takes the walk's first 4 timesteps; ask for 4 or more "
                                "steps, or use plms (skip_prk_steps true)");
  // diffusers' prk_timesteps: the first 4 timesteps each with t + h (ascending), the last dropped, each repeated,
  // first and last dropped, reversed: t0, t1+h, t1+h, t1, t1, t2+h, t2+h, t2, t2, t3+h, t3+h, t3.
  std::vector<int64_t> base;
  for (int i = 3; i >= 0; --i) base.push_back(walk[size_t(i)]), base.push_back(walk[size_t(i)] + h);
  base.pop_back();
  std::vector<int64_t> prk;
  for (int64_t t : base) prk.push_back(t), prk.push_back(t);
  prk = std::vector<int64_t>(prk.begin() + 1, prk.end() - 1);
  std::reverse(prk.begin(), prk.end());
  const Level end = steps.back().next;
  std::vector<torch::Tensor> outputs;  // the history step_plms combines, oldest first
  torch::Tensor x = x_T, start, weighted;
  int64_t notified = 0;
  auto report = [&](const Level& from, int64_t to, const torch::Tensor& x0) {
    Step st;
    st.i = notified++;
    st.last = st.i + 1 == n;
    st.cur = from;
    st.next = pndm_level(schedule, end, to);
    notify(o, st, n, x, x0);
  };
  for (size_t c = 0; c < prk.size(); ++c) {
    const Level at = level_at(schedule, prk[c]);
    const Estimate e = d(x, at);
    const torch::Tensor raw = pndm_raw(e, at, o.prediction);
    const int64_t from = prk[c / 4 * 4], to = prk[c] - (c % 2 ? 0 : h);
    torch::Tensor out = raw;
    if (c % 4 == 0) {
      weighted = raw / 6;
      outputs.push_back(raw);
      start = x;
    } else if (c % 4 == 3) {
      out = weighted + raw / 6;
    } else {
      weighted = weighted + raw / 3;
    }
    x = pndm_transfer(schedule, end, o.prediction, "pndm", start, from, to, out);
    if (c % 4 == 3) report(level_at(schedule, from), to, e.x0);
  }
  for (size_t k = 3; k < walk.size(); ++k) {
    const Level at = level_at(schedule, walk[k]);
    const Estimate e = d(x, at);
    outputs.push_back(pndm_raw(e, at, o.prediction));
    if (outputs.size() > 4) outputs.erase(outputs.begin());
    x = pndm_transfer(schedule, end, o.prediction, "pndm", x, walk[k], walk[k] - ratio, adams_bashforth(outputs));
    report(at, walk[k] - ratio, e.x0);
  }
  return x;
}

// diffusers' HeunDiscreteScheduler (Karras et al. 2022, Algorithm 1 with gamma 0): Heun's method on
// dz/dsigma = eps^ in z = x / a, sigma = s / a. The Euler stage z~ = z + (sigma' - sigma) eps^ is the DDIM step
// x~ = a' x0^ + s' eps^; the corrector averages the two slopes, z' = z + (sigma' - sigma) (eps^ + eps~) / 2, which in
// x is x~ + a' (sigma' - sigma) / 2 (eps~ - eps^). The step to sigma' = 0 is the Euler stage alone (2 S - 1 calls).
// Unlike heun (angle space) it cannot start at SNR 0, where sigma is infinite.
torch::Tensor sample_heun_sigma(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T,
                                const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  const auto steps = make_steps(d.path, ts, o);
  auto x = x_T;
  for (const auto& st : steps) {
    require_finite_sigma(st, "heun_sigma", "HeunDiscreteScheduler");
    const Estimate e = d(x, st.cur);
    x = st.a_next * e.x0 + st.s_next * e.eps;
    if (st.s_next > 0) {
      const Estimate e2 = d(x, st.next);
      x = x + (0.5 * (st.s_next - st.a_next * st.s / st.a)) * (e2.eps - e.eps);
    }
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

// diffusers' LMSDiscreteScheduler (k-diffusion's sample_lms): the linear multistep method of order 4 (warmed up from
// 1) on dz/dsigma = eps^, z = x / a: z' = z + sum_j c_j eps_j, c_j the integral over [sigma, sigma'] of the Lagrange
// basis polynomial of the j-th newest sigma. Since sum_j c_j = sigma' - sigma, in x this is the DDIM step plus
// a' sum_j c_j (eps_j - eps^). One call per step; it cannot start at SNR 0, where sigma is infinite.
torch::Tensor sample_lms(const Denoiser& d, const Timesteps& ts, const torch::Tensor& x_T, const SamplerOptions& o) {
  torch::NoGradGuard no_grad;
  const auto steps = make_steps(d.path, ts, o);
  const size_t order = 4;  // LMSDiscreteScheduler.step's default, which StableDiffusionPipeline keeps
  std::vector<torch::Tensor> eps;  // newest first
  std::vector<double> sigmas;      // of those, newest first
  auto x = x_T;
  for (const auto& st : steps) {
    require_finite_sigma(st, "lms", "LMSDiscreteScheduler");
    const Estimate e = d(x, st.cur);
    eps.insert(eps.begin(), e.eps);
    sigmas.insert(sigmas.begin(), st.s / st.a);
    if (eps.size() > order) eps.pop_back(), sigmas.pop_back();
    const double sigma_next = st.s_next / st.a_next;
    x = st.a_next * e.x0 + st.s_next * e.eps;
    for (size_t j = 1; j < eps.size(); ++j)
      x = x + (st.a_next * lagrange_integral(sigmas, j, sigmas[0], sigma_next)) * (eps[j] - e.eps);
    notify(o, st, int64_t(steps.size()), x, e.x0);
  }
  return x;
}

const std::vector<SamplerInfo>& sampler_table() {
  static const std::vector<SamplerInfo> table = {
      // name, aliases, function, stochastic, from SNR 0, zero-length end, help
      {"ddpm", {}, sample_ddpm, true, true, false, "ancestral sampling (DDPMScheduler), --variance fixed_small/fixed_large"},
      {"ddim", {}, sample_ddim, false, true, true, "DDIM (DDIMScheduler), --eta for its stochastic family"},
      {"euler", {}, sample_euler, false, true, true, "Euler on the probability-flow ODE (EulerDiscreteScheduler, flow matching)"},
      {"euler_ancestral", {"euler_a"}, sample_euler_ancestral, true, true, true, "Euler ancestral (EulerAncestralDiscreteScheduler)"},
      {"heun", {}, sample_heun, false, true, false, "Heun in the angle phi = atan(s / a), diffuse's own (exact at SNR 0)"},
      {"heun_sigma", {"heun_discrete"}, sample_heun_sigma, false, false, false, "Heun in sigma = s / a (HeunDiscreteScheduler)"},
      {"lms", {"lms_discrete"}, sample_lms, false, false, false, "linear multistep of order 4 in sigma (LMSDiscreteScheduler)"},
      {"dpmpp_2m", {"dpmpp2m", "dpm++2m", "dpm++_2m"}, sample_dpmpp_2m, false, true, true, "DPM-Solver++(2M) (DPMSolverMultistepScheduler)"},
      {"dpmpp_2m_sde", {"dpmpp2m_sde", "dpm++2m_sde", "dpm++_2m_sde"}, sample_dpmpp_2m_sde, true, true, true, "DPM-Solver++(2M) SDE"},
      {"dpmpp_3m", {"dpmpp3m", "dpm++3m", "dpm++_3m"}, sample_dpmpp_3m, false, true, true, "DPM-Solver++(3M), solver_order 3"},
      {"dpmpp_3m_sde", {"dpmpp3m_sde", "dpm++3m_sde", "dpm++_3m_sde"}, sample_dpmpp_3m_sde, true, true, true, "DPM-Solver++(3M) SDE"},
      {"unipc", {}, sample_unipc, false, true, true, "UniPC (UniPCMultistepScheduler), --order, --unipc-variant"},
      {"plms", {}, sample_plms, false, false, true, "PNDMScheduler's PLMS (skip_prk_steps; Stable Diffusion 1.x's default)"},
      {"pndm", {}, sample_pndm, false, false, true, "PNDMScheduler with its Runge-Kutta warm-up (skip_prk_steps false)"},
  };
  return table;
}

const std::vector<std::string>& sampler_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const auto& s : sampler_table()) v.push_back(s.name);
    return v;
  }();
  return names;
}

std::string canonical_sampler_name(const std::string& name) {
  for (const auto& s : sampler_table())
    if (std::find(s.aliases.begin(), s.aliases.end(), name) != s.aliases.end()) return s.name;
  return name;
}

namespace {
const SamplerInfo& sampler_info(const std::string& name_in) {
  const std::string name = canonical_sampler_name(name_in);
  for (const auto& s : sampler_table())
    if (s.name == name) return s;
  std::ostringstream list;
  for (const auto& n : sampler_names()) list << (list.tellp() > 0 ? ", " : "") << n;
  throw std::invalid_argument("unknown sampler '" + name_in + "' (expected one of " + list.str() + ")");
}
}  // namespace

Sampler get_sampler(const std::string& name) { return sampler_info(name).fn; }

bool is_stochastic(const std::string& name) { return sampler_info(name).stochastic; }

bool runs_from_snr_zero(const std::string& name) { return sampler_info(name).from_snr_zero; }
bool takes_zero_length_end(const std::string& name) { return sampler_info(name).zero_length_end; }

std::string sampler_help() {
  std::string out;
  for (const auto& s : sampler_table()) {
    out += (out.empty() ? "" : "; ") + s.name;
    if (!s.aliases.empty()) out += " (" + s.aliases.front() + ")";
    out += ": " + s.help;
  }
  return out;
}

}  // namespace diffuse
