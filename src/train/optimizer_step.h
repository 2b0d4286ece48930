// The optimiser's part of a training step over all parameters at once: the gradient norm and clipping, AdamW
// and the EMA update as multi-tensor operations (a handful of launches for the whole model on a GPU instead of
// several per parameter), none of which waits for the device. Not part of the public API.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace diffuse::detail {

/// The global L2 norm of the gradients of `params` (a 0-dim float32 tensor on their device; parameters without a
/// gradient count as 0). With a finite `max_norm`, scales the gradients by min(1, max_norm / (norm + 1e-6)), as
/// torch.nn.utils.clip_grad_norm_ does; an infinite one leaves them alone.
torch::Tensor clip_gradients(const std::vector<torch::Tensor>& params, double max_norm);

/// One AdamW step (Loshchilov & Hutter 2019) at learning rate `lr` with the optimizer's other options, on its
/// own state: torch::optim::AdamW's arithmetic (decoupled decay p *= 1 - lr wd, moments, bias corrections,
/// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)), so torch::save / torch::load of the optimizer and its
/// own step() carry on from it. amsgrad is refused.
void adamw_step(torch::optim::AdamW& optimizer, double lr);

/// AdamW's state as named tensors for a checkpoint: "exp_avg.NAME", "exp_avg_sq.NAME" and "step.NAME" (int64
/// scalar) for each parameter of `model` that has state. The same state always gives the same bytes (torch::save
/// keys the state by memory address, so a resumed run's file differed from an uninterrupted run's).
std::map<std::string, torch::Tensor> adamw_state_tensors(torch::optim::AdamW& optimizer, torch::nn::Module& model);
/// Sets AdamW's state from adamw_state_tensors' form (tensors moved to each parameter's device). A name that is
/// no parameter of `model`, a shape that differs or a missing part throws naming `file` and the tensor.
void load_adamw_state(torch::optim::AdamW& optimizer, torch::nn::Module& model,
                      const std::map<std::string, torch::Tensor>& tensors, const std::string& file);

/// ema <- d ema + (1 - d) model with d = min(decay, (1 + step) / (10 + step)): Polyak averaging with the warmup
/// of Tarvainen & Valpola, as diffusers' EMAModel.
void update_ema(torch::nn::Module& ema, torch::nn::Module& model, double decay, int64_t step);

}  // namespace diffuse::detail
