// Data-parallel training through the CLI on loopback: 2 processes against 1 (parity of the weights), a rank
// killed, hung or signalled mid-run (everyone stops in bounded time, the checkpoint survives), resuming with a
// different process count, and the options that cannot work.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "cli_util.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/train/train.h"
#include "diffuse/models/unet.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::run_cli;
using diffuse::testing::TempDir;
namespace fs = std::filesystem;

namespace {

// Tiny class-conditional UNet on generated shapes; flips, offset noise and label dropout draw random numbers,
// so each of them must be drawn globally for 1 and 2 processes to agree.
std::string common_options(const std::string& out, const std::string& vary = "--batch 8 --lr 1e-3 --dist-timeout 20") {
  return "train --data synthetic-shapes --synthetic-count 64 --size 16 --channels 16,32 --attention-levels none "
         "--layers-per-block 1 --norm-groups 8 --hflip --offset-noise 0.1 --label-dropout 0.3 --warmup 0 "
         "--lr-schedule constant --quiet " + vary + " --out " + out;
}

double max_abs_diff(const std::string& a, const std::string& b) {
  auto wa = load_safetensors(a + "/diffusion_pytorch_model.safetensors");
  auto wb = load_safetensors(b + "/diffusion_pytorch_model.safetensors");
  EXPECT_EQ(wa.size(), wb.size());
  double diff = 0;
  for (const auto& [name, t] : wa) diff = std::max(diff, (t - wb.at(name)).abs().max().item<double>());
  return diff;
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

// A CLI run in the background: its pid is the launcher's (sh execs the CLI), its output goes to a file.
struct Background {
  pid_t pid = -1;
  std::string log;
  Background(const std::string& args, const std::string& log_path) : log(log_path) {
    std::string cmd = std::string("exec env DIFFUSE_SKIP_BLAS_CHECK=1 ") + DIFFUSE_CLI + " " + args + " > " + log_path + " 2>&1";
    pid = fork();
    if (pid == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  // Exit status, or -1 if it did not end within `limit` seconds (then it is killed).
  int wait(double limit) {
    auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit);
    while (std::chrono::steady_clock::now() < until) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
  std::string output() const {
    std::ifstream in(log);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  ~Background() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

// The rank processes the launcher started: pid of RANK=r among its children.
pid_t rank_pid(pid_t launcher, int rank) {
  std::ifstream in("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  pid_t child;
  while (in >> child) {
    std::ifstream env("/proc/" + std::to_string(child) + "/environ");
    std::string var;
    while (std::getline(env, var, '\0'))
      if (var == "RANK=" + std::to_string(rank)) return child;
  }
  return -1;
}

// The CLI with extra environment variables (as torchrun would set them).
diffuse::testing::CliResult run_cli_env(const std::string& env, const std::string& args) {
  return diffuse::testing::run_shell("env DIFFUSE_SKIP_BLAS_CHECK=1 " + env + " " + DIFFUSE_CLI + " " + args);
}

int64_t step_or_zero(const std::string& run) {
  try {
    return checkpoint_step(run);
  } catch (const std::exception&) {
    return 0;
  }
}

// Starts a long 2-process run and waits until it has checkpointed at least `step`; returns rank `rank`'s pid.
pid_t start_and_wait(Background& job, const std::string& run, int64_t step, int rank) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(40);
  while (std::chrono::steady_clock::now() < until) {
    pid_t p = rank_pid(job.pid, rank);
    if (p > 0 && step_or_zero(run) >= step) return p;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

}  // namespace

// Same seed, same global batch: 2 processes x 4 images == 1 process x 8 images, up to float rounding (the shard
// means' average differs from the full mean in the last bits). Then each run resumes with the other process count.
TEST(TrainDistributed, TwoProcessesMatchOneAndResumeAcrossCounts) {
  DIFFUSE_REQUIRE_GLOO();
  TempDir dir;
  auto one = run_cli(common_options(dir / "one") + " --steps 4 --threads 1");
  ASSERT_EQ(one.code, 0) << one.output;
  auto two = run_cli(common_options(dir / "two") + " --steps 4 --nproc 2");
  ASSERT_EQ(two.code, 0) << two.output;
  // Rank 0 alone reports.
  EXPECT_EQ(count(two.output, "trained '"), 1) << two.output;
  EXPECT_EQ(count(two.output, "data: "), 1) << two.output;
  EXPECT_EQ(checkpoint_step(dir / "two"), 4);

  auto init = run_cli(common_options(dir / "init", "--batch 8 --lr 1e-12") + " --steps 1 --threads 1");  // ~ initial
  ASSERT_EQ(init.code, 0) << init.output;
  const double moved = max_abs_diff(dir / "one/unet", dir / "init/unet");
  const double diff = max_abs_diff(dir / "one/unet", dir / "two/unet");
  const double diff_ema = max_abs_diff(dir / "one/unet_ema", dir / "two/unet_ema");
  std::cout << "[ parity ] 4 steps: max |w_1proc - w_2proc| = " << diff << " (EMA " << diff_ema
            << "), max |w - w_init| = " << moved << "\n";
  RecordProperty("parity_max_abs_diff", std::to_string(diff));
  EXPECT_GT(moved, 1e-3);           // training moved the weights ...
  EXPECT_LT(diff, 1e-4);            // ... and the two runs agree far below that
  EXPECT_LT(diff_ema, 1e-4);
  // The log of both runs: same steps, same losses up to rounding.
  EXPECT_TRUE(fs::exists(dir / "two/log.csv"));

  // Resume the 1-process run with 2 processes and the 2-process run with 1.
  auto r1 = run_cli("train --out " + dir / "one" + " --resume --steps 6 --nproc 2 --quiet");
  ASSERT_EQ(r1.code, 0) << r1.output;
  auto r2 = run_cli("train --out " + dir / "two" + " --resume --steps 6 --threads 1 --quiet");
  ASSERT_EQ(r2.code, 0) << r2.output;
  const double after = max_abs_diff(dir / "one/unet", dir / "two/unet");
  std::cout << "[ parity ] 6 steps after swapped resumes: max diff " << after << "\n";
  EXPECT_LT(after, 1e-4);
  EXPECT_LT(max_abs_diff(dir / "one/unet_ema", dir / "two/unet_ema"), 1e-4);
  EXPECT_EQ(checkpoint_step(dir / "one"), 6);
}

// A rank killed with SIGKILL, or stopped (hung): every process exits non-zero in bounded time with an error that
// names the cause, and the last checkpoint loads and resumes.
TEST(TrainDistributed, DeadOrHungRankStopsEveryoneAndCheckpointSurvives) {
  DIFFUSE_REQUIRE_GLOO();
  for (std::string mode : {"kill", "hang"}) {
    TempDir dir;
    const std::string run = dir / "run";
    Background job(common_options(run, "--batch 8 --lr 1e-3 --dist-timeout 3") + " --steps 100000 --checkpoint-every 2 --nproc 2",
                   dir / "log.txt");
    pid_t victim = start_and_wait(job, run, 2, 1);
    ASSERT_GT(victim, 0) << mode << ": no checkpoint within 40 s\n" << job.output();
    auto t0 = std::chrono::steady_clock::now();
    kill(victim, mode == "kill" ? SIGKILL : SIGSTOP);
    int code = job.wait(30);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::string out = job.output();
    std::cout << "[ failure ] " << mode << " rank 1: all processes exited after " << secs << " s (code " << code << ")\n";
    RecordProperty(mode + "_seconds", std::to_string(secs));
    ASSERT_NE(code, -1) << mode << ": still running after 30 s\n" << out;
    EXPECT_NE(code, 0) << out;
    EXPECT_LT(secs, 15) << out;  // a death is seen at once; a hang after --dist-timeout (3 s) + shutdown
    if (mode == "kill") EXPECT_NE(out.find("launch: rank 1 of 2 was killed by signal 9"), std::string::npos) << out;
    EXPECT_NE(out.find("error: rank 0: "), std::string::npos) << out;
    EXPECT_NE(out.find("another rank died, hung or was stopped"), std::string::npos) << out;
    // The last checkpoint is complete and continues (with one process).
    int64_t step = checkpoint_step(run);
    EXPECT_GE(step, 2);
    EXPECT_NO_THROW(load_unet(run + "/unet", torch::kCPU));
    if (mode == "hang") continue;
    auto resumed = run_cli("train --out " + run + " --resume --steps " + std::to_string(step + 1) + " --threads 1 --quiet");
    EXPECT_EQ(resumed.code, 0) << resumed.output;
    EXPECT_EQ(checkpoint_step(run), step + 1);
  }
}

// SIGTERM to one rank only: the ranks agree to stop, rank 0 writes the checkpoint of the step they stop at,
// nobody deadlocks, the exit status says which signal.
TEST(TrainDistributed, SignalToOneRankCheckpointsAndStopsAll) {
  DIFFUSE_REQUIRE_GLOO();
  TempDir dir;
  const std::string run = dir / "run";
  Background job(common_options(run) + " --steps 100000 --checkpoint-every 1000 --log-every 1 --nproc 2",
                 dir / "log.txt");
  // Training is under way once log.csv (rank 0, one row per step) has rows: both ranks are in the loop.
  auto rows = [&] {
    std::ifstream in(run + "/log.csv");
    std::string line;
    int n = 0;
    while (std::getline(in, line)) ++n;
    return n - 1;
  };
  pid_t rank1 = -1;
  for (int i = 0; i < 4000 && (rank1 <= 0 || rows() < 2); ++i) {
    rank1 = rank_pid(job.pid, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_GT(rank1, 0) << job.output();
  ASSERT_GE(rows(), 2) << job.output();
  kill(rank1, SIGTERM);
  int code = job.wait(30);
  std::string out = job.output();
  ASSERT_EQ(code, 128 + SIGTERM) << out;
  EXPECT_NE(out.find("interrupted at step"), std::string::npos) << out;
  EXPECT_EQ(out.find("launch: rank"), std::string::npos) << out;
  EXPECT_GE(checkpoint_step(run), 1);
  EXPECT_NO_THROW(load_unet(run + "/unet", torch::kCPU));
}

TEST(TrainDistributed, ImpossibleOptionsAreRefused) {
  TempDir dir;
  auto cuda = run_cli(common_options(dir / "a") + " --steps 1 --nproc 2 --device cuda");
  if (!torch::cuda::is_available()) {
    EXPECT_EQ(cuda.code, 1) << cuda.output;
    EXPECT_NE(cuda.output.find("no usable CUDA"), std::string::npos) << cuda.output;
  }
  auto odd = run_cli(common_options(dir / "b", "--batch 7") + " --steps 1 --nproc 2");
  EXPECT_EQ(odd.code, 1) << odd.output;
  EXPECT_NE(odd.output.find("--batch 7 is the global batch and must divide among 2 processes"), std::string::npos)
      << odd.output;
  EXPECT_FALSE(fs::exists(dir / "b"));  // refused before anything started
  auto zero = run_cli(common_options(dir / "c") + " --steps 1 --nproc 0");
  EXPECT_EQ(zero.code, 2) << zero.output;
  auto timeout = run_cli(common_options(dir / "c", "--batch 8 --dist-timeout 0") + " --steps 1");
  EXPECT_EQ(timeout.code, 1) << timeout.output;
  EXPECT_NE(timeout.output.find("--dist-timeout must be a positive number"), std::string::npos) << timeout.output;
  auto both = run_cli_env("WORLD_SIZE=2 RANK=0", common_options(dir / "d") + " --steps 1 --nproc 2");
  EXPECT_EQ(both.code, 1) << both.output;
  EXPECT_NE(both.output.find("not both"), std::string::npos) << both.output;
  // torchrun's variables with a batch that does not divide: refused by every rank before any rendezvous.
  auto env = run_cli_env("WORLD_SIZE=3 RANK=0", common_options(dir / "e") + " --steps 1");
  EXPECT_EQ(env.code, 1) << env.output;
  EXPECT_NE(env.output.find("must divide among 3 processes"), std::string::npos) << env.output;
}

// A non-finite loss is seen by every rank at the same step (the per-example losses are shared): all stop, rank 0
// reports once, the last good checkpoint stays.
TEST(TrainDistributed, NanLossStopsEveryRankAtTheSameStep) {
  DIFFUSE_REQUIRE_GLOO();
  TempDir dir;
  auto r = run_cli(common_options(dir / "run", "--batch 8 --lr 1e30 --grad-clip 0") +
                   " --steps 10 --checkpoint-every 1 --nproc 2");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_EQ(count(r.output, "error: "), 1) << r.output;
  EXPECT_NE(r.output.find("stopped without saving, the last good checkpoint"), std::string::npos) << r.output;
  int64_t step = checkpoint_step(dir / "run");
  EXPECT_GE(step, 1);
  EXPECT_NE(r.output.find("at step " + std::to_string(step + 1)), std::string::npos) << r.output;
  EXPECT_NO_THROW(load_unet(dir / "run/unet", torch::kCPU));
}
