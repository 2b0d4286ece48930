// Fuzz target: safetensors files (the header JSON, dtypes, shapes, offsets, the data section).
#include <stdexcept>
#include <string>

#include "diffuse/io/safetensors.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    std::map<std::string, std::string> metadata;
    auto tensors = diffuse::parse_safetensors(bytes, "fuzz.safetensors", &metadata);
    // What parses must write back, read again and write back to the same bytes.
    std::string written = diffuse::serialize_safetensors(tensors, metadata);
    std::map<std::string, std::string> metadata_again;
    auto again = diffuse::parse_safetensors(written, "written", &metadata_again);
    if (diffuse::serialize_safetensors(again, metadata_again) != written) __builtin_trap();
  } catch (const std::exception& e) {
    diffuse_fuzz::refused(e);
  }
  return 0;
}
