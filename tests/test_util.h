// Helpers shared by the test files: temporary folders and exception messages.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "diffuse/io/safetensors.h"

// Multi-process CPU tests run on Gloo: skipped, with the reason, where diffuse was built without it (PyTorch's
// pip LibTorch ships no gloo headers). Both CI lanes have libgloo-dev, so CI runs them everywhere.
#ifdef DIFFUSE_WITH_GLOO
#define DIFFUSE_REQUIRE_GLOO() (void)0
#else
#define DIFFUSE_REQUIRE_GLOO() \
  GTEST_SKIP() << "diffuse was built without Gloo (no gloo headers found): multi-process CPU training is off"
#endif

namespace diffuse::testing {

/// A fresh folder under /tmp, removed with everything in it at the end of the scope.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    char tmpl[] = "/tmp/diffuse-test-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  std::string str() const { return path.string(); }
};

/// A model folder's weights (diffusion_pytorch_model.safetensors) by name.
inline std::map<std::string, torch::Tensor> folder_weights(const std::string& folder) {
  return diffuse::load_safetensors(folder + "/diffusion_pytorch_model.safetensors");
}

/// The two model folders hold the same tensors, bit for bit.
inline void expect_identical_weights(const std::string& a, const std::string& b) {
  auto wa = folder_weights(a), wb = folder_weights(b);
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, t] : wa) EXPECT_TRUE(torch::equal(t, wb.at(name))) << a << " vs " << b << ": " << name;
}

/// `ours` holds the same tensor names with the same shapes as `reference` (a diffusers state dict).
inline void expect_names_and_shapes(const std::map<std::string, torch::Tensor>& ours,
                                    const std::map<std::string, torch::Tensor>& reference) {
  ASSERT_EQ(ours.size(), reference.size());
  for (const auto& [name, t] : reference) {
    ASSERT_TRUE(ours.count(name)) << "diffusers has " << name << ", diffuse does not";
    EXPECT_EQ(ours.at(name).sizes(), t.sizes()) << name;
  }
}

/// The what() of the exception `f` throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

/// Expects `f` to throw an exception whose what() contains `needle`.
template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace diffuse::testing
