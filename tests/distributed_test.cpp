#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unistd.h>

#include "cli_util.h"
#include "diffuse/train/distributed.h"
#include "test_util.h"
#include "util/torch_compat.h"

namespace {

diffuse::testing::CliResult run_worker(const std::string& args) {
  return diffuse::testing::run_shell(std::string("timeout 60 ") + DIFFUSE_DIST_WORKER + " " + args);
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
  DIFFUSE_REQUIRE_GLOO();
  auto r = run_worker("--nproc 2 allreduce");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 0 ok"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 1 ok"), std::string::npos) << r.output;
}

// Bucketed, hook-driven averaging of shard gradients equals the full-batch gradient.
TEST(Distributed, BucketedGradientsEqualFullBatch) {
  DIFFUSE_REQUIRE_GLOO();
  auto r = run_worker("--nproc 2 average");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 1 buckets"), std::string::npos) << r.output;
}

// A rank that dies or hangs stops every rank with an error within a bounded time.
TEST(Distributed, DeadOrHungRankStopsEveryoneQuickly) {
  DIFFUSE_REQUIRE_GLOO();
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

// torchrun's elastic agent can host the TCP store itself (TORCHELASTIC_USE_AGENT_STORE=True): then rank 0 must
// connect as a client like the others. This test plays the agent: it hosts the store and starts the two ranks.
TEST(Distributed, RanksUseTorchrunAgentStore) {
  DIFFUSE_REQUIRE_GLOO();
  c10d::TCPStoreOptions opts;
  opts.port = 0;  // any free port
  opts.isServer = true;
  opts.waitWorkers = false;
  opts.timeout = std::chrono::seconds(20);
  auto agent = diffuse::compat::make_tcp_store("127.0.0.1", opts);
  const std::string env = "TORCHELASTIC_USE_AGENT_STORE=True TORCHELASTIC_RESTART_COUNT=0 WORLD_SIZE=2 "
                          "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(agent->getPort());
  const std::string log = "/tmp/diffuse-agent-store-" + std::to_string(getpid());
  std::string cmd = "(env " + env + " RANK=1 LOCAL_RANK=1 timeout 60 " + DIFFUSE_DIST_WORKER + " allreduce > " + log +
                    " 2>&1 &); env " + env + " RANK=0 LOCAL_RANK=0 timeout 60 " + DIFFUSE_DIST_WORKER + " allreduce";
  auto r = diffuse::testing::run_shell(cmd);
  std::string other;
  for (int i = 0; i < 500 && other.find("rank 1") == std::string::npos; ++i) {  // rank 1 may end a moment later
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::ifstream in(log);
    other.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::remove(log.c_str());
  EXPECT_EQ(r.code, 0) << r.output << other;
  EXPECT_NE(r.output.find("rank 0 ok"), std::string::npos) << r.output;
  EXPECT_NE(other.find("rank 1 ok"), std::string::npos) << other;
}
