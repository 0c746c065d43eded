//! What our own architectures share: rotary tables, attention masks, and a token embedding
//! table kept in its file type (quantized), whose rows are dequantized on
//! lookup instead of holding the whole table as f32 (for SmolLM2's 49k × 576 table that is
//! 108 MiB saved; for Gemma 3's 262k × 640, 470 MiB). The same table serves a tied output
//! head as a quantized matrix.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{DType, Device, Result, Tensor};

pub struct Embeddings {
    pub table: Arc<QTensor>,
    hidden: usize,
    /// When a row is not a whole number of blocks: the whole table as f32, made on first use.
    dense: OnceLock<Tensor>,
}

impl Embeddings {
    pub fn new(table: Arc<QTensor>, hidden: usize) -> Self {
        Self {
            table,
            hidden,
            dense: OnceLock::new(),
        }
    }

    /// Rows `ids` as an f32 tensor of shape (ids.len(), hidden).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.table.shape().dims().first().copied().unwrap_or(0);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        let dtype = self.table.dtype();
        if self.hidden.is_multiple_of(dtype.block_size()) {
            let data = self.table.data()?;
            let row_bytes = self.hidden / dtype.block_size() * dtype.type_size();
            let mut rows = Vec::with_capacity(ids.len());
            for &id in ids {
                let start = id as usize * row_bytes;
                let row = data
                    .get(start..start + row_bytes)
                    .ok_or_else(|| candle_core::Error::Msg("embedding row out of range".into()))?;
                rows.push(
                    qtensor_from_ggml(dtype, row, vec![self.hidden], &Device::Cpu)?
                        .dequantize(&Device::Cpu)?,
                );
            }
            return Tensor::stack(&rows, 0);
        }
        let dense = match self.dense.get() {
            Some(t) => t,
            None => {
                let t = self.table.dequantize(&Device::Cpu)?;
                self.dense.get_or_init(|| t)
            }
        };
        dense.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)
    }
}

pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, base: f32, positions: usize, dev: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| base.powf(-(i as f32) / head_dim as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), dev)?.reshape((1, head_dim / 2))?;
        let pos = Tensor::arange(0u32, positions as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let angles = pos.matmul(&inv)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// NEOX style: dimension i pairs with i + d/2 (Gemma, Qwen).
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, len)?;
        let sin = self.sin.narrow(0, pos, len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    /// Interleaved style: dimension 2i pairs with 2i + 1 (Llama as GGUF stores it).
    pub fn apply_interleaved(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, len)?;
        let sin = self.sin.narrow(0, pos, len)?;
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}

/// Additive mask (0 or -inf) of shape (len, total): query i (at pos + i) may see key j (at
/// first_key + j) when the key is not in its future and, on sliding layers, within the window.
pub fn attention_mask(
    len: usize,
    total: usize,
    pos: usize,
    first_key: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let mut m = vec![0f32; len * total];
    for i in 0..len {
        let qp = pos + i;
        for j in 0..total {
            let kp = first_key + j;
            let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
            if !visible {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (len, total), &Device::Cpu)?.reshape((1, 1, len, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_causal_and_windowed() {
        let m = attention_mask(3, 3, 0, 0, None)
            .unwrap()
            .flatten_all()
            .unwrap();
        let v = m.to_vec1::<f32>().unwrap();
        let seen: Vec<bool> = v.iter().map(|x| x.is_finite()).collect();
        assert_eq!(
            seen,
            [true, false, false, true, true, false, true, true, true]
        );
        // Window of 2: query at 2 no longer sees key 0.
        let w = attention_mask(3, 3, 0, 0, Some(2))
            .unwrap()
            .flatten_all()
            .unwrap();
        let seen: Vec<bool> = w
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.is_finite())
            .collect();
        assert_eq!(
            seen,
            [true, false, false, true, true, false, false, true, true]
        );
        // Decoding one token at position 10 with 4 cached keys (positions 7..=10).
        let d = attention_mask(1, 4, 10, 7, Some(3))
            .unwrap()
            .flatten_all()
            .unwrap();
        let seen: Vec<bool> = d
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.is_finite())
            .collect();
        assert_eq!(seen, [false, true, true, true]);
    }
}
