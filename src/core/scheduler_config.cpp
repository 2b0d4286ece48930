#include "diffuse/core/scheduler_config.h"

#include "diffuse/io/files.h"
#include "io/json_fields.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <torch/torch.h>

namespace diffuse {

namespace {

const char* kEtsdmTilde = "diffuse_etsdm_t_tilde";
const char* kEtsdmN = "diffuse_etsdm_n";

using json_config::get_or;

const std::vector<std::string>& known_keys() {
  static const std::vector<std::string> keys = {
      "num_train_timesteps", "beta_schedule", "beta_start",     "beta_end",        "trained_betas",
      "rescale_betas_zero_snr", "prediction_type", "timestep_spacing", "steps_offset", "clip_sample",
      "clip_sample_range", "set_alpha_to_one", kEtsdmTilde, kEtsdmN};
  return keys;
}

// diffusers' defaults of the keys whose default depends on the scheduler class (the __init__ signatures in
// diffusers/schedulers/scheduling_*.py): DDIM, DDPM and PNDM space "leading", the others "linspace"; DDIM and
// DDPM clip x0 by default.
struct ClassDefaults {
  const char* spacing = "leading";
  bool clip_sample = false;
  const char* prediction = "epsilon";
};
ClassDefaults class_defaults(const std::string& class_name) {
  if (class_name == "DDIMScheduler" || class_name == "DDPMScheduler") return {"leading", true};
  // Flow-matching classes have no prediction_type: their model predicts the velocity eps - x0.
  if (class_name.rfind("FlowMatch", 0) == 0) return {"linspace", false, "flow_prediction"};
  static const std::vector<std::string> linspace = {
      "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
      "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
      "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"};
  if (std::find(linspace.begin(), linspace.end(), class_name) != linspace.end()) return {"linspace", false};
  return {};
}

}  // namespace

SchedulerConfig SchedulerConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("a scheduler config must be a JSON object");
  SchedulerConfig c;
  const ClassDefaults defaults = class_defaults(get_or<std::string>(j, "_class_name", ""));
  c.num_train_timesteps = get_or<int64_t>(j, "num_train_timesteps", c.num_train_timesteps);
  c.beta_schedule = get_or<std::string>(j, "beta_schedule", c.beta_schedule);
  c.beta_start = get_or<double>(j, "beta_start", c.beta_start);
  c.beta_end = get_or<double>(j, "beta_end", c.beta_end);
  c.trained_betas = get_or<std::optional<std::vector<double>>>(j, "trained_betas", std::nullopt);
  c.rescale_betas_zero_snr = get_or<bool>(j, "rescale_betas_zero_snr", false);
  c.prediction_type = parse_prediction(get_or<std::string>(j, "prediction_type", defaults.prediction));
  c.timestep_spacing = parse_spacing(get_or<std::string>(j, "timestep_spacing", defaults.spacing));
  c.steps_offset = get_or<int64_t>(j, "steps_offset", 0);
  c.clip_sample = get_or<bool>(j, "clip_sample", defaults.clip_sample);
  c.clip_sample_range = get_or<double>(j, "clip_sample_range", 1.0);
  if (!(c.clip_sample_range > 0))
    throw std::invalid_argument("clip_sample_range must be positive, got " + std::to_string(c.clip_sample_range));
  c.set_alpha_to_one = get_or<bool>(j, "set_alpha_to_one", true);
  c.etsdm.t_tilde = get_or<int64_t>(j, kEtsdmTilde, 0);
  c.etsdm.n = get_or<int64_t>(j, kEtsdmN, 0);
  if (c.num_train_timesteps < 2)
    throw std::invalid_argument("num_train_timesteps must be at least 2, got " +
                                std::to_string(c.num_train_timesteps));
  if (c.num_train_timesteps > 10000000)
    throw std::invalid_argument("num_train_timesteps " + std::to_string(c.num_train_timesteps) + " exceeds 10^7");
  if (c.steps_offset < 0 || c.steps_offset >= c.num_train_timesteps)
    throw std::invalid_argument("steps_offset must lie in [0, num_train_timesteps), got " + std::to_string(c.steps_offset));
  if (c.etsdm.enabled() && (c.etsdm.t_tilde >= c.num_train_timesteps || c.etsdm.t_tilde < c.etsdm.n))
    throw std::invalid_argument("E-TSDM needs n <= t_tilde < num_train_timesteps, got t_tilde = " +
                                std::to_string(c.etsdm.t_tilde) + ", n = " + std::to_string(c.etsdm.n));
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(known_keys().begin(), known_keys().end(), it.key()) == known_keys().end())
      c.extra[it.key()] = it.value();
  c.schedule();  // validates beta_schedule and the betas now, not at first use
  return c;
}

nlohmann::json SchedulerConfig::to_json() const {
  nlohmann::json j = extra;
  // A flow-matching class has no beta schedule, prediction type or spacing: only its own keys.
  if (extra.value("_class_name", std::string()).rfind("FlowMatch", 0) == 0) {
    j["num_train_timesteps"] = num_train_timesteps;
    return j;
  }
  j["num_train_timesteps"] = num_train_timesteps;
  j["beta_schedule"] = beta_schedule;
  j["beta_start"] = beta_start;
  j["beta_end"] = beta_end;
  j["trained_betas"] = trained_betas ? nlohmann::json(*trained_betas) : nlohmann::json(nullptr);
  j["rescale_betas_zero_snr"] = rescale_betas_zero_snr;
  j["prediction_type"] = diffusers_name(prediction_type);
  j["timestep_spacing"] = to_string(timestep_spacing);
  j["steps_offset"] = steps_offset;
  j["clip_sample"] = clip_sample;
  j["clip_sample_range"] = clip_sample_range;
  j["set_alpha_to_one"] = set_alpha_to_one;
  if (etsdm.enabled()) {
    j[kEtsdmTilde] = etsdm.t_tilde;
    j[kEtsdmN] = etsdm.n;
  }
  return j;
}

Schedule SchedulerConfig::schedule() const {
  Schedule s;
  if (trained_betas) {
    if (int64_t(trained_betas->size()) != num_train_timesteps)
      throw std::invalid_argument("trained_betas has " + std::to_string(trained_betas->size()) +
                                  " values but num_train_timesteps is " + std::to_string(num_train_timesteps));
    s = from_betas(*trained_betas);
  } else {
    ScheduleSpec spec;
    spec.name = beta_schedule;
    spec.T = num_train_timesteps;
    spec.beta_start = beta_start;
    spec.beta_end = beta_end;
    s = make_schedule(spec);
  }
  return rescale_betas_zero_snr ? rescale_zero_terminal_snr(s) : s;
}

std::vector<std::string> SchedulerConfig::ignored_keys() const {
  std::vector<std::string> out;
  for (auto it = extra.begin(); it != extra.end(); ++it)
    if (it.key().empty() || it.key()[0] != '_') out.push_back(it.key());
  return out;
}

SchedulerConfig SchedulerConfig::load(const std::string& path) {
  auto j = load_json(path);
  try {
    return from_json(j);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
}

void SchedulerConfig::save(const std::string& path) const { write_file_atomic(path, dump_json(to_json()) + "\n"); }

}  // namespace diffuse
