//! Llama (SmolLM2, Llama 2/3, TinyLlama), written here rather than taken from
//! `candle-transformers`, whose quantized llama dequantizes the whole token embedding to f32
//! (108 MiB more than the file holds for SmolLM2-135M's 49k × 576 table: its resident size
//! was 2.2× the file). Here the table stays in its file type, rows are dequantized on lookup,
//! and a tied output head uses the same quantized table.
//!
//! Per layer: RMSNorm → attention (interleaved RoPE, as llama.cpp's GGUF conversion lays
//! out Q and K; grouped-query attention; KV cache) → residual; RMSNorm → SiLU-gated MLP →
//! residual. Then RMSNorm and the output head on the last position.

use std::fs::File;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::common::{Embeddings, Rope, attention_mask};

struct Layer {
    attn_norm: RmsNorm,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    cache: Option<(Tensor, Tensor)>,
}

pub struct Llama {
    embed: Embeddings,
    hidden: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Rope,
}

impl Llama {
    pub fn load(ct: &Content, file: &mut File, max_positions: usize) -> Result<Self> {
        let dev = Device::Cpu;
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
        let eps = f64::from(md("attention.layer_norm_rms_epsilon")?.to_f32()?);
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if md("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts llama models are not supported");
        }
        let mut tensor = |name: &str| ct.tensor(file, name, &dev);
        let table = Arc::new(tensor("token_embd.weight")?);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        let output = match tensor("output.weight") {
            Ok(t) => QMatMul::from_qtensor(t)?,
            Err(_) => QMatMul::from_arc(table.clone())?,
        };
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let mut t = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            layers.push(Layer {
                attn_norm: RmsNorm::from_qtensor(t("attn_norm")?, eps)?,
                q: QMatMul::from_qtensor(t("attn_q")?)?,
                k: QMatMul::from_qtensor(t("attn_k")?)?,
                v: QMatMul::from_qtensor(t("attn_v")?)?,
                o: QMatMul::from_qtensor(t("attn_output")?)?,
                ffn_norm: RmsNorm::from_qtensor(t("ffn_norm")?, eps)?,
                gate: QMatMul::from_qtensor(t("ffn_gate")?)?,
                up: QMatMul::from_qtensor(t("ffn_up")?)?,
                down: QMatMul::from_qtensor(t("ffn_down")?)?,
                cache: None,
            });
        }
        Ok(Self {
            embed: Embeddings::new(table, hidden),
            hidden,
            layers,
            norm,
            output,
            heads,
            kv_heads,
            head_dim,
            rope: Rope::new(head_dim, base, max_positions, &dev)?,
        })
    }

    pub fn clear_cache(&mut self) {
        for layer in &mut self.layers {
            layer.cache = None;
        }
    }

    /// Logits after the last of `tokens`, placed at positions `pos..`; `pos == 0` starts a
    /// new sequence.
    pub fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        let mut x = self.embed.lookup(&ids)?.reshape((b, len, self.hidden))?;
        let total = pos + len;
        // One query attends to everything before it: no mask needed.
        let mask = (len > 1)
            .then(|| attention_mask(len, total, pos, 0, None))
            .transpose()?;
        let rep = self.heads / self.kv_heads;
        for layer in &mut self.layers {
            if pos == 0 {
                layer.cache = None;
            }
            let h = layer.attn_norm.forward(&x)?;
            let split = |m: &QMatMul, n: usize| -> Result<Tensor> {
                m.forward(&h)?
                    .reshape((b, len, n, self.head_dim))?
                    .transpose(1, 2)
            };
            let q = self
                .rope
                .apply_interleaved(&split(&layer.q, self.heads)?, pos)?;
            let k = self
                .rope
                .apply_interleaved(&split(&layer.k, self.kv_heads)?, pos)?;
            let v = split(&layer.v, self.kv_heads)?.contiguous()?;
            let (k, v) = match &layer.cache {
                Some((kc, vc)) => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
                None => (k, v),
            };
            if k.dim(2)? != total {
                candle_core::bail!(
                    "the KV cache holds {} positions, expected {total}",
                    k.dim(2)?
                );
            }
            layer.cache = Some((k.clone(), v.clone()));
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let attn = attn
                .transpose(1, 2)?
                .reshape((b, len, self.heads * self.head_dim))?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated =
                (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        let last = x.i((.., len - 1, ..))?;
        self.output.forward(&self.norm.forward(&last)?)
    }
}
