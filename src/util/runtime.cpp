#include "diffuse/util/runtime.h"

#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>
#include <stdexcept>

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include "util/torch_compat.h"

namespace diffuse {

torch::Device parse_device(const std::string& name) {
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(name);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + name + "' (expected cpu, cuda or cuda:N)");
  }
  return prepare_device(device);
}

torch::Device prepare_device(torch::Device device) {
  if (device.is_cuda() && !torch::cuda::is_available())
    throw std::invalid_argument("device '" + device.str() +
                                "' requested but this LibTorch has no usable CUDA (build against a CUDA "
                                "LibTorch, see docs/cuda.md, or pass --device cpu)");
  // float32 means float32: no TF32 convolutions (LibTorch's default for cuDNN; matrix products are off already).
  // cuDNN times its algorithms on the first call of each shape and keeps the fastest (the shapes are fixed).
  if (device.is_cuda()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setBenchmarkCuDNN(true);
  }
  return device;
}

void allow_tf32(torch::Device device, bool allow) {
  if (!device.is_cuda()) {
    if (allow) throw std::invalid_argument("TF32 (--tf32) is a GPU's float32 mode; on " + device.str() + " leave it off");
    return;
  }
  at::globalContext().setAllowTF32CuDNN(allow);
  at::globalContext().setAllowTF32CuBLAS(allow);
}

bool cpu_runs_bf16_networks() { return compat::kCpuBf16Autocast; }

namespace {
thread_local c10::optional<c10::DeviceType> active_autocast;
}

Bf16Autocast::Bf16Autocast(torch::Device device, bool enable) : type_(device.type()), on_(enable) {
  if (!on_) return;
  compat::set_bf16_autocast(type_, true);
  active_autocast = type_;
}

c10::optional<c10::DeviceType> Bf16Autocast::active() { return active_autocast; }

Bf16Autocast::~Bf16Autocast() {
  if (!on_) return;
  active_autocast = c10::nullopt;
  compat::set_bf16_autocast(type_, false);
  at::autocast::clear_cache();
}

torch::ScalarType network_dtype(const std::string& name, const std::string& flag) {
  if (name == "fp32" || name == "float32") return torch::kFloat32;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  if (name == "fp16" || name == "float16") return torch::kFloat16;
  throw std::invalid_argument("unknown " + flag + " '" + name + "' (expected fp32, bf16 or fp16)");
}

void check_network_dtype(torch::ScalarType dtype, torch::Device device, const std::string& flag) {
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16)
    throw std::invalid_argument(flag + " " + c10::toString(dtype) + " is not a network dtype (fp32, bf16 or fp16)");
  if (dtype == torch::kFloat16 && device.is_cpu())
    throw std::invalid_argument(flag + " fp16 needs a GPU (LibTorch's CPU convolutions have no float16; use bf16 or fp32)");
}

torch::ScalarType parse_network_dtype(const std::string& name, torch::Device device, const std::string& flag) {
  const auto dtype = network_dtype(name, flag);
  check_network_dtype(dtype, device, flag);
  return dtype;
}

std::string network_dtype_name(torch::ScalarType dtype) {
  return dtype == torch::kBFloat16 ? "bf16" : dtype == torch::kFloat16 ? "fp16" : dtype == torch::kFloat32 ? "fp32"
                                                                                                          : c10::toString(dtype);
}

double matmul_gflops(int64_t n, torch::Device device, int reps) {
  torch::NoGradGuard no_grad;
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  auto a = torch::randn({n, n}, opts), b = torch::randn({n, n}, opts);
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  torch::mm(a, b);  // warm up threads and caches
  sync();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    auto c = torch::mm(a, b);
    sync();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, dt);
  }
  return 2.0 * double(n) * double(n) * double(n) / best / 1e9;
}

namespace {
// Whether the "flags" line of /proc/cpuinfo names `flag`.
bool cpu_has(const char* flag) {
  static const std::string flags = [] {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpuinfo, line))
      if (line.rfind("flags", 0) == 0) return line + " ";
    return std::string();
  }();
  return flags.find(std::string(" ") + flag + " ") != std::string::npos;
}

// OpenBLAS picks its kernels by the CPU's model number at load time. A model it does not know (0.3.21, Debian 12's,
// on Sapphire Rapids, or a VM that hides the model) gets the generic "Prescott" kernels: a 2048x2048 product ran
// at 30 GFLOP/s there against 245 with OPENBLAS_CORETYPE=SkylakeX. Returns the kernel set this CPU's instruction
// flags allow when OpenBLAS fell back to Prescott, else "" (another BLAS, or OpenBLAS chose a core itself).
std::string openblas_core_to_force() {
  using CoreName = char* (*)();
  auto corename = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (!corename || !corename()) return "";
  std::string core = corename();
  for (auto& ch : core) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  if (core != "prescott") return "";
  if (cpu_has("avx512f") && cpu_has("avx512bw") && cpu_has("avx512vl") && cpu_has("avx512dq")) return "SkylakeX";
  if (cpu_has("avx2") && cpu_has("fma")) return "Haswell";
  return "";
}
}  // namespace

std::string cpu_bf16_units() {
  for (const char* unit : {"amx_bf16", "avx512_bf16"})
    if (cpu_has(unit)) return unit;
  return "";
}

std::string configure_cpu_runtime(char** argv, int threads) {
  if (!std::getenv("DIFFUSE_NO_REEXEC") && argv && argv[0]) {
    // Both take effect only at process start: set them and run this program again (once: they are set then).
    bool again = false;
    if (!std::getenv("OMP_WAIT_POLICY")) {
      setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
      again = true;
    }
    if (!std::getenv("OPENBLAS_CORETYPE")) {
      const std::string core = openblas_core_to_force();
      if (!core.empty()) {
        setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
        again = true;
      }
    }
    if (again) execv("/proc/self/exe", argv);  // returns only on failure: go on with the settings in effect
  }
  if (threads <= 0) {
    cpu_set_t set;
    threads = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
    if (threads <= 0) threads = int(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  }
  torch::set_num_threads(threads);
#ifdef M_MMAP_MAX
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
  std::ostringstream os;
  os << torch::get_num_threads() << " threads, OMP_WAIT_POLICY="
     << (std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "(unset)");
  if (std::getenv("OPENBLAS_CORETYPE")) os << ", OPENBLAS_CORETYPE=" << std::getenv("OPENBLAS_CORETYPE");
  return os.str();
}

namespace {
// The path of the loaded libblas.so.3 (an update-alternatives choice: openblas-pthread/, blas/ for the
// reference implementation, ...).
// The BLAS library mapped into this process: Debian's LibTorch links libblas.so.3 (an alternative that points
// to OpenBLAS or the reference BLAS, named first as the one to switch); PyTorch's own builds link MKL into
// libtorch_cpu.so.
std::string loaded_blas() {
  std::ifstream maps("/proc/self/maps");
  std::string line, other, torch_cpu;
  while (std::getline(maps, line)) {
    auto pos = line.find('/');
    if (pos == std::string::npos) continue;
    const std::string path = line.substr(pos);
    if (path.find("libblas.so") != std::string::npos) return path;
    for (const char* name : {"libopenblas", "libmkl_rt", "libblis"})
      if (other.empty() && path.find(name) != std::string::npos) other = path;
    if (path.find("libtorch_cpu.so") != std::string::npos) torch_cpu = path;
  }
  if (!other.empty()) return other;
  return torch_cpu.empty() ? "" : "MKL built into " + torch_cpu;
}
}  // namespace

BlasCheck check_blas() {
  BlasCheck c;
  c.gflops = matmul_gflops(1024, torch::kCPU, 3);
  c.slow = c.gflops < kSlowBlasGflops;
  c.library = loaded_blas();
  double load[1] = {0};
  if (getloadavg(load, 1) == 1) c.load = load[0];
  return c;
}

std::string slow_blas_warning(const BlasCheck& check) {
  std::ostringstream os;
  os.precision(3);
  os << "warning: a 1024x1024 matrix product runs at " << check.gflops << " GFLOP/s";
  const bool openblas = check.library.find("openblas") != std::string::npos ||
                        check.library.find("blis") != std::string::npos || check.library.find("mkl") != std::string::npos ||
                        check.library.find("MKL") != std::string::npos;
  if (openblas) {
    os << " although an optimised BLAS is loaded (" << check.library << "): the cores are busy (load average "
       << check.load << " on " << std::thread::hardware_concurrency() << " cores), so everything will run slower";
  } else {
    os << (check.library.empty() ? "" : " with " + check.library)
       << ": the reference BLAS is probably selected and training will be ~30x slower than it should. Fix: "
          "sudo apt-get install libopenblas0-pthread (or: sudo update-alternatives --config "
          "libblas.so.3-x86_64-linux-gnu and pick openblas)";
  }
  return os.str();
}

}  // namespace diffuse

namespace diffuse {

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  // splitmix64 (Steele, Lea & Flood 2014) applied to each input in turn.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(seed) ^ a) ^ b);
}

at::Generator cpu_generator(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

}  // namespace diffuse
