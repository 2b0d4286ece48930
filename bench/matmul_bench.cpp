// Prints the machine's float32 matrix-product rate: the yardstick the other benchmarks report against.
#include <iostream>

#include "diffuse/util/runtime.h"
#include <torch/torch.h>

int main(int argc, char** argv) {
  torch::Device device(argc > 1 ? argv[1] : "cpu");
  std::cout << "threads " << torch::get_num_threads() << "\n";
  for (int64_t n : {256, 512, 1024, 2048})
    std::cout << "matmul " << n << "x" << n << " float32 on " << device << ": "
              << diffuse::matmul_gflops(n, device) << " GFLOP/s\n";
}
