#include "diffuse/io/files.h"

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace diffuse {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  // A temporary name of this process's own: ranks of a data-parallel run may write the same file (a cache).
  std::string tmp = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
    out.write(contents.data(), std::streamsize(contents.size()));
    out.flush();
    if (!out) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
}

namespace {

// Non-finite numbers travel through nlohmann::json as strings with this prefix.
const std::string kNonFinite = "__diffuse_nonfinite__:";

// The bare token of a non-finite number starting at text[i] (outside a string), or null.
const char* nonfinite_token_at(const std::string& text, size_t i) {
  for (const char* token : {"NaN", "Infinity", "-Infinity"}) {
    const size_t n = std::strlen(token), end = i + n;
    if (text.compare(i, n, token) == 0 && (end == text.size() || !std::isalnum(static_cast<unsigned char>(text[end]))))
      return token;
  }
  return nullptr;
}

// Calls f(i) at each index i of text[0, n) outside JSON strings (the quotes and everything between them, escapes
// included, are skipped); f returns how many more characters it consumed.
template <class F>
void for_each_outside_strings(const char* text, size_t n, F&& f) {
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    if (in_string) {
      if (text[i] == '\\') ++i;
      else if (text[i] == '"') in_string = false;
    } else if (text[i] == '"') {
      in_string = true;
    } else {
      i += f(i);
    }
  }
}

void restore_nonfinite(nlohmann::json& j) {
  if (j.is_structured()) {
    for (auto& v : j) restore_nonfinite(v);
  } else if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    if (s.compare(0, kNonFinite.size(), kNonFinite) != 0) return;
    const std::string token = s.substr(kNonFinite.size());
    j = token == "NaN" ? std::numeric_limits<double>::quiet_NaN()
                       : (token[0] == '-' ? -1.0 : 1.0) * std::numeric_limits<double>::infinity();
  }
}

void mark_nonfinite(nlohmann::json& j) {
  if (j.is_structured()) {
    for (auto& v : j) mark_nonfinite(v);
  } else if (j.is_number_float() && !std::isfinite(j.get<double>())) {
    const double v = j.get<double>();
    j = kNonFinite + (std::isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity");
  }
}

}  // namespace

void check_json_depth(const char* begin, const char* end) {
  int64_t depth = 0;
  for_each_outside_strings(begin, size_t(end - begin), [&](size_t i) -> size_t {
    if (begin[i] == '[' || begin[i] == '{') {
      if (++depth > kMaxJsonDepth)
        throw std::invalid_argument("JSON nested deeper than " + std::to_string(kMaxJsonDepth) +
                                    " levels (no diffusers or diffuse file is; the file is corrupt or hostile)");
    } else if (begin[i] == ']' || begin[i] == '}') {
      --depth;
    }
    return 0;
  });
}

nlohmann::json parse_json(const std::string& text) {
  check_json_depth(text.data(), text.data() + text.size());
  std::string marked;
  marked.reserve(text.size());
  size_t copied = 0;  // text[0, copied) is in `marked`
  for_each_outside_strings(text.data(), text.size(), [&](size_t i) -> size_t {
    const char* token = nonfinite_token_at(text, i);
    if (!token) return 0;
    const size_t n = std::strlen(token);
    marked.append(text, copied, i - copied);
    marked += "\"" + kNonFinite + token + "\"";
    copied = i + n;
    return n - 1;
  });
  marked.append(text, copied, std::string::npos);
  auto j = nlohmann::json::parse(marked);
  restore_nonfinite(j);
  return j;
}

std::string dump_json(const nlohmann::json& j, int indent) {
  nlohmann::json marked = j;
  mark_nonfinite(marked);
  std::string text = marked.dump(indent), out;
  const std::string quoted = "\"" + kNonFinite;
  size_t from = 0;
  for (size_t at; (at = text.find(quoted, from)) != std::string::npos;) {
    const size_t end = text.find('"', at + quoted.size());
    out += text.substr(from, at - from) + text.substr(at + quoted.size(), end - at - quoted.size());
    from = end + 1;
  }
  return out + text.substr(from);
}

nlohmann::json load_json(const std::string& path) {
  std::string text = read_file(path);
  try {
    return parse_json(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error("'" + path + "' is not valid JSON: " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
}

}  // namespace diffuse
