// Progress of long work on stderr: "step 120/1000  <fields>  ETA 4m41s", one line rewritten with \r on a
// terminal, a new line every `every` steps otherwise (logs stay readable).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace diffuse {

/// "41s", "4m41s", "1h05m"; "?" for a non-finite or negative duration.
std::string format_duration(double seconds);

class Progress {
 public:
  /// Counts from `first` (a resumed run) to `total`; `label` names the unit ("step").
  Progress(bool enabled, int64_t first, int64_t total, int64_t every, std::string label = "step");
  /// Shows `done`/total, the caller's fields and the ETA, when due.
  void update(int64_t done, const std::string& fields);
  /// A message on its own line (ends a \r line first).
  void message(const std::string& text);
  /// Ends the \r line.
  void finish();

 private:
  bool enabled_, tty_;
  int64_t first_, total_, every_;
  std::string label_;
  std::chrono::steady_clock::time_point start_, last_;
  size_t width_ = 0;
};

}  // namespace diffuse
