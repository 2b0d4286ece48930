#include <gtest/gtest.h>

#include <filesystem>

#include "cli_util.h"
#include "test_util.h"
#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/scheduler_config.h"
#include <torch/torch.h>

using diffuse::testing::fixture;
using diffuse::testing::run_cli;

namespace {
std::string model_args() {
  // --vae none: the fixture folder also holds diffusers/vae (4 latent channels), which sample would take for
  // this pixel-space UNet's autoencoder.
  return "--model " + fixture("diffusers/unet") + " --scheduler " + fixture("scheduler/fixed_scheduler_config.json") +
         " --vae none";
}
}  // namespace

// A diffusers UNet2DModel folder samples end to end with CFG + rescale on a zero-SNR v schedule.
TEST(CliSample, DiffusersFolderWithGuidance) {
  auto out = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_samples";
  auto r = run_cli("sample " + model_args() + " --sampler dpmpp_2m --steps 4 --n 3 --batch 2 --cfg 3 "
                   "--cfg-rescale 0.7 --quiet --out " + out + " --save-raw " + out + "/raw.safetensors");
  ASSERT_EQ(r.code, 0) << r.output;
  for (auto f : {"grid.png", "000000.png", "000002.png", "raw.safetensors"})
    EXPECT_TRUE(std::filesystem::exists(out + "/" + f)) << f;
  // The class each image was asked for (classes in turn), for diffuse eval: labels.csv and the raw file.
  EXPECT_EQ(diffuse::read_file(out + "/labels.csv"), "file,class\n000000.png,0\n000001.png,1\n000002.png,2\n");
  auto raw = diffuse::load_safetensors(out + "/raw.safetensors");
  ASSERT_TRUE(raw.count("labels"));
  EXPECT_TRUE(torch::equal(raw["labels"], torch::tensor({0, 1, 2}, torch::kLong)));
  std::filesystem::remove_all(out);
}

// --clip-sample R clamps every x0 estimate to [-R, R]; with the final step landing on alpha_bar = 1
// (set_alpha_to_one) the stored sample is the last (clamped) estimate, so it lies inside [-R, R].
TEST(CliSample, ClipSampleBoundsTheEstimates) {
  auto out = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_clipped";
  std::filesystem::create_directories(out);
  auto config = diffuse::SchedulerConfig::load(fixture("scheduler/fixed_scheduler_config.json"));
  config.set_alpha_to_one = true;
  config.save(out + "/scheduler_config.json");
  auto r = run_cli("sample --model " + fixture("diffusers/unet") + " --scheduler " + out +
                   "/scheduler_config.json --vae none --sampler ddim --steps 3 --n 2 --clip-sample 0.25 --quiet --out " +
                   out + " --save-raw " + out + "/raw.safetensors");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("x0 clipped"), std::string::npos) << r.output;
  auto raw = diffuse::load_safetensors(out + "/raw.safetensors").at("sample");
  EXPECT_LE(raw.abs().max().item<double>(), 0.25 + 1e-6);
  std::filesystem::remove_all(out);
}

// A second `sample` into the same folder leaves no image of the first behind for `eval` to count.
TEST(CliSample, EarlierSamplesInTheFolderAreRemoved) {
  auto out = ::testing::TempDir() + "/" + std::to_string(::getpid()) + "_again";
  std::filesystem::create_directories(out);
  for (const char* name : {"/000002.png", "/000005.png", "/labels.csv"}) diffuse::write_file_atomic(out + name, "old");
  diffuse::write_file_atomic(out + "/notes.txt", "mine");
  auto r = run_cli("sample " + model_args() + " --sampler ddim --steps 2 --n 2 --quiet --out " + out);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(out + "/000001.png"));
  EXPECT_FALSE(std::filesystem::exists(out + "/000002.png"));
  EXPECT_FALSE(std::filesystem::exists(out + "/000005.png"));
  EXPECT_TRUE(std::filesystem::exists(out + "/notes.txt"));  // not ours: kept
  std::filesystem::remove_all(out);
}

TEST(CliSample, BadInputGetsOneErrorLine) {
  struct Case {
    std::string args, needle;
  };
  std::vector<Case> cases = {
      {"sample --model /nonexistent/run", "does not exist"},
      {"sample " + model_args() + " --class 11", "class embeddings"},
      {"sample " + model_args() + " --cfg 2 --cfg-rescale 1.5", "--cfg-rescale"},
      {"sample " + model_args() + " --sampler nope", "nope"},
      {"sample " + model_args() + " --seed -1", "--seed"},
      {"sample " + model_args() + " --sampler unipc --order 4", "order"},
      {"sample " + model_args() + " --spacing karras --sampler plms", "integer timesteps"},
      {"sample " + model_args() + " --steps 0", "[1, T"},
      {"sample " + model_args() + " --classifier-scale 2", "--classifier"},
      {"sample " + model_args() + " --clip-sample -1", "--clip-sample"},
  };
  for (auto& c : cases) {
    auto r = run_cli(c.args + " --quiet --n 1 --out " + ::testing::TempDir() + "/never");
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_LT(r.code, 128) << c.args << " crashed";
    EXPECT_NE(r.output.find("error:"), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.needle), std::string::npos) << c.args << "\n" << r.output;
  }
}

// The whole Stable Diffusion run of tests/fixtures/text-to-image through the CLI: two prompts (one with Unicode, CJK
// and emoji), two negative prompts (one empty), CFG 7.5 with rescale 0.7, 10 steps, the fixture's initial latents.
// The latents it saves and the image it decodes equal diffusers' StableDiffusionPipeline to float32 rounding.
TEST(CliSample, TextToImageEqualsStableDiffusionPipeline) {
  for (const std::string variant : {"sd1", "sd2"}) {
    diffuse::testing::TempDir dir;
    const auto root = diffuse::testing::fixture("text-to-image/" + variant);
    const auto ref = diffuse::load_safetensors(root + "/reference.safetensors");
    const auto j = diffuse::load_json(root + "/reference.json");
    std::string prompts, negatives;
    for (int i = 0; i < 2; ++i) {
      prompts += j["prompts"][i].get<std::string>() + "\n";
      negatives += j["negative_prompts"][i].get<std::string>() + "\n";
    }
    diffuse::write_file_atomic(dir / "prompts.txt", prompts);
    diffuse::write_file_atomic(dir / "negatives.txt", negatives);
    diffuse::save_safetensors(dir / "noise.safetensors", {{"noise", ref.at("pipe.init_latents")}});
    auto r = diffuse::testing::run_cli("sample --model " + root + "/pipe --prompts " + (dir / "prompts.txt") +
                                       " --negative-prompts " + (dir / "negatives.txt") + " --cfg 7.5 --cfg-rescale 0.7 "
                                       "--steps 10 --n 2 --height 64 --width 96 --init-noise " + (dir / "noise.safetensors") +
                                       " --save-raw " + (dir / "raw.safetensors") + " --out " + (dir / "out") + " --quiet");
    ASSERT_EQ(r.code, 0) << r.output;
    const auto raw = diffuse::load_safetensors(dir / "raw.safetensors");
    const auto& want = ref.at("pipe.final_latents");
    EXPECT_LE((raw.at("latents") - want).abs().max().item<double>(), 2e-5 * std::max(1.0, want.abs().max().item<double>()))
        << variant;
    const auto image = (raw.at("sample") / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1});
    EXPECT_LE((image - ref.at("pipe.image")).abs().max().item<double>(), 2e-5) << variant;
    // Each PNG names its prompt, negative prompt and settings in a "parameters" text chunk.
    const auto png = diffuse::read_file(dir / "out/000001.png");
    EXPECT_NE(png.find("iTXtparameters"), std::string::npos);
    EXPECT_NE(png.find("Steps: 10, Sampler: ddim"), std::string::npos);
    EXPECT_NE(diffuse::read_file(dir / "out/000000.png").find("Negative prompt: lowres, bad anatomy"), std::string::npos);
  }
  auto bad = diffuse::testing::run_cli("sample --model " + diffuse::testing::fixture("text-to-image/sd1/pipe") +
                                       " --prompts /nonexistent/prompts.txt --quiet");
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.output.find("error: cannot read '/nonexistent/prompts.txt'"), std::string::npos) << bad.output;
}
