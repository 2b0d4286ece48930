// Prints the machine's float32 matrix-product rate: the yardstick the other benchmarks report against.
#include <iostream>
#include <string>

#include "diffuse/util/runtime.h"
#include <torch/torch.h>

int main(int argc, char** argv) {
  // The same runtime as the benchmarks that report their fraction of this rate (OpenBLAS's kernels, threads).
  const std::string runtime = diffuse::configure_cpu_runtime(argv);
  torch::Device device(argc > 1 ? argv[1] : "cpu");
  std::cout << runtime << "\n";
  for (int64_t n : {256, 512, 1024, 2048})
    std::cout << "matmul " << n << "x" << n << " float32 on " << device << ": "
              << diffuse::matmul_gflops(n, device) << " GFLOP/s\n";
}
