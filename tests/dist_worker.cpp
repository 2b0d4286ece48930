// A worker program for the distributed tests: `dist_worker --nproc N MODE` launches N local ranks of
// itself (launch_local), each running MODE against the real c10d group on loopback.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "diffuse/train/distributed.h"
#include <torch/torch.h>

using namespace diffuse;

namespace {

struct Net : torch::nn::Module {
  torch::nn::Linear a{nullptr}, b{nullptr};
  Net() {
    a = register_module("a", torch::nn::Linear(8, 32));
    b = register_module("b", torch::nn::Linear(32, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return b(torch::tanh(a(x))); }
};

int run(const std::string& mode) {
  auto env = DistEnv::from_environment();
  auto dist = std::make_shared<Distributed>(env, torch::kCPU, std::chrono::milliseconds(3000));
  int64_t r = dist->rank(), w = dist->world_size();
  if (mode == "allreduce") {
    std::vector<torch::Tensor> t = {torch::full({5}, double(r + 1))};
    dist->all_reduce_sum(t);
    double want = double(w * (w + 1) / 2);
    std::vector<torch::Tensor> b = {torch::full({3}, double(r == 0 ? 7 : -1))};
    dist->broadcast(b, 0);
    bool ok = t[0].eq(want).all().item<bool>() && b[0].eq(7).all().item<bool>() && dist->all_reduce_sum(1.0) == w;
    std::cout << "rank " << r << (ok ? " ok" : " WRONG") << std::endl;
    return ok ? 0 : 1;
  }
  if (mode == "average") {
    // Different initial weights per rank: broadcast_module must make them equal.
    torch::manual_seed(100 + uint64_t(r));
    Net net;
    dist->broadcast_module(net);
    // The global batch is the same on every rank; each rank differentiates its own shard.
    torch::manual_seed(7);
    auto x = torch::randn({8 * w, 8}), y = torch::randn({8 * w, 4});
    auto params = net.parameters();
    // Reference: the full-batch gradient, computed locally.
    net.zero_grad();
    torch::mse_loss(net.forward(x), y).backward();
    std::vector<torch::Tensor> ref;
    for (auto& p : params) ref.push_back(p.grad().clone());
    // Data parallel: mean over the shard, averaged over ranks, bucketed small to get several buckets.
    GradientAverager avg(dist, params, 512);
    net.zero_grad();
    torch::mse_loss(net.forward(x.slice(0, 8 * r, 8 * (r + 1))), y.slice(0, 8 * r, 8 * (r + 1))).backward();
    avg.finish();
    double diff = 0;
    for (size_t i = 0; i < params.size(); ++i) diff = std::max(diff, (params[i].grad() - ref[i]).abs().max().item<double>());
    // A second step reuses the buckets.
    net.zero_grad();
    torch::mse_loss(net.forward(x.slice(0, 8 * r, 8 * (r + 1))), y.slice(0, 8 * r, 8 * (r + 1))).backward();
    avg.finish();
    for (size_t i = 0; i < params.size(); ++i) diff = std::max(diff, (params[i].grad() - ref[i]).abs().max().item<double>());
    std::cout << "rank " << r << " buckets " << avg.bucket_count() << " maxdiff " << diff << std::endl;
    return diff < 1e-6 ? 0 : 1;
  }
  if (mode == "die" || mode == "hang") {
    if (r == 1) {
      if (mode == "die") std::_Exit(3);
      std::this_thread::sleep_for(std::chrono::hours(1));
    }
    std::vector<torch::Tensor> t = {torch::ones({4})};
    try {
      for (int i = 0; i < 1000; ++i) dist->all_reduce_sum(t);
    } catch (const std::exception& e) {
      std::cout << "rank " << r << " error: " << e.what() << std::endl;
      return 4;
    }
    return 0;
  }
  std::cerr << "unknown mode " << mode << "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 4 && std::string(argv[1]) == "--nproc") return launch_local(std::atoi(argv[2]), {argv[3]});
    if (argc == 2) return run(argv[1]);
  } catch (const std::exception& e) {
    std::cout << "error: " << e.what() << std::endl;
    return 1;
  }
  std::cerr << "usage: dist_worker [--nproc N] allreduce|average|die|hang\n";
  return 2;
}
