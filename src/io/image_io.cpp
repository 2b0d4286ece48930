#include "diffuse/io/image_io.h"

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <zlib.h>
#include <cstring>
#include <stdexcept>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_FAILURE_USERMSG
// Only the formats diffuse reads: stb's other decoders (GIF, PSD, TGA, HDR, PIC, PNM) would otherwise decode
// whatever a .png file holds, and carry most of stb's known memory-safety bugs.
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
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

[[noreturn]] void throw_undecodable(const std::string& path) {
  throw std::runtime_error("cannot decode image '" + path + "': " + stb_reason());
}

// stb as Debian 12 ships it (git 2022-09) writes past a Huffman table's 257 code sizes when a JPEG's DHT segment
// declares more than 256 codes (a heap overflow found by fuzz/fuzz_image_folder; later stb refuses it). stb finds a
// marker after 0xFF fill bytes, so every DHT it could parse starts at a byte pair FF C4: each is read here as stb
// would (missing bytes read as 0, as stb's reader returns them) and a table of over 256 codes is refused.
void check_jpeg_huffman_tables(const std::string& bytes, const std::string& path) {
  const size_t n = bytes.size();
  if (n < 2 || uint8_t(bytes[0]) != 0xFF) return;  // not a JPEG (PNG and BMP start otherwise)
  for (size_t m = 0; m + 1 < n; ++m) {
    if (uint8_t(bytes[m]) != 0xFF || uint8_t(bytes[m + 1]) != 0xC4) continue;
    size_t p = m + 2;
    auto get8 = [&]() -> int { return p < n ? uint8_t(bytes[p++]) : (++p, 0); };
    int64_t left = int64_t(get8()) * 256 + get8() - 2;
    while (left > 0) {
      const int q = get8();
      if ((q >> 4) > 1 || (q & 15) > 3) break;  // stb refuses the segment here
      int codes = 0;
      for (int i = 0; i < 16; ++i) codes += get8();
      if (codes > 256)
        throw std::runtime_error("cannot decode image '" + path + "': corrupt JPEG (a Huffman table declares " +
                                 std::to_string(codes) + " codes, at most 256 exist)");
      p += size_t(codes);
      left -= 17 + codes;
    }
  }
}

bool is_png(const std::string& bytes) { return bytes.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) == 0; }

// A PNG's zero-length IDAT chunks removed (they hold no data; the image is the same): stb copies such a chunk with
// memcpy from a null buffer, undefined behaviour in a valid file (found by fuzz/fuzz_image_folder under UBSan).
void drop_empty_png_data_chunks(std::string& bytes) {
  if (!is_png(bytes)) return;
  auto be32 = [&](size_t i) {
    return uint64_t(uint8_t(bytes[i])) << 24 | uint64_t(uint8_t(bytes[i + 1])) << 16 |
           uint64_t(uint8_t(bytes[i + 2])) << 8 | uint64_t(uint8_t(bytes[i + 3]));
  };
  std::string kept;  // built only once an empty IDAT is met
  size_t pos = 8, copied = 0;
  while (pos + 12 <= bytes.size()) {
    const uint64_t length = be32(pos);
    if (length > bytes.size() - pos - 12) break;  // malformed: stb reports it
    if (length == 0 && bytes.compare(pos + 4, 4, "IDAT") == 0) {
      kept.append(bytes, copied, pos - copied);
      copied = pos + 12;
    }
    pos += 12 + size_t(length);
  }
  if (copied == 0) return;
  kept.append(bytes, copied, std::string::npos);
  bytes.swap(kept);
}

// The bytes of an image file, checked and mended for what the decoder cannot take.
std::string image_bytes(const std::string& path) {
  std::string bytes = read_file(path);
  if (bytes.size() > size_t(INT32_MAX))
    throw std::runtime_error("image file '" + path + "' is over 2 GiB, more than the decoder reads");
  check_jpeg_huffman_tables(bytes, path);
  drop_empty_png_data_chunks(bytes);
  return bytes;
}

// Refuses a header that claims more pixel data than the file can hold, before stb allocates and decodes it
// (stb fills what is missing): an uncompressed BMP must hold every row; a PNG's deflate data expands at most
// 1032-fold. A 142-byte BMP claiming 5 x 11993088 pixels took 2 s and 0.9 GB (found by fuzz/fuzz_image_folder).
void check_claimed_size(const std::string& bytes, int64_t w, int64_t h, int comp, const std::string& path) {
  auto le = [&](size_t i, int n) {
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; --k) v = v << 8 | uint8_t(bytes[i + size_t(k)]);
    return v;
  };
  int64_t needed = 0;
  const char* why = "";
  if (bytes.size() >= 30 && bytes.compare(0, 2, "BM") == 0) {
    const int64_t bpp = int64_t(le(28, 2)), offset = int64_t(le(10, 4));
    needed = offset + h * ((w * bpp + 31) / 32 * 4);
    why = "its rows";
  } else if (is_png(bytes)) {
    const int64_t raw = h * (1 + w * comp * 2);  // 16 bits a channel at most, one filter byte a row
    needed = raw / 1032;
    why = "its deflate data at the largest expansion";
  }
  if (int64_t(bytes.size()) < needed)
    throw std::runtime_error("cannot decode image '" + path + "': its header claims " + std::to_string(w) + " x " +
                             std::to_string(h) + " pixels, but the file's " + std::to_string(bytes.size()) +
                             " bytes cannot hold " + why + " (" + std::to_string(needed) + " bytes): truncated or corrupt");
}

const stbi_uc* data_of(const std::string& bytes) { return reinterpret_cast<const stbi_uc*>(bytes.data()); }

}  // namespace

constexpr int64_t kMaxImagePixels = int64_t(1) << 26;  // 8192 x 8192

bool is_image_file(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  for (auto& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp";
}

torch::Tensor center_square_resize(const torch::Tensor& img, int64_t size) {
  int64_t h = img.size(1), w = img.size(2), m = std::min(h, w);
  auto sq = img.narrow(1, (h - m) / 2, m).narrow(2, (w - m) / 2, m);
  if (m == size) return sq;
  namespace F = torch::nn::functional;
  return F::interpolate(sq.unsqueeze(0), F::InterpolateFuncOptions()
                                             .size(std::vector<int64_t>{size, size})
                                             .mode(torch::kBilinear)
                                             .align_corners(false)
                                             .antialias(m > size))
      .squeeze(0)
      .clamp(-1.0, 1.0);
}

int64_t image_file_channels(const std::string& path) {
  const std::string bytes = image_bytes(path);
  int w = 0, h = 0, comp = 0;
  clear_stb_reason();
  if (!stbi_info_from_memory(data_of(bytes), int(bytes.size()), &w, &h, &comp)) throw_undecodable(path);
  return comp;
}

torch::Tensor read_image(const std::string& path, int64_t channels) {
  if (channels < 0 || channels > 4 || channels == 2)
    throw std::invalid_argument("read_image: channels must be 0, 1, 3 or 4, got " + std::to_string(channels));
  const std::string bytes = image_bytes(path);
  int w = 0, h = 0, comp = 0;
  // The header's size first: a few bytes can claim a 44612 x 5954 image, which stb would allocate and decode
  // before noticing the data is missing.
  clear_stb_reason();
  if (!stbi_info_from_memory(data_of(bytes), int(bytes.size()), &w, &h, &comp)) throw_undecodable(path);
  if (int64_t(w) * int64_t(h) > kMaxImagePixels)
    throw std::runtime_error("image '" + path + "' claims " + std::to_string(w) + " x " + std::to_string(h) +
                             " pixels, more than the " + std::to_string(kMaxImagePixels) + " diffuse reads");
  check_claimed_size(bytes, w, h, comp, path);
  if (channels == 0) channels = comp >= 3 ? 3 : 1;
  StbiImage img;
  clear_stb_reason();
  img.pixels = stbi_load_from_memory(data_of(bytes), int(bytes.size()), &w, &h, &comp, int(channels));
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

namespace {
void put_u32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(char((v >> shift) & 0xff));
}
}  // namespace

std::string with_png_text(const std::string& png, const std::string& key, const std::string& value) {
  // PNG 1.2, sections 4.2.3.3 (iTXt) and 4.2.3.1 (tEXt): a keyword of 1-79 Latin-1 characters, NUL, then the text.
  // ASCII text goes in tEXt (Latin-1), anything else in uncompressed iTXt (UTF-8), as PIL's PngInfo writes them.
  if (key.empty() || key.size() > 79 || key.find('\0') != std::string::npos)
    throw std::invalid_argument("PNG text key must be 1 to 79 characters without NUL, got '" + key + "'");
  if (png.size() < 33 || png.compare(12, 4, "IHDR") != 0) throw std::invalid_argument("with_png_text: not a PNG");
  const bool ascii = std::all_of(value.begin(), value.end(), [](char c) { return (unsigned char)c < 0x80; });
  std::string chunk = ascii ? "tEXt" : "iTXt";
  chunk += key;
  chunk.push_back('\0');
  if (!ascii) chunk.append(std::string("\0\0\0\0", 4));  // not compressed, method 0, no language tag, no translated key
  chunk += value;
  std::string out = png.substr(0, 33);  // signature (8) and IHDR (4 + 4 + 13 + 4)
  put_u32(out, uint32_t(chunk.size() - 4));
  out += chunk;
  put_u32(out, uint32_t(crc32(0, reinterpret_cast<const Bytef*>(chunk.data()), uInt(chunk.size()))));
  out += png.substr(33);
  return out;
}

void write_png(const std::string& path, const torch::Tensor& image, const std::map<std::string, std::string>& text) {
  auto bytes = encode_png(image);
  for (const auto& [key, value] : text) bytes = with_png_text(bytes, key, value);
  write_file_atomic(path, bytes);
}

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
