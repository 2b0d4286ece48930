#include "diffuse/io/image_io.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_FAILURE_USERMSG
#define STB_IMAGE_WRITE_IMPLEMENTATION
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <stb_image.h>
#include <stb_image_write.h>
#pragma GCC diagnostic pop

#include "diffuse/io/files.h"

namespace diffuse {

torch::Tensor to_uint8(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kUInt8) return x.cpu();
  return ((x.detach().to(torch::kFloat32) + 1.0) * 127.5).round().clamp(0, 255).to(torch::kUInt8).cpu();
}

namespace {

struct StbiImage {
  unsigned char* pixels = nullptr;
  ~StbiImage() { stbi_image_free(pixels); }
};

// stb keeps its last failure reason until the next failure sets one, and some failures (a deflate block of the
// reserved type 3) set none: cleared before each call, so an error never shows a stale or null reason.
void clear_stb_reason() { stbi__g_failure_reason = nullptr; }
std::string stb_reason() {
  const char* r = stbi_failure_reason();
  return r && *r ? r : "corrupt or unsupported image data";
}

// The error for a file stb could not read or decode (an unreadable file names its system error instead).
[[noreturn]] void throw_undecodable(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot read '" + path + "': " + std::strerror(errno));
  std::fclose(f);
  throw std::runtime_error("cannot decode image '" + path + "': " + stb_reason());
}

}  // namespace

constexpr int64_t kMaxImagePixels = int64_t(1) << 26;  // 8192 x 8192

int64_t image_file_channels(const std::string& path) {
  int w = 0, h = 0, comp = 0;
  clear_stb_reason();
  if (!stbi_info(path.c_str(), &w, &h, &comp)) throw_undecodable(path);
  return comp;
}

torch::Tensor read_image(const std::string& path, int64_t channels) {
  if (channels < 0 || channels > 4 || channels == 2)
    throw std::invalid_argument("read_image: channels must be 0, 1, 3 or 4, got " + std::to_string(channels));
  if (channels == 0) channels = image_file_channels(path) >= 3 ? 3 : 1;
  int w = 0, h = 0, comp = 0;
  // The header's size first: a few bytes can claim a 44612 x 5954 image (a TGA header in a .png), which stb
  // would allocate and decode before noticing the data is missing.
  clear_stb_reason();
  if (!stbi_info(path.c_str(), &w, &h, &comp)) throw_undecodable(path);
  if (int64_t(w) * int64_t(h) > kMaxImagePixels)
    throw std::runtime_error("image '" + path + "' claims " + std::to_string(w) + " x " + std::to_string(h) +
                             " pixels, more than the " + std::to_string(kMaxImagePixels) + " diffuse reads");
  StbiImage img;
  clear_stb_reason();
  img.pixels = stbi_load(path.c_str(), &w, &h, &comp, int(channels));
  if (!img.pixels) throw_undecodable(path);
  auto hwc = torch::from_blob(img.pixels, {h, w, channels}, torch::kUInt8);
  return (hwc.permute({2, 0, 1}).to(torch::kFloat32) / 127.5 - 1.0).contiguous();
}

std::string encode_png(const torch::Tensor& image) {
  if (image.dim() != 3 || !(image.size(0) == 1 || image.size(0) == 3 || image.size(0) == 4))
    throw std::invalid_argument("write_png: expected an image [C, H, W] with C = 1, 3 or 4, got shape " +
                                std::string(c10::str(image.sizes())));
  auto hwc = to_uint8(image).permute({1, 2, 0}).contiguous();
  int h = int(hwc.size(0)), w = int(hwc.size(1)), c = int(hwc.size(2));
  std::string out;
  auto append = [](void* ctx, void* data, int size) {
    static_cast<std::string*>(ctx)->append(static_cast<const char*>(data), size_t(size));
  };
  if (!stbi_write_png_to_func(append, &out, w, h, c, hwc.data_ptr<uint8_t>(), w * c))
    throw std::runtime_error("PNG encoding failed");
  return out;
}

void write_png(const std::string& path, const torch::Tensor& image) { write_file_atomic(path, encode_png(image)); }

// ---------------------------------------------------------------- 5x7 bitmap font

namespace {

struct Glyph {
  char c;
  const char* rows[7];
};

// A 5x7 font in the style of the HD44780 character ROM.
const Glyph kFont[] = {
    {'0', {" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "}},
    {'1', {"  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
    {'2', {" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"}},
    {'3', {"#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "}},
    {'4', {"   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "}},
    {'5', {"#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "}},
    {'6', {"  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "}},
    {'7', {"#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "}},
    {'8', {" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "}},
    {'9', {" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "}},
    {'A', {" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
    {'B', {"#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "}},
    {'C', {" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "}},
    {'D', {"###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "}},
    {'E', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"}},
    {'F', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "}},
    {'G', {" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"}},
    {'H', {"#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
    {'I', {" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
    {'J', {"  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "}},
    {'K', {"#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"}},
    {'L', {"#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"}},
    {'M', {"#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"}},
    {'N', {"#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"}},
    {'O', {" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
    {'P', {"#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "}},
    {'Q', {" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"}},
    {'R', {"#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"}},
    {'S', {" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "}},
    {'T', {"#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "}},
    {'U', {"#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
    {'V', {"#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "}},
    {'W', {"#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "}},
    {'X', {"#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"}},
    {'Y', {"#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "}},
    {'Z', {"#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"}},
    {' ', {"     ", "     ", "     ", "     ", "     ", "     ", "     "}},
    {'-', {"     ", "     ", "     ", "#####", "     ", "     ", "     "}},
    {'_', {"     ", "     ", "     ", "     ", "     ", "     ", "#####"}},
    {'.', {"     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "}},
    {',', {"     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "}},
    {':', {"     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "}},
    {'=', {"     ", "     ", "#####", "     ", "#####", "     ", "     "}},
    {'+', {"     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "}},
    {'/', {"     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "}},
    {'(', {"   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "}},
    {')', {" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "}},
    {'%', {"##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"}},
    {'#', {" # # ", " # # ", "#####", " # # ", "#####", " # # ", " # # "}},
    {'!', {"  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "     ", "  #  "}},
    {'?', {" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "}},
};

const Glyph& glyph(char c) {
  c = char(std::toupper(static_cast<unsigned char>(c)));
  for (const auto& g : kFont)
    if (g.c == c) return g;
  return glyph('?');
}

constexpr int64_t kGlyphAdvance = 6, kGlyphHeight = 7;

}  // namespace

void draw_text(torch::Tensor& canvas, const std::string& text, int64_t x, int64_t y, int64_t scale, uint8_t value) {
  TORCH_CHECK(canvas.dim() == 3 && canvas.scalar_type() == torch::kUInt8 && canvas.is_contiguous(),
              "draw_text needs a contiguous uint8 [C, H, W] canvas");
  int64_t C = canvas.size(0), H = canvas.size(1), W = canvas.size(2);
  auto* px = canvas.data_ptr<uint8_t>();
  for (size_t k = 0; k < text.size(); ++k) {
    const Glyph& g = glyph(text[k]);
    int64_t gx = x + int64_t(k) * kGlyphAdvance * scale;
    for (int64_t r = 0; r < kGlyphHeight; ++r)
      for (int64_t col = 0; col < 5; ++col) {
        if (g.rows[r][col] != '#') continue;
        for (int64_t dy = 0; dy < scale; ++dy)
          for (int64_t dx = 0; dx < scale; ++dx) {
            int64_t yy = y + r * scale + dy, xx = gx + col * scale + dx;
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            for (int64_t c = 0; c < C; ++c) px[(c * H + yy) * W + xx] = value;
          }
      }
  }
}

// ---------------------------------------------------------------- grids

torch::Tensor make_grid(const torch::Tensor& images, const GridOptions& o) {
  if (images.dim() != 4 || images.size(0) < 1)
    throw std::invalid_argument("make_grid: expected a batch [N, C, H, W], got shape " +
                                std::string(c10::str(images.sizes())));
  if (o.scale < 1 || o.padding < 0) throw std::invalid_argument("make_grid: scale >= 1 and padding >= 0 required");
  int64_t n = images.size(0);
  int64_t cols = o.cols > 0 ? o.cols : int64_t(std::ceil(std::sqrt(double(n))));
  int64_t rows = (n + cols - 1) / cols;
  if (!o.row_labels.empty() && int64_t(o.row_labels.size()) != rows)
    throw std::invalid_argument("make_grid: " + std::to_string(o.row_labels.size()) + " row labels for " +
                                std::to_string(rows) + " rows");
  if (!o.image_labels.empty() && int64_t(o.image_labels.size()) != n)
    throw std::invalid_argument("make_grid: " + std::to_string(o.image_labels.size()) + " image labels for " +
                                std::to_string(n) + " images");
  auto pix = to_uint8(images);
  if (o.scale > 1) pix = pix.repeat_interleave(o.scale, 2).repeat_interleave(o.scale, 3);
  int64_t C = pix.size(1), h = pix.size(2), w = pix.size(3), pad = o.padding;
  int64_t text_scale = 1, text_h = kGlyphHeight * text_scale + 2;
  int64_t left = 0;
  for (const auto& s : o.row_labels) left = std::max(left, int64_t(s.size()) * kGlyphAdvance * text_scale + 4);
  int64_t below = o.image_labels.empty() ? 0 : text_h;
  int64_t cell_w = w + pad, cell_h = h + below + pad;
  auto canvas = torch::full({C, pad + rows * cell_h, left + pad + cols * cell_w}, 40, torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) {
    int64_t r = i / cols, c = i % cols;
    int64_t y = pad + r * cell_h, x = left + pad + c * cell_w;
    canvas.narrow(1, y, h).narrow(2, x, w).copy_(pix[i]);
    if (!o.image_labels.empty()) draw_text(canvas, o.image_labels[size_t(i)], x, y + h + 1, text_scale);
  }
  for (size_t r = 0; r < o.row_labels.size(); ++r)
    draw_text(canvas, o.row_labels[r], 2, pad + int64_t(r) * cell_h + (h - kGlyphHeight * text_scale) / 2, text_scale);
  return canvas;
}

void write_grid_png(const std::string& path, const torch::Tensor& images, const GridOptions& options) {
  write_png(path, make_grid(images, options));
}

}  // namespace diffuse
