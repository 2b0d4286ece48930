// Multi-tensor clipping, AdamW and EMA (src/train/optimizer_step.h).
#include "train/optimizer_step.h"

#include <cmath>
#include <map>
#include <sstream>
#include <stdexcept>
#include <type_traits>

#include "util/torch_compat.h"

namespace diffuse::detail {

namespace {

// The key torch::optim keeps a parameter's state under: the TensorImpl's address (2.x) or its text (1.13).
template <class Key>
Key state_key(const torch::Tensor& p) {
  if constexpr (std::is_same_v<Key, void*>) {
    return static_cast<void*>(p.unsafeGetTensorImpl());
  } else {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  }
}

using StateKey = std::decay_t<decltype(std::declval<torch::optim::AdamW&>().state())>::key_type;

// The moments of parameters that share a step count (all of them, unless some had no gradient at times).
struct AdamGroup {
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
};

}  // namespace

torch::Tensor clip_gradients(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return params.empty() ? torch::zeros({}) : torch::zeros({}, params[0].options());
  auto norm = torch::stack(at::_foreach_norm(grads, 2)).norm(2).to(torch::kFloat32);
  if (std::isfinite(max_norm)) {
    auto scale = (max_norm / (norm + 1e-6)).clamp_max(1.0);
    compat::foreach_mul_(grads, scale);
  }
  return norm;
}

void adamw_step(torch::optim::AdamW& optimizer, double lr) {
  torch::NoGradGuard no_grad;
  auto& states = optimizer.state();
  for (auto& group : optimizer.param_groups()) {
    auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
    if (o.amsgrad()) throw std::invalid_argument("adamw_step: amsgrad is not supported");
    o.lr(lr);
    const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
    std::map<int64_t, AdamGroup> by_step;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto key = state_key<StateKey>(p);
      auto it = states.find(key);
      if (it == states.end()) {
        auto fresh = std::make_unique<torch::optim::AdamWParamState>();
        fresh->step(0);
        fresh->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        fresh->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        it = states.emplace(key, std::move(fresh)).first;
      }
      auto& state = static_cast<torch::optim::AdamWParamState&>(*it->second);
      state.step(state.step() + 1);
      auto& g = by_step[state.step()];
      g.params.push_back(p);
      g.grads.push_back(p.grad());
      g.exp_avgs.push_back(state.exp_avg());
      g.exp_avg_sqs.push_back(state.exp_avg_sq());
    }
    for (auto& [step, g] : by_step) {
      if (o.weight_decay() != 0) at::_foreach_mul_(g.params, 1.0 - lr * o.weight_decay());
      const double bias_correction1 = 1.0 - std::pow(beta1, double(step));
      const double bias_correction2 = 1.0 - std::pow(beta2, double(step));
      at::_foreach_mul_(g.exp_avgs, beta1);
      at::_foreach_add_(g.exp_avgs, g.grads, 1.0 - beta1);
      at::_foreach_mul_(g.exp_avg_sqs, beta2);
      at::_foreach_addcmul_(g.exp_avg_sqs, g.grads, g.grads, 1.0 - beta2);
      auto denom = at::_foreach_sqrt(g.exp_avg_sqs);
      at::_foreach_div_(denom, std::sqrt(bias_correction2));
      at::_foreach_add_(denom, o.eps());
      at::_foreach_addcdiv_(g.params, g.exp_avgs, denom, -lr / bias_correction1);
    }
  }
}

std::map<std::string, torch::Tensor> adamw_state_tensors(torch::optim::AdamW& optimizer, torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : model.named_parameters()) {
    auto it = optimizer.state().find(state_key<StateKey>(item.value()));
    if (it == optimizer.state().end()) continue;  // never had a gradient
    const auto& state = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    out["exp_avg." + item.key()] = state.exp_avg();
    out["exp_avg_sq." + item.key()] = state.exp_avg_sq();
    out["step." + item.key()] = torch::tensor(state.step(), torch::kInt64);
  }
  return out;
}

void load_adamw_state(torch::optim::AdamW& optimizer, torch::nn::Module& model,
                      const std::map<std::string, torch::Tensor>& tensors, const std::string& file) {
  auto bad = [&](const std::string& what) { throw std::invalid_argument("'" + file + "': " + what); };
  auto params = model.named_parameters();
  size_t used = 0;
  for (const auto& item : params) {
    const auto& p = item.value();
    auto m = tensors.find("exp_avg." + item.key()), v = tensors.find("exp_avg_sq." + item.key()),
         n = tensors.find("step." + item.key());
    const int found = (m != tensors.end()) + (v != tensors.end()) + (n != tensors.end());
    if (found == 0) continue;
    if (found != 3) bad("the AdamW state of parameter '" + item.key() + "' is incomplete (exp_avg, exp_avg_sq, step)");
    for (auto t : {m, v})
      if (t->second.sizes() != p.sizes())
        bad("tensor '" + t->first + "' has shape " + c10::str(t->second.sizes()) + ", the parameter " +
            c10::str(p.sizes()));
    if (n->second.numel() != 1 || n->second.scalar_type() != torch::kInt64) bad("tensor '" + n->first + "' is no int64 scalar");
    auto state = std::make_unique<torch::optim::AdamWParamState>();
    state->step(n->second.item<int64_t>());
    state->exp_avg(torch::empty_like(p, torch::MemoryFormat::Preserve).copy_(m->second));  // p's layout
    state->exp_avg_sq(torch::empty_like(p, torch::MemoryFormat::Preserve).copy_(v->second));
    optimizer.state()[state_key<StateKey>(p)] = std::move(state);
    used += 3;
  }
  if (used != tensors.size())
    for (const auto& [name, t] : tensors) {
      const auto dot = name.find('.');
      if (dot == std::string::npos || !params.contains(name.substr(dot + 1)))
        bad("tensor '" + name + "' belongs to no parameter of the model (another architecture?)");
    }
}

void update_ema(torch::nn::Module& ema, torch::nn::Module& model, double decay, int64_t step) {
  torch::NoGradGuard no_grad;
  const double d = std::min(decay, (1.0 + double(step)) / (10.0 + double(step)));
  auto e = ema.parameters(), m = model.parameters();
  if (e.size() != m.size()) throw std::logic_error("update_ema: the EMA model has another architecture");
  if (e.empty()) return;
  at::_foreach_mul_(e, d);
  at::_foreach_add_(e, m, 1.0 - d);
}

}  // namespace diffuse::detail
