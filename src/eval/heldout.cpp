#include "diffuse/eval/heldout.h"

#include <algorithm>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <utility>

#include <torch/torch.h>

#include "diffuse/core/prediction.h"
#include "diffuse/io/files.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/util/runtime.h"

namespace diffuse {

std::vector<AccuracyRow> noisy_accuracy(NoisyClassifier& model, const Schedule& schedule, const Dataset& data,
                                        int64_t bins, uint64_t seed, torch::Device device, int64_t batch) {
  torch::NoGradGuard ng;
  bool was_training = model->is_training();
  model->eval();
  int64_t T = schedule.T(), n = data.size();
  auto a = schedule.a().to(torch::kFloat32), s = schedule.s().to(torch::kFloat32);
  std::vector<AccuracyRow> rows;
  for (int64_t k = 0; k < bins; ++k) {
    int64_t lo = k * T / bins, hi = (k + 1) * T / bins;
    auto gen = cpu_generator(mix_seed(seed, 0xacc, uint64_t(k)));
    int64_t correct = 0;
    for (int64_t i = 0; i < n; i += batch) {
      int64_t b = std::min(batch, n - i);
      auto x0 = data.images.narrow(0, i, b);
      auto t = torch::randint(lo, hi, {b}, gen, torch::kInt64);
      auto eps = torch::randn(x0.sizes(), gen, torch::kFloat32);
      auto x_t = add_noise(x0, eps, a.index_select(0, t), s.index_select(0, t));
      auto pred = model->forward(x_t.to(device), t.to(torch::kFloat32).to(device)).argmax(1).cpu();
      correct += (pred == data.labels.narrow(0, i, b)).sum().item<int64_t>();
    }
    rows.push_back({lo, hi, double(correct) / double(n), n});
  }
  model->train(was_training);
  return rows;
}

void report_classifier_accuracy(NoisyClassifier& raw_model, NoisyClassifier& ema_model, const Schedule& schedule,
                                const Dataset& heldout, uint64_t seed, torch::Device device, const HeldoutReport& out) {
  auto raw = noisy_accuracy(raw_model, schedule, heldout, 10, seed, device);
  auto ema = noisy_accuracy(ema_model, schedule, heldout, 10, seed, device);
  std::ostringstream csv;
  csv << "t_begin,t_end,accuracy,accuracy_ema,count\n";
  for (size_t k = 0; k < raw.size(); ++k)
    csv << raw[k].t_begin << "," << raw[k].t_end << "," << raw[k].accuracy << "," << ema[k].accuracy << ","
        << raw[k].count << "\n";
  write_file_atomic(RunFolder(out.run_dir).accuracy_csv().string(), csv.str());
  if (!out.report) return;
  std::ostream& r = *out.report;
  r << "held-out accuracy on " << heldout.size() << " images of " << heldout.name << " noised at t in each range (step "
    << out.step << "):\n"
    << "  t range      raw     EMA\n";
  for (size_t k = 0; k < raw.size(); ++k)
    r << "  " << std::left << std::setw(11) << (std::to_string(raw[k].t_begin) + "-" + std::to_string(raw[k].t_end - 1))
      << std::right << std::fixed << std::setprecision(3) << std::setw(6) << raw[k].accuracy << "  " << std::setw(6)
      << ema[k].accuracy << "\n";
  r << "  (chance: " << std::setprecision(3) << 1.0 / double(raw_model->config().num_classes) << ")\n";
}

void report_reconstruction(AutoencoderKL& raw, AutoencoderKL& ema, const Dataset& heldout, int64_t batch,
                           uint64_t seed, int64_t scale_images, const HeldoutReport& out) {
  std::ostringstream csv;
  csv << "model,psnr,mse,l1,latent_mean,latent_std,scaling_factor,scaled_latent_mean,scaled_latent_std,images\n";
  csv << std::setprecision(7);
  std::ostream* report = out.report;
  if (report)
    *report << "held-out reconstruction of " << heldout.size() << " images of " << heldout.name << " (step "
            << out.step << "; posterior mean, PSNR for the range [-1, 1]):\n"
            << "  model     PSNR dB    MSE        latent std  factor     scaled std\n";
  const std::pair<AutoencoderKL*, const char*> models[] = {{&raw, "vae"}, {&ema, "vae_ema"}};
  for (const auto& [model, name] : models) {
    auto r = reconstruction_stats(*model, heldout.images, batch);
    const double factor = (*model)->config().scaling_factor;
    auto before = latent_stats(*model, heldout.images, batch, 1.0, seed);
    auto after = latent_stats(*model, heldout.images, batch, factor, seed);
    csv << name << "," << r.psnr << "," << r.mse << "," << r.l1 << "," << before.mean << "," << before.std << ","
        << factor << "," << after.mean << "," << after.std << "," << r.count << "\n";
    if (report)
      *report << "  " << std::left << std::setw(9) << name << std::right << std::fixed << std::setprecision(2)
              << std::setw(7) << r.psnr << "    " << std::scientific << std::setprecision(3) << r.mse << "  "
              << std::fixed << std::setprecision(4) << std::setw(10) << before.std << "  " << std::setw(9) << factor
              << "  " << std::setw(9) << after.std << "\n";
  }
  write_file_atomic(RunFolder(out.run_dir).reconstruction_csv().string(), csv.str());
  if (report)
    *report << "  (latent std over posterior samples; factor = 1 / std on " << scale_images
            << " training images, stored in vae*/config.json as scaling_factor)\n";
}

}  // namespace diffuse
