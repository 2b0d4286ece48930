// diffusers' scheduler classes (diffuse/core/scheduler_class.h): the one table.
#include "diffuse/core/scheduler_class.h"

#include <algorithm>

namespace diffuse {

const std::vector<SchedulerClass>& scheduler_classes() {
  using W = ClassWalk;
  using E = ClassEnd;
  const Spacing lead = Spacing::leading, lin = Spacing::linspace;
  static const std::vector<SchedulerClass> table = {
      // name, sampler, its samplers, walk, end, sigma spacing keys, default spacing, default clip_sample
      {"", "ddim", {}, W::spacing, E::set_alpha_to_one, false, lead, false},
      {"DDIMScheduler", "ddim", {"ddim"}, W::spacing, E::set_alpha_to_one, false, lead, true},
      {"DDPMScheduler", "ddpm", {"ddpm"}, W::spacing, E::clean, false, lead, true},
      {"PNDMScheduler", "plms", {"plms", "pndm"}, W::spacing, E::set_alpha_to_one, false, lead, false},
      {"EulerDiscreteScheduler", "euler", {"euler"}, W::sigma, E::clean, true, lin, false},
      {"EulerAncestralDiscreteScheduler", "euler_ancestral", {"euler_ancestral"}, W::sigma, E::clean, true, lin, false},
      {"HeunDiscreteScheduler", "heun_sigma", {"heun_sigma"}, W::sigma, E::clean, true, lin, false},
      {"LMSDiscreteScheduler", "lms", {"lms"}, W::sigma, E::clean, true, lin, false},
      {"DPMSolverMultistepScheduler", "dpmpp_2m", {"dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"},
       W::multistep, E::final_sigmas_type, true, lin, false},
      {"UniPCMultistepScheduler", "unipc", {"unipc"}, W::multistep, E::final_sigmas_type, true, lin, false},
      {"FlowMatchEulerDiscreteScheduler", "euler", {}, W::flow, E::clean, true, lin, false},
      // Known defaults, not implemented (sampled only with --sampler, said on stderr).
      {"DPMSolverSDEScheduler", "", {}, W::sigma, E::clean, true, lin, false},
      {"KDPM2DiscreteScheduler", "", {}, W::sigma, E::clean, true, lin, false},
      {"KDPM2AncestralDiscreteScheduler", "", {}, W::sigma, E::clean, true, lin, false},
  };
  return table;
}

const SchedulerClass* find_scheduler_class(const std::string& name) {
  for (const auto& c : scheduler_classes())
    if (c.name == name) return &c;
  return nullptr;
}

const SchedulerClass* class_of_sampler(const std::string& sampler) {
  for (const auto& c : scheduler_classes())
    if (std::find(c.samplers.begin(), c.samplers.end(), sampler) != c.samplers.end()) return &c;
  return nullptr;
}

bool flow_matching_class(const std::string& name) { return name.rfind("FlowMatch", 0) == 0; }

bool other_noise_process(const std::string& name) {
  static const std::vector<std::string> classes = {
      "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
      "ScoreSdeVeScheduler", "KarrasVeScheduler", "CMStochasticIterativeScheduler", "VQDiffusionScheduler"};
  return std::find(classes.begin(), classes.end(), name) != classes.end();
}

}  // namespace diffuse
