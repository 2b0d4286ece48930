// The Fashion-MNIST feature network of `diffuse eval` and the sample metrics computed on its features.
//
// FID-FMNIST, KID, the Inception-Score analogue, precision/recall and class accuracy are the metrics of
// metrics.h evaluated on the penultimate features (and class probabilities) of a small CNN trained on
// Fashion-MNIST by train_feature_net, not on Inception-v3: the numbers are comparable only with other
// FID-FMNIST numbers of the same weights. Every result comes with its floor: the same metric between two
// disjoint halves of the real test split (what a perfect model would score with that many samples).
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "diffuse/data/data.h"
#include "diffuse/eval/metrics.h"

namespace diffuse {

// ---------------------------------------------------------------- the network

/// config.json of the feature network ("_class_name": "DiffuseFeatureNet").
struct FeatureNetConfig {
  int64_t in_channels = 1;
  int64_t sample_size = 32;                      ///< inputs are [N, in_channels, sample_size, sample_size]
  int64_t num_classes = 10;
  std::vector<int64_t> block_out_channels = {32, 64, 128};  ///< one conv-BN-ReLU + 2x2 max-pool per entry
  int64_t feature_dim = 128;                     ///< the penultimate layer: the features of every metric
  double dropout = 0.3;                          ///< before the logits head, training only

  static constexpr const char* kClassName = "DiffuseFeatureNet";
  void validate() const;
  static FeatureNetConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
};

/// A VGG-style CNN: per level conv3x3-BatchNorm-ReLU-maxpool2, then flatten -> Linear(feature_dim) -> ReLU
/// (the features) -> dropout -> Linear(num_classes) (the logits).
class FeatureNetImpl : public torch::nn::Module {
 public:
  explicit FeatureNetImpl(const FeatureNetConfig& config);
  /// Logits [N, num_classes] of images [N, C, H, W] in [-1, 1].
  torch::Tensor forward(const torch::Tensor& x);
  /// Penultimate features [N, feature_dim] (after the ReLU).
  torch::Tensor features(const torch::Tensor& x);
  /// The logits head applied to features.
  torch::Tensor logits(const torch::Tensor& features);
  const FeatureNetConfig& config() const { return config_; }

 private:
  FeatureNetConfig config_;
  torch::nn::ModuleList convs, norms;
  torch::nn::Linear feature{nullptr}, head{nullptr};
};
TORCH_MODULE(FeatureNet);

/// Folder format of the other networks (config.json + diffusion_pytorch_model.safetensors).
FeatureNet load_feature_net(const std::string& folder, torch::Device device);
void save_feature_net(FeatureNet& net, const std::string& folder);

/// Features (float32 [N, D]) and class probabilities (float32 [N, C]) of `images`, on the CPU, computed in
/// eval mode in batches. Throws std::invalid_argument naming the expected shape when `images` is not
/// [N, in_channels, sample_size, sample_size].
struct FeatureOutputs {
  torch::Tensor features, probs;
};
FeatureOutputs extract_features(FeatureNet& net, const torch::Tensor& images, int64_t batch = 500);

// ---------------------------------------------------------------- training

struct FeatureTrainOptions {
  int64_t epochs = 6;
  int64_t batch = 128;
  double lr = 3e-3;              ///< AdamW, one-cycle: linear warmup over the first epoch's 10%, cosine to 0
  double weight_decay = 5e-4;
  bool hflip = true;             ///< random horizontal flips (Fashion-MNIST's classes are mirror-symmetric)
  uint64_t seed = 0;
  std::string device = "cpu";
  int threads = 0;               ///< >0: torch::set_num_threads
  bool progress = true;
  int64_t reference_limit = 0;   ///< >0: reference statistics of only the first images (tests)
};

struct FeatureTrainResult {
  double test_accuracy = 0;
  double seconds = 0;            ///< training only (not the reference statistics)
  int64_t steps = 0;
  int64_t parameters = 0;
};

/// Trains the feature network on `train` (Fashion-MNIST fitted to 32x32), evaluates it on `test`, and
/// writes to `out`: the network folder, reference.safetensors (make_reference on `test`) and README.md
/// with `command` (the command line that re-creates the folder), the accuracy and the time. Progress and
/// per-epoch test accuracy go to `report` when given.
FeatureTrainResult train_feature_net(const FeatureTrainOptions& options, const FeatureNetConfig& config,
                                     const Dataset& train, const Dataset& test, const std::string& out,
                                     const std::string& command, std::ostream* report = nullptr);

/// Share of `data` that the network classifies as its label.
double classification_accuracy(FeatureNet& net, const Dataset& data, int64_t batch = 500);

// ---------------------------------------------------------------- reference statistics

/// The real test set as the metrics see it: float64 mean and covariance of its features (FID), the features
/// themselves (float16 on disk; KID, precision/recall and the floor), the labels, and the FNV-1a hash of
/// the weights file they were computed with (a guard against statistics of other weights).
struct Reference {
  FeatureStats stats;
  torch::Tensor features;  ///< float32 [N, D], CPU
  torch::Tensor labels;    ///< int64 [N]
  std::string weights_hash;
  std::string data_name;
};
constexpr const char* kReferenceFile = "reference.safetensors";

/// FNV-1a 64-bit hash of a file's bytes as 16 hex digits; throws naming a file that cannot be read.
std::string file_hash(const std::string& path);
/// The hash of the weights file of a feature network folder.
std::string feature_weights_hash(const std::string& folder);

Reference make_reference(FeatureNet& net, const Dataset& data, const std::string& weights_hash);
void save_reference(const std::string& path, const Reference& reference);
/// Loads and validates a reference file. Throws std::runtime_error naming the file and the fix when it is
/// missing, malformed, or was computed with weights whose hash differs from `expected_weights_hash`.
Reference load_reference(const std::string& path, const std::string& expected_weights_hash);

/// A feature network folder with its reference: what `diffuse eval` loads.
struct FeatureEvaluator {
  FeatureNet net{nullptr};
  Reference reference;
  std::string folder;
};
FeatureEvaluator load_feature_evaluator(const std::string& folder, torch::Device device);

// ---------------------------------------------------------------- metrics of samples

struct EvalOptions {
  int64_t kid_subsets = 100;
  int64_t kid_subset_size = 1000;
  int64_t pr_k = 3;               ///< k of the k-NN manifolds (Kynkäänniemi et al. 2019 use 3)
  int64_t is_splits = 10;
  uint64_t seed = 0;
};

/// The metrics of one set of images against a reference set.
struct MetricSet {
  int64_t count = 0;              ///< images evaluated
  int64_t reference_count = 0;    ///< real images compared with
  double fid = 0;                 ///< FID-FMNIST
  KidResult kid;
  ScoreResult inception;          ///< the Inception-Score analogue on the feature net's classifier
  PrecisionRecall pr;             ///< against a real set of the same size (k-NN radii depend on the size)
  double class_accuracy = -1;     ///< share classified as their requested class; -1: no labels
  int64_t labelled = 0;           ///< images with a requested class in [0, num_classes)
};

struct EvalResult {
  MetricSet samples;              ///< the images against the whole reference (test split)
  MetricSet floor;                ///< min(N, half) real images of one half of the test split against the other half
};

/// The fewest images eval accepts: 2 x feature_dim, so that the sample covariance has full rank with room
/// to spare (its estimate is still biased; compare FID-FMNIST only at equal N, 5000 or more for final numbers).
int64_t min_eval_samples(int64_t feature_dim);

/// Metrics of precomputed features/probabilities against real features. `labels`: int64 [N], -1 (or any
/// value outside [0, C)) for images without a requested class; undefined for none.
MetricSet compute_metrics(const torch::Tensor& features, const torch::Tensor& probs, const torch::Tensor& labels,
                          const torch::Tensor& real_features, const FeatureStats& real_stats,
                          const EvalOptions& options);

/// Evaluates images [N, C, H, W] in [-1, 1] (requested classes in `labels`, or undefined) and the floor.
/// Throws std::invalid_argument for a wrong image shape or fewer than min_eval_samples images.
EvalResult evaluate_samples(FeatureEvaluator& evaluator, const torch::Tensor& images, const torch::Tensor& labels,
                            const EvalOptions& options = {});

/// The result as JSON ({"samples": {...}, "floor": {...}}) and as CSV rows (metric, samples, floor).
nlohmann::json to_json(const EvalResult& result);
std::string to_csv(const EvalResult& result);
/// The table the CLI prints.
std::string format_table(const EvalResult& result);

// ---------------------------------------------------------------- sample sets on disk

/// Images to evaluate with the class each was asked for (-1: none).
struct SampleSet {
  torch::Tensor images;  ///< float32 [N, C, H, W] in [-1, 1]
  torch::Tensor labels;  ///< int64 [N]; -1 where unknown
  bool has_labels = false;
};
/// `path`: a folder of PNGs as `diffuse sample` writes them (every *.png but grid.png, in name order) or a
/// safetensors file (key "sample", [N, C, H, W] float, as --save-raw writes). Labels: `labels_path` when
/// given (CSV with columns file,class or index,class), else the folder's labels.csv or the safetensors'
/// "labels" tensor when present. Throws naming the file for unreadable or inconsistent input.
SampleSet load_sample_set(const std::string& path, const std::string& labels_path = "");
/// The folder a set of samples lives in: `samples` itself when it is a folder, else the folder of the
/// safetensors file ("." for a bare file name). eval and analyze write their outputs there by default.
std::string samples_folder(const std::string& samples);

// ---------------------------------------------------------------- diffuse eval as a call

struct SampleEvalRequest {
  std::string samples;            ///< a folder of PNGs or a safetensors file (load_sample_set)
  std::string labels;             ///< CSV of requested classes; empty: the set's own (labels.csv, 'labels')
  bool use_labels = true;         ///< false: no class accuracy
  std::string features;           ///< the feature network folder (with its reference statistics)
  std::string reference;          ///< a data source (load_dataset) whose statistics replace the stored ones,
                                  ///< computed now with the same network; empty: the stored test statistics
  std::string out;                ///< folder of eval.json and eval.csv; empty: samples_folder(samples)
  std::string device = "cpu";
  EvalOptions options;
};
struct SampleEvalReport {
  EvalResult result;
  std::string reference_name;     ///< the real data the samples were compared with
  bool labelled = false;          ///< whether requested classes were used (class accuracy)
  std::string json_path, csv_path;
};
/// What `diffuse eval` does: loads the network, the reference and the samples, evaluates them and their floor,
/// and writes eval.json (the result, the paths, the weights' hash and the options) and eval.csv.
SampleEvalReport evaluate_sample_set(const SampleEvalRequest& request);


}  // namespace diffuse
