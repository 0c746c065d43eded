//! One decoder-only transformer for every architecture we run: Llama (SmolLM2, Llama 2/3,
//! TinyLlama), Qwen 2, Qwen 3, Phi 3 and Gemma 3 differ only in the pieces [`Layer`] holds
//! or leaves out, read from the GGUF file as llama.cpp lays them out:
//!
//! | | RoPE | q/k/v | q/k norm | MLP gate | extra norms | embedding |
//! |---|---|---|---|---|---|---|
//! | llama | interleaved | separate | – | SiLU | – | as is |
//! | qwen2 | NEOX | separate, biases | – | SiLU | – | as is |
//! | qwen3 | NEOX | separate | per head | SiLU | – | as is |
//! | phi3 | NEOX | one fused matrix | – | SiLU, gate\|up fused | – | as is |
//! | gemma3 | NEOX, base 10,000 locally, `rope.freq_base` on every sixth layer | separate | per head | GELU (tanh) | after attention and MLP | × √hidden |
//!
//! Rotations are slowed where the file asks: per frequency by `rope_freqs.weight` (Llama 3.1
//! and later), all of them by `rope.scaling.factor` when `rope.scaling.type` is `linear`
//! (Gemma 3's global layers).
//!
//! Per layer: RMSNorm → attention (grouped-query, over the preallocated KV cache of `ops`;
//! Gemma 3's sliding-window layers keep only the last `window` positions) → [norm] →
//! residual; RMSNorm → gated MLP → [norm] → residual. Then RMSNorm and the output head on the
//! last position. The pass runs on f32 slices with buffers reused across calls; every matmul
//! goes through [`Linear`] (our kernels where the type has them), all prompt positions of a
//! chunk at once.
//!
//! Written here rather than taken from `candle-transformers`: its quantized llama dequantized
//! the whole token embedding to f32 (SmolLM2's resident size was 2.2× the file), its Gemma 3
//! (0.11.1) gated the MLP with SiLU where Gemma uses GELU and built rotary tables of 131,072
//! positions in every layer, and every one of its models copied the weights into memory.

use super::common::{Embeddings, Linear, Source};
use super::ops::{self, KvCache, MAX_CHUNK, Rope};
use super::{Result, bail};
use crate::gguf::{GgufInfo, MetaValue};

/// Gemma 3: every `GLOBAL_EVERY`-th layer attends globally; the others use the window.
const GLOBAL_EVERY: usize = 6;
const GEMMA_LOCAL_ROPE_BASE: f32 = 10_000.0;
const DEFAULT_ROPE_BASE: f32 = 10_000.0;
const GEMMA_GLOBAL_ROPE_BASE: f32 = 1_000_000.0;

/// Q, K and V projections.
enum Qkv {
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Phi 3: one matrix whose output rows are q, then k, then v.
    Fused(Linear),
}

/// The MLP's gate and up projections.
enum GateUp {
    Split {
        gate: Linear,
        up: Linear,
    },
    /// Phi 3: one matrix whose output rows are the gate, then up.
    Fused(Linear),
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    /// Qwen 2: biases added to q, k and v.
    bias: Option<[Vec<f32>; 3]>,
    /// Qwen 3, Gemma 3: RMSNorm of each head of q and k.
    qk_norm: Option<[Vec<f32>; 2]>,
    o: Linear,
    /// Gemma 3: RMSNorm of the attention output before the residual.
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    down: Linear,
    /// Gemma 3: RMSNorm of the MLP output before the residual.
    post_ffn_norm: Option<Vec<f32>>,
    /// Index into `Decoder::ropes`.
    rope: usize,
    cache: KvCache,
}

/// Activations of one chunk, kept between calls.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// A fused projection's output before it is split.
    fused: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Rotation tables of this chunk, one per entry of `Decoder::ropes`.
    cs: Vec<Vec<(f32, f32)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Silu,
    Gelu,
}

pub struct Decoder {
    embed: Embeddings,
    /// Gemma 3 scales the embedding by √hidden.
    embed_scale: Option<f32>,
    hidden: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    eps: f32,
    output: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    gate: Gate,
    ropes: Vec<Rope>,
    context: usize,
    buf: Buffers,
}

/// `{arch}.{key}` of the file's metadata.
struct Md<'a> {
    info: &'a GgufInfo,
    arch: &'a str,
}

impl Md<'_> {
    fn get(&self, k: &str) -> Option<&MetaValue> {
        self.info.metadata.get(&format!("{}.{k}", self.arch))
    }

    fn usize(&self, k: &str) -> Result<usize> {
        match self.get(k).and_then(MetaValue::as_u64) {
            Some(v) => usize::try_from(v).map_err(|_| super::ModelError(format!("{k} is {v}"))),
            None => bail!("{}.{k} is missing or not a number", self.arch),
        }
    }

    fn f32(&self, k: &str) -> Option<f32> {
        self.get(k).and_then(MetaValue::as_f32)
    }
}

impl Decoder {
    /// `arch` is one of [`SUPPORTED`](super::SUPPORTED), whose hyperparameters
    /// `check::check` has accepted; `max_positions` is the context window.
    pub fn load(
        arch: &str,
        src: &Source<'_>,
        info: &GgufInfo,
        max_positions: usize,
    ) -> Result<Self> {
        let md = Md { info, arch };
        let gemma = arch == "gemma3";
        let heads = md.usize("attention.head_count")?;
        let kv_heads = match md.get("attention.head_count_kv") {
            Some(_) => md.usize("attention.head_count_kv")?,
            None => heads,
        };
        let layers_n = md.usize("block_count")?;
        let hidden = md.usize("embedding_length")?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("{heads} attention heads cannot share {kv_heads} KV heads");
        }
        let head_dim = match arch {
            "gemma3" | "qwen3" => md.usize("attention.key_length")?,
            _ => hidden / heads,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("attention heads of {head_dim} values cannot be rotated in pairs");
        }
        if !gemma
            && let Some(v) = md.get("rope.dimension_count").and_then(MetaValue::as_u64)
            && v != head_dim as u64
        {
            bail!("partial rotary embeddings ({v} of {head_dim}) are not supported");
        }
        if md
            .get("expert_count")
            .and_then(MetaValue::as_u64)
            .unwrap_or(0)
            > 1
        {
            bail!("mixture-of-experts models are not supported");
        }
        let Some(eps) = md.f32("attention.layer_norm_rms_epsilon") else {
            bail!("{arch}.attention.layer_norm_rms_epsilon is missing or not a number");
        };
        let context = max_positions.max(1);
        // Rotary embeddings: one for every layer, or Gemma 3's local and global pair.
        let neox = arch != "llama";
        // Linear position scaling (`rope.scaling.type = linear`, e.g. Gemma 3 4B and larger,
        // on their global layers only, as llama.cpp applies it); other scaling types (YaRN,
        // LongRoPE) are not applied, as they were not with candle.
        let linear = match md.get("rope.scaling.type").and_then(MetaValue::as_str) {
            Some("linear") => md
                .f32("rope.scaling.factor")
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
            _ => 1.0,
        };
        // Per-frequency divisors (Llama 3.1 and later).
        let factors = match info.tensor("rope_freqs.weight") {
            Some(_) => Some(src.vector("rope_freqs.weight", head_dim / 2)?),
            None => None,
        };
        if factors
            .as_ref()
            .is_some_and(|f| f.iter().any(|v| v.is_nan() || *v <= 0.0))
        {
            bail!("rope_freqs.weight holds a factor that is not a positive number");
        }
        let (ropes, window) = if gemma {
            let window = md.usize("attention.sliding_window")?;
            if window == 0 {
                bail!("a sliding window of 0 positions");
            }
            let local = md
                .f32("rope.local_freq_base")
                .unwrap_or(GEMMA_LOCAL_ROPE_BASE);
            let global = md.f32("rope.freq_base").unwrap_or(GEMMA_GLOBAL_ROPE_BASE);
            let ropes = vec![
                Rope::new(head_dim, local, true),
                Rope::new(head_dim, global, true).scaled(factors.as_deref(), linear),
            ];
            (ropes, Some(window))
        } else {
            let base = md.f32("rope.freq_base").unwrap_or(DEFAULT_ROPE_BASE);
            let rope = Rope::new(head_dim, base, neox).scaled(factors.as_deref(), linear);
            (vec![rope], None)
        };
        let vocab = match info.tensor("token_embd.weight").map(|t| t.dims.as_slice()) {
            Some(&[_, v]) => usize::try_from(v).unwrap_or(0),
            _ => bail!("token_embd.weight is missing or not a matrix"),
        };
        let (embed, output) = src.embeddings("token_embd.weight", vocab, hidden)?;
        let norm = src.vector("output_norm.weight", hidden)?;
        let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let w = |n: &str| format!("blk.{i}.{n}.weight");
            let ffn = match info.tensor(&w("ffn_down")).map(|t| t.dims.as_slice()) {
                Some(&[f, _]) => usize::try_from(f).unwrap_or(0),
                _ => bail!("{} is missing or not a matrix", w("ffn_down")),
            };
            let qkv = if src.has(&w("attn_qkv")) {
                Qkv::Fused(src.linear(&w("attn_qkv"), qd + 2 * kvd, hidden)?)
            } else {
                Qkv::Split {
                    q: src.linear(&w("attn_q"), qd, hidden)?,
                    k: src.linear(&w("attn_k"), kvd, hidden)?,
                    v: src.linear(&w("attn_v"), kvd, hidden)?,
                }
            };
            let b = |n: &str| format!("blk.{i}.{n}.bias");
            let bias = match (
                src.optional_vector(&b("attn_q"), qd)?,
                src.optional_vector(&b("attn_k"), kvd)?,
                src.optional_vector(&b("attn_v"), kvd)?,
            ) {
                (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                (None, None, None) => None,
                _ => bail!("layer {i} has biases for some of q, k and v only"),
            };
            let qk_norm = match (
                src.optional_vector(&w("attn_q_norm"), head_dim)?,
                src.optional_vector(&w("attn_k_norm"), head_dim)?,
            ) {
                (Some(q), Some(k)) => Some([q, k]),
                (None, None) => None,
                _ => bail!("layer {i} has a norm for one of q and k only"),
            };
            let gate_up = if src.has(&w("ffn_gate")) {
                GateUp::Split {
                    gate: src.linear(&w("ffn_gate"), ffn, hidden)?,
                    up: src.linear(&w("ffn_up"), ffn, hidden)?,
                }
            } else {
                GateUp::Fused(src.linear(&w("ffn_up"), 2 * ffn, hidden)?)
            };
            let global = gemma && (i + 1) % GLOBAL_EVERY == 0;
            layers.push(Layer {
                attn_norm: src.vector(&w("attn_norm"), hidden)?,
                qkv,
                bias,
                qk_norm,
                o: src.linear(&w("attn_output"), hidden, qd)?,
                post_attn_norm: src.optional_vector(&w("post_attention_norm"), hidden)?,
                ffn_norm: src.vector(&w("ffn_norm"), hidden)?,
                gate_up,
                down: src.linear(&w("ffn_down"), hidden, ffn)?,
                post_ffn_norm: src.optional_vector(&w("post_ffw_norm"), hidden)?,
                rope: usize::from(global),
                cache: KvCache::new(context, kvd, if global { None } else { window }),
            });
        }
        Ok(Self {
            embed,
            embed_scale: gemma.then(|| (hidden as f32).sqrt()),
            hidden,
            layers,
            norm,
            eps,
            output,
            heads,
            kv_heads,
            head_dim,
            gate: if gemma { Gate::Gelu } else { Gate::Silu },
            ropes,
            context,
            buf: Buffers::default(),
        })
    }

    /// Frees the KV cache's memory (an idle server need not hold it).
    pub fn clear_cache(&mut self) {
        for layer in &mut self.layers {
            layer.cache.reset();
        }
    }

    /// Logits after the last of `tokens`, placed at positions `pos..`; `pos == 0` starts a
    /// new sequence.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        // The whole pass runs on a worker of rayon's pool: each matmul's parallel section
        // then splits from there (the other workers, still awake from the last one, steal
        // their share) instead of being injected from outside and waited for on a lock, a
        // wake-up of two threads per section (about 120 per decoded token of SmolLM2).
        rayon::scope(|_| self.forward_in_pool(tokens, pos))
    }

    fn forward_in_pool(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() || pos + tokens.len() > self.context {
            bail!(
                "{} tokens at position {pos} do not fit a context of {}",
                tokens.len(),
                self.context
            );
        }
        let mut p = pos;
        for chunk in tokens.chunks(MAX_CHUNK) {
            self.chunk(chunk, p)?;
            p += chunk.len();
        }
        let b = &mut self.buf;
        let last = &b.x[b.x.len() - self.hidden..];
        ops::rms_norm_into(last, &self.norm, self.eps, &mut b.h);
        let mut logits = Vec::new();
        self.output.matmul(&b.h, &mut logits)?;
        Ok(logits)
    }

    fn chunk(&mut self, ids: &[u32], pos: usize) -> Result<()> {
        let (hd, heads, kvh, eps) = (self.head_dim, self.heads, self.kv_heads, self.eps);
        let (qd, kvd) = (heads * hd, kvh * hd);
        let b = &mut self.buf;
        self.embed.lookup_into(ids, &mut b.x)?;
        if let Some(s) = self.embed_scale {
            b.x.iter_mut().for_each(|v| *v *= s);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        b.cs.resize_with(self.ropes.len(), Vec::new);
        for (rope, cs) in self.ropes.iter().zip(b.cs.iter_mut()) {
            rope.table(pos, ids.len(), cs);
        }
        for layer in &mut self.layers {
            ops::rms_norm_into(&b.x, &layer.attn_norm, eps, &mut b.h);
            match &layer.qkv {
                Qkv::Split { q, k, v } => {
                    Linear::group(&[q, k, v], &b.h, &mut [&mut b.q, &mut b.k, &mut b.v])?
                }
                Qkv::Fused(m) => {
                    m.matmul(&b.h, &mut b.fused)?;
                    split(
                        &b.fused,
                        &mut [(&mut b.q, qd), (&mut b.k, kvd), (&mut b.v, kvd)],
                    );
                }
            }
            if let Some([bq, bk, bv]) = &layer.bias {
                add_rows(&mut b.q, bq);
                add_rows(&mut b.k, bk);
                add_rows(&mut b.v, bv);
            }
            if let Some([nq, nk]) = &layer.qk_norm {
                ops::rms_norm(&mut b.q, nq, eps);
                ops::rms_norm(&mut b.k, nk, eps);
            }
            let rope = &self.ropes[layer.rope];
            let cs = &b.cs[layer.rope];
            rope.apply(&mut b.q, heads, cs);
            rope.apply(&mut b.k, kvh, cs);
            layer.cache.store(&b.k, &b.v, pos);
            b.att.resize(b.q.len(), 0.0);
            layer
                .cache
                .attend(&b.q, heads, kvh, hd, pos, scale, &mut b.att);
            layer.o.matmul(&b.att, &mut b.o)?;
            if let Some(n) = &layer.post_attn_norm {
                ops::rms_norm(&mut b.o, n, eps);
            }
            add(&mut b.x, &b.o);
            ops::rms_norm_into(&b.x, &layer.ffn_norm, eps, &mut b.h);
            match &layer.gate_up {
                GateUp::Split { gate, up } => {
                    Linear::group(&[gate, up], &b.h, &mut [&mut b.gate, &mut b.up])?
                }
                GateUp::Fused(m) => {
                    m.matmul(&b.h, &mut b.fused)?;
                    let half = m.rows() / 2;
                    split(&b.fused, &mut [(&mut b.gate, half), (&mut b.up, half)]);
                }
            }
            match self.gate {
                Gate::Silu => ops::silu_mul(&mut b.gate, &b.up),
                Gate::Gelu => ops::gelu_mul(&mut b.gate, &b.up),
            }
            layer.down.matmul(&b.gate, &mut b.o)?;
            if let Some(n) = &layer.post_ffn_norm {
                ops::rms_norm(&mut b.o, n, eps);
            }
            add(&mut b.x, &b.o);
        }
        Ok(())
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `bias` added to every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add(row, bias);
    }
}

/// Rows of `fused` (each the parts' widths back to back) split into the parts.
fn split(fused: &[f32], parts: &mut [(&mut Vec<f32>, usize)]) {
    let width: usize = parts.iter().map(|(_, w)| w).sum();
    let n = fused.len() / width.max(1);
    for (v, w) in parts.iter_mut() {
        v.clear();
        v.reserve(n * *w);
    }
    for row in fused.chunks_exact(width) {
        let mut at = 0;
        for (v, w) in parts.iter_mut() {
            v.extend_from_slice(&row[at..at + *w]);
            at += *w;
        }
    }
}
