// diffusers' scheduler_config.json: read, validate, write; unknown keys survive a round trip.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

#include "diffuse/core/etsdm.h"
#include "diffuse/core/prediction.h"
#include "diffuse/core/schedule.h"

namespace diffuse {

struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  std::string beta_schedule = "linear";  ///< linear, scaled_linear, squaredcos_cap_v2, sigmoid
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::optional<std::vector<double>> trained_betas;
  bool rescale_betas_zero_snr = false;
  Prediction prediction_type = Prediction::eps;
  Spacing timestep_spacing = Spacing::leading;
  int64_t steps_offset = 0;
  bool clip_sample = false;         ///< clamp the x0 estimate to [-clip_sample_range, clip_sample_range] (clip_x0)
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = true;
  EtsdmConfig etsdm;          ///< stored as diffuse_etsdm_t_tilde / diffuse_etsdm_n
  nlohmann::json extra = nlohmann::json::object();  ///< keys diffuse does not use, kept verbatim

  /// The schedule this config describes (rescaled when rescale_betas_zero_snr is set).
  Schedule schedule() const;
  /// Keys in `extra` that are not diffusers metadata ("_class_name", ...): what a reader ignores.
  std::vector<std::string> ignored_keys() const;

  static SchedulerConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  /// Throws std::runtime_error naming the file for a missing or malformed file.
  static SchedulerConfig load(const std::string& path);
  /// Atomic: writes path + ".tmp" and renames it over path.
  void save(const std::string& path) const;
};

}  // namespace diffuse
