// Whole-file reads, atomic writes and JSON files, with errors that name the file.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace diffuse {

/// Reads a whole file; throws std::runtime_error("cannot read '<path>': <reason>").
std::string read_file(const std::string& path);
/// Writes through a temporary file and a rename, so a reader never sees half a file.
void write_file_atomic(const std::string& path, const std::string& contents);
/// Parses JSON from a file with an error that names the file and the position.
nlohmann::json load_json(const std::string& path);

}  // namespace diffuse
