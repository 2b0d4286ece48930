// A network replayed as CUDA graphs, for generate() (GenerateOptions::cuda_graphs). Not part of the public API.
#pragma once

#include "diffuse/sample/denoiser.h"

namespace diffuse::detail {

/// `net` (with whatever it wraps: classifier-free guidance, a dtype cast) run through fixed input and output
/// tensors, one set per input shape (x's sizes and dtype, t's, whether there are labels): a shape's first
/// `warmup` calls run eagerly (cuDNN picks its algorithms), the next is captured as a CUDA graph and every later
/// call replays it (util/cuda_graph.h). Each call copies its inputs in and returns a copy of the output, so
/// results never alias the next call's. On a CPU, or without CUDA graphs in the build, the same fixed tensors are
/// used and every call runs eagerly. `net` must not read its inputs back to the host.
Network graphed_network(Network net, int warmup = 2);

}  // namespace diffuse::detail
