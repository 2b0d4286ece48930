// What the networks' config.json readers share beyond the typed fields of io/json_fields.h: size limits, the
// per-level block lists, the keys of the UNet's encoder half (which the noisy classifier shares), the options of
// every block.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "diffuse/models/blocks.h"
#include "io/json_fields.h"

namespace diffuse::json_config {

/// Sizes beyond these are refused before any module is built (a corrupt or hostile config.json must not allocate
/// until memory runs out): levels, channels per level, resnets per level, image side, class embeddings.
constexpr size_t kMaxLevels = 16;
constexpr int64_t kMaxChannels = 65536, kMaxLayersPerBlock = 64, kMaxSampleSize = 16384, kMaxClasses = 1 << 20;

/// The per-level lists of a UNet-style config: at least one level of positive channel counts, one down and one
/// up block type per level, each a supported one, and GroupNorm groups that divide every level's channels.
inline void check_levels(const std::vector<int64_t>& channels, const std::vector<std::string>& down,
                         const std::vector<std::string>& up, const std::set<std::string>& down_supported,
                         const std::set<std::string>& up_supported, int64_t norm_groups) {
  const size_t levels = channels.size();
  if (levels == 0) refuse("block_out_channels", "[]", "at least one level");
  if (levels > kMaxLevels) refuse("block_out_channels", std::to_string(levels) + " levels", "at most 16 levels");
  for (auto c : channels)
    if (c <= 0 || c > kMaxChannels) refuse("block_out_channels", std::to_string(c), "channel counts in [1, 65536]");
  auto check_types = [&](const char* key, const std::vector<std::string>& types, const std::set<std::string>& ok) {
    if (types.size() != levels)
      refuse(key, std::to_string(types.size()) + " entries",
             "one per block_out_channels entry (" + std::to_string(levels) + ")");
    std::string names;
    for (const auto& n : ok) names += (names.empty() ? "" : " or ") + n;
    for (const auto& t : types)
      if (!ok.count(t)) refuse(key, t, names);
  };
  check_types("down_block_types", down, down_supported);
  check_types("up_block_types", up, up_supported);
  for (auto c : channels)
    if (norm_groups <= 0 || c % norm_groups != 0)
      refuse("norm_num_groups", std::to_string(norm_groups),
             "a divisor of every block_out_channels entry (" + std::to_string(c) + ")");
}

/// The keys of UNet2DModel's encoder half, which the noisy classifier (an encoder with a classification head)
/// shares: a field list (see json_fields.h) that both configs' lists include.
inline constexpr auto encoder_fields = [](auto& c, auto&& f) {
  f("sample_size", c.sample_size);
  f("in_channels", c.in_channels);
  f("down_block_types", c.down_block_types);
  f("block_out_channels", c.block_out_channels);
  f("layers_per_block", c.layers_per_block);
  f("attention_head_dim", c.attention_head_dim);
  f("norm_num_groups", c.norm_num_groups);
  f("norm_eps", c.norm_eps);
  f("resnet_time_scale_shift", c.resnet_time_scale_shift);
  f("dropout", c.dropout);
  f("downsample_padding", c.downsample_padding);
  f("flip_sin_to_cos", c.flip_sin_to_cos);
  f("freq_shift", c.freq_shift, Style::integral);
  f("add_attention", c.add_attention);
};

/// A `To` config with the encoder keys of `from` (a UNet's into a classifier's config or back), carried as
/// config.json would carry them; every other key keeps To's default.
template <class To, class From>
To with_encoder_of(const From& from) {
  nlohmann::json shared = nlohmann::json::object();
  encoder_fields(from, Writer(shared));
  To to;
  encoder_fields(to, Reader(shared));
  return to;
}

/// The options every block of a network shares, from config values.
inline BlockOptions block_options(int64_t temb_channels, int64_t groups, double eps, double dropout,
                                  const std::string& time_scale_shift, std::optional<int64_t> head_dim,
                                  int64_t channels) {
  BlockOptions o;
  o.temb_channels = temb_channels;
  o.groups = groups;
  o.eps = eps;
  o.dropout = dropout;
  o.time_scale_shift = parse_time_scale_shift(time_scale_shift);
  o.head_dim = head_dim.value_or(channels);
  return o;
}

/// The options of the blocks at `channels` of a UNet-style config (UNet2DModel, the noisy classifier): the time
/// embedding is 4 x the first level's channels.
template <class Config>
BlockOptions encoder_block_options(const Config& c, int64_t channels) {
  return block_options(c.block_out_channels[0] * 4, c.norm_num_groups, c.norm_eps, c.dropout,
                       c.resnet_time_scale_shift, c.attention_head_dim, channels);
}

/// The down blocks of a UNet-style encoder (UNet2DModel, the noisy classifier): level i goes from the previous
/// level's channels (channels[0] for the first) to channels[i] with `layers` resnets, attention where its type is
/// AttnDownBlock2D, and a downsampler on every level but the last. `options(c)` gives the blocks' options at c channels.
template <class Options>
void add_down_blocks(torch::nn::ModuleList& blocks, Options&& options, const std::vector<int64_t>& channels,
                     int64_t layers, const std::vector<std::string>& types, int64_t downsample_padding) {
  const int64_t levels = int64_t(channels.size());
  int64_t out = channels[0];
  for (int64_t i = 0; i < levels; ++i) {
    const int64_t in = out;
    out = channels[size_t(i)];
    blocks->push_back(DownBlock(options(out), in, out, layers, types[size_t(i)] == "AttnDownBlock2D", i + 1 < levels,
                                downsample_padding));
  }
}

}  // namespace diffuse::json_config
