#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>

#include <torch/torch.h>

#include "diffuse/io/files.h"
#include "diffuse/io/safetensors.h"
#include "diffuse/core/scheduler_config.h"
#include "test_util.h"

using namespace diffuse;
using diffuse::testing::TempDir;

namespace {

// A safetensors file from a literal header and a data section.
std::string make_file(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string f32_bytes(std::initializer_list<float> values) {
  std::string s(values.size() * 4, '\0');
  std::memcpy(s.data(), values.begin(), s.size());
  return s;
}

// Parsing must fail with a runtime_error whose message contains `needle`.
void expect_rejected(const std::string& bytes, const std::string& needle) {
  try {
    parse_safetensors(bytes, "bad.safetensors");
    ADD_FAILURE() << "accepted a bad file; expected an error containing '" << needle << "'";
  } catch (const std::runtime_error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  torch::manual_seed(0);
  std::map<std::string, torch::Tensor> tensors;
  auto base = torch::randn({3, 5}) * 100;
  for (auto type : {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt64, torch::kInt32,
                    torch::kInt16, torch::kInt8, torch::kUInt8})
    tensors[std::string("t_") + c10::toString(type)] = base.to(type);
  tensors["bool"] = base > 0;
  tensors["scalar"] = torch::tensor(3.5);
  tensors["empty"] = torch::zeros({0, 4});
  tensors["strided"] = torch::arange(12, torch::kFloat32).view({3, 4}).t();  // not contiguous
  TempDir tmp;
  auto dir = tmp.str();
  auto path = dir + "/all.safetensors";
  save_safetensors(path, tensors, {{"format", "pt"}, {"note", "round trip"}});
  auto back = load_safetensors(path);
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(back.count(name)) << name;
    EXPECT_EQ(back[name].scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back[name].sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(back[name], t)) << name;
  }
  auto meta = safetensors_metadata(path);
  EXPECT_EQ(meta.at("format"), "pt");
  EXPECT_EQ(meta.at("note"), "round trip");
  // The header is padded to a multiple of 8 bytes, so the data section stays aligned.
  auto bytes = read_file(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp" + std::to_string(getpid())));  // write_file_atomic's temporary
  std::filesystem::remove_all(dir);
}

// The writer's bytes, checked against the format specification by hand.
TEST(Safetensors, WriterBytesFollowTheFormat) {
  auto bytes = serialize_safetensors({{"a", torch::tensor({1.0f, 2.0f})}});
  std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";  // 54 bytes
  header.append(2, ' ');                                                            // padded to 56
  EXPECT_EQ(bytes, make_file(header, f32_bytes({1.0f, 2.0f})));
}

TEST(Safetensors, ReadsDiffusersFixture) {
  auto io = load_safetensors(std::string(DIFFUSE_FIXTURES) + "/diffusers/unet_forward.safetensors");
  ASSERT_EQ(io.size(), 4u);
  EXPECT_EQ(io["x"].sizes(), (std::vector<int64_t>{4, 1, 16, 16}));
  EXPECT_EQ(io["x"].scalar_type(), torch::kFloat32);
  EXPECT_EQ(io["timesteps"].scalar_type(), torch::kInt64);
  EXPECT_TRUE(torch::equal(io["timesteps"], torch::tensor({0, 17, 500, 999}, torch::kInt64)));
  EXPECT_EQ(io["out"].sizes(), (std::vector<int64_t>{4, 1, 16, 16}));
  auto path = std::string(DIFFUSE_FIXTURES) + "/diffusers/unet/diffusion_pytorch_model.safetensors";
  auto weights = load_safetensors(path);
  EXPECT_EQ(weights.size(), 145u);
  EXPECT_EQ(weights.at("conv_in.weight").sizes(), (std::vector<int64_t>{32, 1, 3, 3}));
  EXPECT_EQ(safetensors_metadata(path).at("format"), "pt");
}

TEST(Safetensors, RejectsEveryTruncation) {
  auto good = serialize_safetensors({{"a", torch::arange(6, torch::kFloat32)}, {"b", torch::ones({2}, torch::kInt64)}},
                                    {{"format", "pt"}});
  ASSERT_NO_THROW(parse_safetensors(good, "good"));
  for (size_t len = 0; len < good.size(); ++len)
    EXPECT_THROW(parse_safetensors(good.substr(0, len), "cut"), std::runtime_error) << "length " << len;
  // Extra bytes after the last tensor are refused too.
  expect_rejected(good + "xx", "cover");
}

TEST(Safetensors, RejectsBadHeaderLengths) {
  auto good = serialize_safetensors({{"a", torch::ones({2})}});
  for (uint64_t n : {uint64_t(1) << 63, uint64_t(1) << 40, uint64_t(good.size()), uint64_t(good.size() - 7)}) {
    auto bad = good;
    std::memcpy(bad.data(), &n, 8);
    EXPECT_THROW(parse_safetensors(bad, "len"), std::runtime_error) << n;
  }
  expect_rejected(std::string(8, '\xff') + "{}", "header length");
  expect_rejected(std::string("\x05\0\0\0\0\0\0\0", 8) + "not j", "start with '{'");
  expect_rejected(make_file("{\"a\": ", ""), "not valid JSON");
  expect_rejected(make_file("{}x", ""), "not valid JSON");
}

TEST(Safetensors, RejectsBadEntries) {
  const auto d8 = f32_bytes({1, 2});
  expect_rejected(make_file(R"({"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}})", d8), "unsupported dtype 'F7'");
  expect_rejected(make_file(R"({"a":{"dtype":"U32","shape":[2],"data_offsets":[0,8]}})", d8), "unsupported dtype");
  expect_rejected(make_file(R"({"a":{"dtype":3,"shape":[2],"data_offsets":[0,8]}})", d8), "dtype must be a string");
  expect_rejected(make_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8), "no 'dtype'");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8), "non-negative");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", d8), "non-negative");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8), "needs 12 bytes");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", d8),
                  "overflows");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8), "end < begin");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8), "[begin, end]");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", d8), "gap");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                            d8 + f32_bytes({3})),
                  "overlaps");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d8), "truncated");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                            d8),
                  "twice");
  expect_rejected(make_file(R"([1, 2])", ""), "start with '{'");
  expect_rejected(make_file(R"({"a": 5})", ""), "expected an object");
  expect_rejected(make_file(R"({"__metadata__":{"k":1}})", ""), "not a string");
  expect_rejected(make_file(R"({"b":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}})", "\x07"), "BOOL byte");
  // An empty file of tensors is valid.
  EXPECT_TRUE(parse_safetensors(make_file("{}", ""), "empty").empty());
}

// Random byte corruptions are either read or rejected with std::runtime_error, never a crash.
TEST(Safetensors, SurvivesRandomCorruption) {
  auto good = serialize_safetensors(
      {{"w", torch::randn({4, 3})}, {"i", torch::arange(5, torch::kInt64)}, {"h", torch::ones({3}, torch::kFloat16)}},
      {{"format", "pt"}});
  std::mt19937 rng(1);
  for (int trial = 0; trial < 3000; ++trial) {
    auto bad = good;
    int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      // Most flips land in the 8-byte length and the JSON header, where the validation lives.
      size_t pos = rng() % 3 == 0 ? rng() % bad.size() : rng() % std::min<size_t>(bad.size(), 200);
      bad[pos] = char(rng() % 256);
    }
    try {
      parse_safetensors(bad, "fuzz");
    } catch (const std::runtime_error&) {
    }
  }
}

TEST(Safetensors, ErrorsNameTheFile) {
  TempDir tmp;
  auto dir = tmp.str();
  auto path = dir + "/broken.safetensors";
  write_file_atomic(path, "garbage!!");
  try {
    load_safetensors(path);
    FAIL() << "accepted garbage";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_safetensors(dir + "/missing.safetensors"), std::runtime_error);
  std::filesystem::remove_all(dir);
}

// JSON nested 10^5 deep overflowed the stack in nlohmann's parser: refused at a depth limit with the file named.
TEST(Safetensors, DeepJsonIsRefusedNotACrash) {
  TempDir dir;
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  write_file_atomic(dir / "deep.json", "{\"a\": " + deep + "}");
  auto msg = diffuse::testing::error_of([&] { load_json(dir / "deep.json"); });
  EXPECT_NE(msg.find("deep.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("nested deeper"), std::string::npos) << msg;
  // Brackets inside strings do not count.
  write_file_atomic(dir / "text.json", "{\"a\": \"" + std::string(1000, '[') + "\"}");
  EXPECT_EQ(load_json(dir / "text.json")["a"].get<std::string>().size(), 1000u);
  // A safetensors header.
  const std::string header = "{\"__metadata__\": {\"x\": " + deep + "}}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[size_t(i)] = char((uint64_t(header.size()) >> (8 * i)) & 0xff);
  write_file_atomic(dir / "deep.safetensors", file + header);
  msg = diffuse::testing::error_of([&] { load_safetensors(dir / "deep.safetensors"); });
  EXPECT_NE(msg.find("nested deeper"), std::string::npos) << msg;
}
