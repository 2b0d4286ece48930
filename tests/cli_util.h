// Runs the built diffuse CLI from tests: exit status and combined stdout + stderr.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace diffuse::testing {

struct CliResult {
  int code = -1;
  std::string output;
};

/// A shell command's exit status (128 + signal when killed) and combined output.
inline CliResult run_shell(const std::string& command) {
  const std::string cmd = command + " 2>&1";
  CliResult r;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  int status = pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

inline CliResult run_cli(const std::string& args) {
  return run_shell(std::string("DIFFUSE_SKIP_BLAS_CHECK=1 ") + DIFFUSE_CLI + " " + args);
}

inline std::string fixture(const std::string& rel) { return std::string(DIFFUSE_FIXTURES) + "/" + rel; }

}  // namespace diffuse::testing
