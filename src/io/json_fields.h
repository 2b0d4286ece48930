// Typed fields of the JSON files diffuse reads and writes (the networks' config.json, scheduler_config.json,
// run.json): one set of conversions whose errors name the key, refusing what would not convert exactly (a
// fraction or 1e300 for an integer, a string for a number), and the Reader / Writer that one field list per
// config type drives.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse::json_config {

[[noreturn]] inline void refuse(const std::string& key, const std::string& value, const std::string& supported) {
  throw std::invalid_argument("config key '" + key + "' = " + value + " is not supported (expected " + supported +
                              ")");
}

/// An integral JSON number within [lo, hi]: an integer, or a float with no fraction within 2^53 (converting
/// 1e300 to an integer would be undefined behaviour). Anything else is refused naming the key.
inline int64_t integer_in(const std::string& key, const nlohmann::json& v, int64_t lo, int64_t hi, const char* what) {
  constexpr double kExact = 9007199254740992.0;  // 2^53
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(hi)) refuse(key, v.dump(), what);
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(std::floor(d) == d && std::abs(d) <= kExact)) refuse(key, v.dump(), what);
  } else if (!v.is_number_integer()) {
    refuse(key, v.dump(), what);
  }
  const int64_t i = v.is_number_float() ? int64_t(v.get<double>()) : v.get<int64_t>();
  if (i < lo || i > hi) refuse(key, v.dump(), what);
  return i;
}
inline void convert(const std::string& key, const nlohmann::json& v, int64_t& out) {
  out = integer_in(key, v, INT64_MIN, INT64_MAX, "an integer");
}
inline void convert(const std::string& key, const nlohmann::json& v, int& out) {
  out = int(integer_in(key, v, INT32_MIN, INT32_MAX, "an integer of 32 bits"));
}
inline void convert(const std::string& key, const nlohmann::json& v, uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<uint64_t>();
    return;
  }
  out = uint64_t(integer_in(key, v, 0, INT64_MAX, "a non-negative integer"));
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

/// How a field is written: as it is; a double as an integer when it is integral (as diffusers writes them);
/// an empty optional left out instead of written as null.
enum class Style { plain, integral, omit_empty };

/// Reads keys of a JSON object into typed fields and remembers which keys it read.
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

/// The value of `key` in `j` converted to T, or `fallback` when the key is missing or null (the way diffusers
/// reads a config: a null key takes the default).
template <class T>
T get_or(const nlohmann::json& j, const std::string& key, T fallback) {
  if (!j.is_object()) throw std::invalid_argument("expected a JSON object holding '" + key + "', got " + j.dump());
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  T out{};
  convert(key, *it, out);
  return out;
}

/// A network's config read by its field list `fields(config, f)` (f: a Reader; absent keys keep Config's defaults),
/// the keys it does not read kept in `config.extra`, but for `drop`. `what` names the config in errors.
template <class Config, class Fields>
Config read_config(const nlohmann::json& j, const std::string& what, Fields&& fields,
                   const std::set<std::string>& drop = {}) {
  if (!j.is_object()) throw std::invalid_argument(what + " must be a JSON object, got " + j.dump());
  Config c;
  Reader r(j);
  fields(c, r);
  c.extra = r.unread(drop);
  return c;
}
/// A network's config written: `base` (its kept keys and class name), then its field list.
template <class Config, class Fields>
nlohmann::json write_config(const Config& c, nlohmann::json base, Fields&& fields) {
  fields(c, Writer(base));
  return base;
}
/// `j` with each key of `defaults` that it lacks.
inline nlohmann::json with_defaults(nlohmann::json j, const nlohmann::json& defaults) {
  for (const auto& [k, v] : defaults.items())
    if (!j.contains(k)) j[k] = v;
  return j;
}

/// A value written as a JSON object by its field list `fields(value, f)` (f: a Writer).
template <class T, class Fields>
nlohmann::json write_fields(const T& value, Fields&& fields) {
  return write_config(value, nlohmann::json::object(), fields);
}
/// A T read from JSON object `j` by its field list (absent keys keep T's defaults; `name` names `j` in errors).
template <class T, class Fields>
T read_fields(const nlohmann::json& j, const std::string& name, Fields&& fields) {
  if (!j.is_object()) throw std::invalid_argument("'" + name + "' must be a JSON object, got " + j.dump());
  T value;
  fields(value, Reader(j));
  return value;
}

}  // namespace diffuse::json_config
