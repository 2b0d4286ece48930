#include "diffuse/sample/pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

#include "diffuse/core/levels.h"
#include "diffuse/core/scheduler_class.h"
#include "diffuse/io/files.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/sample/sampling.h"
#include "diffuse/sample/single_file.h"
#include "sample/graphed_network.h"
#include "util/cuda_graph.h"

#include <limits>
#include <set>
#include <tuple>

namespace fs = std::filesystem;

namespace diffuse {

// ---------------------------------------------------------------- the model folder

std::string ModelFolder::unet(const std::string& weights) const {
  if (!fs::exists(root))
    throw std::invalid_argument("model folder '" + root.string() + "' does not exist (train first: diffuse train --out RUN)");
  if (weights != "auto" && weights != "ema" && weights != "raw")
    throw std::invalid_argument("weights '" + weights + "' is not one of auto, ema, raw");
  const RunFolder run(root);
  if (weights == "ema" || weights == "auto") {
    if (fs::exists(run.ema_network("unet") / "config.json")) return run.ema_network("unet").string();
    if (weights == "ema") throw std::invalid_argument("'" + root.string() + "' has no unet_ema/ (use --weights raw)");
  }
  if (fs::exists(run.network("unet") / "config.json")) return run.network("unet").string();
  if (fs::exists(root / "config.json")) return root.string();
  throw std::invalid_argument("'" + root.string() + "' holds no UNet: expected unet_ema/, unet/ or config.json + "
                              "diffusion_pytorch_model.safetensors");
}

std::string ModelFolder::scheduler_config() const {
  for (auto p : {RunFolder(root).scheduler_config(), root / "scheduler_config.json",
                 RunFolder(root.parent_path()).scheduler_config()})
    if (fs::exists(p)) return p.string();
  throw std::invalid_argument("no scheduler_config.json found for '" + root.string() +
                              "' (looked in scheduler/ and beside the model; pass --scheduler FILE)");
}

std::string ModelFolder::vae() const {
  const RunFolder run(root), parent(root.parent_path());
  if (fs::exists(run.network("vae") / "config.json")) return run.network("vae").string();  // a diffuse run
  // A diffusers pipeline folder's unet/ (model_index.json beside it): its vae/.
  if (fs::exists(parent.root / "model_index.json") && fs::exists(parent.network("vae") / "config.json"))
    return parent.network("vae").string();
  return "";
}

std::string ModelFolder::pipeline_of(const std::string& unet_folder) {
  const auto parent = fs::path(unet_folder).parent_path();
  if (fs::exists(parent / "model_index.json") || fs::exists(parent / "text_encoder" / "config.json")) return parent.string();
  return "";
}

// ---------------------------------------------------------------- loading

Network LoadedRun::network() const {
  if (custom) return custom;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool as_is = dtype == torch::kFloat32 && !channels_last;
  auto input = [net_dtype = dtype, format, as_is](const torch::Tensor& x) {
    return as_is ? x : x.to(net_dtype).contiguous(format);
  };
  auto output = [as_is](const torch::Tensor& y, const torch::Tensor& x) {
    return as_is ? y : y.to(x.scalar_type()).contiguous();
  };
  if (is_text()) {
    auto u = text_unet;
    return [u, input, output](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) mutable {
      if (!c.context.defined()) throw std::invalid_argument("a text-to-image UNet needs a text context (a prompt)");
      return output(u->forward(input(x), t, c.context), x);
    };
  }
  auto u = unet;
  return [u, input, output](const torch::Tensor& x, const torch::Tensor& t, const Conditioning& c) mutable {
    return output(u->forward(input(x), t, c.labels), x);
  };
}

namespace {

// A pipeline's model_index.json: the components diffuse reads must be the classes it implements; the ones it does
// not use (safety checker, feature extractor, image encoder) are named in a note.
void check_model_index(const fs::path& pipeline, std::vector<std::string>& notes) {
  const auto path = pipeline / "model_index.json";
  if (!fs::exists(path)) return;
  const auto index = load_json(path.string());
  if (!index.is_object()) throw std::runtime_error("'" + path.string() + "' is not a JSON object");
  const std::map<std::string, std::string> expected = {{"unet", "UNet2DConditionModel"}, {"text_encoder", "CLIPTextModel"},
                                                       {"tokenizer", "CLIPTokenizer"}, {"vae", "AutoencoderKL"}};
  const std::set<std::string> skipped = {"safety_checker", "feature_extractor", "image_encoder"};
  std::vector<std::string> unused;
  for (const auto& [key, value] : index.items()) {
    if (key.empty() || key[0] == '_' || !value.is_array() || value.size() != 2) continue;
    const bool present = !value[1].is_null();
    if (expected.count(key)) {
      if (value[1] != expected.at(key))
        throw std::runtime_error("'" + path.string() + "': " + key + " is " + value[1].dump() + ", diffuse reads " +
                                 expected.at(key) + " (Stable Diffusion 1.x / 2.x pipelines)");
    } else if (key != "scheduler" && present) {
      if (!skipped.count(key))
        throw std::runtime_error("'" + path.string() + "': component " + key + " (" + value[1].dump() +
                                 ") is not part of the Stable Diffusion 1.x / 2.x pipeline diffuse samples "
                                 "(SDXL and other pipelines are not supported)");
      unused.push_back(key);
    }
  }
  if (!unused.empty()) {
    std::string names;
    for (const auto& u : unused) names += (names.empty() ? "" : ", ") + u + "/";
    notes.push_back("the pipeline's " + names + " not used (diffuse runs no safety checker or image encoder)");
  }
}

// The UNet attends to the text encoder's states: its cross_attention_dim must be their width. Checked before any
// weights are read (a mismatch is a pipeline put together from two models).
void check_text_width(int64_t cross_attention_dim, int64_t hidden_size, const std::string& source) {
  if (cross_attention_dim != hidden_size)
    throw std::invalid_argument("the UNet's cross_attention_dim is " + std::to_string(cross_attention_dim) +
                                " but the text encoder's hidden_size is " + std::to_string(hidden_size) + " ('" + source +
                                "': the UNet and text encoder come from different models)");
}

// What every text pipeline needs once its networks are read: the tokenizer, the checks that the parts fit, the UNet's
// precision and layout, x_t's shape.
void finish_text_parts(LoadedRun& r, ClipTokenizer tokenizer_in, const LoadOptions& o, const std::string& source) {
  auto tokenizer = std::make_shared<ClipTokenizer>(std::move(tokenizer_in));
  tokenizer->normalization = o.text_normalization;
  r.tokenizer = tokenizer;
  r.text_unet->eval();
  const auto& uc = r.text_unet->config();
  const auto& tc = r.text_encoder->config();
  if (tokenizer->vocab_size() > tc.vocab_size || tokenizer->max_length() > tc.max_position_embeddings)
    throw std::invalid_argument("the tokenizer (" + std::to_string(tokenizer->vocab_size()) + " tokens, window " +
                                std::to_string(tokenizer->max_length()) + ") does not fit the text encoder (vocab_size " +
                                std::to_string(tc.vocab_size) + ", max_position_embeddings " +
                                std::to_string(tc.max_position_embeddings) + ") of '" + source + "'");
  if (!uc.sample_size) throw std::invalid_argument("the UNet config has no sample_size: cannot tell the image size");
  if (o.dtype != torch::kFloat32) r.text_unet->to(o.dtype);
  if (o.channels_last) to_channels_last(*r.text_unet);
  if (o.conv_dtype != torch::kFloat32) convolutions_to(*r.text_unet, o.conv_dtype);
  r.channels = uc.in_channels;
  r.height = r.width = *uc.sample_size;
}

// The text encoder and tokenizer of a text-conditioned UNet's pipeline, checked against the UNet.
void load_text_parts(LoadedRun& r, const LoadOptions& o) {
  const auto pipeline = ModelFolder::pipeline_of(r.unet_folder);
  if (pipeline.empty())
    throw std::invalid_argument("'" + r.unet_folder + "' is a text-conditioned UNet (UNet2DConditionModel) without its "
                                "pipeline: pass the folder holding model_index.json, text_encoder/ and tokenizer/");
  check_model_index(pipeline, r.notes);
  const auto text_config_path = (fs::path(pipeline) / "text_encoder" / "config.json").string();
  const auto unet_width = read_model_config(r.unet_folder).value("cross_attention_dim", nlohmann::json());
  const auto text_width = fs::exists(text_config_path) ? load_json(text_config_path).value("hidden_size", nlohmann::json())
                                                        : nlohmann::json();
  if (unet_width.is_number_integer() && text_width.is_number_integer())
    check_text_width(unet_width.get<int64_t>(), text_width.get<int64_t>(), pipeline);
  r.text_unet = load_unet_condition(r.unet_folder, o.device);
  r.text_encoder = load_clip_text_model((fs::path(pipeline) / "text_encoder").string(), o.device);
  finish_text_parts(r, ClipTokenizer::load((fs::path(pipeline) / "tokenizer").string()), o, pipeline);
}

// A single-file checkpoint (original layout) read into the same modules; the tokenizer, which such a file lacks,
// from --tokenizer or the config folder.
void load_single_file(LoadedRun& r, const std::string& path, const LoadOptions& o) {
  auto ckpt = read_original_checkpoint(path, {o.v_prediction, o.single_file_config});
  r.notes.insert(r.notes.end(), ckpt.notes.begin(), ckpt.notes.end());
  r.unet_folder = path;
  r.scheduler = o.scheduler_file.empty() ? SchedulerConfig::from_json(ckpt.scheduler_config)
                                         : SchedulerConfig::load(o.scheduler_file);
  const std::string tokenizer = !o.tokenizer.empty()                 ? o.tokenizer
                                : !o.single_file_config.empty() ? (fs::path(o.single_file_config) / "tokenizer").string()
                                                                     : "";
  if (tokenizer.empty())
    throw std::invalid_argument("'" + path + "' is a single-file checkpoint, which holds no tokenizer: pass --tokenizer "
                                "FOLDER (the tokenizer/ folder of a Stable Diffusion pipeline: CLIP's vocab.json and "
                                "merges.txt, the same for SD 1.x and 2.x but for SD 2.x's pad token)");
  try {
    ckpt.unet_config.validate();
    ckpt.text_config.validate();
    ckpt.vae_config.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
  check_text_width(ckpt.unet_config.cross_attention_dim, ckpt.text_config.hidden_size, path);
  r.text_unet = UNet2DConditionModel(ckpt.unet_config);
  load_state_dict(*r.text_unet, ckpt.unet, path + " (model.diffusion_model.)");
  r.text_unet->to(o.device);
  r.text_encoder = ClipTextModel(ckpt.text_config);
  load_state_dict(*r.text_encoder, ckpt.text_encoder, path + " (cond_stage_model.)");
  r.text_encoder->to(o.device);
  r.text_encoder->eval();
  if (o.vae != "none") {
    r.vae = AutoencoderKL(ckpt.vae_config);
    load_state_dict(*r.vae, ckpt.vae, path + " (first_stage_model.)");
    r.vae->to(o.device);
    r.vae->eval();
    r.vae_folder = path;
  }
  finish_text_parts(r, ClipTokenizer::load(tokenizer), o, path);
}

}  // namespace

torch::Tensor encode_prompts(const LoadedRun& run, const std::vector<std::string>& prompts, int64_t clip_skip,
                             std::vector<std::string>* notes) {
  if (!run.is_text()) throw std::invalid_argument("prompts need a text-to-image pipeline; this model has no text encoder");
  torch::NoGradGuard no_grad;
  std::vector<int64_t> ids;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto tokens = run.tokenizer->encode_padded(prompts[i]);
    if (!tokens.dropped.empty() && notes)
      notes->push_back("prompt " + std::to_string(i) + " has " + std::to_string(tokens.tokens) + " tokens, more than the " +
                       std::to_string(run.tokenizer->max_length() - 2) + " the text encoder reads: dropped \"" +
                       tokens.dropped + "\"");
    ids.insert(ids.end(), tokens.ids.begin(), tokens.ids.end());
  }
  auto text_encoder = run.text_encoder;
  const auto ids_tensor = torch::tensor(ids, torch::kLong).view({int64_t(prompts.size()), run.tokenizer->max_length()});
  return text_encoder->encode(ids_tensor.to(run.device), clip_skip);
}

namespace {
void load_vae_of(LoadedRun& r, const ModelFolder& folder, const LoadOptions& o) {
  r.vae_folder = o.vae == "none" ? "" : o.vae.empty() ? folder.vae() : resolve_vae_folder(o.vae);
  if (r.vae_folder.empty()) return;
  r.vae = load_vae(r.vae_folder, o.device);
  r.vae->eval();
  if (r.vae->config().latent_channels != r.channels)
    throw std::invalid_argument("the autoencoder '" + r.vae_folder + "' has " +
                                std::to_string(r.vae->config().latent_channels) + " latent channels but the UNet takes " +
                                std::to_string(r.channels) + " (pass the --vae the model was trained with, or --vae none)");
}
}  // namespace

LoadedRun network_run(Network network, SchedulerConfig scheduler, int64_t channels, int64_t height, int64_t width,
                      int64_t class_embeds, torch::Device device) {
  if (!network) throw std::invalid_argument("network_run: no network given");
  if (channels < 1 || height < 1 || width < 1)
    throw std::invalid_argument("network_run: channels, height and width must be positive");
  if (class_embeds == 1 || class_embeds < 0)
    throw std::invalid_argument("network_run: class_embeds must be 0 or at least 2 (the classes and the null class)");
  NoisePath::of(scheduler);  // validates the schedule (or the flow shift)
  LoadedRun r;
  r.custom = std::move(network);
  r.scheduler = std::move(scheduler);
  r.channels = channels;
  r.height = height;
  r.width = width;
  r.class_embeds = class_embeds;
  r.device = device;
  r.unet_folder = "(a network given as a callable)";
  return r;
}

LoadedRun load_run(const std::string& model, const LoadOptions& o) {
  ModelFolder folder(model);
  if (fs::is_regular_file(model)) {
    LoadedRun r;
    r.device = o.device;
    r.dtype = o.dtype;
    r.channels_last = o.channels_last;
    load_single_file(r, model, o);
    if (!o.vae.empty() && o.vae != "none") load_vae_of(r, folder, o);
    return r;
  }
  LoadedRun r;
  r.device = o.device;
  r.dtype = o.dtype;
  for (auto dtype : {o.dtype, o.conv_dtype})
    if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16)
      throw std::invalid_argument("the UNet runs in float32, bfloat16 or float16, not " +
                                  std::string(c10::toString(dtype)));
  if (o.conv_dtype != torch::kFloat32 && o.dtype != torch::kFloat32)
    throw std::invalid_argument("--conv-dtype lowers only a float32 UNet's convolutions: pass --dtype fp32 with it "
                                "(or --dtype alone for the whole network)");
  r.unet_folder = folder.unet(o.weights);  // first: a missing model is the error to report
  r.scheduler = SchedulerConfig::load(o.scheduler_file.empty() ? folder.scheduler_config() : o.scheduler_file);
  if (read_model_config(r.unet_folder).value("_class_name", "") == "UNet2DConditionModel") {
    load_text_parts(r, o);
    load_vae_of(r, folder, o);
    return r;
  }
  r.unet = load_unet(r.unet_folder, o.device);
  r.unet->eval();
  if (o.dtype != torch::kFloat32) r.unet->to(o.dtype);
  r.channels_last = o.channels_last;
  if (o.channels_last) to_channels_last(*r.unet);
  if (o.conv_dtype != torch::kFloat32) convolutions_to(*r.unet, o.conv_dtype);
  const auto& uc = r.unet->config();
  if (!uc.sample_size) throw std::invalid_argument("the UNet config has no sample_size: cannot tell the image size");
  r.channels = uc.in_channels;
  r.height = r.width = *uc.sample_size;
  r.class_embeds = uc.num_class_embeds.value_or(0);
  load_vae_of(r, folder, o);
  return r;
}

// ---------------------------------------------------------------- generation

namespace {

std::string class_of(const SchedulerConfig& config) { return config.extra.value("_class_name", std::string()); }

// The config's class record (scheduler_class.h), or nullptr for a class diffuse does not know.
const SchedulerClass* record_of(const SchedulerConfig& config) { return find_scheduler_class(class_of(config)); }

// How the config's class walks (a class not in the table: by its timestep_spacing, as DDIM).
ClassWalk walk_of(const SchedulerConfig& config) {
  const auto* c = record_of(config);
  return c ? c->walk : ClassWalk::spacing;
}

// Whether the config's class steps in sigma = s / a on z = x / a (k-diffusion's frame): its initial noise is
// init_noise_sigma z, its add_noise x0 + sigma n, its clip_sample recomputes eps.
bool steps_in_sigma(const SchedulerConfig& config) { return walk_of(config) == ClassWalk::sigma; }

// diffusers' keys that ask for a sigma spacing, in the order its set_timesteps tests them.
const std::vector<std::pair<const char*, Spacing>>& sigma_spacing_keys() {
  static const std::vector<std::pair<const char*, Spacing>> keys = {
      {"use_karras_sigmas", Spacing::karras}, {"use_exponential_sigmas", Spacing::exponential}, {"use_beta_sigmas", Spacing::beta}};
  return keys;
}

// A key's value, or `fallback` when it is absent or null.
nlohmann::json key_or(const SchedulerConfig& config, const std::string& key, nlohmann::json fallback) {
  const auto it = config.extra.find(key);
  return it == config.extra.end() || it->is_null() ? fallback : *it;
}

void refuse_unless(const SchedulerConfig& config, const std::string& key, const nlohmann::json& neutral,
                   const std::string& why) {
  const auto it = config.extra.find(key);
  if (it == config.extra.end() || it->is_null() || *it == neutral) return;
  throw std::invalid_argument("scheduler config key " + key + " = " + it->dump() + " " + why + "; set it to " +
                              neutral.dump() + " in the scheduler_config.json (or pass --scheduler with another "
                              "config) to sample without it");
}

}  // namespace

void check_samplable(const SchedulerConfig& config) {
  // Classes of another noise process: EDM's sigmas, variance-exploding SDEs, consistency models.
  const auto cls = class_of(config);
  if (other_noise_process(cls))
    throw std::invalid_argument("the scheduler config names " + cls +
                                ", whose noise process diffuse does not sample; pass --scheduler with a config of "
                                "DDIM, DDPM, Euler, Heun, DPM-Solver, UniPC or FlowMatchEulerDiscreteScheduler");
  const std::string unsupported = "changes sampling in diffusers and diffuse does not implement it";
  // Keys that change the samples, at the value that leaves them alone.
  static const std::vector<std::pair<std::string, nlohmann::json>> neutral = {
      {"thresholding", false},  {"use_flow_sigmas", false},
      {"use_lu_lambdas", false}, {"euler_at_final", false},   {"timestep_type", "discrete"},
      {"interpolation_type", "linear"}, {"sigma_min", nullptr}, {"sigma_max", nullptr},
      {"use_dynamic_shifting", false}, {"invert_sigmas", false}, {"shift_terminal", nullptr},
      {"stochastic_sampling", false}, {"predict_x0", true}, {"solver_p", nullptr},
      {"disable_corrector", nlohmann::json::array()}, {"solver_type", "midpoint"}, {"variance_type", nullptr}};
  for (const auto& [key, value] : neutral) {
    if (key == "solver_type" && cls == "UniPCMultistepScheduler") continue;  // UniPC's bh1 / bh2
    refuse_unless(config, key, value, unsupported);
  }
  const auto lmc = key_or(config, "lambda_min_clipped", -std::numeric_limits<double>::infinity());
  if (lmc.is_number() && std::isfinite(lmc.get<double>()))
    throw std::invalid_argument("scheduler config key lambda_min_clipped = " + lmc.dump() + " " + unsupported +
                                "; set it to -Infinity to sample without it");
  if (cls == "DPMSolverMultistepScheduler") {
    const auto algo = key_or(config, "algorithm_type", "dpmsolver++").get<std::string>();
    if (algo != "dpmsolver++" && algo != "sde-dpmsolver++")
      throw std::invalid_argument("scheduler config key algorithm_type = \"" + algo + "\" " + unsupported +
                                  " (diffuse's DPM-Solver predicts data: dpmsolver++ or sde-dpmsolver++)");
  }
  const SchedulerClass* record = record_of(config);
  for (const auto& [key, spacing] : sigma_spacing_keys())
    if (key_or(config, key, false) == true && !(record && record->sigma_spacing_keys))
      throw std::invalid_argument(std::string("scheduler config key ") + key + " = true, which " +
                                  (cls.empty() ? "a config without _class_name" : cls) +
                                  " does not read (diffuse honours it for Euler, Heun, LMS, DPM-Solver, UniPC and flow "
                                  "matching); remove it, or pass --spacing " + to_string(spacing));
}

bool final_step_to_clean_data(const std::string& sampler, const SchedulerConfig& config) {
  get_sampler(sampler);  // validates the name
  if (walk_of(config) == ClassWalk::flow) return true;
  const SchedulerClass* own = class_of_sampler(canonical_sampler_name(sampler));  // heun: none, the clean data
  if (!own || own->end == ClassEnd::clean) return true;
  if (own->end == ClassEnd::set_alpha_to_one) return config.set_alpha_to_one;
  // final_sigmas_type. Without the key: "zero", the default of diffusers since 0.26 (0.25's DPMSolverMultistepScheduler
  // ended at alpha_bar[0] with a full-order last step, which leaves visible noise: FID-FMNIST 225 against 158 at 25
  // steps).
  const auto v = key_or(config, "final_sigmas_type", "zero");
  const std::string type = v.is_string() ? v.get<std::string>() : v.dump();
  if (type == "zero") return true;
  if (type == "sigma_min") return false;
  throw std::invalid_argument("scheduler config key final_sigmas_type '" + type + "' is not one of zero, sigma_min");
}

namespace {
// Whether diffuse samples the class as diffusers does (sampler_for); the others are named and refused.
bool implemented_class(const SchedulerConfig& config) {
  const SchedulerClass* record = record_of(config);
  return record && !record->sampler.empty();
}
}  // namespace

std::string sampler_for(const SchedulerConfig& config) {
  const auto cls = class_of(config);
  if (!implemented_class(config))
    throw std::invalid_argument("the scheduler config names " + cls + ", which diffuse does not implement; pass --sampler "
                                "(ddim, dpmpp_2m, unipc, euler, ...) to sample with one of diffuse's samplers on this "
                                "config's schedule (it says so on stderr), or --scheduler with a config of a class it "
                                "implements");
  // PNDMScheduler: diffusers' default is false (the Runge-Kutta warm-up); Stable Diffusion's configs set it true.
  if (cls == "PNDMScheduler") return key_or(config, "skip_prk_steps", false) == true ? "plms" : "pndm";
  if (cls == "DPMSolverMultistepScheduler") {
    const bool sde = key_or(config, "algorithm_type", "dpmsolver++") == "sde-dpmsolver++";
    const int order = key_or(config, "solver_order", 2).get<int>();
    if (order < 1 || order > 3) throw std::invalid_argument("scheduler config key solver_order must be 1, 2 or 3");
    if (order == 1) return sde ? "euler_ancestral" : "ddim";  // first-order DPM-Solver++ is the DDIM step
    return std::string(order == 3 ? "dpmpp_3m" : "dpmpp_2m") + (sde ? "_sde" : "");
  }
  return record_of(config)->sampler;
}

namespace {
// The options a config's keys set for `sampler` (without checking that the class is implemented).
SamplerOptions config_sampler_options(const SchedulerConfig& config, const std::string& sampler) {
  SamplerOptions so;
  const bool unipc_class = class_of(config) == "UniPCMultistepScheduler";
  so.order = unipc_class ? key_or(config, "solver_order", 2).get<int>() : 2;
  so.unipc_variant = unipc_class ? parse_unipc_variant(key_or(config, "solver_type", "bh2").get<std::string>())
                                 : UniPcVariant::bh2;
  so.lower_order_final = key_or(config, "lower_order_final", true).get<bool>();
  so.prediction = config.prediction_type;
  so.set_alpha_to_one = final_step_to_clean_data(sampler, config);
  return so;
}
}  // namespace

double initial_noise_scale(const SchedulerConfig& config, const Level& first) {
  if (!steps_in_sigma(config)) return 1.0;
  return config.timestep_spacing == Spacing::leading ? std::hypot(first.a, first.s) : first.s;
}

torch::Tensor add_noise(const SchedulerConfig& config, const torch::Tensor& x0, const torch::Tensor& noise,
                        const Level& level) {
  if (!steps_in_sigma(config)) return level.a * x0 + level.s * noise;
  if (!(level.a > 0))
    throw std::invalid_argument("add_noise: " + class_of(config) + " adds sigma = s / a times the noise, infinite at t = " +
                                std::to_string(level.t) + " (zero terminal SNR)");
  return x0 + (level.s / level.a) * noise;
}

SamplerSettings sampler_settings(const SchedulerConfig& config) {
  SamplerSettings r;
  r.sampler = sampler_for(config);
  r.options = config_sampler_options(config, r.sampler);
  return r;
}

namespace {

// The sigma spacing a config's use_*_sigmas key asks for.
std::optional<Spacing> config_sigma_spacing(const SchedulerConfig& config) {
  for (const auto& [key, spacing] : sigma_spacing_keys())
    if (key_or(config, key, false) == true) return spacing;
  return std::nullopt;
}

}  // namespace

std::vector<Level> sampling_levels(const SchedulerConfig& config, const std::string& sampler, int64_t steps,
                                   std::optional<Spacing> spacing, Level& end) {
  const ClassWalk walk = walk_of(config);
  end = Level{-1, 1, 0};
  if (walk == ClassWalk::flow)
    return NoisePath::of(config).levels(steps, spacing.value_or(config_sigma_spacing(config).value_or(Spacing::linspace)));
  const Schedule schedule = config.schedule();
  const Spacing sp = spacing.value_or(config_sigma_spacing(config).value_or(config.timestep_spacing));
  const bool clean = final_step_to_clean_data(sampler, config);
  if (!clean) end = level_at(schedule, 0);
  const bool multistep = walk == ClassWalk::multistep;
  if (is_sigma_spacing(sp)) {
    // A sigma spacing's last level is sigma[0], so a last step to alpha_bar[0] has length 0 (diffusers' karras with
    // final_sigmas_type sigma_min): every sampler of a class that ends there takes it as the class does (the table's
    // zero_length_end; SchedulerClasses.OneRecordPerClassAgreesWithTheSamplerTable). A config that only lacks
    // final_sigmas_type (DDIMScheduler configs under dpmpp_*, diffusers 0.25's default) ends at the clean data.
    const std::string name = canonical_sampler_name(sampler);
    const bool explicit_end = name == "ddim" ? !config.set_alpha_to_one
                                             : key_or(config, "final_sigmas_type", "") == "sigma_min";
    if (!(explicit_end && !clean)) end = Level{-1, 1, 0};
    // DPMSolverMultistep and UniPC round a karras level's network time (not an exponential or beta one's).
    return spaced_levels(schedule, steps, sp, 0, 7.0, /*round_t=*/multistep && sp == Spacing::karras);
  }
  const int64_t offset = sp == Spacing::leading ? config.steps_offset : 0;
  if (multistep && sp != Spacing::trailing) {
    std::vector<Level> out;
    for (int64_t t : multistep_timesteps(schedule.T(), steps, sp, offset)) out.push_back(level_at(schedule, t));
    return out;
  }
  if (walk == ClassWalk::sigma && sp == Spacing::linspace) return sigma_linspace_levels(schedule, steps);
  return spaced_levels(schedule, steps, sp, offset);
}

namespace {

// The latent (or pixel) size x_t has: the config's, or --height / --width in pixels (image to image: the init
// images' size), checked against the autoencoder's factor and the UNet's levels.
std::pair<int64_t, int64_t> sample_size(const LoadedRun& run, const GenerateOptions& o) {
  int64_t height = o.height, width = o.width;
  if (o.init_images.defined()) {
    if (o.init_images.dim() != 4 || o.init_images.size(0) < 1)
      throw std::invalid_argument("init images must be [M, C, H, W], got " + c10::str(o.init_images.sizes()));
    for (auto [given, size, flag] : {std::tuple<int64_t, int64_t, const char*>{o.height, o.init_images.size(2), "--height"},
                                     {o.width, o.init_images.size(3), "--width"}})
      if (given != 0 && given != size)
        throw std::invalid_argument(std::string(flag) + " " + std::to_string(given) + " differs from the init image's " +
                                    std::to_string(size) + " (resize the image, or leave " + flag + " out)");
    height = o.init_images.size(2);
    width = o.init_images.size(3);
  }
  if (height == 0 && width == 0) return {run.height, run.width};
  const int64_t factor = run.vae.is_empty() ? 1 : run.vae->config().downsample_factor();
  const int64_t levels = run.is_text()          ? int64_t(run.text_unet->config().block_out_channels.size())
                        : !run.unet.is_empty() ? int64_t(run.unet->config().block_out_channels.size())
                                               : 1;  // a custom network: any size
  const int64_t multiple = factor << (levels - 1);
  auto latent = [&](int64_t pixels, int64_t fallback, const char* flag) {
    if (pixels == 0) return fallback;
    if (pixels < 0 || pixels % multiple != 0)
      throw std::invalid_argument(std::string(flag) + " " + std::to_string(pixels) + " is not a positive multiple of " +
                                  std::to_string(multiple) + " (the autoencoder's factor " + std::to_string(factor) +
                                  " times the UNet's " + std::to_string(multiple / factor) + ")");
    return pixels / factor;
  };
  return {latent(height, run.height, "--height"), latent(width, run.width, "--width")};
}

void check_options(const LoadedRun& run, const GenerateOptions& o, int64_t height, int64_t width) {
  check_samplable(run.scheduler);
  if (o.n < 1) throw std::invalid_argument("--n must be >= 1, got " + std::to_string(o.n));
  const double bytes = double(o.n) * double(run.channels * height * width) * 4.0;
  if (bytes > double(int64_t(1) << 36))
    throw std::invalid_argument("--n " + std::to_string(o.n) + " images of " + std::to_string(run.channels) + "x" +
                                std::to_string(height) + "x" + std::to_string(width) +
                                " would hold more than 64 GiB of samples; sample in several runs with --seed");
  if (o.batch < 1) throw std::invalid_argument("--batch must be >= 1, got " + std::to_string(o.batch));
  if (o.cfg_rescale < 0 || o.cfg_rescale > 1)
    throw std::invalid_argument("--cfg-rescale must lie in [0, 1], got " + std::to_string(o.cfg_rescale));
  if (o.class_id >= 0 && (run.class_embeds == 0 || o.class_id >= run.class_embeds))
    throw std::invalid_argument("--class " + std::to_string(o.class_id) + " but the model has " +
                                std::to_string(run.class_embeds) + " class embeddings");
  if (o.cfg != 1.0 && run.class_embeds == 0 && !run.is_text())
    throw std::invalid_argument("--cfg needs a class-conditional or text-to-image model; this one has no class embeddings");
  if (run.is_text() && o.prompts.empty())
    throw std::invalid_argument("this is a text-to-image pipeline: pass --prompt TEXT (or --prompts FILE)");
  if (!run.is_text() && (!o.prompts.empty() || !o.negative_prompts.empty()))
    throw std::invalid_argument("--prompt needs a text-to-image pipeline (a folder with model_index.json, unet/, "
                                "text_encoder/ and tokenizer/); this model has no text encoder");
  if (!o.negative_prompts.empty() && o.cfg == 1.0)
    throw std::invalid_argument("--negative-prompt acts through classifier-free guidance: pass --cfg above 1 with it");
  if (run.is_text() && (o.clip_skip < 0 || o.clip_skip >= run.text_encoder->config().num_hidden_layers))
    throw std::invalid_argument("--clip-skip must lie in [0, " +
                                std::to_string(run.text_encoder->config().num_hidden_layers - 1) + "], got " +
                                std::to_string(o.clip_skip));
  if (o.classifier && run.is_text()) throw std::invalid_argument("classifier guidance needs class labels, not prompts");
  if (o.classifier_scale != 0 && !o.classifier)
    throw std::invalid_argument("--classifier-scale needs --classifier RUN");
  if (o.classifier && o.classifier->config().in_channels != run.channels)
    throw std::invalid_argument("the classifier takes " + std::to_string(o.classifier->config().in_channels) +
                                " channels but the UNet's x_t has " + std::to_string(run.channels) +
                                (run.vae.is_empty() ? "" : " (a latent model needs a classifier trained on the same latents)"));
  if (o.cuda_graphs && !run.device.is_cuda())
    throw std::invalid_argument("CUDA graphs (--cuda-graphs) need a GPU: pass --device cuda, or leave them off");
  if (o.cuda_graphs && !detail::GraphedWork::available())
    throw std::invalid_argument("this build of diffuse has no CUDA graphs (they need a CUDA LibTorch 2.1 or later; "
                                "see docs/cuda.md): leave --cuda-graphs off");
  const auto& x = o.init_noise;
  if (x.defined() && (x.dim() != 4 || x.size(0) < o.n || x.size(1) != run.channels || x.size(2) != height ||
                      x.size(3) != width))
    throw std::invalid_argument("the initial noise (--init-noise) must be [>= " + std::to_string(o.n) + ", " + std::to_string(run.channels) +
                                ", " + std::to_string(height) + ", " + std::to_string(width) + "]");
}

bool clip_from_config(const GenerateOptions& o) { return std::isnan(o.clip_sample); }

double clip_range_of(const LoadedRun& run, const GenerateOptions& o) {
  const double range = clip_from_config(o) ? (run.scheduler.clip_sample ? run.scheduler.clip_sample_range : 0.0)
                                           : o.clip_sample;
  if (!(range >= 0)) throw std::invalid_argument("--clip-sample must be >= 0 (0: off), got " + std::to_string(range));
  if (range > 0 && !run.vae.is_empty())
    throw std::invalid_argument("--clip-sample clamps pixel values, but this model samples latents (pass --clip-sample 0)");
  return range;
}

std::vector<int64_t> image_labels(const LoadedRun& run, const GenerateOptions& o) {
  const int64_t classes = run.class_embeds > 0 ? run.class_embeds - 1 : 0;  // the last embedding is the null class
  std::vector<int64_t> labels(o.n, -1);
  for (int64_t i = 0; i < o.n; ++i)
    if (run.class_embeds > 0) labels[i] = o.class_id >= 0 ? o.class_id : (classes > 0 ? i % classes : 0);
  return labels;
}

// The denoiser of one batch: the (guided) network, its prediction and noise path, the batch's labels.
Denoiser batch_denoiser(const LoadedRun& run, const GenerateOptions& o, const Network& net, const NoisePath& path,
                        const Conditioning& y, double clip_range) {
  auto denoiser = make_denoiser(net, run.scheduler.prediction_type, path, run.scheduler.etsdm, y);
  // The scheduler config's clip_sample keeps diffusers' meaning: DDIM's step keeps the network's eps, while the sigma
  // classes' derivative (z - x0) / sigma recomputes it from the clamped x0, as --clip-sample does.
  const bool keep_eps = clip_from_config(o) && !steps_in_sigma(run.scheduler);
  if (clip_range > 0) denoiser = clip_x0(denoiser, clip_range, keep_eps ? ClipEps::keep : ClipEps::recompute);
  if (o.classifier) {
    auto classifier = o.classifier;
    Classifier clf = [classifier](const torch::Tensor& x_t, const torch::Tensor& t) mutable {
      return classifier->forward(x_t, t);
    };
    denoiser = classifier_guidance(denoiser, clf, y.labels, o.classifier_scale);
  }
  return denoiser;
}

torch::Tensor decode(const LoadedRun& run, const torch::Tensor& latents, int64_t batch) {
  auto vae = run.vae;  // a handle: decode_scaled is not const
  std::vector<torch::Tensor> decoded;
  for (int64_t i = 0; i < latents.size(0); i += batch)
    decoded.push_back(vae->decode_scaled(latents.narrow(0, i, std::min(batch, latents.size(0) - i)).to(run.device))
                          .to(torch::kCPU, torch::kFloat32));
  return torch::cat(decoded);
}

}  // namespace

namespace {

// The sampler options a config's class implies (sampler_settings), under the caller's.
SamplerOptions sampler_options(const LoadedRun& run, const GenerateOptions& o, const std::string& sampler) {
  SamplerOptions so = config_sampler_options(run.scheduler, sampler);
  so.eta = o.eta;
  so.variance = o.variance;
  so.dpmpp3_taylor = o.dpmpp3_taylor;
  if (o.order) so.order = o.order;
  if (o.unipc_variant) so.unipc_variant = *o.unipc_variant;
  so.seed = o.seed;
  return so;
}

}  // namespace

namespace {

// Rows first, ..., first + count - 1 of a batch that repeats `rows` cyclically: row i mod M of `rows` for image i (the
// prompt of image i, its init image).
torch::Tensor cyclic_rows(const torch::Tensor& rows, int64_t first, int64_t count) {
  auto idx = torch::arange(first, first + count, torch::kLong).remainder(rows.size(0)).to(rows.device());
  return rows.index_select(0, idx);
}

// Image to image's start: the init images (rows i mod M) encoded (latent models; the posterior sampled with noise
// of (seed, i)) and noised to `level` with the batch's noise x: a x0 + s x.
torch::Tensor noised_init(const LoadedRun& run, const GenerateOptions& o, const torch::Tensor& noise, const Level& level,
                          int64_t first, int64_t count) {
  auto images = cyclic_rows(o.init_images, first, count).to(run.device, torch::kFloat32);
  torch::Tensor x0 = images;
  if (!run.vae.is_empty()) {
    auto vae = run.vae;
    if (images.size(1) != vae->config().in_channels)
      throw std::invalid_argument("the init image has " + std::to_string(images.size(1)) + " channels, the autoencoder takes " +
                                  std::to_string(vae->config().in_channels));
    const auto posterior = vae->encode(images);
    auto eps = make_noise(posterior.mean.sizes().slice(1), count, o.seed, first, kEncoderNoiseStream, run.device);
    x0 = posterior.sample_from(eps) * vae->config().scaling_factor;
  }
  if (x0.sizes() != noise.sizes())
    throw std::invalid_argument("the init image gives x0 of shape " + c10::str(x0.sizes()) + ", the model samples " +
                                c10::str(noise.sizes()));
  return level.a * x0 + level.s * noise.to(x0.device());
}

// What a scheduler class diffuse does not sample as diffusers does, said once per run.
void note_substitution(const SchedulerConfig& config, const GenerateOptions& o, const std::string& sampler,
                       std::vector<std::string>& notes) {
  const auto cls = class_of(config);
  if (!implemented_class(config))
    notes.push_back("the scheduler config names " + cls + ", which diffuse does not implement: sampling with " + sampler +
                    " (--sampler) on its schedule and timestep_spacing; results differ from diffusers' " + cls);
  if (cls == "HeunDiscreteScheduler" && canonical_sampler_name(sampler) == "heun")
    notes.push_back("diffuse's heun integrates in the angle phi = atan(s / a), not in sigma as diffusers' "
                    "HeunDiscreteScheduler (heun_sigma, this config's own sampler): the samples differ from diffusers' "
                    "(0.7% to 18% at 10 steps)");
}

}  // namespace

int64_t partial_walk_start(int64_t steps, double strength) {
  if (!(strength > 0 && strength <= 1))
    throw std::invalid_argument("--strength must lie in (0, 1], got " + std::to_string(strength));
  const int64_t run_steps = std::min(int64_t(double(steps) * strength), steps);
  if (run_steps < 1)
    throw std::invalid_argument("--strength " + std::to_string(strength) + " of " + std::to_string(steps) +
                                " steps runs no step (int(steps * strength) = 0): raise --strength or --steps");
  return steps - run_steps;
}

Generated generate(const LoadedRun& run, const GenerateOptions& o) {
  torch::NoGradGuard no_grad;
  const auto [height, width] = sample_size(run, o);
  check_options(run, o, height, width);
  Generated g;
  g.clip_range = clip_range_of(run, o);
  g.sampler = o.sampler.empty() ? sampler_for(run.scheduler) : canonical_sampler_name(o.sampler);
  note_substitution(run.scheduler, o, g.sampler, g.notes);
  torch::Tensor prompt_states, negative_states;
  if (run.is_text()) {
    prompt_states = encode_prompts(run, o.prompts, o.clip_skip, &g.notes);
    // diffusers' encode_prompt applies clip_skip to the prompt only; the negative prompt's states are the last layer's.
    const auto negatives = o.negative_prompts.empty() ? std::vector<std::string>{""} : o.negative_prompts;
    if (o.cfg != 1.0) negative_states = encode_prompts(run, negatives, 0, &g.notes);
    for (int64_t i = 0; i < o.n; ++i) {
      g.prompts.push_back(o.prompts[size_t(i) % o.prompts.size()]);
      g.negative_prompts.push_back(o.cfg == 1.0 ? "" : negatives[size_t(i) % negatives.size()]);
    }
  }
  auto sampler = get_sampler(g.sampler);
  g.spacing = o.spacing.value_or(run.scheduler.timestep_spacing);
  const NoisePath path = NoisePath::of(run.scheduler);
  Level end;
  auto levels = sampling_levels(run.scheduler, g.sampler, o.steps, o.spacing, end);
  const int64_t walk_steps = int64_t(levels.size());
  if (o.init_images.defined())
    levels.erase(levels.begin(), levels.begin() + partial_walk_start(walk_steps, o.strength));
  for (const auto& l : levels) g.timesteps.push_back(l.t);
  g.labels = image_labels(run, o);
  Network net = run.network();
  const int64_t null_class = o.null_class >= 0 ? o.null_class : run.class_embeds - 1;
  if (o.cfg != 1.0) net = classifier_free_guidance(net, {o.cfg, o.cfg_rescale, null_class});
  if (o.cuda_graphs) net = detail::graphed_network(net);

  const int64_t batches = (o.n + o.batch - 1) / o.batch;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> outputs;
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t first = b * o.batch, count = std::min(o.batch, o.n - first);
    auto x = o.init_noise.defined() ? o.init_noise.slice(0, first, first + count).to(torch::kFloat32)
                                    : make_noise({run.channels, height, width}, count, o.seed, first, 0, run.device);
    Conditioning y;
    if (run.class_embeds > 0)
      y = torch::tensor(std::vector<int64_t>(g.labels.begin() + first, g.labels.begin() + first + count), torch::kLong)
              .to(run.device);
    if (run.is_text())
      y = Conditioning::text(cyclic_rows(prompt_states, first, count),
                             negative_states.defined() ? cyclic_rows(negative_states, first, count) : torch::Tensor());
    if (o.init_images.defined()) x = noised_init(run, o, x, levels.front(), first, count);
    else if (const double scale = initial_noise_scale(run.scheduler, levels.front()); scale != 1.0) x = scale * x;
    SamplerOptions so = sampler_options(run, o, g.sampler);
    so.first_image = first;
    so.walk_steps = walk_steps;
    if (o.progress)
      so.callback = [&](const StepInfo& info) {  // the sampler's own count (PLMS reports S + 1 steps: S + 1 calls)
        o.progress({b * info.steps + info.step + 1, batches * info.steps, int64_t(std::llround(info.t))});
      };
    outputs.push_back(sampler(batch_denoiser(run, o, net, path, y, g.clip_range), Timesteps(levels, end),
                              x.to(run.device), so)
                          .to(torch::kCPU, torch::kFloat32));
    // A NaN or infinite sample would be written as a black image: refuse it, naming the likely causes.
    if (!torch::isfinite(outputs.back()).all().item<bool>())
      throw std::runtime_error("images " + std::to_string(first) + " to " + std::to_string(first + count - 1) +
                               " came out NaN or infinite: the UNet's weights ('" + run.unet_folder + "') or the initial "
                               "noise are not finite, or the model diverges with these sampler settings");
  }
  g.images = torch::cat(outputs);
  if (!run.vae.is_empty()) {
    g.latents = g.images;
    g.images = decode(run, g.latents, o.batch);
  }
  g.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return g;
}

}  // namespace diffuse
