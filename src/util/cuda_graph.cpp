// CUDA graph capture and replay (src/util/cuda_graph.h).
#include "util/cuda_graph.h"

#include <ATen/autocast_mode.h>
#include <torch/cuda.h>

#ifdef DIFFUSE_WITH_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace diffuse::detail {

struct GraphedWork::Impl {
  torch::Device device;
  int warmup = 0, calls = 0;
  std::function<void()> body;
#ifdef DIFFUSE_WITH_CUDA_GRAPHS
  std::unique_ptr<at::cuda::CUDAGraph> graph;

  void capture() {
    torch::cuda::synchronize();
    auto side = c10::cuda::getStreamFromPool(false, device.index());
    auto graph_ = std::make_unique<at::cuda::CUDAGraph>();
    const bool cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);  // casts cached across captures would outlive their pool
    {
      c10::cuda::CUDAStreamGuard guard(side);
      graph_->capture_begin();
      try {
        body();
      } catch (...) {
        try {
          graph_->capture_end();
        } catch (...) {
        }
        at::autocast::set_autocast_cache_enabled(cache);
        throw;
      }
      graph_->capture_end();
    }
    at::autocast::set_autocast_cache_enabled(cache);
    torch::cuda::synchronize();
    graph = std::move(graph_);
  }
#endif
};

bool GraphedWork::available() {
#ifdef DIFFUSE_WITH_CUDA_GRAPHS
  return true;
#else
  return false;
#endif
}

GraphedWork::GraphedWork(torch::Device device, int warmup, std::function<void()> body)
    : impl_(std::make_unique<Impl>(Impl{device, warmup, 0, std::move(body)})) {}

GraphedWork::~GraphedWork() = default;

bool GraphedWork::captured() const {
#ifdef DIFFUSE_WITH_CUDA_GRAPHS
  return impl_->graph != nullptr;
#else
  return false;
#endif
}

void GraphedWork::run() {
  if (impl_->calls < impl_->warmup || !impl_->device.is_cuda()) {
    ++impl_->calls;
    impl_->body();
    return;
  }
#ifdef DIFFUSE_WITH_CUDA_GRAPHS
  if (!impl_->graph) impl_->capture();
  impl_->graph->replay();
#else
  impl_->body();
#endif
}

}  // namespace diffuse::detail
