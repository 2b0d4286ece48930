#include <gtest/gtest.h>

#include <fstream>

#include "cli_util.h"

using diffuse::testing::fixture;
using diffuse::testing::run_cli;

namespace {
bool has(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }
std::string tmp(const std::string& name) { return ::testing::TempDir() + "/" + std::to_string(::getpid()) + name; }
}  // namespace

TEST(CliSchedule, SummaryOfZeroSnrSchedule) {
  auto r = run_cli("schedule --schedule scaled_linear");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "SNR(T)=4.68")) << r.output;
  r = run_cli("schedule --schedule scaled_linear --zero-snr");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "SNR(T)=0.000000e+00")) << r.output;
  EXPECT_TRUE(has(r.output, "[zero terminal SNR]"));
}

TEST(CliSchedule, StepsAndTables) {
  auto r = run_cli("schedule --steps 10 --spacing leading --steps-offset 1");
  EXPECT_TRUE(has(r.output, "901 801 701 601 501 401 301 201 101 1")) << r.output;
  r = run_cli("schedule --table");
  EXPECT_EQ(r.code, 0);
  EXPECT_TRUE(has(r.output, "4.035993e-05")) << r.output;
  EXPECT_TRUE(has(r.output, "99 199 299 399 499 599 699 799 899 999"));
  EXPECT_TRUE(has(r.output, "0 111 222 333 444 555 666 777 888 999"));
}

TEST(CliSchedule, CsvAndPlot) {
  auto csv = tmp("s.csv"), png = tmp("s.png");
  auto r = run_cli("schedule --schedule linear,scaled_linear --zero-snr --csv " + csv + " --plot " + png);
  ASSERT_EQ(r.code, 0) << r.output;
  std::ifstream in(csv);
  std::string header, line;
  std::getline(in, header);
  EXPECT_EQ(header, "schedule,t,beta,alpha_bar,a,s,snr,log_snr,v_over_eps");
  int rows = 0;
  while (std::getline(in, line)) ++rows;
  EXPECT_EQ(rows, 2000);
  std::ifstream img(png, std::ios::binary);
  char magic[8] = {};
  img.read(magic, 8);
  EXPECT_EQ(std::string(magic + 1, 3), "PNG");
}

TEST(CliSchedule, AuditFindsTheFlawsOfStableDiffusion) {
  auto r = run_cli("schedule --audit " + fixture("scheduler/sd15_scheduler_config.json"));
  EXPECT_EQ(r.code, 3) << r.output;
  EXPECT_TRUE(has(r.output, "non-zero terminal SNR")) << r.output;
  EXPECT_TRUE(has(r.output, "rescale_betas_zero_snr"));
  EXPECT_TRUE(has(r.output, "\"trailing\""));
  EXPECT_TRUE(has(r.output, "skip_prk_steps"));  // listed once as ignored
  r = run_cli("schedule --audit " + fixture("scheduler/sd21_scheduler_config.json"));
  EXPECT_EQ(r.code, 3) << r.output;
  EXPECT_TRUE(has(r.output, "2 flaw(s)")) << r.output;
  r = run_cli("schedule --audit " + fixture("scheduler/fixed_scheduler_config.json"));
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "no flaws found"));
  // eps on a zero-SNR schedule is its own flaw.
  auto eps = tmp("eps.json");
  std::ofstream(eps) << R"({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
     "rescale_betas_zero_snr": true, "timestep_spacing": "trailing", "prediction_type": "epsilon"})";
  r = run_cli("schedule --audit " + eps);
  EXPECT_EQ(r.code, 3);
  EXPECT_TRUE(has(r.output, "v_prediction")) << r.output;
}

TEST(CliSchedule, BadInputGetsOneErrorLine) {
  struct Case {
    std::string args, needle;
  };
  std::vector<Case> cases = {
      {"schedule --schedule quadratic", "unknown schedule 'quadratic'"},
      {"schedule --T 1", "T must be at least 2"},
      {"schedule --beta-start 0 --beta-end 0.02", "(0, 1)"},
      {"schedule --beta-end 1.5", "(0, 1)"},
      {"schedule --steps 1001", "[1, T = 1000]"},
      {"schedule --steps 10 --spacing middle", "unknown timestep spacing"},
      {"schedule --audit /nonexistent/scheduler_config.json", "cannot read '/nonexistent/scheduler_config.json'"},
      {"schedule --T abc", "error:"},
      {"nosuchcommand", "error:"},
  };
  auto bad = tmp("bad.json");
  std::ofstream(bad) << "{ not json";
  cases.push_back({"schedule --audit " + bad, "is not valid JSON"});
  for (auto& c : cases) {
    auto r = run_cli(c.args);
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_LT(r.code, 128) << c.args << " crashed";
    EXPECT_TRUE(has(r.output, "error:")) << c.args << "\n" << r.output;
    EXPECT_TRUE(has(r.output, c.needle)) << c.args << "\n" << r.output;
  }
}

TEST(CliSchedule, HelpOnEverySubcommand) {
  auto r = run_cli("--help");
  EXPECT_EQ(r.code, 0);
  EXPECT_TRUE(has(r.output, "schedule"));
  r = run_cli("schedule --help");
  EXPECT_EQ(r.code, 0);
  EXPECT_TRUE(has(r.output, "--zero-snr"));
}

// Sigma spacings print fractional network times and sigmas; on a zero-SNR schedule the SNR-0 point comes first.
TEST(CliSchedule, PrintsSigmaSpacings) {
  auto r = run_cli("schedule --schedule scaled_linear --zero-snr --steps 6 --spacing karras");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "karras (S = 6): t = 999, 998, 994.25")) << r.output;
  EXPECT_TRUE(has(r.output, "sigma = inf, 2254.2")) << r.output;
  r = run_cli("schedule --schedule linear --steps 5 --spacing exponential");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "sigma = 157.407, 14.0532, 1.25465, 0.112014, 0.0100005")) << r.output;
}
