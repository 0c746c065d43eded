//! Tokenizers built from the GGUF metadata (`tokenizer.ggml.*`), as `tokenizers::Tokenizer`s.
//!
//! - `gpt2` (byte-level BPE: SmolLM2, Qwen, Llama 3): vocabulary and merges from the file, the
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` (the same regexes as llama.cpp).
//! - `llama` (SentencePiece-style: Gemma, Llama 2): a BPE over the whole text whose merges are
//!   derived from the token scores (a pair merges with the priority of the token it makes,
//!   which is what SentencePiece's bigram search does), byte fallback to `<0xXX>` tokens, and
//!   spaces as `▁`.
//!
//! Control (type 3) and user-defined (type 4) tokens are added tokens: recognized in raw text
//! when `parse_special` is on, as llama.cpp does for prompts. A second tokenizer without them
//! encodes text that must never produce them (chat message contents), so a user cannot forge
//! a turn. BOS is added by us, per `add_bos_token`.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::EngineError;
use crate::gguf::{MetaValue, Metadata};

/// llama.cpp token types.
const TYPE_NORMAL: u32 = 1;
const TYPE_CONTROL: u32 = 3;
const TYPE_USER_DEFINED: u32 = 4;

/// Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp has them.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer could not be built from the file, or could not encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the file has no tokenizer (tokenizer.ggml.model)")]
    Missing,
    #[error("unsupported tokenizer type '{0}'")]
    UnsupportedType(String),
    #[error("missing {0}")]
    MissingKey(String),
    #[error("{0} is not an array")]
    NotAnArray(String),
    #[error("{key} holds a non-{expected}")]
    WrongElement { key: String, expected: &'static str },
    #[error("bad merge '{0}'")]
    BadMerge(String),
    #[error("building the tokenizer: {source}")]
    Build { source: tokenizers::Error },
    #[error("encoding: {source}")]
    Encode { source: tokenizers::Error },
    #[error("decoding: {source}")]
    Decode { source: tokenizers::Error },
    #[error("the tokenizer's lock is poisoned (a thread panicked while using it)")]
    Poisoned,
}

fn build_err(source: tokenizers::Error) -> EngineError {
    TokenizerError::Build { source }.into()
}

struct Meta<'a>(&'a Metadata);

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.0.get(key)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(MetaValue::as_str)
            .map(str::to_string)
    }

    fn u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(MetaValue::as_u32)
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(MetaValue::as_bool)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, EngineError> {
        let arr = self
            .get(key)
            .ok_or_else(|| TokenizerError::MissingKey(key.into()))?
            .as_list()
            .ok_or_else(|| TokenizerError::NotAnArray(key.into()))?;
        arr.iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    TokenizerError::WrongElement {
                        key: key.into(),
                        expected: "string",
                    }
                    .into()
                })
            })
            .collect()
    }

    fn numbers<T>(
        &self,
        key: &str,
        f: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Vec<T>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let arr = v
            .as_list()
            .ok_or_else(|| TokenizerError::NotAnArray(key.into()))?;
        arr.iter()
            .map(|v| {
                f(v).ok_or_else(|| {
                    TokenizerError::WrongElement {
                        key: key.into(),
                        expected: "number",
                    }
                    .into()
                })
            })
            .collect()
    }
}

/// The vocabulary in the map type `tokenizers`' BPE takes.
fn bpe_vocab(vocab: &HashMap<String, u32>) -> tokenizers::models::bpe::Vocab {
    vocab.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// A model's tokenizer.
pub struct TextTokenizer {
    /// Control and user-defined tokens are registered as special added tokens: recognized
    /// in text when `encode_special_tokens` is off, plain text when it is on (for untrusted
    /// text inside a template). One tokenizer, switched per call, instead of two copies of
    /// the vocabulary and merges (several MiB each).
    inner: std::sync::Mutex<Tokenizer>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Token ids that end a generation (EOS, and end-of-turn tokens such as `<|im_end|>`).
    pub end_ids: HashSet<u32>,
    control: HashSet<u32>,
    pub kind: String,
    pub vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TextTokenizer({}, {} tokens)",
            self.kind, self.vocab_size
        )
    }
}

impl TextTokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self, EngineError> {
        let m = Meta(md);
        let kind = m
            .string("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing)?;
        let tokens = m.strings("tokenizer.ggml.tokens")?;
        let types: Vec<u32> = m.numbers("tokenizer.ggml.token_type", MetaValue::as_u32)?;
        let type_of = |i: usize| types.get(i).copied().unwrap_or(TYPE_NORMAL);
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let add_space_prefix = m
            .bool("tokenizer.ggml.add_space_prefix")
            .unwrap_or(kind == "llama");
        let mut tokenizer = match kind.as_str() {
            "gpt2" => {
                let merges: Vec<(String, String)> = m
                    .strings("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|s| {
                        s.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| TokenizerError::BadMerge(s.clone()))
                    })
                    .collect::<Result<_, _>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), merges)
                    .build()
                    .map_err(build_err)?;
                let mut t = Tokenizer::new(bpe);
                let pre = m
                    .string("tokenizer.ggml.pre")
                    .unwrap_or_else(|| "default".into());
                let split = |re: &str| {
                    Split::new(
                        SplitPattern::Regex(re.into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(build_err)
                };
                let bytes = ByteLevel::new(false, false, false);
                let pre_tok: tokenizers::PreTokenizerWrapper = match pre.as_str() {
                    "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
                        Sequence::new(vec![
                            split(r"\p{N}")?.into(),
                            split(RE_GPT2)?.into(),
                            bytes.into(),
                        ])
                        .into()
                    }
                    "llama3" | "llama-bpe" | "smaug-bpe" => {
                        Sequence::new(vec![split(RE_LLAMA3)?.into(), bytes.into()]).into()
                    }
                    "qwen2" => Sequence::new(vec![split(RE_QWEN2)?.into(), bytes.into()]).into(),
                    _ => Sequence::new(vec![split(RE_GPT2)?.into(), bytes.into()]).into(),
                };
                t.with_pre_tokenizer(Some(pre_tok));
                t.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
                t
            }
            "llama" => {
                let scores: Vec<f32> = m.numbers("tokenizer.ggml.scores", MetaValue::as_f32)?;
                let score = |i: u32| scores.get(i as usize).copied().unwrap_or(0.0);
                // Every split of a normal token into two tokens is a merge with that token's score
                // (Gemma 3: 513k of them, from 1.4M splits). Found as (token, split point) first,
                // strings made only for the merges kept, in their final order.
                let mut merges: Vec<(f32, u32, u32)> = Vec::new();
                for (i, t) in tokens.iter().enumerate() {
                    if type_of(i) != TYPE_NORMAL {
                        continue;
                    }
                    for (at, _) in t.char_indices().skip(1) {
                        let (l, r) = t.split_at(at);
                        if vocab.contains_key(l) && vocab.contains_key(r) {
                            merges.push((score(i as u32), i as u32, at as u32));
                        }
                    }
                }
                merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let merges = merges
                    .into_iter()
                    .map(|(_, i, at)| {
                        let (l, r) = tokens[i as usize].split_at(at as usize);
                        (l.to_string(), r.to_string())
                    })
                    .collect();
                let unk = m
                    .u32("tokenizer.ggml.unknown_token_id")
                    .and_then(|i| tokens.get(i as usize).cloned());
                let mut b = BPE::builder()
                    .vocab_and_merges(bpe_vocab(&vocab), merges)
                    .byte_fallback(true);
                if let Some(u) = unk {
                    b = b.unk_token(u);
                }
                let mut t = Tokenizer::new(b.build().map_err(build_err)?);
                let mut norms: Vec<NormalizerWrapper> = Vec::new();
                if add_space_prefix {
                    norms.push(Prepend::new("▁".into()).into());
                }
                norms.push(Replace::new(" ", "▁").map_err(build_err)?.into());
                t.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)));
                let mut decoders: Vec<DecoderWrapper> = vec![
                    tokenizers::decoders::DecoderWrapper::Replace(
                        tokenizers::normalizers::Replace::new("▁", " ").map_err(build_err)?,
                    ),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if add_space_prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                t.with_decoder(Some(DecoderSequence::new(decoders)));
                t
            }
            other => return Err(TokenizerError::UnsupportedType(other.into()).into()),
        };
        let mut control = HashSet::new();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            match type_of(i) {
                TYPE_CONTROL => {
                    control.insert(i as u32);
                    added.push(AddedToken::from(t.clone(), true));
                }
                // Matched on the raw text, as llama.cpp does.
                TYPE_USER_DEFINED => added.push(AddedToken::from(t.clone(), true)),
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&added);
        let bos = m.u32("tokenizer.ggml.bos_token_id");
        let eos = m.u32("tokenizer.ggml.eos_token_id");
        let mut end_ids: HashSet<u32> = eos.into_iter().collect();
        for name in [
            "<|im_end|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|end|>",
            "<|endoftext|>",
        ] {
            if let Some(&id) = vocab.get(name) {
                end_ids.insert(id);
            }
        }
        Ok(Self {
            inner: std::sync::Mutex::new(tokenizer),
            bos,
            eos,
            add_bos: m
                .bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(kind == "llama"),
            end_ids,
            control,
            vocab_size: tokens.len(),
            kind,
        })
    }

    /// Token ids of `text`, without BOS. With `parse_special`, control and user-defined
    /// tokens written in the text become those tokens; without, they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        let mut t = self.lock()?;
        t.set_encode_special_tokens(!parse_special);
        Ok(t.encode_fast(text, false)
            .map_err(|source| TokenizerError::Encode { source })?
            .get_ids()
            .to_vec())
    }

    /// BOS (when the model wants it) followed by `ids`.
    pub fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.insert(0, b);
        }
        ids
    }

    /// Text of `ids`; control tokens are left out when `skip_control`.
    pub fn decode(&self, ids: &[u32], skip_control: bool) -> Result<String, EngineError> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|i| !(skip_control && self.control.contains(i)))
            .collect();
        Ok(self
            .lock()?
            .decode(&kept, false)
            .map_err(|source| TokenizerError::Decode { source })?)
    }

    /// The text of one token as the vocabulary spells it.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.lock().ok()?.id_to_token(id)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tokenizer>, EngineError> {
        self.inner
            .lock()
            .map_err(|_| TokenizerError::Poisoned.into())
    }
}

/// Turns a growing list of token ids into text, emitting only complete UTF-8 characters:
/// a character split across byte tokens comes out once all its bytes are there.
///
/// Each step decodes only a short window (the tokens since the last emitted piece, plus the
/// ones before it for context), not the whole generation, so streaming stays linear.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl StreamDecoder {
    /// The text `ids[read..]` adds to `ids[prefix..read]`.
    fn pending(&self, tok: &TextTokenizer) -> Result<String, EngineError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        Ok(after
            .get(before.len()..)
            .map(str::to_string)
            .unwrap_or_default())
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(id);
        let new = self.pending(tok)?;
        if new.is_empty() || new.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(new))
    }

    /// The text each of `ids` would add if it came next (without adding it): whole
    /// characters only, so a token that leaves a character incomplete gives "".
    pub fn peek(&self, tok: &TextTokenizer, ids: &[u32]) -> Result<Vec<String>, EngineError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let mut window = self.ids[self.prefix..].to_vec();
        ids.iter()
            .map(|&id| {
                window.push(id);
                let after = tok.decode(&window, true);
                window.pop();
                let new = after?.get(before.len()..).unwrap_or_default().to_string();
                Ok(if new.ends_with('\u{FFFD}') {
                    String::new()
                } else {
                    new
                })
            })
            .collect()
    }

    /// Whatever is left at the end (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, EngineError> {
        let rest = self.pending(tok)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::GgufBuilder;

    fn tiny() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, GgufBuilder::tiny_llama().build()).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let info = crate::gguf::read_model(&f).unwrap();
        TextTokenizer::from_metadata(&info.metadata).unwrap()
    }

    #[test]
    fn text_round_trips_and_merges_apply() {
        let t = tiny();
        let ids = t.encode("hello, wörld 🚀", false).unwrap();
        assert_eq!(&ids[..3], [258, 259, 111]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello, wörld 🚀");
        assert_eq!(t.end_ids, HashSet::from([257]));
    }

    #[test]
    fn streaming_never_emits_half_a_character() {
        let t = tiny();
        let ids = t.encode("é🚀", false).unwrap();
        assert_eq!(ids.len(), 6, "2 + 4 bytes");
        let mut s = StreamDecoder::default();
        let pieces: Vec<Option<String>> = ids.iter().map(|&i| s.push(&t, i).unwrap()).collect();
        assert_eq!(
            pieces,
            [None, Some("é".into()), None, None, None, Some("🚀".into())]
        );
        // What a token would add, asked before it comes: the same as pushing it.
        let mut p = StreamDecoder::default();
        p.push(&t, ids[0]).unwrap();
        assert_eq!(p.peek(&t, &[ids[1], ids[2]]).unwrap(), ["é", ""]);
        let mut cut = StreamDecoder::default();
        assert_eq!(cut.push(&t, ids[2]).unwrap(), None);
        assert_eq!(cut.finish(&t).unwrap(), "\u{FFFD}");
    }
}
