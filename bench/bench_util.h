// What the benchmarks share: "--key value" options, wall and CPU clocks, peak memory.
#pragma once

#include <sys/resource.h>

#include <chrono>
#include <functional>
#include <iostream>
#include <map>
#include <string>

#include <torch/torch.h>

namespace bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// Wall seconds of f(), waiting for a GPU's queued work.
template <class F>
double seconds(torch::Device device, F&& f) {
  auto t0 = Clock::now();
  f();
  if (device.is_cuda()) torch::cuda::synchronize();
  return seconds_since(t0);
}

/// CPU seconds (user + system) this process has used.
inline double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

inline double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) / 1024.0;
}

/// What an option does with its value.
using Setter = std::function<void(const std::string&)>;
inline Setter to(int64_t& v) { return [&v](const std::string& s) { v = std::stoll(s); }; }
inline Setter to(int& v) { return [&v](const std::string& s) { v = std::stoi(s); }; }
inline Setter to(std::string& v) { return [&v](const std::string& s) { v = s; }; }
inline Setter to(bool& v) { return [&v](const std::string& s) { v = s == "1"; }; }

/// Applies "--key value" pairs; an unknown key or one without a value is printed and gives false (exit 2).
inline bool parse_options(int argc, char** argv, const std::map<std::string, Setter>& options) {
  for (int i = 1; i < argc; i += 2) {
    const std::string key = argv[i];
    auto it = options.find(key);
    if (it == options.end()) {
      std::cerr << "unknown option " << key << "\n";
      return false;
    }
    if (i + 1 >= argc) {
      std::cerr << "option " << key << " needs a value\n";
      return false;
    }
    it->second(argv[i + 1]);
  }
  return true;
}

}  // namespace bench
