// Process-level facts: which device to run on and whether the BLAS is fast enough.
#pragma once

#include <torch/types.h>

#include <string>

namespace diffuse {

/// "cpu", "cuda", "cuda:1"; throws std::invalid_argument with the fix when CUDA is asked for and absent.
torch::Device parse_device(const std::string& name);

struct BlasCheck {
  double gflops = 0;   ///< measured rate of a 1024x1024 float32 product on the CPU
  bool slow = false;   ///< below kSlowBlasGflops: the reference BLAS is probably selected
};
constexpr double kSlowBlasGflops = 20.0;
/// Times a 1024x1024 float32 matrix product on the CPU (best of a few, about 20 ms with OpenBLAS).
BlasCheck check_blas();
/// The warning text for a slow BLAS, with the command that fixes it.
std::string slow_blas_warning(const BlasCheck& check);

/// GFLOP/s of an n x n float32 product on `device` (best of `reps`): the machine's matrix-product rate
/// that benchmarks report their fraction of.
double matmul_gflops(int64_t n, torch::Device device, int reps = 5);

}  // namespace diffuse

namespace diffuse {

/// splitmix64 of a seed and two stream numbers: independent, reproducible seeds for (run seed, step, use).
uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b = 0);
/// A CPU generator with a given seed (draw on the CPU, then move: the same numbers on every device).
at::Generator cpu_generator(uint64_t seed);

}  // namespace diffuse
