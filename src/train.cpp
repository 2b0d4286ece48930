#include "diffuse/train.h"
#include "diffuse/files.h"
#include "diffuse/progress.h"

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>
#include <thread>

#include "diffuse/distributed.h"
#include "diffuse/plot.h"
#include "diffuse/runtime.h"
#include "diffuse/safetensors.h"
#include "torch_compat.h"

namespace fs = std::filesystem;

namespace diffuse {

// ================================================================ losses

torch::Tensor per_example_loss(Prediction prediction, const torch::Tensor& pred, const torch::Tensor& x0,
                               const torch::Tensor& eps, const torch::Tensor& a, const torch::Tensor& s,
                               const torch::Tensor& weight) {
  TORCH_CHECK(pred.sizes() == x0.sizes(), "model output ", pred.sizes(), " does not match the images ", x0.sizes());
  auto err = (pred - target(prediction, x0, eps, a, s)).pow(2).flatten(1).mean(1);
  return weight.to(err.dtype()) * err;
}

torch::Tensor offset_noise(const torch::Tensor& eps, double strength, at::Generator& gen) {
  if (strength == 0) return eps;
  auto delta = torch::randn({eps.size(0), eps.size(1), 1, 1}, gen, torch::TensorOptions().dtype(eps.dtype()));
  return eps + strength * delta.to(eps.device());
}

SchedulerConfig make_scheduler_config(const ScheduleSpec& spec, Prediction prediction, Spacing spacing,
                                      const EtsdmConfig& etsdm) {
  Schedule schedule = make_schedule(spec);  // validates the name and values
  SchedulerConfig c;
  c.num_train_timesteps = spec.T;
  c.prediction_type = prediction;
  c.timestep_spacing = spacing;
  c.etsdm = etsdm;
  c.extra["_class_name"] = "DDIMScheduler";
  c.extra["_diffusers_version"] = "0.25.0";
  bool cosine_family = spec.name == "cosine" || spec.name == "squaredcos_cap_v2" || spec.name == "cosine_noclip";
  if (cosine_family && (spec.zero_snr || spec.name == "cosine_noclip")) {
    // Zero-SNR cosine drops the 0.999 clip (Lin et al. 2023, section 3.1): no diffusers name, so explicit betas.
    auto betas = schedule.betas().contiguous();
    c.trained_betas = std::vector<double>(betas.data_ptr<double>(), betas.data_ptr<double>() + betas.numel());
    c.beta_schedule = "linear";
  } else {
    c.beta_schedule = cosine_family ? "squaredcos_cap_v2" : spec.name;
    auto pick = [](double v, double dflt) { return v < 0 ? dflt : v; };
    bool scaled = spec.name == "scaled_linear";
    c.beta_start = pick(spec.beta_start, scaled ? 0.00085 : 1e-4);
    c.beta_end = pick(spec.beta_end, scaled ? 0.012 : 0.02);
    c.rescale_betas_zero_snr = spec.zero_snr;
  }
  if (etsdm.enabled() && (etsdm.t_tilde >= spec.T || etsdm.n > etsdm.t_tilde))
    throw std::invalid_argument("E-TSDM needs 1 <= n <= t_tilde < T, got t_tilde = " + std::to_string(etsdm.t_tilde) +
                                ", n = " + std::to_string(etsdm.n) + ", T = " + std::to_string(spec.T));
  return c;
}

UNetConfig make_unet_config(const UNetShape& shape, int64_t size, int64_t channels, int64_t num_classes) {
  if (shape.channels.empty()) throw std::invalid_argument("--channels needs at least one level");
  int64_t levels = int64_t(shape.channels.size());
  for (auto l : shape.attention_levels)
    if (l < 0 || l >= levels)
      throw std::invalid_argument("attention level " + std::to_string(l) + " does not exist (levels 0.." +
                                  std::to_string(levels - 1) + " for --channels with " + std::to_string(levels) +
                                  " values)");
  if (size % (int64_t(1) << (levels - 1)) != 0)
    throw std::invalid_argument("image size " + std::to_string(size) + " is not divisible by 2^" +
                                std::to_string(levels - 1) + " (one downsampling per level after the first)");
  UNetConfig c;
  c.sample_size = size;
  c.in_channels = channels;
  c.out_channels = channels;
  c.block_out_channels = shape.channels;
  c.layers_per_block = shape.layers_per_block;
  c.down_block_types.assign(size_t(levels), "DownBlock2D");
  c.up_block_types.assign(size_t(levels), "UpBlock2D");
  for (auto l : shape.attention_levels) {
    c.down_block_types[size_t(l)] = "AttnDownBlock2D";
    c.up_block_types[size_t(levels - 1 - l)] = "AttnUpBlock2D";
  }
  c.add_attention = shape.mid_attention;
  c.attention_head_dim = shape.attention_head_dim;
  c.norm_num_groups = shape.norm_groups;
  c.dropout = shape.dropout;
  c.resnet_time_scale_shift = shape.time_scale_shift;
  if (num_classes > 0) c.num_class_embeds = num_classes + 1;
  c.validate();
  return c;
}

// ================================================================ options as JSON

namespace {

template <class T>
T get_or(const nlohmann::json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    throw std::invalid_argument(std::string("run option '") + key + "' has the wrong type: " + it->dump());
  }
}

nlohmann::json data_json(const DataSpec& d) {
  return {{"source", d.source}, {"size", d.size},   {"channels", d.channels},
          {"fit", d.fit},       {"limit", d.limit}, {"synthetic_count", d.synthetic_count},
          {"seed", d.seed}};
}
DataSpec data_from_json(const nlohmann::json& j) {
  DataSpec d;
  d.source = get_or(j, "source", d.source);
  d.size = get_or(j, "size", d.size);
  d.channels = get_or(j, "channels", d.channels);
  d.fit = get_or(j, "fit", d.fit);
  d.limit = get_or(j, "limit", d.limit);
  d.synthetic_count = get_or(j, "synthetic_count", d.synthetic_count);
  d.seed = get_or(j, "seed", d.seed);
  return d;
}

nlohmann::json schedule_json(const ScheduleSpec& s) {
  return {{"name", s.name}, {"T", s.T}, {"beta_start", s.beta_start}, {"beta_end", s.beta_end}, {"zero_snr", s.zero_snr}};
}
ScheduleSpec schedule_from_json(const nlohmann::json& j) {
  ScheduleSpec s;
  s.name = get_or(j, "name", s.name);
  s.T = get_or(j, "T", s.T);
  s.beta_start = get_or(j, "beta_start", s.beta_start);
  s.beta_end = get_or(j, "beta_end", s.beta_end);
  s.zero_snr = get_or(j, "zero_snr", s.zero_snr);
  return s;
}

// Options that may differ between a run and its resumption: they do not change the trained weights
// (steps and device aside, which the user changes knowingly).
const std::vector<std::string>& resumable_keys() {
  static const std::vector<std::string> keys = {"steps", "out", "resume", "overwrite", "device", "bf16",
                                                "checkpoint_every", "log_every", "progress", "threads",
                                                "dist_timeout"};
  return keys;
}

}  // namespace

nlohmann::json LoopOptions::to_json() const {
  return {{"steps", steps},
          {"batch", batch},
          {"lr", lr},
          {"warmup", warmup},
          {"lr_schedule", lr_schedule},
          {"min_lr", min_lr},
          {"weight_decay", weight_decay},
          {"adam_beta1", adam_beta1},
          {"adam_beta2", adam_beta2},
          {"adam_eps", adam_eps},
          {"grad_clip", grad_clip},
          {"ema_decay", ema_decay},
          {"hflip", hflip},
          {"seed", seed},
          {"out", out},
          {"resume", resume},
          {"overwrite", overwrite},
          {"device", device},
          {"bf16", bf16},
          {"checkpoint_every", checkpoint_every},
          {"log_every", log_every},
          {"progress", progress},
          {"threads", threads},
          {"dist_timeout", dist_timeout}};
}

LoopOptions LoopOptions::from_json(const nlohmann::json& j) {
  LoopOptions o;
  o.steps = get_or(j, "steps", o.steps);
  o.batch = get_or(j, "batch", o.batch);
  o.lr = get_or(j, "lr", o.lr);
  o.warmup = get_or(j, "warmup", o.warmup);
  o.lr_schedule = get_or(j, "lr_schedule", o.lr_schedule);
  o.min_lr = get_or(j, "min_lr", o.min_lr);
  o.weight_decay = get_or(j, "weight_decay", o.weight_decay);
  o.adam_beta1 = get_or(j, "adam_beta1", o.adam_beta1);
  o.adam_beta2 = get_or(j, "adam_beta2", o.adam_beta2);
  o.adam_eps = get_or(j, "adam_eps", o.adam_eps);
  o.grad_clip = get_or(j, "grad_clip", o.grad_clip);
  o.ema_decay = get_or(j, "ema_decay", o.ema_decay);
  o.hflip = get_or(j, "hflip", o.hflip);
  o.seed = get_or(j, "seed", o.seed);
  o.out = get_or(j, "out", o.out);
  o.resume = get_or(j, "resume", o.resume);
  o.overwrite = get_or(j, "overwrite", o.overwrite);
  o.device = get_or(j, "device", o.device);
  o.bf16 = get_or(j, "bf16", o.bf16);
  o.checkpoint_every = get_or(j, "checkpoint_every", o.checkpoint_every);
  o.log_every = get_or(j, "log_every", o.log_every);
  o.progress = get_or(j, "progress", o.progress);
  o.threads = get_or(j, "threads", o.threads);
  o.dist_timeout = get_or(j, "dist_timeout", o.dist_timeout);
  return o;
}

nlohmann::json TrainOptions::to_json() const {
  return {{"kind", "unet"},
          {"data", data_json(data)},
          {"unet", unet.to_json()},
          {"schedule", schedule_json(schedule)},
          {"prediction", to_string(prediction)},
          {"loss_weight", to_string(loss_weight)},
          {"min_snr_gamma", min_snr_gamma},
          {"etsdm_t_tilde", etsdm.t_tilde},
          {"etsdm_n", etsdm.n},
          {"offset_noise", offset_noise},
          {"label_dropout", label_dropout},
          {"spacing", to_string(spacing)},
          {"vae", vae},
          {"loop", loop.to_json()}};
}

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
  if (get_or<std::string>(j, "kind", "unet") != "unet")
    throw std::invalid_argument("this run trains a " + j["kind"].dump() + ", not a UNet");
  TrainOptions o;
  if (j.contains("data")) o.data = data_from_json(j["data"]);
  if (j.contains("unet")) o.unet = UNetConfig::from_json(j["unet"]);
  if (j.contains("schedule")) o.schedule = schedule_from_json(j["schedule"]);
  o.prediction = parse_prediction(get_or<std::string>(j, "prediction", "eps"));
  o.loss_weight = parse_loss_weight(get_or<std::string>(j, "loss_weight", "uniform"));
  o.min_snr_gamma = get_or(j, "min_snr_gamma", o.min_snr_gamma);
  o.etsdm.t_tilde = get_or<int64_t>(j, "etsdm_t_tilde", 0);
  o.etsdm.n = get_or<int64_t>(j, "etsdm_n", 0);
  o.offset_noise = get_or(j, "offset_noise", o.offset_noise);
  o.label_dropout = get_or(j, "label_dropout", o.label_dropout);
  o.spacing = parse_spacing(get_or<std::string>(j, "spacing", "trailing"));
  o.vae = get_or<std::string>(j, "vae", "");
  if (j.contains("loop")) o.loop = LoopOptions::from_json(j["loop"]);
  return o;
}

nlohmann::json ClassifierTrainOptions::to_json() const {
  return {{"kind", "classifier"},
          {"data", data_json(data)},
          {"classifier", classifier.to_json()},
          {"schedule", schedule_json(schedule)},
          {"heldout", heldout},
          {"vae", vae},
          {"vae_fingerprint", vae_fingerprint},
          {"loop", loop.to_json()}};
}

ClassifierTrainOptions ClassifierTrainOptions::from_json(const nlohmann::json& j) {
  if (get_or<std::string>(j, "kind", "") != "classifier")
    throw std::invalid_argument("this run does not train a noisy classifier (kind " + j.value("kind", std::string("?")) + ")");
  ClassifierTrainOptions o;
  if (j.contains("data")) o.data = data_from_json(j["data"]);
  if (j.contains("classifier")) o.classifier = NoisyClassifierConfig::from_json(j["classifier"]);
  if (j.contains("schedule")) o.schedule = schedule_from_json(j["schedule"]);
  o.heldout = get_or(j, "heldout", o.heldout);
  o.vae = get_or<std::string>(j, "vae", "");
  o.vae_fingerprint = get_or<std::string>(j, "vae_fingerprint", "");
  if (j.contains("loop")) o.loop = LoopOptions::from_json(j["loop"]);
  return o;
}

nlohmann::json VaeTrainOptions::to_json() const {
  // The scaling factor is measured at each checkpoint (vae/config.json), not an option of the run.
  auto v = vae.to_json();
  v.erase("scaling_factor");
  return {{"kind", "vae"},
          {"data", data_json(data)},
          {"vae", v},
          {"reconstruction", reconstruction},
          {"kl_weight", kl_weight},
          {"heldout", heldout},
          {"scale_images", scale_images},
          {"loop", loop.to_json()}};
}

VaeTrainOptions VaeTrainOptions::from_json(const nlohmann::json& j) {
  if (get_or<std::string>(j, "kind", "") != "vae")
    throw std::invalid_argument("this run does not train an autoencoder (kind " + j.value("kind", std::string("?")) + ")");
  VaeTrainOptions o;
  if (j.contains("data")) o.data = data_from_json(j["data"]);
  if (j.contains("vae")) o.vae = AutoencoderKLConfig::from_json(j["vae"]);
  o.reconstruction = get_or(j, "reconstruction", o.reconstruction);
  o.kl_weight = get_or(j, "kl_weight", o.kl_weight);
  o.heldout = get_or(j, "heldout", o.heldout);
  o.scale_images = get_or(j, "scale_images", o.scale_images);
  if (j.contains("loop")) o.loop = LoopOptions::from_json(j["loop"]);
  return o;
}

// ================================================================ run folders and checkpoints

namespace {

const char* kNewCheckpoint = ".checkpoint-new";
const char* kOldCheckpoint = ".checkpoint-old";
const char* kComplete = "COMPLETE";

// Moves every component of a finished RUN/.checkpoint-new into RUN. Idempotent: a crash at any point
// leaves either the old or the new version of each component, and running it again completes the swap.
void swap_in_checkpoint(const fs::path& run) {
  fs::path fresh = run / kNewCheckpoint, old = run / kOldCheckpoint;
  fs::create_directories(old);
  for (const auto& e : fs::directory_iterator(fresh)) {
    std::string name = e.path().filename().string();
    if (name == kComplete) continue;
    fs::path target = run / name;
    if (fs::exists(target)) {
      fs::remove_all(old / name);
      fs::rename(target, old / name);
    }
    fs::rename(e.path(), target);
  }
  fs::remove_all(fresh);  // the COMPLETE marker goes last
  fs::remove_all(old);
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s;
  for (const auto& k : keys) s += (s.empty() ? "" : ", ") + k;
  return s;
}

// Keys (dotted paths) whose values differ between two option objects, ignoring resumable ones.
void diff_json(const nlohmann::json& a, const nlohmann::json& b, const std::string& prefix,
               std::vector<std::string>& out) {
  if (a.is_object() && b.is_object()) {
    std::vector<std::string> keys;
    for (auto it = a.begin(); it != a.end(); ++it) keys.push_back(it.key());
    for (auto it = b.begin(); it != b.end(); ++it)
      if (!a.contains(it.key())) keys.push_back(it.key());
    for (const auto& k : keys) {
      if (prefix == "loop." && std::count(resumable_keys().begin(), resumable_keys().end(), k)) continue;
      diff_json(a.value(k, nlohmann::json()), b.value(k, nlohmann::json()), prefix + k + ".", out);
    }
  } else if (a != b) {
    out.push_back(prefix.substr(0, prefix.size() - 1) + " (" + a.dump() + " in the run, " + b.dump() + " now)");
  }
}

}  // namespace

void check_run_folder(const LoopOptions& o) {
  if (o.out.empty()) throw std::invalid_argument("no run folder given (--out RUN)");
  if (o.resume && o.overwrite) throw std::invalid_argument("--resume and --overwrite exclude each other");
  fs::path run(o.out);
  if (o.resume) {
    if (!fs::exists(run / "run.json"))
      throw std::invalid_argument("cannot resume '" + o.out + "': no run.json there (not a diffuse run folder)");
    return;
  }
  bool exists = fs::exists(run) && !(fs::is_directory(run) && fs::is_empty(run));
  if (!exists) return;
  if (!o.overwrite)
    throw std::invalid_argument("run folder '" + o.out +
                                "' already exists (pass --resume to continue it or --overwrite to replace it)");
  if (!fs::is_directory(run) || !fs::exists(run / "run.json"))
    throw std::invalid_argument("--overwrite refused: '" + o.out +
                                "' exists but is not a diffuse run folder (no run.json); remove it yourself");
}

void finish_interrupted_checkpoint(const std::string& run_dir) {
  fs::path run(run_dir), fresh = run / kNewCheckpoint;
  if (fs::exists(fresh)) {
    if (fs::exists(fresh / kComplete))
      swap_in_checkpoint(run);
    else
      fs::remove_all(fresh);  // cut short while writing: the previous checkpoint is intact
  }
  fs::remove_all(run / kOldCheckpoint);
}

int64_t checkpoint_step(const std::string& run_dir) {
  std::string path = (fs::path(run_dir) / "train_state" / "state.json").string();
  auto j = load_json(path);
  if (!j.contains("step") || !j["step"].is_number_integer())
    throw std::runtime_error("'" + path + "' has no integer 'step': corrupt train state");
  return j["step"].get<int64_t>();
}

// ================================================================ the training loop

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

// Installs SIGINT/SIGTERM handlers that only set a flag; restores the previous handlers on destruction.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  static int caught() { return g_stop_signal; }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};


// log.csv: one row per `every` steps with the mean loss and, per tenth of [0, T), the mean per-example loss
// of the examples whose timestep fell in it (no such columns for T = 0: a task without timesteps, the
// autoencoder). loss.png plots it.
class LossLog {
 public:
  static constexpr int kBins = 10;
  LossLog(const fs::path& run, int64_t T, int64_t every) : path_(run / "log.csv"), T_(T), every_(std::max<int64_t>(1, every)) {}

  std::string header() const {
    std::string h = "step,loss,lr,images_per_s,grad_norm";
    for (int k = 0; k < bins(); ++k)
      h += ",loss_t" + std::to_string(k * T_ / kBins) + "-" + std::to_string((k + 1) * T_ / kBins - 1);
    return h;
  }

  // Keeps the rows up to `step` (a resumed run rewrites what came after its checkpoint).
  void open(int64_t step, bool fresh) {
    rows_.clear();
    if (!fresh && fs::exists(path_)) {
      std::ifstream in(path_);
      std::string line;
      std::getline(in, line);
      while (std::getline(in, line)) {
        std::vector<double> row;
        std::stringstream ss(line);
        std::string cell;
        while (std::getline(ss, cell, ',')) row.push_back(cell.empty() ? NAN : std::strtod(cell.c_str(), nullptr));
        if (row.size() == size_t(5 + bins()) && row[0] <= double(step)) rows_.push_back(row);
      }
    }
    std::ostringstream os;
    os << header() << "\n";
    for (const auto& r : rows_) os << format(r);
    write_file_atomic(path_.string(), os.str());
    reset();
  }

  void add(double loss, const torch::Tensor& per_example, const torch::Tensor& t, double grad_norm, int64_t images) {
    loss_sum_ += loss;
    grad_sum_ += grad_norm;
    images_ += images;
    ++steps_;
    if (bins() == 0) return;
    auto bin_of = torch::div(t.to(torch::kInt64) * kBins, T_, "floor").clamp(0, kBins - 1);
    auto per = per_example.detach().to(torch::kFloat64).cpu();
    bin_sum_ += torch::zeros({kBins}, torch::kFloat64).index_add_(0, bin_of, per);
    bin_n_ += torch::bincount(bin_of, {}, kBins).to(torch::kFloat64);
  }

  bool due(int64_t step) const { return step % every_ == 0; }
  int bins() const { return T_ > 0 ? kBins : 0; }

  void write(int64_t step, double lr) {
    if (steps_ == 0) return;
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - since_).count();
    std::vector<double> row = {double(step), loss_sum_ / steps_, lr, images_ / std::max(seconds, 1e-9), grad_sum_ / steps_};
    auto mean = bin_sum_ / bin_n_;  // NaN where a bin saw no example
    for (int k = 0; k < bins(); ++k) row.push_back(mean[k].item<double>());
    rows_.push_back(row);
    std::ofstream(path_, std::ios::app) << format(row);
    reset();
  }

  void plot(const fs::path& png) const {
    if (rows_.empty()) return;
    Series loss{"loss", {}, {}};
    for (const auto& r : rows_) {
      loss.x.push_back(r[0]);
      loss.y.push_back(r[1]);
    }
    if (bins() == 0) {
      plot_png(png.string(), {Panel{"training loss", "step", "loss", true, {loss}}});
      return;
    }
    // Per-timestep loss averaged over the last tenth of the rows.
    size_t from = rows_.size() - std::max<size_t>(1, rows_.size() / 10);
    Series by_t{"mean of the last " + std::to_string(rows_.size() - from) + " log rows", {}, {}};
    for (int k = 0; k < kBins; ++k) {
      double sum = 0;
      int n = 0;
      for (size_t i = from; i < rows_.size(); ++i)
        if (std::isfinite(rows_[i][5 + size_t(k)])) sum += rows_[i][5 + size_t(k)], ++n;
      by_t.x.push_back((k + 0.5) * double(T_) / kBins);
      by_t.y.push_back(n ? sum / n : NAN);
    }
    plot_png(png.string(), {Panel{"training loss", "step", "loss", true, {loss}},
                            Panel{"loss per timestep decile", "t", "loss", true, {by_t}}});
  }

 private:
  static std::string format(const std::vector<double>& r) {
    std::ostringstream os;
    os << int64_t(r[0]);
    os << std::setprecision(7);
    for (size_t i = 1; i < r.size(); ++i) {
      os << ",";
      if (std::isfinite(r[i])) os << r[i];
    }
    os << "\n";
    return os.str();
  }
  void reset() {
    loss_sum_ = grad_sum_ = 0;
    steps_ = images_ = 0;
    bin_sum_ = torch::zeros({kBins}, torch::kFloat64);
    bin_n_ = torch::zeros({kBins}, torch::kFloat64);
    since_ = std::chrono::steady_clock::now();
  }
  fs::path path_;
  int64_t T_, every_;
  std::vector<std::vector<double>> rows_;
  double loss_sum_ = 0, grad_sum_ = 0;
  int64_t steps_ = 0, images_ = 0;
  torch::Tensor bin_sum_, bin_n_;
  std::chrono::steady_clock::time_point since_;
};

// The rows [begin, begin + size) of a global batch of `global` examples that one rank trains on.
struct Shard {
  int64_t begin = 0, size = 0, global = 0;
  torch::Tensor rows(const torch::Tensor& t) const { return size == global ? t : t.narrow(0, begin, size); }
  /// `shard_shape` with its first dimension widened to the global batch.
  std::vector<int64_t> global_shape(torch::IntArrayRef shard_shape) const {
    auto s = shard_shape.vec();
    s[0] = global;
    return s;
  }
};

// What the loop trains: a model, its EMA copy, a loss and the folders a checkpoint holds.
class Task {
 public:
  virtual ~Task() = default;
  virtual std::string kind() const = 0;
  virtual void create(torch::Device device) = 0;
  virtual void load(const fs::path& run, torch::Device device) = 0;
  virtual torch::nn::Module& model() = 0;
  virtual torch::nn::Module& ema() = 0;
  /// Per-example loss [n] (float32, on the device) and the timesteps [n] (int64, CPU) of `batch`: this rank's
  /// n = shard.size rows of the global batch. Random draws are made for the whole global batch from `gen`
  /// (as one process would) and then cut to the shard's rows, so sharding changes no number.
  virtual std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) = 0;
  /// Writes the model folders (and scheduler/) of a checkpoint into `dir`.
  virtual void save(const fs::path& dir) = 0;
  virtual int64_t T() const = 0;
};

double lr_at(const LoopOptions& o, int64_t step) {
  // Linear warmup over `warmup` steps, then constant or a half cosine to min_lr at the last step.
  if (o.warmup > 0 && step < o.warmup) return o.lr * double(step + 1) / double(o.warmup);
  if (o.lr_schedule == "constant") return o.lr;
  double span = double(std::max<int64_t>(1, o.steps - o.warmup));
  double progress = std::min(1.0, double(step - o.warmup) / span);
  return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * progress));
}

void validate_loop(const LoopOptions& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.steps < 1) bad("--steps must be at least 1, got " + std::to_string(o.steps));
  if (o.batch < 1) bad("--batch must be at least 1, got " + std::to_string(o.batch));
  if (!(o.lr > 0) || !std::isfinite(o.lr)) bad("--lr must be a positive number, got " + std::to_string(o.lr));
  if (o.warmup < 0) bad("--warmup must be >= 0");
  if (o.lr_schedule != "constant" && o.lr_schedule != "cosine")
    bad("unknown --lr-schedule '" + o.lr_schedule + "' (expected constant or cosine)");
  if (!(o.min_lr >= 0 && o.min_lr <= o.lr)) bad("--min-lr must be in [0, lr]");
  if (!(o.weight_decay >= 0)) bad("--weight-decay must be >= 0");
  if (!(o.grad_clip >= 0)) bad("--grad-clip must be >= 0 (0 disables clipping)");
  if (!(o.ema_decay >= 0 && o.ema_decay < 1)) bad("--ema-decay must be in [0, 1), got " + std::to_string(o.ema_decay));
  if (o.checkpoint_every < 1) bad("--checkpoint-every must be at least 1");
  if (o.log_every < 1) bad("--log-every must be at least 1");
  if (!(o.dist_timeout > 0) || !std::isfinite(o.dist_timeout))
    bad("--dist-timeout must be a positive number of seconds, got " + std::to_string(o.dist_timeout));
}

// Creates, replaces or reopens the run folder. Returns true when resuming.
bool prepare_run_folder(const LoopOptions& o, const nlohmann::json& options_json) {
  check_run_folder(o);
  fs::path run(o.out);
  if (o.resume) {
    finish_interrupted_checkpoint(o.out);
    if (!fs::exists(run / "train_state" / "state.json"))
      throw std::invalid_argument("cannot resume '" + o.out +
                                  "': it has no checkpoint yet (train_state/state.json missing); start it again with --overwrite");
    auto stored = load_json((run / "run.json").string());
    std::vector<std::string> diffs;
    diff_json(stored, options_json, "", diffs);
    if (!diffs.empty())
      throw std::invalid_argument("cannot resume '" + o.out + "' with different options: " + join_keys(diffs) +
                                  " (resume without them, or start a new run)");
    return true;
  }
  if (fs::exists(run)) fs::remove_all(run);  // empty, or a run folder with --overwrite (checked above)
  fs::create_directories(run);
  return false;
}

struct ScopedAutocast {
  bool on;
  explicit ScopedAutocast(bool enable) : on(enable) {
    if (!on) return;
    compat::set_cuda_autocast(true);
  }
  ~ScopedAutocast() {
    if (!on) return;
    compat::set_cuda_autocast(false);
    at::autocast::clear_cache();
  }
};

bool all_finite(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (const auto& p : m.parameters())
    if (!torch::isfinite(p).all().item<bool>()) return false;
  return true;
}

// EMA of the weights (Polyak averaging) with the warmup of Tarvainen & Valpola / diffusers' EMAModel:
// decay_k = min(decay, (1 + k) / (10 + k)).
void update_ema(torch::nn::Module& ema, torch::nn::Module& model, double decay, int64_t step) {
  torch::NoGradGuard ng;
  double d = std::min(decay, (1.0 + double(step)) / (10.0 + double(step)));
  auto e = ema.parameters(), m = model.parameters();
  for (size_t i = 0; i < e.size(); ++i) e[i].mul_(d).add_(m[i].detach(), 1.0 - d);
}

void copy_weights(torch::nn::Module& to, torch::nn::Module& from) {
  torch::NoGradGuard ng;
  auto t = to.parameters(), f = from.parameters();
  for (size_t i = 0; i < t.size(); ++i) t[i].copy_(f[i]);
}

at::Generator device_generator(torch::Device device) { return at::globalContext().defaultGenerator(device); }

std::map<std::string, torch::Tensor> rng_states(torch::Device device) {
  std::map<std::string, torch::Tensor> out;
  {
    auto g = device_generator(torch::kCPU);
    std::lock_guard<std::mutex> lock(g.mutex());
    out["cpu"] = g.get_state();
  }
  if (!device.is_cpu()) {
    auto g = device_generator(device);
    std::lock_guard<std::mutex> lock(g.mutex());
    out["device"] = g.get_state();
  }
  return out;
}

void restore_rng_states(const std::map<std::string, torch::Tensor>& states, torch::Device device) {
  auto set = [](at::Generator g, const torch::Tensor& s) {
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(s);
  };
  if (states.count("cpu")) set(device_generator(torch::kCPU), states.at("cpu"));
  if (!device.is_cpu() && states.count("device")) set(device_generator(device), states.at("device"));
}

// Data parallelism (docs/distributed.md): with several processes --device cuda means cuda:LOCAL_RANK.
torch::Device rank_device(const std::string& name, const DistEnv& env) {
  torch::Device device = parse_device(name);
  if (!env.enabled() || !device.is_cuda()) return device;
  if (device.has_index())
    throw std::invalid_argument("--device " + name + " names one GPU, but " + std::to_string(env.world_size) +
                                " processes train together; pass --device cuda (rank r uses cuda:LOCAL_RANK) and "
                                "choose GPUs with CUDA_VISIBLE_DEVICES");
  const int64_t gpus = int64_t(torch::cuda::device_count());
  if (env.local_rank >= gpus)
    throw std::invalid_argument("LOCAL_RANK " + std::to_string(env.local_rank) + " has no GPU: this machine has " +
                                std::to_string(gpus) + " (start at most that many processes per machine)");
  return torch::Device(torch::kCUDA, c10::DeviceIndex(env.local_rank));
}

// CPU ranks on one machine share its cores (torchrun likewise sets OMP_NUM_THREADS=1 by default).
void set_threads(const LoopOptions& o, const DistEnv& env, torch::Device device) {
  if (o.threads > 0) {
    torch::set_num_threads(o.threads);
    return;
  }
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  if (!env.enabled() || !device.is_cpu() || std::getenv("OMP_NUM_THREADS") || !local) return;
  const int per_machine = std::max(1, std::atoi(local));
  torch::set_num_threads(std::max(1, int(std::thread::hardware_concurrency()) / per_machine));
}

// Runs `body` on rank 0 only; every rank then learns whether it threw (one collective), so a failure there
// stops all ranks at once instead of leaving them to time out.
template <class F>
void on_main_rank(Distributed& dist, const std::string& what, F&& body) {
  std::exception_ptr error;
  if (dist.is_main()) try {
      body();
    } catch (...) {
      error = std::current_exception();
    }
  if (dist.all_reduce_sum(error ? 1.0 : 0.0) == 0) return;
  if (error) std::rethrow_exception(error);
  throw RankZeroFailed("rank " + std::to_string(dist.rank()) + ": rank 0 failed to " + what + " (see its error)");
}

// Per-example losses and timesteps of the whole global batch, gathered from every rank's rows (for the log).
std::pair<torch::Tensor, torch::Tensor> gather_rows(Distributed& dist, const Shard& shard, const torch::Tensor& per_example,
                                                    const torch::Tensor& t) {
  auto all = torch::zeros({2, shard.global}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  all[0].narrow(0, shard.begin, shard.size).copy_(per_example.detach());
  all[1].narrow(0, shard.begin, shard.size).copy_(t);
  std::vector<torch::Tensor> v = {all};
  dist.all_reduce_sum(v);
  return {all[0].to(torch::kFloat32), all[1].to(torch::kInt64).cpu()};
}

// The signal that stops the run: any rank's SIGINT/SIGTERM, the lowest rank's winning, seen by all at once.
int agreed_stop_signal(Distributed& dist) {
  if (!dist.enabled()) return StopSignals::caught();
  auto flags = torch::zeros({dist.world_size()}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  flags[dist.rank()] = double(StopSignals::caught());
  std::vector<torch::Tensor> v = {flags};
  dist.all_reduce_sum(v);
  auto cpu = flags.cpu();
  for (int64_t r = 0; r < dist.world_size(); ++r)
    if (cpu[r].item<double>() != 0) return int(cpu[r].item<double>());
  return 0;
}

// Replicas stay identical only if every rank applied the same averaged gradients: checked at each checkpoint.
void check_replicas(Distributed& dist, Task& task, int64_t step) {
  if (!dist.enabled()) return;
  torch::NoGradGuard ng;
  double sum = 0;
  for (auto* m : {&task.model(), &task.ema()})
    for (const auto& p : m->parameters()) sum += p.to(torch::kFloat64).sum().item<double>();
  std::vector<torch::Tensor> root = {torch::tensor({sum}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()))};
  dist.broadcast(root);
  if (dist.all_reduce_sum(root[0].item<double>() == sum ? 0.0 : 1.0) != 0)
    throw std::runtime_error("rank " + std::to_string(dist.rank()) + ": the model replicas differ at step " +
                             std::to_string(step) + " (a bug: the ranks applied different updates); nothing written");
}

TrainResult run_loop(Task& task, const LoopOptions& o, const nlohmann::json& options_json, const Dataset& data,
                     const TrainHooks& hooks) {
  validate_loop(o);
  const DistEnv env = DistEnv::from_environment();
  if (o.batch % env.world_size != 0)
    throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is the global batch and must divide among " +
                                std::to_string(env.world_size) + " processes; pass a multiple of " +
                                std::to_string(env.world_size));
  torch::Device device = rank_device(o.device, env);
  if (o.bf16 && !device.is_cuda())
    throw std::invalid_argument("--bf16 autocast needs --device cuda (on the CPU bf16 is slower than float32)");
  set_threads(o, env, device);
  BatchSampler sampler(data.size(), o.batch, o.seed);  // validates the batch size against the data
  auto dist = std::make_shared<Distributed>(
      env, device, std::chrono::milliseconds(int64_t(std::ceil(o.dist_timeout * 1000))));
  const bool main = dist->is_main();
  const Shard shard{env.rank * (o.batch / env.world_size), o.batch / env.world_size, o.batch};
  fs::path run(o.out);

  // Rank 0 alone reads and writes the run folder; the others get its weights and optimizer state.
  bool resumed = o.resume;
  int64_t start = 0;
  on_main_rank(*dist, "prepare the run folder '" + o.out + "'", [&] {
    resumed = prepare_run_folder(o, options_json);
    if (!resumed) return;
    auto state = load_json((run / "train_state" / "state.json").string());
    start = state.at("step").get<int64_t>();
    int64_t n = state.value("dataset_size", int64_t(-1));
    if (n != data.size())
      throw std::invalid_argument("cannot resume '" + o.out + "': the data set had " + std::to_string(n) +
                                  " images, now it has " + std::to_string(data.size()) + " (same --data needed)");
  });
  auto options = torch::optim::AdamWOptions(o.lr)
                     .betas({o.adam_beta1, o.adam_beta2})
                     .eps(o.adam_eps)
                     .weight_decay(o.weight_decay);
  std::unique_ptr<torch::optim::AdamW> optimizer;
  on_main_rank(*dist, "load the checkpoint of '" + o.out + "'", [&] {
    if (resumed) {
      task.load(run, device);
    } else {
      torch::manual_seed(o.seed);
      task.create(device);
    }
    optimizer = std::make_unique<torch::optim::AdamW>(task.model().parameters(), options);
    if (resumed) {
      torch::load(*optimizer, (run / "train_state" / "optimizer.pt").string(), device);
      restore_rng_states(load_safetensors((run / "train_state" / "rng.safetensors").string()), device);
    }
    write_file_atomic((run / "run.json").string(), options_json.dump(2) + "\n");
  });
  if (!main) {
    torch::manual_seed(o.seed);
    task.create(device);  // overwritten by rank 0's weights below
    optimizer = std::make_unique<torch::optim::AdamW>(task.model().parameters(), options);
  }
  if (dist->enabled()) {
    start = int64_t(dist->all_reduce_sum(main ? double(start) : 0.0));
    dist->broadcast_module(task.model());
    dist->broadcast_module(task.ema());
    if (resumed) {
      std::string state;
      if (main) {
        std::ostringstream os;
        torch::save(*optimizer, os);
        state = os.str();
      }
      dist->broadcast_bytes(state);
      if (!main) {
        std::istringstream is(state);
        torch::load(*optimizer, is, device);
      }
    }
    // Dropout draws from the default generator: a stream of its own per rank (rank 0 keeps one process's).
    if (!main) torch::manual_seed(mix_seed(o.seed, 0xd15ULL + uint64_t(env.rank), uint64_t(start)));
  }
  auto& model = task.model();
  model.train();

  LossLog log(run, task.T(), o.log_every);
  if (main) log.open(start, !resumed);
  Progress progress(o.progress && main, start, o.steps, o.log_every);
  if (resumed)
    progress.message("resuming '" + o.out + "' at step " + std::to_string(start) +
                     (dist->enabled() ? " with " + std::to_string(env.world_size) + " processes" : ""));
  else if (dist->enabled())
    progress.message("data parallel: " + std::to_string(env.world_size) + " processes (" + dist->backend() + "), " +
                     std::to_string(shard.size) + " of " + std::to_string(o.batch) + " images per step each");
  int64_t last_checkpoint = resumed ? start : -1;
  auto checkpoint = [&](int64_t step) {
    if (!all_finite(model) || !all_finite(task.ema()))
      throw NonFiniteLoss("the weights became NaN or infinite by step " + std::to_string(step) +
                              "; nothing was written, the last good checkpoint (step " +
                              std::to_string(last_checkpoint) + ") is kept in '" + o.out + "'",
                          step);
    check_replicas(*dist, task, step);
    last_checkpoint = step;
    if (!main) return;
    fs::path dir = run / kNewCheckpoint;
    fs::remove_all(dir);
    fs::create_directories(dir / "train_state");
    task.save(dir);
    torch::save(*optimizer, (dir / "train_state" / "optimizer.pt").string());
    save_safetensors((dir / "train_state" / "rng.safetensors").string(), rng_states(device));
    nlohmann::json state = {{"step", step},
                            {"epoch", step / sampler.steps_per_epoch()},
                            {"batch_in_epoch", step % sampler.steps_per_epoch()},
                            {"steps_per_epoch", sampler.steps_per_epoch()},
                            {"dataset_size", data.size()},
                            {"batch", o.batch},
                            {"seed", o.seed},
                            {"world_size", env.world_size},
                            {"kind", task.kind()}};
    write_file_atomic((dir / "train_state" / "state.json").string(), state.dump(2) + "\n");
    write_file_atomic((dir / kComplete).string(), std::to_string(step) + "\n");
    swap_in_checkpoint(run);
    try {
      log.plot(run / "loss.png");
    } catch (const std::exception& e) {
      progress.message(std::string("warning: loss plot not drawn: ") + e.what());
    }
  };

  StopSignals signals;
  TrainResult result;
  result.run_dir = o.out;
  result.start_step = start;
  result.step = start;
  result.rank = env.rank;
  result.world_size = env.world_size;
  auto params = model.parameters();
  GradientAverager averager(dist, params);  // no-op for one process
  double max_norm = o.grad_clip > 0 ? o.grad_clip : std::numeric_limits<double>::infinity();
  auto t_begin = std::chrono::steady_clock::now();
  auto t_last = t_begin;
  for (int64_t step = start; step < o.steps; ++step) {
    double lr = lr_at(o, step);
    for (auto& group : optimizer->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    auto batch = make_batch(data, sampler.indices(step), o.hflip, mix_seed(o.seed, uint64_t(step), 1), device);
    batch.images = shard.rows(batch.images);
    batch.labels = shard.rows(batch.labels);
    auto gen = cpu_generator(mix_seed(o.seed, uint64_t(step), 2));
    torch::Tensor per_example, t;
    {
      ScopedAutocast autocast(o.bf16);
      std::tie(per_example, t) = task.loss(batch, shard, gen);
    }
    auto loss = per_example.mean();  // of the shard: the mean over ranks of its gradient is the global batch's
    double loss_value = 0;
    if (dist->enabled()) {
      std::tie(per_example, t) = gather_rows(*dist, shard, per_example, t);
      loss_value = per_example.mean().item<double>();
    } else {
      loss_value = loss.item<double>();
    }
    auto stop_nonfinite = [&](const std::string& what) {
      progress.finish();
      std::string kept = last_checkpoint >= 0 ? "the last good checkpoint (step " + std::to_string(last_checkpoint) +
                                                    ") is kept in '" + o.out + "'"
                                              : "no checkpoint was written yet";
      throw NonFiniteLoss(what + " at step " + std::to_string(step + 1) + "; stopped without saving, " + kept +
                              " (lower --lr, check the data, or raise --grad-clip's strictness)",
                          step + 1);
    };
    if (!std::isfinite(loss_value)) stop_nonfinite("the loss is " + std::to_string(loss_value));
    optimizer->zero_grad();
    loss.backward();
    averager.finish();
    double grad_norm = torch::nn::utils::clip_grad_norm_(params, max_norm);
    if (!std::isfinite(grad_norm)) stop_nonfinite("the gradient norm is " + std::to_string(grad_norm));
    optimizer->step();
    update_ema(task.ema(), model, o.ema_decay, step);

    int64_t done = step + 1;
    auto now = std::chrono::steady_clock::now();
    double ips = double(o.batch) / std::max(1e-9, std::chrono::duration<double>(now - t_last).count());
    t_last = now;
    if (main) {
      log.add(loss_value, per_example, t, grad_norm, o.batch);
      if (log.due(done) || done == o.steps) log.write(done, lr);
    }
    {
      std::ostringstream fields;
      fields << "loss " << std::setprecision(4) << loss_value << "  " << std::fixed << std::setprecision(1) << ips
             << " img/s  lr " << std::scientific << std::setprecision(2) << lr;
      progress.update(done, fields.str());
    }
    result.step = done;
    result.last_loss = loss_value;
    if (done % o.checkpoint_every == 0 || done == o.steps) checkpoint(done);
    if (hooks.on_step) hooks.on_step(StepInfo{done, loss_value, lr, ips});
    if (int sig = agreed_stop_signal(*dist)) {
      if (last_checkpoint != done) checkpoint(done);
      result.interrupted = true;
      result.signal = sig;
      progress.message("stopped by signal " + std::to_string(sig) + " at step " + std::to_string(done) +
                       "; checkpoint written, continue with --resume");
      break;
    }
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
  result.images_per_s = double(result.step - start) * double(o.batch) / std::max(seconds, 1e-9);
  if (last_checkpoint != result.step) checkpoint(result.step);
  dist->barrier();  // the run ends when rank 0's last checkpoint is written
  progress.finish();
  return result;
}

// ---------------------------------------------------------------- the diffusion task

class DiffusionTask : public Task {
 public:
  DiffusionTask(const TrainOptions& o, const Dataset& data, AutoencoderKL vae)
      : o_(o),
        scheduler_(make_scheduler_config(o.schedule, o.prediction, o.spacing, o.etsdm)),
        schedule_(scheduler_.schedule()),
        vae_(std::move(vae)) {
    const auto& u = o.unet;
    if (u.sample_size.value_or(-1) != data.height() || data.height() != data.width() || u.in_channels != data.channels())
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the UNet (" +
                                  std::to_string(u.in_channels) + "x" + std::to_string(u.sample_size.value_or(0)) +
                                  "x" + std::to_string(u.sample_size.value_or(0)) + ")");
    if (o.vae.empty() != vae_.is_empty())
      throw std::invalid_argument(o.vae.empty() ? "an autoencoder was given but the options name none (set TrainOptions::vae)"
                                                : "the options train on the latents of '" + o.vae +
                                                      "' but no autoencoder was given");
    if (u.out_channels != u.in_channels)
      throw std::invalid_argument("the UNet must output as many channels as it reads (out_channels " +
                                  std::to_string(u.out_channels) + ", in_channels " + std::to_string(u.in_channels) + ")");
    if (u.num_class_embeds) {
      if (data.num_classes < 1)
        throw std::invalid_argument("the UNet is class-conditional but the data '" + data.name +
                                    "' has no classes (pass --unconditional)");
      if (*u.num_class_embeds < data.num_classes + 1)
        throw std::invalid_argument("num_class_embeds " + std::to_string(*u.num_class_embeds) + " leaves no null class for " +
                                    std::to_string(data.num_classes) + " classes (needs " +
                                    std::to_string(data.num_classes + 1) + ")");
      null_class_ = *u.num_class_embeds - 1;
    }
    if (!(o.label_dropout >= 0 && o.label_dropout < 1))
      throw std::invalid_argument("--label-dropout must be in [0, 1), got " + std::to_string(o.label_dropout));
    if (!(o.offset_noise >= 0)) throw std::invalid_argument("--offset-noise must be >= 0");
    // Refuses eps prediction on a zero-terminal-SNR schedule now rather than at the first t = T - 1.
    weight_ = loss_weight(o.loss_weight, o.prediction, schedule_.snr(), o.min_snr_gamma).to(torch::kFloat32);
  }

  std::string kind() const override { return "unet"; }
  void create(torch::Device device) override {
    unet_ = UNet2DModel(o_.unet);
    ema_ = UNet2DModel(o_.unet);
    to(device);
    copy_weights(*ema_, *unet_);
  }
  void load(const fs::path& run, torch::Device device) override {
    unet_ = load_unet((run / "unet").string(), device);
    ema_ = load_unet((run / "unet_ema").string(), device);
    if (!(unet_->config() == o_.unet))
      throw std::invalid_argument("'" + (run / "unet" / "config.json").string() + "' differs from run.json's UNet");
    to(device);
  }
  torch::nn::Module& model() override { return *unet_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return schedule_.T(); }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x0 = batch.images;
    int64_t B = x0.size(0);
    auto t = shard.rows(torch::randint(0, schedule_.T(), {shard.global}, gen, torch::kInt64));
    auto eps = shard.rows(offset_noise(torch::randn(shard.global_shape(x0.sizes()), gen, torch::kFloat32),
                                       o_.offset_noise, gen))
                   .to(device_);
    auto td = t.to(device_);
    auto a = a_.index_select(0, td).view({B, 1, 1, 1}), s = s_.index_select(0, td).view({B, 1, 1, 1});
    auto x_t = add_noise(x0, eps, a, s);
    torch::Tensor labels;
    if (null_class_ >= 0) {
      auto drop = shard.rows(torch::rand({shard.global}, gen) < o_.label_dropout).to(device_);
      labels = torch::where(drop, torch::full_like(batch.labels, null_class_), batch.labels);
    }
    auto cond = o_.etsdm.condition(t).to(device_);  // E-TSDM: the network sees f(t), the noise uses t
    auto pred = unet_->forward(x_t, cond, labels).to(torch::kFloat32);
    return {per_example_loss(o_.prediction, pred, x0, eps, a, s, weight_d_.index_select(0, td)), t};
  }

  void save(const fs::path& dir) override {
    save_unet(unet_, (dir / "unet").string());
    save_unet(ema_, (dir / "unet_ema").string());
    fs::create_directories(dir / "scheduler");
    scheduler_.save((dir / "scheduler" / "scheduler_config.json").string());
    if (!vae_.is_empty()) save_vae(vae_, (dir / "vae").string());  // latent diffusion: samples decode through it
  }

 private:
  void to(torch::Device device) {
    device_ = device;
    unet_->to(device);
    ema_->to(device);
    a_ = schedule_.a().to(torch::kFloat32).to(device);
    s_ = schedule_.s().to(torch::kFloat32).to(device);
    weight_d_ = weight_.to(device);
  }
  TrainOptions o_;
  SchedulerConfig scheduler_;
  Schedule schedule_;
  torch::Tensor weight_, weight_d_, a_, s_;
  int64_t null_class_ = -1;
  torch::Device device_ = torch::kCPU;
  UNet2DModel unet_{nullptr}, ema_{nullptr};
  AutoencoderKL vae_{nullptr};
};

// ---------------------------------------------------------------- the classifier task

class ClassifierTask : public Task {
 public:
  ClassifierTask(const ClassifierTrainOptions& o, const Dataset& data)
      : o_(o),
        scheduler_(make_scheduler_config(o.schedule, Prediction::v, Spacing::trailing, {})),
        schedule_(scheduler_.schedule()) {
    const auto& c = o.classifier;
    if (data.num_classes < 1) throw std::invalid_argument("a noisy classifier needs labelled data; '" + data.name + "' has no classes");
    if (c.num_classes != data.num_classes)
      throw std::invalid_argument("the classifier has " + std::to_string(c.num_classes) + " classes, the data " +
                                  std::to_string(data.num_classes));
    if (c.sample_size.value_or(-1) != data.height() || data.height() != data.width() || c.in_channels != data.channels())
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the classifier's input");
  }
  std::string kind() const override { return "classifier"; }
  void create(torch::Device device) override {
    model_ = NoisyClassifier(o_.classifier);
    ema_ = NoisyClassifier(o_.classifier);
    to(device);
    copy_weights(*ema_, *model_);
  }
  void load(const fs::path& run, torch::Device device) override {
    model_ = load_classifier((run / "classifier").string(), device);
    ema_ = load_classifier((run / "classifier_ema").string(), device);
    to(device);
  }
  torch::nn::Module& model() override { return *model_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return schedule_.T(); }
  NoisyClassifier& ema_model() { return ema_; }
  NoisyClassifier& raw_model() { return model_; }
  const Schedule& schedule() const { return schedule_; }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x0 = batch.images;
    int64_t B = x0.size(0);
    auto t = shard.rows(torch::randint(0, schedule_.T(), {shard.global}, gen, torch::kInt64));
    auto eps = shard.rows(torch::randn(shard.global_shape(x0.sizes()), gen, torch::kFloat32)).to(device_);
    auto td = t.to(device_);
    auto x_t = add_noise(x0, eps, a_.index_select(0, td), s_.index_select(0, td));
    auto logits = model_->forward(x_t, td.to(torch::kFloat32)).to(torch::kFloat32);
    return {torch::nn::functional::cross_entropy(
                logits, batch.labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone)),
            t};
  }
  void save(const fs::path& dir) override {
    save_classifier(model_, (dir / "classifier").string());
    save_classifier(ema_, (dir / "classifier_ema").string());
    fs::create_directories(dir / "scheduler");
    scheduler_.save((dir / "scheduler" / "scheduler_config.json").string());
  }

 private:
  void to(torch::Device device) {
    device_ = device;
    model_->to(device);
    ema_->to(device);
    a_ = schedule_.a().to(torch::kFloat32).to(device);
    s_ = schedule_.s().to(torch::kFloat32).to(device);
  }
  ClassifierTrainOptions o_;
  SchedulerConfig scheduler_;
  Schedule schedule_;
  torch::Tensor a_, s_;
  torch::Device device_ = torch::kCPU;
  NoisyClassifier model_{nullptr}, ema_{nullptr};
};

// ---------------------------------------------------------------- the autoencoder task

class VaeTask : public Task {
 public:
  VaeTask(const VaeTrainOptions& o, const Dataset& data) : o_(o) {
    const auto& v = o.vae;
    v.validate();
    if (v.sample_size != data.height() || data.height() != data.width() || v.in_channels != data.channels() ||
        v.out_channels != v.in_channels)
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the autoencoder (" +
                                  std::to_string(v.in_channels) + " -> " + std::to_string(v.out_channels) +
                                  " channels, sample_size " + std::to_string(v.sample_size) + ")");
    if (data.height() % v.downsample_factor() != 0)
      throw std::invalid_argument("image size " + std::to_string(data.height()) + " is not divisible by " +
                                  std::to_string(v.downsample_factor()) + " (2^(levels - 1)); change --size or --channels");
    if (o.reconstruction != "l1" && o.reconstruction != "l2")
      throw std::invalid_argument("--reconstruction '" + o.reconstruction + "' is not supported (l1 or l2)");
    if (!(o.kl_weight >= 0) || !std::isfinite(o.kl_weight))
      throw std::invalid_argument("--kl-weight must be >= 0, got " + std::to_string(o.kl_weight));
    if (o.scale_images < 2) throw std::invalid_argument("--scale-images must be at least 2");
    const int64_t k = std::min(o.scale_images, data.size());
    scale_sample_ = data.images.index_select(
        0, torch::linspace(0, double(data.size() - 1), k, torch::kFloat64).round().to(torch::kInt64));
  }
  std::string kind() const override { return "vae"; }
  void create(torch::Device device) override {
    vae_ = AutoencoderKL(o_.vae);
    ema_ = AutoencoderKL(o_.vae);
    to(device);
    copy_weights(*ema_, *vae_);
  }
  void load(const fs::path& run, torch::Device device) override {
    vae_ = load_vae((run / "vae").string(), device);
    ema_ = load_vae((run / "vae_ema").string(), device);
    auto stored = vae_->config();
    stored.scaling_factor = o_.vae.scaling_factor;
    if (!(stored == o_.vae))
      throw std::invalid_argument("'" + (run / "vae" / "config.json").string() + "' differs from run.json's autoencoder");
    to(device);
  }
  torch::nn::Module& model() override { return *vae_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return 0; }  // no timesteps
  AutoencoderKL& raw_model() { return vae_; }
  AutoencoderKL& ema_model() { return ema_; }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x = batch.images;
    auto posterior = vae_->encode(x);
    auto noise = shard.rows(torch::randn(shard.global_shape(posterior.mean.sizes()), gen, torch::kFloat32));
    auto diff = vae_->decode(posterior.sample_from(noise)).to(torch::kFloat32) - x;
    auto rec = (o_.reconstruction == "l1" ? diff.abs() : diff.square()).flatten(1).mean(1);
    auto kl = posterior.kl().to(torch::kFloat32) / double(x[0].numel());
    return {rec + o_.kl_weight * kl, torch::zeros({x.size(0)}, torch::kInt64)};
  }

  // Each saved model carries the scaling factor of its own weights.
  void save(const fs::path& dir) override {
    const std::pair<AutoencoderKL*, const char*> models[] = {{&vae_, "vae"}, {&ema_, "vae_ema"}};
    for (const auto& [model, name] : models) {
      (*model)->set_scaling_factor(measure_scaling_factor(*model, scale_sample_, o_.loop.batch, o_.loop.seed));
      save_vae(*model, (dir / name).string());
    }
  }

 private:
  void to(torch::Device device) {
    vae_->to(device);
    ema_->to(device);
  }
  VaeTrainOptions o_;
  torch::Tensor scale_sample_;
  AutoencoderKL vae_{nullptr}, ema_{nullptr};
};

}  // namespace

TrainResult train(const TrainOptions& options, const Dataset& data, const TrainHooks& hooks, AutoencoderKL vae) {
  DiffusionTask task(options, data, std::move(vae));
  return run_loop(task, options.loop, options.to_json(), data, hooks);
}

std::vector<AccuracyRow> noisy_accuracy(NoisyClassifier& model, const Schedule& schedule, const Dataset& data,
                                        int64_t bins, uint64_t seed, torch::Device device, int64_t batch) {
  torch::NoGradGuard ng;
  bool was_training = model->is_training();
  model->eval();
  int64_t T = schedule.T(), n = data.size();
  auto a = schedule.a().to(torch::kFloat32), s = schedule.s().to(torch::kFloat32);
  std::vector<AccuracyRow> rows;
  for (int64_t k = 0; k < bins; ++k) {
    int64_t lo = k * T / bins, hi = (k + 1) * T / bins;
    auto gen = cpu_generator(mix_seed(seed, 0xacc, uint64_t(k)));
    int64_t correct = 0;
    for (int64_t i = 0; i < n; i += batch) {
      int64_t b = std::min(batch, n - i);
      auto x0 = data.images.narrow(0, i, b);
      auto t = torch::randint(lo, hi, {b}, gen, torch::kInt64);
      auto eps = torch::randn(x0.sizes(), gen, torch::kFloat32);
      auto x_t = add_noise(x0, eps, a.index_select(0, t), s.index_select(0, t));
      auto pred = model->forward(x_t.to(device), t.to(torch::kFloat32).to(device)).argmax(1).cpu();
      correct += (pred == data.labels.narrow(0, i, b)).sum().item<int64_t>();
    }
    rows.push_back({lo, hi, double(correct) / double(n), n});
  }
  model->train(was_training);
  return rows;
}

TrainResult train_classifier(const ClassifierTrainOptions& options, const Dataset& data, const Dataset& heldout,
                             std::ostream* report, const TrainHooks& hooks) {
  ClassifierTask task(options, data);
  auto result = run_loop(task, options.loop, options.to_json(), data, hooks);
  if (result.rank == 0 && heldout.images.defined() && heldout.size() > 0) {
    torch::Device device = parse_device(options.loop.device);
    auto raw = noisy_accuracy(task.raw_model(), task.schedule(), heldout, 10, options.loop.seed, device);
    auto ema = noisy_accuracy(task.ema_model(), task.schedule(), heldout, 10, options.loop.seed, device);
    std::ostringstream csv;
    csv << "t_begin,t_end,accuracy,accuracy_ema,count\n";
    for (size_t k = 0; k < raw.size(); ++k)
      csv << raw[k].t_begin << "," << raw[k].t_end << "," << raw[k].accuracy << "," << ema[k].accuracy << ","
          << raw[k].count << "\n";
    write_file_atomic((fs::path(options.loop.out) / "accuracy.csv").string(), csv.str());
    if (report) {
      *report << "held-out accuracy on " << heldout.size() << " images of " << heldout.name
              << " noised at t in each range (step " << result.step << "):\n"
              << "  t range      raw     EMA\n";
      for (size_t k = 0; k < raw.size(); ++k)
        *report << "  " << std::left << std::setw(11)
                << (std::to_string(raw[k].t_begin) + "-" + std::to_string(raw[k].t_end - 1)) << std::right << std::fixed
                << std::setprecision(3) << std::setw(6) << raw[k].accuracy << "  " << std::setw(6) << ema[k].accuracy
                << "\n";
      *report << "  (chance: " << std::setprecision(3) << 1.0 / double(options.classifier.num_classes) << ")\n";
    }
  }
  return result;
}

TrainResult train_vae(const VaeTrainOptions& options, const Dataset& data, const Dataset& heldout, std::ostream* report,
                      const TrainHooks& hooks) {
  VaeTask task(options, data);
  auto result = run_loop(task, options.loop, options.to_json(), data, hooks);
  if (result.interrupted || result.rank != 0 || !heldout.images.defined() || heldout.size() == 0) return result;
  const int64_t batch = options.loop.batch;
  // Posterior noise for the held-out latents from another stream than the checkpoint's measurement.
  const uint64_t seed = mix_seed(options.loop.seed, 0x7ae);
  std::ostringstream csv;
  csv << "model,psnr,mse,l1,latent_mean,latent_std,scaling_factor,scaled_latent_mean,scaled_latent_std,images\n";
  csv << std::setprecision(7);
  if (report)
    *report << "held-out reconstruction of " << heldout.size() << " images of " << heldout.name << " (step "
            << result.step << "; posterior mean, PSNR for the range [-1, 1]):\n"
            << "  model     PSNR dB    MSE        latent std  factor     scaled std\n";
  const std::pair<AutoencoderKL*, const char*> models[] = {{&task.raw_model(), "vae"}, {&task.ema_model(), "vae_ema"}};
  for (const auto& [model, name] : models) {
    auto r = reconstruction_stats(*model, heldout.images, batch);
    const double factor = (*model)->config().scaling_factor;
    auto before = latent_stats(*model, heldout.images, batch, 1.0, seed);
    auto after = latent_stats(*model, heldout.images, batch, factor, seed);
    csv << name << "," << r.psnr << "," << r.mse << "," << r.l1 << "," << before.mean << "," << before.std << ","
        << factor << "," << after.mean << "," << after.std << "," << r.count << "\n";
    if (report)
      *report << "  " << std::left << std::setw(9) << name << std::right << std::fixed << std::setprecision(2)
              << std::setw(7) << r.psnr << "    " << std::scientific << std::setprecision(3) << r.mse << "  "
              << std::fixed << std::setprecision(4) << std::setw(10) << before.std << "  " << std::setw(9) << factor
              << "  " << std::setw(9) << after.std << "\n";
  }
  write_file_atomic((fs::path(options.loop.out) / "reconstruction.csv").string(), csv.str());
  if (report)
    *report << "  (latent std over posterior samples; factor = 1 / std on " << std::min(options.scale_images, data.size())
            << " training images, stored in vae*/config.json as scaling_factor)\n";
  return result;
}

}  // namespace diffuse
