// Denoisers and guidance (include/diffuse/sample/denoiser.h).
#include "diffuse/sample/denoiser.h"

#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <sstream>
#include <stdexcept>

namespace diffuse {

Estimate Denoiser::operator()(const torch::Tensor& x_t, int64_t t) const { return (*this)(x_t, path.level(t)); }

Estimate Denoiser::operator()(const torch::Tensor& x_t, const Level& level) const {
  if (!fn) throw std::logic_error("denoiser called without a function");
  if (!std::isfinite(level.t) || !(level.a >= 0) || !(level.s > 0) || !std::isfinite(level.a) || !std::isfinite(level.s))
    throw std::invalid_argument("denoiser called at t = " + std::to_string(level.t) + ", a = " + std::to_string(level.a) +
                                ", s = " + std::to_string(level.s) + " (expected a finite t, a >= 0 and s > 0)");
  return fn(x_t, level);
}

namespace {
void check_labels(const torch::Tensor& labels, int64_t n, const char* what) {
  if (!labels.defined()) return;
  if (labels.dim() != 1 || labels.size(0) != n)
    throw std::invalid_argument(std::string(what) + ": expected one class label per image (" + std::to_string(n) +
                                "), got labels of shape " + c10::str(labels.sizes()));
  if (labels.scalar_type() != torch::kLong)
    throw std::invalid_argument(std::string(what) + ": class labels must be int64, got " +
                                std::string(c10::toString(labels.scalar_type())));
}
}  // namespace

Conditioning Conditioning::text(torch::Tensor context, torch::Tensor uncond_context) {
  Conditioning c;
  c.context = std::move(context);
  c.uncond_context = std::move(uncond_context);
  return c;
}

Conditioning Conditioning::to(torch::Device device) const {
  Conditioning c;
  auto move = [&](const torch::Tensor& t) { return t.defined() ? t.to(device) : t; };
  c.labels = move(labels);
  c.context = move(context);
  c.uncond_context = move(uncond_context);
  return c;
}

void Conditioning::check(int64_t n, const char* what) const {
  check_labels(labels, n, what);
  for (const auto* t : {&context, &uncond_context}) {
    if (!t->defined()) continue;
    if (t->dim() != 3 || t->size(0) != n)
      throw std::invalid_argument(std::string(what) + ": expected a text context [" + std::to_string(n) +
                                  ", L, D] (one per image), got " + c10::str(t->sizes()));
    if (!t->is_floating_point())
      throw std::invalid_argument(std::string(what) + ": a text context must be floating point");
  }
  if (context.defined() && uncond_context.defined() && context.sizes() != uncond_context.sizes())
    throw std::invalid_argument(std::string(what) + ": the prompt's context " + c10::str(context.sizes()) +
                                " and the negative prompt's " + c10::str(uncond_context.sizes()) + " differ in shape");
}

torch::Tensor call_network(const Network& net, const EtsdmConfig& etsdm, const torch::Tensor& x_t, double t,
                           const Conditioning& conditioning) {
  auto condition = etsdm.condition(torch::full({x_t.size(0)}, t, torch::TensorOptions(torch::kFloat32).device(x_t.device())));
  auto out = net(x_t, condition, conditioning.to(x_t.device()));
  if (!out.defined() || out.sizes() != x_t.sizes())
    throw std::runtime_error("the network returned shape " + (out.defined() ? c10::str(out.sizes()) : "none") +
                             " for input " + c10::str(x_t.sizes()) + " (expected the input's shape)");
  return out;
}

Denoiser make_denoiser(Network net, Prediction prediction, NoisePath path, EtsdmConfig etsdm,
                       Conditioning conditioning) {
  if (!net) throw std::invalid_argument("make_denoiser: no network given");
  if (conditioning.labels.defined()) check_labels(conditioning.labels, conditioning.labels.numel(), "make_denoiser");
  Denoiser d;
  d.path = std::move(path);
  d.fn = [net, prediction, etsdm, conditioning](const torch::Tensor& x, const Level& level) {
    const int64_t n = x.size(0);
    conditioning.check(n, "denoiser");
    auto a = torch::scalar_tensor(level.a, torch::kFloat64);
    auto s = torch::scalar_tensor(level.s, torch::kFloat64);
    // An eps model at SNR 0: convert() throws the std::domain_error that names the fix, before the network runs.
    if (prediction == Prediction::eps && level.a == 0.0) to_x0(prediction, x, x, a, s);
    auto out = call_network(net, etsdm, x, level.t, conditioning);
    return Estimate{to_x0(prediction, out, x, a, s), to_eps(prediction, out, x, a, s)};
  };
  return d;
}

torch::Tensor cfg_combine(const torch::Tensor& cond, const torch::Tensor& uncond, double scale, double rescale) {
  auto cfg = uncond + scale * (cond - uncond);
  if (rescale == 0.0) return cfg;
  std::vector<int64_t> dims;
  for (int64_t i = 1; i < cond.dim(); ++i) dims.push_back(i);
  auto std_cond = cond.std(dims, /*unbiased=*/true, /*keepdim=*/true);
  auto std_cfg = cfg.std(dims, /*unbiased=*/true, /*keepdim=*/true);
  // A constant guided output has no spread to rescale: leave it (factor 1) instead of dividing by 0.
  auto factor = torch::where(std_cfg > 0, std_cond / std_cfg, torch::ones_like(std_cfg));
  return cfg * (rescale * factor + (1.0 - rescale));
}

Network classifier_free_guidance(Network net, CfgOptions o) {
  if (!net) throw std::invalid_argument("classifier_free_guidance: no network given");
  if (!std::isfinite(o.scale))
    throw std::invalid_argument("classifier-free guidance scale must be finite, got " + std::to_string(o.scale));
  if (!(o.rescale >= 0.0 && o.rescale <= 1.0))
    throw std::invalid_argument("classifier-free guidance rescale (phi) must lie in [0, 1], got " +
                                std::to_string(o.rescale));
  return [net, o](const torch::Tensor& x, const torch::Tensor& t_condition, const Conditioning& c) {
    if (c.empty())
      throw std::invalid_argument("classifier-free guidance needs class labels (pass --class) or a prompt on a "
                                  "conditional model");
    if (c.labels.defined() && o.null_label < 0)
      throw std::invalid_argument("classifier-free guidance needs the null (unconditional) class label, got " +
                                  std::to_string(o.null_label) + " (by convention num_class_embeds - 1)");
    if (c.context.defined() && !c.uncond_context.defined())
      throw std::invalid_argument("classifier-free guidance on a text context needs the negative (or empty) prompt's "
                                  "context (Conditioning::uncond_context)");
    if (o.scale == 1.0) return net(x, t_condition, c);  // cfg_combine(c, u, 1, phi) == c
    const int64_t n = x.size(0);
    Conditioning both;
    if (c.labels.defined()) both.labels = torch::cat({c.labels, torch::full_like(c.labels, o.null_label)});
    if (c.context.defined()) both.context = torch::cat({c.context, c.uncond_context});
    auto out = net(torch::cat({x, x}), torch::cat({t_condition, t_condition}), both);
    return cfg_combine(out.narrow(0, 0, n), out.narrow(0, n, n), o.scale, o.rescale);
  };
}

namespace {
// The range check reads the labels back to the host (a device synchronisation): classifier_guidance() asks for
// it on its first step only, as its labels and classifier stay the same.
torch::Tensor log_prob_grad(const Classifier& classifier, const torch::Tensor& x_t, double t,
                            const torch::Tensor& labels, bool check_range) {
  const int64_t n = x_t.size(0);
  check_labels(labels, n, "classifier guidance");
  if (!labels.defined()) throw std::invalid_argument("classifier guidance needs the target class of each image");
  torch::AutoGradMode grad_on(true);
  auto x = x_t.detach().requires_grad_(true);
  const bool integer = t == std::round(t);
  auto logits = classifier(x, torch::full({n}, t, torch::TensorOptions(integer ? torch::kLong : torch::kFloat32).device(x.device())));
  if (logits.dim() != 2 || logits.size(0) != n)
    throw std::runtime_error("the classifier returned shape " + c10::str(logits.sizes()) + ", expected logits [" +
                             std::to_string(n) + ", classes]");
  auto y = labels.to(logits.device()).view({-1, 1});
  if (check_range && ((y < 0).any().item<bool>() || (y >= logits.size(1)).any().item<bool>()))
    throw std::invalid_argument("classifier guidance: a target class lies outside the classifier's " +
                                std::to_string(logits.size(1)) + " classes");
  auto log_p = torch::log_softmax(logits, 1).gather(1, y).sum();
  auto grad = torch::autograd::grad({log_p}, {x}, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true)[0];
  return grad.defined() ? grad.detach() : torch::zeros_like(x_t);
}
}  // namespace

torch::Tensor classifier_log_prob_grad(const Classifier& classifier, const torch::Tensor& x_t, double t,
                                       const torch::Tensor& labels) {
  return log_prob_grad(classifier, x_t, t, labels, /*check_range=*/true);
}

Denoiser clip_x0(Denoiser denoiser, double range, ClipEps eps) {
  if (!(range > 0)) throw std::invalid_argument("clip_x0: the range must be positive, got " + std::to_string(range));
  Denoiser d;
  d.path = denoiser.path;
  d.fn = [denoiser, range, eps](const torch::Tensor& x, const Level& level) {
    auto e = denoiser(x, level);
    auto x0 = e.x0.clamp(-range, range);
    if (eps == ClipEps::keep) return Estimate{x0, e.eps};
    return Estimate{x0, (x - level.a * x0) / level.s};  // s > 0 at every level a denoiser is called at
  };
  return d;
}

Denoiser classifier_guidance(Denoiser denoiser, Classifier classifier, torch::Tensor labels, double scale) {
  if (!classifier) throw std::invalid_argument("classifier_guidance: no classifier given");
  if (!std::isfinite(scale))
    throw std::invalid_argument("classifier guidance scale must be finite, got " + std::to_string(scale));
  Denoiser g;
  g.path = denoiser.path;
  auto checked = std::make_shared<bool>(false);  // the labels' range, once
  g.fn = [denoiser, classifier, labels, scale, checked](const torch::Tensor& x, const Level& level) {
    Estimate e = denoiser(x, level);
    const double a = level.a, s = level.s;
    if (a == 0.0 || scale == 0.0) return e;
    auto grad = log_prob_grad(classifier, x, level.t, labels, /*check_range=*/!*checked);
    *checked = true;
    return Estimate{e.x0 + (scale * s * s / a) * grad, e.eps - (scale * s) * grad};
  };
  return g;
}

}  // namespace diffuse
