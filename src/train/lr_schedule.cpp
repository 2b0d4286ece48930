// The learning-rate schedule (diffuse/train/lr_schedule.h).
#include "diffuse/train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace diffuse {

LrSchedule parse_lr_schedule(const std::string& name) {
  if (name == "cosine") return LrSchedule::cosine;
  if (name == "constant") return LrSchedule::constant;
  throw std::invalid_argument("unknown learning-rate schedule '" + name + "' (expected cosine or constant)");
}

std::string to_string(LrSchedule schedule) { return schedule == LrSchedule::cosine ? "cosine" : "constant"; }

double lr_at(const LrPlan& p, int64_t step) {
  if (p.warmup > 0 && step < p.warmup) return p.lr * double(step + 1) / double(p.warmup);
  if (p.schedule == LrSchedule::constant) return p.lr;
  const double span = double(std::max<int64_t>(1, p.steps - p.warmup));
  const double progress = std::min(1.0, double(step - p.warmup) / span);
  return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace diffuse
