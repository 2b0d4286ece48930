// Fuzz target: the JSON files diffuse reads (scheduler_config.json, a UNet's / VAE's / classifier's /
// feature network's config.json, run.json of the three run kinds). The first byte picks the reader, the rest is
// the file's text. Whatever a reader accepts must validate or be refused, write back, and read again to the
// same text; a scheduler config must also give its schedule and the levels of its class's sampler.
#include <optional>
#include <stdexcept>
#include <string>

#include "diffuse/core/scheduler_config.h"
#include "diffuse/eval/features.h"
#include "diffuse/io/files.h"
#include "diffuse/models/classifier.h"
#include "diffuse/models/unet.h"
#include "diffuse/models/vae.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/train/train.h"
#include "fuzz_util.h"

namespace {

template <typename Config>
Config round_trip(const nlohmann::json& j) {
  Config c = Config::from_json(j);
  std::string text = diffuse::dump_json(c.to_json());
  Config again = Config::from_json(diffuse::parse_json(text));
  if (diffuse::dump_json(again.to_json()) != text) __builtin_trap();
  return c;
}

template <typename Config>
void validated(const nlohmann::json& j) {
  round_trip<Config>(j).validate();
}

void scheduler(const nlohmann::json& j, int steps) {
  auto config = round_trip<diffuse::SchedulerConfig>(j);
  config.ignored_keys();
  diffuse::check_samplable(config);
  if (config.num_train_timesteps > 100000) return;  // valid, but a slow input: the fuzzer's time goes elsewhere
  config.schedule();
  std::string sampler = diffuse::sampler_for(config);
  diffuse::Level end;
  auto levels = diffuse::sampling_levels(config, sampler, steps, std::nullopt, end);
  if (levels.empty()) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  int which = data[0] % 9;
  int steps = 1 + data[0] / 9;
  try {
    auto j = diffuse::parse_json(std::string(reinterpret_cast<const char*>(data + 1), size - 1));
    switch (which) {
      case 0: scheduler(j, steps); break;
      case 1: validated<diffuse::UNetConfig>(j); break;
      case 2: validated<diffuse::AutoencoderKLConfig>(j); break;
      case 3: validated<diffuse::NoisyClassifierConfig>(j); break;
      case 4: validated<diffuse::FeatureNetConfig>(j); break;
      case 5: round_trip<diffuse::TrainOptions>(j); break;
      case 6: round_trip<diffuse::VaeTrainOptions>(j); break;
      case 7: round_trip<diffuse::ClassifierTrainOptions>(j); break;
      case 8: round_trip<diffuse::LoopOptions>(j); break;
    }
  } catch (const std::exception& e) {
    diffuse_fuzz::refused(e);
  }
  return 0;
}
