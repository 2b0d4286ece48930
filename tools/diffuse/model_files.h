// Where a trained model's parts live: the UNet folder of a run (EMA or raw weights) and its
// scheduler_config.json. Shared by the commands that load models (sample, analyze).
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>

namespace diffuse::cli {

/// <run>/unet_ema (EMA weights, preferred for weights "auto" or "ema"), <run>/unet, or <run> itself (a
/// diffusers UNet2DModel folder). Throws naming the folder and the fix.
inline std::string unet_folder(const std::string& model, const std::string& weights) {
  namespace fs = std::filesystem;
  fs::path run(model);
  if (!fs::exists(run)) throw std::invalid_argument("model folder '" + model + "' does not exist (train first: diffuse train --out RUN)");
  if (weights == "ema" || weights == "auto") {
    if (fs::exists(run / "unet_ema" / "config.json")) return (run / "unet_ema").string();
    if (weights == "ema") throw std::invalid_argument("'" + model + "' has no unet_ema/ (use --weights raw)");
  }
  if (fs::exists(run / "unet" / "config.json")) return (run / "unet").string();
  if (fs::exists(run / "config.json")) return run.string();
  throw std::invalid_argument("'" + model + "' holds no UNet: expected unet_ema/, unet/ or config.json + "
                              "diffusion_pytorch_model.safetensors");
}

/// `explicit_path` when given, else scheduler/scheduler_config.json of the run, beside the model, or in
/// the parent's scheduler/.
inline std::string scheduler_file(const std::string& model, const std::string& explicit_path) {
  namespace fs = std::filesystem;
  if (!explicit_path.empty()) return explicit_path;
  fs::path run(model);
  for (auto p : {run / "scheduler" / "scheduler_config.json", run / "scheduler_config.json",
                 run.parent_path() / "scheduler" / "scheduler_config.json"})
    if (fs::exists(p)) return p.string();
  throw std::invalid_argument("no scheduler_config.json found for '" + model +
                              "' (looked in scheduler/ and beside the model; pass --scheduler FILE)");
}

}  // namespace diffuse::cli
