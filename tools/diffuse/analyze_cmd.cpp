// diffuse analyze brightness|loss|lipschitz: CSV + PNG of the analyses in diffuse/eval/analysis.h.
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "diffuse/io/files.h"
#include "diffuse/eval/analysis.h"
#include "diffuse/data/data.h"
#include "diffuse/eval/features.h"
#include "diffuse/sample/pipeline.h"
#include "diffuse/io/plot.h"
#include "diffuse/util/runtime.h"
#include "diffuse/train/train.h"
#include "diffuse/models/unet.h"
#include "diffuse/models/vae.h"
#include <torch/torch.h>

namespace fs = std::filesystem;

namespace diffuse::cli {
namespace {

std::string fmt(double v) {
  std::ostringstream s;
  s << std::setprecision(8) << v;
  return s.str();
}

// ---------------------------------------------------------------- brightness

struct BrightnessCli {
  std::string samples, data = "fashion-mnist:test", out;
  int64_t bins = 40, limit = 0;
};

void run_brightness(const BrightnessCli& o) {
  auto set = load_sample_set(o.samples);
  DataSpec spec;
  spec.source = o.data;
  spec.size = set.images.size(2);
  spec.channels = set.images.size(1);
  spec.limit = o.limit;
  auto data = load_dataset(spec);
  auto r = compare_brightness(data.images, set.images, o.bins);
  // Default: an analysis/ folder beside the images, not among them (a PNG plot there would join the samples).
  fs::path out = o.out.empty() ? fs::path(samples_folder(o.samples)) / "analysis" : fs::path(o.out);
  fs::create_directories(out);

  std::ostringstream csv;
  csv << "bin_lo,bin_hi,data_density,sample_density\n";
  for (size_t i = 0; i + 1 < r.bin_edges.size(); ++i)
    csv << fmt(r.bin_edges[i]) << "," << fmt(r.bin_edges[i + 1]) << "," << fmt(r.data_density[i]) << ","
        << fmt(r.sample_density[i]) << "\n";
  write_file_atomic((out / "brightness.csv").string(), csv.str());
  nlohmann::json j = {{"samples", o.samples},           {"data", data.name},
                      {"data_count", r.data_count},     {"sample_count", r.sample_count},
                      {"data_mean", r.data_mean},       {"sample_mean", r.sample_mean},
                      {"data_std", r.data_std},         {"sample_std", r.sample_std},
                      {"w1", r.w1},                     {"data_p10", r.data_p10},
                      {"data_p90", r.data_p90},         {"share_below_data_p10", r.share.darkest},
                      {"share_above_data_p90", r.share.brightest}};
  write_file_atomic((out / "brightness.json").string(), j.dump(2) + "\n");

  // Histograms drawn as steps: both ends of each bin at its density.
  Panel p{"per-image mean brightness (W1 " + fmt(r.w1).substr(0, 6) + ")", "mean brightness", "density", false, {}};
  auto steps = [&](const std::string& name, const std::vector<double>& d) {
    Series s{name, {}, {}};
    for (size_t i = 0; i < d.size(); ++i) {
      s.x.insert(s.x.end(), {r.bin_edges[i], r.bin_edges[i + 1]});
      s.y.insert(s.y.end(), {d[i], d[i]});
    }
    return s;
  };
  p.series = {steps("data (" + data.name + ")", r.data_density), steps("samples", r.sample_density)};
  plot_png((out / "brightness.png").string(), {p});

  std::cout << std::fixed << std::setprecision(4) << "brightness of " << r.sample_count << " samples against "
            << r.data_count << " images of " << data.name << ":\n"
            << "  mean brightness   data " << r.data_mean << "   samples " << r.sample_mean << "\n"
            << "  std               data " << r.data_std << "   samples " << r.sample_std << "\n"
            << "  W1                " << r.w1 << "\n"
            << "  below data's 10% quantile (" << r.data_p10 << "): " << r.share.darkest << " of samples (0.1 ideal)\n"
            << "  above data's 90% quantile (" << r.data_p90 << "): " << r.share.brightest << " of samples (0.1 ideal)\n"
            << "wrote " << (out / "brightness.csv").string() << ", brightness.json, brightness.png\n";
}

// ---------------------------------------------------------------- loaded models (loss, lipschitz)

struct ModelCli {
  std::string model, scheduler, weights = "auto", data, out, device = "cpu";
  int64_t n = 64, batch = 64, class_id = -1;
  uint64_t seed = 0;
};

struct LoadedModel {
  UNet2DModel unet{nullptr};
  SchedulerConfig config;
  Network net;
  torch::Tensor x0, labels;
  std::string data_name;
};

// The model as sampling loads it, and `n` held-out images of its data (the run's run.json, or --data). For a
// latent diffusion run (it has vae/), the images are encoded through that autoencoder exactly as training
// encoded them (one posterior draw times the scaling factor), so the analyses run in the model's own space.
LoadedModel load_model(const ModelCli& o) {
  auto device = parse_device(o.device);
  if (o.n < 1) throw std::invalid_argument("--n must be >= 1, got " + std::to_string(o.n));
  LoadedModel m;
  LoadOptions lo;
  lo.weights = o.weights;
  lo.scheduler_file = o.scheduler;
  lo.device = device;
  auto run = load_run(o.model, lo);  // a latent run's vae/ too: the analyses run in the model's own space
  m.unet = run.unet;
  m.config = run.scheduler;
  const auto& uc = m.unet->config();
  AutoencoderKL vae = run.vae;
  DataSpec spec;
  bool from_run = false;
  if (!o.data.empty()) {
    spec.source = o.data;
  } else if (const auto run_json = ModelFolder(o.model).run_json(); fs::exists(run_json)) {
    spec = TrainOptions::from_json(load_json(run_json.string())).data;
    from_run = true;
  } else {
    throw std::invalid_argument("'" + o.model + "' has no run.json naming its data: pass --data SOURCE");
  }
  spec.size = vae ? vae->config().sample_size : uc.sample_size.value_or(32);
  spec.channels = vae ? vae->config().in_channels : uc.in_channels;
  spec.limit = 0;
  bool heldout = has_heldout_split(spec);
  auto data = load_dataset(spec, heldout);
  if (!heldout) data = split_dataset(data, std::min<int64_t>(o.n, data.size() - 1), o.seed).second;
  int64_t n = std::min(o.n, data.size());
  m.data_name = data.name + (heldout ? " (held-out split)" : " (seeded subset)") + (from_run ? ", from run.json" : "");
  if (vae) {
    Dataset first = data;
    first.images = data.images.slice(0, 0, n);
    first.labels = data.labels.slice(0, 0, n);
    data = encode_dataset(vae, first, o.batch);
    m.data_name += ", encoded by the run's vae/";
  }
  m.x0 = data.images.slice(0, 0, n).to(device);
  int64_t embeds = uc.num_class_embeds.value_or(0);
  if (embeds > 0) {
    if (o.class_id >= embeds)
      throw std::invalid_argument("--class " + std::to_string(o.class_id) + " but the model has " + std::to_string(embeds) + " class embeddings");
    m.labels = o.class_id >= 0 ? torch::full({n}, o.class_id, torch::kLong)
               : data.num_classes > 0 ? data.labels.slice(0, 0, n).clone()
                                      : torch::full({n}, embeds - 1, torch::kLong);  // the null class
    m.labels = m.labels.to(device);
  }
  m.net = run.network();
  return m;
}

fs::path out_folder(const ModelCli& o) {
  fs::path out = o.out.empty() ? fs::path(o.model) / "analysis" : fs::path(o.out);
  fs::create_directories(out);
  return out;
}

// ---------------------------------------------------------------- loss

// What t means on a rectified-flow path (nothing to add on a discrete schedule).
std::string path_note(const NoisePath& path) {
  return path.is_vp() ? "" : " (rectified flow: t at sigma = (t + 1) / " + std::to_string(path.T()) + ")";
}

struct LossCli {
  ModelCli model;
  int64_t points = 50;
};

void run_loss(const LossCli& o) {
  warn_if_slow_blas();
  auto m = load_model(o.model);
  const auto path = NoisePath::of(m.config);
  auto ts = loss_timestep_grid(path.T(), o.points);
  std::cerr << "loss at " << ts.size() << " timesteps on " << m.x0.size(0) << " images of " << m.data_name
            << path_note(path) << "\n";
  auto rows = loss_per_timestep(m.net, m.config.prediction_type, path, m.config.etsdm, m.x0, m.labels, ts,
                                {o.model.batch, o.model.seed});
  auto out = out_folder(o.model);
  std::ostringstream csv;
  csv << "t,condition,snr,loss_own,loss_eps,loss_v,loss_x0,ratio_v_eps_measured,ratio_v_eps_predicted\n";
  Series le{"eps", {}, {}}, lv{"v", {}, {}}, lx{"x0", {}, {}}, rm{"measured L_v / L_eps", {}, {}},
      rp{path.is_vp() ? "(SNR+1)/SNR" : "(a^2+s^2)^2/a^2", {}, {}};
  double max_rel = 0;
  for (const auto& r : rows) {
    csv << r.t << "," << fmt(r.condition) << "," << fmt(r.snr) << "," << fmt(r.loss_own) << "," << fmt(r.loss_eps) << ","
        << fmt(r.loss_v) << "," << fmt(r.loss_x0) << "," << fmt(r.ratio_measured) << "," << fmt(r.ratio_predicted) << "\n";
    double t = double(r.t);
    le.x.push_back(t), le.y.push_back(r.loss_eps);
    lv.x.push_back(t), lv.y.push_back(r.loss_v);
    lx.x.push_back(t), lx.y.push_back(r.loss_x0);
    rm.x.push_back(t), rm.y.push_back(r.ratio_measured);
    rp.x.push_back(t), rp.y.push_back(r.ratio_predicted);
    if (std::isfinite(r.ratio_measured) && std::isfinite(r.ratio_predicted))
      max_rel = std::max(max_rel, std::abs(r.ratio_measured / r.ratio_predicted - 1));
  }
  write_file_atomic((out / "loss_per_t.csv").string(), csv.str());
  auto own = to_string(m.config.prediction_type);
  plot_png((out / "loss_per_t.png").string(),
           {Panel{"loss per timestep (model predicts " + own + ")", "t", "mean squared error", true, {le, lv, lx}},
            Panel{"v / eps loss ratio", "t", "ratio", true, {rm, rp}}},
           1100);
  std::cout << "loss per timestep of a " << own << " model (" << rows.size() << " timesteps, " << m.x0.size(0)
            << " images):\n  t      SNR          L_" << own << "        L_eps        L_v          L_x0\n";
  for (size_t i = 0; i < rows.size(); i += std::max<size_t>(1, rows.size() / 10)) {
    const auto& r = rows[i];
    std::cout << "  " << std::setw(5) << r.t << "  " << std::scientific << std::setprecision(4) << r.snr << "  "
              << r.loss_own << "  " << r.loss_eps << "  " << r.loss_v << "  " << r.loss_x0 << std::defaultfloat << "\n";
  }
  std::cout << "largest relative gap between measured L_v/L_eps and " << rp.name << ": " << std::scientific
            << std::setprecision(2) << max_rel << std::defaultfloat << "\nwrote " << (out / "loss_per_t.csv").string()
            << " and loss_per_t.png\n";
}

// ---------------------------------------------------------------- lipschitz

struct LipschitzCli {
  ModelCli model;
  int64_t dt = 2, dense_until = 100, stride = 50;
};

void run_lipschitz(const LipschitzCli& o) {
  warn_if_slow_blas();
  auto m = load_model(o.model);
  const auto path = NoisePath::of(m.config);
  auto pairs = lipschitz_grid(path.T(), o.dt, o.dense_until, o.stride);
  std::cerr << "K(t, t + " << o.dt << ") at " << pairs.size() << " timesteps on " << m.x0.size(0) << " images of "
            << m.data_name << (m.config.etsdm.enabled() ? " (E-TSDM condition map applied)" : "") << path_note(path)
            << "\n";
  auto rows = lipschitz_per_timestep(m.net, m.config.prediction_type, path, m.config.etsdm, m.x0, m.labels, pairs,
                                     {o.model.batch, o.model.seed});
  auto out = out_folder(o.model);
  std::ostringstream csv;
  csv << "t,t2,condition,condition2,K\n";
  Series k{"K(t, t + " + std::to_string(o.dt) + ")", {}, {}};
  for (const auto& r : rows) {
    csv << r.t << "," << r.t2 << "," << fmt(r.condition) << "," << fmt(r.condition2) << "," << fmt(r.K) << "\n";
    k.x.push_back(double(r.t));
    k.y.push_back(r.K);
  }
  write_file_atomic((out / "lipschitz.csv").string(), csv.str());
  Series near = k;
  near.name = "t < " + std::to_string(o.dense_until);
  while (!near.x.empty() && near.x.back() >= double(o.dense_until)) near.x.pop_back(), near.y.pop_back();
  std::vector<Panel> panels = {Panel{"Lipschitz constant of eps in t", "t", "K", true, {k}}};
  if (near.x.size() >= 2) panels.push_back(Panel{"near t = 0", "t", "K", false, {near}});  // --dense-until 0: none
  plot_png((out / "lipschitz.png").string(), panels, 1100);
  std::cout << "K(t, t') = E||eps(x_t, t) - eps(x_t, t')|| / |t - t'|" << (m.config.etsdm.enabled() ? " (E-TSDM)" : "")
            << ":\n";
  for (size_t i = 0; i < rows.size(); i += std::max<size_t>(1, rows.size() / 12))
    std::cout << "  t " << std::setw(4) << rows[i].t << "  K " << fmt(rows[i].K) << "\n";
  std::cout << "wrote " << (out / "lipschitz.csv").string() << " and lipschitz.png\n";
}

void add_model_options(CLI::App* cmd, ModelCli& o, int64_t default_n) {
  o.n = default_n;
  cmd->add_option("--model", o.model, "Run folder (unet_ema/ or unet/ + scheduler/) or a diffusers UNet2DModel folder")->required();
  cmd->add_option("--scheduler", o.scheduler, "scheduler_config.json (default: found beside the model)");
  cmd->add_option("--weights", o.weights, "auto (EMA when present), ema or raw")->capture_default_str();
  cmd->add_option("--data", o.data, "Images to noise (default: the held-out split of the run's data, from run.json)");
  cmd->add_option("--n", o.n, "Images (fixed: the first n of the held-out split)")->capture_default_str();
  cmd->add_option("--class", o.class_id, "Class label for a conditional model (default: each image's own label)");
  cmd->add_option("--batch", o.batch, "Images per forward pass")->capture_default_str();
  cmd->add_option("--seed", o.seed, "Seed of the noise (image i's noise is the same at every t)")->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option("--out", o.out, "Output folder (default: MODEL/analysis)");
  cmd->add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
}

}  // namespace

void add_analyze_command(CLI::App& app) {
  auto* an = app.add_subcommand("analyze", "Analyses: brightness of samples vs data, loss per timestep, Lipschitz K(t)");
  an->require_subcommand(1);

  auto b = std::make_shared<BrightnessCli>();
  auto* br = an->add_subcommand("brightness", "Per-image mean brightness of samples against data: histograms, W1, "
                                              "extreme-decile shares");
  br->add_option("--samples", b->samples, "A folder of PNGs or a safetensors file (diffuse sample)")->required();
  br->add_option("--data", b->data, "Data source (fashion-mnist[:test], fashion-mnist-brightness[:test], "
                                    "synthetic-brightness, a folder)")->capture_default_str();
  br->add_option("--limit", b->limit, "Use only the first N data images (0: all)")->capture_default_str();
  br->add_option("--bins", b->bins, "Histogram bins over [-1, 1]")->capture_default_str();
  br->add_option("--out", b->out, "Output folder (default: analysis/ in the samples' folder)");
  br->callback([b] { run_brightness(*b); });

  auto l = std::make_shared<LossCli>();
  auto* lo = an->add_subcommand("loss", "Loss per timestep in the model's own target and converted to eps, v, x0, "
                                        "with (SNR+1)/SNR beside the measured v/eps ratio");
  add_model_options(lo, l->model, 64);
  lo->add_option("--points", l->points, "Timesteps (denser near 0 and T-1)")->capture_default_str();
  lo->callback([l] { run_loss(*l); });

  auto k = std::make_shared<LipschitzCli>();
  auto* li = an->add_subcommand("lipschitz", "K(t, t + dt) = E||eps(x_t, t) - eps(x_t, t + dt)|| / dt, tiled below "
                                             "--dense-until, every --stride above");
  add_model_options(li, k->model, 16);
  li->add_option("--dt", k->dt, "t' - t")->capture_default_str();
  li->add_option("--dense-until", k->dense_until, "Pairs tile [0, this) with step dt")->capture_default_str();
  li->add_option("--stride", k->stride, "Spacing of the pairs above --dense-until")->capture_default_str();
  li->callback([k] { run_lipschitz(*k); });
}

}  // namespace diffuse::cli
