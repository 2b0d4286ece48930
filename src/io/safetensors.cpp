#include "diffuse/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>
#include <stdexcept>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "diffuse/io/files.h"

namespace diffuse {
namespace {

// The reference implementation refuses headers above 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
  uint64_t size;
};
const DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},     {"I8", torch::kInt8, 1},     {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}
const DtypeInfo& dtype_of(torch::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d;
  throw std::invalid_argument(std::string("safetensors cannot store dtype ") + c10::toString(type));
}

void require_little_endian() {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  if (first != 1) throw std::runtime_error("safetensors support needs a little-endian machine");
}

struct Entry {
  std::string name;
  const DtypeInfo* dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

[[noreturn]] void bad(const std::string& file, const std::string& problem) {
  throw std::runtime_error("'" + file + "' is not a valid safetensors file: " + problem);
}

uint64_t json_u64(const nlohmann::json& v, const std::string& file, const std::string& what) {
  if (!v.is_number_unsigned()) bad(file, what + " must be a non-negative integer, got " + v.dump());
  return v.get<uint64_t>();
}

Entry parse_entry(const std::string& name, const nlohmann::json& v, const std::string& file) {
  const std::string where = "tensor '" + name + "'";
  if (!v.is_object()) bad(file, where + ": expected an object, got " + v.dump());
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!v.contains(key)) bad(file, where + " has no '" + key + "'");
  if (!v["dtype"].is_string()) bad(file, where + ": dtype must be a string");
  Entry e{name, find_dtype(v["dtype"].get<std::string>()), {}, 0, 0};
  if (!e.dtype)
    bad(file, where + " has unsupported dtype '" + v["dtype"].get<std::string>() +
                  "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
  if (!v["shape"].is_array()) bad(file, where + ": shape must be an array");
  uint64_t bytes = e.dtype->size;
  for (const auto& d : v["shape"]) {
    uint64_t n = json_u64(d, file, where + " shape entry");
    if (n > uint64_t(INT64_MAX) || __builtin_mul_overflow(bytes, n, &bytes))
      bad(file, where + ": shape " + v["shape"].dump() + " overflows");
    e.shape.push_back(int64_t(n));
  }
  const auto& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2) bad(file, where + ": data_offsets must be [begin, end]");
  e.begin = json_u64(off[0], file, where + " data_offsets");
  e.end = json_u64(off[1], file, where + " data_offsets");
  if (e.end < e.begin) bad(file, where + ": data_offsets end < begin (" + off.dump() + ")");
  if (e.end - e.begin != bytes)
    bad(file, where + ": shape " + v["shape"].dump() + " of " + e.dtype->name + " needs " +
                  std::to_string(bytes) + " bytes but data_offsets " + off.dump() + " span " +
                  std::to_string(e.end - e.begin));
  return e;
}

// The header's JSON (`n` bytes after the length): nesting bounded, valid, an object, no name twice.
nlohmann::json header_json(const std::string& bytes, uint64_t n, const std::string& file) {
  try {
    check_json_depth(bytes.data() + 8, bytes.data() + 8 + n);
  } catch (const std::invalid_argument& e) {
    bad(file, std::string("header: ") + e.what());
  }
  std::set<std::string> seen;
  std::optional<std::string> duplicate;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + long(n),
                                   [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& v) {
                                     if (depth == 1 && ev == nlohmann::json::parse_event_t::key &&
                                         !seen.insert(v.get<std::string>()).second && !duplicate)
                                       duplicate = v.get<std::string>();
                                     return true;
                                   });
  } catch (const nlohmann::json::exception& e) {
    bad(file, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) bad(file, "header is not a JSON object");
  if (duplicate) bad(file, "header names '" + *duplicate + "' twice");
  return header;
}

// The entries, sorted by offset, must tile [0, data_size) without overlap or gap.
void check_tiling(std::vector<Entry>& entries, uint64_t data_size, const std::string& file) {
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t cursor = 0;
  const Entry* previous = nullptr;
  for (const auto& e : entries) {
    if (e.begin < cursor)
      bad(file, "tensor '" + e.name + "' [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                    ") overlaps tensor '" + previous->name + "' ending at " + std::to_string(cursor));
    if (e.begin > cursor)
      bad(file, "gap of " + std::to_string(e.begin - cursor) + " bytes before tensor '" + e.name + "'");
    if (e.end > data_size)
      bad(file, "tensor '" + e.name + "' ends at byte " + std::to_string(e.end) + " of a data section of " +
                    std::to_string(data_size) + " bytes: truncated?");
    cursor = e.end;
    previous = &e;
  }
  if (cursor != data_size)
    bad(file, "data section has " + std::to_string(data_size) + " bytes but the tensors cover " +
                  std::to_string(cursor));
}

// Parses and checks the header: every entry valid, entries tiling [0, data_size) without overlap or gap.
std::vector<Entry> parse_header(const std::string& bytes, const std::string& file,
                                std::map<std::string, std::string>* metadata, size_t* data_start) {
  require_little_endian();
  if (bytes.size() < 8) bad(file, "only " + std::to_string(bytes.size()) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > kMaxHeaderBytes) bad(file, "header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > bytes.size() - 8)
    bad(file, "header length " + std::to_string(n) + " runs past the end of the file (" +
                  std::to_string(bytes.size()) + " bytes): truncated?");
  if (n < 2 || bytes[8] != '{') bad(file, "header does not start with '{'");
  *data_start = 8 + size_t(n);
  const nlohmann::json header = header_json(bytes, n, file);
  std::vector<Entry> entries;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) bad(file, "__metadata__ must be an object of strings");
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) bad(file, "__metadata__ value of '" + k + "' is not a string");
        if (metadata) (*metadata)[k] = s.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, v, file));
  }
  check_tiling(entries, bytes.size() - *data_start, file);
  return entries;
}

}  // namespace

std::map<std::string, torch::Tensor> parse_safetensors(const std::string& bytes, const std::string& name,
                                                       std::map<std::string, std::string>* metadata) {
  size_t data_start = 0;
  auto entries = parse_header(bytes, name, metadata, &data_start);
  std::map<std::string, torch::Tensor> out;
  for (const auto& e : entries) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->type));
    const char* src = bytes.data() + data_start + e.begin;
    if (e.dtype->type == torch::kBool)
      for (uint64_t i = 0; i < e.end - e.begin; ++i)
        if (uint8_t(src[i]) > 1) bad(name, "tensor '" + e.name + "' holds a BOOL byte other than 0 or 1");
    if (e.end > e.begin) std::memcpy(t.data_ptr(), src, e.end - e.begin);
    out.emplace(e.name, t);
  }
  return out;
}

std::map<std::string, torch::Tensor> load_safetensors(const std::string& path) {
  return parse_safetensors(read_file(path), path);
}

std::map<std::string, std::string> safetensors_metadata(const std::string& path) {
  std::map<std::string, std::string> metadata;
  size_t data_start = 0;
  parse_header(read_file(path), path, &metadata, &data_start);
  return metadata;
}

std::string serialize_safetensors(const std::map<std::string, torch::Tensor>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  require_little_endian();
  struct Item {
    std::string name;
    torch::Tensor t;
    const DtypeInfo* dtype;
  };
  std::vector<Item> items;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw std::invalid_argument("'__metadata__' is reserved in safetensors");
    if (!t.defined()) throw std::invalid_argument("tensor '" + name + "' is undefined");
    items.push_back({name, t.detach().to(torch::kCPU).contiguous(), &dtype_of(t.scalar_type())});
  }
  // Largest items first keeps every tensor aligned to its item size (as the reference implementation).
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.dtype->size > b.dtype->size; });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& it : items) {
    uint64_t nbytes = uint64_t(it.t.numel()) * it.dtype->size;
    header[it.name] = {{"dtype", it.dtype->name}, {"shape", it.t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  uint64_t n = json.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  out.reserve(8 + json.size() + offset);
  out += json;
  for (const auto& it : items)
    out.append(static_cast<const char*>(it.t.data_ptr()), size_t(it.t.numel()) * it.dtype->size);
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, serialize_safetensors(tensors, metadata));
}

}  // namespace diffuse
