// Text-to-image (Stable Diffusion 1.x / 2.x shaped pipelines) against diffusers 0.40 and transformers' CLIP: the
// tiny random-weight pipelines of tests/fixtures/text-to-image (README there; generator in
// tests/fixtures/generators/gen_fixtures_t2i.py). Every stage is compared: token ids exactly, tensors to float32
// rounding, and a whole 10-step CFG run with rescale and negative prompts.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "diffuse/io/files.h"
#include "diffuse/io/image_io.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/models/unet_condition.h"
#include "diffuse/models/vae.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/sample/single_file.h"
#include "diffuse/text/clip_text.h"
#include "diffuse/text/clip_tokenizer.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
using diffuse::testing::expect_error;

std::string fixture(const std::string& variant) { return std::string(DIFFUSE_FIXTURES) + "/text-to-image/" + variant; }
std::string pipe(const std::string& variant) { return fixture(variant) + "/pipe"; }

struct Reference {
  std::map<std::string, torch::Tensor> t;
  nlohmann::json j;
  explicit Reference(const std::string& variant)
      : t(diffuse::load_safetensors(fixture(variant) + "/reference.safetensors")),
        j(diffuse::load_json(fixture(variant) + "/reference.json")) {}
  const torch::Tensor& operator[](const std::string& name) const { return t.at(name); }
};

// Within float32 rounding of a computation of this depth: |a - b| <= 1e-5 * max(1, max |b|) elementwise.
void expect_close(const torch::Tensor& ours, const torch::Tensor& reference, const std::string& what, double rel = 1e-5) {
  ASSERT_EQ(ours.sizes(), reference.sizes()) << what;
  const double scale = std::max(1.0, reference.abs().max().item<double>());
  const double diff = (ours.to(torch::kFloat64) - reference.to(torch::kFloat64)).abs().max().item<double>();
  EXPECT_LE(diff, rel * scale) << what << ": max |diff| " << diff << " at scale " << scale;
}

std::vector<int64_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int64_t>>(); }

class TextToImage : public ::testing::TestWithParam<std::string> {};
INSTANTIATE_TEST_SUITE_P(Sd, TextToImage, ::testing::Values("sd1", "sd2"));

TEST_P(TextToImage, TokenizerIdsEqualTransformersClipTokenizer) {
  const Reference ref(GetParam());
  auto tokenizer = diffuse::ClipTokenizer::load(pipe(GetParam()) + "/tokenizer");
  EXPECT_EQ(tokenizer.pad_id(), ref.j["tokenizer"]["pad_id"].get<int64_t>());
  EXPECT_EQ(tokenizer.max_length(), 77);
  int k = 0;
  for (const auto& c : ref.j["token_cases"]) {
    const auto text = c["text"].get<std::string>();
    EXPECT_EQ(tokenizer.tokenize(text), c["bpe_tokens"].get<std::vector<std::string>>()) << text;
    EXPECT_EQ(tokenizer.encode(text), ids_of(c["ids_full"])) << text;
    const auto padded = tokenizer.encode_padded(text);
    EXPECT_EQ(padded.ids, ids_of(c["ids_77"])) << text;
    const auto stored = ref[("tokens." + std::to_string(k++) + ".ids_77")];
    EXPECT_EQ(padded.ids, std::vector<int64_t>(stored.data_ptr<int64_t>(), stored.data_ptr<int64_t>() + stored.numel()));
    EXPECT_EQ(!padded.dropped.empty(), c["truncated"].get<bool>()) << text;
  }
  // The 173-token prompt: what truncation dropped is named (its text as transformers' convert_tokens_to_string gives
  // it: each word's "</w>" as a space, so punctuation stands apart).
  const auto long_prompt = ref.j["token_cases"][2]["text"].get<std::string>();
  const auto dropped = tokenizer.encode_padded(long_prompt).dropped;
  EXPECT_NE(dropped.find("studio lighting , sharp focus , 8 k"), std::string::npos) << dropped;
}

TEST_P(TextToImage, ClipStyleNormalizationMatchesTheFixturesSecondReading) {
  const Reference ref(GetParam());
  auto tokenizer = diffuse::ClipTokenizer::load(pipe(GetParam()) + "/tokenizer");
  tokenizer.normalization = diffuse::TextNormalization::clip;
  for (const auto& c : ref.j["token_cases"])
    EXPECT_EQ(tokenizer.encode(c["text"].get<std::string>()), ids_of(c["ids_full_clipstyle"])) << c["text"];
}

TEST(ClipTokenizer, InvalidUtf8AndBrokenFilesAreClearErrors) {
  auto tokenizer = diffuse::ClipTokenizer::load(pipe("sd2") + "/tokenizer");
  expect_error([&] { tokenizer.encode("caf\xc3"); }, "not valid UTF-8 (byte 3)");
  expect_error([&] { tokenizer.encode("\xff\xfe"); }, "not valid UTF-8");
  diffuse::testing::TempDir dir;
  expect_error([&] { diffuse::ClipTokenizer::load(dir.str()); }, "vocab.json");
  fs::copy_file(pipe("sd2") + "/tokenizer/vocab.json", dir / "vocab.json");
  expect_error([&] { diffuse::ClipTokenizer::load(dir.str()); }, "merges.txt");
  std::ofstream(dir / "merges.txt") << "#version: 0.2\na b c\n";
  expect_error([&] { diffuse::ClipTokenizer::load(dir.str()); }, "line 2");
  std::ofstream(dir / "vocab.json") << "{\"a\": 1,";
  expect_error([&] { diffuse::ClipTokenizer::load(dir.str()); }, "vocab.json");
}

TEST_P(TextToImage, TextEncoderEqualsCLIPTextModel) {
  const Reference ref(GetParam());
  auto te = diffuse::load_clip_text_model(pipe(GetParam()) + "/text_encoder", torch::kCPU);
  torch::NoGradGuard no_grad;
  const auto out = te->forward(ref["text.input_ids"]);
  expect_close(out.last_hidden_state, ref["text.last_hidden_state"], "last_hidden_state");
  expect_close(out.pooler_output, ref["text.pooler_output"], "pooler_output");
  ASSERT_EQ(out.hidden_states.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    expect_close(out.hidden_states[i], ref["text.hidden_states." + std::to_string(i)], "hidden_states." + std::to_string(i));
  expect_close(te->encode(ref["text.input_ids"], 1), ref["text.clip_skip1"], "clip_skip 1");
}

TEST_P(TextToImage, UNetEqualsUNet2DConditionModel) {
  const Reference ref(GetParam());
  auto unet = diffuse::load_unet_condition(pipe(GetParam()) + "/unet", torch::kCPU);
  unet->eval();
  torch::NoGradGuard no_grad;
  expect_close(unet->forward(ref["unet.sample"], ref["unet.timesteps"], ref["unet.encoder_hidden_states"]), ref["unet.out"],
               "unet t = [999, 500, 1]");
  expect_close(unet->forward(ref["unet.sample"], torch::tensor(250), ref["unet.encoder_hidden_states"]),
               ref["unet.out_t_scalar_250"], "unet t = 250");
  // The training target and loss of the pipeline's schedule (v for sd2 with zero terminal SNR, eps for sd1).
  auto pred = unet->forward(ref["train.noisy"], ref["train.timesteps"], ref["unet.encoder_hidden_states"]);
  expect_close(pred, ref["train.unet_out"], "unet on noisy latents");
  EXPECT_NEAR(torch::mse_loss(pred, ref["train.v_target"]).item<double>(), ref["train.mse"].item<double>(),
              1e-5 * ref["train.mse"].item<double>());
}

TEST_P(TextToImage, AutoencoderOfThePipelineEqualsAutoencoderKL) {
  const Reference ref(GetParam());
  auto vae = diffuse::load_vae(pipe(GetParam()) + "/vae", torch::kCPU);
  vae->eval();
  torch::NoGradGuard no_grad;
  const auto posterior = vae->encode(ref["vae.image"]);
  expect_close(posterior.mean, ref["vae.latent_mean"], "vae mean");
  expect_close(posterior.std, ref["vae.latent_std"], "vae std");
  expect_close(vae->decode(ref["vae.decode_in"]), ref["vae.decode_out"], "vae decode");
}

TEST_P(TextToImage, EncodePromptEqualsDiffusers) {
  const Reference ref(GetParam());
  auto run = diffuse::load_run(pipe(GetParam()));
  ASSERT_TRUE(run.is_text());
  const auto prompts = ref.j["prompts"].get<std::vector<std::string>>();
  const auto negatives = ref.j["negative_prompts"].get<std::vector<std::string>>();
  const std::vector<std::string> two(prompts.begin(), prompts.begin() + 2);
  expect_close(diffuse::encode_prompts(run, two), ref["encode_prompt.prompt_embeds"], "prompt_embeds");
  expect_close(diffuse::encode_prompts(run, negatives), ref["encode_prompt.negative_prompt_embeds"], "negative_prompt_embeds");
  expect_close(diffuse::encode_prompts(run, two, 1), ref["encode_prompt.prompt_embeds_clip_skip1"], "clip_skip 1");
  std::vector<std::string> notes;
  diffuse::encode_prompts(run, {prompts[2]}, 0, &notes);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("dropped"), std::string::npos) << notes[0];
}

// The whole pipeline: 10 DDIM steps (sd2: trailing, v, zero terminal SNR; sd1: leading, eps), CFG 7.5 with rescale
// 0.7 and negative prompts, from the fixture's initial latents, 64x96 pixels. Every latent after every step and the
// decoded image equal diffusers' StableDiffusionPipeline to float32 rounding. At sd2's first step (t = 999, SNR 0)
// diffusers' DDIMScheduler computes x0 = a x_t - s v with a = 0 exactly, as diffuse does, so no difference is expected.
TEST_P(TextToImage, WholePipelineEqualsStableDiffusionPipeline) {
  const Reference ref(GetParam());
  auto run = diffuse::load_run(pipe(GetParam()));
  const auto prompts = ref.j["prompts"].get<std::vector<std::string>>();
  diffuse::GenerateOptions o;
  o.prompts = {prompts[0], prompts[1]};
  o.negative_prompts = ref.j["negative_prompts"].get<std::vector<std::string>>();
  o.n = 2;
  o.steps = 10;
  o.cfg = 7.5;
  o.cfg_rescale = 0.7;
  o.height = 64;
  o.width = 96;
  o.init_noise = ref["pipe.init_latents"];
  std::vector<torch::Tensor> steps;
  const auto g = diffuse::generate(run, o);
  EXPECT_EQ(g.sampler, "ddim");
  const auto& ts = ref["pipe.timesteps"];
  ASSERT_EQ(g.timesteps.size(), size_t(ts.numel()));
  for (int64_t i = 0; i < ts.numel(); ++i) EXPECT_EQ(g.timesteps[size_t(i)], double(ts[i].item<int64_t>()));
  expect_close(g.latents, ref["pipe.final_latents"], "final latents", 2e-5);
  expect_close((g.images / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}), ref["pipe.image"], "image", 2e-5);
  EXPECT_EQ(g.prompts, o.prompts);
  EXPECT_EQ(g.negative_prompts, o.negative_prompts);
}

TEST(UNetCondition, ConfigRoundTripsAndRefusesWhatItDoesNotBuild) {
  const auto json = diffuse::load_json(pipe("sd2") + "/unet/config.json");
  const auto c = diffuse::UNetConditionConfig::from_json(json);
  EXPECT_EQ(c.heads, (std::vector<int64_t>{2, 4, 4}));
  EXPECT_TRUE(c.use_linear_projection);
  EXPECT_EQ(diffuse::UNetConditionConfig::from_json(c.to_json()).to_json(), c.to_json());
  EXPECT_EQ(c.to_json()["attention_head_dim"], json["attention_head_dim"]);
  auto with = [&](const std::string& key, nlohmann::json value) {
    auto j = json;
    j[key] = value;
    return j;
  };
  expect_error([&] { diffuse::UNetConditionConfig::from_json(with("addition_embed_type", "text_time")); },
               "'addition_embed_type'");
  expect_error([&] { diffuse::UNetConditionConfig::from_json(with("transformer_layers_per_block", 2)); },
               "'transformer_layers_per_block'");
  expect_error([&] { diffuse::UNetConditionConfig::from_json(with("frobnicate", 1)); }, "'frobnicate'");
  EXPECT_NO_THROW(diffuse::UNetConditionConfig::from_json(with("transformer_layers_per_block", {1, 1, 1})));
  auto bad_heads = diffuse::UNetConditionConfig::from_json(with("attention_head_dim", {2, 3, 4}));
  expect_error([&] { bad_heads.validate(); }, "'attention_head_dim'");
}

TEST(UNetCondition, SavedFolderLoadsWithTheSameOutputs) {
  diffuse::testing::TempDir dir;
  auto unet = diffuse::load_unet_condition(pipe("sd1") + "/unet", torch::kCPU);
  diffuse::save_unet_condition(unet, dir / "unet");
  auto again = diffuse::load_unet_condition(dir / "unet", torch::kCPU);
  torch::NoGradGuard no_grad;
  auto x = torch::randn({1, 4, 8, 8});
  auto ctx = torch::randn({1, 77, 32});
  EXPECT_TRUE(torch::equal(unet->forward(x, torch::tensor(10), ctx), again->forward(x, torch::tensor(10), ctx)));
}

TEST(TextPipeline, BadInputIsOneClearError) {
  diffuse::testing::TempDir dir;
  fs::copy(pipe("sd2"), dir / "p", fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(dir.path)) fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  auto run = diffuse::load_run(dir / "p");
  diffuse::GenerateOptions o;
  o.n = 1;
  o.steps = 2;
  expect_error([&] { diffuse::generate(run, o); }, "pass --prompt");
  o.prompts = {"a cat"};
  o.height = 60;
  expect_error([&] { diffuse::generate(run, o); }, "--height 60 is not a positive multiple of 32");
  o.height = 0;
  o.negative_prompts = {"dog"};
  expect_error([&] { diffuse::generate(run, o); }, "--negative-prompt acts through classifier-free guidance");
  // A text encoder of another width than the UNet's cross_attention_dim.
  auto te_config = diffuse::load_json(dir / "p/text_encoder/config.json");
  auto unet_config = diffuse::load_json(dir / "p/unet/config.json");
  unet_config["cross_attention_dim"] = 16;
  diffuse::write_file_atomic(dir / "p/unet/config.json", unet_config.dump());
  expect_error([&] { diffuse::load_run(dir / "p"); }, "cross_attention_dim");
  unet_config["cross_attention_dim"] = 32;
  diffuse::write_file_atomic(dir / "p/unet/config.json", unet_config.dump());
  // A truncated weight file, a missing tokenizer file, non-finite weights.
  const auto weights = dir / "p/text_encoder/model.safetensors";
  const auto bytes = diffuse::read_file(weights);
  diffuse::write_file_atomic(weights, bytes.substr(0, bytes.size() / 2));
  expect_error([&] { diffuse::load_run(dir / "p"); }, "model.safetensors");
  diffuse::write_file_atomic(weights, bytes);
  fs::remove(dir / "p/tokenizer/merges.txt");
  expect_error([&] { diffuse::load_run(dir / "p"); }, "merges.txt");
  fs::copy_file(pipe("sd2") + "/tokenizer/merges.txt", dir / "p/tokenizer/merges.txt");
  auto tensors = diffuse::load_safetensors(weights);
  tensors.begin()->second[0] = std::numeric_limits<float>::quiet_NaN();
  diffuse::save_safetensors(weights, tensors);
  expect_error([&] { diffuse::load_run(dir / "p"); }, "NaN or infinite");
}

TEST(UNetConditionSlow, FullSizeConfigsBuildWithTheirParameterCounts) {
  // SD 1.5 and SD 2.1's unet/config.json, random weights: the parameter counts diffusers reports for them.
  diffuse::UNet2DConditionModel sd15(diffuse::sd15_unet_config());
  EXPECT_EQ(diffuse::parameter_count(*sd15), 859520964);
  diffuse::UNet2DConditionModel sd21(diffuse::sd21_unet_config());
  EXPECT_EQ(diffuse::parameter_count(*sd21), 865910724);
}

}  // namespace

namespace {
TEST(TextPipeline, ExampleTxt2ImgRuns) {
  diffuse::testing::TempDir dir;
  const auto png = dir / "cat.png";
  const auto code = std::system((std::string(DIFFUSE_EXAMPLE_TXT2IMG) + " " + pipe("sd2") + " 'a cat, white background' " +
                                 png + " 'blurry' 2> " + (dir / "log.txt")).c_str());
  ASSERT_EQ(code, 0) << diffuse::read_file(dir / "log.txt");
  const auto image = diffuse::read_image(png);
  EXPECT_EQ(image.sizes(), (torch::IntArrayRef{3, 64, 64}));
}
}  // namespace

namespace {
// A scheduler class diffuse does not implement (DEISMultistepScheduler) is refused by name, never sampled as DDIM
// without a word; with --sampler the substitution is stated. (SD 1.x's PNDMScheduler is sampled as plms.)
TEST(TextPipeline, AnUnimplementedSchedulerClassIsRefusedOrNamed) {
  diffuse::testing::TempDir dir;
  auto config = diffuse::load_json(pipe("sd1") + "/scheduler/scheduler_config.json");
  config["_class_name"] = "DEISMultistepScheduler";
  diffuse::write_file_atomic(dir / "scheduler_config.json", config.dump());
  diffuse::LoadOptions lo;
  lo.scheduler_file = dir / "scheduler_config.json";
  auto run = diffuse::load_run(pipe("sd1"), lo);
  diffuse::GenerateOptions o;
  o.prompts = {"a cat"};
  o.n = 1;
  o.steps = 2;
  expect_error([&] { diffuse::generate(run, o); }, "names DEISMultistepScheduler, which diffuse does not implement");
  o.sampler = "ddim";
  const auto g = diffuse::generate(run, o);
  ASSERT_EQ(g.notes.size(), 1u);
  EXPECT_NE(g.notes[0].find("DEISMultistepScheduler"), std::string::npos) << g.notes[0];
}
}  // namespace

namespace {
// Image to image. diffusers' get_timesteps: int(steps * strength) steps from the end of the walk. At strength 1 on a
// zero-terminal-SNR schedule (sd2) the first level has a = 0, so the init image has no weight and the run equals
// text to image exactly; at 0.5 the walk is the full walk's second half, from a_t x0 + s_t eps.
TEST(TextPipeline, ImageToImageRunsTheTailOfTheWalk) {
  EXPECT_EQ(diffuse::partial_walk_start(50, 0.8), 10);
  EXPECT_EQ(diffuse::partial_walk_start(10, 0.55), 5);
  EXPECT_EQ(diffuse::partial_walk_start(10, 1.0), 0);
  expect_error([] { diffuse::partial_walk_start(10, 0.05); }, "runs no step");
  expect_error([] { diffuse::partial_walk_start(10, 1.5); }, "(0, 1]");
  auto run = diffuse::load_run(pipe("sd2"));
  diffuse::GenerateOptions o;
  o.prompts = {"a white bald eagle on a white background"};
  o.n = 2;
  o.steps = 10;
  o.cfg = 5;
  o.height = 64;
  o.width = 96;
  const auto text = diffuse::generate(run, o);
  o.init_images = torch::rand({1, 3, 64, 96}) * 2 - 1;
  o.height = o.width = 0;
  o.strength = 1.0;
  const auto full = diffuse::generate(run, o);
  EXPECT_TRUE(torch::allclose(full.latents, text.latents, 1e-5, 1e-6));
  o.strength = 0.5;
  const auto half = diffuse::generate(run, o);
  ASSERT_EQ(half.timesteps.size(), 5u);
  EXPECT_EQ(half.timesteps, std::vector<double>(text.timesteps.begin() + 5, text.timesteps.end()));
  EXPECT_FALSE(torch::allclose(half.latents, text.latents, 1e-3, 1e-3));
  o.init_images = torch::rand({1, 3, 60, 96});
  expect_error([&] { diffuse::generate(run, o); }, "--height 60 is not a positive multiple of 32");
}
}  // namespace

namespace {
// Single-file checkpoints: tests/fixtures/text-to-image/*/single_file.safetensors hold each tiny pipeline's networks
// in the original layout (made by tests/fixtures/generators/gen_single_file.py, which checks with diffusers' own
// single-file converters that they map back to the pipeline folder exactly). Read through diffuse's key map with the
// folder's configs (heads are not in the shapes), the UNet, text encoder and VAE give the folder's outputs.
TEST_P(TextToImage, SingleFileCheckpointLoadsIntoTheSameNetworks) {
  const Reference ref(GetParam());
  diffuse::LoadOptions lo;
  lo.single_file_config = pipe(GetParam());
  lo.v_prediction = GetParam() == "sd2";
  auto run = diffuse::load_run(fixture(GetParam()) + "/single_file.safetensors", lo);
  ASSERT_TRUE(run.is_text());
  torch::NoGradGuard no_grad;
  expect_close(run.text_unet->forward(ref["unet.sample"], ref["unet.timesteps"], ref["unet.encoder_hidden_states"]),
               ref["unet.out"], "single-file unet");
  expect_close(run.text_encoder->forward(ref["text.input_ids"]).last_hidden_state, ref["text.last_hidden_state"],
               "single-file text encoder");
  expect_close(run.vae->decode(ref["vae.decode_in"]), ref["vae.decode_out"], "single-file vae");
  EXPECT_EQ(run.scheduler.prediction_type, GetParam() == "sd2" ? diffuse::Prediction::v : diffuse::Prediction::eps);
  diffuse::LoadOptions bare;
  expect_error([&] { diffuse::load_run(fixture(GetParam()) + "/single_file.safetensors", bare); }, "holds no tokenizer");
}

// The full-size originals: names and shapes of an SD 1.5 and an SD 2.1 original-layout file (written by the generator
// from diffusers models and checked by diffusers' converters). Every tensor maps to a diffusers name of the network
// built from the inferred config, with its shape: SD 1.5's and SD 2.1's own configs.
TEST(SingleFileSlow, FullSizeOriginalLayoutsMapOntoTheDiffusersNetworks) {
  for (const std::string family : {"sd15", "sd21"}) {
    const auto names = diffuse::load_json(std::string(DIFFUSE_FIXTURES) + "/text-to-image/" + family + "_original_names.json");
    std::map<std::string, torch::Tensor> tensors;
    for (const auto& [name, shape] : names.items())
      tensors[name] = torch::zeros(shape.get<std::vector<int64_t>>(), torch::kFloat16);
    diffuse::testing::TempDir dir;
    diffuse::save_safetensors(dir / "model.safetensors", tensors);
    tensors.clear();
    diffuse::SingleFileOptions o;
    o.v_prediction = family == "sd21";
    const auto ckpt = diffuse::read_original_checkpoint(dir / "model.safetensors", o);
    const auto want = family == "sd21" ? diffuse::sd21_unet_config() : diffuse::sd15_unet_config();
    EXPECT_EQ(ckpt.unet_config.to_json(), want.to_json()) << family;
    diffuse::UNet2DConditionModel unet(ckpt.unet_config);
    diffuse::testing::expect_names_and_shapes(diffuse::state_dict(*unet), ckpt.unet);
    diffuse::ClipTextModel text(ckpt.text_config);
    diffuse::testing::expect_names_and_shapes(diffuse::state_dict(*text), ckpt.text_encoder);
    diffuse::AutoencoderKL vae(ckpt.vae_config);
    diffuse::testing::expect_names_and_shapes(diffuse::state_dict(*vae), ckpt.vae);
  }
}
}  // namespace

namespace {
// Full size, random weights made here: an SD 1.5-shaped pipeline folder (the UNet, CLIP ViT-L's text tower, SD's
// autoencoder) and an SD 2.1-shaped single-file checkpoint in the original layout (every tensor of
// sd21_original_names.json) load and sample one CFG step at 64x64 pixels.
TEST(TextPipelineSlow, FullSizeSd15FolderAndSd21SingleFileLoadAndSample) {
  diffuse::testing::TempDir dir;
  const auto folder = dir / "sd15";
  fs::create_directories(folder);
  for (const char* part : {"tokenizer", "scheduler"})
    fs::copy(pipe("sd1") + "/" + part, folder + "/" + part, fs::copy_options::recursive);
  fs::copy_file(pipe("sd1") + "/model_index.json", folder + "/model_index.json");
  {
    diffuse::UNet2DConditionModel unet(diffuse::sd15_unet_config());
    diffuse::save_unet_condition(unet, folder + "/unet");
  }
  diffuse::ClipTextModel te(diffuse::sd15_text_encoder_config());
  diffuse::save_clip_text_model(te, folder + "/text_encoder");
  diffuse::AutoencoderKL vae(diffuse::sd_vae_config());
  diffuse::save_vae(vae, folder + "/vae");
  diffuse::GenerateOptions o;
  o.prompts = {"a photo of a cat"};
  o.n = 1;
  o.steps = 1;
  o.cfg = 7.5;
  o.height = o.width = 64;
  {
    auto run = diffuse::load_run(folder);
    const auto g = diffuse::generate(run, o);
    EXPECT_EQ(g.images.sizes(), (torch::IntArrayRef{1, 3, 64, 64}));
    EXPECT_TRUE(torch::isfinite(g.images).all().item<bool>());
  }
  fs::remove_all(folder);
  const auto names = diffuse::load_json(std::string(DIFFUSE_FIXTURES) + "/text-to-image/sd21_original_names.json");
  std::map<std::string, torch::Tensor> tensors;
  torch::manual_seed(0);
  for (const auto& [name, shape] : names.items())
    tensors[name] = (torch::randn(shape.get<std::vector<int64_t>>()) * 0.02).to(torch::kFloat16);
  diffuse::save_safetensors(dir / "sd21.safetensors", tensors);
  tensors.clear();
  diffuse::LoadOptions lo;
  lo.tokenizer = pipe("sd2") + "/tokenizer";
  lo.v_prediction = true;
  auto run = diffuse::load_run(dir / "sd21.safetensors", lo);
  EXPECT_EQ(diffuse::parameter_count(*run.text_unet), 865910724);
  EXPECT_EQ(run.text_encoder->config().num_hidden_layers, 23);
  const auto g = diffuse::generate(run, o);
  EXPECT_EQ(g.images.sizes(), (torch::IntArrayRef{1, 3, 64, 64}));
  EXPECT_TRUE(torch::isfinite(g.images).all().item<bool>());
}
}  // namespace
