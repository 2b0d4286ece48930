// The three training tasks (diffusion UNet, noisy classifier, autoencoder), their losses, and the public
// entry points train(), train_classifier(), train_vae(). The loop itself is in train_loop.cpp.
#include "diffuse/train/train.h"

#include <filesystem>

#include "diffuse/eval/heldout.h"
#include "diffuse/io/files.h"
#include "diffuse/util/runtime.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

// ================================================================ losses

torch::Tensor per_example_loss(Prediction prediction, const torch::Tensor& pred, const torch::Tensor& x0,
                               const torch::Tensor& eps, const torch::Tensor& a, const torch::Tensor& s,
                               const torch::Tensor& weight) {
  TORCH_CHECK(pred.sizes() == x0.sizes(), "model output ", pred.sizes(), " does not match the images ", x0.sizes());
  auto err = (pred - target(prediction, x0, eps, a, s)).pow(2).flatten(1).mean(1);
  return weight.to(err.dtype()) * err;
}

torch::Tensor offset_noise(const torch::Tensor& eps, double strength, at::Generator& gen) {
  if (strength == 0) return eps;
  auto delta = torch::randn({eps.size(0), eps.size(1), 1, 1}, gen, eps.options().device(gen.device()));
  return eps + strength * delta.to(eps.device());
}

SchedulerConfig make_flow_scheduler_config(int64_t T, double shift) {
  if (T < 2) throw std::invalid_argument("T must be at least 2, got " + std::to_string(T));
  if (!(shift > 0) || !std::isfinite(shift)) throw std::invalid_argument("--flow-shift must be positive, got " + std::to_string(shift));
  SchedulerConfig c;
  c.num_train_timesteps = T;
  c.prediction_type = Prediction::flow;
  c.timestep_spacing = Spacing::linspace;
  c.extra["_class_name"] = "FlowMatchEulerDiscreteScheduler";
  c.extra["_diffusers_version"] = "0.40.0";
  c.extra["shift"] = shift;
  return c;
}

SchedulerConfig make_scheduler_config(const ScheduleSpec& spec, Prediction prediction, Spacing spacing,
                                      const EtsdmConfig& etsdm) {
  Schedule schedule = make_schedule(spec);  // validates the name and values
  if (prediction == Prediction::flow || is_sigma_spacing(spacing))
    throw std::invalid_argument(prediction == Prediction::flow
                                    ? "--prediction flow needs --path rectified-flow (a flow target belongs to the "
                                      "rectified-flow path, not to a DDIMScheduler's schedule)"
                                    : "--spacing " + to_string(spacing) + " is a sigma spacing: train with leading, "
                                      "linspace or trailing and pass it to diffuse sample --spacing");
  SchedulerConfig c;
  c.num_train_timesteps = spec.T;
  c.prediction_type = prediction;
  c.timestep_spacing = spacing;
  c.etsdm = etsdm;
  c.extra["_class_name"] = "DDIMScheduler";
  c.extra["_diffusers_version"] = "0.25.0";
  bool cosine_family = spec.name == "cosine" || spec.name == "squaredcos_cap_v2" || spec.name == "cosine_noclip";
  if ((cosine_family && (spec.zero_snr || spec.name == "cosine_noclip")) || spec.name == "sigmoid") {
    // Zero-SNR cosine drops the 0.999 clip (Lin et al. 2023, section 3.1): no diffusers name, so explicit betas.
    // Sigmoid has a name, but DDIMScheduler refuses it (only DDPMScheduler implements it): explicit betas too.
    auto betas = schedule.betas().contiguous();
    c.trained_betas = std::vector<double>(betas.data_ptr<double>(), betas.data_ptr<double>() + betas.numel());
    c.beta_schedule = "linear";
  } else {
    c.beta_schedule = cosine_family ? "squaredcos_cap_v2" : spec.name;
    auto pick = [](double v, double dflt) { return v < 0 ? dflt : v; };
    bool scaled = spec.name == "scaled_linear";
    c.beta_start = pick(spec.beta_start, scaled ? 0.00085 : 1e-4);
    c.beta_end = pick(spec.beta_end, scaled ? 0.012 : 0.02);
    c.rescale_betas_zero_snr = spec.zero_snr;
  }
  if (etsdm.enabled() && (etsdm.t_tilde >= spec.T || etsdm.n > etsdm.t_tilde))
    throw std::invalid_argument("E-TSDM needs 1 <= n <= t_tilde < T, got t_tilde = " + std::to_string(etsdm.t_tilde) +
                                ", n = " + std::to_string(etsdm.n) + ", T = " + std::to_string(spec.T));
  return c;
}

NoisyClassifierConfig make_classifier_config(const UNetShape& shape, int64_t size, int64_t channels, int64_t num_classes) {
  NoisyClassifierConfig k;
  k.sample_size = size;
  k.in_channels = channels;
  k.num_classes = num_classes;
  k.block_out_channels = shape.channels;
  k.layers_per_block = shape.layers_per_block;
  k.down_block_types.assign(shape.channels.size(), "DownBlock2D");
  for (auto l : shape.attention_levels) {
    if (l < 0 || l >= int64_t(shape.channels.size()))
      throw std::invalid_argument("attention level " + std::to_string(l) + " does not exist");
    k.down_block_types[size_t(l)] = "AttnDownBlock2D";
  }
  k.add_attention = shape.mid_attention;
  k.attention_head_dim = shape.attention_head_dim;
  k.norm_num_groups = shape.norm_groups;
  k.validate();
  return k;
}

AutoencoderKLConfig make_vae_config(const UNetShape& shape, int64_t size, int64_t channels, AutoencoderKLConfig v) {
  v.in_channels = v.out_channels = channels;
  v.sample_size = size;
  v.block_out_channels = shape.channels;
  v.down_block_types.assign(shape.channels.size(), "DownEncoderBlock2D");
  v.up_block_types.assign(shape.channels.size(), "UpDecoderBlock2D");
  v.layers_per_block = shape.layers_per_block;
  v.norm_num_groups = shape.norm_groups;
  if (!shape.mid_attention) v.mid_block_add_attention = false;
  v.validate();
  return v;
}

UNetConfig make_unet_config(const UNetShape& shape, int64_t size, int64_t channels, int64_t num_classes) {
  if (shape.channels.empty()) throw std::invalid_argument("--channels needs at least one level");
  if (shape.channels.size() > 16)
    throw std::invalid_argument("--channels has " + std::to_string(shape.channels.size()) + " levels (at most 16)");
  int64_t levels = int64_t(shape.channels.size());
  for (auto l : shape.attention_levels)
    if (l < 0 || l >= levels)
      throw std::invalid_argument("attention level " + std::to_string(l) + " does not exist (levels 0.." +
                                  std::to_string(levels - 1) + " for --channels with " + std::to_string(levels) +
                                  " values)");
  if (size % (int64_t(1) << (levels - 1)) != 0)
    throw std::invalid_argument("image size " + std::to_string(size) + " is not divisible by 2^" +
                                std::to_string(levels - 1) + " (one downsampling per level after the first)");
  UNetConfig c;
  c.sample_size = size;
  c.in_channels = channels;
  c.out_channels = channels;
  c.block_out_channels = shape.channels;
  c.layers_per_block = shape.layers_per_block;
  c.down_block_types.assign(size_t(levels), "DownBlock2D");
  c.up_block_types.assign(size_t(levels), "UpBlock2D");
  for (auto l : shape.attention_levels) {
    c.down_block_types[size_t(l)] = "AttnDownBlock2D";
    c.up_block_types[size_t(levels - 1 - l)] = "AttnUpBlock2D";
  }
  c.add_attention = shape.mid_attention;
  c.attention_head_dim = shape.attention_head_dim;
  c.norm_num_groups = shape.norm_groups;
  c.dropout = shape.dropout;
  c.resnet_time_scale_shift = shape.time_scale_shift;
  if (num_classes > 0) c.num_class_embeds = num_classes + 1;
  c.validate();
  return c;
}

// ================================================================ the tasks

namespace {

using detail::copy_weights;
using detail::drawn_on;
using detail::Shard;
using detail::Task;

// ---------------------------------------------------------------- the diffusion task

class DiffusionTask : public Task {
 public:
  DiffusionTask(const TrainOptions& o, const Dataset& data, AutoencoderKL vae)
      : o_(o),
        scheduler_(o.rectified_flow() ? make_flow_scheduler_config(o.schedule.T, o.flow_shift)
                                      : make_scheduler_config(o.schedule, o.prediction, o.spacing, o.etsdm)),
        schedule_(o.rectified_flow() ? linear(o.schedule.T) : scheduler_.schedule()),
        vae_(std::move(vae)) {
    check_path(o);
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
    // Refuses eps prediction on a zero-terminal-SNR schedule now rather than at the first t = T - 1.
    if (!o.rectified_flow())
      weight_ = loss_weight(o.loss_weight, o.prediction, schedule_.snr(), o.min_snr_gamma).to(torch::kFloat32);
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
  int64_t T() const override { return schedule_.T(); }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    if (o_.rectified_flow()) return flow_loss(batch, shard, gen);
    const auto& x0 = batch.images;
    int64_t B = x0.size(0);
    auto t = shard.rows(torch::randint(0, schedule_.T(), {shard.global}, gen, drawn_on(gen, torch::kInt64)));
    auto eps = draw_noise(x0, shard, gen);
    auto td = t.to(device_);
    auto a = a_.index_select(0, td).view({B, 1, 1, 1}), s = s_.index_select(0, td).view({B, 1, 1, 1});
    auto x_t = add_noise(x0, eps, a, s);
    auto labels = drop_labels(batch, shard, gen);
    auto cond = o_.etsdm.condition(t).to(device_);  // E-TSDM: the network sees f(t), the noise uses t
    auto pred = unet_->forward(x_t, cond, labels).to(torch::kFloat32);
    return {per_example_loss(o_.prediction, pred, x0, eps, a, s, weight_d_.index_select(0, td)), t};
  }

  void save(const RunFolder& dir) override {
    save_unet(unet_, dir.network(kind()).string());
    save_unet(ema_, dir.ema_network(kind()).string());
    fs::create_directories(dir.scheduler_folder());
    scheduler_.save(dir.scheduler_config().string());
    if (!vae_.is_empty()) save_vae(vae_, dir.network("vae").string());  // latent diffusion: samples decode through it
  }

 private:
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

  static void check_path(const TrainOptions& o) {
    if (o.path != "vp" && o.path != "rectified-flow")
      throw std::invalid_argument("--path must be vp or rectified-flow, got '" + o.path + "'");
    if (o.rectified_flow() != (o.prediction == Prediction::flow))
      throw std::invalid_argument(o.rectified_flow() ? "--path rectified-flow trains --prediction flow (the velocity "
                                                       "eps - x0 that FlowMatchEulerDiscreteScheduler samples)"
                                                     : "--prediction flow needs --path rectified-flow");
    if (!o.rectified_flow()) return;
    if (o.etsdm.enabled()) throw std::invalid_argument("E-TSDM shares integer timesteps; it does not apply to --path rectified-flow");
    if (o.timestep_density != "uniform" && o.timestep_density != "logit-normal")
      throw std::invalid_argument("--timestep-density must be uniform or logit-normal, got '" + o.timestep_density + "'");
    if (!(o.logit_std > 0) || !std::isfinite(o.logit_mean))
      throw std::invalid_argument("--logit-std must be positive and --logit-mean finite");
    make_flow_scheduler_config(o.schedule.T, o.flow_shift);  // validates T and the shift
  }

  // Rectified flow (Liu et al. 2022; Esser et al. 2024): sigma from the density, shifted; x_t = (1 - sigma) x0 +
  // sigma eps; the network sees t = sigma T and predicts u = eps - x0; the loss weight is stated on the x0 error
  // as for the VP path, from SNR = (1 - sigma)^2 / sigma^2. The per-timestep log buckets t = floor(sigma T).
  std::pair<torch::Tensor, torch::Tensor> flow_loss(const Batch& batch, const Shard& shard, at::Generator& gen) {
    const auto& x0 = batch.images;
    const int64_t B = x0.size(0), T = schedule_.T();
    auto raw = o_.timestep_density == "uniform"
                   ? 1.0 - torch::rand({shard.global}, gen, drawn_on(gen, torch::kFloat64))  // (0, 1]
                   : torch::sigmoid(o_.logit_mean + o_.logit_std * torch::randn({shard.global}, gen, drawn_on(gen, torch::kFloat64)));
    auto sigma_drawn = shard.rows(o_.flow_shift * raw / (1.0 + (o_.flow_shift - 1.0) * raw));
    auto t = (sigma_drawn * double(T)).floor().clamp(0, double(T - 1)).to(torch::kInt64);  // where VP's t lives
    auto sigma = sigma_drawn.to(device_);
    auto eps = draw_noise(x0, shard, gen);
    auto a = (1.0 - sigma).to(torch::kFloat32).view({B, 1, 1, 1}), s = sigma.to(torch::kFloat32).view({B, 1, 1, 1});
    auto x_t = add_noise(x0, eps, a, s);
    auto labels = drop_labels(batch, shard, gen);
    auto pred = unet_->forward(x_t, (sigma * double(T)).to(torch::kFloat32), labels).to(torch::kFloat32);
    auto snr = ((1.0 - sigma) / sigma).square();
    auto weight = loss_weight(o_.loss_weight, Prediction::flow, snr, o_.min_snr_gamma).to(torch::kFloat32);
    return {per_example_loss(Prediction::flow, pred, x0, eps, a, s, weight), t};
  }

  void to(torch::Device device) {
    device_ = device;
    unet_->to(device);
    ema_->to(device);
    a_ = schedule_.a().to(torch::kFloat32).to(device);
    s_ = schedule_.s().to(torch::kFloat32).to(device);
    if (weight_.defined()) weight_d_ = weight_.to(device);
  }
  TrainOptions o_;
  SchedulerConfig scheduler_;
  Schedule schedule_;
  torch::Tensor weight_, weight_d_, a_, s_;
  int64_t null_class_ = -1;
  torch::Device device_ = torch::kCPU;
  UNet2DModel unet_{nullptr}, ema_{nullptr};
  AutoencoderKL vae_{nullptr};
};

// ---------------------------------------------------------------- the classifier task

class ClassifierTask : public Task {
 public:
  ClassifierTask(const ClassifierTrainOptions& o, const Dataset& data)
      : o_(o),
        scheduler_(make_scheduler_config(o.schedule, Prediction::v, Spacing::trailing, {})),
        schedule_(scheduler_.schedule()) {
    const auto& c = o.classifier;
    if (data.num_classes < 1) throw std::invalid_argument("a noisy classifier needs labelled data; '" + data.name + "' has no classes");
    if (c.num_classes != data.num_classes)
      throw std::invalid_argument("the classifier has " + std::to_string(c.num_classes) + " classes, the data " +
                                  std::to_string(data.num_classes));
    if (c.sample_size.value_or(-1) != data.height() || data.height() != data.width() || c.in_channels != data.channels())
      throw std::invalid_argument("the data (" + std::to_string(data.channels()) + "x" + std::to_string(data.height()) +
                                  "x" + std::to_string(data.width()) + ") does not fit the classifier's input");
  }
  std::string kind() const override { return "classifier"; }
  void create(torch::Device device) override {
    model_ = NoisyClassifier(o_.classifier);
    ema_ = NoisyClassifier(o_.classifier);
    to(device);
    copy_weights(*ema_, *model_);
  }
  void load(const RunFolder& run, torch::Device device) override {
    model_ = load_classifier(run.network(kind()).string(), device);
    ema_ = load_classifier(run.ema_network(kind()).string(), device);
    to(device);
  }
  torch::nn::Module& model() override { return *model_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return schedule_.T(); }
  NoisyClassifier& ema_model() { return ema_; }
  NoisyClassifier& raw_model() { return model_; }
  const Schedule& schedule() const { return schedule_; }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x0 = batch.images;
    auto t = shard.rows(torch::randint(0, schedule_.T(), {shard.global}, gen, drawn_on(gen, torch::kInt64)));
    auto eps = shard.rows(torch::randn(shard.global_shape(x0.sizes()), gen, drawn_on(gen, torch::kFloat32))).to(device_);
    auto td = t.to(device_);
    auto x_t = add_noise(x0, eps, a_.index_select(0, td), s_.index_select(0, td));
    auto logits = model_->forward(x_t, td.to(torch::kFloat32)).to(torch::kFloat32);
    return {torch::nn::functional::cross_entropy(
                logits, batch.labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone)),
            t};
  }
  void save(const RunFolder& dir) override {
    save_classifier(model_, dir.network(kind()).string());
    save_classifier(ema_, dir.ema_network(kind()).string());
    fs::create_directories(dir.scheduler_folder());
    scheduler_.save(dir.scheduler_config().string());
  }

 private:
  void to(torch::Device device) {
    device_ = device;
    model_->to(device);
    ema_->to(device);
    a_ = schedule_.a().to(torch::kFloat32).to(device);
    s_ = schedule_.s().to(torch::kFloat32).to(device);
  }
  ClassifierTrainOptions o_;
  SchedulerConfig scheduler_;
  Schedule schedule_;
  torch::Tensor a_, s_;
  torch::Device device_ = torch::kCPU;
  NoisyClassifier model_{nullptr}, ema_{nullptr};
};

// ---------------------------------------------------------------- the autoencoder task

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
    if (o.reconstruction != "l1" && o.reconstruction != "l2")
      throw std::invalid_argument("--reconstruction '" + o.reconstruction + "' is not supported (l1 or l2)");
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
    auto rec = (o_.reconstruction == "l1" ? diff.abs() : diff.square()).flatten(1).mean(1);
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

TrainResult train(const TrainOptions& options, const Dataset& data, const TrainHooks& hooks, AutoencoderKL vae) {
  DiffusionTask task(options, data, std::move(vae));
  return detail::run_loop(task, options.loop, options.to_json(), data, hooks);
}

TrainResult train_classifier(const ClassifierTrainOptions& options, const Dataset& data, const Dataset& heldout,
                             std::ostream* report, const TrainHooks& hooks) {
  ClassifierTask task(options, data);
  auto result = detail::run_loop(task, options.loop, options.to_json(), data, hooks);
  if (result.rank == 0 && heldout.images.defined() && heldout.size() > 0)
    report_classifier_accuracy(task.raw_model(), task.ema_model(), task.schedule(), heldout, options.loop.seed,
                               parse_device(options.loop.device), {options.loop.out, result.step, report});
  return result;
}

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
