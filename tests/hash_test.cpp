// FNV-1a 64 against the published test vectors (Fowler, Noll, Vo: "a" -> af63dc4c8601ec8c, "foobar" ->
// 85944171f73967e8), and file_hash over a file's bytes.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "diffuse/eval/features.h"
#include "diffuse/io/hash.h"
#include "test_util.h"

using diffuse::Fnv1a;

namespace {
std::string fnv(const std::string& s) {
  Fnv1a h;
  h.add(s.data(), s.size());
  return h.hex();
}
}  // namespace

TEST(Hash, Fnv1aKnownAnswers) {
  EXPECT_EQ(fnv(""), "cbf29ce484222325");
  EXPECT_EQ(fnv("a"), "af63dc4c8601ec8c");
  EXPECT_EQ(fnv("foobar"), "85944171f73967e8");
  Fnv1a pieces;  // fed in pieces: the same as at once
  pieces.add("foo", 3);
  pieces.add("bar", 3);
  EXPECT_EQ(pieces.hex(), "85944171f73967e8");
}

TEST(Hash, FileHashIsFnv1aOfTheBytes) {
  diffuse::testing::TempDir dir;
  std::ofstream(dir / "f.bin", std::ios::binary) << "foobar";
  EXPECT_EQ(diffuse::file_hash(dir / "f.bin"), "85944171f73967e8");
}
