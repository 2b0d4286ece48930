// Latent diffusion plumbing: encoding a data set, the latent cache and its invalidation, `diffuse train --vae`
// and `diffuse sample` decoding through the run's autoencoder.
#include <gtest/gtest.h>

#include <filesystem>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/data/data.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/core/scheduler_config.h"
#include "diffuse/models/vae.h"
#include "cli_util.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::run_cli;
using diffuse::testing::TempDir;

namespace {

AutoencoderKL tiny_vae(uint64_t seed) {
  AutoencoderKLConfig c;
  c.in_channels = c.out_channels = 1;
  c.sample_size = 16;
  c.block_out_channels = {8, 16};
  c.down_block_types.assign(2, "DownEncoderBlock2D");
  c.up_block_types.assign(2, "UpDecoderBlock2D");
  c.norm_num_groups = 4;
  c.latent_channels = 2;
  c.scaling_factor = 0.5;
  torch::manual_seed(seed);
  AutoencoderKL m(c);
  m->eval();
  return m;
}

}  // namespace

TEST(Latents, EncodeDatasetIsThePosteriorDrawTimesTheScaleAndIndependentOfBatch) {
  auto vae = tiny_vae(1);
  auto data = make_shapes(12, 16, 3);
  auto all = encode_dataset(vae, data, 12);
  ASSERT_EQ(all.images.sizes(), (torch::IntArrayRef{12, 2, 8, 8}));
  EXPECT_TRUE(torch::equal(all.labels, data.labels));
  EXPECT_NE(all.name.find("latents"), std::string::npos);
  auto chunked = encode_dataset(vae, data, 5);
  EXPECT_TRUE(torch::allclose(all.images, chunked.images, 1e-5, 1e-6));
  // Image 7 by hand: its own posterior, its own noise draw (seed 0, index 7), times scaling_factor.
  torch::NoGradGuard ng;
  auto posterior = vae->encode(data.images.narrow(0, 7, 1));
  auto z = posterior.mean + (0.5 * posterior.logvar).exp() * make_noise({2, 8, 8}, 1, 0, 7);
  EXPECT_TRUE(torch::allclose(all.images.narrow(0, 7, 1), 0.5 * z, 1e-5, 1e-6));
  // The wrong channel count or a size the encoder cannot halve is refused by name.
  auto rgb = fit_dataset(data, 3, 16, Fit::pad);
  EXPECT_NE(error_of([&] { encode_dataset(vae, rgb, 4); }).find("1 channels"), std::string::npos);
  auto odd = fit_dataset(data, 1, 15, Fit::pad);
  EXPECT_NE(error_of([&] { encode_dataset(vae, odd, 4); }).find("downsampling factor 2"), std::string::npos);
}

TEST(Latents, CacheHitsAndIsReplacedWhenTheAutoencoderChanges) {
  TempDir dir;
  auto vae = tiny_vae(2);
  auto data = make_shapes(10, 16, 4);
  auto first = cached_latents(vae, data, dir / "cache", 4);
  EXPECT_EQ(first.event, "created");
  ASSERT_TRUE(std::filesystem::exists(first.path));
  auto again = cached_latents(vae, data, dir / "cache", 4);
  EXPECT_EQ(again.event, "hit");
  EXPECT_EQ(again.path, first.path);
  EXPECT_TRUE(torch::equal(again.latents.images, first.latents.images));
  EXPECT_TRUE(torch::equal(again.latents.labels, data.labels));

  // Other data: another file.
  auto other = cached_latents(vae, make_shapes(10, 16, 5), dir / "cache", 4);
  EXPECT_EQ(other.event, "created");
  EXPECT_NE(other.path, first.path);

  // A changed weight (or scaling factor) changes the fingerprint: recomputed, replaced in place.
  const auto fp = vae_fingerprint(vae);
  {
    torch::NoGradGuard ng;
    vae->parameters().front().add_(0.01);
  }
  EXPECT_NE(vae_fingerprint(vae), fp);
  auto changed = cached_latents(vae, data, dir / "cache", 4);
  EXPECT_EQ(changed.event.rfind("replaced (it was made by another autoencoder", 0), 0u) << changed.event;
  EXPECT_EQ(changed.path, first.path);
  EXPECT_FALSE(torch::allclose(changed.latents.images, first.latents.images));
  EXPECT_EQ(cached_latents(vae, data, dir / "cache", 4).event, "hit");
  const auto fp2 = vae_fingerprint(vae);
  vae->set_scaling_factor(0.25);
  EXPECT_NE(vae_fingerprint(vae), fp2);

  // A truncated cache file is recomputed, never trusted.
  std::filesystem::resize_file(first.path, 100);
  auto repaired = cached_latents(vae, data, dir / "cache", 4);
  EXPECT_EQ(repaired.event.rfind("replaced (unreadable", 0), 0u) << repaired.event;
  EXPECT_TRUE(torch::allclose(repaired.latents.images, 0.5 * changed.latents.images, 1e-5, 1e-6));
}

TEST(Latents, ResolveVaeFolder) {
  TempDir dir;
  auto vae = tiny_vae(3);
  save_vae(vae, dir / "run/vae_ema");
  save_vae(vae, dir / "run/vae");
  EXPECT_EQ(resolve_vae_folder(dir / "run"), dir / "run/vae_ema");
  EXPECT_EQ(resolve_vae_folder(dir / "run/vae"), dir / "run/vae");
  EXPECT_NE(error_of([&] { resolve_vae_folder(dir.str()); }).find("is not an autoencoder"), std::string::npos);
}

// For any prediction error, L_v / L_eps = (SNR + 1) / SNR at each t (000 document): analyze loss's CSV.
void expect_v_eps_loss_ratio(const std::string& csv) {
  std::istringstream rows(read_file(csv));
  std::string line;
  std::getline(rows, line);  // t,condition,snr,loss_own,loss_eps,loss_v,loss_x0,ratio_v_eps_measured,ratio_v_eps_predicted
  int checked = 0;
  while (std::getline(rows, line)) {
    std::vector<double> v;
    std::istringstream cells(line);
    for (std::string c; std::getline(cells, c, ',');) v.push_back(std::stod(c));
    ASSERT_EQ(v.size(), 9u) << line;
    if (v[2] > 1e-6 && std::isfinite(v[8])) {
      EXPECT_NEAR(v[7] / v[8], 1.0, 1e-4) << line;
      ++checked;
    }
  }
  EXPECT_GE(checked, 3);
}

// A noisy classifier trained on the run's latents guides it; a pixel-space one is refused.
void check_latent_classifier_guidance(const TempDir& dir, const std::string& data) {
  auto r = run_cli("train-classifier" + data + " --vae " + dir / "run" + " --latent-cache " + dir / "cache" +
                   " --channels 8,16 --attention-levels none --norm-groups 4 --batch 8 --heldout 8 --steps 2 --out " +
                   dir / "clf");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("cache hit"), std::string::npos) << r.output;  // the run's vae/ is the same autoencoder
  EXPECT_EQ(load_json(dir / "clf/classifier/config.json")["in_channels"], 2);
  r = run_cli("sample --model " + dir / "run" + " --n 2 --steps 2 --quiet --classifier " + dir / "clf" +
              " --classifier-scale 1 --class 1 --out " + dir / "guided");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "guided/grid.png"));
  // A pixel-space classifier cannot guide latents.
  r = run_cli("train-classifier" + data + " --channels 8,16 --attention-levels none --norm-groups 4 --batch 8 "
              "--heldout 8 --steps 1 --out " + dir / "pixel-clf");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run_cli("sample --model " + dir / "run" + " --n 1 --steps 1 --quiet --classifier " + dir / "pixel-clf" +
              " --classifier-scale 1 --out " + dir / "bad");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("trained on the same latents"), std::string::npos) << r.output;
}

TEST(LatentDiffusionCli, TrainsOnCachedLatentsSamplesAndDecodes) {
  TempDir dir;
  const std::string data = " --data synthetic-shapes --synthetic-count 64 --size 16 --threads 1 --quiet";
  auto r = run_cli("train-vae" + data + " --channels 8,16 --norm-groups 4 --latent-channels 2 --batch 8 --steps 2 "
                   "--heldout 8 --scale-images 16 --out " + dir / "vae");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string train = "train" + data + " --vae " + dir / "vae" + " --latent-cache " + dir / "cache" +
                            " --channels 16,16 --attention-levels none --norm-groups 4 --batch 8 --out " + dir / "run";
  r = run_cli(train + " --steps 2");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("cache created"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[64, 2, 8, 8]"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "run/vae/config.json"));
  EXPECT_EQ(load_json(dir / "run/unet/config.json")["in_channels"], 2);
  EXPECT_EQ(load_json(dir / "run/unet/config.json")["sample_size"], 8);

  // Resuming uses the run's own copy of the autoencoder: same fingerprint, so the cache hits.
  r = run_cli("train --out " + dir / "run" + " --resume --steps 3 --latent-cache " + dir / "cache" + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("cache hit"), std::string::npos) << r.output;

  // Sampling decodes: the stored images are the autoencoder's decoding of the stored latents.
  r = run_cli("sample --model " + dir / "run" + " --n 3 --steps 2 --quiet --save-raw " + dir / "raw.safetensors" +
              " --out " + dir / "samples");
  ASSERT_EQ(r.code, 0) << r.output;
  auto raw = load_safetensors(dir / "raw.safetensors");
  ASSERT_EQ(raw.at("sample").sizes(), (torch::IntArrayRef{3, 1, 16, 16}));
  ASSERT_EQ(raw.at("latents").sizes(), (torch::IntArrayRef{3, 2, 8, 8}));
  auto vae = load_vae(dir / "run/vae", torch::kCPU);
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::allclose(vae->decode_scaled(raw.at("latents")), raw.at("sample"), 1e-5, 1e-6));
  EXPECT_TRUE(std::filesystem::exists(dir / "samples/grid.png"));

  // The per-timestep loss and K(t) of a latent model are measured on latents: held-out images encoded by the run's
  // vae/. For any prediction error, L_v / L_eps = (SNR + 1) / SNR at each t (000 document), in latent space too.
  r = run_cli("analyze loss --model " + dir / "run" + " --n 6 --points 5 --out " + dir / "loss");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("encoded by the run's vae/"), std::string::npos) << r.output;
  ASSERT_NO_FATAL_FAILURE(expect_v_eps_loss_ratio(dir / "loss/loss_per_t.csv"));
  r = run_cli("analyze lipschitz --model " + dir / "run" + " --n 2 --dt 5 --dense-until 10 --stride 400 --out " + dir / "loss");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "loss/lipschitz.csv"));

  ASSERT_NO_FATAL_FAILURE(check_latent_classifier_guidance(dir, data));

  // A pixel-space VAE mismatch is named.
  r = run_cli("sample --model " + dir / "run" + " --n 1 --steps 1 --quiet --vae " + dir / "run/unet");
  EXPECT_EQ(r.code, 1);
  r = run_cli("train" + data + " --vae " + dir / "nowhere --out " + dir / "run2 --steps 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("is not an autoencoder"), std::string::npos) << r.output;
}
