// Sample sets (folders of PNGs with their labels) and `diffuse eval` as a call (diffuse/eval/features.h).
#include "diffuse/eval/features.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "diffuse/io/files.h"
#include "diffuse/io/hash.h"
#include "diffuse/io/image_io.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/util/runtime.h"

namespace fs = std::filesystem;

namespace diffuse {

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
