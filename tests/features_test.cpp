// The feature network of diffuse eval (shipped weights, reference statistics, the hash guard), the metrics of
// samples with their floor, the sample-set loader and the eval CLI.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "cli_util.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/models/blocks.h"
#include "diffuse/eval/features.h"
#include "diffuse/io/image_io.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/scheduler_config.h"
#include "test_util.h"
#include <torch/torch.h>

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::run_cli;
using diffuse::testing::TempDir;

namespace {

std::string shipped() { return std::string(DIFFUSE_FIXTURES) + "/../../models/fmnist-features"; }

const Dataset& test_split() {
  static Dataset d = fit_dataset(load_fashion_mnist(kFashionMnistDir, "test"), 1, 32, Fit::pad);
  return d;
}

FeatureEvaluator& evaluator() {
  static FeatureEvaluator e = load_feature_evaluator(shipped(), torch::kCPU);
  return e;
}

EvalOptions fast_options() {
  EvalOptions o;
  o.kid_subsets = 10;
  return o;
}

}  // namespace

// The shipped weights load, match their reference file's hash, and classify a fixed subset of the test split
// (its first 2000 images) at >= 91%; their features of those images are the cached ones.
TEST(FeatureNet, ShippedWeightsReachAccuracy) {
  auto& e = evaluator();
  Dataset subset = test_split();
  subset.images = subset.images.slice(0, 0, 2000);
  subset.labels = subset.labels.slice(0, 0, 2000);
  double acc = classification_accuracy(e.net, subset);
  EXPECT_GE(acc, 0.91);
  auto out = extract_features(e.net, subset.images);
  auto cached = e.reference.features.slice(0, 0, 2000);
  // float16 storage: relative rounding 2^-11.
  EXPECT_LE((out.features - cached).abs().max().item<double>(), 1e-3 * out.features.abs().max().item<double>());
  EXPECT_EQ(e.reference.features.size(0), test_split().size());
  EXPECT_EQ(e.reference.features.size(1), e.net->config().feature_dim);
  EXPECT_TRUE(torch::equal(e.reference.labels, test_split().labels));
  EXPECT_LT(fs::file_size(shipped() + "/" + kWeightsFile), 2'000'000u);
}

// The cached statistics are those of the cached test features: FID-FMNIST of the test set against itself is 0
// (to the float16 rounding of the stored features), and the floor (half against half) is positive.
TEST(FeatureNet, TestSetAgainstItselfIsZeroAndFloorIsPositive) {
  auto& e = evaluator();
  const auto& f = e.reference.features;
  double trace = e.reference.stats.cov.trace().item<double>();
  auto probs = torch::softmax(e.net->logits(f), 1).detach();
  auto self = compute_metrics(f, probs, e.reference.labels, f, e.reference.stats, fast_options());
  EXPECT_LT(std::abs(self.fid), 1e-4 * trace);
  EXPECT_GT(self.class_accuracy, 0.91);  // the whole test split

  // 1000 real test images evaluated like samples: FID-FMNIST well above the self-distance, and close to the
  // floor, which is the same experiment on disjoint halves.
  auto images = test_split().images.slice(0, 0, 1000);
  auto r = evaluate_samples(e, images, test_split().labels.slice(0, 0, 1000), fast_options());
  EXPECT_EQ(r.floor.count, 1000);
  EXPECT_EQ(r.floor.reference_count, 5000);
  EXPECT_EQ(r.samples.reference_count, 10000);
  EXPECT_GT(r.floor.fid, 1e-3 * trace);
  EXPECT_GT(r.floor.fid, 100 * std::abs(self.fid));
  EXPECT_GT(r.samples.fid, 0.0);
  EXPECT_LT(r.samples.fid, 2.0 * r.floor.fid);
  EXPECT_NEAR(r.samples.kid.mean, 0.0, 5 * r.floor.kid.std + 1e-3);
  EXPECT_GE(r.floor.class_accuracy, 0.89);
  // Two samples of one distribution: most of each lies inside the other's k-NN manifold.
  for (double v : {r.floor.pr.precision, r.floor.pr.recall, r.samples.pr.precision, r.samples.pr.recall}) EXPECT_GT(v, 0.6);
  EXPECT_GT(r.floor.inception.mean, 5.0);  // confident and balanced over 10 classes: close to 10
  EXPECT_LE(r.floor.inception.mean, 10.0);
}

// Only images with a requested class in [0, C) count in the class accuracy; labels change no other metric.
TEST(FeatureNet, ClassAccuracyCountsOnlyRequestedClasses) {
  auto& e = evaluator();
  auto out = extract_features(e.net, test_split().images.slice(0, 0, 400));
  auto labels = test_split().labels.slice(0, 0, 400).clone();
  auto metrics = [&](const torch::Tensor& l) {
    return compute_metrics(out.features, out.probs, l, e.reference.features, e.reference.stats, fast_options());
  };
  auto right = metrics(labels);
  double expected = out.probs.argmax(1).eq(labels).to(torch::kFloat64).mean().item<double>();
  EXPECT_DOUBLE_EQ(right.class_accuracy, expected);
  EXPECT_GT(right.class_accuracy, 0.85);
  EXPECT_EQ(right.labelled, 400);
  labels.slice(0, 0, 200).fill_(-1);    // no requested class
  labels.slice(0, 200, 250).fill_(10);  // the null class of a conditional model
  auto part = metrics(labels);
  EXPECT_EQ(part.labelled, 150);
  double expected_part = out.probs.argmax(1).slice(0, 250).eq(labels.slice(0, 250)).to(torch::kFloat64).mean().item<double>();
  EXPECT_DOUBLE_EQ(part.class_accuracy, expected_part);
  auto none = metrics(torch::Tensor());
  EXPECT_EQ(none.class_accuracy, -1);
  EXPECT_EQ(none.labelled, 0);
  EXPECT_DOUBLE_EQ(none.fid, right.fid);
  EXPECT_DOUBLE_EQ(none.kid.mean, right.kid.mean);
  EXPECT_DOUBLE_EQ(none.pr.precision, right.pr.precision);
}

TEST(FeatureNet, BadInputIsRefused) {
  auto& e = evaluator();
  auto imgs = test_split().images.slice(0, 0, 300);
  EXPECT_NE(error_of([&] { evaluate_samples(e, imgs.repeat({1, 3, 1, 1}), {}); }).find("3 channel"), std::string::npos);
  EXPECT_NE(error_of([&] { evaluate_samples(e, imgs.slice(2, 2, 30).slice(3, 2, 30), {}); }).find("28x28"),
            std::string::npos);
  auto few = error_of([&] { evaluate_samples(e, imgs.slice(0, 0, 100), {}); });
  EXPECT_NE(few.find("at least 256"), std::string::npos) << few;

  TempDir dir;
  auto copy = dir / "net";
  fs::create_directories(copy);
  for (auto f : {"config.json", kWeightsFile}) fs::copy_file(shipped() + "/" + f, copy + "/" + f);
  auto missing = error_of([&] { load_feature_evaluator(copy, torch::kCPU); });
  EXPECT_NE(missing.find("do not exist"), std::string::npos) << missing;
  EXPECT_NE(missing.find("train-features"), std::string::npos) << missing;
  // Statistics of other weights: the hash guard names them stale.
  fs::copy_file(shipped() + "/" + kReferenceFile, copy + "/" + kReferenceFile);
  FeatureNet other(e.net->config());
  save_feature_net(other, copy);
  auto stale = error_of([&] { load_feature_evaluator(copy, torch::kCPU); });
  EXPECT_NE(stale.find("stale"), std::string::npos) << stale;
  EXPECT_NE(error_of([&] { load_feature_net(dir / "nowhere", torch::kCPU); }).find("does not exist"), std::string::npos);
}

// train_feature_net writes a folder that load_feature_evaluator accepts, with the command in its README.
TEST(FeatureNet, TrainingWritesALoadableFolder) {
  TempDir dir;
  const auto& test = test_split();
  Dataset small = test;
  small.images = test.images.slice(0, 0, 512);
  small.labels = test.labels.slice(0, 0, 512);
  FeatureTrainOptions o;
  o.epochs = 1;
  o.batch = 64;
  o.progress = false;
  FeatureNetConfig c;
  c.block_out_channels = {8, 8, 8};
  c.feature_dim = 16;
  auto r = train_feature_net(o, c, small, small, dir / "f", "diffuse train-features --out f", nullptr);
  EXPECT_EQ(r.steps, 8);
  EXPECT_GT(r.test_accuracy, 0.1);  // better than chance after 8 steps on the training images themselves
  auto e = load_feature_evaluator(dir / "f", torch::kCPU);
  EXPECT_EQ(e.reference.features.size(0), 512);
  EXPECT_EQ(e.net->config().feature_dim, 16);
  EXPECT_NE(read_file(dir / "f/README.md").find("diffuse train-features --out f"), std::string::npos);
}

TEST(FeatureNet, SampleSetsFromFoldersAndSafetensors) {
  TempDir dir;
  auto imgs = test_split().images.slice(0, 0, 5);
  fs::create_directories(dir / "s");
  for (int i = 0; i < 5; ++i) write_png(dir / ("s/00000" + std::to_string(i) + ".png"), imgs[i]);
  write_png(dir / "s/grid.png", imgs[0].repeat({1, 2, 2}));  // not a sample
  write_file_atomic(dir / "s/labels.csv", "file,class\n000004.png,7\n000001.png,3\n");
  auto set = load_sample_set(dir / "s");
  ASSERT_EQ(set.images.size(0), 5);
  EXPECT_TRUE(set.has_labels);
  EXPECT_EQ(set.labels[4].item<int64_t>(), 7);
  EXPECT_EQ(set.labels[1].item<int64_t>(), 3);
  EXPECT_EQ(set.labels[0].item<int64_t>(), -1);
  EXPECT_LT((set.images - imgs).abs().max().item<double>(), 1.0 / 127.5 + 1e-6);  // 8-bit PNG rounding

  save_safetensors(dir / "raw.safetensors", {{"sample", imgs}, {"labels", torch::arange(5, torch::kLong)}});
  auto raw = load_sample_set(dir / "raw.safetensors");
  EXPECT_TRUE(torch::equal(raw.images, imgs));
  EXPECT_TRUE(torch::equal(raw.labels, torch::arange(5, torch::kLong)));
  write_file_atomic(dir / "l.csv", "index,class\n2,9\n");
  auto relabelled = load_sample_set(dir / "raw.safetensors", dir / "l.csv");
  EXPECT_EQ(relabelled.labels[2].item<int64_t>(), 9);
  EXPECT_EQ(relabelled.labels[0].item<int64_t>(), -1);

  write_file_atomic(dir / "bad.csv", "file,class\n000009.png,1\n");
  EXPECT_NE(error_of([&] { load_sample_set(dir / "s", dir / "bad.csv"); }).find("000009.png"), std::string::npos);
  write_png(dir / "s/000005.png", imgs[0].slice(1, 0, 28).slice(2, 0, 28));
  EXPECT_NE(error_of([&] { load_sample_set(dir / "s"); }).find("one size"), std::string::npos);
  fs::create_directories(dir / "empty");
  EXPECT_NE(error_of([&] { load_sample_set(dir / "empty"); }).find("no PNG"), std::string::npos);
  save_safetensors(dir / "nosample.safetensors", {{"x", imgs}});
  EXPECT_NE(error_of([&] { load_sample_set(dir / "nosample.safetensors"); }).find("'sample'"), std::string::npos);
}

// diffuse eval end to end on a folder as diffuse sample writes it (PNGs + labels.csv), and its errors.
TEST(CliEval, FolderOfPngsEndToEnd) {
  TempDir dir;
  const int n = 256;
  auto imgs = test_split().images.slice(0, 0, n);
  std::string csv = "file,class\n";
  fs::create_directories(dir / "s");
  for (int i = 0; i < n; ++i) {
    char name[16];
    std::snprintf(name, sizeof(name), "%06d.png", i);
    write_png(dir / (std::string("s/") + name), imgs[i]);
    csv += std::string(name) + "," + std::to_string(test_split().labels[i].item<int64_t>()) + "\n";
  }
  write_file_atomic(dir / "s/labels.csv", csv);
  auto r = run_cli("eval --samples " + dir / "s" + " --features " + shipped() + " --kid-subsets 5");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("FID-FMNIST"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("floor"), std::string::npos) << r.output;
  auto j = load_json(dir / "s/eval.json");
  EXPECT_GT(j["samples"]["class_accuracy"].get<double>(), 0.85);
  EXPECT_EQ(j["samples"]["count"].get<int64_t>(), n);
  EXPECT_EQ(j["floor"]["count"].get<int64_t>(), n);
  EXPECT_TRUE(fs::exists(dir / "s/eval.csv"));
  EXPECT_EQ(read_file(dir / "s/eval.csv").rfind("metric,samples,floor\nFID-FMNIST,", 0), 0u);

  // --reference computes another real data set's statistics on the spot: the Fashion-MNIST test split itself
  // reproduces the cached statistics (which are stored in float16), and the brightness-spread test split is
  // much farther from these plain test images.
  const double fid = j["samples"]["fid_fmnist"].get<double>();
  auto same = run_cli("eval --samples " + dir / "s" + " --features " + shipped() +
                      " --kid-subsets 5 --reference fashion-mnist:test --out " + dir / "same");
  ASSERT_EQ(same.code, 0) << same.output;
  EXPECT_NEAR(load_json(dir / "same/eval.json")["samples"]["fid_fmnist"].get<double>(), fid, 0.01 * fid);
  auto bright = run_cli("eval --samples " + dir / "s" + " --features " + shipped() +
                        " --kid-subsets 5 --reference fashion-mnist-brightness:test --out " + dir / "bright");
  ASSERT_EQ(bright.code, 0) << bright.output;
  EXPECT_NE(bright.output.find("brightness"), std::string::npos) << bright.output;
  EXPECT_GT(load_json(dir / "bright/eval.json")["samples"]["fid_fmnist"].get<double>(), 3 * fid);
  auto nowhere = run_cli("eval --samples " + dir / "s" + " --features " + shipped() + " --reference " + dir / "nowhere");
  EXPECT_EQ(nowhere.code, 1);
  EXPECT_NE(nowhere.output.find("nowhere"), std::string::npos) << nowhere.output;

  auto few = run_cli("eval --samples " + dir / "s" + " --features " + shipped() + " --labels " + dir / "nope.csv");
  EXPECT_EQ(few.code, 1);
  EXPECT_NE(few.output.find("nope.csv"), std::string::npos) << few.output;
  fs::create_directories(dir / "rgb");
  for (int i = 0; i < 3; ++i) write_png(dir / ("rgb/00000" + std::to_string(i) + ".png"), imgs[i].repeat({3, 1, 1}));
  auto rgb = run_cli("eval --samples " + dir / "rgb" + " --features " + shipped());
  EXPECT_EQ(rgb.code, 1);
  EXPECT_NE(rgb.output.find("3 channel"), std::string::npos) << rgb.output;
  auto missing = run_cli("eval --samples " + dir / "s" + " --features " + dir / "nothing");
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.output.find("train-features"), std::string::npos) << missing.output;
}
