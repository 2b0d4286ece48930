#include "diffuse/models/model_folder.h"

#include <filesystem>
#include <sstream>
#include <stdexcept>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/io/hash.h"
#include "diffuse/io/safetensors.h"

namespace diffuse {

namespace {
// The weights and biases of every Conv2d inside m.
std::vector<torch::Tensor> convolution_parameters(torch::nn::Module& m) {
  std::vector<torch::Tensor> params;
  for (const auto& module : m.modules())
    if (auto* conv = module->as<torch::nn::Conv2dImpl>())
      for (auto& p : conv->parameters(/*recurse=*/false)) params.push_back(p);
  return params;
}
}  // namespace

void to_channels_last(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : convolution_parameters(m))
    if (p.dim() == 4) p.set_data(p.contiguous(at::MemoryFormat::ChannelsLast));
}

void convolutions_to(torch::nn::Module& m, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& p : convolution_parameters(m)) p.set_data(p.to(dtype));
}

std::map<std::string, torch::Tensor> state_dict(torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters(true)) out[p.key()] = p.value();
  for (const auto& b : m.named_buffers(true)) out[b.key()] = b.value();
  return out;
}

namespace {

// Attention weights under the names older diffusers versions wrote (query, key, value, proj_attn; google/ddpm-*
// and Stable Diffusion 1.x autoencoders): renamed as diffusers' _convert_deprecated_attention_blocks does, where
// the new name is the model's and the file lacks it.
std::map<std::string, torch::Tensor> with_current_attention_names(const std::map<std::string, torch::Tensor>& tensors,
                                                                  const std::map<std::string, torch::Tensor>& own) {
  static const std::vector<std::pair<std::string, std::string>> renames = {
      {".query.", ".to_q."}, {".key.", ".to_k."}, {".value.", ".to_v."}, {".proj_attn.", ".to_out.0."}};
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : tensors) {
    std::string mapped = name;
    if (!own.count(name))
      for (const auto& [old_part, new_part] : renames) {
        const auto at = name.find(old_part);
        if (at == std::string::npos) continue;
        std::string candidate = name.substr(0, at) + new_part + name.substr(at + old_part.size());
        if (own.count(candidate) && !tensors.count(candidate)) mapped = candidate;
        break;
      }
    out[mapped] = t;
  }
  return out;
}

}  // namespace

void load_state_dict(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& tensors_in,
                     const std::string& source) {
  auto own = state_dict(m);
  const auto tensors = with_current_attention_names(tensors_in, own);
  std::vector<std::string> missing, unexpected, misshaped;
  for (const auto& [name, t] : own) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      missing.push_back(name);
    else if (it->second.sizes() != t.sizes()) {
      std::ostringstream os;
      os << name << " (file " << it->second.sizes() << ", model " << t.sizes() << ")";
      misshaped.push_back(os.str());
    }
  }
  for (const auto& kv : tensors)
    if (!own.count(kv.first)) unexpected.push_back(kv.first);
  if (!missing.empty() || !unexpected.empty() || !misshaped.empty()) {
    std::ostringstream os;
    os << "'" << source << "' does not match the model built from its config:";
    auto list = [&](const char* what, const std::vector<std::string>& names) {
      if (names.empty()) return;
      os << " " << names.size() << " " << what << ":";
      for (size_t i = 0; i < names.size() && i < 8; ++i) os << " " << names[i];
      if (names.size() > 8) os << " ...";
      os << ";";
    };
    list("missing", missing);
    list("unexpected", unexpected);
    list("mis-shaped", misshaped);
    os << " (config.json and the weights must come from the same model)";
    throw std::runtime_error(os.str());
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : own) t.copy_(tensors.at(name));
}

nlohmann::json read_model_config(const std::string& folder) {
  auto path = (std::filesystem::path(folder) / kConfigFile).string();
  if (!std::filesystem::exists(path))
    throw std::runtime_error("cannot read '" + path + "': no such file (pass a model folder holding " +
                             kConfigFile + " and " + kWeightsFile + ")");
  return load_json(path);
}

void read_model_weights(torch::nn::Module& m, const std::string& folder) {
  auto path = (std::filesystem::path(folder) / kWeightsFile).string();
  if (!std::filesystem::exists(path))
    throw std::runtime_error("cannot read '" + path + "': no such file (the model folder needs " +
                             std::string(kWeightsFile) + " next to " + kConfigFile + ")");
  load_state_dict(m, load_safetensors(path), path);
}

void check_model_kind(const nlohmann::json& config, const std::string& path, const ModelKind& kind) {
  const bool named = config.is_object() && config.contains("_class_name");
  if (named ? config["_class_name"] == kind.class_name : !kind.required) return;
  throw std::runtime_error("'" + path + "' describes " +
                           (named ? "a " + config["_class_name"].dump() : std::string("a model without _class_name")) +
                           ", not " + kind.what + " (" + kind.hint + ")");
}

std::string find_weights_file(const std::string& folder, const std::vector<std::string>& names, const std::string& hint) {
  for (const auto& name : names)
    if (std::filesystem::exists(std::filesystem::path(folder) / name)) return (std::filesystem::path(folder) / name).string();
  throw std::runtime_error("'" + folder + "' has no " + names.front() + (names.size() > 1 ? " (nor its variants)" : "") +
                           hint);
}

void check_finite_weights(const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  for (const auto& [name, t] : tensors)
    if (t.is_floating_point() && !torch::isfinite(t).all().item<bool>())
      throw std::runtime_error("'" + source + "': tensor " + name + " holds NaN or infinite values");
}

void write_model_folder(torch::nn::Module& m, const nlohmann::json& config, const std::string& folder,
                        const std::string& weights_file) {
  std::error_code ec;
  std::filesystem::create_directories(folder, ec);
  if (ec) throw std::runtime_error("cannot create folder '" + folder + "': " + ec.message());
  std::map<std::string, torch::Tensor> weights;
  for (const auto& [name, t] : state_dict(m)) weights[name] = t.detach().to(torch::kCPU, torch::kFloat32);
  // diffusers writes the same metadata.
  save_safetensors((std::filesystem::path(folder) / weights_file).string(), weights, {{"format", "pt"}});
  write_file_atomic((std::filesystem::path(folder) / kConfigFile).string(), config.dump(2) + "\n");
}

int64_t parameter_count(torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

namespace {
// Strings end with a NUL; tensors add their dtype and shape, then their bytes.
void add(Fnv1a& f, const std::string& s) {
  f.add(s.data(), s.size());
  f.add("\0", 1);
}
void add(Fnv1a& f, const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU).contiguous();
  add(f, c10::str(c.scalar_type(), c.sizes()));
  f.add(c.data_ptr(), c.numel() * c.element_size());
}
}  // namespace

std::string weights_fingerprint(torch::nn::Module& m, const std::string& config) {
  Fnv1a f;
  add(f, config);
  for (const auto& p : m.named_parameters()) {
    add(f, p.key());
    add(f, p.value());
  }
  for (const auto& b : m.named_buffers()) {
    add(f, b.key());
    add(f, b.value());
  }
  return f.hex();
}

std::string tensors_fingerprint(const std::vector<torch::Tensor>& tensors) {
  Fnv1a f;
  for (const auto& t : tensors) add(f, t);
  return f.hex();
}

}  // namespace diffuse
