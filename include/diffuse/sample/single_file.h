// Stable Diffusion 1.x / 2.x "single-file" checkpoints in the original (CompVis / Stability) layout, as most users
// download them (v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors), read into diffusers' modules
// through one key map: the one diffusers' single-file loader applies (diffusers/loaders/single_file_utils.py).
//
//   UNet (model.diffusion_model.)    input_blocks.0.0 = conv_in; time_embed.0 / .2 = time_embedding.linear_1 / _2;
//                                    input_blocks.{1 + b (L + 1) + j}.0 / .1 = down_blocks.b.resnets.j / attentions.j,
//                                    input_blocks.{(b + 1)(L + 1)}.0.op = down_blocks.b.downsamplers.0.conv;
//                                    middle_block.0 / .1 / .2 = mid_block.resnets.0 / attentions.0 / resnets.1;
//                                    output_blocks.{b (L + 1) + j}.0 / .1 = up_blocks.b.resnets.j / attentions.j,
//                                    output_blocks.{b (L + 1) + L}.{2 with attention, else 1}.conv = upsamplers.0.conv;
//                                    out.0 / out.2 = conv_norm_out / conv_out; inside resnets in_layers.0 / .2 =
//                                    norm1 / conv1, out_layers.0 / .3 = norm2 / conv2, emb_layers.1 = time_emb_proj,
//                                    skip_connection = conv_shortcut; transformer names are the same on both sides.
//   VAE (first_stage_model.)         encoder.down.i.block.j / .downsample.conv, decoder.up.{n - 1 - i}.block.j /
//                                    .upsample.conv, {en,de}coder.mid.block_1 / attn_1 / block_2, norm_out,
//                                    nin_shortcut = conv_shortcut; attn_1's norm, q, k, v, proj_out (1x1 convolutions)
//                                    = group_norm, to_q, to_k, to_v, to_out.0 (linear).
//   SD 1.x text (cond_stage_model.transformer.)  transformers' CLIPTextModel names.
//   SD 2.x text (cond_stage_model.model.)        OpenCLIP: token_embedding, positional_embedding, ln_final,
//                                    transformer.resblocks.i.{ln_1, attn.in_proj (q, k, v stacked), attn.out_proj,
//                                    ln_2, mlp.c_fc, mlp.c_proj}; resblocks.23 and text_projection, which SD 2.x
//                                    never uses (it reads the penultimate layer), are skipped as diffusers skips them.
// SD 1.x or 2.x is told from the tensors; the configs are inferred from their shapes, or taken from a diffusers
// pipeline folder (config_folder). v prediction, which the file does not record, comes from an option.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include "diffuse/models/unet_condition.h"
#include "diffuse/models/vae.h"
#include "diffuse/text/clip_text.h"

namespace diffuse {

struct SingleFileOptions {
  bool v_prediction = false;   ///< the file's model predicts v (SD 2.x 768-v); it does not say so itself
  std::string config_folder;   ///< a diffusers pipeline folder whose unet/, vae/, text_encoder/ and scheduler/ configs
                               ///< to use instead of the inferred ones (diffusers' from_single_file(config=...))
};

/// The networks of an original-layout checkpoint under diffusers' names, with their configs.
struct OriginalCheckpoint {
  std::string family;                       ///< "SD 1.x" or "SD 2.x"
  UNetConditionConfig unet_config;
  AutoencoderKLConfig vae_config;
  ClipTextConfig text_config;
  nlohmann::json scheduler_config;          ///< DDIMScheduler with SD's schedule, or config_folder's
  std::map<std::string, torch::Tensor> unet, vae, text_encoder;
  std::vector<std::string> notes;           ///< what was skipped or assumed
};

/// Reads `path` (safetensors). Errors name the file and the first tensor that does not fit; tensors of no network
/// (EMA copies, the schedule's buffers) are named in a note; any other unknown tensor is an error.
OriginalCheckpoint read_original_checkpoint(const std::string& path, const SingleFileOptions& options = {});

/// The key map above for one original name (without the file's prefix): the diffusers name, or "" when the name is
/// not part of the map. layers: layers_per_block; levels: the autoencoder's.
std::string diffusers_unet_name(const std::string& original_name, int64_t layers);
std::string diffusers_vae_name(const std::string& original_name, int64_t levels);

}  // namespace diffuse
