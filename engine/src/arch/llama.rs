//! Llama (SmolLM2, Llama 2/3, TinyLlama), written here rather than taken from
//! `candle-transformers`, whose quantized llama dequantizes the whole token embedding to f32
//! (108 MiB more than the file holds for SmolLM2-135M's 49k × 576 table: its resident size
//! was 2.2× the file). Here the table stays in its file type, rows are dequantized on lookup,
//! and a tied output head uses the same quantized table.
//!
//! Per layer: RMSNorm → attention (interleaved RoPE, as llama.cpp's GGUF conversion lays
//! out Q and K; grouped-query attention over the preallocated KV cache of `ops`) →
//! residual; RMSNorm → SiLU-gated MLP → residual. Then RMSNorm and the output head on the
//! last position. The pass runs on f32 slices with buffers reused across calls; every
//! matmul goes through [`Linear`] (our kernels where the type has them), all prompt
//! positions of a chunk at once.

use std::fs::File;

use candle_core::Result;
use candle_core::quantized::gguf_file::Content;

use super::common::{Embeddings, Linear, Source};
use super::ops::{self, KvCache, MAX_CHUNK, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
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
    cs: Vec<(f32, f32)>,
}

pub struct Llama {
    embed: Embeddings,
    hidden: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    eps: f32,
    output: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Rope,
    context: usize,
    buf: Buffers,
}

impl Llama {
    pub fn load(ct: &Content, file: &mut File, max_positions: usize) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("llama.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing llama.{k}")))
        };
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(heads, |v| v as usize);
        let layers_n = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("{heads} attention heads cannot share {kv_heads} KV heads");
        }
        let head_dim = hidden / heads;
        let rope_dim = md("rope.dimension_count")
            .and_then(|v| v.to_u32())
            .map_or(head_dim, |v| v as usize);
        if rope_dim != head_dim {
            candle_core::bail!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            );
        }
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if md("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts llama models are not supported");
        }
        let mut src = Source::new(ct, file);
        let (embed, output) = src.embeddings("token_embd.weight", hidden)?;
        let norm = src.norm("output_norm.weight")?;
        let context = max_positions.max(1);
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: src.norm(&name("attn_norm"))?,
                q: src.linear(&name("attn_q"))?,
                k: src.linear(&name("attn_k"))?,
                v: src.linear(&name("attn_v"))?,
                o: src.linear(&name("attn_output"))?,
                ffn_norm: src.norm(&name("ffn_norm"))?,
                gate: src.linear(&name("ffn_gate"))?,
                up: src.linear(&name("ffn_up"))?,
                down: src.linear(&name("ffn_down"))?,
                cache: KvCache::new(context, kv_heads * head_dim, None),
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
            rope: Rope::new(head_dim, base, false),
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
        let scale = 1.0 / (hd as f32).sqrt();
        self.rope.table(pos, ids.len(), &mut b.cs);
        for layer in &mut self.layers {
            ops::rms_norm_into(&b.x, &layer.attn_norm, self.eps, &mut b.h);
            Linear::group(
                &[&layer.q, &layer.k, &layer.v],
                &b.h,
                &mut [&mut b.q, &mut b.k, &mut b.v],
            )?;
            self.rope.apply(&mut b.q, heads, &b.cs);
            self.rope.apply(&mut b.k, kvh, &b.cs);
            layer.cache.store(&b.k, &b.v, pos);
            b.att.resize(b.q.len(), 0.0);
            layer
                .cache
                .attend(&b.q, heads, kvh, hd, pos, scale, &mut b.att);
            layer.o.matmul(&b.att, &mut b.o)?;
            add(&mut b.x, &b.o);
            ops::rms_norm_into(&b.x, &layer.ffn_norm, self.eps, &mut b.h);
            Linear::group(
                &[&layer.gate, &layer.up],
                &b.h,
                &mut [&mut b.gate, &mut b.up],
            )?;
            ops::silu_mul(&mut b.gate, &b.up);
            layer.down.matmul(&b.gate, &mut b.o)?;
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
