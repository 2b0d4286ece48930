// The training loss log of a run folder: log.csv and its plot loss.png.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "diffuse/io/files.h"
#include "diffuse/io/plot.h"

namespace diffuse::detail {

namespace fs = std::filesystem;

// log.csv: one row per `every` steps with the mean loss and, per tenth of [0, T), the mean per-example loss
// of the examples whose timestep fell in it (no such columns for T = 0: a task without timesteps, the
// autoencoder). loss.png plots it.
class LossLog {
 public:
  static constexpr int kBins = 10;
  LossLog(const fs::path& csv, int64_t T, int64_t every) : path_(csv), T_(T), every_(std::max<int64_t>(1, every)) {}

  std::string header() const {
    std::string h = "step,loss,lr,images_per_s,grad_norm";
    for (int k = 0; k < bins(); ++k)
      h += ",loss_t" + std::to_string(k * T_ / kBins) + "-" + std::to_string((k + 1) * T_ / kBins - 1);
    return h;
  }

  // Keeps the rows up to `step` (a resumed run rewrites what came after its checkpoint).
  void open(int64_t step, bool fresh) {
    rows_.clear();
    if (!fresh && fs::exists(path_)) {
      std::ifstream in(path_);
      std::string line;
      std::getline(in, line);
      while (std::getline(in, line)) {
        std::vector<double> row;
        for (size_t begin = 0;;) {  // every cell, an empty last one too (a decile no example fell in)
          const size_t comma = line.find(',', begin);
          const std::string cell = line.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
          row.push_back(cell.empty() ? NAN : std::strtod(cell.c_str(), nullptr));
          if (comma == std::string::npos) break;
          begin = comma + 1;
        }
        if (row.size() == size_t(5 + bins()) && row[0] <= double(step)) rows_.push_back(row);
      }
    }
    std::ostringstream os;
    os << header() << "\n";
    for (const auto& r : rows_) os << format(r);
    write_file_atomic(path_.string(), os.str());
    reset();
  }

  void add(double loss, const torch::Tensor& per_example, const torch::Tensor& t, double grad_norm, int64_t images) {
    loss_sum_ += loss;
    grad_sum_ += grad_norm;
    images_ += images;
    ++steps_;
    if (bins() == 0) return;
    auto bin_of = torch::div(t.to(torch::kInt64) * kBins, T_, "floor").clamp(0, kBins - 1);
    auto per = per_example.detach().to(torch::kFloat64).cpu();
    bin_sum_ += torch::zeros({kBins}, torch::kFloat64).index_add_(0, bin_of, per);
    bin_n_ += torch::bincount(bin_of, {}, kBins).to(torch::kFloat64);
  }

  // The sums of the row being gathered: a checkpoint between two rows stores them, so that the resumed run's
  // next row averages the same steps an uninterrupted run's does (the rate column restarts: it is wall time).
  nlohmann::json window() const {
    if (!bin_sum_.defined()) return nullptr;  // not opened: a rank other than 0 keeps no log
    auto list = [](const torch::Tensor& t) {
      auto c = t.contiguous();
      return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    };
    return {{"steps", steps_}, {"loss_sum", loss_sum_}, {"grad_sum", grad_sum_}, {"bin_sum", list(bin_sum_)},
            {"bin_n", list(bin_n_)}};
  }
  void restore_window(const nlohmann::json& w) {
    if (w.is_null()) return;  // a checkpoint of an earlier version: the first row after it averages fewer steps
    steps_ = w.at("steps").get<int64_t>();
    loss_sum_ = w.at("loss_sum").get<double>();
    grad_sum_ = w.at("grad_sum").get<double>();
    bin_sum_ = torch::tensor(w.at("bin_sum").get<std::vector<double>>(), torch::kFloat64);
    bin_n_ = torch::tensor(w.at("bin_n").get<std::vector<double>>(), torch::kFloat64);
    if (bin_sum_.numel() != kBins || bin_n_.numel() != kBins)
      throw std::invalid_argument("train_state/state.json: log_window holds " + std::to_string(bin_sum_.numel()) +
                                  " deciles, expected " + std::to_string(kBins));
  }

  bool due(int64_t step) const { return step % every_ == 0; }
  int bins() const { return T_ > 0 ? kBins : 0; }

  void write(int64_t step, double lr) {
    if (steps_ == 0) return;
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - since_).count();
    std::vector<double> row = {double(step), loss_sum_ / steps_, lr, images_ / std::max(seconds, 1e-9), grad_sum_ / steps_};
    auto mean = bin_sum_ / bin_n_;  // NaN where a bin saw no example
    for (int k = 0; k < bins(); ++k) row.push_back(mean[k].item<double>());
    rows_.push_back(row);
    std::ofstream(path_, std::ios::app) << format(row);
    reset();
  }

  void plot(const fs::path& png) const {
    if (rows_.empty()) return;
    Series loss{"loss", {}, {}};
    for (const auto& r : rows_) {
      loss.x.push_back(r[0]);
      loss.y.push_back(r[1]);
    }
    if (bins() == 0) {
      plot_png(png.string(), {Panel{"training loss", "step", "loss", true, {loss}}});
      return;
    }
    // Per-timestep loss averaged over the last tenth of the rows.
    size_t from = rows_.size() - std::max<size_t>(1, rows_.size() / 10);
    Series by_t{"mean of the last " + std::to_string(rows_.size() - from) + " log rows", {}, {}};
    for (int k = 0; k < kBins; ++k) {
      double sum = 0;
      int n = 0;
      for (size_t i = from; i < rows_.size(); ++i)
        if (std::isfinite(rows_[i][5 + size_t(k)])) sum += rows_[i][5 + size_t(k)], ++n;
      by_t.x.push_back((k + 0.5) * double(T_) / kBins);
      by_t.y.push_back(n ? sum / n : NAN);
    }
    plot_png(png.string(), {Panel{"training loss", "step", "loss", true, {loss}},
                            Panel{"loss per timestep decile", "t", "loss", true, {by_t}}});
  }

 private:
  static std::string format(const std::vector<double>& r) {
    std::ostringstream os;
    os << int64_t(r[0]);
    os << std::setprecision(7);
    for (size_t i = 1; i < r.size(); ++i) {
      os << ",";
      if (std::isfinite(r[i])) os << r[i];
    }
    os << "\n";
    return os.str();
  }
  void reset() {
    loss_sum_ = grad_sum_ = 0;
    steps_ = images_ = 0;
    bin_sum_ = torch::zeros({kBins}, torch::kFloat64);
    bin_n_ = torch::zeros({kBins}, torch::kFloat64);
    since_ = std::chrono::steady_clock::now();
  }
  fs::path path_;
  int64_t T_, every_;
  std::vector<std::vector<double>> rows_;
  double loss_sum_ = 0, grad_sum_ = 0;
  int64_t steps_ = 0, images_ = 0;
  torch::Tensor bin_sum_, bin_n_;
  std::chrono::steady_clock::time_point since_;
};

}  // namespace diffuse::detail
