// diffuse on a GPU beside diffusers: the reference UNet's forward (fp32 and bf16 weights), a training step
// (forward + backward + AdamW, fp32 and bf16 autocast, NCHW and channels-last), the whole trainer (diffuse::train
// on Fashion-MNIST or synthetic shapes) and the DDIM sampling pipeline (diffuse::generate, 10 steps, fp32 and bf16,
// NCHW and channels-last, eager and CUDA graphs, TF32, CFG). With
// --diffusers-figures FILE (the JSON that ../shared/device-kit/diffusers_gpu_bench.py writes in the same run)
// each line also shows diffusers' figure and the ratio.
//
// usage: gpu_bench [--device cuda] [--diffusers-figures FILE] [--trainer-steps 120] [--train-batch 128]
//                  [--channels-last 0|1] [--only checks,forward,step,trainer,sample] [--json FILE]
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "bench_util.h"
#include "diffuse/core/noise.h"
#include "diffuse/data/data.h"
#include "diffuse/models/attention.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/train/train.h"
#include "diffuse/util/runtime.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

struct Bench {
  torch::Device device = torch::kCUDA;
  std::map<std::string, double> diffusers;
  nlohmann::json results;

  void sync() const {
    if (device.is_cuda()) torch::cuda::synchronize();
  }
  // Best of 3 timings of `iters` calls after one warm-up call: seconds per call.
  template <class F>
  double time(int iters, F&& f) {
    f();
    sync();
    double best = 1e30;
    for (int r = 0; r < 3; ++r) {
      auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) f();
      sync();
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() / iters);
    }
    return best;
  }
  std::string json_path;  // rewritten after each figure, so a crash keeps what was measured
  void report(const std::string& what, double rate, const std::string& unit, const std::string& diffusers_key) {
    results[what + " " + unit] = rate;
    if (!json_path.empty()) std::ofstream(json_path) << results.dump(1) << "\n";
    std::cout << std::left << std::setw(46) << what << std::right << std::fixed << std::setprecision(0) << std::setw(9)
              << rate << " " << unit;
    auto it = diffusers.find(diffusers_key);
    if (it != diffusers.end())
      std::cout << "   diffusers " << std::setw(7) << it->second << "   ratio " << std::setprecision(2) << rate / it->second;
    std::cout << "\n" << std::flush;
  }
};

// What must agree between the device and the CPU: the seeded noise of image i, the fused attention, the UNet.
void checks(Bench& b) {
  auto cpu = diffuse::make_noise({1, 32, 32}, 256, 7, 1000, 3);
  auto dev = diffuse::make_noise({1, 32, 32}, 256, 7, 1000, 3, b.device).cpu();
  std::cout << "check: noise on " << b.device << " vs CPU: max |diff| " << (dev - cpu).abs().max().item<double>()
            << ", bit-identical fraction " << (dev == cpu).to(torch::kFloat64).mean().item<double>() << "\n";
  torch::manual_seed(1);
  auto q = torch::randn({8, 256, 128}), k = torch::randn({8, 256, 128}), v = torch::randn({8, 256, 128});
  auto ref = diffuse::multi_head_attention_reference(q.to(torch::kFloat64), k.to(torch::kFloat64), v.to(torch::kFloat64), 16, 0.125);
  auto got = diffuse::multi_head_attention(q.to(b.device), k.to(b.device), v.to(b.device), 16, 0.125).cpu();
  std::cout << "check: attention on " << b.device << " vs float64 reference: max |diff| "
            << (got.to(torch::kFloat64) - ref).abs().max().item<double>() << "\n";
  torch::manual_seed(0);
  diffuse::UNet2DModel model(diffuse::reference_unet_config());
  model->eval();
  auto x = torch::randn({16, 1, 32, 32});
  auto t = torch::randint(0, 1000, {16}, torch::kLong), y = torch::randint(0, 11, {16}, torch::kLong);
  torch::NoGradGuard ng;
  auto out_cpu = model->forward(x, t, y);
  model->to(b.device);
  auto out_dev = model->forward(x.to(b.device), t.to(b.device), y.to(b.device)).cpu();
  model->to(torch::kBFloat16);
  auto out_bf16 = model->forward(x.to(b.device, torch::kBFloat16), t.to(b.device), y.to(b.device)).cpu().to(torch::kFloat32);
  std::cout << "check: UNet forward on " << b.device << " fp32 vs CPU: max |diff| " << (out_dev - out_cpu).abs().max().item<double>()
            << " (output std " << out_cpu.std().item<double>() << "); bf16 weights: max |diff| "
            << (out_bf16 - out_cpu).abs().max().item<double>() << "\n";
}

// The reference UNet (seed 0 weights) as a LoadedRun: v prediction, zero terminal SNR, trailing spacing.
diffuse::LoadedRun reference_run(torch::Device device, torch::ScalarType dtype = torch::kFloat32, bool channels_last = false) {
  torch::manual_seed(0);
  diffuse::LoadedRun run;
  run.unet = diffuse::UNet2DModel(diffuse::reference_unet_config());
  run.unet->to(device, dtype);
  if (channels_last) diffuse::to_channels_last(*run.unet);
  run.unet->eval();
  run.scheduler.prediction_type = diffuse::Prediction::v;
  run.scheduler.rescale_betas_zero_snr = true;
  run.scheduler.timestep_spacing = diffuse::Spacing::trailing;
  run.channels = 1;
  run.height = run.width = 32;
  run.class_embeds = 11;
  run.device = device;
  run.dtype = dtype;
  run.channels_last = channels_last;
  return run;
}

// generate() with its network replayed as CUDA graphs against the eager network: batches of 48 and 16, CFG 3.
void graph_check(Bench& b) {
  const auto run = reference_run(b.device);
  diffuse::GenerateOptions g;
  g.sampler = "dpmpp_2m";
  g.steps = 8;
  g.n = 64;
  g.batch = 48;
  g.cfg = 3.0;
  const auto eager = diffuse::generate(run, g).images;
  g.cuda_graphs = true;
  const auto graphed = diffuse::generate(run, g).images;
  std::cout << "check: dpmpp_2m 8 steps, CFG 3, CUDA graphs vs eager: max |diff| "
            << (graphed - eager).abs().max().item<double>() << "\n";
}

void forward_rates(Bench& b, bool channels_last) {
  const auto config = diffuse::reference_unet_config();
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(0);
    diffuse::UNet2DModel model(config);
    model->to(b.device, dtype);
    if (channels_last) diffuse::to_channels_last(*model);
    model->eval();
    const std::string name = dtype == torch::kFloat32 ? "fp32" : "bf16";
    for (int64_t batch : {int64_t(64), int64_t(256)}) {
      auto opts = torch::TensorOptions().device(b.device);
      auto x = torch::randn({batch, 1, 32, 32}, opts).to(dtype);
      if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      auto t = torch::randint(0, 1000, {batch}, opts.dtype(torch::kLong));
      auto y = torch::randint(0, 11, {batch}, opts.dtype(torch::kLong));
      c10::InferenceMode guard;
      const double s = b.time(10, [&] { model->forward(x, t, y); });
      b.report("forward " + name + " batch " + std::to_string(batch), double(batch) / s, "images/s",
               "diffusers eager forward batch " + std::to_string(batch) + " " + name + " images/s");
    }
  }
}

void step_rates(Bench& b, int64_t batch) {
  const auto config = diffuse::reference_unet_config();
  for (auto [bf16, channels_last] : {std::pair{false, false}, {true, false}, {true, true}}) {
    torch::manual_seed(0);
    diffuse::UNet2DModel model(config);
    model->to(b.device);
    if (channels_last) diffuse::to_channels_last(*model);
    model->train();
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-4));
    auto opts = torch::TensorOptions().device(b.device);
    auto x = torch::randn({batch, 1, 32, 32}, opts), noise = torch::randn_like(x);
    if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    auto t = torch::randint(0, 1000, {batch}, opts.dtype(torch::kLong));
    auto y = torch::randint(0, 11, {batch}, opts.dtype(torch::kLong));
    const double s = b.time(5, [&] {
      opt.zero_grad();
      torch::Tensor out;
      {
        diffuse::Bf16Autocast autocast(b.device, bf16);
        out = model->forward(x, t, y);
      }
      torch::mse_loss(out.to(torch::kFloat32), noise).backward();
      opt.step();
    });
    const std::string name = bf16 ? "bf16" : "fp32";
    b.report("train step (torch AdamW) " + name + " batch " + std::to_string(batch) + (channels_last ? " NHWC" : ""),
             double(batch) / s, "images/s", "diffusers eager train batch " + std::to_string(batch) + " " + name + " images/s");
  }
}

void trainer_rates(Bench& b, int64_t batch, int64_t steps) {
  diffuse::DataSpec spec;
  spec.source = fs::exists(std::string(diffuse::kFashionMnistDir) + "/train-images-idx3-ubyte.gz") ||
                        fs::exists(std::string(diffuse::kFashionMnistDir) + "/train-images-idx3-ubyte")
                    ? "fashion-mnist"
                    : "synthetic-shapes";
  auto data = diffuse::load_dataset(spec);
  struct Variant {
    bool bf16, graphs, channels_last;
  };
  for (auto [bf16, graphs, channels_last] : {Variant{false, false, false}, Variant{true, false, false}, Variant{false, true, false},
                                             Variant{true, true, false}, Variant{true, true, true}}) try {
    diffuse::TrainOptions o;
    o.data = spec;
    o.prediction = diffuse::Prediction::v;
    o.loop.steps = steps;
    o.loop.batch = batch;
    o.loop.device = b.device;
    o.loop.bf16 = bf16;
    o.loop.cuda_graphs = graphs;
    o.loop.channels_last = channels_last;
    o.loop.hflip = true;
    o.loop.progress = false;
    o.loop.checkpoint_every = 1 << 30;
    o.loop.log_every = 50;
    o.loop.overwrite = true;
    o.loop.out = (fs::temp_directory_path() / "diffuse-gpu-bench-run").string();
    const int64_t warm = std::min<int64_t>(20, steps / 4);
    Clock::time_point t_warm, t_last;
    diffuse::TrainHooks hooks;
    hooks.on_step = [&](const diffuse::TrainStepInfo& s) {
      if (s.step != warm && s.step != steps - 1) return;
      b.sync();
      (s.step == warm ? t_warm : t_last) = Clock::now();
    };
    diffuse::train(o, data, hooks);
    fs::remove_all(o.loop.out);
    const double rate = double((steps - 1 - warm) * batch) / std::chrono::duration<double>(t_last - t_warm).count();
    const std::string name = bf16 ? "bf16" : "fp32";
    b.report("trainer (diffuse::train) " + name + " batch " + std::to_string(batch) + (graphs ? " graph" : " eager") +
                 (channels_last ? " NHWC" : ""),
             rate, "images/s",
             "diffusers eager train batch " + std::to_string(batch) + " " + name + " images/s");
  } catch (const std::exception& e) {
    std::cout << "trainer " << (bf16 ? "bf16" : "fp32") << (graphs ? " graph" : " eager") << " failed: " << e.what() << "\n";
  }
}

// One DDIM-10 variant of the pipeline at batch 256: the UNet's dtype and layout, graphs, TF32, guidance.
struct SampleVariant {
  torch::ScalarType dtype = torch::kFloat32;
  bool channels_last = false, graphs = false, tf32 = false;
  double cfg = 1.0;
  std::string name() const {
    return std::string("DDIM-10 ") + (dtype == torch::kFloat32 ? "fp32" : "bf16") + " batch 256" +
           (cfg != 1.0 ? " CFG 3" : "") + (channels_last ? " NHWC" : "") + (graphs ? " graph" : "") + (tf32 ? " TF32" : "");
  }
};

void sample_rate(Bench& b, const SampleVariant& v) {
  const auto run = reference_run(b.device, v.dtype, v.channels_last);
  diffuse::GenerateOptions g;
  g.sampler = "ddim";
  g.steps = 10;
  g.n = g.batch = 256;
  g.cfg = v.cfg;
  g.cuda_graphs = v.graphs;
  diffuse::allow_tf32(b.device, v.tf32);  // each variant sets its own: a failed one leaves no state behind
  const double s = b.time(2, [&] { diffuse::generate(run, g); });
  const bool plain = v.cfg == 1.0 && !v.tf32;
  b.report(v.name(), 256.0 * 10 / s, "image-steps/s",
           plain ? std::string("diffusers eager DDIM-10 batch 256 ") + (v.dtype == torch::kFloat32 ? "fp32" : "bf16") + " image-steps/s" : "");
}

void sample_rates(Bench& b) {
  const auto bf16 = torch::kBFloat16;
  for (SampleVariant v : {SampleVariant{}, SampleVariant{torch::kFloat32, false, true}, SampleVariant{torch::kFloat32, true},
                          SampleVariant{torch::kFloat32, false, false, true}, SampleVariant{torch::kFloat32, true, true, true},
                          SampleVariant{bf16}, SampleVariant{bf16, false, true}, SampleVariant{bf16, true},
                          SampleVariant{bf16, true, true}, SampleVariant{torch::kFloat32, false, false, false, 3.0},
                          SampleVariant{bf16, false, false, false, 3.0}, SampleVariant{bf16, true, true, false, 3.0}})
    try {
      sample_rate(b, v);
    } catch (const std::exception& e) {
      std::cout << v.name() << " failed: " << e.what() << "\n";
    }
}

}  // namespace

int main(int argc, char** argv) {
  Bench b;
  std::string figures, only = "checks,forward,step,trainer,sample";
  int64_t trainer_steps = 120, train_batch = 128;
  bool channels_last = false;
  std::string device_name = "cuda";
  if (!bench::parse_options(argc, argv,
                            {{"--device", bench::to(device_name)},
                             {"--diffusers-figures", bench::to(figures)},
                             {"--trainer-steps", bench::to(trainer_steps)},
                             {"--train-batch", bench::to(train_batch)},
                             {"--channels-last", bench::to(channels_last)},
                             {"--only", bench::to(only)},
                             {"--json", bench::to(b.json_path)}}))
    return 2;
  diffuse::configure_cpu_runtime(argv);
  b.device = diffuse::parse_device(device_name);
  if (!figures.empty()) {
    std::ifstream in(figures);
    if (!in) {
      std::cerr << "cannot read --diffusers-figures '" << figures << "'\n";
      return 2;
    }
    const auto given = nlohmann::json::parse(in);
    for (auto& [k, v] : given.items()) b.diffusers[k] = v.get<double>();
  }
  std::cout << "device " << b.device << ", matmul 4096x4096 float32 " << diffuse::matmul_gflops(4096, b.device)
            << " GFLOP/s (TF32 off)\n";
  auto wants = [&](const char* part) { return only.find(part) != std::string::npos; };
  if (wants("checks")) checks(b);
  if (wants("checks")) try {
      graph_check(b);
    } catch (const std::exception& e) {
      std::cout << "check: CUDA graphs in generate() failed: " << e.what() << "\n";
    }
  if (wants("forward")) forward_rates(b, channels_last);
  if (wants("step")) step_rates(b, train_batch);
  if (wants("sample")) sample_rates(b);
  if (wants("trainer")) trainer_rates(b, train_batch, trainer_steps);
}
