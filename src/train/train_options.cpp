// Training options to and from run.json.
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "diffuse/train/train.h"
#include "diffuse/util/runtime.h"
#include "io/json_fields.h"
#include "train/train_internal.h"

namespace diffuse {

namespace {

using json_config::get_or;

// A field that run.json spells by name (the CLI's spelling): written as to_name(field); read as a string, then
// from_name, whose std::invalid_argument becomes the refusal naming the key.
template <class Field, class F, class ToName, class FromName>
void named_field(F&& f, const std::string& key, Field& field, ToName to_name, FromName from_name, const char* expected) {
  if constexpr (std::is_const_v<Field>) {
    f(key, to_name(field));
  } else {
    std::string name = to_name(field);
    f(key, name);
    try {
      field = from_name(name);
    } catch (const std::invalid_argument&) {
      json_config::refuse(key, "\"" + name + "\"", expected);
    }
  }
}

torch::Device device_of_name(const std::string& name) {
  try {
    return torch::Device(name);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + name + "'");
  }
}
std::string device_name(const torch::Device& d) { return d.str(); }
std::string lr_schedule_name(LrSchedule schedule) { return to_string(schedule); }
torch::ScalarType conv_dtype_of_name(const std::string& name) { return network_dtype(name, "--conv-dtype"); }

// Each options type's keys, once: read by its from_json, written by its to_json (json_config::Reader / Writer).
constexpr auto data_fields = [](auto& d, auto&& f) {
  f("source", d.source);
  f("size", d.size);
  f("channels", d.channels);
  f("fit", d.fit);
  f("limit", d.limit);
  f("synthetic_count", d.synthetic_count);
  f("seed", d.seed);
};
constexpr auto schedule_fields = [](auto& s, auto&& f) {
  f("name", s.name);
  f("T", s.T);
  f("beta_start", s.beta_start);
  f("beta_end", s.beta_end);
  f("zero_snr", s.zero_snr);
};
constexpr auto loop_fields = [](auto& o, auto&& f) {
  f("steps", o.steps);
  f("batch", o.batch);
  f("accumulate", o.accumulate);
  f("lr", o.lr);
  f("warmup", o.warmup);
  named_field(f, "lr_schedule", o.lr_schedule, lr_schedule_name, parse_lr_schedule, "cosine or constant");
  f("min_lr", o.min_lr);
  f("weight_decay", o.weight_decay);
  f("adam_beta1", o.adam_beta1);
  f("adam_beta2", o.adam_beta2);
  f("adam_eps", o.adam_eps);
  f("grad_clip", o.grad_clip);
  f("ema_decay", o.ema_decay);
  f("hflip", o.hflip);
  f("seed", o.seed);
  f("out", o.out);
  f("resume", o.resume);
  f("overwrite", o.overwrite);
  named_field(f, "device", o.device, device_name, device_of_name, "cpu, cuda or cuda:N");
  f("bf16", o.bf16);
  f("cuda_graphs", o.cuda_graphs);
  f("channels_last", o.channels_last);
  named_field(f, "conv_dtype", o.conv_dtype, network_dtype_name, conv_dtype_of_name, "fp32, bf16 or fp16");
  f("checkpoint_every", o.checkpoint_every);
  f("log_every", o.log_every);
  f("progress", o.progress);
  f("threads", o.threads);
  f("dist_timeout", o.dist_timeout);
};

nlohmann::json data_json(const DataSpec& d) { return json_config::write_fields(d, data_fields); }
DataSpec data_from_json(const nlohmann::json& j) { return json_config::read_fields<DataSpec>(j, "data", data_fields); }
nlohmann::json schedule_json(const ScheduleSpec& s) { return json_config::write_fields(s, schedule_fields); }
ScheduleSpec schedule_from_json(const nlohmann::json& j) {
  return json_config::read_fields<ScheduleSpec>(j, "schedule", schedule_fields);
}
}  // namespace

nlohmann::json LoopOptions::to_json() const { return json_config::write_fields(*this, loop_fields); }

LoopOptions LoopOptions::from_json(const nlohmann::json& j) {
  return json_config::read_fields<LoopOptions>(j, "loop", loop_fields);
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
          {"path", to_string(path)},
          {"flow_shift", flow_shift},
          {"timestep_density", to_string(timestep_density)},
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
  o.path = parse_path_kind(get_or<std::string>(j, "path", "vp"));
  o.flow_shift = get_or(j, "flow_shift", o.flow_shift);
  o.timestep_density = parse_time_density(get_or<std::string>(j, "timestep_density", "uniform"));
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
          {"reconstruction", to_string(reconstruction)},
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
  o.reconstruction = parse_reconstruction(get_or<std::string>(j, "reconstruction", "l1"));
  o.kl_weight = get_or(j, "kl_weight", o.kl_weight);
  o.heldout = get_or(j, "heldout", o.heldout);
  o.scale_images = get_or(j, "scale_images", o.scale_images);
  if (j.contains("loop")) o.loop = LoopOptions::from_json(j["loop"]);
  return o;
}

double lr_at(const LoopOptions& o, int64_t step) {
  return lr_at(LrPlan{o.lr, o.min_lr, o.warmup, o.steps, o.lr_schedule}, step);
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
      {"channels_last", "--channels-last", [](LoopOptions& s, const LoopOptions& g) { s.channels_last = g.channels_last; }},
      {"conv_dtype", "--conv-dtype", [](LoopOptions& s, const LoopOptions& g) { s.conv_dtype = g.conv_dtype; }},
      {"checkpoint_every", "--checkpoint-every",
       [](LoopOptions& s, const LoopOptions& g) { s.checkpoint_every = g.checkpoint_every; }},
      {"log_every", "--log-every", [](LoopOptions& s, const LoopOptions& g) { s.log_every = g.log_every; }},
      {"threads", "--threads", [](LoopOptions& s, const LoopOptions& g) { s.threads = g.threads; }},
      // Memory against speed, like threads: the sums split differently, the draws are the same.
      {"accumulate", "--accumulate", [](LoopOptions& s, const LoopOptions& g) { s.accumulate = g.accumulate; }},
      {"dist_timeout", "--dist-timeout", [](LoopOptions& s, const LoopOptions& g) { s.dist_timeout = g.dist_timeout; }},
  };
  return table;
}

}  // namespace diffuse
