// CLIP's byte-level BPE tokenizer (Radford et al. 2021), reading a Stable Diffusion pipeline's tokenizer/ folder
// (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) and giving the ids transformers'
// CLIPTokenizer gives, the ids a diffusers pipeline feeds its text encoder.
//
// Two normalisations:
//   transformers (default)  what diffusers pipelines use without ftfy: transformers' BasicTokenizer (control
//                           characters dropped, whitespace collapsed, spaces around CJK ideographs, NFC, lowercase),
//                           with the added tokens (<|startoftext|>, <|endoftext|>, SD 2.x's pad "!") split out first
//                           and mapped to their ids;
//   clip                    original CLIP / open_clip (which trained SD 2.x) minus ftfy: NFC, whitespace collapsed,
//                           lowercase; no added-token split, no CJK split.
// Then both: CLIP's pre-tokenizer regex (Unicode letters and numbers through ICU), UTF-8 bytes as printable
// symbols, and the merges in rank order with "</w>" ending each word.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

enum class TextNormalization { transformers, clip };

/// A prompt's ids: bos, its tokens, eos, then pad to max_length (truncated to max_length - 2 tokens first).
struct TokenizedPrompt {
  std::vector<int64_t> ids;        ///< max_length ids
  int64_t tokens = 0;              ///< the prompt's tokens before truncation (without bos and eos)
  std::string dropped;             ///< the text of the tokens truncation dropped, empty when none
};

class ClipTokenizer {
 public:
  /// Reads `folder`/vocab.json, merges.txt, and (when present) tokenizer_config.json and special_tokens_map.json
  /// for the special tokens, the pad token and model_max_length. Throws std::runtime_error naming the file.
  static ClipTokenizer load(const std::string& folder);
  /// From parts (tests): vocab token -> id, merges in rank order.
  ClipTokenizer(std::map<std::string, int64_t> vocab, std::vector<std::pair<std::string, std::string>> merges,
                std::string bos = "<|startoftext|>", std::string eos = "<|endoftext|>", std::string pad = "<|endoftext|>",
                int64_t max_length = 77);

  /// The BPE token strings of `text` (no bos / eos). Invalid UTF-8 throws std::invalid_argument.
  std::vector<std::string> tokenize(const std::string& text) const;
  /// bos + ids of `text` + eos, untruncated.
  std::vector<int64_t> encode(const std::string& text) const;
  /// encode, truncated to max_length (the last kept id is eos) and padded with the pad token to max_length.
  TokenizedPrompt encode_padded(const std::string& text) const;

  TextNormalization normalization = TextNormalization::transformers;
  int64_t max_length() const { return max_length_; }
  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t vocab_size() const { return int64_t(vocab_.size()); }

 private:
  std::vector<std::string> bpe_word(const std::string& symbols) const;
  int64_t id_of(const std::string& token) const;

  std::map<std::string, int64_t> vocab_;
  std::map<std::pair<std::string, std::string>, int64_t> ranks_;
  std::vector<std::string> added_;  ///< added tokens split out before normalisation (transformers), longest first
  int64_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0, unk_id_ = 0, max_length_ = 77;
};

}  // namespace diffuse
