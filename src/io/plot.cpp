#include "diffuse/io/plot.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "diffuse/io/files.h"

namespace diffuse {
namespace {

std::string quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

}  // namespace

void plot_png(const std::string& path, const std::vector<Panel>& panels, int width, int height) {
  if (panels.empty()) throw std::invalid_argument("plot_png: nothing to plot");
  if (width <= 0) width = 520 * int(panels.size());
  char dir_template[] = "/tmp/diffuse-plot-XXXXXX";
  if (!mkdtemp(dir_template)) throw std::runtime_error("cannot create a temporary folder for gnuplot");
  std::string dir = dir_template;
  std::string png = dir + "/out.png";

  std::ostringstream script;
  script << "set terminal pngcairo size " << width << "," << height << " font 'sans,10' noenhanced\n";
  script << "set output " << quote(png) << "\nset grid\nset key top left\n";
  script << "set multiplot layout 1," << panels.size() << "\n";
  int file_id = 0;
  for (const auto& p : panels) {
    script << "set title " << quote(p.title) << "\nset xlabel " << quote(p.xlabel) << "\nset ylabel "
           << quote(p.ylabel) << "\n";
    script << (p.log_y ? "set logscale y\n" : "unset logscale y\n");
    script << "plot ";
    for (size_t k = 0; k < p.series.size(); ++k) {
      const auto& s = p.series[k];
      std::string file = dir + "/d" + std::to_string(file_id++) + ".dat";
      std::ofstream out(file);
      out.precision(17);
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
        if (std::isfinite(s.x[i]) && std::isfinite(s.y[i]) && (!p.log_y || s.y[i] > 0))
          out << s.x[i] << ' ' << s.y[i] << '\n';
      script << (k ? ", " : "") << quote(file) << " using 1:2 with lines lw 2 title " << quote(s.name);
    }
    script << "\n";
  }
  script << "unset multiplot\n";
  std::string script_path = dir + "/plot.gp";
  std::ofstream(script_path) << script.str();

  std::string cmd = "gnuplot " + quote(script_path) + " 2>" + quote(dir + "/err.txt");
  int rc = std::system(cmd.c_str());
  if (rc != 0) {
    std::ifstream err(dir + "/err.txt");
    std::string msg((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
    throw std::runtime_error("gnuplot failed while drawing '" + path + "'" +
                             (msg.empty() ? std::string(" (is gnuplot installed? apt-get install gnuplot-nox)")
                                          : ": " + msg));
  }
  write_file_atomic(path, read_file(png));
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace diffuse
