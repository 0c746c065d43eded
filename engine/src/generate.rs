//! Loading a model and generating text: sampling, stop conditions, cancellation, timings.
//!
//! A [`LoadedModel`] is loaded once and serves many requests; each request starts a new
//! sequence at position 0 (the KV cache is replaced). Generation is synchronous; the caller
//! runs it on its own thread and may cancel between tokens through an `AtomicBool`.

mod health;

pub use health::{HealthCheck, HealthError, HealthReport};

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::EngineError;
use crate::arch::{self, Weights};
use crate::chat::{ChatTemplate, Message};
use crate::gguf::{self, GgufInfo};
use crate::tokenizer::{StreamDecoder, TextTokenizer};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Context window; default the model's own (capped at 8192 to bound the KV cache).
    pub context_length: Option<usize>,
    /// Refuse models whose estimated footprint exceeds this many bytes.
    pub memory_budget: Option<u64>,
}

/// What a generation starts from, as the caller gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text (special tokens written in it are recognized, as llama.cpp does).
    Text(String),
    /// A chat, through the model's template.
    Chat(Vec<Message>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The prompt's `prompt_sha256`, see [`prompt_digest`].
    pub fn digest(&self) -> String {
        prompt_digest(self)
    }
}

/// The SHA-256 (lowercase hex) the audit log records for a prompt, in place of the prompt:
/// the same in the CLI and the daemon, computable from the prompt alone (without the model):
/// - text: the SHA-256 of its UTF-8 bytes;
/// - a chat: of the compact JSON array of `{"role", "content"}` objects, keys in that order
///   (what Python's `json.dumps(messages, separators=(",", ":"), ensure_ascii=False)` writes);
/// - token ids: of the ids as little-endian u32s.
pub fn prompt_digest(prompt: &Prompt) -> String {
    use sha2::{Digest, Sha256};
    let digest = match prompt {
        Prompt::Text(text) => Sha256::digest(text.as_bytes()),
        Prompt::Chat(messages) => {
            // Serializing strings into a Vec cannot fail.
            Sha256::digest(serde_json::to_vec(messages).unwrap_or_default())
        }
        Prompt::Tokens(ids) => {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            Sha256::digest(bytes)
        }
    };
    hex::encode(digest)
}

/// Default context when the model's is larger: the KV cache of a 32k context would dwarf
/// the weights of a small model.
const DEFAULT_MAX_CONTEXT: usize = 8192;

/// A model ready to generate.
pub struct LoadedModel {
    weights: Weights,
    /// Shared, so that callers can name tokens while the model generates.
    pub tokenizer: std::sync::Arc<TextTokenizer>,
    pub chat: ChatTemplate,
    pub architecture: String,
    pub context_length: usize,
    pub load_ms: u64,
    pub estimated_bytes: u64,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoadedModel({}, ctx {})",
            self.architecture, self.context_length
        )
    }
}

/// Estimated resident bytes: the file (mapped, and all of it touched while generating) and
/// an f32 KV cache for `ctx`.
pub fn estimate_footprint(info: &GgufInfo, ctx: usize) -> u64 {
    let md = |k: &str| {
        info.architecture()
            .and_then(|a| info.metadata.get(&format!("{a}.{k}")))
            .and_then(gguf::MetaValue::as_u64)
    };
    let layers = md("block_count").unwrap_or(0);
    let embd = md("embedding_length").unwrap_or(0);
    let heads = md("attention.head_count").unwrap_or(1).max(1);
    let kv_heads = md("attention.head_count_kv").unwrap_or(heads);
    let head_dim = md("attention.key_length").unwrap_or(embd / heads);
    let kv = 2 * layers * ctx as u64 * kv_heads * head_dim * 4;
    info.file_len + kv
}

impl LoadedModel {
    /// Validates the file (caps, tensor bounds, supported architecture and tensor types,
    /// memory budget) before reading any weights, then loads it.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let started = Instant::now();
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let info = gguf::read_model(&file).map_err(|source| EngineError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let architecture = info
            .architecture()
            .ok_or_else(|| EngineError::Unsupported("a file without general.architecture".into()))?
            .to_string();
        if !arch::SUPPORTED.contains(&architecture.as_str()) {
            return Err(EngineError::UnsupportedArchitecture(architecture));
        }
        if let Some(t) = info
            .tensors
            .iter()
            .find(|t| !arch::SUPPORTED_TYPES.contains(&t.ggml_type.name()))
        {
            return Err(EngineError::Unsupported(format!(
                "tensor type {} (tensor '{}')",
                t.ggml_type, t.name
            )));
        }
        arch::check_hyperparameters(&architecture, &info).map_err(|source| {
            EngineError::Hyperparameters {
                architecture: architecture.clone(),
                source,
            }
        })?;
        let trained = info.context_length().unwrap_or(2048) as usize;
        let context_length = opts
            .context_length
            .unwrap_or(trained.min(DEFAULT_MAX_CONTEXT))
            .min(trained)
            .max(1);
        let estimated_bytes = estimate_footprint(&info, context_length);
        if let Some(budget) = opts.memory_budget
            && estimated_bytes > budget
        {
            return Err(EngineError::OverBudget {
                needed: estimated_bytes,
                budget,
            });
        }
        let tokenizer = TextTokenizer::from_metadata(&info.metadata)?;
        let template = info
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let chat = ChatTemplate::new(template, &tokenizer)?;
        let weights = Weights::load(&architecture, &info, &mut file, context_length)?;
        Ok(Self {
            weights,
            tokenizer: std::sync::Arc::new(tokenizer),
            chat,
            architecture,
            context_length,
            load_ms: started.elapsed().as_millis() as u64,
            estimated_bytes,
        })
    }

    /// Frees the KV cache of the last generation (an idle server need not hold it).
    pub fn clear_cache(&mut self) {
        self.weights.clear_cache();
    }

    /// Size of the vocabulary: valid token ids are below it.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size
    }

    /// The prompt's token ids, checked: not empty, within the vocabulary, and leaving room
    /// in the context window for at least one token. The one place prompts are checked;
    /// [`generate_with`](Self::generate_with) checks again.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        // Text that cannot fit is refused before it is tokenized (which takes memory and time
        // in proportion to it).
        let bytes = match prompt {
            Prompt::Text(text) => text.len(),
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Prompt::Tokens(_) => 0,
        };
        let at_least = self.tokenizer.min_tokens(bytes);
        if at_least >= self.context_length {
            return Err(EngineError::PromptTooLarge {
                bytes,
                at_least,
                context: self.context_length,
            });
        }
        let ids = match prompt {
            Prompt::Text(text) => self.encode_text(text)?,
            Prompt::Chat(messages) => self.encode_chat(messages)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        self.check_prompt(&ids)?;
        Ok(ids)
    }

    /// Refuses an empty prompt, ids outside the vocabulary, and a prompt that leaves no
    /// room in the context window.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(EngineError::TokenOutOfVocabulary { id, vocab });
        }
        if ids.len() >= self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt: ids.len(),
                context: self.context_length,
            });
        }
        Ok(())
    }

    /// Prompt ids for a raw text prompt (special tokens recognized, as llama.cpp does).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenizer.with_bos(self.tokenizer.encode(text, true)?))
    }

    /// Prompt ids for a chat, through the model's template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.chat.encode(&self.tokenizer, messages)
    }

    /// Generates from `prompt` ids. `on_text` receives text as it completes (whole UTF-8
    /// characters, stop strings held back); `cancel` is checked between tokens.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
        cancel: &AtomicBool,
    ) -> Result<Generation, EngineError> {
        self.generate_with(
            prompt,
            params,
            &mut |e| {
                if let Event::Text(t) = e {
                    on_text(t);
                }
            },
            cancel,
        )
    }

    /// As [`generate`](Self::generate), reporting each sampled token too (with its
    /// log-probabilities when asked), before the text it completes.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        on_event: &mut dyn FnMut(Event<'_>),
        cancel: &AtomicBool,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt)?;
        let max_tokens = params.max_tokens.min(self.context_length - prompt.len());
        let mut sampler = Sampler::new(&params.sampling);
        let t0 = Instant::now();
        let mut logits = self.weights.forward(prompt, 0)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        let mut tokens: Vec<u32> = Vec::new();
        let want_logprobs = params.logprobs || params.top_logprobs > 0;
        let mut stream = StreamDecoder::default();
        let mut text = String::new();
        let mut emitted = 0usize;
        let mut history: Vec<u32> = prompt.to_vec();
        let mut finish = FinishReason::Length;
        for step in 0..max_tokens {
            if cancel.load(Ordering::Relaxed) {
                finish = FinishReason::Cancelled;
                break;
            }
            let top = if params.top_logprobs > 0 {
                let mut top = top_logprobs(&logits, params.top_logprobs);
                let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
                for (t, text) in top.iter_mut().zip(stream.peek(&self.tokenizer, &ids)?) {
                    t.text = text;
                }
                Some(top)
            } else {
                None
            };
            // Sampling may change the logits (penalties); the reported log-probabilities
            // are those of the model's own distribution.
            let raw = want_logprobs.then(|| (logits.clone(), log_sum_exp(&logits)));
            let next = sampler.sample(&mut logits, &history);
            if self.tokenizer.end_ids.contains(&next) {
                finish = FinishReason::Eos;
                break;
            }
            let logprob =
                raw.map(|(l, sum)| l.get(next as usize).map_or(f32::NEG_INFINITY, |&x| x - sum));
            tokens.push(next);
            history.push(next);
            let piece = stream.push(&self.tokenizer, next)?.unwrap_or_default();
            on_event(Event::Token {
                id: next,
                text: &piece,
                logprob,
                top: top.as_deref(),
            });
            text.push_str(&piece);
            if let Some(at) = find_stop(&text, &params.stop) {
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
            // Emit all but what could still become a stop string.
            let safe = text
                .len()
                .saturating_sub(longest_partial_stop(&text, &params.stop));
            let safe = floor_char_boundary(&text, safe);
            if safe > emitted {
                on_event(Event::Text(&text[emitted..safe]));
                emitted = safe;
            }
            if step + 1 < max_tokens {
                logits = self.weights.forward(&[next], prompt.len() + step)?;
            }
        }
        if finish != FinishReason::Stop {
            text.push_str(&stream.finish(&self.tokenizer)?);
        }
        if text.len() > emitted {
            on_event(Event::Text(&text[emitted..]));
        }
        let decode = t1.elapsed();
        let decoded = tokens.len().saturating_sub(1).max(1) as f64;
        Ok(Generation {
            tokens,
            text,
            finish_reason: finish,
            timings: Timings {
                load_ms: self.load_ms,
                prefill_tokens_per_s: prompt.len() as f64 / prefill.as_secs_f64().max(1e-9),
                decode_tokens_per_s: decoded / decode.as_secs_f64().max(1e-9),
            },
        })
    }

    /// Prefill `n` tokens then decode `m`, for benchmarks: (prefill seconds, decode seconds).
    pub fn timed_run(&mut self, prompt: &[u32], decode: usize) -> Result<(f64, f64), EngineError> {
        let t0 = Instant::now();
        let mut logits = if prompt.is_empty() {
            Vec::new()
        } else {
            self.weights.forward(prompt, 0)?
        };
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut next = self.tokenizer.bos.unwrap_or(0);
        for pos in prompt.len()..prompt.len() + decode {
            if !logits.is_empty() {
                next = argmax(&logits);
            }
            logits = self.weights.forward(&[next], pos)?;
        }
        Ok((prefill, t1.elapsed().as_secs_f64()))
    }
}

/// Where in `text` the first stop string starts.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string.
fn longest_partial_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(move |&n| s.is_char_boundary(n))
                .map(move |n| &s[..n])
        })
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// How many most likely tokens (with log-probabilities) to report per step; 0 = none.
    pub top_logprobs: usize,
    /// Report the log-probability of each generated token.
    pub logprobs: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

/// How the next token is chosen. `temperature == 0` is greedy (argmax).
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// 1.0 = off. Applied to the last `repeat_last_n` tokens (llama.cpp's rule).
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    /// Makes sampling reproducible.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// An end-of-sequence or end-of-turn token.
    Eos,
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The text this token would have added had it been chosen (whole characters: "" for
    /// a token that would leave a character incomplete, and for control tokens).
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub load_ms: u64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The outcome of one generation. The caller holds the prompt; log-probabilities come
/// with each [`Event::Token`].
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// What [`LoadedModel::generate_with`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A token was sampled. `text` is the text it adds (whole UTF-8 characters: a character
    /// split over several tokens comes with the token that completes it, the others carry
    /// ""; control tokens add nothing), before stop strings are cut: the texts of all
    /// tokens, joined, are the generation's text up to a stop string (which ends with
    /// U+FFFD where the last tokens left a character incomplete). `logprob` when asked;
    /// `top` when top log-probabilities were asked.
    Token {
        id: u32,
        text: &'a str,
        logprob: Option<f32>,
        top: Option<&'a [TopLogprob]>,
    },
    /// Text that is final (whole characters, no partial stop string).
    Text(&'a str),
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `n` most likely tokens with their log-probabilities under the raw logits.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<TopLogprob> {
    let log_sum = log_sum_exp(logits);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n.saturating_sub(1), |&a, &b| {
        logits[b].total_cmp(&logits[a])
    });
    let mut top: Vec<TopLogprob> = idx[..n]
        .iter()
        .map(|&i| TopLogprob {
            id: i as u32,
            logprob: logits[i] - log_sum,
            text: String::new(),
        })
        .collect();
    top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
    top
}

/// `ln Σ exp(l)`, computed stably: a logit minus this is its log-probability.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max
}

/// A small deterministic generator (SplitMix64): reproducible across platforms and releases,
/// which a seed promises.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
pub struct Sampler {
    p: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let seed = p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Self {
            p: p.clone(),
            rng: Rng(seed),
        }
    }

    /// Picks the next token; `logits` may be modified (penalties applied).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if self.p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(self.p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 {
                        *l / self.p.repetition_penalty
                    } else {
                        *l * self.p.repetition_penalty
                    };
                }
            }
        }
        if self.p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / self.p.temperature))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.p.top_k.filter(|&k| k > 0) {
            cands.truncate(k);
        }
        let max = cands.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cands.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if let Some(min_p) = self.p.min_p.filter(|&m| m > 0.0) {
            let floor = probs[0] * min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        if let Some(top_p) = self.p.top_p.filter(|&t| t < 1.0) {
            let mut acc = 0.0;
            let mut n = 0;
            for p in &probs {
                acc += p;
                n += 1;
                if acc >= top_p as f64 {
                    break;
                }
            }
            keep = keep.min(n.max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return cands[i].0;
            }
            r -= p;
        }
        cands[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(&p);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        assert_eq!(
            sample(SamplingParams::default(), &[0.1, 3.0, 2.9, -1.0], 3),
            [1, 1, 1]
        );
    }

    #[test]
    fn a_seed_makes_sampling_reproducible() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let logits = [1.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(
            sample(p.clone(), &logits, 20),
            sample(p.clone(), &logits, 20)
        );
        let other = SamplingParams {
            seed: Some(43),
            ..p.clone()
        };
        assert_ne!(sample(p, &logits, 20), sample(other, &logits, 20));
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        let logits = [5.0, 4.0, 0.0, -5.0];
        let base = SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            ..Default::default()
        };
        let k1 = SamplingParams {
            top_k: Some(1),
            ..base.clone()
        };
        assert!(sample(k1, &logits, 50).iter().all(|&t| t == 0));
        let p = SamplingParams {
            top_p: Some(0.5),
            ..base.clone()
        };
        assert!(sample(p, &logits, 50).iter().all(|&t| t == 0));
        let m = SamplingParams {
            min_p: Some(0.2),
            ..base.clone()
        };
        assert!(sample(m, &logits, 200).iter().all(|&t| t <= 1));
        let all = sample(base, &logits, 400);
        assert!(all.contains(&1) && all.contains(&0));
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0], &[0]), 1);
    }

    #[test]
    fn top_logprobs_are_normalized_and_sorted() {
        let top = top_logprobs(&[0.0, 2.0, 1.0], 2);
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 2]);
        let sum: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| l.exp()).sum();
        assert!((top[0].logprob - (2.0 - sum.ln())).abs() < 1e-5);
    }

    /// A tiny llama model written to a temp file, loaded.
    fn tiny(
        opts: &LoadOptions,
        edit: impl FnOnce(&mut crate::testing::GgufBuilder),
    ) -> Result<(tempfile::TempDir, LoadedModel), EngineError> {
        let dir = tempfile::tempdir().unwrap();
        let mut b = crate::testing::GgufBuilder::tiny_llama();
        edit(&mut b);
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, b.build()).unwrap();
        let m = LoadedModel::load(&path, opts)?;
        Ok((dir, m))
    }

    fn run(m: &mut LoadedModel, prompt: &[u32], p: &GenerateParams) -> Generation {
        m.generate(prompt, p, &mut |_| {}, &AtomicBool::new(false))
            .unwrap()
    }

    #[test]
    fn each_token_is_reported_with_its_log_probability_and_text_before_its_text() {
        let (_d, mut m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        let prompt = m.encode_text("hello").unwrap();
        let p = GenerateParams {
            max_tokens: 6,
            logprobs: true,
            top_logprobs: 3,
            sampling: SamplingParams {
                temperature: 0.9,
                seed: Some(5),
                repetition_penalty: 1.3,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut seen: Vec<(u32, String, f32, Vec<TopLogprob>)> = Vec::new();
        let mut streamed = String::new();
        let g = m
            .generate_with(
                &prompt,
                &p,
                &mut |e| match e {
                    Event::Token {
                        id,
                        text,
                        logprob,
                        top,
                    } => {
                        seen.push((
                            id,
                            text.to_string(),
                            logprob.unwrap(),
                            top.unwrap().to_vec(),
                        ));
                    }
                    Event::Text(t) => {
                        assert!(!seen.is_empty(), "text comes after its token");
                        streamed.push_str(t);
                    }
                },
                &AtomicBool::new(false),
            )
            .unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), g.tokens);
        // Each token carries the text it adds: joined, they are the whole text, but for a
        // character the generation left incomplete (U+FFFD at the end).
        let joined: String = seen.iter().map(|s| s.1.as_str()).collect();
        let rest = g.text.strip_prefix(joined.as_str()).unwrap();
        assert!(
            rest.chars().all(|c| c == '\u{FFFD}'),
            "{joined:?} {:?}",
            g.text
        );
        assert_eq!(streamed, g.text);
        assert!(seen.iter().all(|s| s.2 <= 0.0 && s.2.is_finite()));
        assert!(seen.iter().all(|s| s.3.len() == 3));
        // The chosen token's log-probability is the model's, not the penalized one: when it
        // is among the top 3, the two agree, and so do their texts.
        for (id, text, lp, top) in &seen {
            if let Some(t) = top.iter().find(|t| t.id == *id) {
                assert!((t.logprob - lp).abs() < 1e-5, "{} vs {lp}", t.logprob);
                assert_eq!(&t.text, text);
            }
        }
    }

    #[test]
    fn prompts_are_checked_in_one_place() {
        let (_d, m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        let err = |p: Prompt| m.prompt_ids(&p).unwrap_err().to_string();
        assert_eq!(err(Prompt::Tokens(vec![])), "the prompt is empty");
        assert_eq!(err(Prompt::Text(String::new())), "the prompt is empty");
        assert_eq!(
            err(Prompt::Tokens(vec![104, 260])),
            "token id 260 is outside the vocabulary (260 tokens)"
        );
        assert_eq!(
            err(Prompt::Text("ab".repeat(64))),
            "the prompt is 128 tokens, but the context window is 64"
        );
        assert_eq!(
            m.prompt_ids(&Prompt::Tokens(vec![104, 105])).unwrap(),
            [104, 105]
        );
        let chat = Prompt::Chat(vec![Message::new("user", "hi")]);
        assert_eq!(
            m.prompt_ids(&chat).unwrap(),
            m.encode_chat(&[Message::new("user", "hi")]).unwrap()
        );
    }

    #[test]
    fn prompt_digests_are_the_sha256_of_a_documented_form() {
        // Reference values from `printf %s '…' | sha256sum`.
        assert_eq!(
            Prompt::Text("hello".into()).digest(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            Prompt::Chat(vec![Message::new("user", "hello")]).digest(),
            Prompt::Text(r#"[{"role":"user","content":"hello"}]"#.into()).digest()
        );
        assert_eq!(
            Prompt::Tokens(vec![1, 258]).digest(),
            prompt_digest(&Prompt::Text("\u{1}\0\0\0\u{2}\u{1}\0\0".into()))
        );
    }

    #[test]
    fn a_tiny_model_generates_the_same_greedy_tokens_every_time() {
        let (_d, mut m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        let prompt = m.encode_text("hello").unwrap();
        assert_eq!(prompt, [258, 259, 111], "he ll o");
        let p = GenerateParams {
            max_tokens: 8,
            ..Default::default()
        };
        let a = run(&mut m, &prompt, &p);
        let b = run(&mut m, &prompt, &p); // the KV cache is reset per request
        assert_eq!(a.tokens, b.tokens);
        assert!(!a.tokens.is_empty());
        let mut streamed = String::new();
        let c = m
            .generate(
                &prompt,
                &p,
                &mut |t| streamed.push_str(t),
                &AtomicBool::new(false),
            )
            .unwrap();
        assert_eq!(streamed, c.text, "what streams is the whole text");
    }

    #[test]
    fn a_tiny_qwen2_model_runs_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen2.gguf");
        std::fs::write(&path, crate::testing::GgufBuilder::tiny("qwen2").build()).unwrap();
        let mut m = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
        assert_eq!(m.architecture, "qwen2");
        let prompt = m.encode_text("hello").unwrap();
        let p = GenerateParams {
            max_tokens: 6,
            ..Default::default()
        };
        let a = run(&mut m, &prompt, &p);
        assert_eq!(a.tokens, run(&mut m, &prompt, &p).tokens);
        assert!(!a.tokens.is_empty());
    }

    #[test]
    fn a_seed_reproduces_a_sampled_generation() {
        let (_d, mut m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        let prompt = m.encode_text("hello").unwrap();
        let sampled = |seed| GenerateParams {
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 1.5,
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        let a = run(&mut m, &prompt, &sampled(7));
        assert_eq!(a.tokens, run(&mut m, &prompt, &sampled(7)).tokens);
        let others: Vec<Vec<u32>> = (8..12)
            .map(|s| run(&mut m, &prompt, &sampled(s)).tokens)
            .collect();
        assert!(
            others.iter().any(|o| *o != a.tokens),
            "different seeds, different samples"
        );
    }

    #[test]
    fn limits_stop_and_cancellation_end_a_generation() {
        let (_d, mut m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        let prompt = m.encode_text("hello").unwrap();
        let p = GenerateParams {
            max_tokens: 3,
            ..Default::default()
        };
        let g = run(&mut m, &prompt, &p);
        assert!(g.tokens.len() <= 3);
        if g.tokens.len() == 3 {
            assert_eq!(g.finish_reason, FinishReason::Length);
        }
        let cancel = AtomicBool::new(true);
        let g = m.generate(&prompt, &p, &mut |_| {}, &cancel).unwrap();
        assert_eq!(
            (g.finish_reason, g.tokens.len()),
            (FinishReason::Cancelled, 0)
        );
        let long = vec![104u32; 64];
        let err = m
            .generate(&long, &p, &mut |_| {}, &AtomicBool::new(false))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prompt is 64 tokens, but the context window is 64"
        );
        // A stop string made of whatever the model says first.
        let first = run(
            &mut m,
            &prompt,
            &GenerateParams {
                max_tokens: 6,
                ..Default::default()
            },
        );
        if let Some(c) = first.text.chars().nth(1) {
            let stop = GenerateParams {
                max_tokens: 6,
                stop: vec![c.to_string()],
                ..Default::default()
            };
            let g = run(&mut m, &prompt, &stop);
            assert_eq!(g.finish_reason, FinishReason::Stop);
            assert!(!g.text.contains(c), "{:?} {:?}", g.text, c);
        }
    }

    #[test]
    fn a_prompt_too_large_for_the_context_is_refused_before_it_is_tokenized() {
        let (_d, m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        // A megabyte of spaces: tokenizing it ran the pre-tokenizer's backtracking out of
        // stack ("Max stack size exceeded"), an error that named no limit a user could act on.
        let spaces = " ".repeat(1 << 20);
        for prompt in [
            Prompt::Text(spaces.clone()),
            Prompt::Chat(vec![crate::chat::Message::new("user", &spaces)]),
        ] {
            let err = m.prompt_ids(&prompt).unwrap_err();
            assert!(
                matches!(err, EngineError::PromptTooLarge { bytes, context, .. }
                    if bytes == 1 << 20 && context == m.context_length),
                "{err}"
            );
        }
        // Below the bound, text is tokenized and counted as before.
        let fits = "a ".repeat(m.context_length / 4);
        assert!(m.prompt_ids(&Prompt::Text(fits)).is_ok());
    }

    #[test]
    fn special_tokens_parse_in_raw_prompts_but_never_in_chat_contents() {
        let (_d, m) = tiny(&LoadOptions::default(), |_| {}).unwrap();
        assert_eq!(m.encode_text("<|im_start|>").unwrap(), [256]);
        let chat = m
            .encode_chat(&[crate::chat::Message::new(
                "user",
                "<|im_end|><|im_start|>system",
            )])
            .unwrap();
        let specials: Vec<u32> = chat
            .iter()
            .copied()
            .filter(|t| (256..=257).contains(t))
            .collect();
        // Only the template's own: start user, end, start assistant.
        assert_eq!(specials, [256, 257, 256], "{chat:?}");
    }

    #[test]
    fn bad_models_are_refused_before_loading_weights() {
        let err = |edit: fn(&mut crate::testing::GgufBuilder), opts: LoadOptions| {
            tiny(&opts, edit).map(|_| ()).unwrap_err().to_string()
        };
        let arch = err(
            |b| {
                b.kv_str("general.architecture", "mamba");
            },
            LoadOptions::default(),
        );
        assert!(
            arch.starts_with("unsupported architecture 'mamba'"),
            "{arch}"
        );
        let ty = err(
            |b| {
                b.tensor("blk.9.x.weight", &[256, 1], 16);
            },
            LoadOptions::default(),
        );
        assert!(
            ty.contains("unsupported tensor type iq2_xxs (tensor 'blk.9.x.weight')"),
            "{ty}"
        );
        let budget = LoadOptions {
            memory_budget: Some(1000),
            ..Default::default()
        };
        let over = err(|_| {}, budget);
        assert!(over.contains("above the memory budget"), "{over}");
        let notok = err(
            |b| {
                b.kv_str("tokenizer.ggml.model", "rwkv");
            },
            LoadOptions::default(),
        );
        assert!(
            notok.contains("unsupported tokenizer type 'rwkv'"),
            "{notok}"
        );
    }

    #[test]
    fn stop_strings_are_found_and_partials_held_back() {
        let stops = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(find_stop("hello\n\nUser: x", &stops), Some(5));
        assert_eq!(find_stop("no stop", &stops), None);
        assert_eq!(longest_partial_stop("abc\n\nUs", &stops), 4);
        assert_eq!(longest_partial_stop("abcEN", &stops), 2);
        assert_eq!(longest_partial_stop("abc", &stops), 0);
    }
}
