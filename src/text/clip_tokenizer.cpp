// CLIP's tokenizer: transformers' tokenization_clip.py (CLIPTokenizer, bytes_to_unicode, bpe) and the BasicTokenizer
// of tokenization_bert.py that it uses without ftfy. Unicode (categories, NFC, lowercase, \p{L} / \p{N}) is ICU's.
#include "diffuse/text/clip_tokenizer.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "diffuse/io/files.h"

namespace diffuse {
namespace {

// ---- Unicode helpers ----

// The code points of UTF-8 text; ill-formed input throws naming the byte offset.
std::u32string decode_utf8(const std::string& text) {
  std::u32string out;
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const int32_t length = int32_t(std::min<size_t>(text.size(), size_t(std::numeric_limits<int32_t>::max())));
  if (size_t(length) != text.size()) throw std::invalid_argument("prompt longer than 2 GiB");
  for (int32_t i = 0; i < length;) {
    const int32_t at = i;
    UChar32 c;
    U8_NEXT(s, i, length, c);
    if (c < 0)
      throw std::invalid_argument("the prompt is not valid UTF-8 (byte " + std::to_string(at) +
                                  "): pass text in UTF-8");
    out.push_back(char32_t(c));
  }
  return out;
}

icu::UnicodeString to_icu(const std::u32string& s) {
  icu::UnicodeString out;
  for (char32_t c : s) out.append(UChar32(c));
  return out;
}

std::u32string from_icu(const icu::UnicodeString& s) {
  std::u32string out;
  for (int32_t i = 0; i < s.length();) {
    const UChar32 c = s.char32At(i);
    out.push_back(char32_t(c));
    i += U16_LENGTH(c);
  }
  return out;
}

std::string utf8_of(const std::u32string& s) {
  std::string out;
  to_icu(s).toUTF8String(out);
  return out;
}

void check(UErrorCode status, const char* what) {
  if (U_FAILURE(status)) throw std::runtime_error(std::string("ICU ") + what + ": " + u_errorName(status));
}

std::u32string nfc(const std::u32string& s) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(status);
  check(status, "NFC");
  auto out = n->normalize(to_icu(s), status);
  check(status, "NFC");
  return from_icu(out);
}

// Python's str.lower(): full case mapping, final sigma included (ICU's root locale).
std::u32string lower(const std::u32string& s) {
  auto u = to_icu(s);
  u.toLower(icu::Locale::getRoot());
  return from_icu(u);
}

bool category_starts_with_c(char32_t c) {
  const auto mask = U_GET_GC_MASK(UChar32(c));
  return (mask & (U_GC_CC_MASK | U_GC_CF_MASK | U_GC_CN_MASK | U_GC_CO_MASK | U_GC_CS_MASK)) != 0;
}

// BasicTokenizer's _is_whitespace and _is_control.
bool is_bert_whitespace(char32_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || u_charType(UChar32(c)) == U_SPACE_SEPARATOR; }
bool is_bert_control(char32_t c) { return !(c == '\t' || c == '\n' || c == '\r') && category_starts_with_c(c); }

// What Python's str.split() splits on (after _clean_text only separators Zs, Zl, Zp and ASCII white space remain).
bool is_python_space(char32_t c) {
  if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f) || c == 0x85) return true;
  const auto t = u_charType(UChar32(c));
  return t == U_SPACE_SEPARATOR || t == U_LINE_SEPARATOR || t == U_PARAGRAPH_SEPARATOR;
}

// BasicTokenizer._is_chinese_char: the CJK Unified Ideographs blocks it lists (its ranges, not a Unicode property).
bool is_cjk_ideograph(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

std::vector<std::u32string> split_python_space(const std::u32string& s) {
  std::vector<std::u32string> words;
  std::u32string word;
  for (char32_t c : s) {
    if (is_python_space(c)) {
      if (!word.empty()) words.push_back(word);
      word.clear();
    } else {
      word.push_back(c);
    }
  }
  if (!word.empty()) words.push_back(word);
  return words;
}

std::u32string join(const std::vector<std::u32string>& words) {
  std::u32string out;
  for (const auto& w : words) out += (out.empty() ? U"" : U" ") + w;
  return out;
}

// transformers' BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize, joined by spaces.
std::u32string basic_tokenizer(const std::u32string& text) {
  std::u32string cleaned;
  for (char32_t c : text) {
    if (c == 0 || c == 0xFFFD || is_bert_control(c)) continue;
    if (is_cjk_ideograph(c)) {
      cleaned += U" ";
      cleaned.push_back(c);
      cleaned += U" ";
    } else {
      cleaned.push_back(is_bert_whitespace(c) ? U' ' : c);
    }
  }
  auto words = split_python_space(nfc(cleaned));
  for (auto& w : words) w = lower(w);
  return join(split_python_space(join(words)));
}

// Original CLIP's whitespace_clean(basic_clean(text)).lower() without ftfy: NFC, white space runs to one space.
std::u32string clip_normalize(const std::u32string& text) {
  std::u32string out;
  bool space = false;
  for (char32_t c : nfc(text)) {
    if (u_isUWhiteSpace(UChar32(c)) || is_python_space(c)) {
      space = true;
      continue;
    }
    if (space && !out.empty()) out.push_back(U' ');
    space = false;
    out.push_back(c);
  }
  return lower(out);
}

// CLIP's pre-tokenizer: its special tokens, contractions, letter runs, single digits, other non-space runs.
std::vector<std::string> clip_words(const std::u32string& text) {
  static const char16_t* kPattern =
      u"<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";
  UErrorCode status = U_ZERO_ERROR;
  static std::unique_ptr<icu::RegexPattern> pattern(
      icu::RegexPattern::compile(icu::UnicodeString(kPattern), UREGEX_CASE_INSENSITIVE, status));
  check(status, "regex");
  const auto input = to_icu(text);
  std::unique_ptr<icu::RegexMatcher> m(pattern->matcher(input, status));
  check(status, "regex");
  std::vector<std::string> words;
  while (m->find(status)) {
    std::string w;
    m->group(status).toUTF8String(w);
    words.push_back(w);
  }
  check(status, "regex");
  return words;
}

// bytes_to_unicode: each byte as a printable code point (UTF-8 encoded), and the inverse.
const std::vector<std::string>& byte_symbols() {
  static const std::vector<std::string> symbols = [] {
    std::vector<std::string> s(256);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      s[size_t(b)] = utf8_of(std::u32string(1, char32_t(printable ? b : 256 + n++)));
    }
    return s;
  }();
  return symbols;
}

// The printable symbols of a word's UTF-8 bytes, one string per byte.
std::vector<std::string> symbols_of(const std::string& word) {
  std::vector<std::string> out;
  for (unsigned char b : word) out.push_back(byte_symbols()[b]);
  return out;
}

// The text of BPE tokens: symbols back to bytes, "</w>" to a space.
std::string detokenize(const std::vector<std::string>& tokens) {
  static const std::map<std::string, char> inverse = [] {
    std::map<std::string, char> m;
    for (int b = 0; b < 256; ++b) m[byte_symbols()[size_t(b)]] = char(b);
    return m;
  }();
  std::string out;
  for (const auto& token : tokens) {
    std::string t = token;
    const bool end = t.size() >= 4 && t.compare(t.size() - 4, 4, "</w>") == 0;
    if (end) t.resize(t.size() - 4);
    for (const auto& c : decode_utf8(t)) {
      const auto it = inverse.find(utf8_of(std::u32string(1, c)));
      if (it != inverse.end()) out.push_back(it->second);
    }
    if (end) out.push_back(' ');
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// ---- reading the tokenizer folder ----

// A special token's content: a string, or an object with "content" (special_tokens_map / tokenizer_config forms).
std::string token_content(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

ClipTokenizer::ClipTokenizer(std::map<std::string, int64_t> vocab, std::vector<std::pair<std::string, std::string>> merges,
                             std::string bos, std::string eos, std::string pad, int64_t max_length)
    : vocab_(std::move(vocab)), max_length_(max_length) {
  for (size_t i = 0; i < merges.size(); ++i) ranks_.emplace(merges[i], int64_t(i));
  auto need = [&](const std::string& token, const char* what) {
    const auto it = vocab_.find(token);
    if (it == vocab_.end())
      throw std::runtime_error(std::string("the tokenizer's ") + what + " token '" + token + "' is not in its vocabulary");
    return it->second;
  };
  bos_id_ = need(bos, "bos");
  eos_id_ = need(eos, "eos");
  pad_id_ = need(pad, "pad");
  unk_id_ = eos_id_;
  if (max_length_ < 2) throw std::runtime_error("the tokenizer's model_max_length must be at least 2");
  added_ = {bos, eos, pad};
  std::sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
  added_.erase(std::unique(added_.begin(), added_.end()), added_.end());
}

ClipTokenizer ClipTokenizer::load(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  const auto vocab_json = load_json((dir / "vocab.json").string());
  if (!vocab_json.is_object() || vocab_json.empty())
    throw std::runtime_error("'" + (dir / "vocab.json").string() + "' is not an object of token ids");
  std::map<std::string, int64_t> vocab;
  for (const auto& [token, id] : vocab_json.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0)
      throw std::runtime_error("'" + (dir / "vocab.json").string() + "': token '" + token + "' has no integer id");
    vocab[token] = id.get<int64_t>();
  }
  // transformers reads merges.txt's lines 2 to 48895 (the first is "#version: ..."; CLIP's vocabulary has 49408
  // entries: 512 byte symbols, 48894 merges, 2 special tokens).
  std::istringstream lines(read_file((dir / "merges.txt").string()));
  std::vector<std::pair<std::string, std::string>> merges;
  std::string line;
  std::getline(lines, line);
  for (int64_t n = 2; std::getline(lines, line) && merges.size() < 49152 - 256 - 2; ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const auto space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
      throw std::runtime_error("'" + (dir / "merges.txt").string() + "' line " + std::to_string(n) +
                               " is not two symbols separated by one space");
    merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }
  std::string bos = "<|startoftext|>", eos = "<|endoftext|>", pad = "<|endoftext|>", unk = "<|endoftext|>";
  int64_t max_length = 77;
  std::vector<std::string> added;
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    const auto path = dir / name;
    if (!fs::exists(path)) continue;
    const auto j = load_json(path.string());
    if (!j.is_object()) throw std::runtime_error("'" + path.string() + "' is not a JSON object");
    for (auto [key, target] : {std::pair<const char*, std::string*>{"bos_token", &bos}, {"eos_token", &eos},
                               {"pad_token", &pad}, {"unk_token", &unk}})
      if (j.contains(key) && !token_content(j[key]).empty()) *target = token_content(j[key]);
    if (j.contains("model_max_length") && j["model_max_length"].is_number_integer())
      max_length = j["model_max_length"].get<int64_t>();
    if (j.contains("added_tokens_decoder") && j["added_tokens_decoder"].is_object())
      for (const auto& [id, token] : j["added_tokens_decoder"].items()) {
        const auto content = token_content(token);
        if (!content.empty()) added.push_back(content);
      }
  }
  // Real SD 2.x tokenizer_config.json files store model_max_length 77; a huge sentinel means "unset".
  if (max_length > 1000000) max_length = 77;
  ClipTokenizer t(std::move(vocab), std::move(merges), bos, eos, pad, max_length);
  t.unk_id_ = t.vocab_.count(unk) ? t.vocab_[unk] : t.eos_id_;
  for (const auto& a : added)
    if (t.vocab_.count(a) && std::find(t.added_.begin(), t.added_.end(), a) == t.added_.end()) t.added_.push_back(a);
  if (t.vocab_.count(unk) && std::find(t.added_.begin(), t.added_.end(), unk) == t.added_.end()) t.added_.push_back(unk);
  std::stable_sort(t.added_.begin(), t.added_.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
  return t;
}

std::vector<std::string> ClipTokenizer::bpe_word(const std::string& word) const {
  if (word == "<|startoftext|>" || word == "<|endoftext|>") return {word};  // CLIPTokenizer's pre-seeded cache
  auto symbols = symbols_of(word);
  if (symbols.empty()) return {};
  symbols.back() += "</w>";
  while (symbols.size() > 1) {
    // The adjacent pair of lowest rank; merge every occurrence of it, left to right.
    int64_t best = std::numeric_limits<int64_t>::max();
    std::pair<std::string, std::string> bigram;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = ranks_.find({symbols[i], symbols[i + 1]});
      if (it != ranks_.end() && it->second < best) {
        best = it->second;
        bigram = it->first;
      }
    }
    if (best == std::numeric_limits<int64_t>::max()) break;
    std::vector<std::string> merged;
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == bigram.first && symbols[i + 1] == bigram.second) {
        merged.push_back(bigram.first + bigram.second);
        i += 2;
      } else {
        merged.push_back(symbols[i++]);
      }
    }
    symbols = std::move(merged);
  }
  return symbols;
}

std::vector<std::string> ClipTokenizer::tokenize(const std::string& text) const {
  decode_utf8(text);  // refuses ill-formed UTF-8 before anything else
  std::vector<std::string> tokens;
  auto bpe_chunk = [&](const std::string& chunk) {
    const auto code_points = decode_utf8(chunk);
    const auto normalized = normalization == TextNormalization::clip ? clip_normalize(code_points)
                                                                     : basic_tokenizer(code_points);
    for (const auto& word : clip_words(normalized))
      for (auto& t : bpe_word(word)) tokens.push_back(std::move(t));
  };
  if (normalization == TextNormalization::clip) {
    bpe_chunk(text);
    return tokens;
  }
  // transformers splits the added tokens out first (its trie: the earliest match, the longest at a position).
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const std::string* hit = nullptr;
    for (const auto& a : added_)
      if (text.compare(i, a.size(), a) == 0) {
        hit = &a;
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    if (i > start) bpe_chunk(text.substr(start, i - start));
    tokens.push_back(*hit);
    i += hit->size();
    start = i;
  }
  if (start < text.size()) bpe_chunk(text.substr(start));
  return tokens;
}

int64_t ClipTokenizer::id_of(const std::string& token) const {
  const auto it = vocab_.find(token);
  return it == vocab_.end() ? unk_id_ : it->second;
}

std::vector<int64_t> ClipTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids{bos_id_};
  for (const auto& t : tokenize(text)) ids.push_back(id_of(t));
  ids.push_back(eos_id_);
  return ids;
}

TokenizedPrompt ClipTokenizer::encode_padded(const std::string& text) const {
  const auto tokens = tokenize(text);
  TokenizedPrompt out;
  out.tokens = int64_t(tokens.size());
  const size_t keep = std::min(tokens.size(), size_t(max_length_ - 2));
  out.ids.push_back(bos_id_);
  for (size_t i = 0; i < keep; ++i) out.ids.push_back(id_of(tokens[i]));
  out.ids.push_back(eos_id_);
  out.ids.resize(size_t(max_length_), pad_id_);
  if (keep < tokens.size()) out.dropped = detokenize({tokens.begin() + long(keep), tokens.end()});
  return out;
}

}  // namespace diffuse
