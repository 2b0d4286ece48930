// The library's generation pipeline (diffuse/sample/pipeline.h): the same images as the samplers driven by hand, and
// as `diffuse sample`; the model folder's layouts.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "diffuse/core/scheduler_class.h"
#include "diffuse/io/image_io.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/io/safetensors.h"
#include "sample/graphed_network.h"
#include "test_util.h"
#include "util/cuda_graph.h"
#include <torch/torch.h>

using namespace diffuse;
using diffuse::testing::fixture;
namespace fs = std::filesystem;

namespace {
LoadedRun fixture_run() {
  LoadOptions lo;
  lo.scheduler_file = fixture("scheduler/fixed_scheduler_config.json");
  lo.vae = "none";  // the fixture folder's vae/ belongs to another model
  return load_run(fixture("diffusers/unet"), lo);
}

// The plain denoiser generate() wraps for `out` (its labels), for sampling the same images by hand.
Denoiser plain_denoiser(const LoadedRun& run, const Generated& out) {
  const auto& s = run.scheduler;
  auto labels = run.class_embeds > 0 ? torch::tensor(out.labels, torch::kLong) : torch::Tensor();
  return make_denoiser(run.network(), s.prediction_type, s.schedule(), s.etsdm, labels);
}

// Two images in three steps of `sampler` from `seed`, and the sampler options and x_T that redo them by hand.
GenerateOptions two_images(const std::string& sampler, uint64_t seed) {
  GenerateOptions g;
  g.sampler = sampler;
  g.steps = 3;
  g.n = 2;
  g.seed = seed;
  return g;
}
SamplerOptions by_hand_options(const GenerateOptions& g, bool to_clean_data) {
  SamplerOptions so;
  so.set_alpha_to_one = to_clean_data;
  so.seed = g.seed;
  return so;
}
// The network times generate() walked, as the integer timesteps they are with an integer spacing.
std::vector<int64_t> integer_times(const Generated& out) {
  std::vector<int64_t> ts;
  for (double t : out.timesteps) ts.push_back(int64_t(t));
  return ts;
}
torch::Tensor initial_noise(const LoadedRun& run, const GenerateOptions& g) {
  return make_noise({run.channels, run.height, run.width}, g.n, g.seed, 0);
}
}  // namespace

// generate() is make_noise by image index -> CFG network -> denoiser -> sampler, batch by batch: the same
// numbers as those parts called by hand, whatever the batch size.
TEST(Pipeline, GenerateEqualsThePartsByHandForAnyBatchSize) {
  auto run = fixture_run();
  GenerateOptions g;
  g.sampler = "dpmpp_2m";
  g.steps = 4;
  g.n = 3;
  g.cfg = 3;
  g.cfg_rescale = 0.7;
  g.seed = 5;
  g.batch = 2;
  int64_t calls = 0, last_total = 0;
  g.progress = [&](const GenerateProgress& p) {
    ++calls;
    last_total = p.total;
    EXPECT_EQ(p.done, calls);
  };
  auto a = generate(run, g);
  EXPECT_EQ(calls, 8);  // 2 batches x 4 steps
  EXPECT_EQ(last_total, 8);
  // The total is the sampler's own count: PLMS reports S + 1 steps (S + 1 network calls), PNDM S.
  for (auto [sampler, per_batch] : {std::pair<const char*, int64_t>{"plms", 5}, {"pndm", 4}}) {
    GenerateOptions p = g;
    p.sampler = sampler;
    p.cfg = 1;
    p.spacing = Spacing::leading;  // the fixture's schedule has zero terminal SNR, where PNDM cannot start
    calls = 0;
    generate(run, p);
    EXPECT_EQ(calls, 2 * per_batch) << sampler;
    EXPECT_EQ(last_total, 2 * per_batch) << sampler;
  }
  g.batch = 3;
  g.progress = nullptr;
  auto b = generate(run, g);
  EXPECT_LT((a.images - b.images).abs().max().item<double>(), 1e-5);
  EXPECT_EQ(a.labels, (std::vector<int64_t>{0, 1, 2}));

  torch::NoGradGuard ng;
  const auto& s = run.scheduler;
  auto net = classifier_free_guidance(run.network(), {3.0, 0.7, run.class_embeds - 1});
  auto d = make_denoiser(net, s.prediction_type, s.schedule(), s.etsdm, torch::tensor({0, 1, 2}, torch::kLong));
  SamplerOptions so;
  so.set_alpha_to_one = true;  // DPMSolverMultistepScheduler without final_sigmas_type ends at the clean data
  so.seed = 5;
  auto ts = spaced_timesteps(s.schedule().T(), 4, s.timestep_spacing,
                             s.timestep_spacing == Spacing::leading ? s.steps_offset : 0);
  EXPECT_EQ(integer_times(b), ts);
  auto by_hand = sample_dpmpp_2m(d, ts, make_noise({run.channels, run.height, run.width}, 3, 5, 0), so);
  EXPECT_TRUE(torch::equal(b.images, by_hand));
}

// The CLI is the pipeline plus files: its raw output equals generate()'s.
TEST(Pipeline, SampleCommandWritesWhatGenerateReturns) {
  diffuse::testing::TempDir dir;
  auto r = diffuse::testing::run_cli("sample --model " + fixture("diffusers/unet") + " --scheduler " +
                                     fixture("scheduler/fixed_scheduler_config.json") +
                                     " --vae none --sampler ddim --steps 3 --n 2 --seed 9 --quiet --out " +
                                     (dir / "s") + " --save-raw " + (dir / "raw.safetensors"));
  ASSERT_EQ(r.code, 0) << r.output;
  GenerateOptions g;
  g.steps = 3;
  g.n = 2;
  g.seed = 9;
  auto out = generate(fixture_run(), g);
  // Equal up to the thread count's rounding (the CLI picks its own; the network's kernels split work by it).
  const auto raw = load_safetensors((dir / "raw.safetensors")).at("sample");
  EXPECT_LT((raw - out.images).abs().max().item<double>(), 1e-5);
}

// The documented example program loads a model folder and writes a grid.
TEST(Pipeline, ExampleProgramWritesAGrid) {
  diffuse::testing::TempDir dir;
  fs::create_directories(dir / "model");
  fs::copy(fixture("diffusers/unet"), dir / "model", fs::copy_options::recursive);
  fs::copy_file(fixture("scheduler/fixed_scheduler_config.json"), dir / "model/scheduler_config.json");
  const std::string png = (dir / "grid.png");
  auto code = std::system((std::string(DIFFUSE_EXAMPLE_GENERATE_GRID) + " " + (dir / "model") + " " + png +
                           " > /dev/null 2>&1").c_str());
  EXPECT_EQ(code, 0);
  EXPECT_GT(fs::file_size(png), 100u);
}

TEST(Pipeline, ModelFolderLayouts) {
  diffuse::testing::TempDir dir;
  auto touch = [](const fs::path& p) {
    fs::create_directories(p.parent_path());
    std::ofstream(p) << "{}";
  };
  // A diffuse run: EMA preferred, raw on request; scheduler/ and vae/ inside.
  touch(dir / "run/unet/config.json");
  touch(dir / "run/unet_ema/config.json");
  touch(dir / "run/scheduler/scheduler_config.json");
  ModelFolder run(dir / "run");
  EXPECT_EQ(run.unet(), (dir / "run/unet_ema"));
  EXPECT_EQ(run.unet("raw"), (dir / "run/unet"));
  EXPECT_EQ(run.scheduler_config(), (dir / "run/scheduler/scheduler_config.json"));
  EXPECT_EQ(run.vae(), "");
  touch(dir / "run/vae/config.json");
  EXPECT_EQ(run.vae(), (dir / "run/vae"));
  diffuse::testing::expect_error([&] { run.unet("best"); }, "not one of auto, ema, raw");
  // A diffusers pipeline's unet/: the scheduler and the VAE are its siblings, the VAE only with model_index.json.
  touch(dir / "pipe/unet/config.json");
  touch(dir / "pipe/scheduler/scheduler_config.json");
  touch(dir / "pipe/vae/config.json");
  ModelFolder unet(dir / "pipe/unet");
  EXPECT_EQ(unet.unet(), (dir / "pipe/unet"));
  EXPECT_EQ(unet.scheduler_config(), (dir / "pipe/scheduler/scheduler_config.json"));
  EXPECT_EQ(unet.vae(), "");
  touch(dir / "pipe/model_index.json");
  EXPECT_EQ(unet.vae(), (dir / "pipe/vae"));
  diffuse::testing::expect_error([&] { ModelFolder(dir / "nothing").unet(); }, "does not exist");
  diffuse::testing::expect_error([&] { ModelFolder(dir / "nothing").scheduler_config(); }, "no scheduler_config.json");
}

// Where the last step ends is the sampler's diffusers class's business, not set_alpha_to_one's alone (issue:
// SDXL's config with --sampler euler was 0.084 off diffusers).
TEST(Pipeline, FinalStepFollowsTheSamplersDiffusersClass) {
  SchedulerConfig c;
  c.set_alpha_to_one = false;
  EXPECT_FALSE(final_step_to_clean_data("ddim", c));
  for (const char* s : {"ddpm", "euler", "euler_a", "euler_ancestral", "heun"}) EXPECT_TRUE(final_step_to_clean_data(s, c)) << s;
  EXPECT_TRUE(final_step_to_clean_data("dpmpp_2m", c));       // diffusers 0.26 on: final_sigmas_type "zero"
  c.set_alpha_to_one = true;
  EXPECT_TRUE(final_step_to_clean_data("ddim", c));
  EXPECT_TRUE(final_step_to_clean_data("dpmpp_2m_sde", c));   // whatever set_alpha_to_one says
  c.extra["final_sigmas_type"] = "zero";
  EXPECT_TRUE(final_step_to_clean_data("dpmpp_2m", c));
  c.extra["final_sigmas_type"] = "sigma_min";
  EXPECT_FALSE(final_step_to_clean_data("dpmpp_2m", c));
  c.extra["final_sigmas_type"] = "denoised";
  diffuse::testing::expect_error([&] { final_step_to_clean_data("dpmpp_2m", c); }, "final_sigmas_type");

  // generate() uses it: Euler on a config with set_alpha_to_one false still ends at the clean data.
  auto run = fixture_run();
  run.scheduler.set_alpha_to_one = false;
  const auto g = two_images("euler", 4);
  auto out = generate(run, g);
  torch::NoGradGuard ng;
  auto by_hand = sample_euler(plain_denoiser(run, out), integer_times(out), initial_noise(run, g), by_hand_options(g, true));
  EXPECT_TRUE(torch::equal(out.images, by_hand));
}

// The class table and the sampler table agree: each class's samplers exist and name that class as their own; every
// sampler diffuse has is some class's own but diffuse's angle-space heun; a config of each implemented class is
// sampled by its record's sampler (DPM-Solver and PNDM by their keys).
TEST(SchedulerClasses, OneRecordPerClassAgreesWithTheSamplerTable) {
  for (const auto& c : scheduler_classes()) {
    for (const auto& s : c.samplers) {
      EXPECT_NO_THROW(get_sampler(s)) << c.name << " " << s;
      ASSERT_NE(class_of_sampler(s), nullptr) << s;
      EXPECT_EQ(class_of_sampler(s)->name, c.name) << s;
      // A class whose walk may end on its own last level: its samplers take that zero-length step.
      if (c.end != ClassEnd::clean) EXPECT_TRUE(takes_zero_length_end(s)) << c.name << " " << s;
    }
    SchedulerConfig config;
    config.extra["_class_name"] = c.name;
    if (c.sampler.empty()) {
      EXPECT_THROW(sampler_for(config), std::invalid_argument) << c.name;
      continue;
    }
    if (c.name != "PNDMScheduler") EXPECT_EQ(sampler_for(config), c.sampler) << c.name;
    EXPECT_EQ(find_scheduler_class(c.name), &c);
  }
  for (const auto& name : sampler_names())
    if (name != "heun") EXPECT_NE(class_of_sampler(name), nullptr) << name;
  EXPECT_EQ(class_of_sampler("heun"), nullptr);
  EXPECT_EQ(find_scheduler_class("DEISMultistepScheduler"), nullptr);
  EXPECT_TRUE(other_noise_process("EDMEulerScheduler"));
}

// init_noise_sigma and add_noise as diffusers 0.40's EulerDiscreteScheduler gives them (scaled_linear, 10 steps,
// steps_offset 1; x0 = [0.5, -0.25], noise = [1, 2] at the 4th timestep), and the variance-preserving classes' closed
// form.
TEST(Pipeline, InitialNoiseAndAddNoiseFollowTheClass) {
  SchedulerConfig c;
  c.beta_schedule = "scaled_linear";
  c.beta_start = 0.00085;
  c.beta_end = 0.012;
  c.steps_offset = 1;
  c.extra["_class_name"] = "EulerDiscreteScheduler";
  const auto x0 = torch::tensor({0.5, -0.25}, torch::kFloat64), noise = torch::tensor({1.0, 2.0}, torch::kFloat64);
  struct Want {
    Spacing spacing;
    double t0, init_noise_sigma, t3;
    std::vector<double> noised;
  };
  for (const auto& w : {Want{Spacing::linspace, 999, 14.614646911621094, 666, {3.4183084964752197, 5.5866169929504395}},
                        Want{Spacing::leading, 901, 8.450066566467285, 601, {2.7928547859191895, 4.335709571838379}}}) {
    c.timestep_spacing = w.spacing;
    Level end;
    const auto levels = sampling_levels(c, "euler", 10, std::nullopt, end);
    ASSERT_EQ(levels[0].t, w.t0);
    ASSERT_EQ(levels[3].t, w.t3);
    // x = a z: diffusers' z_T = init_noise_sigma n is x_T = a init_noise_sigma n.
    EXPECT_NEAR(initial_noise_scale(c, levels[0]) / levels[0].a, w.init_noise_sigma, 2e-6 * w.init_noise_sigma);
    const auto noised = add_noise(c, x0, noise, levels[3]);
    for (int i = 0; i < 2; ++i) EXPECT_NEAR(noised[i].item<double>(), w.noised[size_t(i)], 2e-6 * w.noised[size_t(i)]);
  }
  c.extra["_class_name"] = "DDIMScheduler";
  Level end;
  const auto levels = sampling_levels(c, "ddim", 10, std::nullopt, end);
  EXPECT_EQ(initial_noise_scale(c, levels[0]), 1.0);
  EXPECT_TRUE(torch::allclose(add_noise(c, x0, noise, levels[3]), levels[3].a * x0 + levels[3].s * noise));
}

// A scheduler config's clip_sample means what DDIMScheduler.step does with it: x0 clamped, the network's eps kept
// (use_clipped_model_output = False, scheduling_ddim.py); --clip-sample recomputes eps from the clamped x0.
TEST(Pipeline, ConfigClipSampleKeepsTheModelsEps) {
  auto run = fixture_run();
  run.scheduler.clip_sample = true;
  run.scheduler.clip_sample_range = 0.05;
  run.scheduler.set_alpha_to_one = false;
  auto g = two_images("ddim", 6);
  auto from_config = generate(run, g);
  g.clip_sample = 0.05;
  auto from_option = generate(run, g);
  torch::NoGradGuard ng;
  auto d = plain_denoiser(run, from_config);
  const auto so = by_hand_options(g, false);
  const auto x_T = initial_noise(run, g);
  EXPECT_TRUE(torch::equal(from_config.images, sample_ddim(clip_x0(d, 0.05, ClipEps::keep), integer_times(from_config), x_T, so)));
  EXPECT_TRUE(torch::equal(from_option.images, sample_ddim(clip_x0(d, 0.05, ClipEps::recompute), integer_times(from_option), x_T, so)));
  EXPECT_GT((from_config.images - from_option.images).abs().max().item<double>(), 1e-3);
}

// A config whose class or keys ask for sampling diffuse does not do is refused by name, with the edit that
// samples without it (issue: thresholding gave 941, use_karras_sigmas 0.80, a flow-matching config 108).
TEST(Pipeline, RefusesSchedulerKeysAndClassesItCannotHonour) {
  SchedulerConfig c;
  EXPECT_NO_THROW(check_samplable(c));
  c.extra["thresholding"] = false;  // neutral values pass
  c.extra["use_karras_sigmas"] = false;
  c.extra["timestep_type"] = "discrete";
  c.extra["skip_prk_steps"] = true;  // changes nothing here
  EXPECT_NO_THROW(check_samplable(c));
  for (auto [key, value] : {std::pair<const char*, nlohmann::json>{"thresholding", true}, {"use_karras_sigmas", true},
                            {"timestep_type", "continuous"}, {"sigma_max", 80.0}}) {
    auto bad = c;
    bad.extra[key] = value;
    diffuse::testing::expect_error([&] { check_samplable(bad); }, key);
  }
  auto edm = c;
  edm.extra["_class_name"] = "EDMEulerScheduler";
  diffuse::testing::expect_error([&] { check_samplable(edm); }, "EDMEulerScheduler");
  // Keys of the classes diffuse samples that it does not implement, each named.
  for (auto [cls, key, value] :
       {std::tuple<const char*, const char*, nlohmann::json>{"FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", true},
        {"FlowMatchEulerDiscreteScheduler", "stochastic_sampling", true},
        {"UniPCMultistepScheduler", "predict_x0", false},
        {"UniPCMultistepScheduler", "disable_corrector", nlohmann::json::array({0})},
        {"DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"},
        {"DPMSolverMultistepScheduler", "solver_type", "heun"},
        {"DPMSolverMultistepScheduler", "lambda_min_clipped", -5.1},
        {"DDIMScheduler", "use_karras_sigmas", true}}) {
    auto bad = c;
    bad.extra["_class_name"] = cls;
    bad.extra[key] = value;
    diffuse::testing::expect_error([&] { check_samplable(bad); }, key);
  }
  auto honoured = c;  // what those classes honour passes
  honoured.extra["_class_name"] = "DPMSolverMultistepScheduler";
  honoured.extra["use_karras_sigmas"] = true;
  honoured.extra["lambda_min_clipped"] = -std::numeric_limits<double>::infinity();
  EXPECT_NO_THROW(check_samplable(honoured));
  honoured.extra["_class_name"] = "FlowMatchEulerDiscreteScheduler";
  honoured.extra.erase("use_karras_sigmas");
  honoured.extra["shift"] = 3.0;
  EXPECT_NO_THROW(check_samplable(honoured));
  // generate() checks before sampling.
  auto run = fixture_run();
  run.scheduler.extra["thresholding"] = true;
  GenerateOptions g;
  g.steps = 2;
  g.n = 1;
  diffuse::testing::expect_error([&] { generate(run, g); }, "thresholding");
}

// A model whose weights are NaN gives an error naming the weights, not black images and exit 0; an --n whose
// samples would not fit in memory is refused before sampling.
TEST(Pipeline, NonFiniteSamplesAndHugeCountsAreErrors) {
  auto run = fixture_run();
  {
    torch::NoGradGuard ng;
    run.unet->parameters()[0].fill_(std::numeric_limits<float>::quiet_NaN());
  }
  auto g = two_images("ddim", 1);
  diffuse::testing::expect_error([&] { generate(run, g); }, "NaN or infinite");
  g.n = int64_t(1e11);
  diffuse::testing::expect_error([&] { generate(run, g); }, "--n");
}

// The UNet in channels-last (NHWC) layout: the same images up to float32 summation order.
TEST(Pipeline, ChannelsLastSamplesTheSameImages) {
  auto g = two_images("dpmpp_2m", 5);
  g.n = 3;
  g.batch = 2;
  g.cfg = 2.0;
  const auto want = generate(fixture_run(), g).images;
  LoadOptions lo;
  lo.scheduler_file = fixture("scheduler/fixed_scheduler_config.json");
  lo.vae = "none";
  lo.channels_last = true;
  auto run = load_run(fixture("diffusers/unet"), lo);
  for (const auto& p : run.unet->parameters())
    if (p.dim() == 4) EXPECT_TRUE(p.is_contiguous(at::MemoryFormat::ChannelsLast));
  const auto got = generate(run, g).images;
  EXPECT_TRUE(got.is_contiguous());
  EXPECT_LT((got - want).abs().max().item<double>(), 1e-4);
}

// generate()'s graph-replayed network (detail::graphed_network): on the CPU every call runs eagerly through the
// fixed tensors of its shape; each result equals the network's and stays valid after later calls.
TEST(Pipeline, GraphedNetworkEqualsTheNetworkAndItsResultsStay) {
  Network net = [](const torch::Tensor& x, const torch::Tensor& t, const diffuse::Conditioning& conditioning) {
    const auto& labels = conditioning.labels;
    auto y = x * t.view({-1, 1, 1, 1});
    return labels.defined() ? y + labels.to(torch::kFloat32).view({-1, 1, 1, 1}) : y;
  };
  auto graphed = diffuse::detail::graphed_network(net, 1);
  std::vector<torch::Tensor> got, want;
  torch::manual_seed(3);
  for (int i = 0; i < 4; ++i)
    for (int64_t n : {2, 3}) {
      auto x = torch::randn({n, 1, 2, 2});
      auto t = torch::full({n}, double(i + 1));
      auto labels = i % 2 ? torch::arange(n, torch::kLong) : torch::Tensor();
      got.push_back(graphed(x, t, labels));
      want.push_back(net(x, t, labels));
    }
  for (size_t k = 0; k < got.size(); ++k) EXPECT_TRUE(torch::equal(got[k], want[k])) << k;
}

TEST(Pipeline, CudaGraphsNeedAGpu) {
  auto g = two_images("ddim", 1);
  g.cuda_graphs = true;
  diffuse::testing::expect_error([&] { generate(fixture_run(), g); }, "--device cuda");
}

// On a GPU: replayed graphs give the images the eager network gives (same kernels, same cuDNN algorithms).
TEST(Pipeline, CudaGraphsSampleTheSameImagesOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!diffuse::detail::GraphedWork::available()) GTEST_SKIP() << "this build has no CUDA graphs";
  LoadOptions lo;
  lo.scheduler_file = fixture("scheduler/fixed_scheduler_config.json");
  lo.vae = "none";
  lo.device = torch::kCUDA;
  auto run = load_run(fixture("diffusers/unet"), lo);
  auto g = two_images("dpmpp_2m", 9);
  g.n = 6;
  g.batch = 4;  // two shapes: 4 and 2
  g.steps = 6;
  g.cfg = 3.0;
  const auto eager = generate(run, g).images;
  g.cuda_graphs = true;
  const auto graphed = generate(run, g).images;
  EXPECT_LE((graphed - eager).abs().max().item<double>(), 1e-5);
}

// LoadOptions::conv_dtype bf16: the convolutions' weights in bfloat16, every other parameter float32, and the
// images within bfloat16's rounding of float32's; refused on top of --dtype bf16.
TEST(Pipeline, ConvolutionsInBf16SampleCloseToFloat32) {
  auto g = two_images("ddim", 2);
  const auto want = generate(fixture_run(), g).images;
  LoadOptions lo;
  lo.scheduler_file = fixture("scheduler/fixed_scheduler_config.json");
  lo.vae = "none";
  lo.conv_dtype = torch::kBFloat16;
  auto run = load_run(fixture("diffusers/unet"), lo);
  int64_t conv_weights = 0, bf16 = 0, fp32 = 0;  // a convolution's weight is 4-D; its bias goes with it
  for (const auto& p : run.unet->named_parameters()) {
    if (p.value().dim() == 4) EXPECT_EQ(p.value().scalar_type(), torch::kBFloat16) << p.key();
    conv_weights += p.value().dim() == 4;
    (p.value().scalar_type() == torch::kBFloat16 ? bf16 : fp32) += 1;
  }
  EXPECT_GT(conv_weights, 5);
  EXPECT_EQ(bf16, 2 * conv_weights);
  EXPECT_GT(fp32, 5);
  const auto got = generate(run, g).images;
  EXPECT_EQ(got.scalar_type(), torch::kFloat32);
  const double scale = want.abs().max().item<double>();
  EXPECT_GT((got - want).abs().max().item<double>(), 0.0);  // bf16 did run
  EXPECT_LT((got - want).abs().max().item<double>(), 0.05 * scale);
  lo.dtype = torch::kBFloat16;
  diffuse::testing::expect_error([&] { load_run(fixture("diffusers/unet"), lo); }, "--dtype fp32");
}

// generate() over any network (network_run): examples/gaussian_denoiser samples the exact denoiser of N(0.5, I)
// (v prediction on scaled_linear rescaled to zero terminal SNR, so that the first step's N(0, I) is exact) through
// three scheduler classes read from config files (DDIM trailing, DPM-Solver++ 2M, PNDM as SD 1.x ships it), 50
// steps. The 2000 images have the data's mean and variance up to the sampling error (0.006 for the mean, 0.008 for
// the variance) and each method's 50-step error (measured: variance 0.937 DDIM, 0.985 DPM-Solver++, 0.945 PLMS).
TEST(NetworkRun, GaussianDenoiserExampleSamplesTheDataThroughThreeClasses) {
  diffuse::testing::TempDir dir;
  const nlohmann::json base = {{"num_train_timesteps", 1000}, {"beta_schedule", "scaled_linear"}, {"beta_start", 0.00085},
                               {"beta_end", 0.012}, {"prediction_type", "v_prediction"}, {"rescale_betas_zero_snr", true}};
  auto ddim = base, dpm = base, pndm = base;
  ddim["_class_name"] = "DDIMScheduler";
  ddim["timestep_spacing"] = "trailing";
  ddim["clip_sample"] = false;  // DDIMScheduler's default clamps x0 to [-1, 1]
  dpm["_class_name"] = "DPMSolverMultistepScheduler";
  dpm["solver_order"] = 2;
  pndm["_class_name"] = "PNDMScheduler";
  pndm["skip_prk_steps"] = true;
  pndm["steps_offset"] = 1;
  pndm["set_alpha_to_one"] = false;
  std::string args;
  for (const auto& [name, config] : {std::pair<std::string, nlohmann::json>{"ddim", ddim}, {"dpm", dpm}, {"pndm", pndm}}) {
    std::ofstream(dir / (name + ".json")) << config.dump();
    args += " " + dir / (name + ".json");
  }
  const auto r = diffuse::testing::run_shell(std::string(DIFFUSE_EXAMPLE_GAUSSIAN) + args);
  ASSERT_EQ(r.code, 0) << r.output;
  std::istringstream lines(r.output);
  std::string line;
  std::getline(lines, line);  // header
  std::vector<std::string> samplers;
  while (std::getline(lines, line)) {
    std::vector<std::string> cells;
    std::stringstream cs(line);
    for (std::string c; std::getline(cs, c, ',');) cells.push_back(c);
    ASSERT_EQ(cells.size(), 7u) << line;
    samplers.push_back(cells[1]);
    EXPECT_NEAR(std::stod(cells[3]), 0.5, 0.03) << line;
    EXPECT_NEAR(std::stod(cells[4]), 1.0, 0.08) << line;
  }
  EXPECT_EQ(samplers, (std::vector<std::string>{"ddim", "dpmpp_2m", "plms"}));
}

// sampler_settings: what a config implies, in one value (the keys that silently change results when forgotten).
TEST(SamplerSettings, ReadEveryKeyThatChangesTheLoop) {
  SchedulerConfig dpm;
  dpm.extra["_class_name"] = "DPMSolverMultistepScheduler";
  dpm.extra["solver_order"] = 3;
  dpm.extra["lower_order_final"] = false;
  dpm.extra["final_sigmas_type"] = "sigma_min";
  auto s = sampler_settings(dpm);
  EXPECT_EQ(s.sampler, "dpmpp_3m");
  EXPECT_FALSE(s.options.lower_order_final);
  EXPECT_FALSE(s.options.set_alpha_to_one);
  SchedulerConfig unipc;
  unipc.extra["_class_name"] = "UniPCMultistepScheduler";
  unipc.extra["solver_order"] = 3;
  unipc.extra["solver_type"] = "bh1";
  s = sampler_settings(unipc);
  EXPECT_EQ(s.sampler, "unipc");
  EXPECT_EQ(s.options.order, 3);
  EXPECT_EQ(s.options.unipc_variant, UniPcVariant::bh1);
  EXPECT_TRUE(s.options.set_alpha_to_one);
  SchedulerConfig pndm;
  pndm.extra["_class_name"] = "PNDMScheduler";
  pndm.extra["skip_prk_steps"] = true;
  pndm.prediction_type = Prediction::v;
  pndm.set_alpha_to_one = false;
  s = sampler_settings(pndm);
  EXPECT_EQ(s.sampler, "plms");
  EXPECT_EQ(s.options.prediction, Prediction::v);
  EXPECT_FALSE(s.options.set_alpha_to_one);
  pndm.extra["skip_prk_steps"] = false;  // diffusers' default: the Runge-Kutta warm-up
  EXPECT_EQ(sampler_settings(pndm).sampler, "pndm");
  SchedulerConfig other;
  other.extra["_class_name"] = "LMSDiscreteScheduler";
  EXPECT_EQ(sampler_settings(other).sampler, "lms");
  other.extra["_class_name"] = "HeunDiscreteScheduler";
  EXPECT_EQ(sampler_settings(other).sampler, "heun_sigma");
  other.extra["_class_name"] = "DEISMultistepScheduler";
  EXPECT_THROW(sampler_settings(other), std::invalid_argument);
}
