// diffuse train-features: the Fashion-MNIST feature network of the metrics (shipped in models/fmnist-features).
// diffuse eval: FID-FMNIST, KID, IS analogue, precision/recall and class accuracy of samples, with their floor.
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/models/blocks.h"
#include "diffuse/eval/features.h"
#include "diffuse/util/runtime.h"
#include <torch/torch.h>

namespace fs = std::filesystem;

namespace diffuse::cli {

std::string default_feature_folder() {
  if (const char* env = std::getenv("DIFFUSE_FEATURES")) return env;
  if (fs::exists("models/fmnist-features/config.json")) return "models/fmnist-features";
#ifdef DIFFUSE_SOURCE_DIR
  return std::string(DIFFUSE_SOURCE_DIR) + "/models/fmnist-features";
#else
  return "models/fmnist-features";
#endif
}

namespace {

struct TrainFeaturesOptions {
  FeatureTrainOptions train;
  std::string out, data = kFashionMnistDir;
  bool overwrite = false;
};

std::string shell_quote(const std::string& s) {
  if (s.find_first_of(" '\"$\\") == std::string::npos) return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

void run_train_features(const TrainFeaturesOptions& o, const std::string& command) {
  warn_if_slow_blas();
  if (fs::exists(fs::path(o.out) / "config.json") && !o.overwrite)
    throw std::invalid_argument("'" + o.out + "' already holds a feature network (pass --overwrite to replace it)");
  FeatureNetConfig config;
  auto fit = [](const Dataset& d) { return fit_dataset(d, 1, 32, Fit::pad); };
  auto train = fit(load_fashion_mnist(o.data, "train"));
  auto test = fit(load_fashion_mnist(o.data, "test"));
  std::cout << "training the feature network on " << train.size() << " images, testing on " << test.size() << "\n";
  auto r = train_feature_net(o.train, config, train, test, o.out, command, &std::cerr);
  std::cout << "test accuracy " << std::fixed << std::setprecision(4) << r.test_accuracy << " after " << r.steps
            << " steps in " << std::setprecision(1) << r.seconds << " s (" << r.parameters << " parameters); wrote "
            << o.out << "/{config.json, " << kWeightsFile << ", " << kReferenceFile << ", README.md}\n";
}

void run_eval(SampleEvalRequest request) {
  warn_if_slow_blas();
  auto t0 = std::chrono::steady_clock::now();
  if (request.features.empty()) request.features = default_feature_folder();
  auto report = evaluate_sample_set(request);
  const auto& result = report.result;
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "FID-FMNIST and the other metrics use diffuse's Fashion-MNIST feature network (" << request.features
            << "), not Inception-v3: compare them only with each other, at equal sample counts.\n"
            << "samples: " << request.samples << " (" << result.samples.count << " images"
            << (report.labelled ? ", " + std::to_string(result.samples.labelled) + " with a requested class" : "")
            << "); reference: " << report.reference_name << " (" << result.samples.reference_count << " images)\n"
            << "floor: " << result.floor.count << " real test images against " << result.floor.reference_count
            << " others (disjoint halves)\n\n"
            << format_table(result);
  std::cout << "\nwrote " << report.json_path << " and " << report.csv_path << " in " << std::fixed
            << std::setprecision(1) << secs << " s\n";
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto t = std::make_shared<TrainFeaturesOptions>();
  auto* tf = app.add_subcommand("train-features", "Train the Fashion-MNIST feature network of diffuse eval (and its "
                                                  "reference statistics of the test set)");
  tf->add_option("--out", t->out, "Output folder (the repository ships models/fmnist-features)")->required();
  tf->add_option("--data", t->data, "Folder with Fashion-MNIST's IDX files")->capture_default_str();
  tf->add_option("--epochs", t->train.epochs, "Epochs")->capture_default_str();
  tf->add_option("--batch", t->train.batch, "Batch size")->capture_default_str();
  tf->add_option("--lr", t->train.lr, "Peak learning rate (AdamW, one-cycle)")->capture_default_str();
  tf->add_option("--weight-decay", t->train.weight_decay, "AdamW weight decay")->capture_default_str();
  tf->add_option("--hflip", t->train.hflip, "Random horizontal flips (true/false)")->capture_default_str();
  tf->add_option("--seed", t->train.seed, "Seed")->check(CLI::NonNegativeNumber)->capture_default_str();
  tf->add_option("--threads", t->train.threads, "Intra-op threads (0: the default)")->capture_default_str();
  tf->add_option("--reference-limit", t->train.reference_limit, "Reference statistics of only the first N test "
                                                                "images (0: all; for tests)")->capture_default_str();
  tf->add_option("--device", t->train.device, "cpu, cuda or cuda:N")->capture_default_str();
  tf->add_flag("--overwrite", t->overwrite, "Replace an existing feature network folder");
  tf->add_flag("--quiet{false}", t->train.progress, "No progress line");
  tf->callback([t, tf] {
    std::string command = "diffuse train-features";
    for (const auto* opt : tf->get_options()) {
      if (opt->get_name() == "--help" || opt->count() == 0) continue;
      command += " " + opt->get_name();
      if (opt->get_expected_min() > 0)  // flags take no value
        for (const auto& r : opt->results()) command += " " + shell_quote(r);
    }
    run_train_features(*t, command);
  });

  auto o = std::make_shared<SampleEvalRequest>();
  auto* ev = app.add_subcommand("eval", "FID-FMNIST, KID, Inception-Score analogue, precision/recall and class "
                                        "accuracy of samples, each with its real-data floor");
  ev->add_option("--samples", o->samples, "A folder of PNGs (diffuse sample --out) or a safetensors file "
                                          "(diffuse sample --save-raw)")->required();
  ev->add_option("--labels", o->labels, "CSV with the requested class of each image (file,class or index,class; "
                                        "default: labels.csv of the folder or the safetensors' 'labels')");
  ev->add_flag("--no-labels{false}", o->use_labels, "Ignore requested classes (no class accuracy)");
  ev->add_option("--reference", o->reference, "Compare with this data source instead of the cached Fashion-MNIST "
                                              "test statistics (e.g. fashion-mnist-brightness:test; computed now)");
  ev->add_option("--features", o->features, "Feature network folder (default: $DIFFUSE_FEATURES, else "
                                            "models/fmnist-features of the repository)");
  ev->add_option("--out", o->out, "Folder for eval.json and eval.csv (default: the samples' folder)");
  ev->add_option("--kid-subsets", o->options.kid_subsets, "KID: number of random subsets")->capture_default_str();
  ev->add_option("--kid-subset-size", o->options.kid_subset_size, "KID: images per subset")->capture_default_str();
  ev->add_option("--k", o->options.pr_k, "precision/recall: k of the k-NN radius")->capture_default_str();
  ev->add_option("--is-splits", o->options.is_splits, "IS analogue: splits")->capture_default_str();
  ev->add_option("--seed", o->options.seed, "Seed of the KID and precision/recall subsets")->check(CLI::NonNegativeNumber)->capture_default_str();
  ev->add_option("--device", o->device, "cpu, cuda or cuda:N")->capture_default_str();
  ev->callback([o] { run_eval(*o); });
}

}  // namespace diffuse::cli
