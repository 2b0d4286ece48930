// A training step on the device and its read-back (src/train/train_step.h).
#include "train/train_step.h"

#include <cmath>
#include <limits>

#include "diffuse/models/blocks.h"
#include "diffuse/util/runtime.h"
#include "util/cuda_graph.h"
#include "train/optimizer_step.h"
#include "util/torch_compat.h"

namespace diffuse::detail {

namespace {

// Per-example losses and timesteps [k, shard] of k steps, widened to the global batch's rows [k, global] from
// every rank's (for the log).
std::pair<torch::Tensor, torch::Tensor> gather_rows(Distributed& dist, const Shard& shard, const torch::Tensor& per_example,
                                                    const torch::Tensor& t) {
  const int64_t k = per_example.size(0);
  auto all = torch::zeros({2, k, shard.global}, torch::TensorOptions().dtype(torch::kFloat64).device(dist.collective_device()));
  all[0].narrow(1, shard.begin, shard.size).copy_(per_example);
  all[1].narrow(1, shard.begin, shard.size).copy_(t);
  std::vector<torch::Tensor> v = {all};
  dist.all_reduce_sum(v);
  return {all[0].to(torch::kFloat32), all[1].to(torch::kInt64)};
}

}  // namespace

at::Generator step_generator(torch::Device device, uint64_t seed) {
  if (device.is_cpu()) return cpu_generator(seed);
  auto g = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_current_seed(seed);
  return g;
}

// ---------------------------------------------------------------- the batches

StepBatches::StepBatches(const Dataset& data, BatchSampler& sampler, torch::Device device, int64_t batch)
    : data_(data), sampler_(sampler), device_(device) {
  resident_ = !device.is_cpu() && data.images.numel() * int64_t(data.images.element_size()) <= kResidentBytes;
  if (!resident_) return;
  data_.images = data.images.to(device);
  data_.labels = data.labels.to(device);
  indices_ = torch::zeros({batch}, torch::TensorOptions(torch::kInt64).device(device));
}

void StepBatches::stage(int64_t step) {
  step_ = step;
  if (!resident_) return;
  const int64_t per_epoch = sampler_.steps_per_epoch(), epoch = step / per_epoch;
  if (epoch != epoch_) {
    order_ = sampler_.permutation(epoch).to(device_);
    epoch_ = epoch;
  }
  indices_.copy_(order_.narrow(0, (step % per_epoch) * indices_.size(0), indices_.size(0)));
}

Batch StepBatches::gather(const LoopOptions& o, at::Generator& gen) {
  if (!resident_) return make_batch(data_, sampler_.indices(step_), o.hflip, mix_seed(o.seed, uint64_t(step_), 1), device_);
  return make_batch(data_, indices_, o.hflip, gen, device_);
}

// ---------------------------------------------------------------- the step

StepRunner::StepRunner(Session& s, Task& task, const LoopOptions& o, const Dataset& data, BatchSampler& sampler,
                       GradientAverager& averager, std::vector<torch::Tensor> params)
    : s_(s), task_(task), o_(o), averager_(averager), params_(std::move(params)),
      batches_(data, sampler, s.device, o.batch), gen_(step_generator(s.device, o.seed)) {
  if (o.cuda_graphs && o.accumulate == 1 && s.device.is_cuda() && !s.dist->enabled() && batches_.resident() &&
      GraphedWork::available())
    graph_ = std::make_unique<GraphedWork>(s.device, kGraphWarmup, [this] { last_ = loss_and_gradients(); });
}

StepRunner::~StepRunner() = default;

StepOutcome StepRunner::step(int64_t step) {
  StepOutcome r;
  r.step = step + 1;
  r.lr = lr_at(o_, step);
  batches_.stage(step);
  gen_ = step_generator(s_.device, mix_seed(o_.seed, uint64_t(step), 2));
  if (graph_) {
    graph_->run();  // the graph's outputs are overwritten by the next replay: keep copies
    r.per_example = last_.per_example.clone();
    r.t = last_.t.clone();
    r.grad_norm = last_.grad_norm.clone();
  } else {
    auto g = loss_and_gradients();
    r.per_example = g.per_example;
    r.t = g.t;
    r.grad_norm = g.grad_norm;
  }
  adamw_step(*s_.optimizer, r.lr);
  update_ema(task_.ema(), task_.model(), o_.ema_decay, step);
  return r;
}

StepRunner::Gradients StepRunner::loss_and_gradients() {
  auto batch = batches_.gather(o_, gen_);
  compat::zero_grads(params_);  // in place: a graph's gradients stay where it captured them
  // Each part draws the whole batch's numbers from the step generator's state (a copy per part) and keeps its rows.
  const int64_t parts = o_.accumulate, part_size = s_.shard.size / parts;
  std::vector<torch::Tensor> per_example, ts;
  for (int64_t p = 0; p < parts; ++p) {
    const Shard part{s_.shard.begin + p * part_size, part_size, s_.shard.global};
    Batch rows{part.rows(batch.images), part.rows(batch.labels)};
    at::Generator gen = parts == 1 ? gen_ : gen_.clone();
    torch::Tensor loss_rows, t;
    {
      Bf16Autocast autocast(s_.device, o_.bf16);
      ConvolutionDtype conv_dtype(s_.conv_dtype);
      std::tie(loss_rows, t) = task_.loss(rows, part, gen);
    }
    // The mean over the shard (parts of equal size): the mean over ranks of its gradient is the global batch's.
    (parts == 1 ? loss_rows.mean() : loss_rows.sum() / double(s_.shard.size)).backward();
    per_example.push_back(loss_rows.detach());
    ts.push_back(t);
  }
  averager_.finish();
  Gradients g;
  g.per_example = parts == 1 ? per_example[0] : torch::cat(per_example);
  g.t = parts == 1 ? ts[0] : torch::cat(ts);
  g.grad_norm = clip_gradients(params_, o_.grad_clip > 0 ? o_.grad_clip : std::numeric_limits<double>::infinity());
  return g;
}

// ---------------------------------------------------------------- reading back

PendingSteps::PendingSteps(Session& s, LossLog& log, const LoopOptions& o, NonFinite nonfinite)
    : s_(s), log_(log), o_(o), nonfinite_(std::move(nonfinite)), since_(std::chrono::steady_clock::now()) {}

void PendingSteps::read_back() {
  if (pending_.empty()) return;
  const int64_t k = int64_t(pending_.size());
  std::vector<torch::Tensor> norms, rows, ts;
  for (const auto& p : pending_) {
    norms.push_back(p.grad_norm.to(torch::kFloat64).reshape({1}));
    rows.push_back(p.per_example.to(torch::kFloat32));
    ts.push_back(p.t.to(rows.back().device()));
  }
  auto per_example = torch::stack(rows), t = torch::stack(ts);
  if (s_.dist->enabled()) std::tie(per_example, t) = gather_rows(*s_.dist, s_.shard, per_example, t);
  auto numbers = torch::cat({per_example.mean(1).to(torch::kFloat64), torch::cat(norms).to(per_example.device())}).cpu();
  per_example = per_example.cpu();
  t = t.cpu();
  const double* v = numbers.data_ptr<double>();
  for (int64_t i = 0; i < k; ++i) {
    const int64_t step = pending_[size_t(i)].step;
    if (!std::isfinite(v[i])) nonfinite_(step, "the loss is " + std::to_string(v[i]));
    if (!std::isfinite(v[k + i])) nonfinite_(step, "the gradient norm is " + std::to_string(v[k + i]));
    if (!s_.main) continue;
    log_.add(v[i], per_example[i], t[i], v[k + i], o_.batch);
    if (log_.due(step) || step == o_.steps) log_.write(step, pending_[size_t(i)].lr);
  }
  last_loss_ = v[k - 1];
  auto now = std::chrono::steady_clock::now();
  rate_ = double(k * o_.batch) / std::max(1e-9, std::chrono::duration<double>(now - since_).count());
  since_ = now;
  pending_.clear();
}

}  // namespace diffuse::detail
