// The learning-rate schedule of the trainers and of the feature network's training: a linear warmup, then constant
// or a half cosine down to a floor.
#pragma once

#include <cstdint>
#include <string>

namespace diffuse {

enum class LrSchedule { cosine, constant };
LrSchedule parse_lr_schedule(const std::string& name);  ///< cosine, constant; throws naming the choices
std::string to_string(LrSchedule schedule);

struct LrPlan {
  double lr = 2e-4;      ///< the peak
  double min_lr = 0.0;   ///< cosine: the rate at the last step
  int64_t warmup = 200;  ///< linear warmup from 0 over this many steps
  int64_t steps = 10000;
  LrSchedule schedule = LrSchedule::cosine;
};

/// The learning rate of 0-based step `step`: lr (step + 1) / warmup during the warmup, then lr (constant) or a half
/// cosine from lr to min_lr at the last step.
double lr_at(const LrPlan& plan, int64_t step);

}  // namespace diffuse
