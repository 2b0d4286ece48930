// Datasets (IDX, image folders, generated), fitting, batching; PNG files and image grids.
#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>

#include "diffuse/io/files.h"
#include "diffuse/data/data.h"
#include "diffuse/io/image_io.h"
#include "diffuse/core/scheduler_config.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::testing::error_of;
using diffuse::testing::TempDir;

namespace {

IdxArray ramp_images(int64_t n, int64_t h, int64_t w) {
  IdxArray a;
  a.dims = {n, h, w};
  for (int64_t i = 0; i < n * h * w; ++i) a.data.push_back(uint8_t((i * 7) % 256));
  return a;
}

// An MNIST-layout folder with n train and n test images of 28x28.
void write_mnist_folder(const TempDir& dir, int64_t n) {
  for (std::string split : {"train", "t10k"}) {
    write_idx(dir / (split + "-images-idx3-ubyte.gz"), ramp_images(n, 28, 28));
    IdxArray labels;
    labels.dims = {n};
    for (int64_t i = 0; i < n; ++i) labels.data.push_back(uint8_t(i % 10));
    write_idx(dir / (split + "-labels-idx1-ubyte.gz"), labels);
  }
}

}  // namespace

TEST(Idx, RoundTripGzipAndPlain) {
  TempDir dir;
  auto a = ramp_images(3, 5, 4);
  for (std::string name : {"a.idx.gz", "a.idx"}) {
    write_idx(dir / name, a);
    auto b = read_idx(dir / name);
    EXPECT_EQ(b.dims, a.dims);
    EXPECT_EQ(b.data, a.data);
  }
  // The .gz file really is gzip (magic 1f 8b), the plain one starts with the IDX magic.
  auto gz = read_file(dir / "a.idx.gz"), plain = read_file(dir / "a.idx");
  EXPECT_EQ(uint8_t(gz[0]), 0x1f);
  EXPECT_EQ(uint8_t(gz[1]), 0x8b);
  EXPECT_EQ(plain.substr(0, 4), std::string("\0\0\x08\x03", 4));
  EXPECT_EQ(plain.size(), 4 + 3 * 4 + 3 * 5 * 4u);
}

TEST(Idx, CorruptFilesGetErrorsNamingTheFile) {
  TempDir dir;
  auto expect_error = [&](const std::string& name, const std::string& bytes, const std::string& what) {
    write_file_atomic(dir / name, bytes);
    auto msg = error_of([&] { read_idx(dir / name); });
    EXPECT_NE(msg.find(dir / name), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << "expected '" << what << "' in: " << msg;
  };
  std::string good = std::string("\0\0\x08\x01\0\0\0\x03", 8) + "abc";
  expect_error("magic", "\x01\x02\x08\x01" + good.substr(4), "not an IDX file");
  expect_error("type", std::string("\0\0\x0d\x01\0\0\0\x03", 8) + "abc", "element type 13");
  expect_error("truncated", good.substr(0, 10), "truncated");
  expect_error("trailing", good + "x", "bytes after");
  expect_error("header", good.substr(0, 6), "truncated inside its header");
  expect_error("empty", "", "too short");
  expect_error("zero-dim", std::string("\0\0\x08\x01\0\0\0\0", 8), "impossible dimension");
  // A gzip stream cut in the middle.
  write_idx(dir / "whole.gz", ramp_images(50, 28, 28));
  auto gz = read_file(dir / "whole.gz");
  expect_error("cut.gz", gz.substr(0, gz.size() / 2), "");
  auto missing = error_of([&] { read_idx(dir / "nothing.gz"); });
  EXPECT_NE(missing.find("nothing.gz"), std::string::npos);
  EXPECT_NE(missing.find("no such file"), std::string::npos);
}

TEST(Data, MnistLayoutFolderIsPaddedTo32WithMinusOne) {
  TempDir dir;
  write_mnist_folder(dir, 12);
  DataSpec spec;
  spec.source = dir.path.string();
  auto d = load_dataset(spec);
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{12, 1, 32, 32}));
  EXPECT_EQ(d.num_classes, 10);
  EXPECT_EQ(d.labels[11].item<int64_t>(), 1);
  auto raw = ramp_images(12, 28, 28);
  auto expect = torch::from_blob(raw.data.data(), {12, 1, 28, 28}, torch::kUInt8).to(torch::kFloat32) / 127.5 - 1;
  EXPECT_TRUE(torch::equal(d.images.narrow(2, 2, 28).narrow(3, 2, 28), expect));
  EXPECT_TRUE((d.images.narrow(2, 0, 2) == -1).all().item<bool>());
  EXPECT_TRUE((d.images.narrow(3, 30, 2) == -1).all().item<bool>());
  EXPECT_EQ(d.images.min().item<float>(), -1.f);
  EXPECT_EQ(d.images.max().item<float>(), 1.f);  // byte 255 occurs in the ramp
  EXPECT_TRUE(has_heldout_split(spec));
  EXPECT_EQ(load_dataset(spec, true).size(), 12);
  spec.limit = 5;
  EXPECT_EQ(load_dataset(spec).size(), 5);
}

TEST(Data, MnistLayoutChecksCountsAndLabels) {
  TempDir dir;
  write_mnist_folder(dir, 12);
  IdxArray labels;
  labels.dims = {11};
  labels.data.assign(11, 0);
  write_idx(dir / "train-labels-idx1-ubyte.gz", labels);
  auto msg = error_of([&] { load_fashion_mnist(dir.path.string(), "train"); });
  EXPECT_NE(msg.find("12 images"), std::string::npos) << msg;
  EXPECT_NE(msg.find("11 labels"), std::string::npos) << msg;
  labels.dims = {12};
  labels.data.assign(12, 0);
  labels.data[4] = 10;
  write_idx(dir / "train-labels-idx1-ubyte.gz", labels);
  msg = error_of([&] { load_fashion_mnist(dir.path.string(), "train"); });
  EXPECT_NE(msg.find("label 10 at index 4"), std::string::npos) << msg;
  fs::remove(dir / "t10k-images-idx3-ubyte.gz");
  msg = error_of([&] { load_fashion_mnist(dir.path.string(), "test"); });
  EXPECT_NE(msg.find("t10k-images-idx3-ubyte.gz"), std::string::npos) << msg;
  EXPECT_NE(msg.find("dataset-fashion-mnist"), std::string::npos) << msg;
}

TEST(Data, RealFashionMnistWhenInstalled) {
  if (!fs::exists(std::string(kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  auto d = load_fashion_mnist(kFashionMnistDir, "test");
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  auto counts = torch::bincount(d.labels);
  EXPECT_TRUE((counts == 1000).all().item<bool>());  // the test split is balanced
  // The background is black: most border pixels are exactly -1.
  EXPECT_GT((d.images.select(3, 0) == -1).to(torch::kFloat32).mean().item<float>(), 0.9f);
}

TEST(Data, UnknownSourcesListTheValidOnes) {
  DataSpec spec;
  spec.source = "fashion-mnst";
  auto msg = error_of([&] { load_dataset(spec); });
  EXPECT_NE(msg.find("fashion-mnst"), std::string::npos) << msg;
  EXPECT_NE(msg.find("synthetic-brightness"), std::string::npos) << msg;
}

TEST(ImageIo, PngRoundTripIsExact) {
  TempDir dir;
  for (int64_t c : {1, 3, 4}) {
    auto bytes = torch::randint(0, 256, {c, 9, 13}, torch::kInt64).to(torch::kUInt8);
    write_png(dir / "x.png", bytes);
    EXPECT_EQ(image_file_channels(dir / "x.png"), c);
    auto back = read_image(dir / "x.png", c);
    ASSERT_EQ(back.sizes(), bytes.sizes());
    EXPECT_TRUE(torch::equal(to_uint8(back), bytes)) << "channels " << c;
  }
  // float [-1, 1] -> uint8: -1 -> 0, 1 -> 255, 0 -> 128 (round half away from zero of 127.5).
  auto f = torch::tensor({-1.0f, 1.0f, 0.0f, -2.0f, 3.0f}).reshape({1, 1, 5});
  EXPECT_TRUE(torch::equal(to_uint8(f).flatten(), torch::tensor({0, 255, 128, 0, 255}, torch::kUInt8)));
  // grey <-> RGB conversion on read.
  write_png(dir / "g.png", torch::full({1, 2, 2}, 200, torch::kUInt8));
  EXPECT_TRUE(torch::equal(to_uint8(read_image(dir / "g.png", 3)), torch::full({3, 2, 2}, 200, torch::kUInt8)));
  EXPECT_FALSE(fs::exists(dir / "x.png.tmp"));
}

TEST(ImageIo, BadFilesNameTheFile) {
  TempDir dir;
  write_file_atomic(dir / "bad.png", "\x89PNG\r\n\x1a\n garbage");
  auto msg = error_of([&] { read_image(dir / "bad.png"); });
  EXPECT_NE(msg.find("bad.png"), std::string::npos) << msg;
  msg = error_of([&] { read_image(dir / "none.png"); });
  EXPECT_NE(msg.find("none.png"), std::string::npos) << msg;
  EXPECT_THROW(write_png(dir / "y.png", torch::zeros({2, 4, 4})), std::invalid_argument);
}

// One PNG chunk: big-endian length, type, data, CRC-32 of type + data.
static std::string png_chunk(const std::string& type, const std::string& data) {
  std::string out;
  for (int shift : {24, 16, 8, 0}) out += char((data.size() >> shift) & 0xff);
  std::string body = type + data;
  out += body;
  const uLong crc = crc32(0, reinterpret_cast<const Bytef*>(body.data()), uInt(body.size()));
  for (int shift : {24, 16, 8, 0}) out += char((crc >> shift) & 0xff);
  return out;
}

// A PNG whose deflate stream uses the reserved block type 3: stb fails without a reason (it crashed the
// error message, a NULL string); after an earlier failure it used to show that one's stale reason.
TEST(ImageIo, ReservedDeflateBlockIsAnErrorNotACrash) {
  const std::string ihdr("\0\0\0\1\0\0\0\1\x08\0\0\0\0", 13);   // 1x1, 8-bit grey
  const std::string idat("\x78\x01\x07\0\0\0\0\0", 8);             // zlib header, BFINAL=1 BTYPE=3
  TempDir dir;
  write_file_atomic(dir / "reserved.png", std::string("\x89PNG\r\n\x1a\n", 8) + png_chunk("IHDR", ihdr) +
                                              png_chunk("IDAT", idat) + png_chunk("IEND", ""));
  write_file_atomic(dir / "bad.jpg", "\xff\xd8\xff\xe0 not really a JPEG");
  EXPECT_THROW(read_image(dir / "bad.jpg"), std::runtime_error);  // leaves a reason behind in stb
  for (int64_t channels : {0, 1, 3}) {
    auto msg = error_of([&] { read_image(dir / "reserved.png", channels); });
    EXPECT_NE(msg.find("reserved.png"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("JPEG"), std::string::npos) << msg;
  }
}

// Zero-length IDAT chunks are valid PNG; stb copied one from a null buffer (undefined behaviour, found by
// fuzz/fuzz_image_folder under UBSan). The same pixels come back with and without them.
TEST(ImageIo, EmptyPngDataChunksDecodeAsWithout) {
  TempDir dir;
  auto image = torch::rand({3, 5, 7}) * 2 - 1;
  const std::string png = encode_png(image);
  const size_t after_ihdr = 8 + 12 + 13;
  write_file_atomic(dir / "plain.png", png);
  write_file_atomic(dir / "empty_idat.png", png.substr(0, after_ihdr) + png_chunk("IDAT", "") + png_chunk("IDAT", "") +
                                                png.substr(after_ihdr));
  EXPECT_TRUE(torch::equal(read_image(dir / "plain.png"), read_image(dir / "empty_idat.png")));
}

// A PNG header claiming 44612 x 5954 pixels: refused from the header, before any allocation.
TEST(ImageIo, HugeClaimedSizeIsRefusedBeforeDecoding) {
  TempDir dir;
  const std::string ihdr("\0\0\xae\x44\0\0\x17\x42\x08\0\0\0\0", 13);  // 44612 x 5954, 8-bit grey
  // A whole chunk list: stb 2.30 (Debian 13) reads past IHDR to the first IDAT before it reports the size.
  write_file_atomic(dir / "x.png", std::string("\x89PNG\r\n\x1a\n", 8) + png_chunk("IHDR", ihdr) +
                                       png_chunk("IDAT", std::string("\x78\x9c\x03\x00\x00\x00\x00\x01", 8)) +
                                       png_chunk("IEND", ""));
  auto msg = error_of([&] { read_image(dir / "x.png", 1); });
  EXPECT_NE(msg.find("44612 x 5954"), std::string::npos) << msg;
}

// A 54-byte BMP header claiming 5 x 11993088 pixels of 32 bits (240 MB of rows): stb would allocate and decode
// them from nothing (2 s and 0.9 GB; found by fuzz/fuzz_image_folder). Refused from the header and the file size.
TEST(ImageIo, TruncatedBmpIsRefusedBeforeDecoding) {
  TempDir dir;
  auto le = [](uint32_t v, int n) {
    std::string out;
    for (int k = 0; k < n; ++k) out += char((v >> (8 * k)) & 0xff);
    return out;
  };
  const std::string bmp = "BM" + le(54, 4) + le(0, 4) + le(54, 4) + le(40, 4) + le(5, 4) + le(11993088, 4) + le(1, 2) +
                          le(32, 2) + le(0, 4) + le(0, 4) + le(2835, 4) + le(2835, 4) + le(0, 4) + le(0, 4);
  write_file_atomic(dir / "x.bmp", bmp);
  auto msg = error_of([&] { read_image(dir / "x.bmp", 1); });
  EXPECT_NE(msg.find("5 x 11993088"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot hold its rows"), std::string::npos) << msg;
}

// 18 bytes that stb's TGA decoder reads as 44612 x 5954 pixels (24 s and 7.2 GB before failing): formats other
// than PNG, JPEG and BMP are not decoded at all, whatever the file's name.
TEST(ImageIo, OtherFormatsInAPngFileAreRefused) {
  TempDir dir;
  const std::string tga("\0\0\x02\0\0\0\0\0\0\0\0\0\x44\xae\x42\x17\x18\0", 18);
  write_file_atomic(dir / "x.png", tga);
  auto msg = error_of([&] { read_image(dir / "x.png", 1); });
  EXPECT_NE(msg.find("x.png"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot decode"), std::string::npos) << msg;
}

// A JPEG whose Huffman table declares 4080 codes: Debian 12's stb writes past its 257-entry table (found by
// fuzz/fuzz_image_folder under UBSan); refused before stb sees it.
TEST(ImageIo, JpegHuffmanTableOverflowIsRefused) {
  TempDir dir;
  std::string dht("\xff\xd8\xff\xc4\x00\x13\x00", 7);  // SOI, DHT of length 19: class 0, table 0
  dht += std::string(16, '\xff');                          // 16 code lengths of 255 codes each
  write_file_atomic(dir / "x.jpg", dht);
  for (int64_t channels : {0, 1, 3}) {
    auto msg = error_of([&] { read_image(dir / "x.jpg", channels); });
    EXPECT_NE(msg.find("Huffman table declares 4080 codes"), std::string::npos) << msg;
  }
  EXPECT_THROW(image_file_channels(dir / "x.jpg"), std::runtime_error);
}

TEST(Data, ImageFolderClassesAreSubfolders) {
  TempDir dir;
  fs::create_directories(dir / "cat");
  fs::create_directories(dir / "dog");
  auto a = torch::rand({3, 8, 8}) * 2 - 1, b = torch::rand({3, 8, 8}) * 2 - 1, c = torch::rand({3, 8, 8}) * 2 - 1;
  write_png(dir / "cat/1.png", a);
  write_png(dir / "dog/1.png", b);
  write_png(dir / "dog/2.png", c);
  std::ofstream(dir / "dog/notes.txt") << "ignored";
  auto d = load_image_folder(dir.path.string(), 8);
  EXPECT_EQ(d.num_classes, 2);
  EXPECT_EQ(d.class_names, (std::vector<std::string>{"cat", "dog"}));
  EXPECT_TRUE(torch::equal(d.labels, torch::tensor({0, 1, 1}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(to_uint8(d.images[2]), to_uint8(c)));
  // Resized to 4x4 with antialiasing: a constant image stays constant.
  write_png(dir / "cat/2.png", torch::full({3, 8, 12}, 0.5));
  auto small = load_image_folder(dir.path.string(), 4);
  EXPECT_NEAR(small.images[1].min().item<float>(), to_uint8(torch::tensor(0.5)).item<uint8_t>() / 127.5 - 1, 1e-5);
  EXPECT_NEAR(small.images[1].max().item<float>(), small.images[1].min().item<float>(), 1e-5);
  write_file_atomic(dir / "dog/3.png", "not a png");
  auto msg = error_of([&] { load_image_folder(dir.path.string(), 8); });
  EXPECT_NE(msg.find("3.png"), std::string::npos) << msg;
  TempDir empty;
  msg = error_of([&] { load_image_folder(empty.path.string(), 8); });
  EXPECT_NE(msg.find("no .png"), std::string::npos) << msg;
}

TEST(Data, ShapesAreDeterministicAndCoverTheClasses) {
  auto a = make_shapes(200, 32, 3), b = make_shapes(200, 32, 3), c = make_shapes(200, 32, 4);
  EXPECT_TRUE(torch::equal(a.images, b.images));
  EXPECT_FALSE(torch::equal(a.images, c.images));
  EXPECT_EQ(torch::bincount(a.labels, {}, 10).min().item<int64_t>() > 5, true);
  EXPECT_GE(a.images.min().item<float>(), -1.f);
  EXPECT_LE(a.images.max().item<float>(), 1.f);
  // Every image shows a shape: some pixels fully on, the corner pixels off.
  auto flat = a.images.flatten(1);
  EXPECT_TRUE((std::get<0>(flat.max(1)) > 0.9).all().item<bool>());
  EXPECT_TRUE((a.images.select(2, 0).select(2, 0) == -1).all().item<bool>());
}

TEST(Data, BrightnessSpreadSpansDarkToBright) {
  DataSpec spec;
  spec.source = "synthetic-brightness";
  spec.synthetic_count = 2000;
  spec.size = 16;
  auto d = load_dataset(spec);
  auto mean = d.images.mean({1, 2, 3});
  EXPECT_LT(mean.min().item<float>(), -0.9f);
  EXPECT_GT(mean.max().item<float>(), 0.85f);
  // Roughly uniform: each fifth of [-1, 1] holds 10% to 30% of the images.
  auto hist = torch::histc(mean, 5, -1.0, 1.0) / double(d.size());
  EXPECT_GT(hist.min().item<float>(), 0.1f) << hist;
  EXPECT_LT(hist.max().item<float>(), 0.3f) << hist;
  // Brightness is independent of class: class means agree within sampling error.
  for (int64_t k = 0; k < 10; ++k) EXPECT_NEAR(mean.index({d.labels == k}).mean().item<float>(), 0.0, 0.2);
  // The shape stays visible: within-image contrast.
  EXPECT_GT((std::get<0>(d.images.flatten(1).max(1)) - std::get<0>(d.images.flatten(1).min(1))).min().item<float>(), 0.3f);
  // The held-out split is another draw.
  auto h = load_dataset(spec, true);
  EXPECT_EQ(h.size(), 2000 / 6);
  EXPECT_FALSE(torch::equal(h.images[0], d.images[0]));
}

TEST(Data, FitConvertsChannelsAndSize) {
  Dataset d;
  d.images = torch::rand({2, 3, 10, 6}) * 2 - 1;
  d.labels = torch::zeros({2}, torch::kInt64);
  auto g = fit_dataset(d, 1, 10, Fit::pad);
  ASSERT_EQ(g.images.sizes(), (std::vector<int64_t>{2, 1, 10, 10}));
  auto lum = 0.299 * d.images.select(1, 0) + 0.587 * d.images.select(1, 1) + 0.114 * d.images.select(1, 2);
  EXPECT_TRUE(torch::allclose(g.images.select(1, 0).narrow(2, 2, 6), lum));
  EXPECT_TRUE((g.images.narrow(3, 0, 2) == -1).all().item<bool>());
  auto cropped = fit_dataset(d, 3, 4, Fit::pad);  // larger than the target: centre crop
  EXPECT_TRUE(torch::equal(cropped.images, d.images.narrow(2, 3, 4).narrow(3, 1, 4)));
  auto r = fit_dataset(d, 3, 5, Fit::resize);
  EXPECT_EQ(r.images.sizes(), (std::vector<int64_t>{2, 3, 5, 5}));
}

TEST(Data, BatchSamplerIsAPermutationPerEpochAndResumable) {
  BatchSampler s(10, 3, 42);
  EXPECT_EQ(s.steps_per_epoch(), 3);
  std::vector<torch::Tensor> seq;
  for (int64_t step = 0; step < 9; ++step) seq.push_back(s.indices(step).clone());
  for (int64_t e = 0; e < 3; ++e) {
    auto epoch = torch::cat({seq[3 * e], seq[3 * e + 1], seq[3 * e + 2]});
    EXPECT_EQ(std::get<0>(torch::_unique(epoch)).size(0), 9);  // no repeats within an epoch
  }
  EXPECT_FALSE(torch::equal(seq[0], seq[3]));  // a new permutation each epoch
  BatchSampler fresh(10, 3, 42);               // resuming at step 7 sees the same batch
  EXPECT_TRUE(torch::equal(fresh.indices(7), seq[7]));
  EXPECT_TRUE(torch::equal(fresh.indices(1), seq[1]));
  BatchSampler other(10, 3, 43);
  EXPECT_FALSE(torch::equal(other.indices(0), seq[0]));
  EXPECT_THROW(BatchSampler(4, 5, 0), std::invalid_argument);
}

TEST(Data, FlipMirrorsAboutHalfTheImages) {
  Dataset d;
  d.images = torch::rand({64, 1, 4, 4});
  d.labels = torch::arange(64);
  auto idx = torch::arange(64);
  auto b = make_batch(d, idx, true, 7, torch::kCPU);
  auto b2 = make_batch(d, idx, true, 7, torch::kCPU);
  EXPECT_TRUE(torch::equal(b.images, b2.images));
  int flipped = 0;
  for (int64_t i = 0; i < 64; ++i) {
    bool same = torch::equal(b.images[i], d.images[i]);
    bool mirrored = torch::equal(b.images[i], d.images[i].flip({2}));
    EXPECT_TRUE(same || mirrored);
    flipped += mirrored;
  }
  EXPECT_GT(flipped, 16);
  EXPECT_LT(flipped, 48);
  EXPECT_TRUE(torch::equal(make_batch(d, idx, false, 7, torch::kCPU).images, d.images));
}

TEST(ImageIo, GridLayoutAndLabels) {
  auto imgs = torch::full({5, 1, 8, 8}, 1.0);
  auto g = make_grid(imgs, {});
  // ceil(sqrt(5)) = 3 columns, 2 rows, padding 2.
  EXPECT_EQ(g.sizes(), (std::vector<int64_t>{1, 2 + 2 * 10, 2 + 3 * 10}));
  EXPECT_EQ(g[0][2][2].item<uint8_t>(), 255);
  EXPECT_EQ(g[0][0][0].item<uint8_t>(), 40);
  GridOptions o;
  o.cols = 5;
  o.row_labels = {"A1"};
  o.image_labels = {"0", "1", "2", "3", "4"};
  auto lg = make_grid(torch::full({5, 1, 8, 8}, -1.0), o);
  int64_t left = 2 * 6 + 4;
  EXPECT_EQ(lg.size(2), left + 2 + 5 * 10);
  EXPECT_EQ(lg.size(1), 2 + 8 + 9 + 2);
  // The "1" under image 1: its stem is column 2 of the glyph, 7 rows, starting one row below the image.
  int64_t x1 = left + 2 + 10, y1 = 2 + 8 + 1;
  for (int64_t r = 0; r < 7; ++r) EXPECT_EQ(lg[0][y1 + r][x1 + 2].item<uint8_t>(), 255) << r;
  EXPECT_EQ(lg[0][y1 + 3][x1 + 0].item<uint8_t>(), 40);
  // Row label drawn in the left margin, images untouched.
  EXPECT_GT((lg.narrow(2, 0, left) == 255).sum().item<int64_t>(), 10);
  EXPECT_TRUE((lg[0].narrow(0, 2, 8).narrow(1, left + 2, 8) == 0).all().item<bool>());
  o.image_labels = {"x"};
  EXPECT_THROW(make_grid(imgs, o), std::invalid_argument);
}
