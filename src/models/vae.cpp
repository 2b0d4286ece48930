#include "diffuse/models/vae.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

#include <torch/torch.h>

#include "models/config_json.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/io/hash.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/core/noise.h"

namespace diffuse {

namespace nn = torch::nn;

void AutoencoderKLConfig::validate() const {
  using json_config::refuse;
  json_config::check_levels(block_out_channels, down_block_types, up_block_types, {"DownEncoderBlock2D"},
                            {"UpDecoderBlock2D"}, norm_num_groups);
  if (in_channels <= 0) refuse("in_channels", std::to_string(in_channels), "a positive count");
  if (out_channels <= 0) refuse("out_channels", std::to_string(out_channels), "a positive count");
  if (latent_channels <= 0) refuse("latent_channels", std::to_string(latent_channels), "a positive count");
  if (layers_per_block <= 0) refuse("layers_per_block", std::to_string(layers_per_block), "at least 1");
  if (act_fn != "silu" && act_fn != "swish") refuse("act_fn", act_fn, "silu");
  if (sample_size <= 0) refuse("sample_size", std::to_string(sample_size), "a positive image size");
  if (!(std::isfinite(scaling_factor) && scaling_factor > 0))
    refuse("scaling_factor", std::to_string(scaling_factor), "a finite positive number");
}

namespace {
// Every key of AutoencoderKLConfig, once: read by from_json, written by to_json.
const auto vae_fields = [](auto& c, auto&& f) {
  f("in_channels", c.in_channels);
  f("out_channels", c.out_channels);
  f("down_block_types", c.down_block_types);
  f("up_block_types", c.up_block_types);
  f("block_out_channels", c.block_out_channels);
  f("layers_per_block", c.layers_per_block);
  f("act_fn", c.act_fn);
  f("latent_channels", c.latent_channels);
  f("norm_num_groups", c.norm_num_groups);
  f("sample_size", c.sample_size);
  f("scaling_factor", c.scaling_factor);
  f("force_upcast", c.force_upcast);
  f("mid_block_add_attention", c.mid_block_add_attention, json_config::Style::omit_empty);
  f("use_quant_conv", c.use_quant_conv, json_config::Style::omit_empty);
  f("use_post_quant_conv", c.use_post_quant_conv, json_config::Style::omit_empty);
};
}  // namespace

AutoencoderKLConfig sd_vae_config() {
  AutoencoderKLConfig c;
  c.block_out_channels = {128, 256, 512, 512};
  c.down_block_types.assign(4, "DownEncoderBlock2D");
  c.up_block_types.assign(4, "UpDecoderBlock2D");
  c.layers_per_block = 2;
  c.sample_size = 512;
  return c;
}

AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& j) {
  return json_config::read_config<AutoencoderKLConfig>(j, "an AutoencoderKL config", vae_fields, {"_use_default_values"});
}

nlohmann::json AutoencoderKLConfig::to_json() const {
  const nlohmann::json identity = {{"_class_name", "AutoencoderKL"}, {"_diffusers_version", "0.25.0"}};
  return json_config::write_config(*this, json_config::with_defaults(extra, identity), vae_fields);
}

DiagonalGaussian DiagonalGaussian::from_moments(const torch::Tensor& moments) {
  TORCH_CHECK(moments.dim() >= 2 && moments.size(1) % 2 == 0,
              "posterior moments must be [N, 2C, ...] (mean and logvar stacked along channels), got ",
              moments.sizes());
  auto parts = moments.chunk(2, 1);
  DiagonalGaussian g;
  g.mean = parts[0];
  g.logvar = parts[1].clamp(-30.0, 20.0);
  g.std = (0.5 * g.logvar).exp();
  return g;
}

torch::Tensor DiagonalGaussian::sample(c10::optional<at::Generator> generator) const {
  auto device = generator.has_value() ? generator->device() : mean.device();
  auto eps = torch::randn(mean.sizes(), generator, mean.options().device(device));
  return sample_from(eps.to(mean.device()));
}

torch::Tensor DiagonalGaussian::sample_from(const torch::Tensor& eps) const {
  TORCH_CHECK(eps.sizes() == mean.sizes(), "posterior noise must have the latents' shape ", mean.sizes(), ", got ",
              eps.sizes());
  return mean + std * eps.to(mean.device(), mean.scalar_type());
}

namespace {
torch::Tensor sum_per_sample(const torch::Tensor& t) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < t.dim(); ++d) dims.push_back(d);
  return dims.empty() ? t : t.sum(dims);
}
}  // namespace

torch::Tensor DiagonalGaussian::kl() const { return 0.5 * sum_per_sample(mean.square() + var() - 1.0 - logvar); }

torch::Tensor DiagonalGaussian::kl(const DiagonalGaussian& other) const {
  auto other_var = other.var();
  return 0.5 * sum_per_sample((mean - other.mean).square() / other_var + var() / other_var - 1.0 - logvar +
                              other.logvar);
}

torch::Tensor DiagonalGaussian::nll(const torch::Tensor& z) const {
  return 0.5 * sum_per_sample(std::log(2.0 * M_PI) + logvar + (z - mean).square() / var());
}

namespace {

// diffusers builds every Encoder/Decoder block with resnet_eps 1e-6, no time embedding, one attention head.
constexpr double kVaeEps = 1e-6;

BlockOptions vae_block_options(const AutoencoderKLConfig& c, int64_t channels) {
  return json_config::block_options(0, c.norm_num_groups, kVaeEps, 0.0, "default", std::nullopt, channels);
}

MidBlock vae_mid_block(const AutoencoderKLConfig& c) {
  const int64_t ch = c.block_out_channels.back();
  return MidBlock(vae_block_options(c, ch), ch, c.mid_block_add_attention.value_or(true), c.norm_num_groups, 1.0);
}

nn::Conv2d conv3x3(int64_t in, int64_t out) { return nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)); }

nn::GroupNorm vae_group_norm(const AutoencoderKLConfig& c, int64_t channels) {
  return nn::GroupNorm(nn::GroupNormOptions(c.norm_num_groups, channels).eps(kVaeEps));
}

torch::Tensor silu_out(nn::GroupNorm& norm, const torch::Tensor& x) {
  auto h = norm(x);
  return torch::GradMode::is_enabled() ? torch::silu(h) : torch::silu_(h);
}

// diffusers UpDecoderBlock2D: resnets without skip connections, then Upsample2D unless it is the last block.
class UpDecoderBlockImpl : public nn::Module {
 public:
  UpDecoderBlockImpl(const AutoencoderKLConfig& c, int64_t in_channels, int64_t out_channels, int64_t layers,
                     bool upsample) {
    for (int64_t i = 0; i < layers; ++i) {
      ResnetOptions r;
      r.in_channels = i == 0 ? in_channels : out_channels;
      r.out_channels = out_channels;
      r.groups = c.norm_num_groups;
      r.eps = kVaeEps;
      resnets->push_back(ResnetBlock2D(r));
    }
    register_module("resnets", resnets);
    if (upsample) {
      upsamplers->push_back(Upsample2D(out_channels));
      register_module("upsamplers", upsamplers);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& r : *resnets) x = r->as<ResnetBlock2D>()->forward(x, {});
    if (!upsamplers->is_empty()) x = upsamplers[0]->as<Upsample2D>()->forward(x);
    return x;
  }

 private:
  nn::ModuleList resnets, upsamplers;
};
TORCH_MODULE(UpDecoderBlock);

}  // namespace

VaeEncoderImpl::VaeEncoderImpl(const AutoencoderKLConfig& c) {
  const auto& ch = c.block_out_channels;
  const int64_t levels = int64_t(ch.size());
  conv_in = register_module("conv_in", conv3x3(c.in_channels, ch[0]));
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = i == 0 ? ch[0] : ch[i - 1];
    // DownEncoderBlock2D = DownBlock2D without time embedding; diffusers' Encoder sets downsample_padding 0.
    down_blocks->push_back(DownBlock(vae_block_options(c, ch[i]), in, ch[i], c.layers_per_block, false,
                                     i + 1 < levels, 0));
  }
  register_module("down_blocks", down_blocks);
  mid_block = register_module("mid_block", vae_mid_block(c));
  conv_norm_out = register_module("conv_norm_out", vae_group_norm(c, ch.back()));
  conv_out = register_module("conv_out", conv3x3(ch.back(), 2 * c.latent_channels));
}

torch::Tensor VaeEncoderImpl::forward(torch::Tensor x) {
  x = convolve(conv_in, x);
  std::vector<torch::Tensor> unused_skips;
  for (auto& block : *down_blocks) {
    x = block->as<DownBlock>()->forward(x, {}, &unused_skips);
    unused_skips.clear();
  }
  x = mid_block->forward(x, torch::Tensor());
  return convolve(conv_out, silu_out(conv_norm_out, x));
}

VaeDecoderImpl::VaeDecoderImpl(const AutoencoderKLConfig& c) {
  const auto& ch = c.block_out_channels;
  const int64_t levels = int64_t(ch.size());
  conv_in = register_module("conv_in", conv3x3(c.latent_channels, ch.back()));
  mid_block = register_module("mid_block", vae_mid_block(c));
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = ch[levels - 1 - std::max<int64_t>(i - 1, 0)], out = ch[levels - 1 - i];
    up_blocks->push_back(UpDecoderBlock(c, in, out, c.layers_per_block + 1, i + 1 < levels));
  }
  register_module("up_blocks", up_blocks);
  conv_norm_out = register_module("conv_norm_out", vae_group_norm(c, ch[0]));
  conv_out = register_module("conv_out", conv3x3(ch[0], c.out_channels));
}

torch::Tensor VaeDecoderImpl::forward(torch::Tensor z) {
  auto x = mid_block->forward(convolve(conv_in, z), torch::Tensor());
  for (auto& block : *up_blocks) x = block->as<UpDecoderBlock>()->forward(x);
  return convolve(conv_out, silu_out(conv_norm_out, x));
}

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLConfig& config) : config_(config) {
  config_.validate();
  const int64_t latent = config_.latent_channels;
  encoder = register_module("encoder", VaeEncoder(config_));
  decoder = register_module("decoder", VaeDecoder(config_));
  if (config_.use_quant_conv.value_or(true))
    quant_conv = register_module("quant_conv", nn::Conv2d(nn::Conv2dOptions(2 * latent, 2 * latent, 1)));
  if (config_.use_post_quant_conv.value_or(true))
    post_quant_conv = register_module("post_quant_conv", nn::Conv2d(nn::Conv2dOptions(latent, latent, 1)));
}

DiagonalGaussian AutoencoderKLImpl::encode(const torch::Tensor& x) {
  const int64_t f = config_.downsample_factor();
  TORCH_CHECK(x.dim() == 4 && x.size(1) == config_.in_channels, "AutoencoderKL.encode expects images [N, ",
              config_.in_channels, ", H, W], got ", x.sizes());
  TORCH_CHECK(x.size(2) % f == 0 && x.size(3) % f == 0, "AutoencoderKL.encode: image height and width must be ",
              "divisible by ", f, " (2^(levels - 1)) to decode back to the same size, got ", x.size(2), "x",
              x.size(3), " (pad or crop the images)");
  auto h = encoder(x);
  return DiagonalGaussian::from_moments(quant_conv ? convolve(quant_conv, h) : h);
}

torch::Tensor AutoencoderKLImpl::decode(const torch::Tensor& z) {
  TORCH_CHECK(z.dim() == 4 && z.size(1) == config_.latent_channels, "AutoencoderKL.decode expects latents [N, ",
              config_.latent_channels, ", h, w], got ", z.sizes());
  return decoder(post_quant_conv ? convolve(post_quant_conv, z) : z);
}

torch::Tensor AutoencoderKLImpl::forward(const torch::Tensor& x, bool sample_posterior,
                                         c10::optional<at::Generator> generator) {
  auto posterior = encode(x);
  return decode(sample_posterior ? posterior.sample(generator) : posterior.mode());
}

torch::Tensor AutoencoderKLImpl::encode_scaled(const torch::Tensor& x, c10::optional<at::Generator> generator) {
  return encode(x).sample(generator) * config_.scaling_factor;
}

torch::Tensor AutoencoderKLImpl::decode_scaled(const torch::Tensor& latents) {
  return decode(latents / config_.scaling_factor);
}

void AutoencoderKLImpl::set_scaling_factor(double factor) {
  if (!(std::isfinite(factor) && factor > 0))
    throw std::invalid_argument("scaling_factor " + std::to_string(factor) +
                                " is not a finite positive number (measure it on images the VAE encodes)");
  config_.scaling_factor = factor;
}

AutoencoderKL load_vae(const std::string& folder, torch::Device device) {
  return load_model_folder<AutoencoderKL, AutoencoderKLConfig>(
      folder, device, {"AutoencoderKL", "an AutoencoderKL", "pass the model's vae/ folder"});
}

void save_vae(AutoencoderKL& model, const std::string& folder) {
  write_model_folder(*model, model->config().to_json(), folder);
}

LatentStats latent_stats(AutoencoderKL& model, const torch::Tensor& images, int64_t batch, double scale,
                         uint64_t seed) {
  const auto& c = model->config();
  if (!images.defined() || images.dim() != 4 || images.size(0) == 0 || images.size(1) != c.in_channels)
    throw std::invalid_argument("latent statistics need images [N > 0, " + std::to_string(c.in_channels) +
                                ", H, W], got " + (images.defined() ? c10::str(images.sizes()) : "nothing"));
  if (batch <= 0) throw std::invalid_argument("latent statistics: batch " + std::to_string(batch) + " must be > 0");
  torch::NoGradGuard no_grad;
  const auto device = model->parameters().front().device();
  // Chan, Golub & LeVeque's pairwise update of (count, mean, sum of squared deviations).
  double n = 0, mean = 0, m2 = 0;
  for (int64_t i = 0; i < images.size(0); i += batch) {
    const int64_t b = std::min(batch, images.size(0) - i);
    auto posterior = model->encode(images.narrow(0, i, b).to(device, torch::kFloat32));
    auto z = posterior.sample_from(make_noise(posterior.mean.sizes().slice(1), b, seed, i).to(device));
    auto zd = z.to(torch::kFloat64) * scale;
    const double nb = double(zd.numel()), mb = zd.mean().item<double>();
    const double m2b = (zd - mb).square().sum().item<double>();
    const double delta = mb - mean, total = n + nb;
    mean += delta * nb / total;
    m2 += m2b + delta * delta * n * nb / total;
    n = total;
  }
  LatentStats s;
  s.mean = mean;
  s.std = n > 1 ? std::sqrt(m2 / (n - 1)) : 0.0;
  s.count = int64_t(n);
  return s;
}

double measure_scaling_factor(AutoencoderKL& model, const torch::Tensor& images, int64_t batch, uint64_t seed) {
  auto s = latent_stats(model, images, batch, 1.0, seed);
  if (!(std::isfinite(s.std) && s.std > 0))
    throw std::invalid_argument("cannot measure the latent scaling factor: the latents of " +
                                std::to_string(images.size(0)) + " images have std " + std::to_string(s.std) +
                                " (use more, varied images, and check the VAE's weights)");
  return 1.0 / s.std;
}

torch::Tensor psnr(const torch::Tensor& x, const torch::Tensor& y, double data_range) {
  TORCH_CHECK(x.sizes() == y.sizes() && x.dim() >= 2, "psnr needs two image batches of one shape, got ", x.sizes(),
              " and ", y.sizes());
  auto mse = (x.to(torch::kFloat64) - y.to(x.device(), torch::kFloat64)).square().flatten(1).mean(1);
  return 10.0 * torch::log10(data_range * data_range / mse);
}

ReconstructionStats reconstruction_stats(AutoencoderKL& model, const torch::Tensor& images, int64_t batch) {
  const auto& c = model->config();
  if (!images.defined() || images.dim() != 4 || images.size(0) == 0 || images.size(1) != c.in_channels)
    throw std::invalid_argument("reconstruction needs images [N > 0, " + std::to_string(c.in_channels) +
                                ", H, W], got " + (images.defined() ? c10::str(images.sizes()) : "nothing"));
  if (batch <= 0) throw std::invalid_argument("reconstruction: batch " + std::to_string(batch) + " must be > 0");
  torch::NoGradGuard no_grad;
  const auto device = model->parameters().front().device();
  double psnr_sum = 0, se = 0, ae = 0;
  for (int64_t i = 0; i < images.size(0); i += batch) {
    auto x = images.narrow(0, i, std::min(batch, images.size(0) - i)).to(device, torch::kFloat32);
    auto x_hat = model->decode(model->encode(x).mode()).clamp(-1.0, 1.0);
    psnr_sum += psnr(x, x_hat).sum().item<double>();
    auto diff = (x_hat - x).to(torch::kFloat64);
    se += diff.square().sum().item<double>();
    ae += diff.abs().sum().item<double>();
  }
  ReconstructionStats r;
  r.count = images.size(0);
  r.psnr = psnr_sum / double(r.count);
  r.mse = se / double(images.numel());
  r.l1 = ae / double(images.numel());
  return r;
}

}  // namespace diffuse

namespace diffuse {

std::string vae_fingerprint(AutoencoderKL& model) {
  return weights_fingerprint(*model, model->config().to_json().dump());
}

Dataset encode_dataset(AutoencoderKL& model, const Dataset& data, int64_t batch, uint64_t seed) {
  const auto& c = model->config();
  if (!data.images.defined() || data.images.dim() != 4 || data.size() == 0 || data.channels() != c.in_channels)
    throw std::invalid_argument("the autoencoder takes images with " + std::to_string(c.in_channels) +
                                " channels, but '" + data.name + "' has " +
                                (data.images.defined() ? c10::str(data.images.sizes()) : std::string("no images")));
  const int64_t f = c.downsample_factor();
  if (data.height() % f || data.width() % f)
    throw std::invalid_argument("'" + data.name + "' images are " + std::to_string(data.height()) + "x" +
                                std::to_string(data.width()) + ", not a multiple of the autoencoder's downsampling factor " +
                                std::to_string(f) + " (pass --size accordingly)");
  if (batch <= 0) throw std::invalid_argument("encode: batch " + std::to_string(batch) + " must be > 0");
  torch::NoGradGuard no_grad;
  const auto device = model->parameters().front().device();
  std::vector<torch::Tensor> chunks;
  for (int64_t i = 0; i < data.size(); i += batch) {
    const int64_t b = std::min(batch, data.size() - i);
    auto posterior = model->encode(data.images.narrow(0, i, b).to(device, torch::kFloat32));
    auto z = posterior.sample_from(make_noise(posterior.mean.sizes().slice(1), b, seed, i).to(device));
    chunks.push_back((z * c.scaling_factor).to(torch::kCPU, torch::kFloat32));
  }
  Dataset out = data;
  out.images = torch::cat(chunks).contiguous();
  out.name = data.name + " (latents)";
  return out;
}

std::string default_latent_cache_dir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/diffuse/latents";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/diffuse/latents";
  throw std::runtime_error("no latent cache folder: neither XDG_CACHE_HOME nor HOME is set (pass --latent-cache DIR)");
}

LatentCache cached_latents(AutoencoderKL& model, const Dataset& data, const std::string& dir, int64_t batch) {
  const std::string key = tensors_fingerprint({data.images, data.labels});
  const std::string fingerprint = vae_fingerprint(model);
  LatentCache r;
  r.path = dir + "/" + key + ".safetensors";
  std::error_code ec;
  if (std::filesystem::exists(r.path, ec)) {
    try {
      auto meta = safetensors_metadata(r.path);
      if (meta["vae_fingerprint"] != fingerprint) {
        r.event = "replaced (it was made by another autoencoder: " + meta["vae_fingerprint"] + ", now " +
                  fingerprint + ")";
      } else {
        auto tensors = load_safetensors(r.path);
        auto latents = tensors.at("latents");
        if (latents.dim() != 4 || latents.size(0) != data.size() || tensors.at("labels").numel() != data.size())
          throw std::runtime_error("shapes do not match the data");
        Dataset out = data;
        out.images = latents.to(torch::kFloat32).contiguous();
        out.name = data.name + " (latents)";
        r.latents = out;
        r.event = "hit";
        return r;
      }
    } catch (const std::exception& e) {
      r.event = std::string("replaced (unreadable: ") + e.what() + ")";
    }
  } else {
    r.event = "created";
  }
  r.latents = encode_dataset(model, data, batch);
  std::filesystem::create_directories(dir);
  save_safetensors(r.path, {{"latents", r.latents.images}, {"labels", data.labels.to(torch::kInt64)}},
                   {{"vae_fingerprint", fingerprint}, {"data", data.name}});
  return r;
}

}  // namespace diffuse

namespace diffuse {
std::string resolve_vae_folder(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  if (fs::exists(p / "config.json")) return path;
  const RunFolder run(p);
  for (const auto& folder : {run.ema_network("vae"), run.network("vae")})
    if (fs::exists(folder / "config.json")) return folder.string();
  throw std::invalid_argument("'" + path + "' is not an autoencoder: no config.json there, nor a vae_ema/ or vae/ "
                              "folder (pass a train-vae run folder or a diffusers AutoencoderKL folder)");
}
}  // namespace diffuse
