// Images on disk: PNG/JPEG/BMP decoding, PNG writing (atomic), labelled image grids.
// In memory an image is float32 [C, H, W] (or a batch [N, C, H, W]) with values in [-1, 1].
#pragma once

#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace diffuse {

/// [-1, 1] floats (any device, any shape) -> uint8 on the CPU: round((x + 1) * 127.5), clamped to [0, 255].
torch::Tensor to_uint8(const torch::Tensor& x);

/// Decodes a PNG/JPEG/BMP file into float32 [C, H, W] in [-1, 1]. `channels`: 1 (grey), 3 (RGB), 4 (RGBA)
/// or 0 (the file's own: grey / grey+alpha -> 1, RGB / RGBA -> 3). Throws naming the file and the decoder's
/// reason.
torch::Tensor read_image(const std::string& path, int64_t channels = 0);
/// Whether `path` names a file read_image decodes, by its extension (.png, .jpg, .jpeg, .bmp; any case).
bool is_image_file(const std::string& path);
/// Channels stored in an image file (1 to 4) without decoding it; throws naming the file when unreadable.
int64_t image_file_channels(const std::string& path);

/// Centre-crops [C, H, W] to a square and resizes it to size x size (bilinear, antialiased when shrinking, clamped
/// to [-1, 1]): the crop of a shorter side resized to `size`.
torch::Tensor center_square_resize(const torch::Tensor& image, int64_t size);

/// Writes [C, H, W] (C = 1, 3 or 4) as PNG, atomically. Float input is taken as [-1, 1]; uint8 as is.
void write_png(const std::string& path, const torch::Tensor& image);
/// The PNG bytes of [C, H, W] (as write_png would write them).
std::string encode_png(const torch::Tensor& image);
/// `png` with a text chunk `key` = `value` after its header: tEXt for ASCII text, iTXt (UTF-8) otherwise, as PIL
/// writes them (so A1111-style "parameters" with a Unicode prompt read back in other tools).
std::string with_png_text(const std::string& png, const std::string& key, const std::string& value);
/// write_png with text chunks (with_png_text), e.g. {"parameters", prompt and settings}.
void write_png(const std::string& path, const torch::Tensor& image, const std::map<std::string, std::string>& text);

struct GridOptions {
  int64_t cols = 0;   ///< images per row; 0: ceil(sqrt(N))
  int64_t scale = 1;  ///< nearest-neighbour upscale of each image (small images with labels read better at 2+)
  int64_t padding = 2;
  std::vector<std::string> row_labels;    ///< empty, or one per row: drawn left of the row
  std::vector<std::string> image_labels;  ///< empty, or one per image: drawn under the image
};
/// Lays out a batch [N, C, H, W] ([-1, 1] floats or uint8) on a dark-grey canvas with optional labels in a
/// built-in 5x7 bitmap font (digits, letters, common punctuation). Returns uint8 [C, H', W'] on the CPU.
torch::Tensor make_grid(const torch::Tensor& images, const GridOptions& options = {});
/// make_grid + write_png.
void write_grid_png(const std::string& path, const torch::Tensor& images, const GridOptions& options = {});

/// Draws `text` into a uint8 [C, H, W] image with its top-left corner at (x, y), glyphs 5x7 scaled by
/// `scale`, 6 * scale pixels apart; pixels outside the image are skipped. Unknown characters draw as '?'.
void draw_text(torch::Tensor& canvas, const std::string& text, int64_t x, int64_t y, int64_t scale = 1,
               uint8_t value = 255);

}  // namespace diffuse
