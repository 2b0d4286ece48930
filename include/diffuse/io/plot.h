// Line plots as PNG, drawn by gnuplot (package gnuplot-nox). One figure, one or several panels.
#pragma once

#include <string>
#include <vector>

namespace diffuse {

struct Series {
  std::string name;
  std::vector<double> x, y;
};

struct Panel {
  std::string title, xlabel, ylabel;
  bool log_y = false;
  std::vector<Series> series;
};

/// Writes `panels` side by side into a PNG at `path` (atomically). Non-finite points are skipped.
/// Throws std::runtime_error naming gnuplot and the fix when it is missing or fails.
void plot_png(const std::string& path, const std::vector<Panel>& panels, int width = 0, int height = 420);

}  // namespace diffuse
