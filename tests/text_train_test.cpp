// Fine-tuning a Stable Diffusion pipeline on captioned images: caption folders, the latent and text caches, the
// scheduler a fine-tune writes, gradient accumulation and checkpointing, resume, the run as a diffusers pipeline.
#include <gtest/gtest.h>

#include <csignal>
#include <fstream>
#include <sstream>

#include "diffuse/data/captions.h"
#include "diffuse/data/data.h"
#include "diffuse/io/files.h"
#include "diffuse/io/image_io.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/blocks.h"
#include "diffuse/models/recompute.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/text_train.h"
#include "cli_util.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::TempDir;
using diffuse::testing::expect_identical_weights;
using diffuse::testing::folder_weights;

namespace {

std::string tiny_pipe() { return std::string(DIFFUSE_FIXTURES) + "/text-to-image/sd1/pipe"; }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

// `n` RGB images (shapes of 10 kinds, 48x40 so that the crop matters) with captions from their class and brightness.
void make_caption_folder(const std::string& dir, int64_t n, uint64_t seed = 3) {
  fs::create_directories(dir);
  auto shapes = with_brightness_spread(make_shapes(n, 48, seed), seed);
  const auto& names = fashion_mnist_classes();
  for (int64_t i = 0; i < n; ++i) {
    auto img = shapes.images[i].narrow(2, 4, 40).repeat({3, 1, 1});
    img[0] = img[0] * 0.5;  // colour
    const std::string stem = dir + "/img" + std::to_string(100 + i);
    write_png(stem + ".png", img);
    const double mean = img.mean().item<double>();
    write_text(stem + ".txt", std::string(mean < -0.3 ? "a dark photo of a " : mean > 0.3 ? "a bright photo of a " : "a photo of a ") +
                                  names[size_t(shapes.labels[i].item<int64_t>())] + "\n");
  }
}

TextTrainOptions tiny_options(const std::string& data, const std::string& out, int64_t steps) {
  TextTrainOptions o;
  o.model = tiny_pipe();
  o.data = data;
  o.captions.resolution = 64;
  o.prediction = Prediction::v;
  o.zero_snr = true;
  o.caption_dropout = 0.2;
  o.offset_noise = 0.05;
  o.loop.out = out;
  o.loop.steps = steps;
  o.loop.batch = 4;
  o.loop.lr = 1e-3;
  o.loop.warmup = 1;
  o.loop.hflip = true;
  o.loop.progress = false;
  o.loop.log_every = 2;
  o.loop.threads = 1;
  return o;
}

double max_difference(const std::string& a, const std::string& b) {
  auto wa = folder_weights(a), wb = folder_weights(b);
  double m = 0;
  for (const auto& [name, t] : wa) m = std::max(m, (t - wb.at(name)).abs().max().item<double>());
  return m;
}

}  // namespace

// ---------------------------------------------------------------- caption folders

TEST(CaptionFolder, ReadsBothLayoutsFlattensAlphaAndSkipsOrRefusesBadFiles) {
  TempDir tmp;
  const auto dir = tmp / "txt";
  make_caption_folder(dir, 3);
  // An RGBA image: alpha 0 on the left half becomes white.
  auto rgba = torch::full({4, 32, 32}, -1.0);
  rgba[3].narrow(1, 0, 16).fill_(-1.0);
  rgba[3].narrow(1, 16, 16).fill_(1.0);
  write_png(dir + "/img900.png", rgba);
  write_text(dir + "/img900.txt", "a half white square\n\n");
  CaptionFolderOptions o;
  o.resolution = 32;
  auto d = load_caption_folder(dir, o);
  ASSERT_EQ(d.size(), 4);
  EXPECT_EQ(d.layout, "txt");
  EXPECT_EQ(d.captions[3], "a half white square");  // trailing newlines trimmed
  EXPECT_EQ(d.images.sizes(), torch::IntArrayRef({4, 3, 32, 32}));
  EXPECT_NEAR(d.images[3].narrow(2, 0, 14).mean().item<double>(), 1.0, 1e-6);   // transparent: white
  EXPECT_NEAR(d.images[3].narrow(2, 18, 14).mean().item<double>(), -1.0, 1e-6);  // opaque black
  ASSERT_EQ(d.notes.size(), 1u);
  EXPECT_NE(d.notes[0].find("1 image has an alpha channel, flattened onto white"), std::string::npos);
  o.alpha = "refuse";
  EXPECT_NE(error_of([&] { load_caption_folder(dir, o); }).find("img900.png' has an alpha channel"), std::string::npos);
  o.alpha = "flatten";

  // Bad files: a missing caption and an undecodable image. Refused by default, naming the first; skipped on request.
  write_png(dir + "/img950.png", torch::zeros({3, 8, 8}));
  write_text(dir + "/img960.png", "not a png");
  write_text(dir + "/img960.txt", "broken");
  auto error = error_of([&] { load_caption_folder(dir, o); });
  EXPECT_NE(error.find("img950.png: no caption file img950.txt"), std::string::npos) << error;
  EXPECT_NE(error.find("--bad-files skip"), std::string::npos) << error;
  o.bad_files = "skip";
  d = load_caption_folder(dir, o);
  EXPECT_EQ(d.size(), 4);
  ASSERT_EQ(d.notes.size(), 2u);
  EXPECT_NE(d.notes[0].find("skipped 2 unusable files: img950.png (no caption file img950.txt); img960.png"), std::string::npos)
      << d.notes[0];

  // metadata.jsonl: file_name and text per line; other keys named as ignored; a list of captions refused by line.
  const auto meta = tmp / "meta";
  make_caption_folder(meta, 2);
  write_text(meta + "/metadata.jsonl", "{\"file_name\": \"img101.png\", \"text\": \"second\", \"score\": 5}\n\n"
                                       "{\"file_name\": \"img100.png\", \"text\": \"first \\u00e9\"}\n");
  d = load_caption_folder(meta, {32, "center", "flatten", "refuse", 0});
  EXPECT_EQ(d.layout, "metadata.jsonl");
  ASSERT_EQ(d.size(), 2);
  EXPECT_EQ(d.files[0], "img101.png");
  EXPECT_EQ(d.captions[1], "first \xc3\xa9");
  EXPECT_NE(d.notes[0].find("keys ignored: score"), std::string::npos);
  write_text(meta + "/metadata.jsonl", "{\"file_name\": \"img101.png\", \"text\": [\"a\", \"b\"]}\n");
  EXPECT_NE(error_of([&] { load_caption_folder(meta, {32, "center", "flatten", "refuse", 0}); })
                .find("metadata.jsonl line 1: \"text\" is a list"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_caption_folder(meta, {32, "random", "flatten", "refuse", 0}); }).find("--crop random"),
            std::string::npos);
}

// ---------------------------------------------------------------- the scheduler a fine-tune writes

TEST(TextTrain, SchedulerConfigCarriesTheRecipe) {
  auto source = SchedulerConfig::load(tiny_pipe() + "/scheduler/scheduler_config.json");
  std::vector<std::string> notes;
  auto c = finetune_scheduler_config(source, Prediction::v, true, Spacing::trailing, &notes);
  EXPECT_TRUE(notes.empty());  // already a DDIMScheduler
  EXPECT_EQ(c.prediction_type, Prediction::v);
  EXPECT_TRUE(c.rescale_betas_zero_snr);
  EXPECT_EQ(c.timestep_spacing, Spacing::trailing);
  EXPECT_EQ(c.schedule().a()[999].item<double>(), 0.0);  // zero terminal SNR
  EXPECT_EQ(c.beta_schedule, "scaled_linear");
  // SD 1.x ships a PNDMScheduler: written as DDIM with the same betas, and said so.
  source.extra["_class_name"] = "PNDMScheduler";
  source.extra["skip_prk_steps"] = true;
  c = finetune_scheduler_config(source, Prediction::eps, false, Spacing::trailing, &notes);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("PNDMScheduler is written as a DDIMScheduler"), std::string::npos);
  EXPECT_EQ(c.extra["_class_name"], "DDIMScheduler");
  EXPECT_FALSE(c.extra.contains("skip_prk_steps"));
  EXPECT_TRUE(torch::equal(c.schedule().a(), source.schedule().a()));
  EXPECT_NE(error_of([&] { finetune_scheduler_config(source, Prediction::flow, false, Spacing::trailing); }).find("flow"),
            std::string::npos);
}

// ---------------------------------------------------------------- gradient checkpointing

TEST(TextTrain, GradientCheckpointingGivesTheSameGradients) {
  auto unet = load_unet_condition(tiny_pipe() + "/unet", torch::kCPU);
  auto gen = cpu_generator(5);
  torch::Tensor x = torch::randn({2, 4, 8, 8}, gen);
  torch::Tensor ctx = torch::randn({2, 7, 32}, gen);
  auto t = torch::tensor({10, 900});
  auto grads = [&](bool checkpointing) {
    unet->set_gradient_checkpointing(checkpointing);
    unet->zero_grad();
    auto y = unet->forward(x, t, ctx);
    y.square().mean().backward();
    std::vector<torch::Tensor> g;
    for (const auto& p : unet->parameters()) g.push_back(p.grad().clone());
    return std::make_pair(y.detach(), g);
  };
  auto [y0, g0] = grads(false);
  auto [y1, g1] = grads(true);
  EXPECT_TRUE(torch::equal(y0, y1));
  ASSERT_EQ(g0.size(), g1.size());
  for (size_t i = 0; i < g0.size(); ++i) EXPECT_TRUE(torch::allclose(g0[i], g1[i], 1e-5, 1e-7)) << i;
  // Under the conv dtype guard, the recomputation runs in it too.
  {
    ConvolutionDtype bf16(torch::kBFloat16);
    std::tie(y0, g0) = grads(false);
    std::tie(y1, g1) = grads(true);
  }
  for (size_t i = 0; i < g0.size(); ++i) EXPECT_TRUE(torch::allclose(g0[i], g1[i], 1e-5, 1e-7)) << i;
  // Inputs' gradients flow through it as well.
  torch::Tensor a = torch::randn({3}, gen).requires_grad_();
  torch::Tensor w = torch::randn({3}, gen).requires_grad_();
  auto out = recomputed_in_backward([&](const std::vector<torch::Tensor>& in) { return std::vector<torch::Tensor>{in[0] * w * 2}; },
                                    {a});
  out[0].sum().backward();
  EXPECT_TRUE(torch::allclose(a.grad(), w.detach() * 2));
  EXPECT_TRUE(torch::allclose(w.grad(), a.detach() * 2));
}

// ---------------------------------------------------------------- the fine-tune

// The done-means of the fine-tune: a 16-image caption folder trains, stops, resumes bit-identically; the run is a
// diffusers pipeline with the original's names and shapes, samples, and the caches are reused per file.
TEST(TextTrain, FineTunesStopsResumesBitIdenticallyIntoAPipelineFolder) {
  TempDir tmp;
  const auto data = tmp / "data", cache = tmp / "cache";
  make_caption_folder(data, 16);
  std::ostringstream first_report;
  auto o = tiny_options(data, tmp / "straight", 6);
  const auto prepared = prepare_text_training(o, cache, &first_report);
  EXPECT_NE(first_report.str().find("latents 32 encoded, 0 read; text states 16 encoded, 0 read"), std::string::npos)
      << first_report.str();
  EXPECT_EQ(prepared.moments.images.sizes(), torch::IntArrayRef({16, 16, 8, 8}));  // mean, std and the mirror's
  EXPECT_EQ(prepared.states.sizes(), torch::IntArrayRef({16, 77, 32}));
  const auto straight = train_text(o, prepared);
  EXPECT_EQ(straight.step, 6);
  EXPECT_TRUE(std::isfinite(straight.last_loss));

  // Stopped by SIGINT at step 3 and resumed: the same weights, bit for bit. The caches are read, not recomputed.
  auto s = tiny_options(data, tmp / "stopped", 6);
  TrainHooks stop_at_3;
  stop_at_3.on_step = [](const TrainStepInfo& i) {
    if (i.step == 3) std::raise(SIGINT);
  };
  std::ostringstream second_report;
  EXPECT_TRUE(train_text(s, prepare_text_training(s, cache, &second_report), stop_at_3).interrupted);
  EXPECT_NE(second_report.str().find("latents 0 encoded, 32 read; text states 0 encoded, 16 read"), std::string::npos)
      << second_report.str();
  s.loop.resume = true;
  EXPECT_EQ(train_text(s, prepare_text_training(s, cache)).step, 6);
  expect_identical_weights(tmp / "straight/unet", tmp / "stopped/unet");
  expect_identical_weights(tmp / "straight/unet_ema", tmp / "stopped/unet_ema");

  // The run folder is a diffusers StableDiffusionPipeline: the UNet's names and shapes are the original's, the
  // frozen parts are the original files, the scheduler carries the recipe.
  const auto run = tmp / "straight";
  diffuse::testing::expect_names_and_shapes(folder_weights(run + "/unet"), folder_weights(tiny_pipe() + "/unet"));
  EXPECT_GT(max_difference(run + "/unet", tiny_pipe() + "/unet"), 0.0);
  for (const char* part : {"text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                           "tokenizer/vocab.json", "tokenizer/merges.txt"})
    EXPECT_EQ(read_file(run + "/" + part), read_file(tiny_pipe() + "/" + part)) << part;
  const auto index = load_json(run + "/model_index.json");
  EXPECT_EQ(index["_class_name"], "StableDiffusionPipeline");
  EXPECT_EQ(index["unet"][1], "UNet2DConditionModel");
  const auto sched = load_json(run + "/scheduler/scheduler_config.json");
  EXPECT_EQ(sched["_class_name"], "DDIMScheduler");
  EXPECT_EQ(sched["prediction_type"], "v_prediction");
  EXPECT_EQ(sched["rescale_betas_zero_snr"], true);
  EXPECT_EQ(sched["timestep_spacing"], "trailing");

  // diffuse samples it (EMA weights) with a prompt.
  auto loaded = load_run(run);
  GenerateOptions g;
  g.n = 1;
  g.steps = 3;
  g.prompts = {"a dark photo of a sneaker"};
  g.height = g.width = 64;
  g.seed = 1;
  auto images = generate(loaded, g).images;
  EXPECT_EQ(images.sizes(), torch::IntArrayRef({1, 3, 64, 64}));
  EXPECT_TRUE(torch::isfinite(images).all().item<bool>());

  // A changed image and a changed caption are recomputed; the rest are read.
  auto changed = read_image(data + "/img100.png", 3) * 0.5;
  write_png(data + "/img100.png", changed);
  write_text(data + "/img101.txt", "a new caption");
  std::ostringstream third_report;
  prepare_text_training(tiny_options(data, tmp / "third", 6), cache, &third_report);
  EXPECT_NE(third_report.str().find("latents 2 encoded, 30 read; text states 1 encoded, 15 read"), std::string::npos)
      << third_report.str();
}

// The first log row's loss and gradient norm (log_every 1): loss,grad_norm of step 1.
std::pair<double, double> first_step_numbers(const std::string& run) {
  std::istringstream csv(read_file(run + "/log.csv"));
  std::string header, row;
  std::getline(csv, header);
  std::getline(csv, row);
  std::vector<std::string> cells;
  std::stringstream cs(row);
  for (std::string c; std::getline(cs, c, ',');) cells.push_back(c);
  return {std::stod(cells.at(1)), std::stod(cells.at(4))};
}

// Accumulating the gradients of two halves is the step of the whole batch up to float rounding: the same per-example
// draws give the same loss and gradient norm (with gradient checkpointing on, which changes nothing either).
TEST(TextTrain, GradientAccumulationEqualsTheWholeBatch) {
  TempDir tmp;
  const auto data = tmp / "data", cache = tmp / "cache";
  make_caption_folder(data, 8);
  auto whole = tiny_options(data, tmp / "whole", 2);
  whole.loop.log_every = 1;
  train_text(whole, prepare_text_training(whole, cache));
  auto parts = whole;
  parts.loop.out = tmp / "parts";
  parts.loop.accumulate = 2;
  parts.gradient_checkpointing = true;
  train_text(parts, prepare_text_training(parts, cache));
  const auto [loss_whole, norm_whole] = first_step_numbers(tmp / "whole");
  const auto [loss_parts, norm_parts] = first_step_numbers(tmp / "parts");
  EXPECT_NEAR(loss_parts, loss_whole, 1e-6 * loss_whole);
  EXPECT_NEAR(norm_parts, norm_whole, 1e-5 * norm_whole);
  // AdamW's first steps are lr * sign(g) where g is near 0, so weights agree to a fraction of lr, not to rounding.
  EXPECT_LT(max_difference(tmp / "whole/unet", tmp / "parts/unet"), 0.1 * whole.loop.lr);
  parts.loop.accumulate = 3;
  parts.loop.out = tmp / "three";
  EXPECT_NE(error_of([&] { train_text(parts, prepare_text_training(parts, cache)); }).find("--accumulate 3"),
            std::string::npos);
}

TEST(TextTrainCli, FineTunesResumesAndRefusesNetworkOptions) {
  using diffuse::testing::run_cli;
  TempDir tmp;
  make_caption_folder(tmp / "data", 4);
  const std::string common = "train --model " + tiny_pipe() + " --data " + tmp / "data" + " --resolution 64 --batch 2 "
                             "--threads 1 --quiet --latent-cache " + tmp / "cache";
  auto r = run_cli(common + " --out " + tmp / "run" + " --steps 2 --prediction v --zero-snr");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("v prediction, loss weight uniform, zero terminal SNR"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("trained '"), std::string::npos) << r.output;
  r = run_cli("train --out " + tmp / "run" + " --resume --steps 3 --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(checkpoint_step(tmp / "run"), 3);
  r = run_cli(common + " --out " + tmp / "other" + " --channels 8,16");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--channels does not apply with --model"), std::string::npos) << r.output;
  r = run_cli("sample --model " + tmp / "run" + " --prompt \"a photo\" --n 1 --steps 2 --height 64 --width 64 --out " +
              tmp / "img.png");
  EXPECT_EQ(r.code, 0) << r.output;
}
