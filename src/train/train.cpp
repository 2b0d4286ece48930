// What the trainers share outside the loop: the diffusion loss, offset noise, the configs a run writes
// (scheduler, UNet, classifier, autoencoder) and the options' enums. The tasks are in diffusion_task.cpp,
// classifier_task.cpp and vae_task.cpp; the loop in train_loop.cpp.
#include "diffuse/train/train.h"

#include <cmath>
#include <stdexcept>

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

NoisePath TrainOptions::noise_path() const {
  if (rectified_flow()) return NoisePath::rectified_flow(schedule.T, flow_shift, {timestep_density, logit_mean, logit_std});
  return NoisePath(make_scheduler_config(schedule, prediction, spacing, etsdm).schedule());  // what sampling reads
}

std::string to_string(Reconstruction r) { return r == Reconstruction::l1 ? "l1" : "l2"; }

Reconstruction parse_reconstruction(const std::string& name) {
  if (name == "l1") return Reconstruction::l1;
  if (name == "l2") return Reconstruction::l2;
  throw std::invalid_argument("--reconstruction '" + name + "' is not supported (l1 or l2)");
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

}  // namespace diffuse
