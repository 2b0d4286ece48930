// diffuse schedule: terminal SNR, sampler timesteps, Lin et al. Tables 1 and 2, CSV and plots,
// and an audit of a diffusers scheduler_config.json against the flaws of the 003 document.
#include <limits>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "diffuse/io/files.h"
#include "diffuse/io/plot.h"
#include "diffuse/core/levels.h"
#include "diffuse/core/schedule.h"
#include "diffuse/core/scheduler_config.h"
#include <torch/torch.h>

namespace diffuse::cli {
namespace {

struct ScheduleOptions {
  std::vector<std::string> names = {"linear"};
  bool zero_snr = false;
  int64_t T = 1000;
  double beta_start = -1, beta_end = -1;
  int64_t steps = 0;
  std::string spacing = "trailing";
  int64_t steps_offset = 0;
  bool table = false;
  std::string csv, plot, audit;
};

std::string label(const std::string& name, bool zero_snr) { return zero_snr ? name + "+zero-snr" : name; }

std::string sci(double v, int digits = 6) {
  std::ostringstream os;
  os << std::scientific << std::setprecision(digits) << v;
  return os.str();
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : " ") + std::to_string(x);
  return s;
}

void print_summary(const std::string& name, const Schedule& s) {
  int64_t T = s.T();
  std::cout << std::left << std::setw(24) << name << " T=" << T << "  SNR(T)=" << sci(s.snr_at(T - 1))
            << "  sqrt(alpha_bar_T)=" << sci(s.a_at(T - 1)) << "  SNR(0)=" << sci(s.snr_at(0))
            << (s.zero_terminal_snr() ? "  [zero terminal SNR]" : "") << "\n";
}

// Lin et al. 2023, Table 1 (terminal values, T = 1000) and Table 2 (timesteps for S = 10).
void print_tables() {
  std::cout << "Table 1 (Lin et al. 2023): terminal SNR of common schedules, T = 1000\n";
  std::cout << "  schedule          SNR(T)          sqrt(alpha_bar_T)   paper\n";
  struct Row {
    const char* name;
    Schedule s;
    const char* paper;
  };
  std::vector<Row> rows = {{"linear", linear(), "4.035993e-05  0.006353"},
                           {"cosine", cosine(), "2.428735e-09  4.9282e-05"},
                           {"stable diffusion", scaled_linear(), "4.68e-03      0.068265"}};
  for (auto& r : rows)
    std::cout << "  " << std::left << std::setw(17) << r.name << " " << std::setw(15) << sci(r.s.snr_at(999))
              << " " << std::setw(19) << sci(r.s.a_at(999)) << " " << r.paper << "\n";
  std::cout << "  after rescaling (Algorithm 1; cosine without its clip):\n";
  std::vector<std::pair<const char*, Schedule>> fixed = {{"linear", rescale_zero_terminal_snr(linear())},
                                                         {"cosine", cosine(1000, 0.0)},
                                                         {"stable diffusion", rescale_zero_terminal_snr(scaled_linear())}};
  for (auto& [n, s] : fixed)
    std::cout << "  " << std::left << std::setw(17) << n << " " << std::setw(15) << sci(s.snr_at(999)) << " "
              << std::setw(19) << sci(s.a_at(999)) << " SNR(0) kept: " << sci(s.snr_at(0), 4) << "\n";

  std::cout << "\nTable 2 (Lin et al. 2023): sample steps for T = 1000, S = 10 (0-indexed, as diffusers; "
               "the paper adds 1)\n";
  for (auto sp : {Spacing::leading, Spacing::linspace, Spacing::trailing}) {
    auto ts = spaced_timesteps(1000, 10, sp);
    std::reverse(ts.begin(), ts.end());
    std::cout << "  " << std::left << std::setw(9) << to_string(sp) << " " << join(ts) << "\n";
  }
}

void write_csv(const std::string& path, const std::vector<std::pair<std::string, Schedule>>& schedules) {
  std::ostringstream os;
  os << "schedule,t,beta,alpha_bar,a,s,snr,log_snr,v_over_eps\n";
  os << std::setprecision(17);
  for (auto& [name, s] : schedules) {
    auto betas = s.betas();
    auto snr = s.snr();
    for (int64_t t = 0; t < s.T(); ++t) {
      double q = snr[t].item<double>();
      os << name << "," << t << "," << betas[t].item<double>() << "," << s.alpha_bar_at(t) << "," << s.a_at(t)
         << "," << s.s_at(t) << "," << q << "," << std::log(q) << "," << (q + 1) / q << "\n";
    }
  }
  write_file_atomic(path, os.str());
  std::cout << "wrote " << path << "\n";
}

void write_plot(const std::string& path, const std::vector<std::pair<std::string, Schedule>>& schedules) {
  Panel log_snr{"log-SNR(t)", "t", "log SNR", false, {}};
  Panel a{"sqrt(alpha_bar_t)", "t", "signal scale a_t", false, {}};
  Panel ratio{"(SNR+1)/SNR = L_v / L_eps", "t", "(SNR+1)/SNR", true, {}};
  for (auto& [name, s] : schedules) {
    std::vector<double> t(s.T());
    for (int64_t i = 0; i < s.T(); ++i) t[i] = double(i);
    auto vec = [](const torch::Tensor& x) {
      auto c = x.contiguous();
      return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    };
    auto snr = s.snr();
    log_snr.series.push_back({name, t, vec(s.log_snr())});
    a.series.push_back({name, t, vec(s.a())});
    ratio.series.push_back({name, t, vec((snr + 1) / snr)});
  }
  plot_png(path, {log_snr, a, ratio});
  std::cout << "wrote " << path << "\n";
}

// The 003 document's flaws, each with the option that fixes it. Returns the number found.
int audit(const std::string& path) {
  auto config = SchedulerConfig::load(path);
  auto ignored = config.ignored_keys();
  if (!ignored.empty()) {
    std::string list;
    for (auto& k : ignored) list += (list.empty() ? "" : ", ") + k;
    std::cout << "note: keys diffuse does not use (kept on save): " << list << "\n";
  }
  auto s = config.schedule();
  int64_t T = s.T();
  std::cout << "audit of " << path << ": " << config.beta_schedule << ", T = " << T << ", "
            << diffusers_name(config.prediction_type) << ", " << to_string(config.timestep_spacing)
            << " spacing, steps_offset " << config.steps_offset << "\n";
  int flaws = 0;
  if (!s.zero_terminal_snr()) {
    ++flaws;
    std::cout << "FLAW non-zero terminal SNR: SNR(T) = " << sci(s.snr_at(T - 1))
              << ", x_T = " << std::setprecision(6) << std::fixed << s.a_at(T - 1) << " x0 + " << s.s_at(T - 1)
              << " eps still leaks the image mean (Lin et al. 3.1)\n"
              << "     fix: \"rescale_betas_zero_snr\": true  (diffuse schedule --zero-snr), then fine-tune with v "
                 "prediction\n"
              << std::defaultfloat;
  }
  std::vector<int64_t> late;
  for (int64_t S : {5, 10, 25, 50, 100}) {
    if (S > T) continue;
    try {
      auto ts = spaced_timesteps(T, S, config.timestep_spacing, config.steps_offset);
      if (ts.front() != T - 1) late.push_back(S);
    } catch (const std::invalid_argument&) {
      late.push_back(S);
    }
  }
  if (!late.empty()) {
    ++flaws;
    auto ts = spaced_timesteps(T, std::min<int64_t>(10, T), config.timestep_spacing, config.steps_offset);
    std::cout << "FLAW " << to_string(config.timestep_spacing) << " spacing does not start at t = T-1 = " << T - 1
              << " for S in {" << join(late) << "} (S = " << std::min<int64_t>(10, T) << " starts at "
              << ts.front() << ") (Lin et al. 3.3)\n"
              << "     fix: \"timestep_spacing\": \"trailing\"\n";
  }
  if (config.prediction_type == Prediction::eps && s.zero_terminal_snr()) {
    ++flaws;
    std::cout << "FLAW eps prediction on a zero-terminal-SNR schedule: at t = T-1 the target equals the input "
                 "and x0 cannot be recovered (Lin et al. 3.2)\n"
              << "     fix: \"prediction_type\": \"v_prediction\"\n";
  } else if (config.prediction_type == Prediction::eps) {
    std::cout << "note: eps prediction becomes a flaw once the schedule is rescaled to zero terminal SNR: "
                 "switch to \"prediction_type\": \"v_prediction\" with it\n";
  }
  std::cout << (flaws ? std::to_string(flaws) + " flaw(s) found" : std::string("no flaws found")) << "\n";
  return flaws;
}

// The timesteps a sampler of `steps` steps walks: integer ones, or with a sigma spacing each schedule's fractional
// network times and their sigma = s / a.
void print_sampler_timesteps(const ScheduleOptions& o, const std::vector<std::pair<std::string, Schedule>>& schedules) {
  auto spacing = parse_spacing(o.spacing);
  if (!is_sigma_spacing(spacing)) {
    auto ts = spaced_timesteps(o.T, o.steps, spacing, o.steps_offset);
    std::cout << "timesteps (" << to_string(spacing) << ", S = " << o.steps << "): " << join(ts) << "\n";
    return;
  }
  for (auto& [name, s] : schedules) {
    std::ostringstream t, sigma;
    for (const auto& l : spaced_levels(s, o.steps, spacing)) {
      t << (t.tellp() > 0 ? ", " : "") << std::setprecision(6) << l.t;
      sigma << (sigma.tellp() > 0 ? ", " : "") << std::setprecision(6)
            << (l.a > 0 ? l.s / l.a : std::numeric_limits<double>::infinity());
    }
    std::cout << name << " " << to_string(spacing) << " (S = " << o.steps << "): t = " << t.str()
              << "\n  sigma = " << sigma.str() << "\n";
  }
}

void run_schedule(const ScheduleOptions& o) {
  warn_if_slow_blas();
  if (o.table) {
    print_tables();
    return;
  }
  if (!o.audit.empty()) {
    if (audit(o.audit) > 0) throw Exit{kExitFlaws};
    return;
  }
  std::vector<std::pair<std::string, Schedule>> schedules;
  for (auto& name : o.names) {
    ScheduleSpec spec{name, o.T, o.beta_start, o.beta_end, o.zero_snr};
    schedules.emplace_back(label(name, o.zero_snr), make_schedule(spec));
  }
  for (auto& [name, s] : schedules) print_summary(name, s);
  if (o.steps < 0) throw std::invalid_argument("--steps must be positive, got " + std::to_string(o.steps));
  if (o.steps > 0) print_sampler_timesteps(o, schedules);
  if (!o.csv.empty()) write_csv(o.csv, schedules);
  if (!o.plot.empty()) write_plot(o.plot, schedules);
}

}  // namespace

void add_schedule_command(CLI::App& app) {
  auto opt = std::make_shared<ScheduleOptions>();
  auto* cmd = app.add_subcommand("schedule", "Noise schedules: terminal SNR, sampler timesteps, tables, plots, audits");
  cmd->add_option("--schedule", opt->names,
                  "Schedule name(s): linear, scaled_linear, cosine, cosine_noclip, sigmoid (comma-separated or "
                  "repeated)")
      ->delimiter(',');
  cmd->add_flag("--zero-snr", opt->zero_snr, "Rescale to zero terminal SNR (Algorithm 1 of Lin et al. 2023)");
  cmd->add_option("--T", opt->T, "Number of training timesteps")->capture_default_str();
  cmd->add_option("--beta-start", opt->beta_start, "First beta (default: the schedule's own)");
  cmd->add_option("--beta-end", opt->beta_end, "Last beta (default: the schedule's own)");
  cmd->add_option("--steps", opt->steps, "Print the timesteps a sampler with this many steps walks");
  cmd->add_option("--spacing", opt->spacing,
                  "Timestep spacing: leading, linspace, trailing, or the sigma spacings karras (rho 7) and exponential")
      ->capture_default_str();
  cmd->add_option("--steps-offset", opt->steps_offset, "diffusers' steps_offset (leading spacing)")
      ->capture_default_str();
  cmd->add_flag("--table", opt->table, "Reproduce Lin et al. 2023 Table 1 and Table 2");
  cmd->add_option("--csv", opt->csv, "Write t, beta, alpha_bar, a, s, SNR, log-SNR, (SNR+1)/SNR per schedule");
  cmd->add_option("--plot", opt->plot, "Write a PNG of log-SNR, sqrt(alpha_bar) and (SNR+1)/SNR against t");
  cmd->add_option("--audit", opt->audit,
                  "Audit a diffusers scheduler_config.json for the flaws of Lin et al. 2023 (exit 3 if any)");

  cmd->callback([opt] { run_schedule(*opt); });
}

}  // namespace diffuse::cli
