// diffuse: train, sample, evaluate and analyse diffusion models. `diffuse --help` lists the subcommands.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <iostream>
#include <string>

#include "commands.h"
#include "diffuse/util/runtime.h"

namespace {
std::vector<std::string> g_arguments;
}

const std::vector<std::string>& diffuse::cli::program_arguments() { return g_arguments; }

int main(int argc, char** argv) {
  g_arguments.assign(argv + 1, argv + argc);
  // Long-running commands: OpenMP workers that sleep instead of spinning, malloc that keeps its memory.
  if (argc > 1) {
    const std::string command = argv[1];
    if (command.rfind("train", 0) == 0 || command == "sample" || command == "eval" || command == "analyze")
      diffuse::configure_cpu_runtime(argv, 0);
  }
  CLI::App app{"diffuse: diffusion models without Python (schedules, training, sampling, evaluation)"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");
  diffuse::cli::add_schedule_command(app);
  diffuse::cli::add_train_command(app);
  diffuse::cli::add_sample_command(app);
  diffuse::cli::add_eval_command(app);
  diffuse::cli::add_analyze_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "error: " << e.what() << "\n";
    auto subs = app.get_subcommands();
    std::cerr << (subs.empty() ? app.help() : subs.front()->help());
    return diffuse::cli::kExitUsage;
  } catch (const diffuse::cli::Exit& e) {
    return e.code;
  } catch (const c10::Error& e) {  // LibTorch's what() carries a C++ backtrace: not for users
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return diffuse::cli::kExitError;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return diffuse::cli::kExitError;
  }
  return 0;
}

namespace diffuse::cli {
void warn_if_slow_blas() {
  static bool done = false;
  if (done || std::getenv("DIFFUSE_SKIP_BLAS_CHECK")) return;
  done = true;
  auto check = diffuse::check_blas();
  if (check.slow) std::cerr << diffuse::slow_blas_warning(check) << "\n";
}

void suggest_bf16(const std::string& device, const std::string& whole_network_bf16) {
  if (device != "cpu") return;
  const auto units = cpu_bf16_units();
  if (units.empty()) return;
  std::cerr << "note: this CPU has " << units << ": "
            << (cpu_runs_bf16_networks()
                    ? whole_network_bf16
                    : "--conv-dtype bf16 computes the convolutions in bf16, about 1.3x faster at the same FID")
            << " (docs/RESULTS.md)\n";
}
}  // namespace diffuse::cli
