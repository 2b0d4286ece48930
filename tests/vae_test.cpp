#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <torch/torch.h>

#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/data/data.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/train/train.h"
#include "diffuse/models/vae.h"
#include "cli_util.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::TempDir;
using diffuse::testing::expect_error;
using diffuse::testing::expect_names_and_shapes;

namespace {

const std::string kVaeDir = std::string(DIFFUSE_FIXTURES) + "/diffusers/vae";
const std::string kVaeIo = std::string(DIFFUSE_FIXTURES) + "/diffusers/vae_io.safetensors";
const std::string kUnetDir = std::string(DIFFUSE_FIXTURES) + "/diffusers/unet";

AutoencoderKLConfig fixture_config() { return AutoencoderKLConfig::from_json(load_json(kVaeDir + "/config.json")); }

bool fs_exists(const std::string& p) { return std::filesystem::exists(p); }

double max_abs(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Overwrites quant_conv so that the posterior no longer depends on the image: every latent of channel c has
// mean means[c] and log-variance logvars[c] (quant_conv's weight is zeroed, its bias holds the moments).
void constant_posterior(AutoencoderKL& model, const std::vector<double>& means, const std::vector<double>& logvars) {
  auto sd = state_dict(*model);
  torch::NoGradGuard no_grad;
  std::vector<double> bias(means);
  bias.insert(bias.end(), logvars.begin(), logvars.end());
  sd.at("quant_conv.weight").zero_();
  sd.at("quant_conv.bias").copy_(torch::tensor(bias, torch::kFloat32));
}

}  // namespace

TEST(Vae, StateDictNamesAndShapesEqualDiffusers) {
  auto reference = load_safetensors(kVaeDir + "/diffusion_pytorch_model.safetensors");
  AutoencoderKL model(fixture_config());
  auto ours = state_dict(*model);
  ASSERT_NO_FATAL_FAILURE(expect_names_and_shapes(ours, reference));
  EXPECT_TRUE(ours.count("encoder.down_blocks.0.downsamplers.0.conv.weight"));
  EXPECT_TRUE(ours.count("decoder.up_blocks.0.upsamplers.0.conv.weight"));
  EXPECT_TRUE(ours.count("decoder.mid_block.attentions.0.group_norm.weight"));
}

TEST(Vae, EncodeDecodeMatchDiffusers) {
  auto io = load_safetensors(kVaeIo);
  auto model = load_vae(kVaeDir, torch::kCPU);
  for (bool grad : {false, true}) {  // the in-place (no autograd) and the autograd code paths
    torch::AutoGradMode mode(grad);
    auto posterior = model->encode(io["x"]);
    auto decoded = model->decode(io["z"]);
    EXPECT_LT(max_abs(posterior.mean, io["posterior_mean"]), 1e-5) << "grad " << grad;
    EXPECT_LT(max_abs(posterior.logvar, io["posterior_logvar"]), 1e-5) << "grad " << grad;
    EXPECT_LT(max_abs(decoded, io["decoded"]), 1e-5) << "grad " << grad;
    EXPECT_LT(max_abs(posterior.std, (0.5 * io["posterior_logvar"]).exp()), 1e-5);
    EXPECT_TRUE(torch::equal(posterior.mode(), posterior.mean));
    if (!grad)
      std::cout << "max abs difference to diffusers 0.25: mean " << max_abs(posterior.mean, io["posterior_mean"])
                << ", logvar " << max_abs(posterior.logvar, io["posterior_logvar"]) << ", decoded "
                << max_abs(decoded, io["decoded"]) << "\n";
  }
  // The references are not trivially small.
  EXPECT_GT(io["posterior_mean"].abs().max().item<double>(), 0.1);
  EXPECT_GT(io["decoded"].abs().max().item<double>(), 0.1);
  EXPECT_EQ(model->config().scaling_factor, 0.5);
  // Scaled latents: decode_scaled(z * f) = decode(z).
  torch::NoGradGuard no_grad;
  EXPECT_LT(max_abs(model->decode_scaled(io["z"] * 0.5), io["decoded"]), 1e-5);
}

TEST(Vae, ConfigRoundTrip) {
  auto json = load_json(kVaeDir + "/config.json");
  json["my_extension"] = {{"kept", true}};
  auto config = AutoencoderKLConfig::from_json(json);
  EXPECT_EQ(config.block_out_channels, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(config.latent_channels, 4);
  EXPECT_EQ(config.norm_num_groups, 8);
  EXPECT_EQ(config.scaling_factor, 0.5);
  EXPECT_EQ(config.downsample_factor(), 2);
  auto out = config.to_json();
  EXPECT_EQ(out["my_extension"]["kept"], true);
  EXPECT_EQ(out["_class_name"], "AutoencoderKL");
  EXPECT_FALSE(out.contains("_use_default_values"));
  EXPECT_FALSE(out.contains("mid_block_add_attention"));  // not a diffusers 0.25 key: written only when set
  for (const auto& [key, value] : json.items())
    if (key != "_use_default_values") EXPECT_EQ(out[key], value) << key;
  EXPECT_EQ(AutoencoderKLConfig::from_json(out), config);
  auto defaults = AutoencoderKLConfig::from_json(nlohmann::json::object());
  EXPECT_EQ(defaults.block_out_channels, (std::vector<int64_t>{64}));
  EXPECT_EQ(defaults.scaling_factor, 0.18215);
  EXPECT_EQ(defaults.in_channels, 3);
  EXPECT_TRUE(defaults.force_upcast);
}

TEST(Vae, RefusesUnsupportedConfigs) {
  auto bad = [](const char* key, nlohmann::json value) {
    auto json = load_json(kVaeDir + "/config.json");
    json[key] = value;
    expect_error([&] { AutoencoderKL model(AutoencoderKLConfig::from_json(json)); }, key);
  };
  bad("down_block_types", {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"});
  bad("up_block_types", {"UpDecoderBlock2D"});
  bad("act_fn", "gelu");
  bad("norm_num_groups", 5);
  bad("latent_channels", 0);
  bad("layers_per_block", "two");
  bad("scaling_factor", -1.0);
  bad("block_out_channels", 32);
}

TEST(Vae, ArchitectureSwitchesOfLaterDiffusers) {
  auto config = fixture_config();
  config.mid_block_add_attention = false;
  config.use_quant_conv = false;
  config.use_post_quant_conv = false;
  AutoencoderKL model(config);
  auto sd = state_dict(*model);
  EXPECT_FALSE(sd.count("encoder.mid_block.attentions.0.to_q.weight"));
  EXPECT_FALSE(sd.count("quant_conv.weight"));
  EXPECT_FALSE(sd.count("post_quant_conv.weight"));
  EXPECT_EQ(model->config().to_json()["use_quant_conv"], false);
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 1, 16, 16});
  EXPECT_EQ(model->encode(x).mean.sizes(), (std::vector<int64_t>{2, 4, 8, 8}));
  EXPECT_EQ(model->forward(x).sizes(), x.sizes());
}

TEST(Vae, SaveThenLoadGivesIdenticalOutputs) {
  auto io = load_safetensors(kVaeIo);
  auto model = load_vae(kVaeDir, torch::kCPU);
  model->set_scaling_factor(0.731);
  TempDir tmp;
  auto dir = tmp.str();
  save_vae(model, dir + "/vae");
  auto again = load_vae(dir + "/vae", torch::kCPU);
  EXPECT_EQ(again->config(), model->config());
  EXPECT_EQ(again->config().scaling_factor, 0.731);
  auto written = load_safetensors(dir + "/vae/diffusion_pytorch_model.safetensors");
  auto reference = load_safetensors(kVaeDir + "/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(written.size(), reference.size());
  for (const auto& [name, t] : reference) EXPECT_TRUE(torch::equal(written.at(name), t)) << name;
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(again->encode(io["x"]).mean, model->encode(io["x"]).mean));
  EXPECT_TRUE(torch::equal(again->encode(io["x"]).logvar, model->encode(io["x"]).logvar));
  EXPECT_TRUE(torch::equal(again->decode(io["z"]), model->decode(io["z"])));
  EXPECT_FALSE(std::filesystem::exists(dir + "/vae/config.json.tmp" + std::to_string(getpid())));
  std::filesystem::remove_all(dir);
}

TEST(Vae, LoadErrorsNameTheProblem) {
  expect_error([] { load_vae("/nonexistent/vae", torch::kCPU); }, "config.json");
  // A UNet folder without _class_name: refused for its block types.
  expect_error([] { load_vae(kUnetDir, torch::kCPU); }, "DownEncoderBlock2D");
  TempDir tmp;
  auto dir = tmp.str();
  auto config = fixture_config();
  config.latent_channels = 8;  // the weights no longer fit
  write_file_atomic(dir + "/config.json", config.to_json().dump());
  std::filesystem::copy_file(kVaeDir + "/diffusion_pytorch_model.safetensors",
                             dir + "/diffusion_pytorch_model.safetensors");
  expect_error([&] { load_vae(dir, torch::kCPU); }, "quant_conv");
  auto json = fixture_config().to_json();
  json["_class_name"] = "UNet2DModel";
  write_file_atomic(dir + "/config.json", json.dump());
  expect_error([&] { load_vae(dir, torch::kCPU); }, "not an AutoencoderKL");
  std::filesystem::remove_all(dir);
  AutoencoderKL model(fixture_config());
  expect_error([&] { model->encode(torch::zeros({1, 3, 16, 16})); }, "[N, 1, H, W]");
  expect_error([&] { model->encode(torch::zeros({1, 1, 15, 16})); }, "divisible by 2");
  expect_error([&] { model->decode(torch::zeros({1, 1, 8, 8})); }, "[N, 4, h, w]");
  expect_error([&] { model->set_scaling_factor(0.0); }, "scaling_factor");
}

// KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - ln sigma^2) per element, summed over C, H, W.
TEST(Vae, KlClosedForm) {
  // One sample, channels (mean, logvar): (1, 0), (-2, ln 4), (0.5, -1); a second sample all zeros.
  auto moments = torch::zeros({2, 6, 1, 1});
  moments[0][0][0][0] = 1.0;
  moments[0][1][0][0] = -2.0;
  moments[0][2][0][0] = 0.5;
  moments[0][4][0][0] = std::log(4.0);
  moments[0][5][0][0] = -1.0;
  auto q = DiagonalGaussian::from_moments(moments);
  const double hand = 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - std::log(4.0)) + (0.25 + std::exp(-1.0) - 1 + 1));
  auto kl = q.kl();
  ASSERT_EQ(kl.sizes(), (std::vector<int64_t>{2}));
  EXPECT_NEAR(kl[0].item<double>(), hand, 1e-6);
  EXPECT_NEAR(kl[1].item<double>(), 0.0, 1e-12);
  // Against the standard normal as an explicit `other`.
  auto standard = DiagonalGaussian::from_moments(torch::zeros({2, 6, 1, 1}));
  EXPECT_LT(max_abs(q.kl(standard), kl), 1e-6);
  EXPECT_NEAR(standard.kl(standard)[0].item<double>(), 0.0, 1e-12);
  // logvar is clamped to [-30, 20] as in diffusers.
  auto extreme = torch::zeros({1, 2, 1, 2});
  extreme[0][1][0][0] = 25.0;
  extreme[0][1][0][1] = -40.0;
  auto clamped = DiagonalGaussian::from_moments(extreme);
  EXPECT_EQ(clamped.logvar[0][0][0][0].item<float>(), 20.0f);
  EXPECT_EQ(clamped.logvar[0][0][0][1].item<float>(), -30.0f);
}

// Monte Carlo: KL(q || p) = E_q[log q(z) - log p(z)] = E_q[nll_p(z) - nll_q(z)]; samples have q's moments.
TEST(Vae, KlAndNllAgreeWithMonteCarlo) {
  torch::manual_seed(3);
  auto moments = torch::cat({torch::randn({1, 3, 2, 2}), 0.5 * torch::randn({1, 3, 2, 2})}, 1).to(torch::kFloat64);
  auto q = DiagonalGaussian::from_moments(moments.expand({20000, 6, 2, 2}));
  auto p = DiagonalGaussian::from_moments(torch::zeros({20000, 6, 2, 2}, torch::kFloat64));
  auto gen = at::detail::createCPUGenerator(11);
  auto z = q.sample(gen);
  const double mc = (p.nll(z) - q.nll(z)).mean().item<double>();
  const double exact = q.kl()[0].item<double>();
  const double se = (p.nll(z) - q.nll(z)).std().item<double>() / std::sqrt(20000.0);
  EXPECT_NEAR(mc, exact, 5 * se) << "exact " << exact << " standard error " << se;
  EXPECT_LT(max_abs(z.mean(0), q.mean[0]), 0.05);
  EXPECT_LT(max_abs(z.std(0), q.std[0]), 0.05 * q.std.max().item<double>());
  // The same generator seed gives the same sample.
  auto again = q.sample(at::detail::createCPUGenerator(11));
  EXPECT_TRUE(torch::equal(z, again));
}

// Posterior N(m_c, exp(l)) with per-channel means m = (2.5, 4.5, 2.5, 4.5) and exp(l) = 3: the latents
// have mean 3.5 and variance (between-channel 1) + (within 3) = 4, so the scaling factor is 1 / 2.
TEST(Vae, ScalingFactorOnKnownStd) {
  AutoencoderKL model(fixture_config());
  constant_posterior(model, {2.5, 4.5, 2.5, 4.5}, std::vector<double>(4, std::log(3.0)));
  torch::manual_seed(0);
  auto images = torch::rand({64, 1, 16, 16}) * 2 - 1;
  auto stats = latent_stats(model, images, 16);
  EXPECT_EQ(stats.count, 64 * 4 * 8 * 8);
  // Standard errors: mean 2 / sqrt(16384) = 0.016, std about 0.6 %.
  EXPECT_NEAR(stats.mean, 3.5, 0.08);
  EXPECT_NEAR(stats.std, 2.0, 0.06);
  const double factor = measure_scaling_factor(model, images, 16);
  EXPECT_NEAR(factor, 0.5, 0.015);
  EXPECT_DOUBLE_EQ(factor, 1.0 / stats.std);
  // After scaling: unit std on the measured sample, and on held-out noise (another seed).
  EXPECT_NEAR(latent_stats(model, images, 16, factor).std, 1.0, 1e-9);
  EXPECT_NEAR(latent_stats(model, images, 16, factor, /*seed=*/7).std, 1.0, 0.03);
  model->set_scaling_factor(factor);
  EXPECT_EQ(model->config().scaling_factor, factor);
  EXPECT_NEAR(model->config().to_json()["scaling_factor"].get<double>(), factor, 0.0);
  // encode_scaled multiplies posterior samples by the factor (diffusers' training convention).
  torch::NoGradGuard no_grad;
  auto scaled = model->encode_scaled(images, at::detail::createCPUGenerator(5));
  EXPECT_NEAR(scaled.std().item<double>(), 1.0, 0.03);
}

// With the posterior variance clamped to exp(-30), samples equal the encoder's means: the statistics over many
// batches must equal the std of the means of all images computed at once, whatever the batch size.
TEST(Vae, LatentStatsFollowTheEncoderAndIgnoreBatching) {
  auto model = load_vae(kVaeDir, torch::kCPU);
  {
    auto sd = state_dict(*model);
    torch::NoGradGuard no_grad;
    sd.at("quant_conv.weight").narrow(0, 4, 4).zero_();
    sd.at("quant_conv.bias").narrow(0, 4, 4).fill_(-100.0);
  }
  torch::manual_seed(1);
  auto images = torch::rand({13, 1, 16, 16}) * 2 - 1;
  torch::Tensor means;
  {
    torch::NoGradGuard no_grad;
    means = model->encode(images).mean.to(torch::kFloat64);
  }
  auto all = latent_stats(model, images, 13), chunked = latent_stats(model, images, 4);
  EXPECT_NEAR(all.std, means.std().item<double>(), 1e-6 * all.std);
  EXPECT_NEAR(all.mean, means.mean().item<double>(), 1e-6);
  // float32 convolutions round differently per batch size (about 1e-7 per element).
  EXPECT_NEAR(chunked.std, all.std, 1e-6 * all.std);
  EXPECT_NEAR(chunked.mean, all.mean, 1e-6);
  EXPECT_EQ(chunked.count, all.count);
  // With the fixture's variance, the batching does not change the draws either.
  auto fresh = load_vae(kVaeDir, torch::kCPU);
  EXPECT_NEAR(latent_stats(fresh, images, 3).std, latent_stats(fresh, images, 13).std, 1e-6);
  expect_error([&] { latent_stats(fresh, images, 0); }, "batch");
  expect_error([&] { latent_stats(fresh, torch::zeros({2, 3, 16, 16}), 2); }, "images");
  AutoencoderKL broken(fixture_config());
  constant_posterior(broken, std::vector<double>(4, NAN), std::vector<double>(4, 0.0));
  expect_error([&] { measure_scaling_factor(broken, images, 4); }, "std nan");
}

// Training needs gradients through encode, the reparameterised sample and decode to every parameter.
TEST(Vae, GradientsReachEveryParameter) {
  auto model = load_vae(kVaeDir, torch::kCPU);
  torch::manual_seed(2);
  auto x = torch::rand({2, 1, 16, 16}) * 2 - 1;
  auto posterior = model->encode(x);
  auto recon = model->decode(posterior.sample(at::detail::createCPUGenerator(0)));
  auto loss = (recon - x).abs().mean() + 1e-3 * posterior.kl().mean();
  loss.backward();
  for (const auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    // softmax(q . (k + b)) does not depend on the key bias b: its gradient is zero up to rounding.
    if (p.key().find("to_k.bias") == std::string::npos)
      EXPECT_GT(p.value().grad().abs().max().item<double>(), 0) << p.key();
  }
}

TEST(Vae, PsnrClosedForm) {
  auto x = torch::zeros({2, 1, 4, 4});
  auto y = x.clone();
  y[0].fill_(0.125);  // exact in float32: MSE 1/64 over the range 2 gives 10 log10(4 * 64)
  auto p = psnr(x, y);
  EXPECT_NEAR(p[0].item<double>(), 10.0 * std::log10(256.0), 1e-12);
  EXPECT_TRUE(std::isinf(p[1].item<double>()));
  EXPECT_NEAR(psnr(x, y, 1.0)[0].item<double>(), 10.0 * std::log10(64.0), 1e-12);
}

namespace {

const Dataset& shapes16() {
  static Dataset d = make_shapes(192, 16, 21);
  return d;
}

VaeTrainOptions tiny_vae_options(const std::string& out, int64_t steps) {
  VaeTrainOptions o;
  auto& v = o.vae;
  v.in_channels = v.out_channels = 1;
  v.sample_size = 16;
  v.block_out_channels = {16, 32};
  v.down_block_types.assign(2, "DownEncoderBlock2D");
  v.up_block_types.assign(2, "UpDecoderBlock2D");
  v.norm_num_groups = 8;
  o.scale_images = 64;
  o.loop.out = out;
  o.loop.steps = steps;
  o.loop.batch = 8;
  o.loop.lr = 3e-3;
  o.loop.warmup = 2;
  o.loop.progress = false;
  o.loop.checkpoint_every = 1000;
  o.loop.log_every = 10;
  o.loop.threads = 1;  // ctest runs two test processes on two cores
  return o;
}

}  // namespace

// A short run on generated shapes: held-out PSNR rises above a floor, the run folder is complete and every
// saved model carries the scaling factor of its own latents.
TEST(VaeTrain, ReconstructionImprovesAndFactorIsStored) {
  diffuse::testing::TempDir dir;
  auto o = tiny_vae_options(dir / "run", 60);
  auto heldout = make_shapes(64, 16, 99);
  torch::manual_seed(o.loop.seed);
  AutoencoderKL init(o.vae);
  const double before = reconstruction_stats(init, heldout.images, 32).psnr;
  std::ostringstream report;
  auto r = train_vae(o, shapes16(), heldout, &report);
  EXPECT_EQ(r.step, 60);
  auto trained = load_vae(dir / "run/vae", torch::kCPU);
  const double after = reconstruction_stats(trained, heldout.images, 32).psnr;
  std::cout << "held-out PSNR " << before << " dB at init, " << after << " dB after 60 steps\n" << report.str();
  EXPECT_GT(after, before + 5.0);
  EXPECT_GT(after, 15.0);  // 9 dB at init, 18 dB measured after these 60 steps
  for (std::string f : {"run.json", "vae/config.json", "vae_ema/diffusion_pytorch_model.safetensors",
                        "train_state/state.json", "log.csv", "loss.png", "reconstruction.csv"})
    EXPECT_TRUE(fs_exists(dir / ("run/" + f))) << f;
  EXPECT_FALSE(fs_exists(dir / "run/scheduler"));
  EXPECT_NE(report.str().find("PSNR"), std::string::npos);
  // The stored factor is 1 / std of the latents of the evenly spaced training images it was measured on.
  auto sample = shapes16().images.index_select(0, torch::linspace(0, 191, 64, torch::kFloat64).round().to(torch::kInt64));
  EXPECT_DOUBLE_EQ(trained->config().scaling_factor, measure_scaling_factor(trained, sample, o.loop.batch, o.loop.seed));
  EXPECT_NE(trained->config().scaling_factor, load_vae(dir / "run/vae_ema", torch::kCPU)->config().scaling_factor);
  // Scaled held-out latents have about unit std (reconstruction.csv).
  std::ifstream csv(dir / "run/reconstruction.csv");
  std::string header, line;
  std::getline(csv, header);
  EXPECT_EQ(header, "model,psnr,mse,l1,latent_mean,latent_std,scaling_factor,scaled_latent_mean,scaled_latent_std,images");
  std::getline(csv, line);
  const double scaled_std = std::stod(line.substr(line.rfind(',', line.rfind(',') - 1) + 1));
  EXPECT_NEAR(scaled_std, 1.0, 0.25) << line;
  // No timestep columns in the autoencoder's log.
  std::ifstream log(dir / "run/log.csv");
  std::getline(log, header);
  EXPECT_EQ(header, "step,loss,lr,images_per_s,grad_norm");
}

TEST(VaeTrain, ResumeEqualsUninterruptedBitForBit) {
  diffuse::testing::TempDir dir;
  auto make = [&](const std::string& out) {
    auto o = tiny_vae_options(out, 6);
    o.reconstruction = diffuse::Reconstruction::l2;
    o.kl_weight = 1e-3;
    o.loop.hflip = true;
    o.loop.seed = 4;
    return o;
  };
  train_vae(make(dir / "a"), shapes16(), {});
  TrainHooks stop_at_3;
  stop_at_3.on_step = [](const TrainStepInfo& s) {
    if (s.step == 3) std::raise(SIGINT);
  };
  auto first = train_vae(make(dir / "b"), shapes16(), {}, nullptr, stop_at_3);
  EXPECT_TRUE(first.interrupted);
  auto o = make(dir / "b");
  o.loop.resume = true;
  EXPECT_EQ(train_vae(o, shapes16(), {}).step, 6);
  for (std::string m : {"vae", "vae_ema"}) {
    auto a = load_safetensors(dir / ("a/" + m + "/diffusion_pytorch_model.safetensors"));
    auto b = load_safetensors(dir / ("b/" + m + "/diffusion_pytorch_model.safetensors"));
    for (const auto& [name, t] : a) EXPECT_TRUE(torch::equal(t, b.at(name))) << m << " " << name;
    EXPECT_EQ(read_file(dir / ("a/" + m + "/config.json")), read_file(dir / ("b/" + m + "/config.json")));
  }
  auto changed = make(dir / "b");
  changed.loop.resume = true;
  changed.kl_weight = 1.0;
  EXPECT_NE(diffuse::testing::error_of([&] { train_vae(changed, shapes16(), {}); }).find("kl_weight"), std::string::npos);
}

TEST(VaeTrain, ImpossibleOptionsAreRefused) {
  diffuse::testing::TempDir dir;
  auto refused = [&](VaeTrainOptions o, const std::string& what) {
    EXPECT_NE(diffuse::testing::error_of([&] { train_vae(o, shapes16(), {}); }).find(what), std::string::npos) << what;
  };
  EXPECT_NE(diffuse::testing::error_of([] { diffuse::parse_reconstruction("l3"); }).find("--reconstruction"),
            std::string::npos);
  auto o = tiny_vae_options(dir / "run", 1);
  o.kl_weight = -1;
  refused(o, "--kl-weight");
  o = tiny_vae_options(dir / "run", 1);
  o.vae.sample_size = 32;
  refused(o, "does not fit");
  o = tiny_vae_options(dir / "run", 1);
  o.vae.block_out_channels = {16, 32, 32, 32, 32, 32};
  o.vae.down_block_types.assign(6, "DownEncoderBlock2D");
  o.vae.up_block_types.assign(6, "UpDecoderBlock2D");
  refused(o, "divisible by 32");
}

TEST(TrainVaeCli, TrainsReportsAndRefuses) {
  diffuse::testing::TempDir dir;
  std::string common = "--data synthetic-shapes --synthetic-count 96 --size 16 --channels 16,32 --norm-groups 8 "
                       "--batch 8 --heldout 16 --scale-images 16 --threads 1 --quiet --out " + dir / "run";
  auto r = diffuse::testing::run_cli("train-vae " + common + " --steps 2");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("PSNR"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("latents 4x8x8"), std::string::npos) << r.output;
  EXPECT_TRUE(fs_exists(dir / "run/vae/config.json"));
  EXPECT_EQ(load_json(dir / "run/vae/config.json")["_class_name"], "AutoencoderKL");
  r = diffuse::testing::run_cli("train-vae --out " + dir / "run" + " --resume --kl-weight 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--kl-weight cannot be given with --resume"), std::string::npos) << r.output;
  r = diffuse::testing::run_cli("train-vae --out " + dir / "run" + " --resume --steps 3 --threads 1 --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(checkpoint_step(dir / "run"), 3);
  r = diffuse::testing::run_cli("train-vae --help");
  for (std::string opt : {"--kl-weight", "--reconstruction", "--latent-channels", "--scale-images", "--channels"})
    EXPECT_NE(r.output.find(opt), std::string::npos) << opt;
  EXPECT_EQ(r.output.find("--attention-levels"), std::string::npos);
}
