// safetensors (https://github.com/huggingface/safetensors) read and write.
//
// Layout: 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
// then the data section; offsets are relative to its start, tensors are row-major little-endian.
#pragma once

#include <torch/types.h>

#include <map>
#include <string>

namespace diffuse {

/// Reads every tensor of a safetensors file as a CPU tensor of its stored dtype
/// (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL). The whole file is validated first: header length
/// within the file, JSON well formed, known dtypes, shape * itemsize == end - begin, offsets inside the
/// data section, tensors neither overlapping nor leaving gaps, the data section fully covered.
/// A bad file throws std::runtime_error("'<path>': <problem>"); it never reads out of bounds.
std::map<std::string, torch::Tensor> load_safetensors(const std::string& path);
/// The `__metadata__` of a safetensors file (validated like load_safetensors).
std::map<std::string, std::string> safetensors_metadata(const std::string& path);

/// Writes `tensors` (moved to the CPU, made contiguous, stored in their own dtype) atomically: a temporary
/// file renamed over `path`. The header is padded with spaces to a multiple of 8 bytes and tensors are laid
/// out by decreasing item size, then name, as the reference implementation does.
void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// In-memory forms of the two functions above; `name` is used in error messages.
std::map<std::string, torch::Tensor> parse_safetensors(const std::string& bytes, const std::string& name,
                                                       std::map<std::string, std::string>* metadata = nullptr);
std::string serialize_safetensors(const std::map<std::string, torch::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

}  // namespace diffuse
