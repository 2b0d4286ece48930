// Whole-file reads, atomic writes and JSON files, with errors that name the file.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace diffuse {

/// Reads a whole file; throws std::runtime_error("cannot read '<path>': <reason>").
std::string read_file(const std::string& path);
/// Writes through a temporary file and a rename, so a reader never sees half a file.
void write_file_atomic(const std::string& path, const std::string& contents);
/// Parses JSON from a file with an error that names the file and the position. Reads NaN, Infinity and
/// -Infinity as Python's json module (and so diffusers) writes them.
nlohmann::json load_json(const std::string& path);
/// parse_json / dump_json: JSON text with the bare NaN, Infinity and -Infinity of Python's json module, read as
/// and written from non-finite numbers (nlohmann::json alone refuses them and writes null).
/// Both refuse (std::invalid_argument) text nested deeper than kMaxJsonDepth, before nlohmann's recursion does.
nlohmann::json parse_json(const std::string& text);
constexpr int64_t kMaxJsonDepth = 256;
/// Throws std::invalid_argument when [begin, end) nests arrays and objects deeper than kMaxJsonDepth.
void check_json_depth(const char* begin, const char* end);
std::string dump_json(const nlohmann::json& j, int indent = 2);

}  // namespace diffuse
