// The autoencoder task (latent diffusion's KL autoencoder: Rombach et al. 2022, Sec. 3.1): reconstruction plus a
// weighted KL term, the scaling factor measured at each checkpoint, and the public entry point train_vae().
#include <filesystem>

#include "diffuse/eval/heldout.h"
#include "diffuse/train/train.h"
#include "diffuse/util/runtime.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace {

using detail::copy_weights;
using detail::drawn_on;
using detail::Shard;
using detail::Task;

class VaeTask : public Task {
 public:
  VaeTask(const VaeTrainOptions& o, const Dataset& data) : o_(o) {
    const auto& v = o.vae;
    v.validate();
    if (v.sample_size != data.height() || data.height() != data.width() || v.in_channels != data.channels() ||
        v.out_channels != v.in_channels)
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the autoencoder (" +
                                  std::to_string(v.in_channels) + " -> " + std::to_string(v.out_channels) +
                                  " channels, sample_size " + std::to_string(v.sample_size) + ")");
    if (data.height() % v.downsample_factor() != 0)
      throw std::invalid_argument("image size " + std::to_string(data.height()) + " is not divisible by " +
                                  std::to_string(v.downsample_factor()) + " (2^(levels - 1)); change --size or --channels");
    if (!(o.kl_weight >= 0) || !std::isfinite(o.kl_weight))
      throw std::invalid_argument("--kl-weight must be >= 0, got " + std::to_string(o.kl_weight));
    if (o.scale_images < 2) throw std::invalid_argument("--scale-images must be at least 2");
    const int64_t k = std::min(o.scale_images, data.size());
    scale_sample_ = data.images.index_select(
        0, torch::linspace(0, double(data.size() - 1), k, torch::kFloat64).round().to(torch::kInt64));
  }
  std::string kind() const override { return "vae"; }
  void create(torch::Device device) override {
    vae_ = AutoencoderKL(o_.vae);
    ema_ = AutoencoderKL(o_.vae);
    to(device);
    copy_weights(*ema_, *vae_);
  }
  void load(const RunFolder& run, torch::Device device) override {
    vae_ = load_vae(run.network(kind()).string(), device);
    ema_ = load_vae(run.ema_network(kind()).string(), device);
    auto stored = vae_->config();
    stored.scaling_factor = o_.vae.scaling_factor;
    if (!(stored == o_.vae))
      throw std::invalid_argument("'" + (run.network(kind()) / "config.json").string() +
                                  "' differs from run.json's autoencoder");
    to(device);
  }
  torch::nn::Module& model() override { return *vae_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return 0; }  // no timesteps
  AutoencoderKL& raw_model() { return vae_; }
  AutoencoderKL& ema_model() { return ema_; }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x = batch.images;
    auto posterior = vae_->encode(x);
    auto noise = shard.rows(torch::randn(shard.global_shape(posterior.mean.sizes()), gen, drawn_on(gen, torch::kFloat32)));
    auto diff = vae_->decode(posterior.sample_from(noise)).to(torch::kFloat32) - x;
    auto rec = (o_.reconstruction == Reconstruction::l1 ? diff.abs() : diff.square()).flatten(1).mean(1);
    auto kl = posterior.kl().to(torch::kFloat32) / double(x[0].numel());
    return {rec + o_.kl_weight * kl, torch::zeros({x.size(0)}, torch::kInt64)};
  }

  // Each saved model carries the scaling factor of its own weights.
  void save(const RunFolder& dir) override {
    const std::pair<AutoencoderKL*, fs::path> models[] = {{&vae_, dir.network(kind())}, {&ema_, dir.ema_network(kind())}};
    for (const auto& [model, folder] : models) {
      (*model)->set_scaling_factor(measure_scaling_factor(*model, scale_sample_, o_.loop.batch, o_.loop.seed));
      save_vae(*model, folder.string());
    }
  }

 private:
  void to(torch::Device device) {
    vae_->to(device);
    ema_->to(device);
  }
  VaeTrainOptions o_;
  torch::Tensor scale_sample_;
  AutoencoderKL vae_{nullptr}, ema_{nullptr};
};

}  // namespace

TrainResult train_vae(const VaeTrainOptions& options, const Dataset& data, const Dataset& heldout, std::ostream* report,
                      const TrainHooks& hooks) {
  VaeTask task(options, data);
  auto result = detail::run_loop(task, options.loop, options.to_json(), data, hooks);
  if (result.interrupted || result.rank != 0 || !heldout.images.defined() || heldout.size() == 0) return result;
  // Posterior noise for the held-out latents from another stream than the checkpoint's measurement.
  const uint64_t seed = mix_seed(options.loop.seed, 0x7ae);
  report_reconstruction(task.raw_model(), task.ema_model(), heldout, options.loop.batch, seed,
                        std::min(options.scale_images, data.size()), {options.loop.out, result.step, report});
  return result;
}

}  // namespace diffuse
