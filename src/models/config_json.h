// Reading and writing the config.json of a network: typed keys with errors that name the key.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"

namespace diffuse::json_config {

[[noreturn]] inline void refuse(const std::string& key, const std::string& value, const std::string& supported) {
  throw std::invalid_argument("config key '" + key + "' = " + value + " is not supported (expected " + supported +
                              ")");
}

/// Sizes beyond these are refused before any module is built (a corrupt or hostile config.json must not allocate
/// until memory runs out): levels, channels per level, resnets per level, image side, class embeddings.
constexpr size_t kMaxLevels = 16;
constexpr int64_t kMaxChannels = 65536, kMaxLayersPerBlock = 64, kMaxSampleSize = 16384, kMaxClasses = 1 << 20;

/// The per-level lists of a UNet-style config: at least one level of positive channel counts, one down and one
/// up block type per level, each a supported one, and GroupNorm groups that divide every level's channels.
inline void check_levels(const std::vector<int64_t>& channels, const std::vector<std::string>& down,
                         const std::vector<std::string>& up, const std::set<std::string>& down_supported,
                         const std::set<std::string>& up_supported, int64_t norm_groups) {
  const size_t levels = channels.size();
  if (levels == 0) refuse("block_out_channels", "[]", "at least one level");
  if (levels > kMaxLevels) refuse("block_out_channels", std::to_string(levels) + " levels", "at most 16 levels");
  for (auto c : channels)
    if (c <= 0 || c > kMaxChannels) refuse("block_out_channels", std::to_string(c), "channel counts in [1, 65536]");
  auto check_types = [&](const char* key, const std::vector<std::string>& types, const std::set<std::string>& ok) {
    if (types.size() != levels)
      refuse(key, std::to_string(types.size()) + " entries",
             "one per block_out_channels entry (" + std::to_string(levels) + ")");
    std::string names;
    for (const auto& n : ok) names += (names.empty() ? "" : " or ") + n;
    for (const auto& t : types)
      if (!ok.count(t)) refuse(key, t, names);
  };
  check_types("down_block_types", down, down_supported);
  check_types("up_block_types", up, up_supported);
  for (auto c : channels)
    if (norm_groups <= 0 || c % norm_groups != 0)
      refuse("norm_num_groups", std::to_string(norm_groups),
             "a divisor of every block_out_channels entry (" + std::to_string(c) + ")");
}

inline void convert(const std::string& key, const nlohmann::json& v, int64_t& out) {
  // A float must be integral and within 2^53 (converting 1e300 to int64 would be undefined behaviour).
  if (v.is_number_integer() ||
      (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && std::abs(v.get<double>()) <= 9007199254740992.0))
    out = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? (refuse(key, v.dump(), "an integer below 2^63"), 0)
                                                                              : v.get<int64_t>();
  else
    refuse(key, v.dump(), "an integer");
}
inline void convert(const std::string& key, const nlohmann::json& v, double& out) {
  if (!v.is_number()) refuse(key, v.dump(), "a number");
  out = v.get<double>();
}
inline void convert(const std::string& key, const nlohmann::json& v, bool& out) {
  if (!v.is_boolean()) refuse(key, v.dump(), "true or false");
  out = v.get<bool>();
}
inline void convert(const std::string& key, const nlohmann::json& v, std::string& out) {
  if (!v.is_string()) refuse(key, v.dump(), "a string");
  out = v.get<std::string>();
}
template <class T>
void convert(const std::string& key, const nlohmann::json& v, std::vector<T>& out) {
  if (!v.is_array()) refuse(key, v.dump(), "a list");
  out.clear();
  for (const auto& e : v) {
    T item{};
    convert(key, e, item);
    out.push_back(item);
  }
}
template <class T>
void convert(const std::string& key, const nlohmann::json& v, std::optional<T>& out) {
  if (v.is_null()) {
    out.reset();
    return;
  }
  T item{};
  convert(key, v, item);
  out = item;
}

/// Reads keys of a JSON object into typed fields and remembers which keys it read.
/// How a field is written: as it is; a double as an integer when it is integral (as diffusers writes them);
/// an empty optional left out instead of written as null.
enum class Style { plain, integral, omit_empty };

/// Reads the fields of a config: each key present is converted (errors name the key); unread() keeps the
/// others. Fields are listed once per config type, by a function that calls f(key, field[, style]) for each,
/// and that list drives both Reader and Writer.
class Reader {
 public:
  explicit Reader(const nlohmann::json& j) : j_(j) {}
  template <class T>
  void operator()(const std::string& key, T& out, Style = Style::plain) {
    read_.insert(key);
    if (j_.contains(key)) convert(key, j_.at(key), out);
  }
  /// The keys not read, minus `drop`.
  nlohmann::json unread(const std::set<std::string>& drop = {}) const {
    nlohmann::json extra = nlohmann::json::object();
    for (const auto& [k, v] : j_.items())
      if (!read_.count(k) && !drop.count(k)) extra[k] = v;
    return extra;
  }

 private:
  const nlohmann::json& j_;
  std::set<std::string> read_;
};

/// Integral values are written as JSON integers (as diffusers writes them).
inline nlohmann::json number(double v) {
  if (std::floor(v) == v && std::abs(v) < 9e15) return int64_t(v);
  return v;
}
template <class T>
nlohmann::json optional(const std::optional<T>& v) {
  return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
}

/// Writes the fields of a config into a JSON object (see Reader and Style).
class Writer {
 public:
  explicit Writer(nlohmann::json& j) : j_(j) {}
  template <class T>
  void operator()(const std::string& key, const T& value, Style = Style::plain) {
    j_[key] = value;
  }
  void operator()(const std::string& key, const double& value, Style style = Style::plain) {
    j_[key] = style == Style::integral ? number(value) : nlohmann::json(value);
  }
  template <class T>
  void operator()(const std::string& key, const std::optional<T>& value, Style style = Style::plain) {
    if (value || style != Style::omit_empty) j_[key] = optional(value);
  }

 private:
  nlohmann::json& j_;
};

/// The options every block of a network shares, from config values.
inline BlockOptions block_options(int64_t temb_channels, int64_t groups, double eps, double dropout,
                                  const std::string& time_scale_shift, std::optional<int64_t> head_dim,
                                  int64_t channels) {
  BlockOptions o;
  o.temb_channels = temb_channels;
  o.groups = groups;
  o.eps = eps;
  o.dropout = dropout;
  o.time_scale_shift = parse_time_scale_shift(time_scale_shift);
  o.head_dim = head_dim.value_or(channels);
  return o;
}

}  // namespace diffuse::json_config
