// A network replayed as CUDA graphs (src/sample/graphed_network.h).
#include "sample/graphed_network.h"

#include <torch/torch.h>

#include <map>
#include <memory>
#include <vector>

#include "util/cuda_graph.h"

namespace diffuse::detail {

namespace {

// The fixed tensors of one input shape and the work that reads and writes them.
struct Slot {
  torch::Tensor x, t, labels, out;
  std::unique_ptr<GraphedWork> work;
};

std::vector<int64_t> shape_key(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& labels) {
  std::vector<int64_t> key(x.sizes().begin(), x.sizes().end());
  key.push_back(int64_t(x.scalar_type()));
  key.push_back(int64_t(x.suggest_memory_format()));
  key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  key.push_back(int64_t(t.scalar_type()));
  key.push_back(labels.defined() ? labels.size(0) : -1);
  return key;
}

}  // namespace

Network graphed_network(Network net, int warmup) {
  auto slots = std::make_shared<std::map<std::vector<int64_t>, std::unique_ptr<Slot>>>();
  return [net, warmup, slots](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& labels) {
    auto& slot = (*slots)[shape_key(x, t, labels)];
    if (!slot) {
      slot = std::make_unique<Slot>();
      slot->x = x.clone();
      slot->t = t.clone();
      if (labels.defined()) slot->labels = labels.to(x.device()).clone();
      Slot* s = slot.get();
      slot->work = std::make_unique<GraphedWork>(x.device(), warmup, [s, net] { s->out = net(s->x, s->t, s->labels); });
    } else {
      slot->x.copy_(x);
      slot->t.copy_(t);
      if (labels.defined()) slot->labels.copy_(labels);
    }
    slot->work->run();
    return slot->out.clone();
  };
}

}  // namespace diffuse::detail
