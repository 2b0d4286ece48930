// Shared by the fuzz targets: a private scratch folder (in /dev/shm when it exists) for the parsers that read
// files, and the rule every target follows: a parser may throw std::exception (that is its clear error), but it
// must not crash, hang, read out of bounds or allocate what the input does not justify (libFuzzer's -rss_limit_mb
// and -malloc_limit_mb catch the last).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

namespace diffuse_fuzz {

inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path();
    auto d = base / ("diffuse-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    std::atexit([] { std::error_code ec; std::filesystem::remove_all(scratch_dir(), ec); });
    return d;
  }();
  return dir;
}

inline void write_bytes(const std::filesystem::path& path, const uint8_t* data, size_t size) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), std::streamsize(size));
}

/// A parser's clear error: expected, ignored; printed when DIFFUSE_FUZZ_VERBOSE is set (to see what a seed hits).
inline void refused(const std::exception& e) {
  static const bool verbose = std::getenv("DIFFUSE_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "refused: %s\n", e.what());
}

}  // namespace diffuse_fuzz
