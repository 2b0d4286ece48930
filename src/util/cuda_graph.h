// A fixed-shape piece of work replayed as one CUDA graph (at::cuda::CUDAGraph): one launch instead of the
// thousands of kernel launches of a training step's forward and backward or a sampler's network call, which
// otherwise keep the host, not the GPU, the bottleneck. Used by the trainer (src/train/train_step.cpp) and by
// generate() (src/sample/graphed_network.cpp). Not part of the public API.
#pragma once

#include <torch/types.h>

#include <functional>
#include <memory>

namespace diffuse::detail {

class GraphedWork {
 public:
  /// Whether this build can capture CUDA graphs (a LibTorch with CUDA, 2.x).
  static bool available();
  /// `body` must touch only tensors whose storage stays put between calls (its inputs are copied into fixed
  /// tensors before each call; its outputs are the tensors it returns each time), draw its random numbers
  /// from the device's default generator and launch work on the current stream. On a device other than a
  /// GPU, or in a build without CUDA graphs (available() false), every call runs `body` eagerly.
  GraphedWork(torch::Device device, int warmup, std::function<void()> body);
  ~GraphedWork();
  /// The first `warmup` calls run `body` eagerly (cuDNN picks its algorithms, autograd builds its state); the
  /// next captures it on a side stream and replays it, and every later call replays the graph.
  void run();
  bool captured() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse::detail
