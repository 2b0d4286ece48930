// generate() over a network that is not a diffuse UNet: the exact denoiser of Gaussian data, x0 ~ N(mu, sigma^2 I),
// whose posterior mean is known in closed form, E[x0 | x_t] = mu + a sigma^2 / (a^2 sigma^2 + s^2) (x_t - a mu) at
// x_t = a x0 + s eps. Sampled through each scheduler config given (diffusers' scheduler_config.json files: its class
// picks the sampler and walk), the images must have mean mu and variance sigma^2 (docs/library.md).
// usage: gaussian_denoiser CONFIG.json...     prints config,sampler,steps,mean,variance per config (CSV)
#include <iostream>

#include "diffuse/core/levels.h"
#include "diffuse/core/prediction.h"
#include "diffuse/sample/pipeline.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: gaussian_denoiser CONFIG.json...\n";
    return 2;
  }
  const double mu = 0.5, sigma = 1.0;  // unit variance, as scaled latents: the coarse last steps shrink it least
  try {
    std::cout << "config,sampler,steps,mean,variance,data_mean,data_variance\n";
    for (int i = 1; i < argc; ++i) {
      const auto config = diffuse::SchedulerConfig::load(argv[i]);
      const diffuse::Schedule schedule = config.schedule();
      const diffuse::Prediction prediction = config.prediction_type;
      // (x_t, t, conditioning) -> the config's prediction type (eps, v or x0) of E[x0 | x_t]; t is an integer timestep
      // for these classes' walks.
      diffuse::Network exact = [schedule, prediction, mu, sigma](const torch::Tensor& x, const torch::Tensor& t,
                                                                 const diffuse::Conditioning&) {
        auto out = torch::empty_like(x);
        for (int64_t k = 0; k < x.size(0); ++k) {
          const auto l = diffuse::level_at(schedule, int64_t(std::llround(t.numel() == 1 ? t.item<double>() : t[k].item<double>())));
          const auto x0 = mu + l.a * sigma * sigma / (l.a * l.a * sigma * sigma + l.s * l.s) * (x[k] - l.a * mu);
          const auto eps = (x[k] - l.a * x0) / l.s;
          out[k] = diffuse::target(prediction, x0, eps, torch::tensor(l.a), torch::tensor(l.s));
        }
        return out;
      };
      auto run = diffuse::network_run(exact, config, 1, 4, 4);
      diffuse::GenerateOptions g;
      g.n = 2000;
      g.batch = 500;
      g.steps = 50;
      g.seed = 7;
      const auto out = diffuse::generate(run, g);
      std::cout << argv[i] << "," << out.sampler << "," << g.steps << "," << out.images.mean().item<double>() << ","
                << out.images.var().item<double>() << "," << mu << "," << sigma * sigma << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
