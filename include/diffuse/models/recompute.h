// Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a piece of a network
// whose activations are not kept for the backward pass but recomputed there, as torch.utils.checkpoint's reentrant
// variant does.
#pragma once

#include <torch/types.h>

#include <functional>
#include <vector>

namespace diffuse {

using TensorsFunction = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

/// fn(inputs), computed without keeping its intermediate activations: the backward pass runs fn again with gradients
/// on (under the convolution dtype and bf16 autocast that were active here) and back-propagates through it, so
/// parameters used by fn receive their gradients as usual. fn must be deterministic (no dropout draws) and its
/// outputs must be new tensors (not its inputs, no tensor twice). Undefined inputs are allowed.
std::vector<torch::Tensor> recomputed_in_backward(TensorsFunction fn, const std::vector<torch::Tensor>& inputs);

}  // namespace diffuse
