// diffusers' scheduler classes as diffuse reads them: one record per class (the sampler that samples it as diffusers
// does, how it spaces its walk, where its last step ends, its defaults of the keys whose default depends on the
// class), and the classes of another noise process, which are refused. Samplers are named as in sampling.h.
#pragma once

#include <string>
#include <vector>

#include "diffuse/core/schedule.h"

namespace diffuse {

/// How a class spaces its walk of S steps.
enum class ClassWalk {
  spacing,    ///< timestep_spacing on integer timesteps (DDIM, DDPM, PNDM)
  multistep,  ///< linspace and leading over S + 1 points, the last dropped; karras levels' t rounded (DPM-Solver, UniPC)
  sigma,      ///< linspace at fractional t with sigma interpolated; steps in z = x / a from init_noise_sigma z
              ///< (Euler, Euler ancestral, Heun, LMS)
  flow,       ///< rectified-flow levels with `shift` (FlowMatchEulerDiscreteScheduler)
};

/// Where the class's last step ends.
enum class ClassEnd {
  clean,              ///< the clean data (sigma 0)
  set_alpha_to_one,   ///< alpha_bar = 1 if set_alpha_to_one, else alpha_bar[0] (DDIM, PNDM)
  final_sigmas_type,  ///< "zero" (or absent) the clean data, "sigma_min" alpha_bar[0] (DPM-Solver, UniPC)
};

struct SchedulerClass {
  std::string name;      ///< diffusers' _class_name; "" is a config without one (sampled as DDIM)
  /// The sampler that samples the class as diffusers does (DPM-Solver by solver_order and algorithm_type, PNDM by
  /// skip_prk_steps: sampler_for); "" for a class diffuse knows the defaults of but does not implement.
  std::string sampler;
  std::vector<std::string> samplers;  ///< every sampler that is this class's own (sampler among them)
  ClassWalk walk = ClassWalk::spacing;
  ClassEnd end = ClassEnd::clean;
  bool sigma_spacing_keys = false;    ///< reads use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
  Spacing default_spacing = Spacing::leading;  ///< timestep_spacing when the config lacks it
  bool default_clip_sample = false;            ///< clip_sample when the config lacks it
};

/// Every class diffuse samples or knows the defaults of, in one table.
const std::vector<SchedulerClass>& scheduler_classes();
/// The record of class `name` (""; a config without _class_name: DDIM's), or nullptr for a class not in the table.
const SchedulerClass* find_scheduler_class(const std::string& name);
/// The class whose own sampler `sampler` is (its canonical name), or nullptr (heun: diffuse's own).
const SchedulerClass* class_of_sampler(const std::string& sampler);
/// Whether `name` is one of diffusers' flow-matching classes (FlowMatch*): the rectified-flow path, whose configs carry
/// no beta schedule, prediction type or spacing.
bool flow_matching_class(const std::string& name);
/// Whether `name` is a class of another noise process (EDM's sigmas, variance-exploding SDEs, consistency models),
/// which diffuse refuses by name.
bool other_noise_process(const std::string& name);

}  // namespace diffuse
