#include "diffuse/data/data.h"

#include <zlib.h>

#include <ATen/Parallel.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>

#include "diffuse/io/files.h"
#include "diffuse/io/image_io.h"
#include "diffuse/util/runtime.h"

namespace fs = std::filesystem;

namespace diffuse {

// ---------------------------------------------------------------- IDX

namespace {

std::string gz_reason(gzFile f) {
  int code = 0;
  const char* msg = gzerror(f, &code);
  return code == Z_ERRNO ? std::string(std::strerror(errno)) : std::string(msg ? msg : "unknown zlib error");
}

// Reads up to `n` bytes; returns how many were read. Throws on a zlib error (corrupt gzip stream).
size_t gz_read(gzFile f, uint8_t* out, size_t n, const std::string& path) {
  size_t done = 0;
  while (done < n) {
    unsigned chunk = unsigned(std::min<size_t>(n - done, 1u << 30));
    int got = gzread(f, out + done, chunk);
    if (got < 0) throw std::runtime_error("'" + path + "' is corrupt: " + gz_reason(f));
    if (got == 0) break;
    done += size_t(got);
  }
  return done;
}

}  // namespace

IdxArray read_idx(const std::string& path) {
  if (!fs::exists(path)) throw std::runtime_error("cannot read '" + path + "': no such file");
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files transparently
  if (!f) throw std::runtime_error("cannot read '" + path + "': " + std::strerror(errno));
  std::unique_ptr<gzFile_s, int (*)(gzFile)> guard(f, gzclose);

  uint8_t head[4];
  if (gz_read(f, head, 4, path) != 4) throw std::runtime_error("'" + path + "' is too short to be an IDX file");
  if (head[0] != 0 || head[1] != 0)
    throw std::runtime_error("'" + path + "' is not an IDX file (magic bytes " + std::to_string(head[0]) + " " +
                             std::to_string(head[1]) + ", expected 0 0)");
  if (head[2] != 0x08)
    throw std::runtime_error("'" + path + "' holds IDX element type " + std::to_string(head[2]) +
                             "; only unsigned bytes (8) are supported");
  int ndims = head[3];
  if (ndims < 1 || ndims > 4)
    throw std::runtime_error("'" + path + "' claims " + std::to_string(ndims) + " dimensions (expected 1 to 4)");

  IdxArray out;
  uint64_t total = 1;
  for (int d = 0; d < ndims; ++d) {
    uint8_t b[4];
    if (gz_read(f, b, 4, path) != 4) throw std::runtime_error("'" + path + "' is truncated inside its header");
    uint64_t dim = (uint64_t(b[0]) << 24) | (uint64_t(b[1]) << 16) | (uint64_t(b[2]) << 8) | b[3];
    if (dim == 0 || dim > (1u << 30))
      throw std::runtime_error("'" + path + "' has an impossible dimension " + std::to_string(dim));
    total *= dim;
    if (total > (uint64_t(1) << 34))
      throw std::runtime_error("'" + path + "' claims more than 16 GiB of data: corrupt header");
    out.dims.push_back(int64_t(dim));
  }
  // Grow while reading, so a corrupt header cannot make us allocate what the file does not hold.
  size_t have = 0;
  while (have < total) {
    size_t want = std::min<uint64_t>(total - have, 64u << 20);
    out.data.resize(have + want);
    size_t got = gz_read(f, out.data.data() + have, want, path);
    have += got;
    if (got < want) break;
  }
  if (have < total)
    throw std::runtime_error("'" + path + "' is truncated: its header promises " + std::to_string(total) +
                             " data bytes, the file holds " + std::to_string(have));
  out.data.resize(total);
  uint8_t extra;
  if (gz_read(f, &extra, 1, path) != 0)
    throw std::runtime_error("'" + path + "' has bytes after the " + std::to_string(total) +
                             " its header announces: corrupt or not an IDX file");
  return out;
}

void write_idx(const std::string& path, const IdxArray& array) {
  uint64_t total = 1;
  for (auto d : array.dims) total *= uint64_t(d);
  if (array.dims.empty() || array.dims.size() > 4 || total != array.data.size())
    throw std::invalid_argument("write_idx: dims do not match the data size");
  std::string bytes = {0, 0, 0x08, char(array.dims.size())};
  for (auto d : array.dims)
    for (int shift : {24, 16, 8, 0}) bytes += char((uint64_t(d) >> shift) & 0xff);
  bytes.append(reinterpret_cast<const char*>(array.data.data()), array.data.size());
  bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  if (!gz) return write_file_atomic(path, bytes);
  std::string tmp = path + ".tmp";
  gzFile f = gzopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
  int wrote = gzwrite(f, bytes.data(), unsigned(bytes.size()));
  if (gzclose(f) != Z_OK || wrote != int(bytes.size()))
    throw std::runtime_error("cannot write '" + tmp + "'");
  fs::rename(tmp, path);
}

// ---------------------------------------------------------------- Fashion-MNIST

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

namespace {

std::string idx_file(const std::string& dir, const std::string& stem) {
  for (const char* ext : {".gz", ""}) {
    std::string p = (fs::path(dir) / (stem + ext)).string();
    if (fs::exists(p)) return p;
  }
  throw std::runtime_error("cannot read '" + (fs::path(dir) / (stem + ".gz")).string() +
                           "': no such file (install it with: sudo apt-get install dataset-fashion-mnist, or pass "
                           "a folder that holds the MNIST-layout files)");
}

}  // namespace

Dataset load_fashion_mnist(const std::string& dir, const std::string& split) {
  if (split != "train" && split != "test")
    throw std::invalid_argument("Fashion-MNIST split must be train or test, got '" + split + "'");
  std::string prefix = split == "train" ? "train" : "t10k";
  std::string ipath = idx_file(dir, prefix + "-images-idx3-ubyte");
  std::string lpath = idx_file(dir, prefix + "-labels-idx1-ubyte");
  IdxArray im = read_idx(ipath), lb = read_idx(lpath);
  if (im.dims.size() != 3)
    throw std::runtime_error("'" + ipath + "' holds a " + std::to_string(im.dims.size()) +
                             "-D array; images must be 3-D [N, rows, cols]");
  if (lb.dims.size() != 1)
    throw std::runtime_error("'" + lpath + "' holds a " + std::to_string(lb.dims.size()) +
                             "-D array; labels must be 1-D [N]");
  if (im.dims[0] != lb.dims[0])
    throw std::runtime_error("'" + ipath + "' has " + std::to_string(im.dims[0]) + " images but '" + lpath +
                             "' has " + std::to_string(lb.dims[0]) + " labels");
  for (size_t i = 0; i < lb.data.size(); ++i)
    if (lb.data[i] >= 10)
      throw std::runtime_error("'" + lpath + "': label " + std::to_string(lb.data[i]) + " at index " +
                               std::to_string(i) + " is outside the 10 classes");
  Dataset d;
  auto bytes = torch::from_blob(im.data.data(), {im.dims[0], 1, im.dims[1], im.dims[2]}, torch::kUInt8);
  d.images = (bytes.to(torch::kFloat32) / 127.5 - 1.0).contiguous();
  d.labels = torch::from_blob(lb.data.data(), {lb.dims[0]}, torch::kUInt8).to(torch::kInt64);
  d.num_classes = 10;
  d.class_names = fashion_mnist_classes();
  d.name = "fashion-mnist:" + split;
  return d;
}

// ---------------------------------------------------------------- image folders

namespace {

std::vector<fs::path> sorted_entries(const fs::path& dir, bool dirs) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind('.', 0) == 0) continue;  // hidden
    if (dirs ? e.is_directory() : (e.is_regular_file() && is_image_file(e.path().string()))) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

Dataset load_image_folder(const std::string& dir, int64_t size, int64_t channels) {
  if (!fs::is_directory(dir)) throw std::runtime_error("cannot read image folder '" + dir + "': not a folder");
  if (size < 1) throw std::invalid_argument("image size must be positive");
  if (channels != 0 && channels != 1 && channels != 3)
    throw std::invalid_argument("channels must be 1 or 3, got " + std::to_string(channels));
  Dataset d;
  std::vector<fs::path> files;
  std::vector<int64_t> labels;
  auto classes = sorted_entries(dir, true);
  if (classes.empty()) {
    files = sorted_entries(dir, false);
    labels.assign(files.size(), 0);
  } else {
    for (size_t k = 0; k < classes.size(); ++k) {
      auto f = sorted_entries(classes[k], false);
      files.insert(files.end(), f.begin(), f.end());
      labels.insert(labels.end(), f.size(), int64_t(k));
      d.class_names.push_back(classes[k].filename().string());
    }
    d.num_classes = int64_t(classes.size());
  }
  if (files.empty())
    throw std::runtime_error("image folder '" + dir + "' holds no .png/.jpg/.bmp files (expected DIR/CLASS/*.png or DIR/*.png)");
  if (channels == 0) {
    channels = 1;
    for (const auto& f : files)
      if (image_file_channels(f.string()) >= 3) {
        channels = 3;
        break;
      }
  }
  int64_t n = int64_t(files.size());
  d.images = torch::empty({n, channels, size, size}, torch::kFloat32);
  std::vector<std::string> errors(static_cast<size_t>(n));
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      try {
        d.images[i].copy_(center_square_resize(read_image(files[size_t(i)].string(), channels), size));
      } catch (const std::exception& e) {
        errors[size_t(i)] = e.what();
      }
    }
  });
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
  d.labels = torch::tensor(labels, torch::kInt64);
  d.name = dir;
  return d;
}

// ---------------------------------------------------------------- generated data sets

namespace {

struct Vec2 {
  double x, y;
};

double box_sdf(Vec2 p, double hx, double hy) {
  double dx = std::abs(p.x) - hx, dy = std::abs(p.y) - hy;
  double ox = std::max(dx, 0.0), oy = std::max(dy, 0.0);
  return std::sqrt(ox * ox + oy * oy) + std::min(std::max(dx, dy), 0.0);
}

// Equilateral triangle of circumradius-like size r pointing up (Quilez's exact SDF).
double triangle_sdf(Vec2 p, double r) {
  const double k = std::sqrt(3.0);
  double x = std::abs(p.x) - r, y = -p.y + r / k;
  if (x + k * y > 0) {
    double nx = (x - k * y) / 2, ny = (-k * x - y) / 2;
    x = nx;
    y = ny;
  }
  x -= std::clamp(x, -2 * r, 0.0);
  return -std::sqrt(x * x + y * y) * (y < 0 ? -1 : 1);
}

// Signed distance (in pixels) to shape `k` of size r centred at the origin; negative inside.
double shape_sdf(int k, Vec2 p, double r) {
  switch (k) {
    case 0: return std::hypot(p.x, p.y) - r;                                           // disk
    case 1: return box_sdf(p, 0.8 * r, 0.8 * r);                                       // square
    case 2: return triangle_sdf(p, r);                                                 // triangle
    case 3: return std::abs(std::hypot(p.x, p.y) - 0.75 * r) - 0.25 * r;               // ring
    case 4: return std::min(box_sdf(p, r, 0.3 * r), box_sdf(p, 0.3 * r, r));           // cross
    case 5: return box_sdf(p, r, 0.3 * r);                                             // horizontal bar
    case 6: return box_sdf(p, 0.3 * r, r);                                             // vertical bar
    case 7: return (std::abs(p.x) + std::abs(p.y) - r) / std::sqrt(2.0);               // diamond
    case 8: return std::min(std::hypot(p.x - 0.55 * r, p.y) - 0.4 * r, std::hypot(p.x + 0.55 * r, p.y) - 0.4 * r);
    default: return std::abs(box_sdf(p, 0.8 * r, 0.8 * r) + 0.15 * r) - 0.15 * r;      // frame
  }
}

const std::vector<std::string>& shape_names() {
  static const std::vector<std::string> names = {"disk",    "square",  "triangle", "ring",     "cross",
                                                 "hbar",    "vbar",    "diamond",  "two-dots", "frame"};
  return names;
}

}  // namespace

Dataset make_shapes(int64_t count, int64_t size, uint64_t seed) {
  if (count < 1 || size < 8) throw std::invalid_argument("make_shapes needs count >= 1 and size >= 8");
  Dataset d;
  d.images = torch::empty({count, 1, size, size}, torch::kFloat32);
  d.labels = torch::empty({count}, torch::kInt64);
  auto img = d.images.accessor<float, 4>();
  auto lab = d.labels.accessor<int64_t, 1>();
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::mt19937_64 rng(mix_seed(seed, uint64_t(i), 0x5a));
      std::uniform_real_distribution<double> u(0.0, 1.0);
      int k = int(rng() % 10);
      double r = size * (0.22 + 0.12 * u(rng));
      double margin = r + 1.0;
      double cx = margin + (size - 2 * margin) * u(rng), cy = margin + (size - 2 * margin) * u(rng);
      lab[i] = k;
      for (int64_t y = 0; y < size; ++y)
        for (int64_t x = 0; x < size; ++x) {
          double sdf = shape_sdf(k, {x + 0.5 - cx, y + 0.5 - cy}, r);
          double cover = std::clamp(0.5 - sdf, 0.0, 1.0);  // one-pixel antialiased edge
          img[i][0][y][x] = float(2.0 * cover - 1.0);
        }
    }
  });
  d.num_classes = 10;
  d.class_names = shape_names();
  d.name = "synthetic-shapes";
  return d;
}

Dataset with_brightness_spread(const Dataset& data, uint64_t seed, double contrast) {
  if (!(contrast > 0 && contrast <= 2)) throw std::invalid_argument("brightness contrast must be in (0, 2]");
  int64_t n = data.size();
  auto gen = cpu_generator(mix_seed(seed, 0xb419));
  auto level = torch::rand({n, 1, 1, 1}, gen, torch::kFloat64) * 2.0 - 1.0;  // L ~ U(-1, 1)
  auto sign = torch::where(level < 0, torch::ones_like(level), -torch::ones_like(level));
  auto content = (data.images.to(torch::kFloat64) + 1.0) / 2.0;
  Dataset out = data;
  out.images = (level + sign * contrast * content).clamp(-1.0, 1.0).to(torch::kFloat32).contiguous();
  out.name = data.name + "+brightness";
  return out;
}

// ---------------------------------------------------------------- fitting

Dataset fit_dataset(const Dataset& data, int64_t channels, int64_t size, Fit fit) {
  if (channels != 1 && channels != 3) throw std::invalid_argument("model channels must be 1 or 3, got " + std::to_string(channels));
  if (size < 1) throw std::invalid_argument("model size must be positive");
  Dataset out = data;
  auto x = data.images;
  if (x.size(1) != channels) {
    if (x.size(1) == 1)
      x = x.repeat({1, 3, 1, 1});
    else if (x.size(1) == 3)
      x = (0.299 * x.select(1, 0) + 0.587 * x.select(1, 1) + 0.114 * x.select(1, 2)).unsqueeze(1);
    else
      throw std::invalid_argument("cannot convert " + std::to_string(x.size(1)) + "-channel images to " +
                                  std::to_string(channels));
  }
  if (x.size(2) != size || x.size(3) != size) {
    if (fit == Fit::pad) {
      auto pad_or_crop = [&](torch::Tensor t, int64_t dim) {
        int64_t have = t.size(dim);
        if (have > size) return t.narrow(dim, (have - size) / 2, size);
        int64_t before = (size - have) / 2, after = size - have - before;
        std::vector<int64_t> pad = dim == 3 ? std::vector<int64_t>{before, after, 0, 0}
                                            : std::vector<int64_t>{0, 0, before, after};
        return torch::constant_pad_nd(t, pad, -1.0);
      };
      x = pad_or_crop(pad_or_crop(x, 2), 3);
    } else {
      namespace F = torch::nn::functional;
      bool shrink = x.size(2) > size || x.size(3) > size;
      std::vector<torch::Tensor> chunks;
      for (auto& c : x.split(4096))  // bounded temporary memory
        chunks.push_back(F::interpolate(c, F::InterpolateFuncOptions()
                                               .size(std::vector<int64_t>{size, size})
                                               .mode(torch::kBilinear)
                                               .align_corners(false)
                                               .antialias(shrink)));
      x = torch::cat(chunks).clamp(-1.0, 1.0);
    }
  }
  out.images = x.contiguous();
  return out;
}

std::pair<Dataset, Dataset> split_dataset(const Dataset& data, int64_t heldout, uint64_t seed) {
  if (heldout < 1 || heldout >= data.size())
    throw std::invalid_argument("cannot hold out " + std::to_string(heldout) + " of " +
                                std::to_string(data.size()) + " images");
  auto perm = torch::randperm(data.size(), cpu_generator(mix_seed(seed, 0x5711)), torch::kInt64);
  auto pick = [&](const torch::Tensor& idx, const std::string& suffix) {
    Dataset d = data;
    d.images = data.images.index_select(0, idx).contiguous();
    d.labels = data.labels.index_select(0, idx);
    d.name = data.name + suffix;
    return d;
  };
  return {pick(perm.narrow(0, heldout, data.size() - heldout), ":train"), pick(perm.narrow(0, 0, heldout), ":heldout")};
}

// ---------------------------------------------------------------- named sources

namespace {

bool is_idx_folder(const std::string& path) {
  for (const char* f : {"train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"})
    if (fs::exists(fs::path(path) / f)) return true;
  return false;
}

const char* kSources =
    "fashion-mnist, fashion-mnist:test, fashion-mnist-brightness, synthetic-shapes, synthetic-brightness, "
    "or a folder (MNIST-layout IDX files, or images with one subfolder per class)";

}  // namespace

bool has_heldout_split(const DataSpec& spec) {
  return spec.source.rfind("fashion-mnist", 0) == 0 || spec.source.rfind("synthetic-", 0) == 0 ||
         is_idx_folder(spec.source);
}

Dataset load_dataset(const DataSpec& spec, bool heldout) {
  const std::string& src = spec.source;
  std::string base = src.substr(0, src.find(':'));
  bool test_split = heldout || (src.size() > 5 && src.compare(src.size() - 5, 5, ":test") == 0);
  if (src.find(':') != std::string::npos && src.substr(src.find(':')) != ":test" && !fs::exists(src))
    throw std::invalid_argument("unknown data split in '" + src + "' (only ':test' exists)");
  Dataset d;
  bool idx_data = true;
  uint64_t seed = test_split ? mix_seed(spec.seed, 0x7e57) : spec.seed;
  int64_t count = test_split ? std::max<int64_t>(1, spec.synthetic_count / 6) : spec.synthetic_count;
  if (base == "fashion-mnist" || base == "fashion-mnist-brightness") {
    d = load_fashion_mnist(kFashionMnistDir, test_split ? "test" : "train");
  } else if (base == "synthetic-shapes" || base == "synthetic-brightness") {
    d = make_shapes(count, spec.size, seed);
  } else if (fs::is_directory(src) && is_idx_folder(src)) {
    d = load_fashion_mnist(src, test_split ? "test" : "train");
    d.name = src + (test_split ? ":test" : ":train");
    d.class_names = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  } else if (fs::is_directory(src)) {
    if (heldout) throw std::invalid_argument("image folder '" + src + "' has no held-out split");
    idx_data = false;
    d = load_image_folder(src, spec.size, spec.channels);
  } else if (fs::exists(src)) {
    throw std::invalid_argument("--data '" + src + "' is a file; expected " + std::string(kSources));
  } else {
    throw std::invalid_argument("unknown data source '" + src + "' (no such name or folder); expected " +
                                std::string(kSources));
  }
  if (spec.limit > 0 && spec.limit < d.size()) {
    d.images = d.images.narrow(0, 0, spec.limit).contiguous();
    d.labels = d.labels.narrow(0, 0, spec.limit).contiguous();
  }
  Fit fit;
  if (spec.fit == "auto")
    fit = idx_data ? Fit::pad : Fit::resize;
  else if (spec.fit == "pad")
    fit = Fit::pad;
  else if (spec.fit == "resize")
    fit = Fit::resize;
  else
    throw std::invalid_argument("unknown --fit '" + spec.fit + "' (expected auto, pad or resize)");
  d = fit_dataset(d, spec.channels ? spec.channels : d.channels(), spec.size, fit);
  if (base == "fashion-mnist-brightness" || base == "synthetic-brightness") {
    d = with_brightness_spread(d, mix_seed(seed, 0xb7));
    d.name = base + (test_split ? ":test" : "");
  } else if (base.rfind("fashion-mnist", 0) == 0 || base.rfind("synthetic-", 0) == 0) {
    d.name = base + (test_split ? ":test" : "");
  }
  return d;
}

// ---------------------------------------------------------------- batching

BatchSampler::BatchSampler(int64_t dataset_size, int64_t batch_size, uint64_t seed)
    : n_(dataset_size), batch_(batch_size), seed_(seed) {
  if (batch_size < 1) throw std::invalid_argument("batch size must be positive, got " + std::to_string(batch_size));
  if (batch_size > dataset_size)
    throw std::invalid_argument("batch size " + std::to_string(batch_size) + " is larger than the data set (" +
                                std::to_string(dataset_size) + " images): lower --batch");
  steps_per_epoch_ = n_ / batch_;
}

const torch::Tensor& BatchSampler::permutation(int64_t epoch) {
  if (epoch < 0) throw std::invalid_argument("negative epoch");
  if (epoch != epoch_) {
    perm_ = torch::randperm(n_, cpu_generator(mix_seed(seed_, 0xe9, uint64_t(epoch))), torch::kInt64);
    epoch_ = epoch;
  }
  return perm_;
}

torch::Tensor BatchSampler::indices(int64_t step) {
  if (step < 0) throw std::invalid_argument("negative step");
  return permutation(step / steps_per_epoch_).narrow(0, (step % steps_per_epoch_) * batch_, batch_);
}

Batch make_batch(const Dataset& data, const torch::Tensor& indices, bool hflip, uint64_t flip_seed,
                 torch::Device device) {
  auto gen = cpu_generator(flip_seed);
  return make_batch(data, indices, hflip, gen, device);
}

Batch make_batch(const Dataset& data, const torch::Tensor& indices, bool hflip, at::Generator& flip_gen,
                 torch::Device device) {
  Batch b;
  b.images = data.images.index_select(0, indices);
  b.labels = data.labels.index_select(0, indices);
  if (hflip) {
    auto flip = torch::rand({indices.size(0), 1, 1, 1}, flip_gen, b.images.options().device(flip_gen.device())) < 0.5;
    b.images = torch::where(flip.to(b.images.device()), b.images.flip({3}), b.images);
  }
  b.images = b.images.to(device);
  b.labels = b.labels.to(device);
  return b;
}

}  // namespace diffuse
