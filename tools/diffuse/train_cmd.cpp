// diffuse train: a diffusion UNet on Fashion-MNIST, generated data or a folder of images.
// diffuse train-classifier: the noisy classifier of classifier guidance.
// diffuse train-vae: the KL autoencoder of latent diffusion.
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "diffuse/models/model_folder.h"
#include "diffuse/io/files.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/train/distributed.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/text_train.h"
#include "diffuse/train/train.h"
#include "diffuse/models/vae.h"

namespace fs = std::filesystem;

namespace diffuse::cli {
namespace {

// Flags that may accompany --resume besides the resumable options: where the latent cache lives, how many
// processes train, help. None of them is stored in run.json.
const std::vector<std::string> kResumeLauncherFlags = {"--latent-cache", "--nproc", "--help"};

std::vector<std::string> flags_allowed_with_resume() {
  std::vector<std::string> flags;
  for (const auto& r : resumable_options())
    if (!r.flag.empty()) flags.push_back(r.flag);
  flags.insert(flags.end(), kResumeLauncherFlags.begin(), kResumeLauncherFlags.end());
  return flags;
}

std::string resume_help() {
  std::string flags;
  for (const auto& f : flags_allowed_with_resume())
    if (f != "--out" && f != "--resume" && f != "--help") flags += (flags.empty() ? "" : ", ") + f;
  return "Continue the run in --out from its last checkpoint (its run.json options are used; only " + flags +
         " may be given)";
}

// Options shared by the commands, bound to a LoopOptions / DataSpec / ScheduleSpec.
struct CommonOptions {
  LoopOptions loop;
  DataSpec data;
  ScheduleSpec schedule;
  bool quiet = false;
  std::string channels = "64,128,128";
  std::string attention_levels = "1";
  int64_t layers_per_block = 2;
  bool no_mid_attention = false;
  int64_t head_dim = 8;
  int64_t norm_groups = 32;
  int nproc = 0;  ///< --nproc: local processes to launch (0: none, this process trains)
};

void add_data_options(CLI::App* cmd, CommonOptions& c) {
  cmd->add_option("--data", c.data.source,
                  "fashion-mnist, fashion-mnist-brightness, synthetic-shapes, synthetic-brightness (shapes with a "
                  "per-image brightness from very dark to very bright), or a folder: MNIST-layout IDX files, or "
                  "images in one subfolder per class")
      ->capture_default_str();
  cmd->add_option("--data-limit", c.data.limit, "Use only the first N images (0: all)")->capture_default_str();
  cmd->add_option("--synthetic-count", c.data.synthetic_count, "Images of a generated data set")->capture_default_str();
  cmd->add_option("--data-seed", c.data.seed, "Seed of a generated data set")->capture_default_str();
  cmd->add_option("--fit", c.data.fit, "How images reach the model size: auto (pad IDX data with -1, resize image "
                                       "folders), pad or resize")
      ->capture_default_str();
  cmd->add_option("--size", c.data.size, "Model input size (images are size x size)")->capture_default_str();
  cmd->add_option("--image-channels", c.data.channels, "1 or 3; 0: the data's own")->capture_default_str();
  cmd->add_flag("--hflip", c.loop.hflip, "Random horizontal flips");
}

// The help group of the loop options: they apply to every trainer, a fine-tune (--model) included.
constexpr const char* kLoopGroup = "Run and optimisation";

// The run folder, the optimisation and the processes.
// An option whose value is one of an enum's names: parsed by `parse`, refused by CLI11 unless one of `names`, its
// default the field's to_string.
template <class Enum>
CLI::Option* add_enum_option(CLI::App* cmd, const std::string& flag, Enum& field, Enum (*parse)(const std::string&),
                             const std::vector<std::string>& names, const std::string& help) {
  return cmd->add_option_function<std::string>(flag, [&field, parse](const std::string& v) { field = parse(v); }, help)
      ->check(CLI::IsMember(names))
      ->default_str(to_string(field));
}

void add_loop_options(CLI::App* cmd, CommonOptions& c) {
  auto& l = c.loop;
  const auto first = cmd->get_options().size();
  cmd->add_option("--out", l.out, "Run folder (diffusers layout; refused if it exists, see --resume/--overwrite)")
      ->required();
  cmd->add_flag("--resume", l.resume, resume_help());
  cmd->add_flag("--overwrite", l.overwrite, "Delete an existing run folder in --out first");
  cmd->add_option("--steps", l.steps, "Optimizer steps in all")->capture_default_str();
  cmd->add_option("--batch", l.batch, "Images per step")->capture_default_str();
  cmd->add_option("--lr", l.lr, "Peak learning rate (AdamW)")->capture_default_str();
  cmd->add_option("--warmup", l.warmup, "Linear LR warmup steps")->capture_default_str();
  add_enum_option(cmd, "--lr-schedule", l.lr_schedule, parse_lr_schedule, {"cosine", "constant"},
                  "After warmup: cosine (down to --min-lr at the last step) or constant");
  cmd->add_option("--min-lr", l.min_lr, "Final learning rate of the cosine schedule")->capture_default_str();
  cmd->add_option("--weight-decay", l.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd->add_option("--grad-clip", l.grad_clip, "Clip the global gradient norm to this (0: off)")->capture_default_str();
  cmd->add_option("--ema-decay", l.ema_decay, "EMA decay; at step k it is min(decay, (1+k)/(10+k))")->capture_default_str();
  cmd->add_option("--seed", l.seed, "Seed of initialisation, batches, timesteps and noise")->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option_function<std::string>(
         "--device", [&l](const std::string& v) { l.device = parse_device(v); }, "cpu, cuda or cuda:N")
      ->default_str("cpu");
  cmd->add_flag("--bf16", l.bf16, "bf16 autocast of the forward pass (CUDA; on a CPU with LibTorch 2.x)");
  cmd->add_option("--cuda-graphs", l.cuda_graphs, "One process on a GPU: replay each step as a captured CUDA graph")
      ->capture_default_str();
  cmd->add_option_function<std::string>(
         "--conv-dtype", [&l](const std::string& v) { l.conv_dtype = network_dtype(v, "--conv-dtype"); },
         "fp32, or bf16 (fp16 on a GPU): convolutions computed in it from the float32 weights, everything else "
         "float32 (CPUs with AMX / AVX-512 BF16; not with --bf16)")
      ->default_str("fp32");
  cmd->add_flag("--channels-last", l.channels_last, "Convolutions in channels-last (NHWC) layout (GPU tensor cores); "
                "checkpoints are the same");
  cmd->add_option("--checkpoint-every", l.checkpoint_every, "Checkpoint every N steps (also at the end and on "
                                                            "Ctrl-C/SIGTERM)")
      ->capture_default_str();
  cmd->add_option("--log-every", l.log_every, "A log.csv row every N steps")->capture_default_str();
  cmd->add_option("--threads", l.threads, "CPU threads (0: LibTorch's default)")->capture_default_str();
  cmd->add_flag("--quiet", c.quiet, "No progress line");
  cmd->add_option("--nproc", c.nproc, "Train data-parallel in N local processes (127.0.0.1, a free port; --batch "
                                      "is the global batch and must divide by N). Under torchrun leave it out")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dist-timeout", l.dist_timeout, "Seconds a data-parallel rank waits for the others before it "
                                                    "stops with an error (a dead or hung rank)")
      ->capture_default_str();
  cmd->add_option("--accumulate", l.accumulate, "Gradient accumulation: each process's rows of a --batch go through "
                                                "the network in this many parts (less memory, the same step up to "
                                                "float rounding)")
      ->capture_default_str();
  auto options = cmd->get_options();
  for (size_t i = first; i < options.size(); ++i) const_cast<CLI::Option*>(options[i])->group(kLoopGroup);
}

// `noised`: the model sees noised images (a noise schedule) and has attention levels (not the autoencoder).
void add_network_options(CLI::App* cmd, CommonOptions& c, bool noised) {
  cmd->add_option("--channels", c.channels, "Channels per level (block_out_channels), comma-separated")
      ->capture_default_str();
  cmd->add_option("--layers-per-block", c.layers_per_block, "Resnet layers per level")->capture_default_str();
  cmd->add_flag("--no-mid-attention", c.no_mid_attention, "No attention in the mid block");
  cmd->add_option("--norm-groups", c.norm_groups, "GroupNorm groups")->capture_default_str();
  if (!noised) return;

  cmd->add_option("--schedule", c.schedule.name, "Noise schedule: linear, scaled_linear, cosine, cosine_noclip, sigmoid")
      ->capture_default_str();
  cmd->add_flag("--zero-snr", c.schedule.zero_snr, "Rescale to zero terminal SNR (Lin et al. 2023, Algorithm 1)");
  cmd->add_option("--T", c.schedule.T, "Training timesteps")->capture_default_str();
  cmd->add_option("--beta-start", c.schedule.beta_start, "First beta (default: the schedule's own)");
  cmd->add_option("--beta-end", c.schedule.beta_end, "Last beta (default: the schedule's own)");

  cmd->add_option("--attention-levels", c.attention_levels, "Levels (0-based, comma-separated) with self-attention, "
                                                            "or none")
      ->capture_default_str();
  cmd->add_option("--head-dim", c.head_dim, "Attention head dimension")->capture_default_str();
}

void add_common_options(CLI::App* cmd, CommonOptions& c, bool noised = true) {
  add_data_options(cmd, c);
  add_loop_options(cmd, c);
  add_network_options(cmd, c, noised);
}

std::vector<int64_t> parse_int_list(const std::string& text, const std::string& option) {
  std::vector<int64_t> out;
  if (text == "none" || text.empty()) return out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw std::invalid_argument(option + " '" + text + "': '" + item + "' is not an integer");
    }
  }
  return out;
}

UNetShape shape_of(const CommonOptions& c) {
  UNetShape s;
  s.channels = parse_int_list(c.channels, "--channels");
  s.attention_levels = parse_int_list(c.attention_levels, "--attention-levels");
  s.layers_per_block = c.layers_per_block;
  s.mid_attention = !c.no_mid_attention;
  s.attention_head_dim = c.head_dim;
  s.norm_groups = c.norm_groups;
  return s;
}

// With --resume only options that leave the weights alone may be given.
void check_resume_options(const CLI::App* cmd) {
  const auto allowed = flags_allowed_with_resume();
  for (const auto* opt : cmd->get_options()) {
    if (opt->count() == 0) continue;
    std::string name = opt->get_name();
    if (std::find(allowed.begin(), allowed.end(), name) == allowed.end())
      throw std::invalid_argument(name + " cannot be given with --resume: the run's options are in its run.json "
                                         "(start a new run to change them)");
  }
}

// The stored options with what this invocation may change (resumable_options), taken where its flag was given.
void apply_resumable(LoopOptions& stored, LoopOptions given, const CLI::App* cmd, bool quiet) {
  given.progress = !quiet;
  for (const auto& r : resumable_options())
    if (r.every_resume || cmd->get_option(r.flag)->count() > 0) r.take(stored, given);
}

nlohmann::json stored_options(const std::string& run) {
  const std::string path = RunFolder(run).run_json().string();
  if (!fs::exists(path))
    throw std::invalid_argument("cannot resume '" + run + "': no run.json there (not a diffuse run folder)");
  return load_json(path);
}

// This process's rank in a data-parallel run (0 when alone): only rank 0 reports.
int64_t this_rank() { return DistEnv::from_environment().rank; }

// --nproc N: checks what can be checked once, re-runs this command as N local ranks (launch_local) and waits.
// Returns false when this process is to train itself.
bool launched_ranks(const CommonOptions& c, const LoopOptions& loop) {
  if (c.nproc == 0) return false;
  if (DistEnv::from_environment().enabled())
    throw std::invalid_argument("--nproc " + std::to_string(c.nproc) + " given, but WORLD_SIZE is already set (" +
                                std::getenv("WORLD_SIZE") + "): let torchrun start the processes or pass --nproc, "
                                "not both");
  if (c.nproc == 1) return false;
  if (loop.batch % c.nproc != 0)
    throw std::invalid_argument("--batch " + std::to_string(loop.batch) + " is the global batch and must divide among " +
                                std::to_string(c.nproc) + " processes (--nproc); pass a multiple of " +
                                std::to_string(c.nproc));
  const torch::Device device = prepare_device(loop.device);  // names the fix for CUDA on a CPU-only build
  if (device.is_cuda()) {
    if (device.has_index())
      throw std::invalid_argument("--nproc " + std::to_string(c.nproc) + " with --device " + device.str() +
                                  ": pass --device cuda, rank r uses cuda:r");
    if (c.nproc > int(torch::cuda::device_count()))
      throw std::invalid_argument("--nproc " + std::to_string(c.nproc) + " processes but " +
                                  std::to_string(torch::cuda::device_count()) + " GPUs (one process per GPU)");
  }
  check_run_folder(loop);
  std::vector<std::string> args;
  const auto& all = program_arguments();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] == "--nproc") {
      ++i;  // and its value
      continue;
    }
    if (all[i].rfind("--nproc=", 0) == 0) continue;
    args.push_back(all[i]);
  }
  int code = launch_local(c.nproc, args);
  if (code != 0) throw Exit{code};  // the ranks (and the launcher) said why
  return true;
}

// Ends a rank other than 0 quietly when its error only echoes rank 0's, which reports it.
template <class F>
TrainResult quiet_unless_rank0(F&& run) {
  try {
    return run();
  } catch (const RankZeroFailed&) {
    if (this_rank() != 0) throw Exit{kExitError};
    throw;
  } catch (const NonFiniteLoss&) {
    if (this_rank() != 0) throw Exit{kExitError};
    throw;
  }
}

void print_data(const Dataset& d) {
  std::cerr << "data: " << d.name << ", " << d.size() << " images " << d.channels() << "x" << d.height() << "x"
            << d.width();
  if (d.num_classes) std::cerr << ", " << d.num_classes << " classes";
  std::cerr << "\n";
}

// Held-out images: the source's evaluation split, else a seeded split of the training data (at most a tenth).
Dataset take_heldout(const DataSpec& spec, Dataset& data, int64_t count, uint64_t seed) {
  Dataset heldout;
  if (has_heldout_split(spec)) {
    heldout = load_dataset(spec, true);
    if (heldout.size() > count) {
      heldout.images = heldout.images.narrow(0, 0, count);
      heldout.labels = heldout.labels.narrow(0, 0, count);
    }
  } else {
    std::tie(data, heldout) = split_dataset(data, std::min<int64_t>(count, data.size() / 10), seed);
  }
  return heldout;
}

void finish(const TrainResult& r, const std::string& what) {
  if (r.rank != 0) {
    if (r.interrupted) throw Exit{128 + r.signal};
    return;
  }
  if (r.interrupted) {
    std::cerr << "interrupted at step " << r.step << "; checkpoint in '" << r.run_dir
              << "'. Continue with: diffuse " << what << " --out " << r.run_dir << " --resume\n";
    throw Exit{128 + r.signal};
  }
  if (r.step == r.start_step) {
    std::cout << "'" << r.run_dir << "' is already at step " << r.step << " (raise --steps to train further)\n";
    return;
  }
  std::cout << "trained '" << r.run_dir << "' to step " << r.step << ": last loss " << r.last_loss << ", "
            << std::fixed << std::setprecision(1) << r.images_per_s << " images/s\n";
}

// Latent diffusion: the data set's latents through the (cached) autoencoder, reported on stderr.
Dataset to_latents(AutoencoderKL& vae, const Dataset& data, const std::string& source, const std::string& cache_dir) {
  const bool report = this_rank() == 0;  // every rank of a data-parallel run encodes (or reads the cache) itself
  if (report) print_data(data);
  auto cache = cached_latents(vae, data, cache_dir.empty() ? default_latent_cache_dir() : cache_dir, 256);
  const auto& z = cache.latents.images;
  if (report)
    std::cerr << "latents: " << c10::str(z.sizes()) << " from '" << source << "' (scaling_factor "
            << vae->config().scaling_factor << "), std " << z.std().item<double>() << ", mean " << z.mean().item<double>()
            << "; cache " << cache.event << ": " << cache.path << "\n";
  return cache.latents;
}

AutoencoderKL load_eval_vae(const std::string& folder, torch::Device device) {
  auto vae = load_vae(folder, prepare_device(device));
  vae->eval();
  return vae;
}

// A run's options: its run.json when resuming (only the resumable options of the command line apply), else
// `fresh` completed with the command line's data and loop options.
template <class Options>
Options run_options(const CLI::App* cmd, const CommonOptions& c, Options fresh) {
  if (c.loop.resume) {
    check_resume_options(cmd);
    Options o = Options::from_json(stored_options(c.loop.out));
    apply_resumable(o.loop, c.loop, cmd, c.quiet);
    return o;
  }
  fresh.data = c.data;
  fresh.loop = c.loop;
  fresh.loop.progress = !c.quiet;
  return fresh;
}

// Whether this process trains: false when it launched --nproc ranks, which trained. Rank 0 checks the BLAS
// and the run folder before any data is loaded.
bool begin_training(const CommonOptions& c, const LoopOptions& loop) {
  if (launched_ranks(c, loop)) return false;
  if (this_rank() == 0) {
    warn_if_slow_blas();
    if (loop.progress && !loop.bf16 && loop.conv_dtype == torch::kFloat32)
      suggest_bf16(loop.device.str(), "--bf16 (autocast) trains about 1.5x faster at the same FID");
    check_run_folder(loop);
  }
  return true;
}

struct TrainCli {
  CommonOptions common;
  TrainOptions train;
  TextTrainOptions text;  ///< --model: a Stable Diffusion fine-tune
  std::string prediction = "eps", loss_weight = "uniform", spacing = "trailing";
  bool unconditional = false;
  std::string vae, latent_cache;
  double dropout = 0.0;
  std::string time_scale_shift = "default";
};

// The help group of the options that belong to a fine-tune (--model); with --model only these, the loop group's,
// and kFineTuneShared may be given.
constexpr const char* kFineTuneGroup = "Fine-tuning a Stable Diffusion pipeline (--model)";
const std::vector<std::string> kFineTuneShared = {"--data", "--data-limit", "--hflip", "--prediction", "--zero-snr",
                                                  "--spacing", "--loss-weight", "--min-snr-gamma", "--offset-noise",
                                                  "--latent-cache", "--help"};

void check_fine_tune_flags(const CLI::App* cmd) {
  for (const auto* opt : cmd->get_options()) {
    if (opt->count() == 0 || opt->get_group() == kLoopGroup || opt->get_group() == kFineTuneGroup) continue;
    const std::string name = opt->get_name();
    if (std::find(kFineTuneShared.begin(), kFineTuneShared.end(), name) == kFineTuneShared.end())
      throw std::invalid_argument(name + " does not apply with --model: the pipeline fixes the network and its "
                                         "schedule (see diffuse train --help, \"" + kFineTuneGroup + "\")");
  }
  if (cmd->get_option("--data")->count() == 0)
    throw std::invalid_argument("--model needs --data: a folder of images with captions (same-named .txt files or "
                                "metadata.jsonl)");
}

// diffuse train --model PIPE: the fine-tune of text_train.h.
void run_text_train(const CLI::App* cmd, TrainCli& cli) {
  auto& c = cli.common;
  TextTrainOptions o;
  if (c.loop.resume) {
    check_resume_options(cmd);
    o = TextTrainOptions::from_json(stored_options(c.loop.out));
    apply_resumable(o.loop, c.loop, cmd, c.quiet);
  } else {
    check_fine_tune_flags(cmd);
    o = cli.text;
    o.data = c.data.source;
    o.captions.limit = c.data.limit;
    if (cmd->get_option("--prediction")->count()) o.prediction = parse_prediction(cli.prediction);
    o.zero_snr = c.schedule.zero_snr;
    o.spacing = parse_spacing(cli.spacing);
    o.loss_weight = parse_loss_weight(cli.loss_weight);
    o.min_snr_gamma = cli.train.min_snr_gamma;
    o.offset_noise = cli.train.offset_noise;
    o.loop = c.loop;
    o.loop.progress = !c.quiet;
  }
  if (!begin_training(c, o.loop)) return;
  const bool report = this_rank() == 0;
  auto data = prepare_text_training(o, cli.latent_cache.empty() ? default_latent_cache_dir() : cli.latent_cache,
                                    report ? &std::cerr : nullptr);
  if (report) {
    for (const auto& note : data.notes) std::cerr << "note: " << note << "\n";
    auto u = data.pipeline.text_unet;
    const auto& sc = data.scheduler;
    std::cerr << "model: UNet2DConditionModel " << parameter_count(*u) / 1e6 << "M parameters from '"
              << (o.loop.resume ? o.loop.out : o.model) << "' (text encoder and autoencoder frozen); "
              << to_string(sc.prediction_type) << " prediction, loss weight " << to_string(o.loss_weight)
              << (sc.rescale_betas_zero_snr ? ", zero terminal SNR" : "")
              << (o.offset_noise > 0 ? ", offset noise " + std::to_string(o.offset_noise) : "")
              << (o.caption_dropout > 0 ? ", caption dropout " + std::to_string(o.caption_dropout) : "")
              << (o.gradient_checkpointing ? ", gradient checkpointing" : "") << "; sampling spacing "
              << to_string(sc.timestep_spacing) << "\n";
  }
  finish(quiet_unless_rank0([&] { return train_text(o, data); }), "train");
}

// Whether this invocation fine-tunes a pipeline: --model, or --resume of such a run.
bool is_fine_tune(const TrainCli& cli) {
  if (!cli.text.model.empty()) return true;
  const auto& loop = cli.common.loop;
  if (!loop.resume || !fs::exists(RunFolder(loop.out).run_json())) return false;
  return TextTrainOptions::is_text_run(stored_options(loop.out));
}

void run_train(const CLI::App* cmd, TrainCli& cli) {
  if (is_fine_tune(cli)) return run_text_train(cmd, cli);
  auto& c = cli.common;
  TrainOptions fresh = cli.train;
  if (!c.loop.resume) {
    fresh.schedule = c.schedule;
    fresh.prediction = parse_prediction(cli.prediction);
    fresh.loss_weight = parse_loss_weight(cli.loss_weight);
    fresh.spacing = parse_spacing(cli.spacing);
  }
  TrainOptions o = run_options(cmd, c, fresh);
  if (!begin_training(c, o.loop)) return;
  const bool report = this_rank() == 0;
  AutoencoderKL vae{nullptr};
  if (c.loop.resume ? !o.vae.empty() : !cli.vae.empty()) {
    // Latent diffusion: a resumed run decodes and encodes with its own copy, RUN/vae.
    if (!c.loop.resume) o.vae = resolve_vae_folder(cli.vae);
    vae = load_eval_vae(c.loop.resume ? RunFolder(o.loop.out).network("vae").string() : o.vae, o.loop.device);
  }
  Dataset data = load_dataset(o.data);
  if (!vae.is_empty()) data = to_latents(vae, data, o.vae, cli.latent_cache);
  if (!c.loop.resume) {
    auto shape = shape_of(c);
    shape.dropout = cli.dropout;
    shape.time_scale_shift = cli.time_scale_shift;
    o.unet = make_unet_config(shape, data.height(), data.channels(), cli.unconditional ? 0 : data.num_classes);
  }
  if (report) {
    print_data(data);
    UNet2DModel probe(o.unet);
    std::cerr << "model: UNet2DModel " << parameter_count(*probe) / 1e6 << "M parameters, "
              << unet_forward_flops(o.unet, data.height(), data.width()) / 1e9 << " GFLOP per image forward, "
              << (o.unet.num_class_embeds ? "class-conditional (" + std::to_string(*o.unet.num_class_embeds) +
                                                " embeddings, null class " +
                                                std::to_string(*o.unet.num_class_embeds - 1) + ")"
                                          : std::string("unconditional"))
              << "; " << to_string(o.prediction) << " prediction, loss weight " << to_string(o.loss_weight)
              << (o.rectified_flow() ? ", rectified-flow path (shift " + std::to_string(o.flow_shift) + ", " +
                                           to_string(o.timestep_density) + " sigma)"
                                     : ", schedule " + o.schedule.name + (o.schedule.zero_snr ? " (zero terminal SNR)" : ""))
              << (o.etsdm.enabled() ? ", E-TSDM t~=" + std::to_string(o.etsdm.t_tilde) + " n=" + std::to_string(o.etsdm.n) : "")
              << "\n";
  }
  finish(quiet_unless_rank0([&] { return train(o, data, {}, vae); }), "train");
}

struct ClassifierCli {
  CommonOptions common;
  ClassifierTrainOptions train;
  std::string vae, latent_cache;
};

void run_train_classifier(const CLI::App* cmd, ClassifierCli& cli) {
  auto& c = cli.common;
  ClassifierTrainOptions fresh = cli.train;
  fresh.schedule = c.schedule;
  ClassifierTrainOptions o = run_options(cmd, c, fresh);
  if (!begin_training(c, o.loop)) return;
  const bool report = this_rank() == 0;
  Dataset data = load_dataset(o.data);
  Dataset heldout = take_heldout(o.data, data, o.heldout, o.loop.seed);
  if (c.loop.resume ? !o.vae.empty() : !cli.vae.empty()) {
    // A classifier for guiding a latent model sees the same latents as the UNet.
    if (!c.loop.resume) o.vae = resolve_vae_folder(cli.vae);
    auto vae = load_eval_vae(o.vae, o.loop.device);
    const auto fingerprint = vae_fingerprint(vae);
    if (c.loop.resume && fingerprint != o.vae_fingerprint)
      throw std::invalid_argument("the autoencoder '" + o.vae + "' changed since this classifier run started (fingerprint " +
                                  fingerprint + ", run.json has " + o.vae_fingerprint +
                                  "): its latents differ; start a new run");
    o.vae_fingerprint = fingerprint;
    data = to_latents(vae, data, o.vae, cli.latent_cache);
    heldout = to_latents(vae, heldout, o.vae, cli.latent_cache);
  }
  if (!c.loop.resume) o.classifier = make_classifier_config(shape_of(c), data.height(), data.channels(), data.num_classes);
  if (report) {
    print_data(data);
    NoisyClassifier probe(o.classifier);
    std::cerr << "model: noisy classifier, " << parameter_count(*probe) / 1e6 << "M parameters, "
              << o.classifier.num_classes << " classes; held out: " << heldout.size() << " images\n";
  }
  finish(quiet_unless_rank0([&] { return train_classifier(o, data, heldout, &std::cout); }), "train-classifier");
}

struct VaeCli {
  CommonOptions common;
  VaeTrainOptions train;
};

void run_train_vae(const CLI::App* cmd, VaeCli& cli) {
  auto& c = cli.common;
  VaeTrainOptions o = run_options(cmd, c, cli.train);
  if (!begin_training(c, o.loop)) return;
  const bool report = this_rank() == 0;
  Dataset data = load_dataset(o.data);
  Dataset heldout = take_heldout(o.data, data, o.heldout, o.loop.seed);
  if (!c.loop.resume) o.vae = make_vae_config(shape_of(c), o.data.size, data.channels(), o.vae);
  if (report) {
    print_data(data);
    AutoencoderKL probe(o.vae);
    const int64_t f = o.vae.downsample_factor(), side = o.data.size / f;
    std::cerr << "model: AutoencoderKL " << parameter_count(*probe) / 1e6 << "M parameters, latents "
              << o.vae.latent_channels << "x" << side << "x" << side << " (factor " << f << "); " << to_string(o.reconstruction)
              << " reconstruction + " << o.kl_weight << " x KL; held out: " << heldout.size() << " images\n";
  }
  finish(quiet_unless_rank0([&] { return train_vae(o, data, heldout, &std::cout); }), "train-vae");
}

void add_fine_tune_options(CLI::App* cmd, TextTrainOptions& t) {
  auto g = [&](CLI::Option* opt) { opt->group(kFineTuneGroup); };
  g(cmd->add_option("--model", t.model, "Fine-tune this Stable Diffusion 1.x / 2.x pipeline's UNet (a diffusers folder, "
                                        "a diffuse fine-tune run or a single-file .safetensors) on --data, a folder "
                                        "of images with captions; --prediction defaults to the pipeline's"));
  g(cmd->add_option("--resolution", t.captions.resolution, "Images: shorter side resized to this, centre cropped")
        ->capture_default_str());
  g(cmd->add_option("--crop", t.captions.crop, "center (random is refused: latents are cached per image)")
        ->capture_default_str());
  g(cmd->add_option("--alpha", t.captions.alpha, "Images with alpha: flatten (onto white, counted) or refuse")
        ->capture_default_str());
  g(cmd->add_option("--bad-files", t.captions.bad_files, "Unreadable images or missing captions: refuse (stop at the "
                                                         "first) or skip (counted, the first named)")
        ->capture_default_str());
  g(cmd->add_option("--caption-dropout", t.caption_dropout, "Probability of training on the empty caption (the "
                                                            "unconditional half of classifier-free guidance)")
        ->capture_default_str());
  g(cmd->add_flag("--gradient-checkpointing", t.gradient_checkpointing, "Recompute each UNet block in the backward pass "
                                                                        "instead of keeping its activations (less "
                                                                        "memory, about a third more time)"));
  g(cmd->add_option("--tokenizer", t.tokenizer, "Single-file --model: the tokenizer folder (vocab.json, merges.txt)"));
  g(cmd->add_flag("--v-prediction", t.source_v_prediction, "Single-file --model: it predicts v (SD 2.x 768-v)"));
  g(cmd->add_option("--single-file-config", t.single_file_config, "Single-file --model: a pipeline folder whose "
                                                                  "configs to use instead of the inferred ones"));
}

void add_diffusion_train_command(CLI::App& app) {
  auto cli = std::make_shared<TrainCli>();
  auto* cmd = app.add_subcommand("train", "Train a diffusion UNet (diffusers UNet2DModel) into a run folder");
  cmd->footer(
      "The run folder holds unet/ and unet_ema/ (config.json + diffusion_pytorch_model.safetensors), "
      "scheduler/scheduler_config.json, train_state/, run.json, log.csv (loss per step and per timestep decile) "
      "and loss.png. Ctrl-C or SIGTERM checkpoints and stops; --resume continues bit-exactly.\n"
      "Example: diffuse train --data fashion-mnist --out runs/fm --steps 20000 --prediction v --schedule linear "
      "--zero-snr --loss-weight min-snr\n"
      "Fine-tuning Stable Diffusion with Lin et al.'s recipe: diffuse train --model sd-2-1-base --data captions/ --out "
      "runs/sd --prediction v --zero-snr --spacing trailing --lr 1e-5 --lr-schedule constant --batch 8 --accumulate 4 "
      "--gradient-checkpointing (the run is a diffusers pipeline folder: diffuse sample --model runs/sd --prompt ...)");
  add_common_options(cmd, cli->common);
  auto& t = cli->train;
  cmd->add_option("--prediction", cli->prediction, "What the network predicts: eps, v or x0 (flow with --path rectified-flow)")
      ->capture_default_str();
  add_enum_option(cmd, "--path", t.path, parse_path_kind, {"vp", "rectified-flow"},
                  "Noise path: vp (the --schedule) or rectified-flow (x_t = (1 - sigma) x0 + sigma eps, --prediction "
                  "flow; sampled as FlowMatchEulerDiscreteScheduler)");
  cmd->add_option("--flow-shift", t.flow_shift, "Rectified flow: sigma -> shift sigma / (1 + (shift - 1) sigma) in training "
                                                "and sampling (SD3: 3)")
      ->capture_default_str();
  add_enum_option(cmd, "--timestep-density", t.timestep_density, parse_time_density, {"uniform", "logit-normal"},
                  "Rectified flow: density of sigma, uniform or logit-normal (SD3)");
  cmd->add_option("--logit-mean", t.logit_mean, "logit-normal density: mean")->capture_default_str();
  cmd->add_option("--logit-std", t.logit_std, "logit-normal density: standard deviation")->capture_default_str();
  cmd->add_option("--loss-weight", cli->loss_weight,
                  "Per-timestep loss weight, stated on the x0 error and converted to the target: uniform (plain MSE "
                  "on the target), eps (SNR), v (SNR+1), min-snr (min(SNR, gamma)), truncated (max(SNR, 1))")
      ->capture_default_str();
  cmd->add_option("--min-snr-gamma", t.min_snr_gamma, "gamma of --loss-weight min-snr")->capture_default_str();
  cmd->add_option("--etsdm-t-tilde", t.etsdm.t_tilde, "E-TSDM: share the timestep condition on [0, t~) (0: off; paper: 100)")
      ->capture_default_str();
  cmd->add_option("--etsdm-n", t.etsdm.n, "E-TSDM: number of intervals on [0, t~) (paper: 5)")->capture_default_str();
  cmd->add_option("--offset-noise", t.offset_noise, "Offset noise strength (baseline of Lin et al.; 0.1 typical; 0: off)")
      ->capture_default_str();
  cmd->add_option("--label-dropout", t.label_dropout, "Probability of replacing the label by the null class (for "
                                                      "classifier-free guidance)")
      ->capture_default_str();
  cmd->add_flag("--unconditional", cli->unconditional, "No class embedding even if the data has classes");
  cmd->add_option("--spacing", cli->spacing, "Default sampler timestep spacing stored in the scheduler config: "
                                             "leading, linspace or trailing")
      ->capture_default_str();
  cmd->add_option("--dropout", cli->dropout, "Dropout in the resnet blocks")->capture_default_str();
  cmd->add_option("--vae", cli->vae, "Latent diffusion: train on the scaled latents of this autoencoder (a train-vae run "
                                     "folder, whose EMA weights are used, or a diffusers AutoencoderKL folder); the run "
                                     "keeps a copy in vae/ and diffuse sample decodes through it");
  cmd->add_option("--latent-cache", cli->latent_cache, "Folder of cached latents (default $XDG_CACHE_HOME/diffuse/latents "
                                                       "or ~/.cache/diffuse/latents); recomputed when the autoencoder "
                                                       "changes");
  cmd->add_option("--time-scale-shift", cli->time_scale_shift, "How resnets take the time embedding: default or "
                                                               "scale_shift")
      ->capture_default_str();
  add_fine_tune_options(cmd, cli->text);
  cmd->callback([cmd, cli] { run_train(cmd, *cli); });
}

void add_classifier_train_command(CLI::App& app) {
  auto clf_cli = std::make_shared<ClassifierCli>();
  auto* common = &clf_cli->common;
  common->channels = "32,64,64";
  common->loop.lr = 3e-4;
  common->loop.steps = 3000;
  auto* base = &clf_cli->train;
  auto* clf = app.add_subcommand("train-classifier",
                                 "Train the noisy classifier p(y | x_t, t) of classifier guidance into a run folder");
  clf->footer(
      "Trains on x_t = a_t x0 + s_t eps at t ~ U{0..T-1} (use the diffusion model's --schedule and --zero-snr). "
      "The run folder holds classifier/ and classifier_ema/, scheduler/, train_state/, run.json, log.csv, loss.png and "
      "accuracy.csv: held-out accuracy per tenth of [0, T), also printed at the end.\n"
      "Example: diffuse train-classifier --data fashion-mnist --out runs/clf --steps 3000");
  add_common_options(clf, *common);
  clf->add_option("--heldout", base->heldout, "Held-out images for the accuracy table")->capture_default_str();
  clf->add_option("--vae", clf_cli->vae, "Latent diffusion: train on the latents of this autoencoder (as train --vae), "
                                         "to guide a latent model");
  clf->add_option("--latent-cache", clf_cli->latent_cache, "Folder of cached latents (as train)");
  clf->callback([clf, clf_cli] { run_train_classifier(clf, *clf_cli); });
}

void add_vae_train_command(CLI::App& app) {
  auto vae = std::make_shared<VaeCli>();
  vae->common.channels = "32,64,128";
  vae->common.layers_per_block = 1;
  vae->common.loop.steps = 5000;
  vae->common.loop.ema_decay = 0.999;
  auto* tv = app.add_subcommand("train-vae", "Train the KL autoencoder of latent diffusion (diffusers AutoencoderKL) "
                                             "into a run folder");
  tv->footer(
      "Loss per image: mean |x_hat - x| (or squared with --reconstruction l2) + kl-weight * KL(q(z|x) || N(0, I)) / "
      "pixels, z sampled from the posterior (LDM's kl_weight convention; no discriminator or perceptual loss). "
      "The run folder holds vae/ and vae_ema/ (diffusers folders; each checkpoint measures scaling_factor = 1 / std "
      "of the latents on --scale-images training images), train_state/, run.json, log.csv, loss.png and "
      "reconstruction.csv: held-out PSNR and the latent std before and after scaling, also printed at the end.\n"
      "Example: diffuse train-vae --data fashion-mnist --out runs/vae --steps 5000 --channels 32,64,128");
  add_common_options(tv, vae->common, false);
  auto& v = vae->train;
  tv->add_option("--latent-channels", v.vae.latent_channels, "Latent channels")->capture_default_str();
  add_enum_option(tv, "--reconstruction", v.reconstruction, parse_reconstruction, {"l1", "l2"}, "Reconstruction loss: l1 or l2");
  tv->add_option("--kl-weight", v.kl_weight, "Weight of the KL term (per pixel, as LDM's kl_weight)")
      ->capture_default_str();
  tv->add_option("--heldout", v.heldout, "Held-out images for the PSNR report")->capture_default_str();
  tv->add_option("--scale-images", v.scale_images, "Training images on which each checkpoint measures the latent "
                                                   "scaling factor")
      ->capture_default_str();
  tv->callback([tv, vae] { run_train_vae(tv, *vae); });
}

}  // namespace

void add_train_command(CLI::App& app) {
  add_diffusion_train_command(app);
  add_classifier_train_command(app);
  add_vae_train_command(app);
}

}  // namespace diffuse::cli
