// Image datasets held in memory: Fashion-MNIST (IDX), folders of images, generated data sets;
// seeded, resumable batching.
//
// Every dataset is decoded once into one float32 tensor [N, C, H, W] with values in [-1, 1] (CPU);
// a batch is an index_select of it, so loading never limits training speed (bench/train_bench).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

struct Dataset {
  torch::Tensor images;  ///< float32 [N, C, H, W] in [-1, 1], CPU, contiguous
  torch::Tensor labels;  ///< int64 [N]; all 0 when the data set has no classes
  int64_t num_classes = 0;  ///< 0: unlabelled
  std::vector<std::string> class_names;
  std::string name;

  int64_t size() const { return images.size(0); }
  int64_t channels() const { return images.size(1); }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
};

// ---- IDX files (LeCun's MNIST format), plain or gzip-compressed ----

/// An unsigned-byte IDX array: magic 0x0000 0x08 ndims, big-endian int32 dims, then the bytes.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};
/// Reads an IDX file (gzip or plain, detected from the content). Throws std::runtime_error naming the file
/// and what is wrong: missing, not gzip/IDX, unsupported element type, truncated, trailing bytes.
IdxArray read_idx(const std::string& path);
/// Writes an unsigned-byte IDX array, gzip-compressed when `path` ends in ".gz" (atomically).
void write_idx(const std::string& path, const IdxArray& array);

/// Where Debian's dataset-fashion-mnist package puts the files.
constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";
const std::vector<std::string>& fashion_mnist_classes();

/// Loads an MNIST-layout folder ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]): 28x28 grey images
/// scaled to [-1, 1], labels checked against the 10 classes. `split` is "train" or "test".
Dataset load_fashion_mnist(const std::string& dir = kFashionMnistDir, const std::string& split = "train");

// ---- image folders ----

/// Loads every PNG/JPEG/BMP under `dir`. With subfolders, each subfolder is one class (sorted by name,
/// class index = position); with only files, the data set is unlabelled. Each image is centre-cropped to
/// a square and resized to `size` x `size`; `channels` 1 or 3 (0: 3 if any image has colour, else 1).
/// Decodes in parallel. Throws naming the file that cannot be decoded, or the folder when it has no images.
Dataset load_image_folder(const std::string& dir, int64_t size, int64_t channels = 0);

// ---- generated data sets ----

/// Shapes (10 classes: disk, square, triangle, ring, cross, horizontal bar, vertical bar, diamond,
/// two dots, frame) with random position and scale, antialiased, white on black, `size` x `size`, 1 channel.
Dataset make_shapes(int64_t count, int64_t size, uint64_t seed);

/// Gives each image a global brightness level L ~ U(-1, 1) (one per image, independent of class):
/// content c = (x + 1) / 2 in [0, 1] becomes L + contrast * c where L < 0 and L - contrast * c where L >= 0,
/// clamped to [-1, 1]. Image mean brightness then spans about (-1, 1), the data needed to test Lin et al.
/// 2023's claim that zero-terminal-SNR models reproduce very dark and very bright images (003 document).
Dataset with_brightness_spread(const Dataset& data, uint64_t seed, double contrast = 0.5);

// ---- fitting to a model ----

enum class Fit { pad, resize };
/// Brings images to `channels` x `size` x `size`: pad (centred, value -1; a larger image is centre-cropped)
/// or resize (bilinear, antialiased when shrinking). Channels: 1 -> 3 repeats, 3 -> 1 takes the luminance
/// (ITU-R BT.601 weights). Returns `data` itself when nothing changes.
Dataset fit_dataset(const Dataset& data, int64_t channels, int64_t size, Fit fit);

/// A seeded split: the first `heldout` images of a random permutation form `.second`, the rest `.first`.
std::pair<Dataset, Dataset> split_dataset(const Dataset& data, int64_t heldout, uint64_t seed);

// ---- named sources (the CLI's --data) ----

struct DataSpec {
  /// fashion-mnist, fashion-mnist:test, fashion-mnist-brightness[:test], synthetic-shapes,
  /// synthetic-brightness, or a path: a folder with MNIST-layout IDX files, or a folder of images.
  std::string source = "fashion-mnist";
  int64_t size = 32;       ///< model resolution
  int64_t channels = 0;    ///< 0: the source's own
  std::string fit = "auto";  ///< auto (pad IDX data, resize image folders), pad, resize
  int64_t limit = 0;       ///< >0: keep the first `limit` images
  int64_t synthetic_count = 60000;
  uint64_t seed = 0;       ///< for generated data sets (the held-out split adds an offset)
};
/// Loads a named source and fits it to the model size. `heldout`: the source's evaluation split instead
/// (Fashion-MNIST's t10k files; a generated set drawn with another seed, `synthetic_count` / 6 images).
/// Throws std::invalid_argument for an unknown name (listing the valid ones) or for a held-out split of an
/// image folder (use split_dataset there).
Dataset load_dataset(const DataSpec& spec, bool heldout = false);
/// Whether load_dataset(spec, true) exists (false for folders of images).
bool has_heldout_split(const DataSpec& spec);

// ---- batching ----

/// Which images form the batch of each training step: a seeded permutation per epoch, drop-last.
/// Deterministic in (seed, step), so a resumed run sees exactly the batches an uninterrupted one sees.
class BatchSampler {
 public:
  BatchSampler(int64_t dataset_size, int64_t batch_size, uint64_t seed);
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  /// int64 [batch_size] indices for global step `step` (epoch = step / steps_per_epoch).
  torch::Tensor indices(int64_t step);
  /// The epoch's order of the whole data set (CPU int64 [N]); step's indices are rows
  /// [(step % steps_per_epoch) * batch_size, + batch_size) of its epoch's order.
  const torch::Tensor& permutation(int64_t epoch);

 private:
  int64_t n_, batch_, steps_per_epoch_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  torch::Tensor perm_;
};

struct Batch {
  torch::Tensor images;  ///< float32 [B, C, H, W] on the requested device
  torch::Tensor labels;  ///< int64 [B]
};
/// Gathers `indices` of `data`; with `hflip`, each image is mirrored with probability 1/2 drawn from
/// `flip_seed`. The result is moved to `device`.
Batch make_batch(const Dataset& data, const torch::Tensor& indices, bool hflip, uint64_t flip_seed,
                 torch::Device device);
/// The same with the flips drawn from `flip_gen` on its device (data, indices and generator all on a GPU:
/// no host work).
Batch make_batch(const Dataset& data, const torch::Tensor& indices, bool hflip, at::Generator& flip_gen,
                 torch::Device device);

}  // namespace diffuse
