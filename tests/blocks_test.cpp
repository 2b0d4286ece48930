#include <gtest/gtest.h>

#include <torch/torch.h>

#include "diffuse/models/attention.h"
#include "diffuse/models/blocks.h"

using namespace diffuse;

namespace {
double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }
}  // namespace

// The fused CPU attention kernel against batched matrix products, forward and backward, for head sizes that
// are and are not multiples of the vector width, sequence lengths that are not, and strided (q, k, v split
// from one projection) inputs.
TEST(Attention, FusedKernelMatchesReference) {
  torch::manual_seed(0);
  struct Case {
    int64_t n, lq, lk, heads, d;
  };
  for (auto cs : {Case{2, 37, 37, 4, 8}, Case{3, 64, 64, 2, 12}, Case{1, 5, 19, 1, 3}, Case{2, 256, 256, 16, 8}}) {
    const int64_t c = cs.heads * cs.d;
    // Position-major ([N, L, 3C], as from channels-last images) or channel-major ([N, 3C, L], as from NCHW).
    const bool channel_major = cs.d % 2 == 0 && cs.lq % 2 == 0;
    const int64_t l = std::max(cs.lq, cs.lk);
    auto qkv = (channel_major ? torch::randn({cs.n, 3 * c, l}).transpose(1, 2) : torch::randn({cs.n, l, 3 * c})) * 2;
    qkv = qkv.detach().requires_grad_(true);
    auto q = qkv.narrow(1, 0, cs.lq).narrow(2, 0, c);
    auto k = qkv.narrow(1, 0, cs.lk).narrow(2, c, c);
    auto v = qkv.narrow(1, 0, cs.lk).narrow(2, 2 * c, c);
    const double scale = 1.0 / std::sqrt(double(cs.d));
    auto fused = multi_head_attention(q, k, v, cs.heads, scale);
    auto reference = multi_head_attention_reference(q, k, v, cs.heads, scale);
    ASSERT_EQ(fused.sizes(), reference.sizes());
    // float32 scores of magnitude ~30 carry ~2e-6 relative rounding into exp; both sides have it.
    EXPECT_LT(max_abs(fused - reference), 2e-6 * std::max(1.0, max_abs(reference)) * 5) << cs.lq << " " << cs.d;
    auto weight = torch::randn_like(reference);
    auto g_fused = torch::autograd::grad({(fused * weight).sum()}, {qkv})[0];
    auto g_ref = torch::autograd::grad({(reference * weight).sum()}, {qkv})[0];
    EXPECT_LT(max_abs(g_fused - g_ref), 2e-5 * std::max(1.0, max_abs(g_ref))) << cs.lq << " " << cs.d;
  }
}

// Large logits: the kernel's softmax subtracts the row maximum and stays finite; a row whose scores are all
// equal averages the values.
TEST(Attention, FusedKernelIsStable) {
  auto q = torch::full({1, 3, 8}, 100.0f), k = torch::full({1, 4, 8}, 100.0f);
  auto v = torch::arange(32, torch::kFloat32).view({1, 4, 8});
  auto out = multi_head_attention(q, k, v, 1, 1.0);
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  EXPECT_LT(max_abs(out[0][0] - v[0].mean(0)), 1e-5);
  // Off the CPU float32 path (float64 here), the reference is used and agrees.
  auto q64 = torch::randn({2, 9, 6}, torch::kFloat64), k64 = torch::randn({2, 9, 6}, torch::kFloat64);
  auto o64 = multi_head_attention(q64, k64, k64, 2, 0.5);
  auto o32 = multi_head_attention(q64.to(torch::kFloat32), k64.to(torch::kFloat32), k64.to(torch::kFloat32), 2, 0.5);
  EXPECT_LT(max_abs(o64 - o32.to(torch::kFloat64)), 1e-5);
}
