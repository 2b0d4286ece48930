// What a finished training run reports on held-out data: the noisy classifier's accuracy per range of t, and
// the autoencoder's reconstruction and latent statistics. train_classifier() and train_vae() call these at the
// end of a run; they are also usable on any two models (a run's raw and EMA weights).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "diffuse/core/schedule.h"
#include "diffuse/data/data.h"
#include "diffuse/models/classifier.h"
#include "diffuse/models/vae.h"

namespace diffuse {

struct AccuracyRow {
  int64_t t_begin, t_end;  ///< timesteps [t_begin, t_end)
  double accuracy;
  int64_t count;
};
/// Accuracy of `model` on `data` noised at t drawn uniformly in each of `bins` equal ranges of [0, T).
std::vector<AccuracyRow> noisy_accuracy(NoisyClassifier& model, const Schedule& schedule, const Dataset& data,
                                        int64_t bins, uint64_t seed, torch::Device device, int64_t batch = 256);

/// Where a held-out report goes: `run_dir` gets its CSV, `report` (when given) its table, headed by the
/// checkpoint's `step`.
struct HeldoutReport {
  std::string run_dir;
  int64_t step = 0;
  std::ostream* report = nullptr;
};

/// The raw and EMA classifiers' noisy_accuracy on `heldout` in 10 ranges of t (seed `seed`): RUN/accuracy.csv
/// (t_begin, t_end, accuracy, accuracy_ema, count) and a table with the chance level.
void report_classifier_accuracy(NoisyClassifier& raw, NoisyClassifier& ema, const Schedule& schedule,
                                const Dataset& heldout, uint64_t seed, torch::Device device, const HeldoutReport& out);

/// The raw and EMA autoencoders on `heldout`: reconstruction through the posterior mean, latent statistics before
/// and after scaling by each model's scaling_factor (posterior noise of seed `seed`), `batch` images at a time:
/// RUN/reconstruction.csv and a table. `scale_images` is how many training images measured the factor.
void report_reconstruction(AutoencoderKL& raw, AutoencoderKL& ema, const Dataset& heldout, int64_t batch,
                           uint64_t seed, int64_t scale_images, const HeldoutReport& out);

}  // namespace diffuse
