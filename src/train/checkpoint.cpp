// The run folder: what may be resumed or overwritten, and the checkpoint swap that a kill at any moment
// leaves completable.
#include <algorithm>
#include <iostream>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "diffuse/io/files.h"
#include "diffuse/io/run_folder.h"
#include "diffuse/train/train.h"
#include "train/train_internal.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace detail {

void swap_in_checkpoint(const RunFolder& run) {
  const RunFolder fresh = run.new_checkpoint();
  const fs::path old = run.old_checkpoint();
  fs::create_directories(old);
  for (const auto& e : fs::directory_iterator(fresh.root)) {
    std::string name = e.path().filename().string();
    if (e.path() == fresh.complete_marker()) continue;
    fs::path target = run.root / name;
    if (fs::exists(target)) {
      fs::remove_all(old / name);
      fs::rename(target, old / name);
    }
    fs::rename(e.path(), target);
  }
  fs::remove_all(fresh.root);  // the COMPLETE marker goes last
  fs::remove_all(old);
}
}  // namespace detail

namespace {
bool is_resumable(const std::string& key) {
  for (const auto& r : resumable_options())
    if (r.key == key) return true;
  return false;
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s;
  for (const auto& k : keys) s += (s.empty() ? "" : ", ") + k;
  return s;
}

// Keys (dotted paths) whose values differ between two option objects, ignoring resumable ones.
void diff_json(const nlohmann::json& a, const nlohmann::json& b, const std::string& prefix,
               std::vector<std::string>& out) {
  if (a.is_object() && b.is_object()) {
    std::vector<std::string> keys;
    for (auto it = a.begin(); it != a.end(); ++it) keys.push_back(it.key());
    for (auto it = b.begin(); it != b.end(); ++it)
      if (!a.contains(it.key())) keys.push_back(it.key());
    for (const auto& k : keys) {
      if (prefix == "loop." && is_resumable(k)) continue;
      diff_json(a.value(k, nlohmann::json()), b.value(k, nlohmann::json()), prefix + k + ".", out);
    }
  } else if (a != b) {
    out.push_back(prefix.substr(0, prefix.size() - 1) + " (" + a.dump() + " in the run, " + b.dump() + " now)");
  }
}

}  // namespace

void check_run_folder(const LoopOptions& o) {
  if (o.out.empty()) throw std::invalid_argument("no run folder given (--out RUN)");
  if (o.resume && o.overwrite) throw std::invalid_argument("--resume and --overwrite exclude each other");
  const RunFolder run(o.out);
  if (o.resume) {
    if (!fs::exists(run.run_json()))
      throw std::invalid_argument("cannot resume '" + o.out + "': no run.json there (not a diffuse run folder)");
    return;
  }
  bool exists = fs::exists(run.root) && !(fs::is_directory(run.root) && fs::is_empty(run.root));
  if (!exists) return;
  if (!o.overwrite)
    throw std::invalid_argument("run folder '" + o.out +
                                "' already exists (pass --resume to continue it or --overwrite to replace it)");
  if (!fs::is_directory(run.root) || !fs::exists(run.run_json()))
    throw std::invalid_argument("--overwrite refused: '" + o.out +
                                "' exists but is not a diffuse run folder (no run.json); remove it yourself");
  std::vector<std::string> foreign;
  const auto ours = RunFolder::entries();
  for (const auto& entry : fs::directory_iterator(run.root)) {
    const std::string name = entry.path().filename().string();
    if (std::find(ours.begin(), ours.end(), name) == ours.end()) foreign.push_back(name);
  }
  if (!foreign.empty()) {
    std::sort(foreign.begin(), foreign.end());
    std::string list;
    for (size_t i = 0; i < foreign.size() && i < 5; ++i) list += (i ? ", " : "") + foreign[i];
    if (foreign.size() > 5) list += ", ...";
    throw std::invalid_argument("--overwrite refused: '" + o.out + "' holds " + std::to_string(foreign.size()) +
                                " entr" + (foreign.size() == 1 ? "y" : "ies") + " a diffuse run does not write (" +
                                list + "); move them away or choose another --out");
  }
}

void finish_interrupted_checkpoint(const std::string& run_dir) {
  const RunFolder run(run_dir), fresh = run.new_checkpoint();
  if (fs::exists(fresh.root)) {
    if (fs::exists(fresh.complete_marker()))
      detail::swap_in_checkpoint(run);
    else
      fs::remove_all(fresh.root);  // cut short while writing: the previous checkpoint is intact
  }
  fs::remove_all(run.old_checkpoint());
}

int64_t checkpoint_step(const std::string& run_dir) {
  const std::string path = RunFolder(run_dir).state_json().string();
  auto j = load_json(path);
  if (!j.contains("step") || !j["step"].is_number_integer())
    throw std::runtime_error("'" + path + "' has no integer 'step': corrupt train state");
  return j["step"].get<int64_t>();
}

// Creates, replaces or reopens the run folder. Returns the checkpoint's state.json when resuming.
std::optional<nlohmann::json> detail::prepare_run_folder(const LoopOptions& o, const nlohmann::json& options_json) {
  check_run_folder(o);
  const RunFolder run(o.out);
  if (o.resume) {
    finish_interrupted_checkpoint(o.out);
    if (!fs::exists(run.state_json()))
      throw std::invalid_argument("cannot resume '" + o.out +
                                  "': it has no checkpoint yet (train_state/state.json missing); start it again with --overwrite");
    // The options the checkpoint was trained with (state.json records them; runs of earlier versions only have
    // run.json) against those of this invocation: run.json plus the resumable flags given. An edited run.json is
    // refused here, naming the keys.
    const auto state = load_json(run.state_json().string());
    const auto stored = state.contains("options") ? state["options"] : load_json(run.run_json().string());
    std::vector<std::string> diffs;
    diff_json(stored, options_json, "", diffs);
    if (!diffs.empty())
      throw std::invalid_argument("cannot resume '" + o.out + "' with options that differ from its checkpoint's: " +
                                  join_keys(diffs) + " (restore them in run.json, or start a new run)");
    const int64_t threads = state.value("threads", int64_t(0));
    if (threads > 0 && threads != torch::get_num_threads())
      std::cerr << "warning: '" << o.out << "' was checkpointed with " << threads << " threads and resumes with "
                << torch::get_num_threads() << ": on the CPU the result is bit-identical to an uninterrupted run only "
                << "with the same --threads (floating-point sums split differently)\n";
    return state;
  }
  if (fs::exists(run.root)) fs::remove_all(run.root);  // empty, or a run folder with --overwrite (checked above)
  fs::create_directories(run.root);
  return std::nullopt;
}

}  // namespace diffuse
