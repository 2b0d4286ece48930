// Fuzz target: IDX files, plain or gzip (MNIST's format), read through a file as `--data DIR` does.
#include <stdexcept>

#include "diffuse/data/data.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto path = diffuse_fuzz::scratch_dir() / "input.idx";
  diffuse_fuzz::write_bytes(path, data, size);
  try {
    auto array = diffuse::read_idx(path.string());
    size_t total = 1;
    for (auto d : array.dims) total *= size_t(d);
    if (total != array.data.size()) __builtin_trap();
  } catch (const std::exception& e) {
    diffuse_fuzz::refused(e);
  }
  return 0;
}
