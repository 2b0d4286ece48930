// Fuzz target: a folder of images as `train --data DIR` reads it. The first byte picks the file name and the
// channels asked for (0: the file's own, 1, 3); the rest is the image file (PNG, JPEG, BMP, or whatever stb
// recognises in it), placed in a class subfolder beside a valid 2x2 PNG.
#include <ATen/Parallel.h>

#include <stdexcept>

#include "diffuse/data/data.h"
#include "fuzz_util.h"

namespace {
// A valid 2x2 grey PNG, so the folder always holds one good image too.
const uint8_t kGoodPng[] = {
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00,
    0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x00, 0x00, 0x00, 0x57, 0xdd, 0x52, 0xf8, 0x00, 0x00, 0x00,
    0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0xf8, 0x0f, 0x84, 0x00, 0x06, 0x00, 0x01, 0xff, 0x93,
    0xd1, 0xe4, 0x89, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool one_thread = (at::set_num_threads(1), true);  // reproducible: no decode races
  (void)one_thread;
  if (size < 1) return 0;
  static const char* names[] = {"x.png", "x.jpg", "x.jpeg", "x.bmp"};
  static const int64_t channels[] = {0, 1, 3};
  const char* name = names[data[0] % 4];
  int64_t want = channels[(data[0] / 4) % 3];
  auto dir = diffuse_fuzz::scratch_dir() / "folder";
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  diffuse_fuzz::write_bytes(dir / "a" / "good.png", kGoodPng, sizeof kGoodPng);
  diffuse_fuzz::write_bytes(dir / "b" / name, data + 1, size - 1);
  try {
    auto d = diffuse::load_image_folder(dir.string(), 8, want);
    if (d.size() != 2 || d.num_classes != 2) __builtin_trap();
  } catch (const std::exception& e) {
    diffuse_fuzz::refused(e);
  }
  return 0;
}
