#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "cli_util.h"
#include "diffuse/distributed.h"

namespace {

diffuse::testing::CliResult run_worker(const std::string& args) {
  std::string cmd = std::string("timeout 60 ") + DIFFUSE_DIST_WORKER + " " + args + " 2>&1";
  diffuse::testing::CliResult r;
  FILE* pipe = popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  int status = pclose(pipe);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

}  // namespace

TEST(Distributed, EnvironmentParsing) {
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  auto one = diffuse::DistEnv::from_environment();
  EXPECT_FALSE(one.enabled());
  setenv("WORLD_SIZE", "2", 1);
  setenv("RANK", "2", 1);
  EXPECT_THROW(diffuse::DistEnv::from_environment(), std::invalid_argument);
  setenv("RANK", "x", 1);
  EXPECT_THROW(diffuse::DistEnv::from_environment(), std::invalid_argument);
  setenv("RANK", "1", 1);
  setenv("MASTER_PORT", "70000", 1);
  EXPECT_THROW(diffuse::DistEnv::from_environment(), std::invalid_argument);
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  unsetenv("MASTER_PORT");
}

TEST(Distributed, AllReduceAndBroadcastOnLoopback) {
  auto r = run_worker("--nproc 2 allreduce");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 0 ok"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 1 ok"), std::string::npos) << r.output;
}

// Bucketed, hook-driven averaging of shard gradients equals the full-batch gradient.
TEST(Distributed, BucketedGradientsEqualFullBatch) {
  auto r = run_worker("--nproc 2 average");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 1 buckets"), std::string::npos) << r.output;
}

// A rank that dies or hangs stops every rank with an error within a bounded time.
TEST(Distributed, DeadOrHungRankStopsEveryoneQuickly) {
  for (std::string mode : {"die", "hang"}) {
    auto t0 = std::chrono::steady_clock::now();
    auto r = run_worker("--nproc 2 " + mode);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_NE(r.code, 0) << mode << "\n" << r.output;
    EXPECT_NE(r.code, 124) << mode << ": the launcher itself hung\n" << r.output;  // timeout(1)'s status
    EXPECT_LT(secs, 30) << mode;
    if (mode == "hang") EXPECT_NE(r.output.find("rank 0 error"), std::string::npos) << r.output;
  }
}
