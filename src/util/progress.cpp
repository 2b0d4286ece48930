#include "diffuse/util/progress.h"

#include <unistd.h>

#include <cmath>
#include <iomanip>
#include <iostream>
#include <sstream>

namespace diffuse {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  int64_t s = int64_t(seconds + 0.5);
  std::ostringstream os;
  if (s >= 3600) os << s / 3600 << "h" << std::setw(2) << std::setfill('0') << (s % 3600) / 60 << "m";
  else if (s >= 60) os << s / 60 << "m" << std::setw(2) << std::setfill('0') << s % 60 << "s";
  else os << s << "s";
  return os.str();
}

Progress::Progress(bool enabled, int64_t first, int64_t total, int64_t every, std::string label)
    : enabled_(enabled), tty_(isatty(2)), first_(first), total_(total), every_(every < 1 ? 1 : every),
      label_(std::move(label)), start_(std::chrono::steady_clock::now()), last_(start_) {}

void Progress::update(int64_t done, const std::string& fields) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  bool due = tty_ ? std::chrono::duration<double>(now - last_).count() > 0.25 || done == total_
                  : done % every_ == 0 || done == total_;
  if (!due) return;
  last_ = now;
  double elapsed = std::chrono::duration<double>(now - start_).count();
  double eta = done > first_ ? elapsed / double(done - first_) * double(total_ - done) : NAN;
  std::string line = label_ + " " + std::to_string(done) + "/" + std::to_string(total_) + "  " + fields +
                     "  ETA " + format_duration(eta);
  if (tty_) {
    std::cerr << "\r" << line << std::string(line.size() < width_ ? width_ - line.size() : 0, ' ') << std::flush;
    width_ = line.size();
  } else {
    std::cerr << line << "\n";
  }
}

void Progress::message(const std::string& text) {
  if (!enabled_) return;
  if (tty_ && width_) std::cerr << "\n";
  width_ = 0;
  std::cerr << text << "\n";
}

void Progress::finish() {
  if (enabled_ && tty_ && width_) std::cerr << "\n";
  width_ = 0;
}

}  // namespace diffuse
