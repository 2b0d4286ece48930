#include <gtest/gtest.h>

#include <stdexcept>

#include "diffuse/util/runtime.h"

using namespace diffuse;

TEST(Runtime, BlasCheckNamesTheLoadedLibrary) {
  auto c = check_blas();
  EXPECT_GT(c.gflops, 0.0);
  // Debian's LibTorch links libblas.so.3; PyTorch's own builds carry MKL inside libtorch_cpu.so.
  const bool named = c.library.find("libblas.so") != std::string::npos ||
                     c.library.find("MKL built into") != std::string::npos;
  EXPECT_TRUE(named) << c.library;
  EXPECT_GE(c.load, 0.0);
}

TEST(Runtime, SlowBlasWarningTellsBusyCoresFromTheReferenceBlas) {
  BlasCheck busy{8.4, true, "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3", 5.1};
  auto w = slow_blas_warning(busy);
  EXPECT_NE(w.find("cores are busy (load average 5.1"), std::string::npos) << w;
  EXPECT_EQ(w.find("apt-get"), std::string::npos) << w;
  BlasCheck reference{5.0, true, "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", 0.2};
  w = slow_blas_warning(reference);
  EXPECT_NE(w.find("reference BLAS"), std::string::npos) << w;
  EXPECT_NE(w.find("apt-get install libopenblas0-pthread"), std::string::npos) << w;
}

// cpu_bf16_units reads /proc/cpuinfo; the CPUID instruction (the compiler's builtin) is the independent truth for
// AVX-512 BF16, which every CPU with AMX-BF16 also has.
TEST(Runtime, Bf16UnitsAgreeWithCpuid) {
  const auto units = cpu_bf16_units();
  EXPECT_TRUE(units.empty() || units == "amx_bf16" || units == "avx512_bf16") << units;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16")) EXPECT_FALSE(units.empty());
  else EXPECT_NE(units, "avx512_bf16");
}

TEST(Runtime, ParseDevice) {
  EXPECT_EQ(parse_device("cpu"), torch::Device(torch::kCPU));
  EXPECT_THROW(parse_device("tpu"), std::exception);
}
