#include "diffuse/core/scheduler_config.h"

#include "diffuse/core/scheduler_class.h"

#include "diffuse/io/files.h"
#include "io/json_fields.h"

#include <algorithm>
#include <set>
#include <cmath>
#include <stdexcept>

#include <torch/torch.h>

namespace diffuse {

namespace {

const char* kEtsdmTilde = "diffuse_etsdm_t_tilde";
const char* kEtsdmN = "diffuse_etsdm_n";

using json_config::get_or;

// Every key of scheduler_config.json that diffuse reads, once: read by from_json (a missing or null key keeps the
// default, as diffusers reads it), written by to_json; all other keys are kept in `extra`.
const auto scheduler_fields = [](auto& c, auto&& f) {
  f("num_train_timesteps", c.num_train_timesteps);
  f("beta_schedule", c.beta_schedule);
  f("beta_start", c.beta_start);
  f("beta_end", c.beta_end);
  f("trained_betas", c.trained_betas);
  f("rescale_betas_zero_snr", c.rescale_betas_zero_snr);
  f("prediction_type", c.prediction_type);
  f("timestep_spacing", c.timestep_spacing);
  f("steps_offset", c.steps_offset);
  f("clip_sample", c.clip_sample);
  f("clip_sample_range", c.clip_sample_range);
  f("set_alpha_to_one", c.set_alpha_to_one);
  f(kEtsdmTilde, c.etsdm.t_tilde);
  f(kEtsdmN, c.etsdm.n);
};

// diffusers' defaults of the keys whose default depends on the scheduler class (the __init__ signatures in
// diffusers/schedulers/scheduling_*.py; the class table of scheduler_class.h): DDIM, DDPM and PNDM space "leading",
// the others "linspace"; DDIM and DDPM clip x0 by default.
struct ClassDefaults {
  Spacing spacing = Spacing::leading;
  bool clip_sample = false;
  const char* prediction = "epsilon";
};
ClassDefaults class_defaults(const std::string& class_name) {
  // Flow-matching classes have no prediction_type: their model predicts the velocity eps - x0.
  if (flow_matching_class(class_name)) return {Spacing::linspace, false, "flow_prediction"};
  const SchedulerClass* c = find_scheduler_class(class_name);
  if (!c) return {};
  return {c->default_spacing, c->default_clip_sample};
}

}  // namespace

// The prediction type and the spacing by their diffusers names (found by get_or and Writer through ADL).
static void convert(const std::string& key, const nlohmann::json& v, Prediction& out) {
  std::string name;
  json_config::convert(key, v, name);
  out = parse_prediction(name);
}
static void convert(const std::string& key, const nlohmann::json& v, Spacing& out) {
  std::string name;
  json_config::convert(key, v, name);
  out = parse_spacing(name);
}
static void to_json(nlohmann::json& j, Prediction p) { j = diffusers_name(p); }
static void to_json(nlohmann::json& j, Spacing s) { j = to_string(s); }

namespace {
void validate(const SchedulerConfig& c) {
  if (!(c.clip_sample_range > 0))
    throw std::invalid_argument("clip_sample_range must be positive, got " + std::to_string(c.clip_sample_range));
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
  c.schedule();  // validates beta_schedule and the betas now, not at first use
}
}  // namespace

SchedulerConfig SchedulerConfig::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("a scheduler config must be a JSON object");
  SchedulerConfig c;
  const ClassDefaults defaults = class_defaults(get_or<std::string>(j, "_class_name", ""));
  c.prediction_type = parse_prediction(defaults.prediction);
  c.timestep_spacing = defaults.spacing;
  c.clip_sample = defaults.clip_sample;
  std::set<std::string> known;
  scheduler_fields(c, [&](const std::string& key, auto& field) {
    field = get_or(j, key, field);
    known.insert(key);
  });
  for (const auto& [key, value] : j.items())
    if (!known.count(key)) c.extra[key] = value;
  validate(c);
  return c;
}

nlohmann::json SchedulerConfig::to_json() const {
  nlohmann::json j = extra;
  // A flow-matching class has no beta schedule, prediction type or spacing: only its own keys.
  if (flow_matching_class(extra.value("_class_name", std::string()))) {
    j["num_train_timesteps"] = num_train_timesteps;
    return j;
  }
  json_config::Writer write(j);
  scheduler_fields(*this, [&](const std::string& key, const auto& field) {
    if (etsdm.enabled() || (key != kEtsdmTilde && key != kEtsdmN)) write(key, field);
  });
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
