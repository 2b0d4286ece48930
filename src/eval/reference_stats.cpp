// Reference statistics of the feature network on a data set, and the evaluator that holds them (diffuse/eval/features.h).
#include "diffuse/eval/features.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "diffuse/io/files.h"
#include "diffuse/io/hash.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"

namespace fs = std::filesystem;

namespace diffuse {

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

}  // namespace diffuse
