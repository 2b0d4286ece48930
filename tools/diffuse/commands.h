// The subcommands of the diffuse CLI. Each add_* registers its options and a callback on `app`.
#pragma once

#include <CLI/CLI.hpp>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse::cli {

/// Exit codes: 0 success, 1 bad input or failure, 2 usage error, 3 an audit found flaws.
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitFlaws = 3;

/// Thrown by a command to end the process with a given status after printing its findings.
struct Exit {
  int code;
};

/// Prints a warning (with the fix) when the BLAS runs at reference speed. Once per process;
/// DIFFUSE_SKIP_BLAS_CHECK=1 skips it. Every command that computes calls it first.
void warn_if_slow_blas();
/// A one-line note on stderr when a float32 run on the CPU could use the CPU's bf16 units (cpu_bf16_units): with
/// LibTorch 2.x (cpu_runs_bf16_networks) `whole_network_bf16`, the command's own bf16 option, else --conv-dtype bf16.
void suggest_bf16(const std::string& device, const std::string& whole_network_bf16);

/// The program's arguments after argv[0], as main() received them (to re-run this command as several ranks).
const std::vector<std::string>& program_arguments();

void add_schedule_command(CLI::App& app);
void add_train_command(CLI::App& app);  ///< train, train-classifier and train-vae
void add_sample_command(CLI::App& app);
void add_eval_command(CLI::App& app);     ///< train-features and eval
void add_analyze_command(CLI::App& app);  ///< analyze brightness|loss|lipschitz

}  // namespace diffuse::cli
