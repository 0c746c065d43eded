//! Gemma 3, written here rather than taken from `candle-transformers`, whose quantized Gemma 3
//! (0.11.1) gates the MLP with SiLU where Gemma uses GELU (tanh approximation), and allocates
//! rotary tables for 131,072 positions in every layer (~2.4 GB for the 270M model).
//!
//! Per layer: RMSNorm → attention (q/k RMSNorm, RoPE with base 10,000 on sliding-window
//! layers and `rope.freq_base` on every sixth, global, layer; grouped-query attention) →
//! RMSNorm → residual; RMSNorm → GELU-gated MLP → RMSNorm → residual. Embeddings are scaled
//! by √hidden; the output head is tied to the embedding unless `output.weight` exists.
//! Sliding-window layers keep only the last `window` positions in their KV cache. The token
//! embedding stays in its file type (Q8_0: 170 MiB for the 262k vocabulary, instead of
//! 640 MiB as f32) and is shared with the tied output head; rows are dequantized on lookup.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use super::common::{Embeddings, Rope, attention_mask};

use candle_core::quantized::QMatMul;
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

/// Every `GLOBAL_EVERY`-th layer attends globally; the others use the sliding window.
const GLOBAL_EVERY: usize = 6;
const LOCAL_ROPE_BASE: f32 = 10_000.0;

struct Layer {
    attn_norm: RmsNorm,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    post_ffn_norm: RmsNorm,
    /// `Some(window)` on sliding-window layers.
    window: Option<usize>,
    global_rope: bool,
    cache: Option<(Tensor, Tensor)>,
}

pub struct Gemma3 {
    embed: Embeddings,
    hidden: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    local_rope: Rope,
    global_rope: Rope,
}

impl Gemma3 {
    pub fn load(ct: &Content, file: &mut File, max_positions: usize) -> Result<Self> {
        let dev = Device::Cpu;
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
        let eps = f64::from(md("attention.layer_norm_rms_epsilon")?.to_f32()?);
        let window = md("attention.sliding_window")?.to_u32()? as usize;
        let global_base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1_000_000.0);
        let local_base = md("rope.local_freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(LOCAL_ROPE_BASE);
        let mut tensor = |name: &str| ct.tensor(file, name, &dev);
        let table = Arc::new(tensor("token_embd.weight")?);
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps)?;
        let output = match tensor("output.weight") {
            Ok(t) => QMatMul::from_qtensor(t)?,
            Err(_) => QMatMul::from_arc(table.clone())?,
        };
        let embed = Embeddings::new(table, hidden);
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let mut t = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            let global = (i + 1) % GLOBAL_EVERY == 0;
            layers.push(Layer {
                attn_norm: RmsNorm::from_qtensor(t("attn_norm")?, eps)?,
                q: QMatMul::from_qtensor(t("attn_q")?)?,
                k: QMatMul::from_qtensor(t("attn_k")?)?,
                v: QMatMul::from_qtensor(t("attn_v")?)?,
                o: QMatMul::from_qtensor(t("attn_output")?)?,
                q_norm: RmsNorm::from_qtensor(t("attn_q_norm")?, eps)?,
                k_norm: RmsNorm::from_qtensor(t("attn_k_norm")?, eps)?,
                post_attn_norm: RmsNorm::from_qtensor(t("post_attention_norm")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(t("ffn_norm")?, eps)?,
                gate: QMatMul::from_qtensor(t("ffn_gate")?)?,
                up: QMatMul::from_qtensor(t("ffn_up")?)?,
                down: QMatMul::from_qtensor(t("ffn_down")?)?,
                post_ffn_norm: RmsNorm::from_qtensor(t("post_ffw_norm")?, eps)?,
                window: (!global).then_some(window),
                global_rope: global,
                cache: None,
            });
        }
        Ok(Self {
            embed,
            hidden,
            layers,
            norm,
            output,
            heads,
            kv_heads,
            head_dim,
            local_rope: Rope::new(head_dim, local_base, max_positions, &dev)?,
            global_rope: Rope::new(head_dim, global_base, max_positions, &dev)?,
        })
    }

    pub fn clear_cache(&mut self) {
        for layer in &mut self.layers {
            layer.cache = None;
        }
    }

    /// Logits after the last of `tokens`, placed at positions `pos..`.
    pub fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        let mut x = self.embed.lookup(&ids)?.reshape((b, len, self.hidden))?;
        x = (x * (self.hidden as f64).sqrt())?;
        let mut masks: HashMap<Option<usize>, Tensor> = HashMap::new();
        for layer in &mut self.layers {
            if pos == 0 {
                layer.cache = None;
            }
            let rope = if layer.global_rope {
                &self.global_rope
            } else {
                &self.local_rope
            };
            let h = layer.attn_norm.forward(&x)?;
            let q = layer
                .q
                .forward(&h)?
                .reshape((b, len, self.heads, self.head_dim))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&h)?
                .reshape((b, len, self.kv_heads, self.head_dim))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((b, len, self.kv_heads, self.head_dim))?
                .transpose(1, 2)?;
            let q = rope.apply(&layer.q_norm.forward(&q.contiguous()?)?, pos)?;
            let k = rope.apply(&layer.k_norm.forward(&k.contiguous()?)?, pos)?;
            let (k, v) = match &layer.cache {
                Some((kc, vc)) => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
                None => (k, v.contiguous()?),
            };
            let total = k.dim(2)?;
            // Key j (of `total`, the last `len` being new) is at position pos + len - total + j.
            let first_key = pos + len - total;
            let mask = match masks.get(&layer.window) {
                Some(m) => m.clone(),
                None => {
                    let m = attention_mask(len, total, pos, first_key, layer.window)?;
                    masks.insert(layer.window, m.clone());
                    m
                }
            };
            // Sliding layers never need more than the window.
            layer.cache = Some(match layer.window {
                Some(w) if total > w => (
                    k.narrow(2, total - w, w)?.contiguous()?,
                    v.narrow(2, total - w, w)?.contiguous()?,
                ),
                _ => (k.clone(), v.clone()),
            });
            let rep = self.heads / self.kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let scores = (q.contiguous()?.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            let scores = scores.broadcast_add(&mask)?;
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let attn = attn
                .transpose(1, 2)?
                .reshape((b, len, self.heads * self.head_dim))?;
            let attn = layer.post_attn_norm.forward(&layer.o.forward(&attn)?)?;
            x = (x + attn)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let ffn = layer.post_ffn_norm.forward(&layer.down.forward(&gated)?)?;
            x = (x + ffn)?;
        }
        let last = x.i((.., len - 1, ..))?;
        self.output.forward(&self.norm.forward(&last)?)
    }
}
