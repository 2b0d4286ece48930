// The noisy-classifier task (classifier guidance: Dhariwal & Nichol 2021): cross-entropy of the class at x_t of the
// diffusion model's variance-preserving path, and the public entry point train_classifier().
#include <filesystem>

#include "diffuse/eval/heldout.h"
#include "diffuse/train/train.h"
#include "diffuse/util/runtime.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace {

using detail::copy_weights;
using detail::drawn_on;
using detail::Shard;
using detail::Task;

class ClassifierTask : public Task {
 public:
  ClassifierTask(const ClassifierTrainOptions& o, const Dataset& data)
      : o_(o),
        scheduler_(make_scheduler_config(o.schedule, Prediction::v, Spacing::trailing, {})),
        path_(scheduler_.schedule()) {
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
  int64_t T() const override { return path_.T(); }
  NoisyClassifier& ema_model() { return ema_; }
  NoisyClassifier& raw_model() { return model_; }
  const Schedule& schedule() const { return path_.schedule(); }

  std::pair<torch::Tensor, torch::Tensor> loss(const Batch& batch, const Shard& shard, at::Generator& gen) override {
    const auto& x0 = batch.images;
    const auto p = path_.points(shard.rows(path_.draw(shard.global, gen)));
    auto eps = shard.rows(torch::randn(shard.global_shape(x0.sizes()), gen, drawn_on(gen, torch::kFloat32))).to(device_);
    auto logits = model_->forward(add_noise(x0, eps, p.a, p.s), p.time.to(torch::kFloat32)).to(torch::kFloat32);
    return {torch::nn::functional::cross_entropy(
                logits, batch.labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone)),
            p.timestep};
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
    path_ = path_.to(device);
  }
  ClassifierTrainOptions o_;
  SchedulerConfig scheduler_;
  NoisePath path_;
  torch::Device device_ = torch::kCPU;
  NoisyClassifier model_{nullptr}, ema_{nullptr};
};

}  // namespace

TrainResult train_classifier(const ClassifierTrainOptions& options, const Dataset& data, const Dataset& heldout,
                             std::ostream* report, const TrainHooks& hooks) {
  ClassifierTask task(options, data);
  auto result = detail::run_loop(task, options.loop, options.to_json(), data, hooks);
  if (result.rank == 0 && heldout.images.defined() && heldout.size() > 0)
    report_classifier_accuracy(task.raw_model(), task.ema_model(), task.schedule(), heldout, options.loop.seed,
                               prepare_device(options.loop.device), {options.loop.out, result.step, report});
  return result;
}

}  // namespace diffuse
