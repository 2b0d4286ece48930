#include "diffuse/eval/features.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <set>
#include <sstream>

#include "models/config_json.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/io/hash.h"
#include "diffuse/models/blocks.h"
#include "diffuse/io/image_io.h"
#include "diffuse/util/progress.h"
#include "diffuse/util/runtime.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/train/lr_schedule.h"

namespace fs = std::filesystem;

namespace diffuse {

// ---------------------------------------------------------------- config

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

namespace {

void check_images(const FeatureNetConfig& c, const torch::Tensor& images) {
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

torch::Device device_of(torch::nn::Module& m) { return m.parameters().front().device(); }

}  // namespace

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

// ---------------------------------------------------------------- reference

std::string file_hash(const std::string& path) {
  auto bytes = read_file(path);
  Fnv1a h;
  h.add(bytes.data(), bytes.size());
  return h.hex();
}

std::string feature_weights_hash(const std::string& folder) {
  return file_hash((fs::path(folder) / kWeightsFile).string());
}

Reference make_reference(FeatureNet& net, const Dataset& data, const std::string& weights_hash) {
  auto out = extract_features(net, data.images);
  Reference r;
  r.features = out.features;
  r.stats = feature_stats(out.features);
  r.labels = data.labels.to(torch::kCPU, torch::kLong);
  r.weights_hash = weights_hash;
  r.data_name = data.name;
  return r;
}

void save_reference(const std::string& path, const Reference& r) {
  save_safetensors(path,
                   {{"mean", r.stats.mean.to(torch::kCPU, torch::kFloat64)},
                    {"cov", r.stats.cov.to(torch::kCPU, torch::kFloat64)},
                    {"features", r.features.to(torch::kCPU, torch::kFloat16)},
                    {"labels", r.labels.to(torch::kCPU, torch::kLong)}},
                   {{"weights_fnv1a64", r.weights_hash},
                    {"data", r.data_name},
                    {"count", std::to_string(r.stats.count)},
                    {"format", "diffuse-feature-reference-1"}});
}

Reference load_reference(const std::string& path, const std::string& expected_hash) {
  const std::string fix = " (re-create it with diffuse train-features --out DIR, which writes the weights and the "
                          "reference statistics together)";
  if (!fs::exists(path)) throw std::runtime_error("reference statistics '" + path + "' do not exist" + fix);
  auto meta = safetensors_metadata(path);
  auto tensors = load_safetensors(path);
  auto get = [&](const std::string& key) {
    auto it = tensors.find(key);
    if (it == tensors.end()) throw std::runtime_error("'" + path + "' has no tensor '" + key + "'" + fix);
    return it->second;
  };
  Reference r;
  r.weights_hash = meta.count("weights_fnv1a64") ? meta["weights_fnv1a64"] : "";
  r.data_name = meta.count("data") ? meta["data"] : "";
  if (r.weights_hash != expected_hash)
    throw std::runtime_error("reference statistics '" + path + "' are stale: computed with weights of hash '" +
                             r.weights_hash + "', but the weights beside them hash to '" + expected_hash + "'" + fix);
  r.stats.mean = get("mean").to(torch::kFloat64);
  r.stats.cov = get("cov").to(torch::kFloat64);
  r.features = get("features").to(torch::kFloat32);
  r.labels = get("labels").to(torch::kLong);
  r.stats.count = r.features.size(0);
  const int64_t d = r.stats.mean.numel();
  if (r.stats.mean.dim() != 1 || r.stats.cov.sizes() != torch::IntArrayRef({d, d}) || r.features.dim() != 2 ||
      r.features.size(1) != d || r.labels.dim() != 1 || r.labels.size(0) != r.features.size(0))
    throw std::runtime_error("'" + path + "': inconsistent shapes (mean " + c10::str(r.stats.mean.sizes()) + ", cov " +
                             c10::str(r.stats.cov.sizes()) + ", features " + c10::str(r.features.sizes()) +
                             ", labels " + c10::str(r.labels.sizes()) + ")" + fix);
  return r;
}

FeatureEvaluator load_feature_evaluator(const std::string& folder, torch::Device device) {
  FeatureEvaluator e;
  e.folder = folder;
  e.net = load_feature_net(folder, device);
  e.reference = load_reference((fs::path(folder) / kReferenceFile).string(), feature_weights_hash(folder));
  if (e.reference.features.size(1) != e.net->config().feature_dim)
    throw std::runtime_error("'" + folder + "/" + kReferenceFile + "' holds " +
                             std::to_string(e.reference.features.size(1)) + "-dimensional features, the network " +
                             std::to_string(e.net->config().feature_dim));
  return e;
}

// ---------------------------------------------------------------- metrics

int64_t min_eval_samples(int64_t feature_dim) { return 2 * feature_dim; }

namespace {
// k-NN radii need sets of equal size (their scale depends on it); cdist of 5000 x 5000 float64 is 200 MB.
constexpr int64_t kMaxPrecisionRecall = 5000;

torch::Tensor seeded_subset(const torch::Tensor& x, int64_t count, uint64_t seed) {
  if (count >= x.size(0)) return x;
  auto idx = torch::randperm(x.size(0), cpu_generator(seed), torch::kLong).slice(0, 0, count);
  return x.index_select(0, idx.to(x.device()));
}
}  // namespace

MetricSet compute_metrics(const torch::Tensor& features, const torch::Tensor& probs, const torch::Tensor& labels,
                          const torch::Tensor& real_features, const FeatureStats& real_stats, const EvalOptions& o) {
  MetricSet m;
  m.count = features.size(0);
  m.reference_count = real_features.size(0);
  const int64_t minimum = min_eval_samples(features.size(1));
  if (m.count < minimum)
    throw std::invalid_argument(std::to_string(m.count) + " images are too few for a stable " +
                                std::to_string(features.size(1)) + "x" + std::to_string(features.size(1)) +
                                " feature covariance: FID-FMNIST needs at least " + std::to_string(minimum) +
                                " (2 x the feature dimension; 5000 or more for numbers to compare)");
  m.fid = frechet_distance(feature_stats(features), real_stats);
  m.kid = kernel_distance(real_features, features, o.kid_subsets, o.kid_subset_size, mix_seed(o.seed, 0x41d));
  m.inception = inception_score(probs, std::min(o.is_splits, m.count));
  int64_t n_pr = std::min({m.count, m.reference_count, kMaxPrecisionRecall});
  m.pr = precision_recall(seeded_subset(real_features, n_pr, mix_seed(o.seed, 0x9e1)),
                          seeded_subset(features, n_pr, mix_seed(o.seed, 0x9e2)), o.pr_k);
  if (labels.defined()) {
    auto l = labels.to(torch::kCPU, torch::kLong);
    auto valid = (l >= 0).logical_and(l < probs.size(1));
    m.labelled = valid.sum().item<int64_t>();
    if (m.labelled > 0)
      m.class_accuracy = probs.argmax(1).eq(l).logical_and(valid).sum().item<double>() / double(m.labelled);
  }
  return m;
}

EvalResult evaluate_samples(FeatureEvaluator& e, const torch::Tensor& images, const torch::Tensor& labels,
                            const EvalOptions& o) {
  check_images(e.net->config(), images);
  const int64_t minimum = min_eval_samples(e.net->config().feature_dim);
  if (images.size(0) < minimum)
    throw std::invalid_argument(std::to_string(images.size(0)) + " images are too few for a stable feature covariance: "
                                "FID-FMNIST needs at least " + std::to_string(minimum) +
                                " (2 x the feature dimension; 5000 or more for numbers to compare)");
  if (labels.defined() && labels.numel() != images.size(0))
    throw std::invalid_argument(std::to_string(labels.numel()) + " labels for " + std::to_string(images.size(0)) + " images");
  const auto& ref = e.reference;
  auto out = extract_features(e.net, images);
  EvalResult r;
  r.samples = compute_metrics(out.features, out.probs, labels, ref.features, ref.stats, o);

  // The floor: a fixed split of the reference into halves A and B; min(N, |A|) images of A play the samples.
  auto perm = torch::randperm(ref.features.size(0), cpu_generator(0xf100), torch::kLong);
  const int64_t half = ref.features.size(0) / 2;
  auto a = perm.slice(0, 0, half), b = perm.slice(0, half);
  a = a.slice(0, 0, std::min(half, images.size(0)));
  auto fa = ref.features.index_select(0, a), fb = ref.features.index_select(0, b);
  torch::Tensor pa;
  {
    torch::NoGradGuard no_grad;
    e.net->eval();
    auto device = device_of(*e.net);
    pa = torch::softmax(e.net->logits(fa.to(device)), 1).cpu();
  }
  if (fa.size(0) < minimum)
    throw std::invalid_argument("the reference has too few images (" + std::to_string(ref.features.size(0)) +
                                ") for the floor: it needs 2 x " + std::to_string(minimum));
  r.floor = compute_metrics(fa, pa, ref.labels.index_select(0, a), fb, feature_stats(fb), o);
  return r;
}

namespace {
nlohmann::json metric_json(const MetricSet& m) {
  nlohmann::json j = {{"count", m.count},
                      {"reference_count", m.reference_count},
                      {"fid_fmnist", m.fid},
                      {"kid_mean", m.kid.mean},
                      {"kid_std", m.kid.std},
                      {"is_fmnist_mean", m.inception.mean},
                      {"is_fmnist_std", m.inception.std},
                      {"precision", m.pr.precision},
                      {"recall", m.pr.recall},
                      {"labelled", m.labelled}};
  j["class_accuracy"] = m.class_accuracy >= 0 ? nlohmann::json(m.class_accuracy) : nlohmann::json(nullptr);
  return j;
}

std::string number(double v, int precision) {
  std::ostringstream s;
  s << std::setprecision(precision) << v;
  return s.str();
}

struct Row {
  std::string name, samples, floor;
};
std::vector<Row> rows(const EvalResult& r, bool pretty) {
  auto pm = [&](double m, double s) { return pretty ? number(m, 5) + " ± " + number(s, 2) : number(m, 8); };
  auto acc = [&](const MetricSet& m) { return m.class_accuracy >= 0 ? number(m.class_accuracy, pretty ? 4 : 8) : std::string(pretty ? "-" : ""); };
  std::vector<Row> v = {
      {"FID-FMNIST", number(r.samples.fid, pretty ? 5 : 10), number(r.floor.fid, pretty ? 5 : 10)},
      {"KID-FMNIST", pm(r.samples.kid.mean, r.samples.kid.std), pm(r.floor.kid.mean, r.floor.kid.std)},
      {"IS-FMNIST", pm(r.samples.inception.mean, r.samples.inception.std), pm(r.floor.inception.mean, r.floor.inception.std)},
      {"precision", number(r.samples.pr.precision, pretty ? 4 : 8), number(r.floor.pr.precision, pretty ? 4 : 8)},
      {"recall", number(r.samples.pr.recall, pretty ? 4 : 8), number(r.floor.pr.recall, pretty ? 4 : 8)},
      {"class_accuracy", acc(r.samples), acc(r.floor)},
      {"count", std::to_string(r.samples.count), std::to_string(r.floor.count)},
      {"reference_count", std::to_string(r.samples.reference_count), std::to_string(r.floor.reference_count)}};
  if (!pretty) {
    v.insert(v.begin() + 2, {"KID-FMNIST_std", number(r.samples.kid.std, 8), number(r.floor.kid.std, 8)});
    v.insert(v.begin() + 4, {"IS-FMNIST_std", number(r.samples.inception.std, 8), number(r.floor.inception.std, 8)});
  }
  return v;
}
}  // namespace

nlohmann::json to_json(const EvalResult& r) {
  return {{"samples", metric_json(r.samples)}, {"floor", metric_json(r.floor)}};
}

std::string to_csv(const EvalResult& r) {
  std::ostringstream s;
  s << "metric,samples,floor\n";
  for (const auto& row : rows(r, false)) s << row.name << "," << row.samples << "," << row.floor << "\n";
  return s.str();
}

std::string format_table(const EvalResult& r) {
  std::ostringstream s;
  s << std::left << std::setw(16) << "metric" << std::setw(26) << "samples"
    << "floor (real test half vs half)\n";
  for (const auto& row : rows(r, true)) {
    // "±" is two bytes but one column.
    int pad = 26 + (row.samples.find("±") != std::string::npos ? 1 : 0);
    s << std::setw(16) << row.name << std::setw(pad) << row.samples << row.floor << "\n";
  }
  return s.str();
}

// ---------------------------------------------------------------- sample sets

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::string cell;
  std::istringstream in(line);
  while (std::getline(in, cell, ',')) {
    while (!cell.empty() && (cell.back() == '\r' || cell.back() == ' ')) cell.pop_back();
    while (!cell.empty() && cell.front() == ' ') cell.erase(cell.begin());
    out.push_back(cell);
  }
  return out;
}

// labels.csv: a header naming a "class" column and a "file" or "index" column.
torch::Tensor read_labels_csv(const std::string& path, const std::vector<std::string>& files, int64_t n) {
  std::istringstream in(read_file(path));
  std::string line;
  if (!std::getline(in, line)) throw std::runtime_error("'" + path + "' is empty (expected a header file,class)");
  auto header = split_csv_line(line);
  int file_col = -1, index_col = -1, class_col = -1;
  for (size_t i = 0; i < header.size(); ++i) {
    auto h = lower(header[i]);
    if (h == "class" || h == "label") class_col = int(i);
    if (h == "file") file_col = int(i);
    if (h == "index") index_col = int(i);
  }
  const bool by_file = file_col >= 0 && !files.empty();
  const int key_col = by_file ? file_col : index_col;
  if (class_col < 0 || key_col < 0)
    throw std::runtime_error("'" + path + "': the header '" + line + "' needs a class column and " +
                             (files.empty() ? "an index column" : "a file or index column"));
  std::map<std::string, int64_t> position;
  for (size_t i = 0; i < files.size(); ++i) position[files[i]] = int64_t(i);
  auto labels = torch::full({n}, int64_t(-1), torch::kLong);
  auto acc = labels.accessor<int64_t, 1>();
  int64_t row = 1;
  while (std::getline(in, line)) {
    ++row;
    if (line.empty() || line == "\r") continue;
    auto cells = split_csv_line(line);
    auto where = "'" + path + "' line " + std::to_string(row);
    if (int(cells.size()) <= std::max(key_col, class_col)) throw std::runtime_error(where + ": too few columns");
    int64_t i, c;
    try {
      c = std::stoll(cells[class_col]);
      i = by_file ? (position.count(cells[key_col]) ? position[cells[key_col]] : -1) : std::stoll(cells[key_col]);
    } catch (const std::exception&) {
      throw std::runtime_error(where + ": '" + line + "' is not <key>,<integer class>");
    }
    if (i < 0 || i >= n) throw std::runtime_error(where + ": '" + cells[key_col] + "' names no image of the sample set");
    acc[i] = c;
  }
  return labels;
}

}  // namespace

SampleSet load_sample_set(const std::string& path, const std::string& labels_path) {
  SampleSet set;
  std::vector<std::string> files;
  fs::path p(path);
  if (!fs::exists(p)) throw std::invalid_argument("samples '" + path + "' do not exist (expected a folder of PNGs or a safetensors file)");
  std::string default_labels;
  if (fs::is_directory(p)) {
    for (const auto& entry : fs::directory_iterator(p)) {
      auto name = entry.path().filename().string();
      if (entry.is_regular_file() && lower(entry.path().extension().string()) == ".png" && name != "grid.png")
        files.push_back(name);
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) throw std::invalid_argument("'" + path + "' holds no PNG images (grid.png is not counted)");
    std::vector<torch::Tensor> images;
    for (const auto& f : files) {
      auto img = read_image((p / f).string(), 0);
      if (!images.empty() && img.sizes() != images.front().sizes())
        throw std::invalid_argument("'" + (p / f).string() + "' is " + c10::str(img.sizes()) + " but '" +
                                    (p / files.front()).string() + "' is " + c10::str(images.front().sizes()) +
                                    " (C, H, W): all samples must have one size (keep other PNGs, such as plots, out of a samples folder)");
      images.push_back(img);
    }
    set.images = torch::stack(images);
    default_labels = (p / "labels.csv").string();
  } else {
    auto tensors = load_safetensors(path);
    auto it = tensors.find("sample");
    if (it == tensors.end())
      throw std::invalid_argument("'" + path + "' has no tensor 'sample' (write one with diffuse sample --save-raw)");
    set.images = it->second.to(torch::kFloat32);
    if (set.images.dim() != 4)
      throw std::invalid_argument("'" + path + "': 'sample' must be [N, C, H, W], got " + c10::str(set.images.sizes()));
    auto lt = tensors.find("labels");
    if (lt != tensors.end() && labels_path.empty()) {
      if (lt->second.numel() != set.images.size(0))
        throw std::invalid_argument("'" + path + "': " + std::to_string(lt->second.numel()) + " labels for " +
                                    std::to_string(set.images.size(0)) + " samples");
      set.labels = lt->second.to(torch::kLong).flatten();
      set.has_labels = true;
    }
    default_labels = (p.parent_path() / (p.stem().string() + ".labels.csv")).string();
  }
  const int64_t n = set.images.size(0);
  std::string lp = !labels_path.empty() ? labels_path : (fs::exists(default_labels) ? default_labels : "");
  if (!labels_path.empty() && !fs::exists(labels_path))
    throw std::invalid_argument("labels file '" + labels_path + "' does not exist");
  if (!set.has_labels && !lp.empty()) {
    set.labels = read_labels_csv(lp, files, n);
    set.has_labels = true;
  }
  if (!set.has_labels) set.labels = torch::full({n}, int64_t(-1), torch::kLong);
  return set;
}

std::string samples_folder(const std::string& samples) {
  fs::path folder = fs::is_directory(samples) ? fs::path(samples) : fs::path(samples).parent_path();
  return folder.empty() ? "." : folder.string();
}

// ---------------------------------------------------------------- diffuse eval as a call

SampleEvalReport evaluate_sample_set(const SampleEvalRequest& r) {
  auto evaluator = load_feature_evaluator(r.features, parse_device(r.device));
  if (!r.reference.empty()) {
    // Statistics of another real data set (say Fashion-MNIST with spread brightness, which a model of that data
    // should match): computed now with the same network; the floor then splits this set.
    DataSpec spec;
    spec.source = r.reference;
    spec.channels = evaluator.net->config().in_channels;
    spec.size = evaluator.net->config().sample_size;
    evaluator.reference = make_reference(evaluator.net, load_dataset(spec), evaluator.reference.weights_hash);
  }
  auto set = load_sample_set(r.samples, r.labels);
  torch::Tensor labels = r.use_labels && set.has_labels ? set.labels : torch::Tensor();
  SampleEvalReport report;
  report.result = evaluate_samples(evaluator, set.images, labels, r.options);
  report.reference_name = evaluator.reference.data_name;
  report.labelled = labels.defined();

  fs::path out = r.out.empty() ? fs::path(samples_folder(r.samples)) : fs::path(r.out);
  fs::create_directories(out);
  auto json = to_json(report.result);
  json["samples_path"] = r.samples;
  json["features"] = r.features;
  json["weights_fnv1a64"] = evaluator.reference.weights_hash;
  json["options"] = {{"kid_subsets", r.options.kid_subsets}, {"kid_subset_size", r.options.kid_subset_size},
                     {"pr_k", r.options.pr_k}, {"is_splits", r.options.is_splits}, {"seed", r.options.seed}};
  report.json_path = (out / "eval.json").string();
  report.csv_path = (out / "eval.csv").string();
  write_file_atomic(report.json_path, json.dump(2) + "\n");
  write_file_atomic(report.csv_path, to_csv(report.result));
  return report;
}

}  // namespace diffuse
