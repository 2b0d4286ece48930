// What the feature network's translation units share (src/eval/feature_net.cpp defines them). Not part of the public API.
#pragma once

#include <torch/torch.h>

#include "diffuse/eval/features.h"

namespace diffuse::detail {

/// Throws, naming the expected shape, unless `images` are [N, in_channels, sample_size, sample_size] for `c`.
void check_images(const FeatureNetConfig& c, const torch::Tensor& images);
/// The device of the module's first parameter.
torch::Device device_of(torch::nn::Module& m);

}  // namespace diffuse::detail
