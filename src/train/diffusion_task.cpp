// The diffusion task: a UNet trained on x_t = a x0 + s eps of its noise path (variance preserving or rectified flow),
// and the public entry point train(). The loop is in train_loop.cpp; the losses and configs in train.cpp.
#include <filesystem>

#include "diffuse/train/train.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace {

using detail::copy_weights;
using detail::drawn_on;
using detail::Shard;

void check_path(const TrainOptions& o) {
  if (o.rectified_flow() != (o.prediction == Prediction::flow))
    throw std::invalid_argument(o.rectified_flow() ? "--path rectified-flow trains --prediction flow (the velocity "
                                                     "eps - x0 that FlowMatchEulerDiscreteScheduler samples)"
                                                   : "--prediction flow needs --path rectified-flow");
  if (o.rectified_flow() && o.etsdm.enabled())
    throw std::invalid_argument("E-TSDM shares integer timesteps; it does not apply to --path rectified-flow");
  // Options that shape only the flow path's draws would change nothing elsewhere: refused, not ignored.
  const bool logit_set = o.logit_mean != 0.0 || o.logit_std != 1.0;
  if (!o.rectified_flow() && (o.flow_shift != 1.0 || o.timestep_density != TimeDensity::uniform || logit_set))
    throw std::invalid_argument(std::string(o.flow_shift != 1.0 ? "--flow-shift" : logit_set ? "--logit-mean / --logit-std"
                                                                                               : "--timestep-density") +
                                " shapes the rectified-flow path's training draws; with --path vp it would change "
                                "nothing (pass --path rectified-flow --prediction flow)");
  if (o.rectified_flow() && o.timestep_density == TimeDensity::uniform && logit_set)
    throw std::invalid_argument("--logit-mean / --logit-std shape the logit-normal density; pass --timestep-density "
                                "logit-normal (the uniform density has no parameters)");
}

SchedulerConfig scheduler_config_of(const TrainOptions& o) {
  check_path(o);
  return o.rectified_flow() ? make_flow_scheduler_config(o.schedule.T, o.flow_shift)
                            : make_scheduler_config(o.schedule, o.prediction, o.spacing, o.etsdm);
}

// One loss for every path (Ho et al. 2020, generalised by the 000 document; rectified flow: Liu et al. 2022, Esser et
// al. 2024): the path draws (t, a, s), x_t = a x0 + s eps, the network sees the E-TSDM map of t (identity off and
// for flow, whose t is sigma T), the weight is stated on the x0 error from SNR = a^2 / s^2.
class DiffusionTask : public detail::Task {
 public:
  DiffusionTask(const TrainOptions& o, const Dataset& data, AutoencoderKL vae)
      : o_(o), scheduler_(scheduler_config_of(o)), path_(o.noise_path()), vae_(std::move(vae)) {
    check_data(o, data);
    // Refuses eps prediction on a zero-terminal-SNR schedule now rather than at the first t = T - 1; the discrete path
    // looks its weights up per timestep (no host sync in the step), the flow path computes them per draw.
    if (path_.is_vp())
      weight_ = loss_weight(o.loss_weight, o.prediction, path_.snr(), o.min_snr_gamma).to(torch::kFloat32);
  }

  std::string kind() const override { return "unet"; }
  void create(torch::Device device) override {
    unet_ = UNet2DModel(o_.unet);
    ema_ = UNet2DModel(o_.unet);
    to(device);
    copy_weights(*ema_, *unet_);
  }
  void load(const RunFolder& run, torch::Device device) override {
    unet_ = load_unet(run.network(kind()).string(), device);
    ema_ = load_unet(run.ema_network(kind()).string(), device);
    if (!(unet_->config() == o_.unet))
      throw std::invalid_argument("'" + (run.network(kind()) / "config.json").string() + "' differs from run.json's UNet");
    to(device);
  }
  torch::nn::Module& model() override { return *unet_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return path_.T(); }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x0 = batch.images;
    const int64_t B = x0.size(0);
    const auto p = path_.points(shard.rows(path_.draw(shard.global, gen)));
    auto eps = draw_noise(x0, shard, gen);
    auto a = p.a.view({B, 1, 1, 1}), s = p.s.view({B, 1, 1, 1});
    auto labels = drop_labels(batch, shard, gen);
    auto pred = unet_->forward(add_noise(x0, eps, a, s), o_.etsdm.condition(p.time), labels).to(torch::kFloat32);
    const auto weight = weight_.defined()
                            ? weight_d_.index_select(0, p.timestep.to(device_))
                            : loss_weight(o_.loss_weight, o_.prediction, p.snr, o_.min_snr_gamma).to(torch::kFloat32);
    return {per_example_loss(o_.prediction, pred, x0, eps, a, s, weight), p.timestep};
  }

  void save(const RunFolder& dir) override {
    save_unet(unet_, dir.network(kind()).string());
    save_unet(ema_, dir.ema_network(kind()).string());
    fs::create_directories(dir.scheduler_folder());
    scheduler_.save(dir.scheduler_config().string());
    if (!vae_.is_empty()) save_vae(vae_, dir.network("vae").string());  // latent diffusion: samples decode through it
  }

 private:
  void check_data(const TrainOptions& o, const Dataset& data) {
    const auto& u = o.unet;
    if (u.sample_size.value_or(-1) != data.height() || data.height() != data.width() || u.in_channels != data.channels())
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the UNet (" +
                                  std::to_string(u.in_channels) + "x" + std::to_string(u.sample_size.value_or(0)) +
                                  "x" + std::to_string(u.sample_size.value_or(0)) + ")");
    if (o.vae.empty() != vae_.is_empty())
      throw std::invalid_argument(o.vae.empty() ? "an autoencoder was given but the options name none (set TrainOptions::vae)"
                                                : "the options train on the latents of '" + o.vae +
                                                      "' but no autoencoder was given");
    if (u.out_channels != u.in_channels)
      throw std::invalid_argument("the UNet must output as many channels as it reads (out_channels " +
                                  std::to_string(u.out_channels) + ", in_channels " + std::to_string(u.in_channels) + ")");
    if (u.num_class_embeds) {
      if (data.num_classes < 1)
        throw std::invalid_argument("the UNet is class-conditional but the data '" + data.name +
                                    "' has no classes (pass --unconditional)");
      if (*u.num_class_embeds < data.num_classes + 1)
        throw std::invalid_argument("num_class_embeds " + std::to_string(*u.num_class_embeds) + " leaves no null class for " +
                                    std::to_string(data.num_classes) + " classes (needs " +
                                    std::to_string(data.num_classes + 1) + ")");
      null_class_ = *u.num_class_embeds - 1;
    }
    if (!(o.label_dropout >= 0 && o.label_dropout < 1))
      throw std::invalid_argument("--label-dropout must be in [0, 1), got " + std::to_string(o.label_dropout));
    if (!(o.offset_noise >= 0)) throw std::invalid_argument("--offset-noise must be >= 0");
  }
  // The batch's noise (with offset noise), drawn for the global batch and cut to this shard.
  torch::Tensor draw_noise(const torch::Tensor& x0, const Shard& shard, at::Generator& gen) const {
    return shard.rows(offset_noise(torch::randn(shard.global_shape(x0.sizes()), gen, drawn_on(gen, torch::kFloat32)),
                                   o_.offset_noise, gen))
        .to(device_);
  }
  // The class labels with label dropout to the null class (undefined for an unconditional model; draws nothing).
  torch::Tensor drop_labels(const Batch& batch, const Shard& shard, at::Generator& gen) const {
    if (null_class_ < 0) return {};
    auto drop = shard.rows(torch::rand({shard.global}, gen, drawn_on(gen, torch::kFloat32)) < o_.label_dropout).to(device_);
    return torch::where(drop, torch::full_like(batch.labels, null_class_), batch.labels);
  }
  void to(torch::Device device) {
    device_ = device;
    unet_->to(device);
    ema_->to(device);
    path_ = path_.to(device);
    if (weight_.defined()) weight_d_ = weight_.to(device);
  }

  TrainOptions o_;
  SchedulerConfig scheduler_;
  NoisePath path_;
  torch::Tensor weight_, weight_d_;
  int64_t null_class_ = -1;
  torch::Device device_ = torch::kCPU;
  UNet2DModel unet_{nullptr}, ema_{nullptr};
  AutoencoderKL vae_{nullptr};
};

}  // namespace

TrainResult train(const TrainOptions& options, const Dataset& data, const TrainHooks& hooks, AutoencoderKL vae) {
  DiffusionTask task(options, data, std::move(vae));
  return detail::run_loop(task, options.loop, options.to_json(), data, hooks);
}

}  // namespace diffuse
