// The trainer: loss identities, E-TSDM map, scheduler configs, run folders, resume, NaN guard, CLI.
#include <gtest/gtest.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "diffuse/eval/heldout.h"
#include "diffuse/io/files.h"
#include "diffuse/data/data.h"
#include "diffuse/util/runtime.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/train/train.h"
#include "cli_util.h"
#include "test_util.h"
#include "train/optimizer_step.h"

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::TempDir;
using diffuse::testing::expect_identical_weights;
using diffuse::testing::folder_weights;

namespace {

// A UNet of a few thousand parameters on 16x16 shapes: a step takes milliseconds.
UNetConfig tiny_unet(int64_t num_classes, double dropout = 0.0) {
  UNetShape shape;
  shape.channels = {16, 32};
  shape.layers_per_block = 1;
  shape.attention_levels = {1};
  shape.norm_groups = 8;
  shape.dropout = dropout;
  return make_unet_config(shape, 16, 1, num_classes);
}

TrainOptions tiny_options(const std::string& out, int64_t steps) {
  TrainOptions o;
  o.unet = tiny_unet(10);
  o.loop.out = out;
  o.loop.steps = steps;
  o.loop.batch = 8;
  o.loop.lr = 2e-3;
  o.loop.warmup = 2;
  o.loop.progress = false;
  o.loop.checkpoint_every = 1000;
  o.loop.log_every = 5;
  o.loop.threads = 1;  // ctest runs two test processes on two cores
  return o;
}

const Dataset& shapes16() {
  static Dataset d = make_shapes(256, 16, 11);
  return d;
}

// A run of `options` (6 steps) stopped by SIGINT at step 3 and resumed ends bit-identical, raw and EMA weights, to
// the uninterrupted run of the same options in `straight`.
void expect_resumed_equals_straight(TrainOptions options, const std::string& straight) {
  TrainHooks stop_at_3;
  stop_at_3.on_step = [](const TrainStepInfo& s) {
    if (s.step == 3) std::raise(SIGINT);
  };
  EXPECT_TRUE(train(options, shapes16(), stop_at_3).interrupted);
  options.loop.resume = true;
  EXPECT_EQ(train(options, shapes16()).step, 6);
  expect_identical_weights(straight + "/unet", options.loop.out + "/unet");
  expect_identical_weights(straight + "/unet_ema", options.loop.out + "/unet_ema");
}

bool all_finite(const std::string& folder) {
  for (const auto& [name, t] : folder_weights(folder))
    if (!torch::isfinite(t).all().item<bool>()) return false;
  return true;
}

// The loss of a model folder on a fixed batch, fixed timesteps and fixed noise (eps prediction, linear schedule).
double fixed_eval_loss(const std::string& unet_folder, const Dataset& data) {
  torch::NoGradGuard ng;
  auto unet = load_unet(unet_folder, torch::kCPU);
  unet->eval();
  auto gen = cpu_generator(1234);
  int64_t n = 128;
  auto x0 = data.images.narrow(0, 0, n);
  auto t = torch::randint(0, 1000, {n}, gen, torch::kInt64);
  auto eps = torch::randn(x0.sizes(), gen);
  auto sched = linear();
  auto a = sched.a().to(torch::kFloat32).index_select(0, t).view({n, 1, 1, 1});
  auto s = sched.s().to(torch::kFloat32).index_select(0, t).view({n, 1, 1, 1});
  auto pred = unet->forward(a * x0 + s * eps, t.to(torch::kFloat32), data.labels.narrow(0, 0, n));
  return (pred - eps).pow(2).mean().item<double>();
}

}  // namespace

// ---------------------------------------------------------------- pure functions

TEST(Etsdm, MapIsExactOnItsEdges) {
  EtsdmConfig e{100, 5};
  auto f = e.condition(torch::arange(0, 1000, torch::kInt64));
  ASSERT_EQ(f.scalar_type(), torch::kFloat32);
  for (int64_t t = 0; t < 20; ++t) EXPECT_EQ(f[t].item<float>(), 0.f) << t;
  EXPECT_EQ(f[20].item<float>(), 20.f);
  EXPECT_EQ(f[39].item<float>(), 20.f);
  EXPECT_EQ(f[40].item<float>(), 40.f);
  EXPECT_EQ(f[99].item<float>(), 80.f);
  EXPECT_EQ(f[100].item<float>(), 100.f);
  EXPECT_EQ(f[101].item<float>(), 101.f);
  EXPECT_EQ(f[999].item<float>(), 999.f);
  // Edges that are not integers: t_tilde = 100, n = 3 gives 0, 33.33.., 66.66..
  auto g = EtsdmConfig{100, 3}.condition(torch::tensor({33, 34, 66, 67, 99, 100}));
  EXPECT_FLOAT_EQ(g[0].item<float>(), 0.f);
  EXPECT_FLOAT_EQ(g[1].item<float>(), float(100.0 / 3));
  EXPECT_FLOAT_EQ(g[2].item<float>(), float(100.0 / 3));
  EXPECT_FLOAT_EQ(g[3].item<float>(), float(200.0 / 3));
  EXPECT_FLOAT_EQ(g[4].item<float>(), float(200.0 / 3));
  EXPECT_FLOAT_EQ(g[5].item<float>(), 100.f);
  // Off: the identity.
  EXPECT_TRUE(torch::equal(EtsdmConfig{}.condition(torch::arange(10)), torch::arange(10).to(torch::kFloat32)));
}

// The 000 document's identities, through the trainer's own loss: for one prediction of x0 expressed as each
// target, ||eps - eps^||^2 = SNR ||x0 - x0^||^2 and ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2, so a loss weight
// stated on the x0 error gives the same number whatever the network predicts.
TEST(TrainLoss, EveryTargetGivesTheX0WeightedLoss) {
  torch::manual_seed(0);
  for (bool zero_snr : {false, true}) {
    auto sched = make_schedule({"linear", 1000, -1, -1, zero_snr});
    auto t = torch::tensor({0, 1, 10, 100, 400, 700, 998, 999}, torch::kInt64);
    int64_t n = t.size(0);
    auto snr = sched.snr().index_select(0, t);
    auto a = sched.a().index_select(0, t).view({n, 1, 1, 1}), s = sched.s().index_select(0, t).view({n, 1, 1, 1});
    auto opt = torch::TensorOptions().dtype(torch::kFloat64);
    auto x0 = torch::randn({n, 2, 4, 4}, opt), eps = torch::randn({n, 2, 4, 4}, opt);
    auto x0_hat = x0 + 0.1 * torch::randn({n, 2, 4, 4}, opt);
    auto x_t = a * x0 + s * eps;
    auto eps_hat = (x_t - a * x0_hat) / s;  // s > 0 everywhere
    auto v_hat = a * eps_hat - s * x0_hat;
    auto x0_err = (x0 - x0_hat).pow(2).flatten(1).mean(1);
    std::map<Prediction, torch::Tensor> pred = {{Prediction::eps, eps_hat}, {Prediction::v, v_hat}, {Prediction::x0, x0_hat}};
    std::map<LossWeight, torch::Tensor> expected = {{LossWeight::eps, snr * x0_err},
                                                    {LossWeight::v, (snr + 1) * x0_err},
                                                    {LossWeight::min_snr, snr.clamp_max(5.0) * x0_err},
                                                    {LossWeight::truncated, snr.clamp_min(1.0) * x0_err}};
    for (auto p : {Prediction::eps, Prediction::v, Prediction::x0}) {
      if (p == Prediction::eps && zero_snr) {
        EXPECT_THROW(loss_weight(LossWeight::eps, p, snr), std::domain_error);
        continue;
      }
      for (const auto& [w, want] : expected) {
        auto got = per_example_loss(p, pred[p], x0, eps, a, s, loss_weight(w, p, snr, 5.0));
        EXPECT_TRUE(torch::allclose(got, want, 1e-9, 1e-12))
            << to_string(p) << " target, " << to_string(w) << " weight, zero_snr " << zero_snr << "\n"
            << got << want;
      }
      // uniform: plain MSE on the target, i.e. SNR, SNR + 1 and 1 times the x0 error.
      auto plain = per_example_loss(p, pred[p], x0, eps, a, s, loss_weight(LossWeight::uniform, p, snr));
      auto factor = p == Prediction::eps ? snr : p == Prediction::v ? snr + 1 : torch::ones_like(snr);
      EXPECT_TRUE(torch::allclose(plain, factor * x0_err, 1e-9, 1e-12)) << to_string(p);
    }
    // The 000 document's ratio: a v model's plain loss is (SNR + 1) / SNR times an eps model's.
    if (!zero_snr) {
      auto lv = per_example_loss(Prediction::v, v_hat, x0, eps, a, s, torch::ones_like(snr));
      auto le = per_example_loss(Prediction::eps, eps_hat, x0, eps, a, s, torch::ones_like(snr));
      EXPECT_TRUE(torch::allclose(lv / le, (snr + 1) / snr, 1e-9));
    }
  }
}

TEST(Train, OffsetNoiseShiftsEachImageAndChannel) {
  auto gen = cpu_generator(3);
  auto eps = torch::zeros({400, 3, 4, 4});
  auto out = offset_noise(eps, 0.1, gen);
  auto shift = out.select(3, 0).select(2, 0);  // [400, 3]
  EXPECT_TRUE(torch::allclose(out, shift.view({400, 3, 1, 1}).expand_as(out)));  // constant over H, W
  EXPECT_NEAR(shift.std().item<double>(), 0.1, 0.01);
  EXPECT_NEAR(shift.mean().item<double>(), 0.0, 0.01);
  EXPECT_TRUE(torch::equal(offset_noise(eps, 0.0, gen), eps));
}

TEST(Train, SchedulerConfigDescribesTheTrainedSchedule) {
  for (std::string name : {"linear", "scaled_linear", "cosine", "cosine_noclip", "sigmoid"})
    for (bool zero : {false, true}) {
      ScheduleSpec spec{name, 1000, -1, -1, zero};
      auto c = make_scheduler_config(spec, Prediction::v, Spacing::trailing, EtsdmConfig{100, 5});
      auto back = SchedulerConfig::from_json(nlohmann::json::parse(c.to_json().dump()));
      auto want = make_schedule(spec).alpha_bar, got = back.schedule().alpha_bar;
      EXPECT_TRUE(torch::allclose(got, want, 1e-10, 1e-14)) << name << " zero_snr " << zero;
      EXPECT_EQ(back.schedule().zero_terminal_snr(), make_schedule(spec).zero_terminal_snr()) << name;
      EXPECT_EQ(back.prediction_type, Prediction::v);
      EXPECT_EQ(back.timestep_spacing, Spacing::trailing);
      EXPECT_EQ(back.etsdm.t_tilde, 100);
      EXPECT_EQ(back.etsdm.n, 5);
    }
  EXPECT_THROW(make_scheduler_config({"linear"}, Prediction::eps, Spacing::leading, EtsdmConfig{1000, 5}),
               std::invalid_argument);
  // diffusers' DDIMScheduler refuses beta_schedule "sigmoid" (NotImplementedError): the betas are stored instead.
  auto sigmoid = make_scheduler_config({"sigmoid"}, Prediction::eps, Spacing::leading, {}).to_json();
  EXPECT_EQ(sigmoid["_class_name"], "DDIMScheduler");
  EXPECT_NE(sigmoid["beta_schedule"], "sigmoid");
  EXPECT_EQ(sigmoid["trained_betas"].size(), 1000u);
}

TEST(Train, DefaultShapeIsTheReferenceUNet) {
  EXPECT_EQ(make_unet_config(UNetShape{}, 32, 1, 10).to_json(), reference_unet_config().to_json());
  UNetShape bad;
  bad.attention_levels = {3};
  auto msg = error_of([&] { make_unet_config(bad, 32, 1, 10); });
  EXPECT_NE(msg.find("attention level 3"), std::string::npos) << msg;
  EXPECT_THROW(make_unet_config(UNetShape{}, 30, 1, 10), std::invalid_argument);  // 30 is not divisible by 4
}

TEST(Train, OptionsRoundTripThroughJson) {
  auto o = tiny_options("/tmp/x", 7);
  o.prediction = Prediction::v;
  o.loss_weight = LossWeight::min_snr;
  o.etsdm = {100, 5};
  o.schedule.zero_snr = true;
  o.data.source = "synthetic-brightness";
  auto back = TrainOptions::from_json(nlohmann::json::parse(o.to_json().dump()));
  EXPECT_EQ(back.to_json(), o.to_json());
}

// ---------------------------------------------------------------- the loop

TEST(Train, LossGoesDownOnTinyData) {
  TempDir dir;
  auto o = tiny_options(dir / "run", 30);
  o.loop.batch = 16;
  o.loop.lr = 3e-3;
  const auto& data = shapes16();
  torch::manual_seed(o.loop.seed);
  UNet2DModel init(o.unet);
  save_unet(init, dir / "init");
  auto r = train(o, data);
  EXPECT_EQ(r.step, 30);
  EXPECT_FALSE(r.interrupted);
  double before = fixed_eval_loss(dir / "init", data), after = fixed_eval_loss(dir / "run/unet", data);
  EXPECT_LT(after, 0.5 * before) << "before " << before << " after " << after;
  // The run folder: diffusers layout, log and plot.
  for (std::string f : {"run.json", "unet/config.json", "unet_ema/diffusion_pytorch_model.safetensors",
                        "scheduler/scheduler_config.json", "train_state/state.json", "train_state/optimizer.safetensors",
                        "log.csv", "loss.png"})
    EXPECT_TRUE(fs::exists(dir / ("run/" + f))) << f;
  EXPECT_FALSE(fs::exists(dir / "run/.checkpoint-new"));
  EXPECT_EQ(checkpoint_step(dir / "run"), 30);
  std::ifstream log(dir / "run/log.csv");
  std::string header, line;
  std::getline(log, header);
  EXPECT_EQ(header.substr(0, 40), "step,loss,lr,images_per_s,grad_norm,loss");
  EXPECT_NE(header.find("loss_t900-999"), std::string::npos);
  int rows = 0;
  while (std::getline(log, line)) ++rows;
  EXPECT_EQ(rows, 6);
}

// N steps straight == N/2 steps, SIGINT, resume, N/2 steps: every source of randomness included
// (dropout uses the global RNG; labels are dropped; flips, offset noise, E-TSDM).
TEST(Train, ResumeEqualsUninterruptedBitForBit) {
  TempDir dir;
  auto make = [&](const std::string& out) {
    auto o = tiny_options(out, 8);
    o.unet = tiny_unet(10, 0.1);
    o.prediction = Prediction::v;
    o.loss_weight = LossWeight::min_snr;
    o.schedule.zero_snr = true;
    o.etsdm = {100, 5};
    o.offset_noise = 0.1;
    o.label_dropout = 0.3;
    o.loop.hflip = true;
    o.loop.weight_decay = 0.01;
    o.loop.seed = 5;
    return o;
  };
  auto straight = train(make(dir / "a"), shapes16());
  EXPECT_EQ(straight.step, 8);

  TrainHooks stop_at_4;
  stop_at_4.on_step = [](const TrainStepInfo& s) {
    if (s.step == 4) std::raise(SIGINT);
  };
  auto first = train(make(dir / "b"), shapes16(), stop_at_4);
  EXPECT_TRUE(first.interrupted);
  EXPECT_EQ(first.signal, SIGINT);
  EXPECT_EQ(first.step, 4);
  EXPECT_EQ(checkpoint_step(dir / "b"), 4);
  auto o = make(dir / "b");
  o.loop.resume = true;
  auto second = train(o, shapes16());
  EXPECT_EQ(second.step, 8);
  EXPECT_FALSE(second.interrupted);
  expect_identical_weights(dir / "a/unet", dir / "b/unet");
  expect_identical_weights(dir / "a/unet_ema", dir / "b/unet_ema");
  EXPECT_EQ(read_file(dir / "a/scheduler/scheduler_config.json"), read_file(dir / "b/scheduler/scheduler_config.json"));
  auto sched = SchedulerConfig::load(dir / "a/scheduler/scheduler_config.json");
  EXPECT_EQ(sched.etsdm.t_tilde, 100);
  EXPECT_TRUE(sched.rescale_betas_zero_snr);
  EXPECT_EQ(sched.prediction_type, Prediction::v);
  // The log of the resumed run has the same rows (steps 5 and 8) as the straight one.
  auto steps_of = [](const std::string& csv) {
    std::ifstream in(csv);
    std::string line, out;
    std::getline(in, line);
    while (std::getline(in, line)) out += line.substr(0, line.find(',')) + " ";
    return out;
  };
  EXPECT_EQ(steps_of(dir / "a/log.csv"), steps_of(dir / "b/log.csv"));
}

// --channels-last: the same training up to float32 summation order, the same checkpoint layout (diffusers'),
// and a channels-last run resumed from its checkpoint equals its straight run bit for bit.
TEST(Train, ChannelsLastTrainsTheSameWeightsAndResumes) {
  TempDir dir;
  auto make = [&](const std::string& out, bool channels_last) {
    auto o = tiny_options(out, 6);
    o.prediction = Prediction::v;
    o.loop.channels_last = channels_last;
    return o;
  };
  train(make(dir / "nchw", false), shapes16());
  train(make(dir / "nhwc", true), shapes16());
  auto a = folder_weights(dir / "nchw/unet"), b = folder_weights(dir / "nhwc/unet");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    EXPECT_TRUE(b.at(name).is_contiguous()) << name;
    EXPECT_LT((t - b.at(name)).abs().max().item<double>(), 1e-4) << name;
  }
  expect_resumed_equals_straight(make(dir / "resumed", true), dir / "nhwc");
}

namespace {

// A mixed-precision run against the float32 run of the same options (6 steps, a loss read back every step): the
// losses stay within 3% of float32's (0.1 to 0.2% on LibTorch 1.13 and 2.6), the checkpoints are float32, and a run stopped at step 3
// and resumed equals its straight run bit for bit (raw and EMA).
void expect_close_to_float32_and_resumable(const std::string& what, const std::function<void(LoopOptions&)>& mixed) {
  TempDir dir;
  auto make = [&](const std::string& out, bool is_mixed) {
    auto o = tiny_options(out, 6);
    o.loop.log_every = 1;
    if (is_mixed) mixed(o.loop);
    return o;
  };
  std::vector<double> losses[2];
  for (int i = 0; i < 2; ++i) {
    TrainHooks hooks;
    hooks.on_step = [&, i](const TrainStepInfo& s) { losses[i].push_back(s.loss); };
    train(make(dir / (i ? "mixed" : "fp32"), i), shapes16(), hooks);
  }
  ASSERT_EQ(losses[0].size(), losses[1].size());
  double worst = 0;
  for (size_t k = 0; k < losses[0].size(); ++k) {
    EXPECT_NEAR(losses[1][k], losses[0][k], 0.03 * losses[0][k]) << what << ", step " << k + 1;
    worst = std::max(worst, std::abs(losses[1][k] / losses[0][k] - 1));
  }
  std::cout << what << ": losses of 6 steps within " << worst << " (relative) of float32's\n";
  EXPECT_NE(losses[1], losses[0]) << what << " did not run";
  for (const auto& [name, t] : folder_weights(dir / "mixed/unet")) EXPECT_EQ(t.scalar_type(), torch::kFloat32) << name;
  expect_resumed_equals_straight(make(dir / "resumed", true), dir / "mixed");
}

}  // namespace

// --conv-dtype bf16: the convolutions compute in bf16 from float32 master weights; run.json records it. With
// --bf16, or fp16 on a CPU, it is refused by name.
TEST(Train, ConvDtypeBf16TrainsCloseToFloat32AndResumes) {
  expect_close_to_float32_and_resumable("bf16 convolutions", [](LoopOptions& l) { l.conv_dtype = torch::kBFloat16; });
  TempDir dir;
  auto o = tiny_options(dir / "run", 2);
  o.loop.conv_dtype = torch::kBFloat16;
  train(o, shapes16());
  EXPECT_EQ(load_json(dir / "run/run.json")["loop"]["conv_dtype"], "bf16");
  EXPECT_EQ(diffuse::TrainOptions::from_json(load_json(dir / "run/run.json")).loop.conv_dtype, torch::kBFloat16);
  o.loop.bf16 = true;
  o.loop.out = dir / "both";
  diffuse::testing::expect_error([&] { train(o, shapes16()); }, "--conv-dtype bf16 with --bf16");
  o.loop.bf16 = false;
  o.loop.conv_dtype = torch::kFloat16;
  diffuse::testing::expect_error([&] { train(o, shapes16()); }, "--conv-dtype fp16 needs a GPU");
  // run.json spells both by name and refuses what is none, naming the key.
  auto json = o.to_json();
  EXPECT_EQ(json["loop"]["conv_dtype"], "fp16");
  EXPECT_EQ(json["loop"]["device"], "cpu");
  json["loop"]["conv_dtype"] = "int8";
  diffuse::testing::expect_error([&] { diffuse::TrainOptions::from_json(json); }, "conv_dtype");
  json["loop"]["conv_dtype"] = "bf16";
  json["loop"]["device"] = "tpu:0";
  diffuse::testing::expect_error([&] { diffuse::TrainOptions::from_json(json); }, "'device'");
  json["loop"]["device"] = "cuda:1";
  json["loop"]["lr_schedule"] = "linear";
  diffuse::testing::expect_error([&] { diffuse::TrainOptions::from_json(json); }, "'lr_schedule'");
  json["loop"]["lr_schedule"] = "constant";
  EXPECT_EQ(diffuse::TrainOptions::from_json(json).loop.lr_schedule, diffuse::LrSchedule::constant);
  EXPECT_EQ(diffuse::TrainOptions::from_json(json).loop.device, torch::Device(torch::kCUDA, 1));
}

// --bf16 on a CPU: LibTorch 2.x's autocast (convolutions, products and attention in bf16), or with 1.13, whose CPU
// autocast fails in group_norm, a refusal that names --conv-dtype bf16.
TEST(Train, Bf16AutocastOnTheCpuOrARefusal) {
  if (!cpu_runs_bf16_networks()) {
    TempDir dir;
    auto o = tiny_options(dir / "run", 2);
    o.loop.bf16 = true;
    diffuse::testing::expect_error([&] { train(o, shapes16()); }, "--conv-dtype bf16 runs the convolutions");
    return;
  }
  expect_close_to_float32_and_resumable("bf16 autocast", [](LoopOptions& l) { l.bf16 = true; });
}

// A run stopped between two log rows and resumed ends with a run folder byte-identical to an uninterrupted one's
// (log.csv but its images/s column, which is wall time). It did not: rows whose last decile was empty were dropped
// on resume, the row after the checkpoint averaged fewer steps, torch::save keyed the optimizer state by memory
// address, and run.json recorded "resume": true (found by scripts/kill-harness.sh).
TEST(Train, ResumedRunFolderIsByteIdentical) {
  TempDir dir;
  auto make = [&] {
    auto o = tiny_options(dir / "run", 9);
    o.loop.batch = 2;      // 6 timesteps a row in 10 deciles: most rows have empty cells, some a last one
    o.loop.log_every = 3;  // rows at 3, 6, 9; the stop at 4 falls inside a row
    return o;
  };
  train(make(), shapes16());
  fs::rename(dir / "run", dir / "straight");
  TrainHooks stop_at_4;
  stop_at_4.on_step = [](const TrainStepInfo& s) {
    if (s.step == 4) std::raise(SIGTERM);
  };
  EXPECT_TRUE(train(make(), shapes16(), stop_at_4).interrupted);
  auto o = make();
  o.loop.resume = true;
  EXPECT_EQ(train(o, shapes16()).step, 9);
  auto without_rate = [](const std::string& csv) {  // drops column 4, images/s
    std::istringstream in(read_file(csv));
    std::string line, out;
    while (std::getline(in, line)) {
      size_t a = line.find(','), b = line.find(',', a + 1), c = line.find(',', b + 1), d = line.find(',', c + 1);
      out += line.substr(0, c) + line.substr(d) + "\n";
    }
    return out;
  };
  EXPECT_NE(read_file(dir / "straight/log.csv").find(",\n"), std::string::npos) << "no row ends in an empty decile";
  EXPECT_EQ(without_rate(dir / "straight/log.csv"), without_rate(dir / "run/log.csv"));
  for (const char* f : {"run.json", "loss.png", "train_state/state.json", "train_state/optimizer.safetensors",
                        "train_state/rng.safetensors", "unet/diffusion_pytorch_model.safetensors",
                        "unet_ema/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"})
    EXPECT_TRUE(read_file(dir / (std::string("straight/") + f)) == read_file(dir / (std::string("run/") + f))) << f;
}

TEST(Train, ExistingRunFolderIsNeverSilentlyOverwritten) {
  TempDir dir;
  auto o = tiny_options(dir / "run", 1);
  train(o, shapes16());
  auto before = read_file(dir / "run/unet/diffusion_pytorch_model.safetensors");
  auto msg = error_of([&] { train(o, shapes16()); });
  EXPECT_NE(msg.find("already exists"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--resume"), std::string::npos) << msg;
  EXPECT_EQ(read_file(dir / "run/unet/diffusion_pytorch_model.safetensors"), before);
  // Resuming with options that change the result is refused, naming them.
  auto changed = o;
  changed.loop.resume = true;
  changed.loop.lr = 1.0;
  changed.loop.steps = 2;
  msg = error_of([&] { train(changed, shapes16()); });
  EXPECT_NE(msg.find("loop.lr"), std::string::npos) << msg;
  // --overwrite replaces a run folder, but never a folder that is not one.
  o.loop.overwrite = true;
  o.loop.seed = 9;
  EXPECT_NO_THROW(train(o, shapes16()));
  EXPECT_NE(read_file(dir / "run/unet/diffusion_pytorch_model.safetensors"), before);
  fs::create_directories(dir / "precious");
  std::ofstream(dir / "precious/thesis.tex") << "years of work";
  o.loop.out = dir / "precious";
  msg = error_of([&] { train(o, shapes16()); });
  EXPECT_NE(msg.find("not a diffuse run folder"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(dir / "precious/thesis.tex"));
  // ... nor one that holds a run.json beside files a run does not write (a stray run.json used to cost them all).
  std::ofstream(dir / "precious/run.json") << "{}";
  msg = error_of([&] { train(o, shapes16()); });
  EXPECT_NE(msg.find("thesis.tex"), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(dir / "precious/thesis.tex"));
  // Nothing to resume.
  o.loop.out = dir / "none";
  o.loop.overwrite = false;
  o.loop.resume = true;
  msg = error_of([&] { train(o, shapes16()); });
  EXPECT_NE(msg.find("no run.json"), std::string::npos) << msg;
}

TEST(Train, NanLossStopsAndKeepsTheLastGoodCheckpoint) {
  TempDir dir;
  auto o = tiny_options(dir / "run", 10);
  o.loop.checkpoint_every = 1;
  Dataset data = shapes16();
  data.images = data.images.clone();
  // Poison one image that the third batch is the first to contain.
  BatchSampler sampler(data.size(), o.loop.batch, o.loop.seed);
  int64_t bad = sampler.indices(2)[0].item<int64_t>();
  data.images[bad][0][3][3] = NAN;
  try {
    train(o, data);
    FAIL() << "no error for a NaN loss";
  } catch (const NonFiniteLoss& e) {
    EXPECT_EQ(e.step, 3);
    EXPECT_NE(std::string(e.what()).find("at step 3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("step 2"), std::string::npos) << e.what();
  }
  EXPECT_EQ(checkpoint_step(dir / "run"), 2);
  EXPECT_TRUE(all_finite(dir / "run/unet"));
  EXPECT_TRUE(all_finite(dir / "run/unet_ema"));
  EXPECT_FALSE(fs::exists(dir / "run/.checkpoint-new"));
}

TEST(Train, InterruptedCheckpointSwapIsCompletedOrDiscarded) {
  TempDir dir;
  auto run = dir.path;
  auto write = [](const fs::path& p, const std::string& text) {
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
  };
  // A complete new checkpoint whose swap stopped after moving unet/ in and unet_ema/ out.
  write(run / "unet/w", "new");
  write(run / ".checkpoint-old/unet_ema/w", "old");
  write(run / ".checkpoint-new/unet_ema/w", "new");
  write(run / ".checkpoint-new/train_state/state.json", "{\"step\": 7}");
  write(run / "train_state/state.json", "{\"step\": 3}");
  write(run / ".checkpoint-new/COMPLETE", "7");
  finish_interrupted_checkpoint(run.string());
  EXPECT_EQ(read_file((run / "unet/w").string()), "new");
  EXPECT_EQ(read_file((run / "unet_ema/w").string()), "new");
  EXPECT_EQ(checkpoint_step(run.string()), 7);
  EXPECT_FALSE(fs::exists(run / ".checkpoint-new"));
  EXPECT_FALSE(fs::exists(run / ".checkpoint-old"));
  // An incomplete one (no COMPLETE marker) is discarded; the previous checkpoint stays.
  write(run / ".checkpoint-new/unet/w", "half");
  finish_interrupted_checkpoint(run.string());
  EXPECT_EQ(read_file((run / "unet/w").string()), "new");
  EXPECT_FALSE(fs::exists(run / ".checkpoint-new"));
}

TEST(Train, ImpossibleOptionsAreRefused) {
  TempDir dir;
  auto expect_refused = [&](TrainOptions o, const std::string& what) {
    auto msg = error_of([&] { train(o, shapes16()); });
    EXPECT_NE(msg.find(what), std::string::npos) << "expected '" << what << "' in: " << msg;
    EXPECT_FALSE(fs::exists(o.loop.out)) << what;
  };
  auto o = tiny_options(dir / "run", 5);
  auto eps_zero = o;
  eps_zero.schedule.zero_snr = true;
  expect_refused(eps_zero, "--prediction v");
  auto big_batch = o;
  big_batch.loop.batch = 1000;
  expect_refused(big_batch, "lower --batch");
  auto wrong_size = o;
  wrong_size.unet = make_unet_config(UNetShape{{16, 32}, 1, {}, true, 8, 8}, 32, 1, 10);
  expect_refused(wrong_size, "does not fit the UNet");
  auto no_null = o;
  no_null.unet.num_class_embeds = 10;
  expect_refused(no_null, "no null class");
  auto dropout = o;
  dropout.label_dropout = 1.0;
  expect_refused(dropout, "--label-dropout");
  auto lr = o;
  lr.loop.lr = -1;
  expect_refused(lr, "--lr");
  auto bf16 = o;
  bf16.loop.bf16 = true;
  if (!cpu_runs_bf16_networks()) expect_refused(bf16, "--conv-dtype bf16 runs the convolutions");
}

// Two classes told apart by their brightness (-0.5 or +0.5 plus texture): visible at small t, gone at SNR ~ 0.
TEST(TrainClassifier, AccuracyFallsToChanceAsNoiseGrows) {
  TempDir dir;
  auto two_classes = [](int64_t n, uint64_t seed) {
    Dataset d;
    auto gen = cpu_generator(seed);
    d.labels = torch::randint(0, 2, {n}, gen, torch::kInt64);
    auto level = (d.labels.to(torch::kFloat32) - 0.5).view({n, 1, 1, 1});
    d.images = (level + 0.2 * torch::randn({n, 1, 16, 16}, gen)).clamp(-1, 1);
    d.num_classes = 2;
    d.name = "two-levels";
    return d;
  };
  ClassifierTrainOptions o;
  o.classifier.sample_size = 16;
  o.classifier.num_classes = 2;
  o.classifier.block_out_channels = {8, 16};
  o.classifier.down_block_types = {"DownBlock2D", "DownBlock2D"};
  o.classifier.layers_per_block = 1;
  o.classifier.norm_num_groups = 4;
  o.classifier.add_attention = false;
  o.loop.out = dir / "clf";
  o.loop.steps = 40;
  o.loop.batch = 32;
  o.loop.lr = 5e-3;
  o.loop.warmup = 2;
  o.loop.progress = false;
  o.loop.threads = 1;
  auto data = two_classes(512, 1), heldout = two_classes(400, 2);
  std::ostringstream report;
  auto r = train_classifier(o, data, heldout, &report);
  EXPECT_EQ(r.step, 40);
  EXPECT_NE(report.str().find("0-99"), std::string::npos) << report.str();
  EXPECT_TRUE(fs::exists(dir / "clf/classifier/config.json"));
  EXPECT_TRUE(fs::exists(dir / "clf/classifier_ema/diffusion_pytorch_model.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "clf/scheduler/scheduler_config.json"));
  auto model = load_classifier(dir / "clf/classifier", torch::kCPU);
  auto rows = noisy_accuracy(model, linear(), heldout, 10, 0, torch::kCPU);
  ASSERT_EQ(rows.size(), 10u);
  EXPECT_EQ(rows[0].t_begin, 0);
  EXPECT_EQ(rows[9].t_end, 1000);
  // Nearly clean images: far above chance (0.5). At t >= 900 (sqrt(alpha_bar) < 0.05): chance within noise.
  EXPECT_GT(rows[0].accuracy, 0.9) << report.str();
  EXPECT_LT(rows[9].accuracy, 0.65) << report.str();
  std::ifstream csv(dir / "clf/accuracy.csv");
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header, "t_begin,t_end,accuracy,accuracy_ema,count");
}

// ---------------------------------------------------------------- the command line

namespace {
int run_cli(const std::string& args, std::string* output) {
  auto r = diffuse::testing::run_cli(args);
  *output = r.output;
  return r.code;
}
}  // namespace

TEST(TrainCli, TrainsRefusesAndResumes) {
  TempDir dir;
  std::string common = "--data synthetic-shapes --synthetic-count 64 --size 16 --channels 16,32 --attention-levels none "
                       "--layers-per-block 1 --norm-groups 8 --batch 8 --checkpoint-every 2 --threads 1 --quiet --out " + dir / "run";
  std::string out;
  ASSERT_EQ(run_cli("train " + common + " --steps 2", &out), 0) << out;
  EXPECT_NE(out.find("trained"), std::string::npos) << out;
  EXPECT_EQ(run_cli("train " + common + " --steps 2", &out), 1);
  EXPECT_NE(out.find("error: run folder"), std::string::npos) << out;
  EXPECT_EQ(run_cli("train --out " + dir / "run" + " --resume --lr 1", &out), 1);
  EXPECT_NE(out.find("--lr cannot be given with --resume"), std::string::npos) << out;
  ASSERT_EQ(run_cli("train --out " + dir / "run" + " --resume --steps 4 --threads 1 --quiet", &out), 0) << out;
  EXPECT_EQ(checkpoint_step(dir / "run"), 4);
  EXPECT_EQ(run_cli("train --out " + dir / "x --data fashion-mnst", &out), 1);
  EXPECT_NE(out.find("unknown data source 'fashion-mnst'"), std::string::npos) << out;
  EXPECT_EQ(run_cli("train --help", &out), 0);
  for (std::string opt : {"--prediction", "--loss-weight", "--etsdm-t-tilde", "--offset-noise", "--label-dropout",
                          "--zero-snr", "--resume", "--overwrite", "--channels", "--attention-levels", "--bf16"})
    EXPECT_NE(out.find(opt), std::string::npos) << opt;
}

// One table (resumable_options) says what may change on --resume: run.json's check, the CLI's check of the
// flags given with --resume and the help text all follow it.
TEST(TrainCli, ResumableOptionsTableDrivesTheHelpAndTheChecks) {
  std::string help;
  ASSERT_EQ(run_cli("train --help", &help), 0);
  const auto from = help.find("Continue the run in --out");
  ASSERT_NE(from, std::string::npos) << help;
  const std::string resume_line = help.substr(from, help.find("--overwrite", from) - from);
  for (const auto& r : diffuse::resumable_options()) {
    if (r.flag.empty() || r.flag == "--out" || r.flag == "--resume") continue;
    EXPECT_NE(resume_line.find(r.flag), std::string::npos) << r.flag << " missing from: " << resume_line;
  }
  // Every resumable key may differ from run.json; another loop key (lr) may not.
  diffuse::LoopOptions stored, given;
  given.steps = stored.steps + 5;
  given.threads = 3;
  given.device = torch::kCUDA;
  for (const auto& r : diffuse::resumable_options()) r.take(stored, given);
  EXPECT_EQ(stored.steps, given.steps);
  EXPECT_EQ(stored.threads, 3);
  EXPECT_EQ(stored.device, torch::Device(torch::kCUDA));
  EXPECT_TRUE(stored.resume);
  EXPECT_FALSE(stored.overwrite);
}

// ---- the multi-tensor optimiser step against LibTorch's own

namespace {
// Three parameters with gradients, one without (it must keep no state), reproducible.
std::vector<torch::Tensor> toy_params(uint64_t seed) {
  torch::manual_seed(int64_t(seed));
  std::vector<torch::Tensor> p = {torch::randn({4, 3}), torch::randn({5}), torch::randn({2, 2, 3, 3}), torch::randn({3})};
  for (auto& t : p) t.requires_grad_(true);
  return p;
}
void set_grads(std::vector<torch::Tensor>& p, int64_t k) {
  for (size_t i = 0; i + 1 < p.size(); ++i)
    p[i].mutable_grad() = torch::sin(torch::arange(p[i].numel(), torch::kFloat32) * double(k + 1) + double(i))
                              .view(p[i].sizes()) * 3.0;
}
}  // namespace

TEST(OptimizerStep, AdamwEqualsLibTorchsAndItsStateCarriesOver) {
  auto options = torch::optim::AdamWOptions(1e-2).betas({0.9, 0.99}).eps(1e-8).weight_decay(0.1);
  auto a = toy_params(3), b = toy_params(3);
  torch::optim::AdamW ref(a, options), mine(b, options);
  for (int64_t k = 0; k < 3; ++k) {
    const double lr = 1e-2 * double(k + 1);
    set_grads(a, k);
    set_grads(b, k);
    static_cast<torch::optim::AdamWOptions&>(ref.param_groups()[0].options()).lr(lr);
    ref.step();
    diffuse::detail::adamw_step(mine, lr);
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
  EXPECT_EQ(mine.state().size(), 3u);  // the gradient-less parameter has none, as in LibTorch
  // LibTorch's step() and its serialisation find the state adamw_step kept: a fourth step by each agrees.
  std::stringstream saved;
  torch::save(mine, saved);
  auto c = toy_params(3);
  for (size_t i = 0; i < c.size(); ++i) c[i].data().copy_(b[i]);
  torch::optim::AdamW reloaded(c, options);
  torch::load(reloaded, saved);
  set_grads(a, 3);
  set_grads(c, 3);
  for (auto* opt : {&ref, &reloaded}) static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options()).lr(4e-2);
  ref.step();
  reloaded.step();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], c[i])) << "parameter " << i;
}

TEST(OptimizerStep, ClippingIsClipGradNorm) {
  for (double max_norm : {0.5, 1e6, std::numeric_limits<double>::infinity()}) {
    auto a = toy_params(4), b = toy_params(4);
    set_grads(a, 1);
    set_grads(b, 1);
    const double ref = torch::nn::utils::clip_grad_norm_(a, max_norm);
    auto norm = diffuse::detail::clip_gradients(b, max_norm);
    EXPECT_NEAR(norm.item<double>(), ref, 1e-5 * ref);
    for (size_t i = 0; i + 1 < a.size(); ++i)
      EXPECT_LT((a[i].grad() - b[i].grad()).abs().max().item<double>(), 1e-6) << "max_norm " << max_norm;
  }
}

TEST(OptimizerStep, EmaIsTheWarmedUpAverage) {
  torch::nn::Linear model(3, 2), ema(3, 2);
  {
    torch::NoGradGuard ng;
    for (auto& p : ema->parameters()) p.fill_(1.0);
  }
  auto before = ema->weight.clone();
  diffuse::detail::update_ema(*ema, *model, 0.9999, 5);  // d = min(0.9999, 6 / 15) = 0.4
  EXPECT_TRUE(torch::allclose(ema->weight, 0.4 * before + 0.6 * model->weight, 1e-6, 1e-7));
}

// --resume trains with the options its checkpoint was trained with: an edited run.json (prediction, lr, seed, ...)
// is refused naming the keys, and so is a state.json whose step disagrees with the optimizer state beside it.
TEST(Train, ResumeRefusesAnEditedRunJsonOrARewoundStep) {
  TempDir dir;
  const std::string run = dir / "run";
  auto r = diffuse::testing::run_cli("train --data synthetic-shapes --synthetic-count 32 --size 16 --channels 8,16 "
                                     "--attention-levels none --layers-per-block 1 --norm-groups 4 --batch 8 --steps 2 "
                                     "--quiet --out " + run);
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string run_json = read_file(run + "/run.json"), state_json = read_file(run + "/train_state/state.json");
  auto edited = parse_json(run_json);
  edited["prediction"] = "v";
  edited["loop"]["seed"] = 7;
  write_file_atomic(run + "/run.json", edited.dump(2));
  r = diffuse::testing::run_cli("train --out " + run + " --resume --steps 3 --quiet");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("prediction"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("loop.seed"), std::string::npos) << r.output;
  write_file_atomic(run + "/run.json", run_json);
  auto rewound = parse_json(state_json);
  rewound["step"] = 1;
  rewound["batch_in_epoch"] = 1;
  write_file_atomic(run + "/train_state/state.json", rewound.dump(2));
  r = diffuse::testing::run_cli("train --out " + run + " --resume --steps 3 --quiet");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("optimizer state has taken 2 steps"), std::string::npos) << r.output;
  write_file_atomic(run + "/train_state/state.json", state_json);
  r = diffuse::testing::run_cli("train --out " + run + " --resume --steps 3 --quiet");
  EXPECT_EQ(r.code, 0) << r.output;
}

// run.json's numbers go through the same checked conversions as every config: 1e300 or 2.5 for an integer, a
// negative seed, a string for a number are refused naming the key (1e300 was undefined behaviour, found by
// fuzz/fuzz_json_configs under UBSan).
TEST(Train, RunJsonNumbersAreCheckedByKey) {
  for (const auto& [text, key] : std::vector<std::pair<std::string, std::string>>{
           {R"({"loop": {"batch": 1e300}})", "batch"},
           {R"({"loop": {"steps": 2.5}})", "steps"},
           {R"({"loop": {"seed": -1}})", "seed"},
           {R"({"loop": {"threads": 4294967296}})", "threads"},
           {R"({"loop": {"lr": "fast"}})", "lr"},
           {R"({"data": {"size": 1e19}})", "size"},
           {R"({"schedule": {"T": true}})", "T"}}) {
    auto msg = error_of([&] { TrainOptions::from_json(nlohmann::json::parse(text)); });
    EXPECT_NE(msg.find("'" + key + "'"), std::string::npos) << text << ": " << msg;
  }
  EXPECT_EQ(TrainOptions::from_json(nlohmann::json::parse(R"({"loop": {"batch": 8.0, "seed": 18446744073709551615}})"))
                .loop.seed,
            18446744073709551615ull);
}
