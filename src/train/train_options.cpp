// Training options to and from run.json.
#include <string>
#include <vector>

#include "diffuse/train/train.h"
#include "train/train_internal.h"

namespace diffuse {

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
          {"cuda_graphs", cuda_graphs},
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
  o.cuda_graphs = get_or(j, "cuda_graphs", o.cuda_graphs);
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
          {"path", path},
          {"flow_shift", flow_shift},
          {"timestep_density", timestep_density},
          {"logit_mean", logit_mean},
          {"logit_std", logit_std},
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
  o.path = get_or<std::string>(j, "path", o.path);
  o.flow_shift = get_or(j, "flow_shift", o.flow_shift);
  o.timestep_density = get_or<std::string>(j, "timestep_density", o.timestep_density);
  o.logit_mean = get_or(j, "logit_mean", o.logit_mean);
  o.logit_std = get_or(j, "logit_std", o.logit_std);
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

const std::vector<ResumableOption>& resumable_options() {
  // out, resume, overwrite and progress describe this invocation, not the run; the others leave the weights
  // and the data order alone.
  static const std::vector<ResumableOption> table = {
      {"out", "--out", [](LoopOptions& s, const LoopOptions& g) { s.out = g.out; }, true},
      {"resume", "--resume", [](LoopOptions& s, const LoopOptions&) { s.resume = true; }, true},
      {"overwrite", "", [](LoopOptions& s, const LoopOptions&) { s.overwrite = false; }, true},
      {"progress", "--quiet", [](LoopOptions& s, const LoopOptions& g) { s.progress = g.progress; }, true},
      {"steps", "--steps", [](LoopOptions& s, const LoopOptions& g) { s.steps = g.steps; }},
      {"device", "--device", [](LoopOptions& s, const LoopOptions& g) { s.device = g.device; }},
      {"bf16", "--bf16", [](LoopOptions& s, const LoopOptions& g) { s.bf16 = g.bf16; }},
      {"cuda_graphs", "--cuda-graphs", [](LoopOptions& s, const LoopOptions& g) { s.cuda_graphs = g.cuda_graphs; }},
      {"checkpoint_every", "--checkpoint-every",
       [](LoopOptions& s, const LoopOptions& g) { s.checkpoint_every = g.checkpoint_every; }},
      {"log_every", "--log-every", [](LoopOptions& s, const LoopOptions& g) { s.log_every = g.log_every; }},
      {"threads", "--threads", [](LoopOptions& s, const LoopOptions& g) { s.threads = g.threads; }},
      {"dist_timeout", "--dist-timeout", [](LoopOptions& s, const LoopOptions& g) { s.dist_timeout = g.dist_timeout; }},
  };
  return table;
}

}  // namespace diffuse
