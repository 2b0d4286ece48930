// Images with captions, for text-to-image training: a folder of images with same-named .txt captions, or a folder
// with metadata.jsonl (one {"file_name": ..., "text": ...} object per line: the layout of diffusers' training
// examples and of Hugging Face's imagefolder).
//
// Each image is brought to resolution x resolution as diffusers' train_text_to_image.py does with --center_crop:
// the shorter side resized to the resolution (bilinear, antialiased when shrinking) and the centre cropped. Grey
// images become RGB; an alpha channel is flattened onto white or refused (CaptionFolderOptions::alpha).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse {

struct CaptionFolderOptions {
  int64_t resolution = 512;
  /// "center". ("random" is refused: latents are cached per image, so a crop drawn per step would need the
  /// autoencoder at every step.)
  std::string crop = "center";
  std::string alpha = "flatten";     ///< flatten (onto white, counted in the notes) or refuse
  std::string bad_files = "refuse";  ///< refuse (the first bad file throws) or skip (counted, first names noted)
  int64_t limit = 0;                 ///< >0: the first `limit` images (in file-name order)

  void validate() const;
};

struct CaptionedImages {
  torch::Tensor images;               ///< float32 [N, 3, R, R] in [-1, 1]
  std::vector<std::string> captions;  ///< one per image (UTF-8)
  std::vector<std::string> files;     ///< the image files, relative to the folder
  std::string layout;                 ///< "metadata.jsonl" or "txt"
  std::vector<std::string> notes;     ///< what was skipped, flattened or ignored, for stderr

  int64_t size() const { return int64_t(captions.size()); }
};

/// Reads a caption folder. Throws std::invalid_argument naming the folder when it holds no captioned image, and
/// (bad_files refuse) naming the first file that cannot be used: undecodable, missing caption, a metadata line
/// that is not an object with string file_name and text, a file_name that does not exist.
CaptionedImages load_caption_folder(const std::string& dir, const CaptionFolderOptions& options = {});

}  // namespace diffuse
