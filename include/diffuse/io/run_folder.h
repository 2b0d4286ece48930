// Where everything in a diffuse run folder lives, in one place. A run folder is laid out as diffusers lays out
// a pipeline (so diffusers loads it): one folder per network, raw and EMA weights (unet/ and unet_ema/,
// classifier/ and classifier_ema/, vae/ and vae_ema/; a latent diffusion run also keeps its autoencoder in vae/),
// and scheduler/scheduler_config.json. diffuse's own files sit beside them: run.json (the options), log.csv and
// loss.png, the held-out reports, and train_state/ (step, optimizer and RNG state). A checkpoint is written as a
// run folder of its own in .checkpoint-new/ and swapped in (docs/cli.md).
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

struct RunFolder {
  std::filesystem::path root;
  explicit RunFolder(std::filesystem::path folder) : root(std::move(folder)) {}

  // The diffusers layout. `kind` is the network's folder name: unet, classifier or vae.
  std::filesystem::path network(const std::string& kind) const { return root / kind; }
  std::filesystem::path ema_network(const std::string& kind) const { return root / (kind + "_ema"); }
  std::filesystem::path scheduler_folder() const { return root / "scheduler"; }
  std::filesystem::path scheduler_config() const { return scheduler_folder() / "scheduler_config.json"; }
  /// A text-to-image fine-tune's pipeline parts besides the UNet (text_train.h).
  std::filesystem::path model_index() const { return root / "model_index.json"; }

  // diffuse's own files.
  std::filesystem::path run_json() const { return root / "run.json"; }
  std::filesystem::path log_csv() const { return root / "log.csv"; }
  std::filesystem::path loss_plot() const { return root / "loss.png"; }
  std::filesystem::path accuracy_csv() const { return root / "accuracy.csv"; }            ///< train-classifier
  std::filesystem::path reconstruction_csv() const { return root / "reconstruction.csv"; }  ///< train-vae
  std::filesystem::path train_state() const { return root / "train_state"; }
  std::filesystem::path state_json() const { return train_state() / "state.json"; }
  std::filesystem::path optimizer_state() const { return train_state() / "optimizer.safetensors"; }
  std::filesystem::path legacy_optimizer_state() const { return train_state() / "optimizer.pt"; }  ///< earlier runs
  std::filesystem::path rng_state() const { return train_state() / "rng.safetensors"; }

  // The checkpoint swap: the next checkpoint is written as a run folder in new_checkpoint(), marked complete,
  // then its entries replace the run's (the replaced ones wait in old_checkpoint() until the swap is done).
  RunFolder new_checkpoint() const { return RunFolder(root / ".checkpoint-new"); }
  std::filesystem::path complete_marker() const { return root / "COMPLETE"; }
  std::filesystem::path old_checkpoint() const { return root / ".checkpoint-old"; }

  /// Every name a run writes at its top level (the paths above): what --overwrite may delete.
  static std::vector<std::string> entries() {
    const RunFolder run("");
    std::vector<std::filesystem::path> paths = {run.run_json(),     run.log_csv(),          run.loss_plot(),
                                                run.accuracy_csv(), run.reconstruction_csv(), run.train_state(),
                                                run.scheduler_folder(), run.new_checkpoint().root,
                                                run.old_checkpoint()};
    paths.push_back(run.model_index());
    for (const char* frozen : {"text_encoder", "tokenizer"}) paths.push_back(run.root / frozen);
    for (const char* kind : {"unet", "vae", "classifier"}) {
      paths.push_back(run.network(kind));
      paths.push_back(run.ema_network(kind));
    }
    std::vector<std::string> names;
    for (const auto& p : paths) names.push_back(p.filename().string());
    return names;
  }
};

}  // namespace diffuse
