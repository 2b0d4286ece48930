// Caption folders (include/diffuse/data/captions.h).
#include "diffuse/data/captions.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "diffuse/io/files.h"
#include "diffuse/io/image_io.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace {

struct Entry {
  std::string file;     // relative to the folder
  std::string caption;
  std::string problem;  // non-empty: why the entry cannot be used
};

// Same-named .txt beside each image (trailing newlines and spaces trimmed, as people's caption tools write them).
std::vector<Entry> txt_entries(const fs::path& dir) {
  std::vector<fs::path> images;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && is_image_file(e.path().string()) && e.path().filename().string()[0] != '.') images.push_back(e.path());
  std::sort(images.begin(), images.end());
  std::vector<Entry> out;
  for (const auto& image : images) {
    Entry entry{image.filename().string(), "", ""};
    auto txt = image;
    txt.replace_extension(".txt");
    if (!fs::exists(txt)) {
      entry.problem = "no caption file " + txt.filename().string();
    } else {
      entry.caption = read_file(txt.string());
      while (!entry.caption.empty() && std::isspace(static_cast<unsigned char>(entry.caption.back())))
        entry.caption.pop_back();
    }
    out.push_back(entry);
  }
  return out;
}

// metadata.jsonl: {"file_name": "a.png", "text": "..."} per line (other keys ignored; blank lines skipped).
std::vector<Entry> jsonl_entries(const fs::path& dir, std::vector<std::string>& notes) {
  const fs::path path = dir / "metadata.jsonl";
  std::istringstream lines(read_file(path.string()));
  std::vector<Entry> out;
  std::string line;
  std::vector<std::string> other_keys;
  for (int64_t number = 1; std::getline(lines, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Entry entry;
    const std::string where = "metadata.jsonl line " + std::to_string(number);
    try {
      auto j = parse_json(line);
      if (!j.is_object() || !j.contains("file_name") || !j["file_name"].is_string())
        throw std::invalid_argument("no string \"file_name\"");
      entry.file = j["file_name"].get<std::string>();
      if (!j.contains("text") || !j["text"].is_string())
        throw std::invalid_argument(j.contains("text") && j["text"].is_array()
                                        ? "\"text\" is a list (one caption per image is read)"
                                        : "no string \"text\"");
      entry.caption = j["text"].get<std::string>();
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.key() != "file_name" && it.key() != "text" &&
            std::find(other_keys.begin(), other_keys.end(), it.key()) == other_keys.end())
          other_keys.push_back(it.key());
      const fs::path file = dir / entry.file;
      if (!fs::is_regular_file(file)) entry.problem = where + ": no file '" + entry.file + "'";
    } catch (const std::exception& e) {
      entry.file = entry.file.empty() ? where : entry.file;
      entry.problem = where + ": " + e.what();
    }
    out.push_back(entry);
  }
  if (!other_keys.empty()) {
    std::string keys;
    for (const auto& k : other_keys) keys += (keys.empty() ? "" : ", ") + k;
    notes.push_back("metadata.jsonl: keys ignored: " + keys);
  }
  return out;
}

// The image at `resolution` with alpha flattened onto white; `flattened` says whether it had alpha.
torch::Tensor read_rgb(const std::string& path, const CaptionFolderOptions& o, bool& flattened) {
  const int64_t stored = image_file_channels(path);
  flattened = stored == 2 || stored == 4;
  torch::Tensor rgb;
  if (flattened) {
    if (o.alpha == "refuse")
      throw std::invalid_argument("'" + path + "' has an alpha channel (--alpha flatten composites it onto white)");
    auto rgba = read_image(path, 4);
    auto alpha = (rgba.narrow(0, 3, 1) + 1) / 2;
    rgb = rgba.narrow(0, 0, 3) * alpha + (1 - alpha);  // white is +1
  } else {
    rgb = read_image(path, 3);
  }
  return center_square_resize(rgb, o.resolution).contiguous();
}

}  // namespace

void CaptionFolderOptions::validate() const {
  if (resolution < 8) throw std::invalid_argument("--resolution must be at least 8, got " + std::to_string(resolution));
  if (crop == "random")
    throw std::invalid_argument("--crop random is not supported: latents are cached once per image, so a crop drawn "
                                "per step would need the autoencoder at every step; use --crop center");
  if (crop != "center") throw std::invalid_argument("--crop must be center, got '" + crop + "'");
  if (alpha != "flatten" && alpha != "refuse")
    throw std::invalid_argument("--alpha must be flatten or refuse, got '" + alpha + "'");
  if (bad_files != "refuse" && bad_files != "skip")
    throw std::invalid_argument("--bad-files must be refuse or skip, got '" + bad_files + "'");
}

CaptionedImages load_caption_folder(const std::string& dir, const CaptionFolderOptions& o) {
  o.validate();
  if (!fs::is_directory(dir)) throw std::invalid_argument("caption folder '" + dir + "' is not a folder");
  CaptionedImages out;
  const bool jsonl = fs::exists(fs::path(dir) / "metadata.jsonl");
  out.layout = jsonl ? "metadata.jsonl" : "txt";
  auto entries = jsonl ? jsonl_entries(dir, out.notes) : txt_entries(dir);
  if (o.limit > 0 && int64_t(entries.size()) > o.limit) entries.resize(size_t(o.limit));

  const int64_t n = int64_t(entries.size());
  std::vector<torch::Tensor> images(static_cast<size_t>(n));
  std::vector<char> flattened(size_t(n), 0);
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto& e = entries[size_t(i)];
      if (!e.problem.empty()) continue;
      try {
        bool alpha = false;
        images[size_t(i)] = read_rgb((fs::path(dir) / e.file).string(), o, alpha);
        flattened[size_t(i)] = alpha;
      } catch (const std::exception& ex) {
        e.problem = ex.what();
      }
    }
  });
  std::vector<std::string> bad;
  std::vector<torch::Tensor> kept;
  int64_t alpha_count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto& e = entries[size_t(i)];
    if (!e.problem.empty()) {
      if (o.bad_files == "refuse")
        throw std::invalid_argument("caption folder '" + dir + "': " + e.file + ": " + e.problem +
                                    " (--bad-files skip leaves such files out, counted)");
      bad.push_back(e.file + " (" + e.problem + ")");
      continue;
    }
    kept.push_back(images[size_t(i)]);
    out.captions.push_back(e.caption);
    out.files.push_back(e.file);
    alpha_count += flattened[size_t(i)];
  }
  if (!bad.empty()) {
    std::string first;
    for (size_t i = 0; i < bad.size() && i < 3; ++i) first += (i ? "; " : "") + bad[i];
    out.notes.push_back("skipped " + std::to_string(bad.size()) + " unusable file" + (bad.size() == 1 ? "" : "s") +
                        ": " + first + (bad.size() > 3 ? "; ..." : ""));
  }
  if (alpha_count > 0)
    out.notes.push_back(std::to_string(alpha_count) + " image" + (alpha_count == 1 ? " has" : "s have") +
                        " an alpha channel, flattened onto white");
  if (kept.empty()) throw std::invalid_argument("caption folder '" + dir + "' holds no usable captioned image");
  out.images = torch::stack(kept);
  return out;
}

}  // namespace diffuse
