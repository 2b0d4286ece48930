// The feature network: its config, layers, feature extraction and training (diffuse/eval/features.h).
#include "diffuse/eval/features.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "models/config_json.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/models/blocks.h"
#include "diffuse/io/image_io.h"
#include "diffuse/util/progress.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/lr_schedule.h"
#include "eval/features_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

void FeatureNetConfig::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument("feature net config: " + what); };
  if (in_channels < 1) bad("in_channels must be >= 1, got " + std::to_string(in_channels));
  if (num_classes < 2) bad("num_classes must be >= 2, got " + std::to_string(num_classes));
  if (feature_dim < 1) bad("feature_dim must be >= 1, got " + std::to_string(feature_dim));
  if (block_out_channels.empty()) bad("block_out_channels is empty");
  for (auto c : block_out_channels)
    if (c < 1) bad("block_out_channels entries must be >= 1");
  const int64_t scale = int64_t(1) << block_out_channels.size();
  if (sample_size < scale || sample_size % scale != 0)
    bad("sample_size " + std::to_string(sample_size) + " must be a multiple of 2^levels = " + std::to_string(scale));
  if (dropout < 0 || dropout >= 1) bad("dropout must lie in [0, 1)");
}

namespace {
// Every key of FeatureNetConfig, once: read by from_json, written by to_json.
const auto feature_net_fields = [](auto& c, auto&& f) {
  f("in_channels", c.in_channels);
  f("sample_size", c.sample_size);
  f("num_classes", c.num_classes);
  f("block_out_channels", c.block_out_channels);
  f("feature_dim", c.feature_dim);
  f("dropout", c.dropout);
};
}  // namespace

FeatureNetConfig FeatureNetConfig::from_json(const nlohmann::json& j) {
  return json_config::read_fields<FeatureNetConfig>(j, "feature net config", feature_net_fields);
}

nlohmann::json FeatureNetConfig::to_json() const {
  return json_config::write_config(*this, nlohmann::json{{"_class_name", kClassName}}, feature_net_fields);
}

// ---------------------------------------------------------------- network

FeatureNetImpl::FeatureNetImpl(const FeatureNetConfig& config) : config_(config) {
  config_.validate();
  int64_t in = config_.in_channels;
  for (auto ch : config_.block_out_channels) {
    convs->push_back(torch::nn::Conv2d(torch::nn::Conv2dOptions(in, ch, 3).padding(1).bias(false)));
    norms->push_back(torch::nn::BatchNorm2d(ch));
    in = ch;
  }
  register_module("convs", convs);
  register_module("norms", norms);
  const int64_t side = config_.sample_size >> config_.block_out_channels.size();
  feature = register_module("feature", torch::nn::Linear(in * side * side, config_.feature_dim));
  head = register_module("head", torch::nn::Linear(config_.feature_dim, config_.num_classes));
}

torch::Tensor FeatureNetImpl::features(const torch::Tensor& x) {
  auto h = x;
  for (size_t i = 0; i < convs->size(); ++i) {
    h = convs[i]->as<torch::nn::Conv2d>()->forward(h);
    h = torch::relu(norms[i]->as<torch::nn::BatchNorm2d>()->forward(h));
    h = torch::max_pool2d(h, 2);
  }
  return torch::relu(feature->forward(h.flatten(1)));
}

torch::Tensor FeatureNetImpl::logits(const torch::Tensor& f) {
  return head->forward(torch::dropout(f, config_.dropout, is_training()));
}

torch::Tensor FeatureNetImpl::forward(const torch::Tensor& x) { return logits(features(x)); }

FeatureNet load_feature_net(const std::string& folder, torch::Device device) {
  if (!fs::is_directory(folder))
    throw std::runtime_error("feature network folder '" + folder +
                             "' does not exist (the repository ships models/fmnist-features; re-create it with "
                             "diffuse train-features --out DIR)");
  auto net = load_model_folder<FeatureNet, FeatureNetConfig>(
      folder, device,
      {FeatureNetConfig::kClassName, std::string("a diffuse feature network (\"") + FeatureNetConfig::kClassName + "\")",
       "create one with diffuse train-features", true});
  net->eval();
  return net;
}

void save_feature_net(FeatureNet& net, const std::string& folder) {
  write_model_folder(*net, net->config().to_json(), folder);
}

void detail::check_images(const FeatureNetConfig& c, const torch::Tensor& images) {
  auto expected = "[N, " + std::to_string(c.in_channels) + ", " + std::to_string(c.sample_size) + ", " +
                  std::to_string(c.sample_size) + "]";
  if (!images.defined() || images.dim() != 4)
    throw std::invalid_argument("the feature network takes images " + expected + ", got " +
                                (images.defined() ? c10::str(images.sizes()) : std::string("none")));
  if (images.size(1) != c.in_channels)
    throw std::invalid_argument("images have " + std::to_string(images.size(1)) + " channel(s); the feature network takes " +
                                std::to_string(c.in_channels) + " (" + expected + ", got " + c10::str(images.sizes()) + ")");
  if (images.size(2) != c.sample_size || images.size(3) != c.sample_size)
    throw std::invalid_argument("images are " + std::to_string(images.size(2)) + "x" + std::to_string(images.size(3)) +
                                "; the feature network takes " + std::to_string(c.sample_size) + "x" +
                                std::to_string(c.sample_size) + " (Fashion-MNIST padded to 32x32, as diffuse's data "
                                "loader and models use it)");
}

torch::Device detail::device_of(torch::nn::Module& m) { return m.parameters().front().device(); }

using detail::check_images;
using detail::device_of;

FeatureOutputs extract_features(FeatureNet& net, const torch::Tensor& images, int64_t batch) {
  check_images(net->config(), images);
  torch::NoGradGuard no_grad;
  bool was_training = net->is_training();
  net->eval();
  auto device = device_of(*net);
  std::vector<torch::Tensor> feats, probs;
  for (int64_t i = 0; i < images.size(0); i += batch) {
    auto x = images.slice(0, i, std::min(i + batch, images.size(0))).to(device, torch::kFloat32);
    auto f = net->features(x);
    probs.push_back(torch::softmax(net->logits(f), 1).cpu());
    feats.push_back(f.cpu());
  }
  net->train(was_training);
  if (feats.empty()) return {torch::zeros({0, net->config().feature_dim}), torch::zeros({0, net->config().num_classes})};
  return {torch::cat(feats), torch::cat(probs)};
}

double classification_accuracy(FeatureNet& net, const Dataset& data, int64_t batch) {
  auto out = extract_features(net, data.images, batch);
  return out.probs.argmax(1).eq(data.labels.cpu()).to(torch::kFloat64).mean().item<double>();
}

// ---------------------------------------------------------------- training

namespace {

void check_feature_training(const FeatureTrainOptions& o, const FeatureNetConfig& config, const Dataset& train,
                            const Dataset& test) {
  if (o.epochs < 1 || o.batch < 2) throw std::invalid_argument("train-features needs --epochs >= 1 and --batch >= 2");
  if (train.num_classes != config.num_classes || test.num_classes != config.num_classes)
    throw std::invalid_argument("the feature network has " + std::to_string(config.num_classes) +
                                " classes but the data set '" + train.name + "' has " + std::to_string(train.num_classes));
}

// One-cycle (Smith & Topin 2019) as the trainer's warmup-cosine: a tenth of the steps linear warmup, then cosine to 0.
LrPlan one_cycle(double lr, int64_t steps) {
  return LrPlan{lr, 0.0, std::max<int64_t>(1, steps / 10), steps, LrSchedule::cosine};
}

// The cross-entropy training of `net`: AdamW, one-cycle, a progress line with the smoothed loss, the test accuracy
// after each epoch when `report` is given. Returns the steps taken.
int64_t fit_feature_net(FeatureNet& net, const FeatureTrainOptions& o, const Dataset& train, const Dataset& test,
                        torch::Device device, std::ostream* report) {
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(o.weight_decay));
  BatchSampler sampler(train.size(), o.batch, o.seed);
  const int64_t epoch = sampler.steps_per_epoch(), steps = o.epochs * epoch;
  const LrPlan schedule = one_cycle(o.lr, steps);
  Progress progress(o.progress, 0, steps, 100, "step");
  double loss_avg = 0;
  for (int64_t step = 0; step < steps; ++step) {
    const double lr = lr_at(schedule, step);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    net->train();
    auto batch = make_batch(train, sampler.indices(step), o.hflip, mix_seed(o.seed, uint64_t(step), 0xf1), device);
    auto loss = torch::nn::functional::cross_entropy(net->forward(batch.images), batch.labels);
    opt.zero_grad();
    loss.backward();
    opt.step();
    double l = loss.item<double>();
    if (!std::isfinite(l))
      throw std::runtime_error("train-features: loss is " + std::to_string(l) + " at step " + std::to_string(step + 1));
    loss_avg = step == 0 ? l : 0.98 * loss_avg + 0.02 * l;
    std::ostringstream f;
    f << "epoch " << step / epoch + 1 << "  loss " << std::fixed << std::setprecision(4) << loss_avg;
    progress.update(step + 1, f.str());
    if ((step + 1) % epoch == 0 && report) {
      std::ostringstream m;
      m << "epoch " << (step + 1) / epoch << ": loss " << std::fixed << std::setprecision(4) << loss_avg
        << ", test accuracy " << std::setprecision(4) << classification_accuracy(net, test);
      progress.message(m.str());
    }
  }
  progress.finish();
  return steps;
}

// The folder's README.md: what the network is, how to re-create it, what was measured.
std::string feature_readme(const FeatureTrainResult& result, const FeatureTrainOptions& o, const FeatureNetConfig& config,
                           const Dataset& test, int64_t reference_images, const std::string& hash,
                           const std::string& command) {
  std::ostringstream readme;
  readme << std::fixed;
  readme << "# Fashion-MNIST feature network of `diffuse eval`\n\n"
         << "A " << result.parameters << "-parameter CNN (config.json) whose " << config.feature_dim
         << "-dimensional penultimate features give FID-FMNIST, KID, precision/recall, and whose classifier gives "
            "the Inception-Score analogue and class accuracy (docs/evaluation.md).\n\n"
         << "Re-create this folder (weights, reference statistics and this file) with:\n\n    " << command << "\n\n"
         << "| measured | value |\n|---|---|\n"
         << "| test accuracy (" << test.size() << " images of " << test.name << ") | " << std::setprecision(4)
         << result.test_accuracy << " |\n"
         << "| training time (" << result.steps << " steps, " << o.epochs << " epochs, batch " << o.batch << ", "
         << torch::get_num_threads() << " threads, " << o.device << ") | " << std::setprecision(0) << result.seconds << " s |\n"
         << "| weights hash (FNV-1a 64 of " << kWeightsFile << ") | " << hash << " |\n\n"
         << "`" << kReferenceFile << "` holds the features of the " << reference_images
         << " test images (float16), their float64 mean and covariance, the labels, and the weights hash above: "
            "`diffuse eval` refuses it when the weights' hash differs.\n";
  return readme.str();
}

}  // namespace

FeatureTrainResult train_feature_net(const FeatureTrainOptions& o, const FeatureNetConfig& config, const Dataset& train,
                                     const Dataset& test, const std::string& out, const std::string& command,
                                     std::ostream* report) {
  check_feature_training(o, config, train, test);
  if (o.threads > 0) torch::set_num_threads(o.threads);
  auto device = parse_device(o.device);
  torch::manual_seed(o.seed);
  FeatureNet net(config);
  net->to(device);
  check_images(config, train.images.slice(0, 0, 1));

  FeatureTrainResult result;
  result.parameters = parameter_count(*net);
  auto t0 = std::chrono::steady_clock::now();
  result.steps = fit_feature_net(net, o, train, test, device, report);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  net->eval();
  result.test_accuracy = classification_accuracy(net, test);

  save_feature_net(net, out);
  auto hash = feature_weights_hash(out);
  Dataset ref_data = test;
  if (o.reference_limit > 0 && o.reference_limit < test.size()) {
    ref_data.images = test.images.slice(0, 0, o.reference_limit);
    ref_data.labels = test.labels.slice(0, 0, o.reference_limit);
  }
  save_reference((fs::path(out) / kReferenceFile).string(), make_reference(net, ref_data, hash));
  write_file_atomic((fs::path(out) / "README.md").string(),
                    feature_readme(result, o, config, test, ref_data.size(), hash, command));
  return result;
}

}  // namespace diffuse
