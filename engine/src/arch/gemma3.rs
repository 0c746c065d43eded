//! Gemma 3, written here rather than taken from `candle-transformers`, whose quantized Gemma 3
//! (0.11.1) gates the MLP with SiLU where Gemma uses GELU (tanh approximation), and allocates
//! rotary tables for 131,072 positions in every layer (~2.4 GB for the 270M model).
//!
//! Per layer: RMSNorm → attention (q/k RMSNorm, RoPE with base 10,000 on sliding-window
//! layers and `rope.freq_base` on every sixth, global, layer; grouped-query attention) →
//! RMSNorm → residual; RMSNorm → GELU-gated MLP → RMSNorm → residual. Embeddings are scaled
//! by √hidden; the output head is tied to the embedding unless `output.weight` exists.
//! Sliding-window layers keep only the last `window` positions (plus one chunk) in their KV
//! cache (see `ops`). The token embedding stays in its file type (Q8_0: 170 MiB for the 262k
//! vocabulary, instead of 640 MiB as f32) and is shared with the tied output head; rows are
//! dequantized on lookup. The pass runs on f32 slices with buffers reused across calls.

use std::fs::File;

use candle_core::Result;
use candle_core::quantized::gguf_file::Content;

use super::common::{Embeddings, Linear, Source};
use super::ops::{self, KvCache, MAX_CHUNK, Rope};

/// Every `GLOBAL_EVERY`-th layer attends globally; the others use the sliding window.
const GLOBAL_EVERY: usize = 6;
const LOCAL_ROPE_BASE: f32 = 10_000.0;

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Vec<f32>,
    global_rope: bool,
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
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cs_local: Vec<(f32, f32)>,
    cs_global: Vec<(f32, f32)>,
}

pub struct Gemma3 {
    embed: Embeddings,
    hidden: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    eps: f32,
    output: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    local_rope: Rope,
    global_rope: Rope,
    context: usize,
    buf: Buffers,
}

impl Gemma3 {
    pub fn load(ct: &Content, file: &mut File, max_positions: usize) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("gemma3.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing gemma3.{k}")))
        };
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("attention.head_count_kv")?.to_u32()? as usize;
        let layers_n = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = md("attention.key_length")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let window = md("attention.sliding_window")?.to_u32()? as usize;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || window == 0 {
            candle_core::bail!(
                "{heads} attention heads, {kv_heads} KV heads and a window of {window} do not fit"
            );
        }
        let global_base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1_000_000.0);
        let local_base = md("rope.local_freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(LOCAL_ROPE_BASE);
        let mut src = Source::new(ct, file);
        let (embed, output) = src.embeddings("token_embd.weight", hidden)?;
        let norm = src.norm("output_norm.weight")?;
        let context = max_positions.max(1);
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let global = (i + 1) % GLOBAL_EVERY == 0;
            layers.push(Layer {
                attn_norm: src.norm(&name("attn_norm"))?,
                q: src.linear(&name("attn_q"))?,
                k: src.linear(&name("attn_k"))?,
                v: src.linear(&name("attn_v"))?,
                o: src.linear(&name("attn_output"))?,
                q_norm: src.norm(&name("attn_q_norm"))?,
                k_norm: src.norm(&name("attn_k_norm"))?,
                post_attn_norm: src.norm(&name("post_attention_norm"))?,
                ffn_norm: src.norm(&name("ffn_norm"))?,
                gate: src.linear(&name("ffn_gate"))?,
                up: src.linear(&name("ffn_up"))?,
                down: src.linear(&name("ffn_down"))?,
                post_ffn_norm: src.norm(&name("post_ffw_norm"))?,
                global_rope: global,
                cache: KvCache::new(context, kv_heads * head_dim, (!global).then_some(window)),
            });
        }
        Ok(Self {
            embed,
            hidden,
            layers,
            norm,
            eps,
            output,
            heads,
            kv_heads,
            head_dim,
            local_rope: Rope::new(head_dim, local_base, true),
            global_rope: Rope::new(head_dim, global_base, true),
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

    /// Logits after the last of `tokens`, placed at positions `pos..`.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        if tokens.is_empty() || pos + tokens.len() > self.context {
            candle_core::bail!(
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
        let (hd, heads, kvh) = (self.head_dim, self.heads, self.kv_heads);
        let b = &mut self.buf;
        self.embed.lookup_into(ids, &mut b.x)?;
        let s = (self.hidden as f32).sqrt();
        b.x.iter_mut().for_each(|v| *v *= s);
        let scale = 1.0 / (hd as f32).sqrt();
        self.local_rope.table(pos, ids.len(), &mut b.cs_local);
        self.global_rope.table(pos, ids.len(), &mut b.cs_global);
        for layer in &mut self.layers {
            let (rope, cs) = if layer.global_rope {
                (&self.global_rope, &b.cs_global)
            } else {
                (&self.local_rope, &b.cs_local)
            };
            ops::rms_norm_into(&b.x, &layer.attn_norm, self.eps, &mut b.h);
            Linear::group(
                &[&layer.q, &layer.k, &layer.v],
                &b.h,
                &mut [&mut b.q, &mut b.k, &mut b.v],
            )?;
            ops::rms_norm(&mut b.q, &layer.q_norm, self.eps);
            ops::rms_norm(&mut b.k, &layer.k_norm, self.eps);
            rope.apply(&mut b.q, heads, cs);
            rope.apply(&mut b.k, kvh, cs);
            layer.cache.store(&b.k, &b.v, pos);
            b.att.resize(b.q.len(), 0.0);
            layer
                .cache
                .attend(&b.q, heads, kvh, hd, pos, scale, &mut b.att);
            layer.o.matmul(&b.att, &mut b.o)?;
            ops::rms_norm(&mut b.o, &layer.post_attn_norm, self.eps);
            add(&mut b.x, &b.o);
            ops::rms_norm_into(&b.x, &layer.ffn_norm, self.eps, &mut b.h);
            Linear::group(
                &[&layer.gate, &layer.up],
                &b.h,
                &mut [&mut b.gate, &mut b.up],
            )?;
            ops::gelu_mul(&mut b.gate, &b.up);
            layer.down.matmul(&b.gate, &mut b.o)?;
            ops::rms_norm(&mut b.o, &layer.post_ffn_norm, self.eps);
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
