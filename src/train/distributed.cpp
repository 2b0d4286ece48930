#include "diffuse/train/distributed.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <thread>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include "util/torch_compat.h"
#ifdef DIFFUSE_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef DIFFUSE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace diffuse {
namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  if (*end != '\0') throw std::invalid_argument(std::string("environment variable ") + name + "='" + v +
                                                "' is not an integer");
  return x;
}

}  // namespace

DistEnv DistEnv::from_environment() {
  DistEnv e;
  e.world_size = env_int("WORLD_SIZE", 1);
  e.rank = env_int("RANK", 0);
  e.local_rank = env_int("LOCAL_RANK", e.rank);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  e.master_port = int(env_int("MASTER_PORT", 29500));
  if (e.world_size < 1) throw std::invalid_argument("WORLD_SIZE must be >= 1, got " + std::to_string(e.world_size));
  if (e.rank < 0 || e.rank >= e.world_size)
    throw std::invalid_argument("RANK=" + std::to_string(e.rank) + " must lie in [0, WORLD_SIZE=" +
                                std::to_string(e.world_size) + ")");
  if (e.master_port <= 0 || e.master_port > 65535)
    throw std::invalid_argument("MASTER_PORT=" + std::to_string(e.master_port) + " is not a TCP port");
  return e;
}

Distributed::Distributed(const DistEnv& env, torch::Device device, std::chrono::milliseconds timeout)
    : env_(env), device_(device), timeout_(timeout) {
  if (!enabled()) return;
  // torchrun's agent may host the store itself (TORCHELASTIC_USE_AGENT_STORE=True): then every rank is a
  // client, as in torch.distributed's env:// rendezvous.
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  const bool agent_store = agent && std::string(agent) == "True";
  const char* restart = std::getenv("TORCHELASTIC_RESTART_COUNT");
  c10d::TCPStoreOptions opts;
  opts.port = uint16_t(env.master_port);
  opts.isServer = env.rank == 0 && !agent_store;
  opts.numWorkers = size_t(env.world_size);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  try {
    store_ = compat::make_tcp_store(env.master_addr, opts);
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(env.rank) + ": rendezvous at " + env.master_addr + ":" +
                             std::to_string(env.master_port) + " failed (" + e.what() +
                             "); check MASTER_ADDR/MASTER_PORT and that every rank was started");
  }
  // A restarted attempt must not read the keys of the previous one.
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
      std::string("diffuse/attempt_") + (restart && *restart ? restart : "0"), store_);
  if (device.is_cuda()) {
#ifdef DIFFUSE_WITH_NCCL
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = timeout;
    group_ = compat::process_group(
        c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, int(env.rank), int(env.world_size), o), prefixed,
        int(env.rank), int(env.world_size), c10::DeviceType::CUDA);
    return;
#else
    throw std::invalid_argument("this LibTorch was built without NCCL: multi-process CUDA training is unavailable "
                                "(build against a CUDA LibTorch with NCCL, see docs/distributed.md)");
#endif
  }
#ifdef DIFFUSE_WITH_GLOO
  auto o = c10d::ProcessGroupGloo::Options::create(timeout);
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (env.master_addr == "127.0.0.1" || env.master_addr == "localhost")
    o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  o->threads = 2;
  group_ = compat::process_group(
      c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, int(env.rank), int(env.world_size), o), prefixed,
      int(env.rank), int(env.world_size), c10::DeviceType::CPU);
#else
  throw std::invalid_argument("diffuse was built without Gloo: multi-process CPU training is unavailable "
                              "(install libgloo-dev and rebuild)");
#endif
}

Distributed::~Distributed() = default;

std::string Distributed::backend() const { return group_ ? group_->getBackendName() : "none"; }

namespace {
// Every collective ends here: a failure or timeout becomes one error that says what to suspect.
void wait_work(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout, int64_t rank,
               const char* what) {
  try {
    work->wait(timeout);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));  // c10 appends a backtrace
    throw std::runtime_error("rank " + std::to_string(rank) + ": " + what + " failed: another rank died, hung " +
                             "or was stopped (" + msg + ")");
  }
}
}  // namespace

void Distributed::broadcast(std::vector<torch::Tensor>& tensors, int64_t root) {
  if (!enabled()) return;
  c10d::BroadcastOptions o;
  o.rootRank = root;
  o.timeout = timeout_;
  for (auto& t : tensors) {
    std::vector<torch::Tensor> one = {t};
    auto work = group_->broadcast(one, o);
    wait_work(work, timeout_, rank(), "broadcast");
  }
}

void Distributed::broadcast_module(torch::nn::Module& module, int64_t root) {
  if (!enabled()) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> all;
  for (auto& p : module.parameters()) all.push_back(p);
  for (auto& b : module.buffers()) all.push_back(b);
  // One flat tensor: one collective instead of hundreds.
  std::vector<torch::Tensor> flat = {torch::cat([&] {
    std::vector<torch::Tensor> v;
    for (auto& t : all) v.push_back(t.detach().to(torch::kFloat32).flatten());
    return v;
  }())};
  broadcast(flat, root);
  int64_t offset = 0;
  for (auto& t : all) {
    t.copy_(flat[0].slice(0, offset, offset + t.numel()).view_as(t));
    offset += t.numel();
  }
}

void Distributed::all_reduce_sum(std::vector<torch::Tensor>& tensors) {
  if (!enabled()) return;
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  for (auto& t : tensors) {
    std::vector<torch::Tensor> one = {t};
    auto work = group_->allreduce(one, o);
    wait_work(work, timeout_, rank(), "all-reduce");
  }
}

double Distributed::all_reduce_sum(double value) {
  if (!enabled()) return value;
  std::vector<torch::Tensor> t = {torch::tensor({value}, torch::TensorOptions().dtype(torch::kFloat64).device(
                                                             device_.is_cuda() ? device_ : torch::kCPU))};
  all_reduce_sum(t);
  return t[0].item<double>();
}

void Distributed::broadcast_bytes(std::string& bytes, int64_t root) {
  if (!enabled()) return;
  auto on = torch::TensorOptions().device(collective_device());
  std::vector<torch::Tensor> size = {torch::tensor({int64_t(bytes.size())}, on.dtype(torch::kInt64))};
  broadcast(size, root);
  const int64_t n = size[0].item<int64_t>();
  auto buffer = torch::empty({n}, torch::kUInt8);
  if (rank() == root) std::memcpy(buffer.data_ptr<uint8_t>(), bytes.data(), size_t(n));
  std::vector<torch::Tensor> payload = {buffer.to(collective_device())};
  broadcast(payload, root);
  auto back = payload[0].cpu().contiguous();
  bytes.assign(reinterpret_cast<const char*>(back.data_ptr<uint8_t>()), size_t(n));
}

void Distributed::barrier() {
  if (!enabled()) return;
  // A tiny all-reduce doubles as a barrier that honours our timeout on every backend.
  all_reduce_sum(0.0);
}

namespace {
struct PendingWork : Distributed::Pending {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds timeout;
  int64_t rank;
  void wait() override {
    if (work) wait_work(work, timeout, rank, "gradient all-reduce");
  }
};
}  // namespace

std::unique_ptr<Distributed::Pending> Distributed::all_reduce_sum_async(torch::Tensor flat) {
  auto p = std::make_unique<PendingWork>();
  p->timeout = timeout_;
  p->rank = rank();
  if (!enabled()) return p;
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  std::vector<torch::Tensor> one = {flat};
  p->work = group_->allreduce(one, o);
  return p;
}

// ---- gradient buckets ----

struct GradientAverager::State {
  std::shared_ptr<Distributed> dist;
  std::vector<torch::Tensor> params;
  struct Bucket {
    std::vector<size_t> members;  // indices into params
    std::vector<int64_t> offsets;
    torch::Tensor flat;
    size_t filled = 0;
    std::unique_ptr<Distributed::Pending> pending;
  };
  std::vector<Bucket> buckets;
  std::vector<std::pair<size_t, size_t>> where;  // param -> (bucket, slot)
  std::vector<unsigned> seen;                    // gradients received per param this step
  unsigned passes = 1;                           // backward passes per step
  std::vector<unsigned> hook_ids;
  size_t next_launch = 0;
  std::mutex mu;

  void on_grad(size_t i, const torch::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mu);
    auto [b, slot] = where[i];
    auto& bucket = buckets[b];
    auto part = bucket.flat.slice(0, bucket.offsets[slot], bucket.offsets[slot] + grad.numel());
    if (seen[i]++ == 0)
      part.copy_(grad.flatten());
    else
      part.add_(grad.flatten());
    if (seen[i] < passes) return;
    ++bucket.filled;
    // Launch every consecutive full bucket, in index order on every rank.
    while (next_launch < buckets.size() && buckets[next_launch].filled == buckets[next_launch].members.size()) {
      buckets[next_launch].pending = dist->all_reduce_sum_async(buckets[next_launch].flat);
      ++next_launch;
    }
  }
};

GradientAverager::GradientAverager(std::shared_ptr<Distributed> dist, std::vector<torch::Tensor> params,
                                   int64_t bucket_bytes, unsigned passes)
    : state_(std::make_shared<State>()) {
  auto& s = *state_;
  s.dist = std::move(dist);
  s.passes = passes;
  for (auto& p : params)
    if (p.requires_grad()) s.params.push_back(p);
  if (!s.dist->enabled()) return;
  s.where.resize(s.params.size());
  s.seen.assign(s.params.size(), 0);
  // Reverse registration order approximates the order in which backward produces gradients.
  int64_t bytes = 0;
  for (size_t k = s.params.size(); k-- > 0;) {
    const auto& p = s.params[k];
    if (s.buckets.empty() || bytes >= bucket_bytes) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    auto& b = s.buckets.back();
    b.offsets.push_back(b.members.empty() ? 0 : b.offsets.back() + s.params[b.members.back()].numel());
    b.members.push_back(k);
    s.where[k] = {s.buckets.size() - 1, b.members.size() - 1};
    bytes += p.numel() * int64_t(p.element_size());
  }
  for (auto& b : s.buckets) {
    int64_t n = b.offsets.back() + s.params[b.members.back()].numel();
    b.flat = torch::zeros({n}, s.params[b.members.front()].options().requires_grad(false));
  }
  std::weak_ptr<State> weak = state_;
  for (size_t k = 0; k < s.params.size(); ++k) {
    s.hook_ids.push_back(s.params[k].register_hook([weak, k](torch::Tensor grad) {
      if (auto st = weak.lock()) st->on_grad(k, grad);
    }));
  }
}

GradientAverager::~GradientAverager() {
  if (!state_) return;
  for (size_t k = 0; k < state_->hook_ids.size(); ++k) state_->params[k].remove_hook(state_->hook_ids[k]);
}

int64_t GradientAverager::bucket_count() const { return int64_t(state_->buckets.size()); }

void GradientAverager::finish() {
  auto& s = *state_;
  if (!s.dist->enabled()) return;
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < s.params.size(); ++k)
    if (s.seen[k] != s.passes)
      throw std::logic_error("parameter " + std::to_string(k) + " received " + std::to_string(s.seen[k]) +
                             " gradients in " + std::to_string(s.passes) +
                             " backward passes; data-parallel training needs exactly one per pass");
  double inv = 1.0 / double(s.dist->world_size());
  for (auto& b : s.buckets) {
    b.pending->wait();
    b.flat.mul_(inv);
    for (size_t j = 0; j < b.members.size(); ++j) {
      auto& p = s.params[b.members[j]];
      auto avg = b.flat.slice(0, b.offsets[j], b.offsets[j] + p.numel()).view_as(p);
      if (p.grad().defined())
        p.mutable_grad().copy_(avg);
      else
        p.mutable_grad() = avg.clone();
    }
    b.filled = 0;
    b.pending.reset();
  }
  s.next_launch = 0;
  std::fill(s.seen.begin(), s.seen.end(), 0);
}

// ---- local launcher ----

namespace {

int free_loopback_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    throw std::runtime_error(std::string("cannot bind a loopback port: ") + std::strerror(errno));
  }
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::vector<pid_t>* g_children = nullptr;
volatile sig_atomic_t g_forwarded = 0;
void forward_signal(int sig) {
  g_forwarded = sig;
  if (g_children)
    for (pid_t p : *g_children)
      if (p > 0) kill(p, sig);
}

// Starts rank r of nproc as a copy of this program with torchrun's variables set (MASTER_PORT `port` on 127.0.0.1).
pid_t spawn_rank(int r, int nproc, int port, const std::vector<std::string>& args) {
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid > 0) return pid;
  setenv("RANK", std::to_string(r).c_str(), 1);
  setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
  setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
  std::vector<char*> argv;
  std::string self = "/proc/self/exe";
  argv.push_back(self.data());
  std::vector<std::string> copy = args;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  execv("/proc/self/exe", argv.data());
  std::perror("execv");
  _exit(127);
}

// While it lives, SIGINT and SIGTERM go to every child still running.
class ForwardSignals {
 public:
  explicit ForwardSignals(std::vector<pid_t>& children) {
    g_forwarded = 0;
    g_children = &children;
    struct sigaction sa {};
    sa.sa_handler = forward_signal;
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~ForwardSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    g_children = nullptr;
  }
  ForwardSignals(const ForwardSignals&) = delete;
  ForwardSignals& operator=(const ForwardSignals&) = delete;

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

void signal_all(const std::vector<pid_t>& children, int sig) {
  for (pid_t p : children)
    if (p > 0) kill(p, sig);
}

// After one rank failed: SIGTERM to the others at term_at, SIGKILL at kill_at (unset: never).
struct Escalation {
  using Clock = std::chrono::steady_clock;
  Clock::time_point term_at = Clock::time_point::max(), kill_at = Clock::time_point::max();
  bool pending() const { return term_at != Clock::time_point::max() || kill_at != Clock::time_point::max(); }
  void start(std::chrono::milliseconds grace) {
    term_at = Clock::now() + std::min<std::chrono::milliseconds>(grace, std::chrono::seconds(2));
    kill_at = term_at + grace;
  }
  // Sends what is due, or sleeps a moment.
  void tick(const std::vector<pid_t>& children) {
    const auto now = Clock::now();
    if (now > term_at) {
      signal_all(children, SIGTERM);
      signal_all(children, SIGCONT);  // wakes a stopped rank so that it can act on SIGTERM
      term_at = Clock::time_point::max();
    } else if (now > kill_at) {
      signal_all(children, SIGKILL);
      kill_at = Clock::time_point::max();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
};

void report_failed_rank(const std::vector<pid_t>& launched, pid_t pid, int status) {
  const auto rank = std::find(launched.begin(), launched.end(), pid) - launched.begin();
  std::cerr << "launch: rank " << rank << " of " << launched.size() << " "
            << (WIFSIGNALED(status) ? "was killed by signal " + std::to_string(WTERMSIG(status))
                                    : "exited with status " + std::to_string(WEXITSTATUS(status)))
            << "; stopping the other ranks" << std::endl;
}

// Waits for every child; returns the first non-zero exit code (128 + signal for a killed rank).
int wait_for_ranks(std::vector<pid_t>& children, std::chrono::milliseconds grace) {
  const std::vector<pid_t> launched = children;
  int result = 0;
  size_t remaining = children.size();
  Escalation escalation;
  while (remaining > 0) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, escalation.pending() ? WNOHANG : 0);
    if (pid == 0) {
      escalation.tick(children);
      continue;
    }
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    --remaining;
    std::replace(children.begin(), children.end(), pid, pid_t(-1));
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code == 0 || result != 0) continue;
    result = code;
    // After SIGINT/SIGTERM (forwarded, or sent to one rank: diffuse's ranks agree to stop and exit with
    // 128 + signal) every rank is checkpointing and stopping on its own.
    if (g_forwarded || (WIFEXITED(status) && (code == 128 + SIGINT || code == 128 + SIGTERM))) continue;
    report_failed_rank(launched, pid, status);
    // One rank failed. The others see it at their next collective and report it themselves; the ones that
    // do not (hung, or outside collectives) get SIGTERM shortly after, and SIGKILL after `grace`.
    escalation.start(grace);
  }
  return result;
}

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args, std::chrono::milliseconds grace) {
  if (nproc < 1) throw std::invalid_argument("--nproc must be >= 1, got " + std::to_string(nproc));
  const int port = free_loopback_port();
  std::vector<pid_t> children(size_t(nproc), -1);
  for (int r = 0; r < nproc; ++r) children[size_t(r)] = spawn_rank(r, nproc, port, args);
  ForwardSignals forward(children);
  return wait_for_ranks(children, grace);
}

}  // namespace diffuse
