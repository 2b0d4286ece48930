// Fine-tuning a Stable Diffusion pipeline's UNet on captioned images (include/diffuse/train/text_train.h): the
// options, the cached latents and text states, the scheduler a fine-tune writes, and the training task.
#include "diffuse/train/text_train.h"

#include <filesystem>
#include <functional>
#include <iostream>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/util/progress.h"
#include "diffuse/util/runtime.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

// ================================================================ options

nlohmann::json TextTrainOptions::to_json() const {
  const auto& c = captions;
  return {{"kind", "text-unet"},
          {"model", model},
          {"tokenizer", tokenizer},
          {"single_file_config", single_file_config},
          {"source_v_prediction", source_v_prediction},
          {"data", {{"folder", data}, {"resolution", c.resolution}, {"crop", c.crop}, {"alpha", c.alpha},
                    {"bad_files", c.bad_files}, {"limit", c.limit}}},
          {"prediction", prediction ? nlohmann::json(to_string(*prediction)) : nlohmann::json()},
          {"zero_snr", zero_snr},
          {"spacing", to_string(spacing)},
          {"loss_weight", to_string(loss_weight)},
          {"min_snr_gamma", min_snr_gamma},
          {"offset_noise", offset_noise},
          {"caption_dropout", caption_dropout},
          {"gradient_checkpointing", gradient_checkpointing},
          {"loop", loop.to_json()}};
}

bool TextTrainOptions::is_text_run(const nlohmann::json& j) { return j.is_object() && j.value("kind", "") == "text-unet"; }

TextTrainOptions TextTrainOptions::from_json(const nlohmann::json& j) {
  if (!is_text_run(j)) throw std::invalid_argument("this run is not a text-to-image fine-tune (kind " + j.value("kind", std::string("?")) + ")");
  TextTrainOptions o;
  o.model = j.at("model").get<std::string>();
  o.tokenizer = j.value("tokenizer", "");
  o.single_file_config = j.value("single_file_config", "");
  o.source_v_prediction = j.value("source_v_prediction", false);
  const auto& d = j.at("data");
  o.data = d.at("folder").get<std::string>();
  o.captions.resolution = d.value("resolution", o.captions.resolution);
  o.captions.crop = d.value("crop", o.captions.crop);
  o.captions.alpha = d.value("alpha", o.captions.alpha);
  o.captions.bad_files = d.value("bad_files", o.captions.bad_files);
  o.captions.limit = d.value("limit", o.captions.limit);
  if (j.contains("prediction") && !j["prediction"].is_null()) o.prediction = parse_prediction(j["prediction"].get<std::string>());
  o.zero_snr = j.value("zero_snr", false);
  o.spacing = parse_spacing(j.value("spacing", "trailing"));
  o.loss_weight = parse_loss_weight(j.value("loss_weight", "uniform"));
  o.min_snr_gamma = j.value("min_snr_gamma", o.min_snr_gamma);
  o.offset_noise = j.value("offset_noise", 0.0);
  o.caption_dropout = j.value("caption_dropout", 0.0);
  o.gradient_checkpointing = j.value("gradient_checkpointing", false);
  if (j.contains("loop")) o.loop = LoopOptions::from_json(j["loop"]);
  return o;
}

// ================================================================ the pipeline folder a fine-tune writes

nlohmann::json stable_diffusion_model_index() {
  return {{"_class_name", "StableDiffusionPipeline"},
          {"_diffusers_version", "0.40.0"},
          {"feature_extractor", {nullptr, nullptr}},
          {"image_encoder", {nullptr, nullptr}},
          {"requires_safety_checker", false},
          {"safety_checker", {nullptr, nullptr}},
          {"scheduler", {"diffusers", "DDIMScheduler"}},
          {"text_encoder", {"transformers", "CLIPTextModel"}},
          {"tokenizer", {"transformers", "CLIPTokenizer"}},
          {"unet", {"diffusers", "UNet2DConditionModel"}},
          {"vae", {"diffusers", "AutoencoderKL"}}};
}


SchedulerConfig finetune_scheduler_config(const SchedulerConfig& source, Prediction prediction, bool zero_snr,
                                          Spacing spacing, std::vector<std::string>* notes) {
  if (prediction == Prediction::flow)
    throw std::invalid_argument("--prediction flow belongs to rectified-flow pipelines; a Stable Diffusion 1.x / 2.x "
                                "fine-tune predicts eps, v or x0");
  if (is_sigma_spacing(spacing))
    throw std::invalid_argument("--spacing " + to_string(spacing) + " is a sigma spacing: store leading, linspace or "
                                "trailing and pass it to diffuse sample --spacing");
  SchedulerConfig c = source;
  c.prediction_type = prediction;
  c.rescale_betas_zero_snr = source.rescale_betas_zero_snr || zero_snr;
  c.timestep_spacing = spacing;
  const std::string cls = source.extra.value("_class_name", "");
  if (cls != "DDIMScheduler") {
    if (notes)
      notes->push_back("scheduler/: the pipeline's " + (cls.empty() ? std::string("unnamed scheduler") : cls) +
                       " is written as a DDIMScheduler with the same betas (what diffuse samples; diffusers' other "
                       "schedulers load its config too)");
    // Keys of the source class that DDIMScheduler does not read.
    for (const char* key : {"skip_prk_steps", "use_karras_sigmas", "interpolation_type", "final_sigmas_type",
                            "algorithm_type", "solver_order", "solver_type", "lower_order_final", "use_exponential_sigmas",
                            "use_beta_sigmas", "sigma_min", "sigma_max", "timestep_type", "euler_at_final"})
      c.extra.erase(key);
    c.extra["_class_name"] = "DDIMScheduler";
  }
  c.schedule();  // validates the result
  return c;
}

// ================================================================ the data

namespace {

// A per-item file cache: item i's tensor `name` lives in paths[i] (in `folder`). Items whose file is missing,
// unreadable or of another shape than `shape` are computed `batch` at a time by compute(indices) ([k, ...shape]) and
// written, each atomically. Returns every item, [N, ...shape]; `computed` counts those computed.
torch::Tensor cached_items(const fs::path& folder, const std::vector<std::string>& paths, const std::string& name,
                           const std::vector<int64_t>& shape, size_t batch,
                           const std::function<torch::Tensor(const std::vector<int64_t>&)>& compute, int64_t& computed,
                           const std::function<void(int64_t)>& after_batch = {}) {
  std::vector<torch::Tensor> out(paths.size());
  std::vector<int64_t> missing;
  for (size_t i = 0; i < paths.size(); ++i) {
    try {
      if (fs::exists(paths[i])) {
        auto t = load_safetensors(paths[i]).at(name);
        if (t.sizes() == torch::IntArrayRef(shape)) out[i] = t.to(torch::kFloat32);
      }
    } catch (const std::exception&) {  // unreadable: computed below
    }
    if (!out[i].defined()) missing.push_back(int64_t(i));
  }
  fs::create_directories(folder);
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < missing.size(); k += batch) {
    const std::vector<int64_t> rows(missing.begin() + long(k), missing.begin() + long(std::min(missing.size(), k + batch)));
    const auto values = compute(rows).to(torch::kCPU, torch::kFloat32);
    for (size_t r = 0; r < rows.size(); ++r) {
      auto& item = out[size_t(rows[r])];
      item = values[int64_t(r)].contiguous();
      save_safetensors(paths[size_t(rows[r])], {{name, item}}, {{"cache", folder.filename().string()}});
    }
    computed += int64_t(rows.size());
    if (after_batch) after_batch(int64_t(rows.size()));
  }
  return torch::stack(out);
}

// Moments (posterior mean and std, [2C, h, w]) of each image, cached per image (keyed by its pixels) in `folder`.
torch::Tensor cached_moments(AutoencoderKL& vae, const torch::Tensor& images, const fs::path& folder, int64_t& computed,
                             Progress& progress, int64_t& done) {
  const int64_t C = vae->config().latent_channels, f = vae->config().downsample_factor();
  std::vector<std::string> paths;
  for (int64_t i = 0; i < images.size(0); ++i)
    paths.push_back((folder / (tensors_fingerprint({images[i]}) + ".safetensors")).string());
  const auto device = vae->parameters().front().device();
  auto encode = [&](const std::vector<int64_t>& rows) {
    const auto posterior = vae->encode(images.index_select(0, torch::tensor(rows, torch::kLong)).to(device));
    return torch::cat({posterior.mean, posterior.std}, 1);
  };
  return cached_items(folder, paths, "moments", {2 * C, images.size(2) / f, images.size(3) / f}, 4, encode, computed,
                      [&](int64_t k) { progress.update(done += k, "encoding images"); });
}

// The text states [N, L, D] of `captions` (the text encoder's last layer, as encode_prompts gives them), cached per
// caption (keyed by its token ids) in `folder`.
torch::Tensor cached_states(const LoadedRun& pipe, const std::vector<std::string>& captions, const fs::path& folder,
                            int64_t& computed, std::vector<std::string>& notes) {
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::string> paths;
  int64_t truncated = 0;
  std::string first_truncated;
  for (const auto& caption : captions) {
    const auto tokens = pipe.tokenizer->encode_padded(caption);
    if (!tokens.dropped.empty() && truncated++ == 0) first_truncated = caption;
    ids.push_back(tokens.ids);
    paths.push_back((folder / (tensors_fingerprint({torch::tensor(tokens.ids, torch::kLong)}) + ".safetensors")).string());
  }
  if (truncated)
    notes.push_back(std::to_string(truncated) + " caption" + (truncated == 1 ? " is" : "s are") + " longer than the " +
                    std::to_string(pipe.tokenizer->max_length() - 2) + " tokens the text encoder reads and cut there " +
                    "(as diffusers' training does), e.g. \"" + first_truncated.substr(0, 80) + "\"");
  auto text_encoder = pipe.text_encoder;
  auto encode = [&](const std::vector<int64_t>& rows) {
    std::vector<torch::Tensor> batch;
    for (auto i : rows) batch.push_back(torch::tensor(ids[size_t(i)], torch::kLong));
    return text_encoder->encode(torch::stack(batch).to(pipe.device));
  };
  return cached_items(folder, paths, "states", {pipe.tokenizer->max_length(), text_encoder->config().hidden_size}, 16,
                      encode, computed);
}

LoadOptions source_load_options(const TextTrainOptions& o) {
  LoadOptions lo;
  lo.device = prepare_device(o.loop.device);
  lo.tokenizer = o.tokenizer;
  lo.v_prediction = o.source_v_prediction;
  lo.single_file_config = o.single_file_config;
  return lo;
}

}  // namespace

TextTrainData prepare_text_training(const TextTrainOptions& o, const std::string& cache_dir, std::ostream* report) {
  if (!(o.caption_dropout >= 0 && o.caption_dropout < 1))
    throw std::invalid_argument("--caption-dropout must be in [0, 1), got " + std::to_string(o.caption_dropout));
  if (!(o.offset_noise >= 0)) throw std::invalid_argument("--offset-noise must be >= 0");
  TextTrainData d;
  // A resumed run reads its own copy of the pipeline (its components are what the checkpoint trains and writes).
  const std::string source = o.loop.resume ? o.loop.out : o.model;
  LoadOptions lo = o.loop.resume ? LoadOptions{} : source_load_options(o);
  lo.device = prepare_device(o.loop.device);
  lo.weights = o.loop.resume ? "raw" : "auto";
  d.pipeline = load_run(source, lo);
  if (!d.pipeline.is_text())
    throw std::invalid_argument("'" + source + "' is not a text-to-image pipeline (no UNet2DConditionModel with a text "
                                "encoder): diffuse train --model fine-tunes Stable Diffusion 1.x / 2.x pipelines");
  if (d.pipeline.vae.is_empty()) throw std::invalid_argument("'" + source + "' has no autoencoder (vae/)");
  d.notes = d.pipeline.notes;
  d.scheduler = finetune_scheduler_config(d.pipeline.scheduler, o.prediction.value_or(d.pipeline.scheduler.prediction_type),
                                          o.zero_snr, o.spacing, &d.notes);
  if (!fs::is_regular_file(source)) d.source_folder = ModelFolder::pipeline_of(d.pipeline.unet_folder);

  auto captions = load_caption_folder(o.data, o.captions);
  d.notes.insert(d.notes.end(), captions.notes.begin(), captions.notes.end());
  const int64_t f = d.pipeline.vae->config().downsample_factor(),
                down = int64_t(1) << (d.pipeline.text_unet->config().block_out_channels.size() - 1);
  if (o.captions.resolution % (f * down) != 0)
    throw std::invalid_argument("--resolution " + std::to_string(o.captions.resolution) + " is not a multiple of " +
                                std::to_string(f * down) + " (the autoencoder's factor " + std::to_string(f) +
                                " times the UNet's " + std::to_string(down) + ")");
  if (report)
    *report << "data: " << captions.size() << " captioned images from '" << o.data << "' (" << captions.layout << "), "
            << o.captions.resolution << "x" << o.captions.resolution << " center crop"
            << (o.loop.hflip ? ", mirrored at random" : "") << "\n";

  const fs::path root(cache_dir);
  auto& vae = d.pipeline.vae;
  const fs::path latent_folder = root / ("sd-latents-" + vae_fingerprint(vae));
  int64_t latents_computed = 0, done = 0;
  const int64_t to_encode = captions.size() * (o.loop.hflip ? 2 : 1);
  Progress progress(report != nullptr, 0, to_encode, std::max<int64_t>(1, to_encode / 10), "image");
  auto moments = cached_moments(vae, captions.images, latent_folder, latents_computed, progress, done);
  if (o.loop.hflip)
    moments = torch::cat({moments, cached_moments(vae, captions.images.flip(3), latent_folder, latents_computed, progress, done)}, 1);
  progress.finish();
  d.moments.images = moments.contiguous();
  d.moments.labels = torch::arange(captions.size(), torch::kLong);
  d.moments.name = o.data + " (latent moments)";

  auto& enc = *d.pipeline.text_encoder;
  const fs::path text_folder = root / ("sd-text-" + weights_fingerprint(enc, d.pipeline.text_encoder->config().to_json().dump()));
  int64_t texts_computed = 0;
  d.states = cached_states(d.pipeline, captions.captions, text_folder, texts_computed, d.notes);
  d.empty_states = encode_prompts(d.pipeline, {""}).to(torch::kCPU, torch::kFloat32);
  if (report)
    *report << "cache '" << cache_dir << "': latents " << latents_computed << " encoded, "
            << moments.size(0) * (o.loop.hflip ? 2 : 1) - latents_computed << " read; text states " << texts_computed
            << " encoded, " << captions.size() - texts_computed << " read\n";
  return d;
}

// ================================================================ the task

namespace {

using detail::drawn_on;
using detail::Shard;

// A folder copied as hard links where the file system allows (the frozen components are never written to), else
// copied.
void copy_folder(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::create_hard_links, ec);
  if (!ec) return;
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
}

class TextDiffusionTask : public detail::Task {
 public:
  TextDiffusionTask(const TextTrainOptions& o, const TextTrainData& d)
      : o_(o), d_(d), prediction_(d.scheduler.prediction_type), path_(d.scheduler.schedule()) {
    // Refuses eps prediction on a zero-terminal-SNR schedule now rather than at the first t = T - 1.
    weight_ = loss_weight(o.loss_weight, prediction_, path_.snr(), o.min_snr_gamma).to(torch::kFloat32);
    const auto& vc = d.pipeline.vae->config();
    channels_ = vc.latent_channels;
    scaling_ = vc.scaling_factor;
    if (d.moments.channels() != (o.loop.hflip ? 4 : 2) * channels_)
      throw std::invalid_argument("the latent moments have " + std::to_string(d.moments.channels()) + " channels, not " +
                                  std::to_string((o.loop.hflip ? 4 : 2) * channels_) + " (prepare_text_training's)");
    if (o.gradient_checkpointing && d.pipeline.text_unet->config().dropout > 0)
      throw std::invalid_argument("--gradient-checkpointing recomputes the blocks in the backward pass, which needs the "
                                  "same dropout masks: not with a UNet whose dropout is " +
                                  std::to_string(d.pipeline.text_unet->config().dropout));
  }

  std::string kind() const override { return "unet"; }
  void create(torch::Device device) override {
    unet_ = d_.pipeline.text_unet;  // trained in place: no second float32 copy of a full-size UNet
    unet_->to(device);
    ema_ = UNet2DConditionModel(unet_->config());
    ema_->to(device);
    detail::copy_weights(*ema_, *unet_);
    to(device);
  }
  void load(const RunFolder& run, torch::Device device) override {
    unet_ = load_unet_condition(run.network(kind()).string(), device);
    ema_ = load_unet_condition(run.ema_network(kind()).string(), device);
    to(device);
  }
  torch::nn::Module& model() override { return *unet_; }
  torch::nn::Module& ema() override { return *ema_; }
  int64_t T() const override { return path_.T(); }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& m = batch.images;  // [n, 2C or 4C, h, w]: mean, std (then the mirror's)
    const int64_t n = m.size(0), C = channels_, G = shard.global;
    // The global batch's draws, in a fixed order, cut to this shard's rows.
    auto uniform = [&] { return shard.rows(torch::rand({G}, gen, drawn_on(gen, torch::kFloat32))).to(device_); };
    torch::Tensor flip = o_.loop.hflip ? uniform() < 0.5 : torch::Tensor();
    torch::Tensor drop = o_.caption_dropout > 0 ? uniform() < o_.caption_dropout : torch::Tensor();
    auto posterior_noise = shard.rows(torch::randn({G, C, m.size(2), m.size(3)}, gen, drawn_on(gen, torch::kFloat32))).to(device_);
    const auto p = path_.points(shard.rows(path_.draw(G, gen)));
    auto eps = shard.rows(offset_noise(torch::randn({G, C, m.size(2), m.size(3)}, gen, drawn_on(gen, torch::kFloat32)),
                                       o_.offset_noise, gen))
                   .to(device_);
    auto mean = m.narrow(1, 0, C), std = m.narrow(1, C, C);
    if (flip.defined()) {
      auto f = flip.view({n, 1, 1, 1});
      mean = torch::where(f, m.narrow(1, 2 * C, C), mean);
      std = torch::where(f, m.narrow(1, 3 * C, C), std);
    }
    auto x0 = (mean + std * posterior_noise) * scaling_;
    auto context = states_.index_select(0, batch.labels.to(device_));
    if (drop.defined()) context = torch::where(drop.view({n, 1, 1}), empty_.expand_as(context), context);
    auto td = p.timestep.to(device_);
    auto a = p.a.view({n, 1, 1, 1}), s = p.s.view({n, 1, 1, 1});
    auto pred = unet_->forward(add_noise(x0, eps, a, s), td, context).to(torch::kFloat32);
    return {per_example_loss(prediction_, pred, x0, eps, a, s, weight_d_.index_select(0, td)), p.timestep};
  }

  void save(const RunFolder& dir) override {
    save_unet_condition(unet_, dir.network(kind()).string());
    save_unet_condition(ema_, dir.ema_network(kind()).string());
    fs::create_directories(dir.scheduler_folder());
    d_.scheduler.save(dir.scheduler_config().string());
    write_file_atomic(dir.model_index().string(), stable_diffusion_model_index().dump(2) + "\n");
    save_frozen(dir);
  }

 private:
  // text_encoder/, tokenizer/ and vae/ as the pipeline had them, written once (the run keeps them from then on).
  void save_frozen(const RunFolder& dir) {
    const RunFolder run(o_.loop.out);
    for (const std::string name : {"text_encoder", "tokenizer", "vae"}) {
      if (fs::exists(run.root / name)) continue;
      const fs::path from = d_.source_folder.empty() ? fs::path() : fs::path(d_.source_folder) / name;
      if (!from.empty() && fs::is_directory(from)) {
        copy_folder(from, dir.root / name);
      } else if (name == "text_encoder") {
        auto enc = d_.pipeline.text_encoder;
        save_clip_text_model(enc, (dir.root / name).string());
      } else if (name == "vae") {
        auto vae = d_.pipeline.vae;
        save_vae(vae, (dir.root / name).string());
      } else if (!o_.tokenizer.empty()) {
        copy_folder(o_.tokenizer, dir.root / name);
      } else {
        throw std::invalid_argument("no tokenizer folder to copy into the run (pass --tokenizer)");
      }
    }
  }

  void to(torch::Device device) {
    device_ = device;
    unet_->set_gradient_checkpointing(o_.gradient_checkpointing);
    path_ = path_.to(device);
    weight_d_ = weight_.to(device);
    states_ = d_.states.to(device);
    empty_ = d_.empty_states.to(device);
  }

  const TextTrainOptions& o_;
  const TextTrainData& d_;
  Prediction prediction_;
  NoisePath path_;
  int64_t channels_ = 4;
  double scaling_ = 1;
  torch::Tensor weight_, weight_d_, states_, empty_;
  torch::Device device_ = torch::kCPU;
  UNet2DConditionModel unet_{nullptr}, ema_{nullptr};
};

}  // namespace

TrainResult train_text(const TextTrainOptions& options, const TextTrainData& data, const TrainHooks& hooks) {
  TextDiffusionTask task(options, data);
  return detail::run_loop(task, options.loop, options.to_json(), data.moments, hooks);
}

}  // namespace diffuse
