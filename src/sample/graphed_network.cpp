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
  torch::Tensor x, t, out;
  Conditioning c;
  std::unique_ptr<GraphedWork> work;
};

std::vector<int64_t> shape_key(const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) {
  std::vector<int64_t> key(x.sizes().begin(), x.sizes().end());
  key.push_back(int64_t(x.scalar_type()));
  key.push_back(int64_t(x.suggest_memory_format()));
  key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  key.push_back(int64_t(t.scalar_type()));
  for (const auto* part : {&c.labels, &c.context, &c.uncond_context}) {
    key.push_back(part->defined() ? part->dim() : -1);
    if (part->defined()) key.insert(key.end(), part->sizes().begin(), part->sizes().end());
  }
  return key;
}

}  // namespace

Network graphed_network(Network net, int warmup) {
  auto slots = std::make_shared<std::map<std::vector<int64_t>, std::unique_ptr<Slot>>>();
  return [net, warmup, slots](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) {
    auto& slot = (*slots)[shape_key(x, t, c)];
    const bool fresh = !slot;
    if (fresh) slot = std::make_unique<Slot>();
    // The fixed tensors: copies of the first call's inputs, overwritten in place by every later call's.
    auto fix = [&](torch::Tensor& into, const torch::Tensor& from) {
      if (!from.defined()) return;
      if (into.defined()) into.copy_(from);
      else into = from.to(x.device()).clone();
    };
    fix(slot->x, x);
    fix(slot->t, t);
    fix(slot->c.labels, c.labels);
    fix(slot->c.context, c.context);
    fix(slot->c.uncond_context, c.uncond_context);
    if (fresh) {
      Slot* s = slot.get();
      slot->work = std::make_unique<GraphedWork>(x.device(), warmup, [s, net] { s->out = net(s->x, s->t, s->c); });
    }
    slot->work->run();
    return slot->out.clone();
  };
}

}  // namespace diffuse::detail
