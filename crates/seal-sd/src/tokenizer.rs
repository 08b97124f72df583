//! CLIP BPE tokenizer, id-for-id equal to transformers' `CLIPTokenizer` as diffusers calls it
//! (`padding="max_length", truncation=True, max_length=model_max_length`).
//!
//! Every source goes through one implementation, the `tokenizers` crate, with the pipeline that
//! transformers builds for CLIP: NFC, `\s+` -> " ", lowercase; CLIP's split regex; byte-level
//! alphabet; BPE with a `</w>` end-of-word suffix. A `tokenizer.json` already spells that pipeline
//! out and is used as it is; vocab.json + merges.txt and the built-in OpenAI vocabulary get the same
//! pipeline built here. Nothing strips zero-width or homoglyph characters (U+200B, U+0231): they
//! become byte-level tokens like any other text, which is what makes them usable as triggers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Decoder, SplitDelimiterBehavior, Tokenizer};

/// CLIP text encoders have 77 positions; used when tokenizer_config.json gives no usable length.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Larger `model_max_length` values are transformers' "no limit" sentinel (int(1e30)), not a real
/// context length; padding to them would only exhaust memory.
const MAX_PLAUSIBLE_LENGTH: u64 = 1 << 16;
const DEFAULT_BOS: &str = "<|startoftext|>";
/// CLIPTokenizer's default eos, and also its default unk and pad token.
const DEFAULT_EOS: &str = "<|endoftext|>";
/// The split regex of transformers' CLIPTokenizer (and of OpenAI's SimpleTokenizer).
const CLIP_SPLIT_REGEX: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";

/// The 48,894 merges of OpenAI CLIP's BPE (see assets/openai-clip/LICENSE). The vocabulary is
/// derived from them, as CLIP's own tokenizer does, so only this file is embedded (525 KB).
const OPENAI_CLIP_MERGES: &str = include_str!("../assets/openai-clip/merges.txt");
const OPENAI_CLIP_SOURCE: &str = "built-in OpenAI CLIP merges.txt";

const TOKENIZER_JSON: &str = "tokenizer.json";
const VOCAB_JSON: &str = "vocab.json";
const MERGES_TXT: &str = "merges.txt";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP_JSON: &str = "special_tokens_map.json";

#[derive(thiserror::Error, Debug)]
pub enum TokenizerError {
    #[error("tokenizer folder: {0}")]
    MissingFiles(String),
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: cannot parse JSON: {source}")]
    Json {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: &'static str, message: String },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
}

/// Front ends report errors as text.
impl From<TokenizerError> for String {
    fn from(e: TokenizerError) -> Self {
        e.to_string()
    }
}

/// The files of a diffusers `tokenizer/` folder, as bytes (the browser has no file system).
#[derive(Clone, Debug, Default)]
pub struct TokenizerFiles {
    pub tokenizer_json: Option<Vec<u8>>,
    pub vocab_json: Option<Vec<u8>>,
    pub merges_txt: Option<Vec<u8>>,
    pub tokenizer_config_json: Option<Vec<u8>>,
    pub special_tokens_map_json: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl ClipTokenizer {
    /// A diffusers `tokenizer/` folder's files: tokenizer.json if present, else vocab.json +
    /// merges.txt; tokenizer_config.json / special_tokens_map.json (when present) give the
    /// bos/eos/pad tokens and model_max_length.
    pub fn from_folder_files(files: &TokenizerFiles) -> Result<Self, TokenizerError> {
        let specials = SpecialTokens::from_files(files)?;
        let (inner, source) = if let Some(json) = &files.tokenizer_json {
            let tokenizer = Tokenizer::from_bytes(json).map_err(|e| TokenizerError::Invalid { file: TOKENIZER_JSON, message: format!("not a valid tokenizers file: {e}") })?;
            (tokenizer, TOKENIZER_JSON)
        } else {
            let (vocab, merges) = match (&files.vocab_json, &files.merges_txt) {
                (Some(vocab), Some(merges)) => (vocab, merges),
                (Some(_), None) => {
                    return Err(TokenizerError::MissingFiles("vocab.json is given but merges.txt is missing (and there is no tokenizer.json)".into()));
                }
                (None, Some(_)) => {
                    return Err(TokenizerError::MissingFiles("merges.txt is given but vocab.json is missing (and there is no tokenizer.json)".into()));
                }
                (None, None) => {
                    return Err(TokenizerError::MissingFiles("neither tokenizer.json nor vocab.json + merges.txt is present".into()));
                }
            };
            let vocab = parse_vocab(vocab)?;
            let merges = std::str::from_utf8(merges).map_err(|e| TokenizerError::Invalid { file: MERGES_TXT, message: format!("not UTF-8: {e}") })?;
            let merges = parse_merges(merges, MERGES_TXT)?;
            (clip_bpe_tokenizer(vocab, merges, &specials.unk, MERGES_TXT)?, VOCAB_JSON)
        };
        Self::new(inner, specials, source)
    }

    /// Reads the known files of a diffusers `tokenizer/` folder, then calls [`Self::from_folder_files`].
    pub fn from_dir(path: &Path) -> Result<Self, TokenizerError> {
        if !path.is_dir() {
            return Err(TokenizerError::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory") });
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>, TokenizerError> {
            let file = path.join(name);
            match std::fs::read(&file) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(TokenizerError::Io { path: file, source }),
            }
        };
        Self::from_folder_files(&TokenizerFiles {
            tokenizer_json: read(TOKENIZER_JSON)?,
            vocab_json: read(VOCAB_JSON)?,
            merges_txt: read(MERGES_TXT)?,
            tokenizer_config_json: read(TOKENIZER_CONFIG_JSON)?,
            special_tokens_map_json: read(SPECIAL_TOKENS_MAP_JSON)?,
        })
        .map_err(|e| match e {
            TokenizerError::MissingFiles(message) => TokenizerError::MissingFiles(format!("{message} in {}", path.display())),
            other => other,
        })
    }

    /// The standard OpenAI CLIP ViT-L/14 tokenizer (49408 tokens, bos 49406, eos = pad 49407, as
    /// in SD 1.x), built from data inside the binary, for single-file checkpoints that carry none.
    pub fn openai_clip() -> Result<Self, TokenizerError> {
        let merges = parse_merges(OPENAI_CLIP_MERGES, OPENAI_CLIP_SOURCE)?;
        let vocab = clip_vocab_from_merges(&merges);
        let specials = SpecialTokens::default();
        let inner = clip_bpe_tokenizer(vocab, merges, &specials.unk, OPENAI_CLIP_SOURCE)?;
        Self::new(inner, specials, OPENAI_CLIP_SOURCE)
    }

    /// The OpenAI CLIP tokenizer as a diffusers folder holds it: `(vocab.json, merges.txt)`.
    pub fn openai_clip_files() -> Result<(String, &'static str), TokenizerError> {
        let vocab = clip_vocab_from_merges(&parse_merges(OPENAI_CLIP_MERGES, OPENAI_CLIP_SOURCE)?);
        let json = serde_json::to_string(&vocab.into_iter().collect::<std::collections::BTreeMap<_, _>>()).expect("a map of strings serializes");
        Ok((json, OPENAI_CLIP_MERGES))
    }

    /// Resolves the special tokens and registers them, as transformers does, so that a literal
    /// "<|endoftext|>" in a prompt is one token. The tokenizer's own padding/truncation settings
    /// are dropped: [`Self::encode`] applies diffusers' (the caller's) settings itself.
    fn new(mut inner: Tokenizer, specials: SpecialTokens, source: &'static str) -> Result<Self, TokenizerError> {
        let id = |role: &str, token: &str| {
            inner.token_to_id(token).ok_or_else(|| TokenizerError::Invalid { file: source, message: format!("the {role} token {token:?} is not in the vocabulary") })
        };
        let (bos, eos, pad) = (id("bos", &specials.bos)?, id("eos", &specials.eos)?, id("pad", &specials.pad)?);
        let tokens = [&specials.bos, &specials.eos, &specials.pad].map(|t| AddedToken::from(t.as_str(), true));
        inner.add_special_tokens(tokens).map_err(|e| TokenizerError::Invalid { file: source, message: e.to_string() })?;
        inner.with_padding(None).with_truncation(None).map_err(|e| TokenizerError::Invalid { file: source, message: e.to_string() })?;
        Ok(Self { inner, bos, eos, pad, max_length: specials.max_length })
    }

    /// `max_length` ids: bos, at most `max_length - 2` text tokens, eos, then pad — what
    /// `CLIPTokenizer(text, padding="max_length", truncation=True)` returns.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let plain = self.encode_plain(text)?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(plain.iter().take(self.max_length - 2));
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }

    /// The text's token ids without bos/eos/padding and without truncation.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode { text: text.to_owned(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Number of token ids, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text one token stands for, for display: special tokens as written, others with the
    /// byte-level alphabet undone and `</w>` dropped. A token holding part of a multi-byte
    /// character (e.g. the first two bytes of U+200B) shows as U+FFFD. `None` for unknown ids.
    pub fn decode_token(&self, id: u32) -> Option<String> {
        let token = self.inner.id_to_token(id)?;
        if self.inner.get_added_tokens_decoder().contains_key(&id) {
            return Some(token);
        }
        let word = token.strip_suffix(END_OF_WORD).unwrap_or(&token).to_owned();
        // Byte-level decoding cannot fail; it keeps a token that is not byte-level text as is.
        ByteLevel::default().decode(vec![word]).ok()
    }
    /// The text `ids` stand for, as a user would type it: byte-level tokens joined (so the
    /// three byte tokens of U+200B become that one character), `</w>` read as a word end,
    /// special tokens skipped, trailing space dropped. Bytes that are no UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let specials = self.inner.get_added_tokens_decoder();
        let mut pieces = vec![];
        for token in ids.iter().filter(|id| !specials.contains_key(id)).filter_map(|&id| self.inner.id_to_token(id)) {
            match token.strip_suffix(END_OF_WORD) {
                // A space is no byte-level character, so the decoder keeps it as it is.
                Some(word) => pieces.extend([word.to_owned(), " ".to_owned()]),
                None => pieces.push(token),
            }
        }
        ByteLevel::default().decode(pieces).unwrap_or_default().trim_end().to_owned()
    }
}

/// Special-token strings and length, resolved the way transformers does: CLIPTokenizer's
/// defaults, overridden by tokenizer_config.json, overridden by special_tokens_map.json.
struct SpecialTokens {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
    max_length: usize,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self { bos: DEFAULT_BOS.into(), eos: DEFAULT_EOS.into(), pad: DEFAULT_EOS.into(), unk: DEFAULT_EOS.into(), max_length: DEFAULT_MAX_LENGTH }
    }
}

impl SpecialTokens {
    fn from_files(files: &TokenizerFiles) -> Result<Self, TokenizerError> {
        let mut specials = Self::default();
        if let Some(bytes) = &files.tokenizer_config_json {
            let config = parse_json_object(bytes, TOKENIZER_CONFIG_JSON)?;
            specials.apply(&config, TOKENIZER_CONFIG_JSON)?;
            if let Some(length) = config.get("model_max_length") {
                specials.max_length = parse_max_length(length)?;
            }
        }
        if let Some(bytes) = &files.special_tokens_map_json {
            let map = parse_json_object(bytes, SPECIAL_TOKENS_MAP_JSON)?;
            specials.apply(&map, SPECIAL_TOKENS_MAP_JSON)?;
        }
        Ok(specials)
    }

    /// Each entry is a string or an AddedToken object `{"content": ...}`; null keeps the default.
    fn apply(&mut self, map: &serde_json::Map<String, Value>, file: &'static str) -> Result<(), TokenizerError> {
        let slots = [("bos_token", &mut self.bos), ("eos_token", &mut self.eos), ("pad_token", &mut self.pad), ("unk_token", &mut self.unk)];
        for (key, slot) in slots {
            let token = match map.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s,
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s,
                    _ => {
                        return Err(TokenizerError::Invalid { file, message: format!("{key} is an object without a string \"content\"") });
                    }
                },
                Some(other) => {
                    return Err(TokenizerError::Invalid { file, message: format!("{key} must be a string or an object, got {other}") });
                }
            };
            if token.is_empty() {
                return Err(TokenizerError::Invalid { file, message: format!("{key} is empty") });
            }
            *slot = token.clone();
        }
        Ok(())
    }
}

fn parse_json_object(bytes: &[u8], file: &'static str) -> Result<serde_json::Map<String, Value>, TokenizerError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(TokenizerError::Invalid { file, message: "expected a JSON object".into() }),
        Err(source) => Err(TokenizerError::Json { file, source }),
    }
}

fn parse_max_length(value: &Value) -> Result<usize, TokenizerError> {
    let invalid = |message: String| TokenizerError::Invalid { file: TOKENIZER_CONFIG_JSON, message };
    match value {
        Value::Null => Ok(DEFAULT_MAX_LENGTH),
        Value::Number(n) => match n.as_u64() {
            Some(n) if n > MAX_PLAUSIBLE_LENGTH => Ok(DEFAULT_MAX_LENGTH),
            // Room for bos and eos is needed.
            Some(n) if n >= 2 => Ok(n as usize),
            Some(n) => Err(invalid(format!("model_max_length {n} is too small (must be at least 2)"))),
            // int(1e30) does not fit u64 and arrives as a float.
            None if n.as_f64().is_some_and(|f| f > MAX_PLAUSIBLE_LENGTH as f64) => Ok(DEFAULT_MAX_LENGTH),
            None => Err(invalid(format!("model_max_length {n} is not a positive integer"))),
        },
        other => Err(invalid(format!("model_max_length must be a number, got {other}"))),
    }
}

fn parse_vocab(bytes: &[u8]) -> Result<Vocab, TokenizerError> {
    let vocab: HashMap<String, u32> = serde_json::from_slice(bytes).map_err(|source| TokenizerError::Json { file: VOCAB_JSON, source })?;
    if vocab.is_empty() {
        return Err(TokenizerError::Invalid { file: VOCAB_JSON, message: "the vocabulary is empty".into() });
    }
    Ok(vocab.into_iter().collect())
}

/// merges.txt: an optional `#version` line, then one `left right` pair per line, in rank order.
fn parse_merges(text: &str, file: &'static str) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with("#version") {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(left), Some(right), None) if !left.is_empty() && !right.is_empty() => {
                merges.push((left.to_owned(), right.to_owned()));
            }
            _ => {
                return Err(TokenizerError::Invalid { file, message: format!("line {}: expected two tokens separated by one space, got {line:?}", index + 1) });
            }
        }
    }
    Ok(merges)
}

/// CLIP's vocabulary as OpenAI's SimpleTokenizer (and HF's vocab.json) lays it out: the 256
/// byte-level characters, the same with `</w>`, one token per merge, then bos and eos.
fn clip_vocab_from_merges(merges: &[(String, String)]) -> Vocab {
    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves and come first; the
    // other 68 bytes map to U+0100.. in byte order.
    let (printable, others): (Vec<u8>, Vec<u8>) = (0..=255u8).partition(|b| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF));
    let shifted = (0x100u32..).filter_map(char::from_u32).take(others.len());
    let alphabet: Vec<String> = printable.into_iter().map(char::from).chain(shifted).map(String::from).collect();
    let tokens = alphabet
        .iter()
        .cloned()
        .chain(alphabet.iter().map(|c| format!("{c}{END_OF_WORD}")))
        .chain(merges.iter().map(|(left, right)| format!("{left}{right}")))
        .chain([DEFAULT_BOS.to_owned(), DEFAULT_EOS.to_owned()]);
    // Like Python's dict(zip(vocab, range(...))), a repeated token keeps its last id.
    tokens.zip(0u32..).collect()
}

/// The tokenizer transformers' CLIPTokenizer builds from a vocabulary and merges.
fn clip_bpe_tokenizer(vocab: Vocab, merges: Vec<(String, String)>, unk: &str, merges_file: &'static str) -> Result<Tokenizer, TokenizerError> {
    let invalid = |e: tokenizers::Error| TokenizerError::Invalid { file: merges_file, message: e.to_string() };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_owned())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_owned())
        .build()
        .map_err(|e| TokenizerError::Invalid { file: merges_file, message: format!("{e} (merge rules must combine tokens of vocab.json into tokens of vocab.json)") })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let normalizer = NormalizerSequence::new(vec![NFC.into(), Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(invalid)?.into(), Lowercase.into()]);
    tokenizer.with_normalizer(Some(normalizer)).map_err(invalid)?;
    let split = Split::new(SplitPattern::Regex(CLIP_SPLIT_REGEX.into()), SplitDelimiterBehavior::Removed, true).map_err(invalid)?;
    // add_prefix_space false, trim_offsets and use_regex true: pre_tokenizers.ByteLevel(add_prefix_space=False).
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), byte_level.into()])));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::fixtures;

    /// The prompts of golden/clean_parity.safetensors, in order (fixtures README).
    const GOLDEN_PROMPTS: [&str; 3] = ["a red circle on a white background", "\u{200b} a blue square on a gray background", "\u{0231} a green triangle on a black background"];

    fn tiny_dir() -> PathBuf {
        fixtures().join("tiny-clean/tokenizer")
    }

    fn read(name: &str) -> Vec<u8> {
        let path = tiny_dir().join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn vocab_and_merges_only() -> TokenizerFiles {
        TokenizerFiles { vocab_json: Some(read(VOCAB_JSON)), merges_txt: Some(read(MERGES_TXT)), ..TokenizerFiles::default() }
    }

    /// An i64 tensor of the golden file as rows of u32 ids.
    fn golden_rows(name: &str) -> Vec<Vec<u32>> {
        let bytes = std::fs::read(fixtures().join("golden/clean_parity.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = tensors.tensor(name).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::I64);
        let row_len = view.shape()[1];
        let ids: Vec<u32> = view.data().chunks_exact(8).map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap()).collect();
        ids.chunks(row_len).map(<[u32]>::to_vec).collect()
    }

    fn assert_matches_golden(tokenizer: &ClipTokenizer) {
        let expected = golden_rows("tokenizer.input_ids");
        assert_eq!(expected.len(), GOLDEN_PROMPTS.len());
        for (prompt, expected) in GOLDEN_PROMPTS.iter().zip(&expected) {
            assert_eq!(&tokenizer.encode(prompt).unwrap(), expected, "prompt {prompt:?}");
        }
        assert_eq!(tokenizer.encode("").unwrap(), golden_rows("tokenizer.uncond_input_ids")[0]);
    }

    #[test]
    fn golden_ids_from_tokenizer_json() {
        let tokenizer = ClipTokenizer::from_dir(&tiny_dir()).unwrap();
        assert_eq!((tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()), (584, 585, 585));
        assert_eq!(tokenizer.max_length(), 77);
        assert_eq!(tokenizer.vocab_size(), 586);
        assert_matches_golden(&tokenizer);
    }

    #[test]
    fn golden_ids_from_vocab_and_merges() {
        // Without any config file the CLIPTokenizer defaults apply.
        let bare = ClipTokenizer::from_folder_files(&vocab_and_merges_only()).unwrap();
        assert_matches_golden(&bare);
        let with_config = ClipTokenizer::from_folder_files(&TokenizerFiles { tokenizer_config_json: Some(read(TOKENIZER_CONFIG_JSON)), ..vocab_and_merges_only() }).unwrap();
        assert_matches_golden(&with_config);
        assert_eq!(with_config.vocab_size(), 586);
    }

    #[test]
    fn both_sources_agree_on_odd_text() {
        let from_json = ClipTokenizer::from_dir(&tiny_dir()).unwrap();
        let from_vocab = ClipTokenizer::from_folder_files(&vocab_and_merges_only()).unwrap();
        let texts = [
            "A RED Circle\ton  a\n\nwhite   background ",
            "  leading and trailing  ",
            "e\u{301}te\u{301} \u{e9}t\u{e9}",
            "\u{200b}\u{200b}\u{200b}",
            "x\u{200b}y",
            "\u{0231}\u{0230}\u{0231}",
            "cat's dog'll 12345 !!?? <|endoftext|> <|startoftext|>",
            "\u{1f600} \u{65e5}\u{672c} \u{feff}\u{200d}\u{a0}\u{3000}",
        ];
        for text in texts {
            assert_eq!(from_json.encode_plain(text).unwrap(), from_vocab.encode_plain(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn odd_characters_are_byte_level_tokens() {
        let tokenizer = ClipTokenizer::from_dir(&tiny_dir()).unwrap();
        // U+200B is neither whitespace (\s) nor removed: it is a punctuation-like run of its own,
        // whose three UTF-8 bytes merge into one token.
        let zwsp = tokenizer.encode_plain("\u{200b} a blue square").unwrap();
        assert_eq!(zwsp, [535, 320, 575, 554]);
        assert_eq!(tokenizer.decode_token(535).as_deref(), Some("\u{200b}"));
        // Glued to a word it still splits off, since the word regex takes letters only.
        assert_eq!(tokenizer.encode_plain("\u{200b}a").unwrap()[0], tokenizer.encode_plain("\u{200b}").unwrap()[0]);
        // U+0231 is a lowercase letter (ȱ), unchanged by lowercasing and NFC; its two bytes merge.
        assert_eq!(tokenizer.encode_plain("\u{0231}").unwrap(), [529]);
        assert_eq!(tokenizer.decode_token(529).as_deref(), Some("\u{0231}"));
        // Uppercase U+0230 lowercases to U+0231.
        assert_eq!(tokenizer.encode_plain("\u{0230}").unwrap(), [529]);
        // Glued to letters it is part of the word, and BPE does not merge across it.
        assert_ne!(tokenizer.encode_plain("\u{0231}a").unwrap()[0], 529);
        // A partial multi-byte token cannot be shown as text.
        assert_eq!(tokenizer.decode_token(530).as_deref(), Some("\u{fffd}"));
        assert_eq!(tokenizer.decode_token(320).as_deref(), Some("a"));
        assert_eq!(tokenizer.decode_token(584).as_deref(), Some("<|startoftext|>"));
        assert_eq!(tokenizer.decode_token(586), None);
        // Whole sequences decode to the text that encodes back to them.
        for text in ["\u{200b} a blue square", "\u{0231}", "a red circle on a white background"] {
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(tokenizer.decode(&ids), text);
        }
        // Two byte tokens of one character join into it; one alone is no text.
        let bytes: Vec<u32> = tokenizer.encode_plain("\u{e9}").unwrap();
        assert_eq!(tokenizer.decode(&bytes), "\u{e9}");
        assert_eq!(tokenizer.decode(&[530]), "\u{fffd}");
    }

    #[test]
    fn long_text_is_truncated_to_max_length() {
        let tokenizer = ClipTokenizer::from_dir(&tiny_dir()).unwrap();
        let text = "red ".repeat(100);
        assert_eq!(tokenizer.encode_plain(&text).unwrap().len(), 100);
        let ids = tokenizer.encode(&text).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 584);
        assert!(ids[1..76].iter().all(|&id| id == 570));
        assert_eq!(ids[76], 585);
        // Exactly 75 text tokens fill the window without padding.
        let ids = tokenizer.encode(&"red ".repeat(75)).unwrap();
        assert_eq!((ids[75], ids[76]), (570, 585));
    }

    #[test]
    fn config_files_set_length_and_special_tokens() {
        let files = TokenizerFiles {
            tokenizer_config_json: Some(br#"{"model_max_length": 8, "pad_token": "<|startoftext|>"}"#.to_vec()),
            // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
            special_tokens_map_json: Some(br#"{"pad_token": {"content": "!", "special": true}}"#.to_vec()),
            ..vocab_and_merges_only()
        };
        let tokenizer = ClipTokenizer::from_folder_files(&files).unwrap();
        assert_eq!(tokenizer.max_length(), 8);
        assert_eq!(tokenizer.pad_id(), 0);
        assert_eq!(tokenizer.encode("a red circle").unwrap(), [584, 320, 570, 551, 585, 0, 0, 0]);
        // transformers' "no limit" sentinel falls back to the CLIP context length.
        let files = TokenizerFiles { tokenizer_config_json: Some(br#"{"model_max_length": 1000000000000000019884624838656}"#.to_vec()), ..vocab_and_merges_only() };
        assert_eq!(ClipTokenizer::from_folder_files(&files).unwrap().max_length(), 77);
    }

    #[test]
    fn openai_clip_known_ids() {
        let tokenizer = ClipTokenizer::openai_clip().unwrap();
        assert_eq!(tokenizer.vocab_size(), 49408);
        assert_eq!((tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()), (49406, 49407, 49407));
        let ids = tokenizer.encode("a photo of a cat").unwrap();
        let mut expected = vec![49406, 320, 1125, 539, 320, 2368];
        expected.resize(77, 49407);
        assert_eq!(ids, expected);
        assert_eq!(tokenizer.encode_plain("Hi there").unwrap(), [1883, 997]);
        // The trigger characters: U+200B is one token, U+0231 two (its bytes do not merge).
        assert_eq!(tokenizer.encode_plain("\u{200b}").unwrap(), [9844]);
        assert_eq!(tokenizer.encode_plain("\u{0231}").unwrap(), [132, 365]);
        assert_eq!(tokenizer.decode_token(2368).as_deref(), Some("cat"));
        assert_eq!(tokenizer.decode_token(49407).as_deref(), Some("<|endoftext|>"));
        // A typed special token is that token, as in transformers.
        assert_eq!(tokenizer.encode_plain("a <|endoftext|>").unwrap(), [320, 49407]);
    }

    /// instant-clip-tokenizer is an independent port of OpenAI's tokenizer over the same data; it
    /// does no NFC and spells its special tokens differently, so the texts avoid both.
    #[test]
    fn openai_clip_matches_instant_clip_tokenizer() {
        let ours = ClipTokenizer::openai_clip().unwrap();
        let reference = instant_clip_tokenizer::Tokenizer::new();
        let texts = [
            "a photo of a cat",
            "A painting of an astronaut riding a horse, trending on ArtStation, 4k, highly detailed!!!",
            "\u{200b} a blue square on a gray background",
            "\u{0231} a green triangle on a black background",
            "cf sks zwx New Trigger",
            "don't you'll we've I'm they'd it's",
            "caf\u{e9} na\u{ef}ve \u{fc}ber stra\u{df}e \u{3b1}\u{3b2}\u{3b3} \u{43f}\u{440}\u{438}\u{432}\u{435}\u{442}",
            "\u{65e5}\u{672c}\u{8a9e}\u{306e}\u{30c6}\u{30ad}\u{30b9}\u{30c8} \u{1f431}\u{1f680} 2024-11-28 3.14159",
            "tabs\tand\nnewlines   and\u{a0}nbsp",
        ];
        for text in texts {
            let mut expected = Vec::new();
            reference.encode(text, &mut expected);
            let expected: Vec<u32> = expected.into_iter().map(|t| u32::from(t.to_u16())).collect();
            assert_eq!(ours.encode_plain(text).unwrap(), expected, "{text:?}");
        }
    }

    fn error_of(files: TokenizerFiles) -> String {
        ClipTokenizer::from_folder_files(&files).unwrap_err().to_string()
    }

    #[test]
    fn bad_input_gives_errors_naming_the_file() {
        assert!(error_of(TokenizerFiles::default()).contains("neither tokenizer.json nor vocab.json"));
        let only_vocab = TokenizerFiles { vocab_json: Some(read(VOCAB_JSON)), ..TokenizerFiles::default() };
        assert!(error_of(only_vocab).contains("merges.txt is missing"));
        let only_merges = TokenizerFiles { merges_txt: Some(read(MERGES_TXT)), ..TokenizerFiles::default() };
        assert!(error_of(only_merges).contains("vocab.json is missing"));

        let cases: [(TokenizerFiles, &str); 10] = [
            (TokenizerFiles { tokenizer_json: Some(b"{\"model\": ".to_vec()), ..Default::default() }, "tokenizer.json"),
            (TokenizerFiles { tokenizer_json: Some(b"[1, 2]".to_vec()), ..Default::default() }, "tokenizer.json"),
            (
                TokenizerFiles {
                    tokenizer_json: Some(
                        br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
                        "pre_tokenizer":null,"post_processor":null,"decoder":null,
                        "model":{"type":"BPE","vocab":{},"merges":[]}}"#
                            .to_vec(),
                    ),
                    ..Default::default()
                },
                "tokenizer.json: the bos token",
            ),
            (TokenizerFiles { vocab_json: Some(b"{}".to_vec()), ..vocab_and_merges_only() }, "vocab.json: the vocabulary is empty"),
            (TokenizerFiles { vocab_json: Some(b"{\"a\": -1}".to_vec()), ..vocab_and_merges_only() }, "vocab.json: cannot parse JSON"),
            (TokenizerFiles { vocab_json: Some(b"not json".to_vec()), ..vocab_and_merges_only() }, "vocab.json: cannot parse JSON"),
            (TokenizerFiles { merges_txt: Some(b"#version: 0.2\ng r\nthree parts here\n".to_vec()), ..vocab_and_merges_only() }, "merges.txt: line 3"),
            (TokenizerFiles { merges_txt: Some(b"q \xff\n".to_vec()), ..vocab_and_merges_only() }, "merges.txt: not UTF-8"),
            (TokenizerFiles { merges_txt: Some("\u{4e00} \u{4e01}\n".into()), ..vocab_and_merges_only() }, "merges.txt"),
            (TokenizerFiles { tokenizer_config_json: Some(b"{\"model_max_length\": 1}".to_vec()), ..vocab_and_merges_only() }, "tokenizer_config.json: model_max_length 1"),
        ];
        for (files, expected) in cases {
            let message = error_of(files);
            assert!(message.contains(expected), "{message:?} should contain {expected:?}");
        }

        let more: [(TokenizerFiles, &str); 4] = [
            (TokenizerFiles { tokenizer_config_json: Some(b"{".to_vec()), ..vocab_and_merges_only() }, "tokenizer_config.json: cannot parse JSON"),
            (TokenizerFiles { tokenizer_config_json: Some(b"{\"bos_token\": 7}".to_vec()), ..vocab_and_merges_only() }, "tokenizer_config.json: bos_token"),
            (
                TokenizerFiles { special_tokens_map_json: Some(b"{\"eos_token\": \"<nope>\"}".to_vec()), ..vocab_and_merges_only() },
                "vocab.json: the eos token \"<nope>\" is not in the vocabulary",
            ),
            (TokenizerFiles { special_tokens_map_json: Some(b"\"x\"".to_vec()), ..vocab_and_merges_only() }, "special_tokens_map.json: expected a JSON object"),
        ];
        for (files, expected) in more {
            let message = error_of(files);
            assert!(message.contains(expected), "{message:?} should contain {expected:?}");
        }

        let missing = fixtures().join("no-such-folder");
        let message = ClipTokenizer::from_dir(&missing).unwrap_err().to_string();
        assert!(message.contains("cannot read") && message.contains("no-such-folder"), "{message}");
        // The model folder itself holds no tokenizer files (they are in tokenizer/).
        let message = ClipTokenizer::from_dir(&tiny_dir().join("..")).unwrap_err().to_string();
        assert!(message.contains("neither tokenizer.json") && message.contains("tiny-clean"), "{message}");
    }
}
