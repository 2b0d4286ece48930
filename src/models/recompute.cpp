// Gradient checkpointing (include/diffuse/models/recompute.h).
#include "diffuse/models/recompute.h"

#include <torch/torch.h>

#include "diffuse/models/blocks.h"
#include "diffuse/util/runtime.h"

namespace diffuse {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward pass needs besides the inputs: the function and the precision it ran in.
struct Recompute : torch::CustomClassHolder {
  TensorsFunction fn;
  torch::ScalarType conv_dtype = torch::ScalarType::Undefined;
  c10::optional<c10::DeviceType> autocast;
};

class RecomputeFunction : public torch::autograd::Function<RecomputeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<Recompute> r, at::TensorList inputs) {
    ctx->save_for_backward(inputs.vec());
    auto outputs = r->fn(inputs.vec());
    ctx->saved_data["recompute"] = c10::IValue::make_capsule(std::move(r));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto r = c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["recompute"].toCapsule());
    auto saved = ctx->get_saved_variables();
    std::vector<torch::Tensor> inputs;
    for (size_t i = 0; i < saved.size(); ++i) {
      const bool wanted = ctx->needs_input_grad(i) && saved[i].defined();  // edges are the tensor inputs alone
      inputs.push_back(saved[i].defined() ? saved[i].detach().requires_grad_(wanted) : saved[i]);
    }
    std::vector<torch::Tensor> outputs;
    {
      torch::AutoGradMode grad_on(true);
      ConvolutionDtype conv_dtype(r->conv_dtype);
      Bf16Autocast autocast(torch::Device(r->autocast.value_or(c10::DeviceType::CPU)), r->autocast.has_value());
      outputs = r->fn(inputs);
    }
    std::vector<torch::Tensor> with_grad, grad_of;
    for (size_t i = 0; i < outputs.size() && i < grads.size(); ++i)
      if (outputs[i].requires_grad() && grads[i].defined()) {
        with_grad.push_back(outputs[i]);
        grad_of.push_back(grads[i]);
      }
    if (!with_grad.empty()) torch::autograd::backward(with_grad, grad_of);
    variable_list result = {torch::Tensor()};
    for (const auto& x : inputs) result.push_back(x.defined() && x.requires_grad() ? x.grad() : torch::Tensor());
    return result;
  }
};

}  // namespace

std::vector<torch::Tensor> recomputed_in_backward(TensorsFunction fn, const std::vector<torch::Tensor>& inputs) {
  auto r = c10::make_intrusive<Recompute>();
  r->fn = std::move(fn);
  r->conv_dtype = ConvolutionDtype::current();
  r->autocast = Bf16Autocast::active();
  return RecomputeFunction::apply(r, at::TensorList(inputs));
}

}  // namespace diffuse
