// A KL-regularised autoencoder with the architecture, config.json keys and state-dict names of diffusers 0.25's
// AutoencoderKL (the first stage of latent diffusion, Rombach et al. 2022, Sec. 3.1 and App. G): an encoder to
// the moments of a diagonal Gaussian posterior q(z | x), a decoder from z, and the latent scaling factor that
// gives the diffusion model unit-variance inputs. A folder written by diffusers loads here with the same outputs;
// one written here loads in diffusers.
#pragma once

#include <ATen/core/Generator.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"
#include "diffuse/data/data.h"

namespace diffuse {

/// AutoencoderKL's config.json. Defaults are diffusers 0.25's; keys diffuse does not know are kept in `extra`
/// and written back. Supported: down_block_types DownEncoderBlock2D, up_block_types UpDecoderBlock2D,
/// act_fn silu. The architecture switches of later diffusers versions (mid_block_add_attention,
/// use_quant_conv, use_post_quant_conv) are honoured when present and written only when set.
struct AutoencoderKLConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<std::string> down_block_types = {"DownEncoderBlock2D"};
  std::vector<std::string> up_block_types = {"UpDecoderBlock2D"};
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;
  std::string act_fn = "silu";
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  int64_t sample_size = 32;
  /// Latents enter diffusion as z * scaling_factor and are divided by it before decode (diffusers' convention).
  double scaling_factor = 0.18215;
  bool force_upcast = true;  ///< kept for diffusers (half-precision pipelines upcast the VAE); unused here
  std::optional<bool> mid_block_add_attention;
  std::optional<bool> use_quant_conv;
  std::optional<bool> use_post_quant_conv;
  nlohmann::json extra = nlohmann::json::object();  ///< other keys ("_class_name", ...), written back

  /// Throws std::invalid_argument naming the key, its value and what is supported.
  void validate() const;
  /// Reads diffusers' keys (missing ones take the defaults above); a key of the wrong type is an error naming it.
  static AutoencoderKLConfig from_json(const nlohmann::json& j);
  /// Every diffusers 0.25 key, plus `extra`; "_class_name" is AutoencoderKL. "_use_default_values" is never
  /// written: diffusers would replace the listed keys by its defaults.
  nlohmann::json to_json() const;
  bool operator==(const AutoencoderKLConfig& other) const { return to_json() == other.to_json(); }
  /// Spatial factor between images and latents: 2^(levels - 1).
  int64_t downsample_factor() const { return int64_t(1) << (block_out_channels.size() - 1); }
};

/// Stable Diffusion's autoencoder (1.x and 2.x): 128/256/512/512 channels, 2 layers per block, 4 latent channels,
/// 512 pixels.
AutoencoderKLConfig sd_vae_config();

/// The posterior q(z | x) = N(mean, diag(exp(logvar))) of diffusers' DiagonalGaussianDistribution
/// (Kingma & Welling 2014). Tensors are [N, latent_channels, h, w]; logvar is clamped to [-30, 20].
struct DiagonalGaussian {
  torch::Tensor mean, logvar, std;

  /// Splits `moments` [N, 2C, h, w] into mean and logvar along channels (as torch.chunk(2, dim=1)).
  static DiagonalGaussian from_moments(const torch::Tensor& moments);
  torch::Tensor var() const { return logvar.exp(); }
  /// mean + std * eps, eps ~ N(0, I). eps is drawn with `generator` on the generator's device and moved to the
  /// mean's (a CPU generator gives the same numbers on every device); without one, on the mean's device with
  /// the default generator.
  torch::Tensor sample(c10::optional<at::Generator> generator = c10::nullopt) const;
  /// mean + std * eps for given standard normal noise eps of the mean's shape (e.g. make_noise of core/noise.h).
  torch::Tensor sample_from(const torch::Tensor& eps) const;
  torch::Tensor mode() const { return mean; }
  /// KL(q || N(0, I)) = 0.5 sum_{c,h,w} (mean^2 + var - 1 - logvar), one value per sample: [N].
  torch::Tensor kl() const;
  /// KL(q || other) = 0.5 sum ((mean - m')^2 / var' + var / var' - 1 - logvar + logvar'): [N].
  torch::Tensor kl(const DiagonalGaussian& other) const;
  /// -log q(z) = 0.5 sum (log 2 pi + logvar + (z - mean)^2 / var): [N].
  torch::Tensor nll(const torch::Tensor& z) const;
};

/// diffusers' Encoder (double_z): conv_in, DownEncoderBlock2D x levels (downsampling padding (0, 1, 0, 1)),
/// UNetMidBlock2D (one single-head attention), GroupNorm, SiLU, conv_out to 2 * latent_channels.
class VaeEncoderImpl : public torch::nn::Module {
 public:
  explicit VaeEncoderImpl(const AutoencoderKLConfig& config);
  torch::Tensor forward(torch::Tensor x);

 private:
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks;
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VaeEncoder);

/// diffusers' Decoder (norm_type "group"): conv_in, UNetMidBlock2D, UpDecoderBlock2D x levels
/// (layers_per_block + 1 resnets, nearest 2x + conv), GroupNorm, SiLU, conv_out.
class VaeDecoderImpl : public torch::nn::Module {
 public:
  explicit VaeDecoderImpl(const AutoencoderKLConfig& config);
  torch::Tensor forward(torch::Tensor z);

 private:
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::ModuleList up_blocks;
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VaeDecoder);

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const AutoencoderKLConfig& config);
  /// x [N, in_channels, H, W] (images as the VAE was trained on, diffusers: [-1, 1]), H and W divisible by
  /// downsample_factor(). Returns the posterior from quant_conv(encoder(x)).
  DiagonalGaussian encode(const torch::Tensor& x);
  /// z [N, latent_channels, h, w], unscaled: decoder(post_quant_conv(z)).
  torch::Tensor decode(const torch::Tensor& z);
  /// decode(posterior sample) with sample_posterior, else decode(posterior mean), as diffusers' forward.
  torch::Tensor forward(const torch::Tensor& x, bool sample_posterior = false,
                        c10::optional<at::Generator> generator = c10::nullopt);

  /// Diffusion-space latents: encode(x).sample(generator) * scaling_factor (LDM, diffusers' training scripts).
  torch::Tensor encode_scaled(const torch::Tensor& x, c10::optional<at::Generator> generator = c10::nullopt);
  /// Images from diffusion-space latents: decode(latents / scaling_factor).
  torch::Tensor decode_scaled(const torch::Tensor& latents);

  const AutoencoderKLConfig& config() const { return config_; }
  /// Sets config().scaling_factor (finite and positive, else std::invalid_argument); saved with the model.
  void set_scaling_factor(double factor);

 private:
  AutoencoderKLConfig config_;
  VaeEncoder encoder{nullptr};
  VaeDecoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};
};
TORCH_MODULE(AutoencoderKL);

/// Loads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) onto `device`.
/// Errors name the file and the fix; missing, unexpected or mis-shaped parameters are listed.
AutoencoderKL load_vae(const std::string& folder, torch::Device device);
/// Writes the diffusers layout (config.json + diffusion_pytorch_model.safetensors, float32), atomically.
void save_vae(AutoencoderKL& model, const std::string& folder);

/// Mean and standard deviation over every element of the latents z * scale, z = encode(x).sample() (posterior
/// samples, the latents diffusion trains on). The std is the sample std (n - 1) about the mean, as
/// LDM's 1 / z.flatten().std(); chunks are merged exactly (Chan et al. 1979) in float64.
struct LatentStats {
  double mean = 0, std = 0;
  int64_t count = 0;  ///< number of latent elements
};
/// images [N, in_channels, H, W] on any device, encoded `batch` at a time on the model's device without
/// autograd. Image k's posterior noise is make_noise(latent shape, 1, seed, k) (core/noise.h), so the draws do
/// not depend on `batch` or the device.
LatentStats latent_stats(AutoencoderKL& model, const torch::Tensor& images, int64_t batch, double scale = 1.0,
                         uint64_t seed = 0);
/// The latent scaling factor 1 / std of the unscaled posterior samples over `images` (LDM's rule, which gave
/// Stable Diffusion's 0.18215), so that z * factor has unit variance; store it with model->set_scaling_factor.
/// Throws std::invalid_argument when the latents have zero or non-finite spread.
double measure_scaling_factor(AutoencoderKL& model, const torch::Tensor& images, int64_t batch, uint64_t seed = 0);

/// Peak signal-to-noise ratio per image: 10 log10(data_range^2 / mean_{C,H,W} (x - y)^2), [N] float64 on x's
/// device (data_range 2 for images in [-1, 1]); an exact match gives +inf.
torch::Tensor psnr(const torch::Tensor& x, const torch::Tensor& y, double data_range = 2.0);

struct ReconstructionStats {
  double psnr = 0;  ///< mean over images of psnr(x, x_hat) with data_range 2
  double mse = 0, l1 = 0;  ///< mean over all elements
  int64_t count = 0;       ///< images
};
/// Reconstructs images in [-1, 1] through the posterior mean, x_hat = clamp(decode(encode(x).mode()), -1, 1),
/// `batch` at a time on the model's device without autograd.
ReconstructionStats reconstruction_stats(AutoencoderKL& model, const torch::Tensor& images, int64_t batch);

// ---------------------------------------------------------------- latent diffusion data

/// A 64-bit FNV-1a fingerprint (16 hex digits) of the autoencoder's config and every parameter and buffer:
/// it changes whenever the weights or the scaling factor change.
std::string vae_fingerprint(AutoencoderKL& model);

/// The data set in diffusion space: image k becomes z_k * scaling_factor, z_k = mean_k + std_k * n_k drawn from
/// its posterior with n_k = make_noise(latent shape, 1, seed, k) (one fixed posterior draw per image, as
/// latent_stats and measure_scaling_factor use). Labels and class names are kept; the name gets " (latents)".
/// `batch` images at a time on the model's device, without autograd; the result is on the CPU.
Dataset encode_dataset(AutoencoderKL& model, const Dataset& data, int64_t batch, uint64_t seed = 0);

struct LatentCache {
  Dataset latents;
  std::string path;   ///< the cache file
  std::string event;  ///< "hit", "created" or "replaced (...why...)"
};
/// encode_dataset through a file cache: DIR/<fingerprint of the images and labels>.safetensors holds the
/// latents, labels and (metadata) the autoencoder's vae_fingerprint. A file made by another autoencoder, or
/// unreadable, is recomputed and replaced atomically, and `event` says why. The directory is created.
LatentCache cached_latents(AutoencoderKL& model, const Dataset& data, const std::string& dir, int64_t batch);

/// The default latent cache folder: $XDG_CACHE_HOME/diffuse/latents, else $HOME/.cache/diffuse/latents.
std::string default_latent_cache_dir();

/// The autoencoder folder meant by `path`: the folder itself when it holds config.json (a diffusers
/// AutoencoderKL folder or a pipeline's vae/), else its vae_ema/ (a train-vae run's EMA weights), else its vae/
/// (a diffusion run trained on latents). Throws naming the path otherwise.
std::string resolve_vae_folder(const std::string& path);

}  // namespace diffuse
