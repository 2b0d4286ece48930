// Process-level facts: which device to run on and whether the BLAS is fast enough.
#pragma once

#include <torch/types.h>

#include <string>

namespace diffuse {

/// "cpu", "cuda", "cuda:1"; throws std::invalid_argument with the fix when CUDA is asked for and absent.
/// On CUDA it also turns off TF32 convolutions (float32 stays float32; bf16 is the fast path, asked for by name)
/// and lets cuDNN time its algorithms for each shape (cudnn.benchmark).
torch::Device parse_device(const std::string& name);
/// A device ready to compute on: throws with the fix where CUDA is asked for and unusable; on a GPU sets cuDNN to
/// float32-exact (no TF32) and to time its algorithms per shape. parse_device ends with it.
torch::Device prepare_device(torch::Device device);
/// Lets a GPU's float32 convolutions and matrix products use TF32 (10-bit mantissa: PyTorch's default for cuDNN,
/// not diffuse's) for the rest of the process, or (allow false) keeps them float32 again. Throws
/// std::invalid_argument when TF32 is asked for on a CPU device (no TF32 there); allow false is a no-op there.
void allow_tf32(torch::Device device, bool allow = true);
/// "fp32", "bf16" or "fp16": the dtype a network runs in; throws with the fix for an unknown name or fp16 on the CPU,
/// naming `flag`, the option that gave it.
torch::ScalarType parse_network_dtype(const std::string& name, torch::Device device,
                                      const std::string& flag = "--dtype");
/// The dtype of "fp32", "bf16" or "fp16" (float32, bfloat16, float16 accepted too), no device check; throws naming
/// `flag`.
torch::ScalarType network_dtype(const std::string& name, const std::string& flag = "--dtype");
/// Throws naming `flag` where `device` cannot run networks in `dtype` (fp16 on the CPU, anything but the three).
void check_network_dtype(torch::ScalarType dtype, torch::Device device, const std::string& flag = "--dtype");
/// "fp32", "bf16" or "fp16".
std::string network_dtype_name(torch::ScalarType dtype);

struct BlasCheck {
  double gflops = 0;   ///< measured rate of a 1024x1024 float32 product on the CPU
  bool slow = false;   ///< below kSlowBlasGflops
  std::string library; ///< the libblas.so.3 this process loaded (from /proc/self/maps), "" if unknown
  double load = 0;     ///< 1-minute load average when measured
};
constexpr double kSlowBlasGflops = 20.0;
/// Times a 1024x1024 float32 matrix product on the CPU (best of a few, about 20 ms with OpenBLAS).
BlasCheck check_blas();
/// The warning text for a slow BLAS, with the command that fixes it.
std::string slow_blas_warning(const BlasCheck& check);

/// Settings for CPU throughput on few cores, for programs (the CLI, benchmarks) to call first thing in main():
///  - `threads` intra-op threads for ATen and oneDNN (0: every core this process may run on);
///  - OpenMP workers that sleep at barriers (OMP_WAIT_POLICY=PASSIVE) instead of spinning: spinning workers
///    take the cores from each other, from OpenBLAS's threads and from other processes, while the wake-up
///    costs nothing measurable next to a network's operators. libgomp reads the policy only when it starts,
///    so when OMP_WAIT_POLICY is unset this re-executes the program (argv as main received it) with it set;
///    DIFFUSE_NO_REEXEC=1 (or an explicit OMP_WAIT_POLICY) skips that;
///  - OpenBLAS's kernels for the CPU's instruction set: when OpenBLAS does not know the CPU's model and falls
///    back to its generic "Prescott" kernels (Debian 12's 0.3.21 on Sapphire Rapids: 30 instead of 245 GFLOP/s),
///    the same re-execution sets OPENBLAS_CORETYPE to SkylakeX (AVX-512) or Haswell (AVX2); an explicit
///    OPENBLAS_CORETYPE is kept;
///  - malloc keeps freed memory for reuse instead of unmapping it (no page faults and zeroing of every large
///    activation on every pass).
/// Returns a one-line description of the settings for logs.
std::string configure_cpu_runtime(char** argv, int threads = 0);

/// The CPU's bfloat16 matrix instructions, "amx_bf16" or "avx512_bf16" (its /proc/cpuinfo flag), or "" when it has
/// none: where computing convolutions in bf16 (--conv-dtype bf16) pays, about 1.3x on a Sapphire Rapids.
std::string cpu_bf16_units();

/// bf16 autocast of `device`'s operations for the guard's scope (when `enable`): the mixed precision of --bf16 training.
/// On a CPU it needs LibTorch 2.x (cpu_runs_bf16_networks).
class Bf16Autocast {
 public:
  Bf16Autocast(torch::Device device, bool enable);
  ~Bf16Autocast();
  Bf16Autocast(const Bf16Autocast&) = delete;
  Bf16Autocast& operator=(const Bf16Autocast&) = delete;
  /// The device type whose autocast a guard on this thread has on, or nullopt.
  static c10::optional<c10::DeviceType> active();

 private:
  c10::DeviceType type_;
  bool on_;
};

/// Whether this LibTorch runs whole networks in bf16 well on the CPU. 2.x does: its autocast (train --bf16) and bf16
/// group norm give, on a Sapphire Rapids, 1.56x float32's training rate and 2.9x its sampling rate (--dtype bf16).
/// 1.13's autocast fails in group_norm and its bf16 group norm is 10x float32's time: --conv-dtype bf16 there.
bool cpu_runs_bf16_networks();

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
