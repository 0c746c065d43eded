//! Tokenizers built from the GGUF metadata (`tokenizer.ggml.*`), as llama.cpp builds them.
//!
//! - `gpt2` (byte-level BPE: SmolLM2, Qwen, Llama 3): the text is split by the pre-tokenizer
//!   regexes `tokenizer.ggml.pre` names (llama.cpp's), each piece's bytes become the vocabulary's
//!   byte characters, and the file's merges apply lowest rank first.
//! - `llama` (SentencePiece: Gemma, Llama 2): spaces become `▁` (and one is prepended when
//!   `add_space_prefix`), the text starts as single characters, and the adjacent pair whose
//!   concatenation is the best-scored normal token merges first, leftmost on a tie, until no
//!   pair is a token. A character that is no token becomes its UTF-8 bytes' `<0xXX>` tokens.
//!
//! User-defined (type 4) tokens written in the text are always those tokens; control (type 3)
//! and unknown (type 2) tokens only when `parse_special` is on, as llama.cpp does for prompts.
//! Chat message contents are encoded with it off, so a user cannot forge a turn. BOS is added
//! by us, per `add_bos_token`.
//!
//! One departure from llama.cpp, on purpose: SentencePiece merges only make normal tokens,
//! and a single character that is a control token's text is not that token (llama.cpp takes
//! any type), so text without special parsing can never become a control token. Neither demo
//! vocabulary tells the two apart.
//!
//! Our own code rather than the `tokenizers` crate: that one needs its merges as strings, and
//! for a SentencePiece vocabulary they had to be derived from the scores (Gemma 3: 513k merges,
//! most of its load time and tens of MiB at peak). Here the vocabulary is one buffer with a
//! hash index ([`vocab`]), and the merge loop looks pairs up directly.

mod vocab;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use aho_corasick::{AhoCorasick, MatchKind};
use fancy_regex::Regex;

use crate::EngineError;
use crate::gguf::{MetaValue, Metadata, StrList};
use vocab::Vocab;

/// llama.cpp token types.
const TYPE_NORMAL: u8 = 1;
const TYPE_UNKNOWN: u8 = 2;
const TYPE_CONTROL: u8 = 3;
const TYPE_USER_DEFINED: u8 = 4;
const TYPE_BYTE: u8 = 6;

/// Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp has them.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

/// Why a tokenizer could not be built from the file, or could not encode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the file has no tokenizer (tokenizer.ggml.model)")]
    Missing,
    #[error("unsupported tokenizer type '{0}'")]
    UnsupportedType(String),
    #[error("missing {0}")]
    MissingKey(String),
    #[error("{key} holds a non-{expected}")]
    WrongElement { key: String, expected: &'static str },
    #[error("bad merge '{0}'")]
    BadMerge(String),
    #[error("the vocabulary is too large (2^32 tokens)")]
    TooLarge,
    #[error("the vocabulary's tokens collide in its index beyond chance (a crafted file?)")]
    Colliding,
    #[error("a text of {0} bytes is too long to tokenize")]
    TextTooLong(usize),
    #[error("building the special-token matcher: {0}")]
    Specials(String),
    #[error("the pre-tokenizer's pattern: {source}")]
    Pattern { source: Box<fancy_regex::Error> },
}

fn pattern_err(source: fancy_regex::Error) -> EngineError {
    TokenizerError::Pattern {
        source: Box::new(source),
    }
    .into()
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

    fn strings(&self, key: &str) -> Result<&StrList, EngineError> {
        let v = self
            .get(key)
            .ok_or_else(|| TokenizerError::MissingKey(key.into()))?;
        match v {
            MetaValue::Strings(list) => Ok(list),
            MetaValue::Array { len: 0 } => Ok(&EMPTY_STRINGS),
            _ => Err(TokenizerError::WrongElement {
                key: key.into(),
                expected: "string",
            }
            .into()),
        }
    }

    /// A numeric array, empty when absent.
    fn numbers(&self, key: &str) -> Result<Vec<f64>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        match v {
            MetaValue::Array { len: 0 } => Ok(Vec::new()),
            v => v.to_floats().ok_or_else(|| {
                TokenizerError::WrongElement {
                    key: key.into(),
                    expected: "number",
                }
                .into()
            }),
        }
    }
}

static EMPTY_STRINGS: StrList = StrList::new();

/// GPT-2's map of bytes to printable characters: the printable Latin-1 bytes stand for
/// themselves, the others for U+0100 onwards, in order.
pub(crate) fn byte_chars() -> [char; 256] {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    out
}

/// How the pieces of a text are merged into tokens.
enum Model {
    /// Byte-level BPE.
    Bpe {
        /// Pre-tokenizer regexes, applied in turn (each splits the pieces the previous made).
        splits: Vec<Regex>,
        /// (left, right) → (rank, merged token).
        merges: HashMap<(u32, u32), (u32, u32)>,
        /// Each byte's character (boxed: the variants stay of a size).
        chars: Box<[char; 256]>,
        /// The token of each byte's character.
        byte_ids: [Option<u32>; 256],
        /// Byte of each byte character (indexed by the character, below U+0200).
        char_bytes: Vec<Option<u8>>,
        /// A piece that is a token is that token, merges or not (llama.cpp's `ignore_merges`,
        /// Llama 3's pre-tokenizer).
        whole_pieces: bool,
    },
    /// SentencePiece.
    Spm {
        scores: Vec<f32>,
        /// The `<0xXX>` tokens.
        byte_ids: [Option<u32>; 256],
        unk: Option<u32>,
        add_space_prefix: bool,
    },
}

/// A piece of text in the merge loop: a span of the input, a doubly linked list.
#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    id: u32,
    prev: u32,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// A candidate merge of `left` with the symbol after it, into `id` of `len` bytes.
struct Bigram {
    priority: f64,
    left: u32,
    len: u32,
    id: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The heap pops the highest priority first, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.left.cmp(&self.left))
    }
}

/// Merges adjacent symbols, best pair first, while `pair` finds one: `pair(left, right)` is
/// the merge's priority (higher first; leftmost on a tie) and the token it makes.
fn merge(syms: &mut [Sym], pair: impl Fn(&Sym, &Sym) -> Option<(f64, u32)>) {
    let mut heap = BinaryHeap::new();
    let offer = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], left: u32| {
        let Some(l) = syms.get(left as usize) else {
            return;
        };
        let Some(r) = syms.get(l.next as usize) else {
            return;
        };
        if let Some((priority, id)) = pair(l, r) {
            heap.push(Bigram {
                priority,
                left,
                len: l.len + r.len,
                id,
            });
        }
    };
    for i in 0..syms.len() as u32 {
        offer(&mut heap, syms, i);
    }
    while let Some(b) = heap.pop() {
        let l = syms[b.left as usize];
        // Stale when either side has merged since: a symbol only grows, and a merged-away one
        // has length 0.
        let Some(&r) = syms.get(l.next as usize) else {
            continue;
        };
        if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
            continue;
        }
        let left = &mut syms[b.left as usize];
        left.len = b.len;
        left.id = b.id;
        left.next = r.next;
        syms[l.next as usize].len = 0;
        if let Some(after) = syms.get_mut(r.next as usize) {
            after.prev = b.left;
        }
        offer(&mut heap, syms, l.prev);
        offer(&mut heap, syms, b.left);
    }
}

/// The merge loop's symbols, from (start, length, token) spans in order.
fn symbols(spans: impl Iterator<Item = (usize, usize, u32)>) -> Vec<Sym> {
    let mut out: Vec<Sym> = spans
        .enumerate()
        .map(|(i, (start, len, id))| Sym {
            start: start as u32,
            len: len as u32,
            id,
            prev: (i as u32).wrapping_sub(1),
            next: i as u32 + 1,
        })
        .collect();
    if let Some(last) = out.last_mut() {
        last.next = NONE;
    }
    out
}

/// The symbols still standing, in order.
fn survivors(syms: &[Sym]) -> impl Iterator<Item = &Sym> {
    let mut at = if syms.is_empty() { NONE } else { 0 };
    std::iter::from_fn(move || {
        let s = syms.get(at as usize)?;
        at = s.next;
        Some(s)
    })
}

/// A model's tokenizer. Immutable once built: any number of threads encode at once.
pub struct TextTokenizer {
    vocab: Vocab,
    types: Vec<u8>,
    model: Model,
    /// Control and user-defined tokens, matched in the raw text (leftmost, then longest).
    specials: Option<(AhoCorasick, Vec<u32>)>,
    /// User-defined tokens only: what is matched when control tokens are plain text.
    user_defined: Option<(AhoCorasick, Vec<u32>)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Token ids that end a generation (EOS, and end-of-turn tokens such as `<|im_end|>`).
    pub end_ids: HashSet<u32>,
    pub kind: String,
    pub vocab_size: usize,
    /// Bytes of the longest token's text: no token stands for more bytes of input.
    longest: usize,
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

/// A matcher for the tokens of `types` among `tokens` (none if there are none).
fn matcher(
    vocab: &Vocab,
    types: &[u8],
    wanted: &[u8],
) -> Result<Option<(AhoCorasick, Vec<u32>)>, EngineError> {
    let (ids, texts): (Vec<u32>, Vec<&str>) = (0..vocab.len() as u32)
        .filter(|&i| wanted.contains(&types.get(i as usize).copied().unwrap_or(TYPE_NORMAL)))
        .filter_map(|i| Some((i, vocab.token(i).filter(|t| !t.is_empty())?)))
        .unzip();
    if ids.is_empty() {
        return Ok(None);
    }
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&texts)
        .map_err(|e| TokenizerError::Specials(e.to_string()))?;
    Ok(Some((ac, ids)))
}

impl TextTokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self, EngineError> {
        let m = Meta(md);
        let kind = m
            .string("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing)?;
        let vocab = Vocab::new(m.strings("tokenizer.ggml.tokens")?.clone())?;
        // A type that is no u8 is no type we know: normal.
        let types: Vec<u8> = m
            .numbers("tokenizer.ggml.token_type")?
            .into_iter()
            .map(|t| u8::try_from(t as i64).unwrap_or(TYPE_NORMAL))
            .collect();
        // Ids outside the vocabulary are no tokens (as llama.cpp drops them).
        let known = |key: &str| m.u32(key).filter(|&id| (id as usize) < vocab.len());
        let model = match kind.as_str() {
            "gpt2" => {
                let chars = byte_chars();
                let mut byte_ids = [None; 256];
                let mut char_bytes = vec![None; 0x200];
                for (b, c) in chars.iter().enumerate() {
                    byte_ids[b] = vocab.id(c.encode_utf8(&mut [0; 4]));
                    char_bytes[*c as usize] = Some(b as u8);
                }
                let mut merges = HashMap::new();
                for (rank, s) in m.strings("tokenizer.ggml.merges")?.iter().enumerate() {
                    let (a, b) = s
                        .split_once(' ')
                        .ok_or_else(|| TokenizerError::BadMerge(s.into()))?;
                    // A merge whose parts or result are not tokens can never apply.
                    if let (Some(l), Some(r), Some(to)) =
                        (vocab.id(a), vocab.id(b), vocab.id2(a, b))
                    {
                        merges.entry((l, r)).or_insert((rank as u32, to));
                    }
                }
                let pre = m
                    .string("tokenizer.ggml.pre")
                    .unwrap_or_else(|| "default".into());
                let (patterns, whole_pieces): (&[&str], bool) = match pre.as_str() {
                    "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
                        (&[r"\p{N}", RE_GPT2], false)
                    }
                    "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" => {
                        (&[RE_LLAMA3], true)
                    }
                    "qwen2" => (&[RE_QWEN2], false),
                    _ => (&[RE_GPT2], false),
                };
                Model::Bpe {
                    chars: Box::new(chars),
                    splits: patterns
                        .iter()
                        .map(|p| Regex::new(p).map_err(pattern_err))
                        .collect::<Result<_, _>>()?,
                    merges,
                    byte_ids,
                    char_bytes,
                    whole_pieces,
                }
            }
            "llama" => {
                let mut byte_ids = [None; 256];
                for (b, slot) in byte_ids.iter_mut().enumerate() {
                    *slot = vocab.id(&format!("<0x{b:02X}>"));
                }
                Model::Spm {
                    scores: m
                        .numbers("tokenizer.ggml.scores")?
                        .into_iter()
                        .map(|s| s as f32)
                        .collect(),
                    byte_ids,
                    unk: known("tokenizer.ggml.unknown_token_id"),
                    add_space_prefix: m.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                }
            }
            other => return Err(TokenizerError::UnsupportedType(other.into()).into()),
        };
        let specials = matcher(
            &vocab,
            &types,
            &[TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED],
        )?;
        let user_defined = matcher(&vocab, &types, &[TYPE_USER_DEFINED])?;
        let bos = known("tokenizer.ggml.bos_token_id");
        let eos = known("tokenizer.ggml.eos_token_id");
        let mut end_ids: HashSet<u32> = eos.into_iter().collect();
        for name in [
            "<|im_end|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|end|>",
            "<|endoftext|>",
        ] {
            if let Some(id) = vocab.id(name) {
                end_ids.insert(id);
            }
        }
        Ok(Self {
            vocab_size: vocab.len(),
            longest: vocab.longest().max(1),
            vocab,
            types,
            model,
            specials,
            user_defined,
            bos,
            eos,
            add_bos: m
                .bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(kind == "llama"),
            end_ids,
            kind,
        })
    }

    fn type_of(&self, id: u32) -> u8 {
        self.types.get(id as usize).copied().unwrap_or(TYPE_NORMAL)
    }

    /// Token ids of `text`, without BOS. User-defined tokens written in the text are those
    /// tokens; control tokens too with `parse_special`, plain text without.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, EngineError> {
        // The merge loop's spans are u32 (and a prompt this long cannot fit a context).
        if text.len() >= (u32::MAX / 2) as usize {
            return Err(TokenizerError::TextTooLong(text.len()).into());
        }
        let mut out = Vec::new();
        let matcher = match parse_special {
            true => self.specials.as_ref(),
            false => self.user_defined.as_ref(),
        };
        let mut done = 0;
        if let Some((ac, ids)) = matcher {
            for found in ac.find_iter(text) {
                if found.start() > done {
                    self.encode_fragment(&text[done..found.start()], &mut out)?;
                }
                out.push(ids[found.pattern().as_usize()]);
                done = found.end();
            }
        }
        if done < text.len() {
            self.encode_fragment(&text[done..], &mut out)?;
        }
        Ok(out)
    }

    /// Tokens of a fragment of text: the whole text, or a part that starts it or follows a
    /// special token.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) -> Result<(), EngineError> {
        match &self.model {
            Model::Bpe {
                chars,
                splits,
                merges,
                byte_ids,
                whole_pieces,
                ..
            } => {
                let mut pieces = vec![text];
                for re in splits {
                    let mut next = Vec::with_capacity(pieces.len());
                    for piece in pieces {
                        let mut done = 0;
                        for found in re.find_iter(piece) {
                            let found = found.map_err(pattern_err)?;
                            if found.start() > done {
                                next.push(&piece[done..found.start()]);
                            }
                            if found.end() > found.start() {
                                next.push(found.as_str());
                            }
                            done = found.end();
                        }
                        if done < piece.len() {
                            next.push(&piece[done..]);
                        }
                    }
                    pieces = next;
                }
                for piece in pieces {
                    if *whole_pieces {
                        let mapped: String = piece.bytes().map(|b| chars[b as usize]).collect();
                        if let Some(id) = self.vocab.id(&mapped) {
                            out.push(id);
                            continue;
                        }
                    }
                    let mut syms = symbols(
                        piece
                            .bytes()
                            .enumerate()
                            .map(|(at, b)| (at, 1, byte_ids[b as usize].unwrap_or(NONE))),
                    );
                    merge(&mut syms, |l, r| {
                        let &(rank, id) = merges.get(&(l.id, r.id))?;
                        Some((-f64::from(rank), id))
                    });
                    out.extend(survivors(&syms).map(|s| s.id).filter(|&id| id != NONE));
                }
            }
            Model::Spm {
                scores,
                byte_ids,
                unk,
                add_space_prefix,
            } => {
                let mut escaped = String::with_capacity(text.len() + 3);
                // As llama.cpp: a fragment at the start or after a special token gets the
                // space prefix (every fragment is one of those).
                if *add_space_prefix {
                    escaped.push_str(SPACE);
                }
                for c in text.chars() {
                    match c {
                        ' ' => escaped.push_str(SPACE),
                        c => escaped.push(c),
                    }
                }
                let text = escaped.as_str();
                let mut syms = symbols(text.char_indices().map(|(at, c)| {
                    let id = self
                        .vocab
                        .id(&text[at..at + c.len_utf8()])
                        .filter(|&id| self.type_of(id) != TYPE_CONTROL);
                    (at, c.len_utf8(), id.unwrap_or(NONE))
                }));
                merge(&mut syms, |l, r| {
                    let start = l.start as usize;
                    let joined = text.get(start..start + (l.len + r.len) as usize)?;
                    let id = self.vocab.id(joined)?;
                    if self.type_of(id) != TYPE_NORMAL {
                        return None;
                    }
                    Some((
                        f64::from(scores.get(id as usize).copied().unwrap_or(0.0)),
                        id,
                    ))
                });
                for s in survivors(&syms) {
                    if s.id != NONE {
                        out.push(s.id);
                        continue;
                    }
                    let start = s.start as usize;
                    for &b in &text.as_bytes()[start..start + s.len as usize] {
                        out.extend(byte_ids[b as usize].or(*unk));
                    }
                }
            }
        }
        Ok(())
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

    /// Text of `ids`; control tokens are left out when `skip_control`. Ids outside the
    /// vocabulary are left out; bytes that are not UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_control: bool) -> Result<String, EngineError> {
        let mut bytes: Vec<u8> = Vec::new();
        for &id in ids {
            let Some(text) = self.vocab.token(id) else {
                continue;
            };
            match self.type_of(id) {
                TYPE_CONTROL if skip_control => {}
                TYPE_CONTROL | TYPE_USER_DEFINED => bytes.extend_from_slice(text.as_bytes()),
                ty => match &self.model {
                    Model::Bpe { char_bytes, .. } => {
                        let mapped: Option<Vec<u8>> = text
                            .chars()
                            .map(|c| char_bytes.get(c as usize).copied().flatten())
                            .collect();
                        bytes.extend(mapped.unwrap_or_else(|| text.as_bytes().to_vec()));
                    }
                    Model::Spm { .. } => {
                        let byte = (ty == TYPE_BYTE)
                            .then(|| text.strip_prefix("<0x")?.strip_suffix('>'))
                            .flatten()
                            .and_then(|h| u8::from_str_radix(h, 16).ok());
                        match byte {
                            Some(b) => bytes.push(b),
                            None => bytes.extend_from_slice(text.replace(SPACE, " ").as_bytes()),
                        }
                    }
                },
            }
        }
        if let Model::Spm {
            add_space_prefix: true,
            ..
        } = self.model
            && bytes.first() == Some(&b' ')
        {
            bytes.remove(0);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The fewest tokens `bytes` of text can encode to: no token stands for more input than
    /// its own text (a byte-level character or `▁` is one input byte; a special token, its
    /// text), so a prompt can be refused as too long before it is tokenized.
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.longest)
    }

    /// The text of one token as the vocabulary spells it.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.vocab.token(id).map(str::to_string)
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

    fn from_file(b: &GgufBuilder) -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, b.build()).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let info = crate::gguf::read_model(&f).unwrap();
        TextTokenizer::from_metadata(&info.metadata).unwrap()
    }

    fn tiny() -> TextTokenizer {
        from_file(&GgufBuilder::tiny_llama())
    }

    /// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the control `<start_of_turn>`,
    /// the user-defined `<b>`, the 256 byte tokens, then `pieces` with their scores.
    fn spm(pieces: &[(&str, f32)], add_space_prefix: bool) -> TextTokenizer {
        let mut tokens = vec!["<unk>", "<s>", "</s>", "<start_of_turn>", "<b>"];
        let mut types = vec![2, 3, 3, 3, 4];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(bytes.iter().map(String::as_str));
        types.extend([6; 256]);
        let mut scores = vec![0.0; tokens.len()];
        for (p, s) in pieces {
            tokens.push(p);
            types.push(1);
            scores.push(*s);
        }
        let mut b = GgufBuilder::new("gemma3");
        b.kv_str("tokenizer.ggml.model", "llama");
        b.kv_string_array("tokenizer.ggml.tokens", &tokens);
        b.kv_f32_array("tokenizer.ggml.scores", &scores);
        b.kv_i32_array("tokenizer.ggml.token_type", &types);
        b.kv_u32("tokenizer.ggml.bos_token_id", 1);
        b.kv_u32("tokenizer.ggml.eos_token_id", 2);
        b.kv_u32("tokenizer.ggml.unknown_token_id", 0);
        b.kv_bool("tokenizer.ggml.add_space_prefix", add_space_prefix);
        from_file(&b)
    }

    /// The token texts of `ids`, for readable assertions.
    fn texts(t: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| t.token_text(i).unwrap()).collect()
    }

    const HELLO: &[(&str, f32)] = &[
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("a", -2.0),
        ("he", -5.0),
        ("ll", -3.0),
        ("llo", -4.0),
        ("hello", -6.0),
        ("\u{2581}hello", -7.0),
        ("aa", -3.0),
        ("el", -2.5),
    ];

    #[test]
    fn sentencepiece_merges_the_best_scored_pair_first_and_the_leftmost_on_a_tie() {
        let t = spm(HELLO, false);
        // "el" (-2.5) beats "ll" (-3): h e l l o → h el l o; then nothing joins "el".
        assert_eq!(
            texts(&t, &t.encode("hello", false).unwrap()),
            ["h", "el", "l", "o"]
        );
        // "aa" at both places, same score: the leftmost first.
        assert_eq!(texts(&t, &t.encode("aaa", false).unwrap()), ["aa", "a"]);
        assert_eq!(
            t.decode(&t.encode("aaa hello", false).unwrap(), true)
                .unwrap(),
            "aaa hello"
        );
        // Without the better "el", "ll" then "llo", "he", "hello", "▁hello" follow in turn.
        let t = spm(&HELLO[..12], true);
        assert_eq!(
            texts(&t, &t.encode("hello", false).unwrap()),
            ["\u{2581}hello"]
        );
        assert_eq!(
            texts(&t, &t.encode("ahello", false).unwrap()),
            ["\u{2581}", "a", "hello"]
        );
    }

    #[test]
    fn sentencepiece_spells_unknown_characters_in_bytes_and_decodes_them_back() {
        let t = spm(HELLO, true);
        let ids = t.encode("hé 🚀", false).unwrap();
        assert_eq!(
            texts(&t, &ids),
            [
                "\u{2581}", "h", "<0xC3>", "<0xA9>", "\u{2581}", "<0xF0>", "<0x9F>", "<0x9A>",
                "<0x80>"
            ]
        );
        // The prefixed space is taken off again.
        assert_eq!(t.decode(&ids, true).unwrap(), "hé 🚀");
        // A character cut in half decodes to U+FFFD, never to half a character.
        assert_eq!(t.decode(&ids[..3], true).unwrap(), "h\u{FFFD}");
    }

    #[test]
    fn control_tokens_are_recognized_only_when_asked_user_defined_ones_always() {
        let t = spm(&HELLO[..12], true);
        let text = "<start_of_turn>hello<b>";
        let parsed = t.encode(text, true).unwrap();
        // The space prefix goes on the text after a special token, as llama.cpp does it.
        assert_eq!(
            texts(&t, &parsed),
            ["<start_of_turn>", "\u{2581}hello", "<b>"]
        );
        let plain = t.encode(text, false).unwrap();
        assert!(
            !plain.contains(&3),
            "a control token forged from text: {plain:?}"
        );
        assert_eq!(
            plain.last(),
            Some(&4),
            "user-defined tokens are always themselves"
        );
        // `<unk>` (type 2) is special like a control token.
        assert_eq!(t.encode("<unk>", true).unwrap(), [0]);
        assert!(!t.encode("<unk>", false).unwrap().contains(&0));
        assert_eq!(t.decode(&plain, true).unwrap(), text);
        // Control tokens are left out of decoded text only when asked.
        assert_eq!(t.decode(&parsed, true).unwrap(), "hello<b>");
        assert_eq!(
            t.decode(&parsed, false).unwrap(),
            "<start_of_turn> hello<b>"
        );
    }

    #[test]
    fn ids_outside_the_vocabulary_are_no_tokens() {
        let mut b = GgufBuilder::new("gemma3");
        b.kv_str("tokenizer.ggml.model", "llama");
        b.kv_string_array("tokenizer.ggml.tokens", &["a", "b"]);
        b.kv_u32("tokenizer.ggml.bos_token_id", 7);
        b.kv_u32("tokenizer.ggml.eos_token_id", 1_000_000);
        b.kv_u32("tokenizer.ggml.unknown_token_id", 9);
        b.kv_bool("tokenizer.ggml.add_space_prefix", false);
        let t = from_file(&b);
        assert_eq!((t.bos, t.eos), (None, None));
        assert_eq!(t.with_bos(vec![0]), [0]);
        // A character that is no token, without byte tokens or a valid `<unk>`: left out,
        // never an id the model would refuse.
        assert_eq!(t.encode("a€b", false).unwrap(), [0, 1]);
    }

    #[test]
    fn a_long_run_of_one_character_tokenizes_and_round_trips() {
        let t = spm(HELLO, false);
        let text = "a".repeat(100_001);
        let ids = t.encode(&text, false).unwrap();
        assert_eq!(ids.len(), 50_001);
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        let b = tiny();
        let text = " ".repeat(50_000) + &"9".repeat(50_000);
        assert_eq!(
            b.decode(&b.encode(&text, false).unwrap(), true).unwrap(),
            text
        );
    }

    #[test]
    fn encoding_is_shared_by_threads() {
        let t = std::sync::Arc::new(spm(HELLO, true));
        let want = t.encode("hello aaa hé", false).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.encode("hello aaa hé", false).unwrap())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want);
        }
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
