// The model-folder I/O shared by every network: diffusers' layout, config.json + the weights in
// diffusion_pytorch_model.safetensors, state dicts under diffusers' names; and the weights' memory layout.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace diffuse {

/// The parameters and buffers of a module under their dotted names (diffusers' state-dict names).
std::map<std::string, torch::Tensor> state_dict(torch::nn::Module& m);

/// Puts the weight of every Conv2d inside `m` in channels-last (NHWC) memory layout, in place; a
/// convolution with such a weight runs in NHWC (GPUs' tensor cores take it without transposes) and its output is
/// NHWC too. Values, names and what state_dict / write_model_folder give are unchanged.
void to_channels_last(torch::nn::Module& m);

/// Casts the weights and biases of every Conv2d inside `m` to `dtype`, leaving its other parameters alone: with
/// bfloat16, a float32 network runs its convolutions in bfloat16 (convolve casts around each one)
/// and its norms, attention and embeddings in float32. Not for training or saving (write the float32 model).
void convolutions_to(torch::nn::Module& m, torch::ScalarType dtype);

/// Copies `tensors` into m's parameters and buffers (converting dtype and device). Throws
/// std::runtime_error naming `source` and listing missing, unexpected and mis-shaped entries.
void load_state_dict(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& tensors,
                     const std::string& source);

/// A diffusers model folder: config.json + diffusion_pytorch_model.safetensors.
constexpr const char* kConfigFile = "config.json";
constexpr const char* kWeightsFile = "diffusion_pytorch_model.safetensors";
/// Reads `folder`/config.json; the error names the file and what to pass instead.
nlohmann::json read_model_config(const std::string& folder);
/// Loads `folder`/diffusion_pytorch_model.safetensors into m (see load_state_dict).
void read_model_weights(torch::nn::Module& m, const std::string& folder);
/// Creates `folder` if needed and writes the weights (float32, as `weights_file`) then config.json, each atomically.
void write_model_folder(torch::nn::Module& m, const nlohmann::json& config, const std::string& folder,
                        const std::string& weights_file = kWeightsFile);

/// The first of `names` (a weights file and its variants, e.g. diffusion_pytorch_model.safetensors then
/// diffusion_pytorch_model.fp16.safetensors) that exists in `folder`; throws naming the folder, the first name and
/// `hint` when none does.
std::string find_weights_file(const std::string& folder, const std::vector<std::string>& names, const std::string& hint = "");
/// A 64-bit FNV-1a fingerprint (16 hex digits) of `config` and every parameter and buffer of `m` (names, dtypes,
/// shapes, bytes): changes whenever the weights or the config change. What the latent and text caches key on.
std::string weights_fingerprint(torch::nn::Module& m, const std::string& config);
/// The same fingerprint of tensors alone (each one's dtype, shape and bytes, in order): cache keys of data.
std::string tensors_fingerprint(const std::vector<torch::Tensor>& tensors);

/// Throws std::runtime_error naming `source` and the tensor when a floating-point tensor holds NaN or infinity.
void check_finite_weights(const std::map<std::string, torch::Tensor>& tensors, const std::string& source);

/// What a model folder must be: config.json's `_class_name` (`required`: diffusers' own files may lack it),
/// what errors call it (with its article), and what to pass or do instead.
struct ModelKind {
  std::string class_name, what, hint;
  bool required = false;
};
/// Throws std::runtime_error naming `path` when `config` names another class (or none, when required).
void check_model_kind(const nlohmann::json& config, const std::string& path, const ModelKind& kind);

/// Loads a model folder: config.json checked against `kind`, parsed and validated as Config (errors name the
/// file), the module built from it, its weights read (read_model_weights), moved to `device`.
template <class Module, class Config>
Module load_model_folder(const std::string& folder, torch::Device device, const ModelKind& kind) {
  auto json = read_model_config(folder);
  const std::string path = folder + "/" + kConfigFile;
  check_model_kind(json, path, kind);
  Config config;
  try {
    config = Config::from_json(json);
    config.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
  Module model(config);
  read_model_weights(*model, folder);
  model->to(device);
  return model;
}

/// Number of scalar parameters of a module.
int64_t parameter_count(torch::nn::Module& m);

}  // namespace diffuse
