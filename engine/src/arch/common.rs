//! What our own architectures share: where weights come from ([`Source`]), the matrices
//! ([`Linear`]) and the token embedding table ([`Embeddings`]).
//!
//! Weights whose type our kernels handle (`kernels::WType`) are used in place in the
//! memory-mapped GGUF file: nothing is copied at load, the pages are shared with the page
//! cache, and a tied output head is the embedding table itself. Other types (and norms, which
//! are small) are read into memory by candle, and such matrices go through candle's kernels.
//! The embedding table stays in its file type, rows dequantized on lookup (for SmolLM2's
//! 49k × 576 table that is 108 MiB saved against f32; for Gemma 3's 262k × 640, 470 MiB).

use std::fs::File;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Module, Result, Tensor};

use crate::kernels::{self, MappedFile, QMatrix, WType};

fn wtype(dtype: GgmlDType) -> Option<WType> {
    Some(match dtype {
        GgmlDType::Q4_0 => WType::Q4_0,
        GgmlDType::Q4_1 => WType::Q4_1,
        GgmlDType::Q5_0 => WType::Q5_0,
        GgmlDType::Q8_0 => WType::Q8_0,
        GgmlDType::Q4K => WType::Q4K,
        GgmlDType::Q6K => WType::Q6K,
        _ => return None,
    })
}

/// `OUTPOST_KERNELS=candle` keeps every matmul on candle's kernels (for comparisons).
fn candle_only() -> bool {
    static ONLY: OnceLock<bool> = OnceLock::new();
    *ONLY.get_or_init(|| std::env::var("OUTPOST_KERNELS").is_ok_and(|v| v == "candle"))
}

/// A matrix in its GGUF blocks, inside the mapped file.
#[derive(Clone)]
pub struct Weight {
    map: Arc<MappedFile>,
    start: usize,
    wt: WType,
    rows: usize,
    cols: usize,
}

impl Weight {
    fn matrix(&self) -> QMatrix<'_> {
        let len = self.rows * self.cols / self.wt.block_len() * self.wt.block_bytes();
        QMatrix {
            wt: self.wt,
            rows: self.rows,
            cols: self.cols,
            data: &self.map.bytes()[self.start..self.start + len],
        }
    }
}

/// The GGUF header, the file, and the file mapped (`None` where mapping failed: then
/// everything is read).
pub struct Source<'a> {
    ct: &'a Content,
    file: &'a mut File,
    map: Option<Arc<MappedFile>>,
}

impl<'a> Source<'a> {
    pub fn new(ct: &'a Content, file: &'a mut File) -> Self {
        let map = MappedFile::map(file).ok().map(Arc::new);
        Self { ct, file, map }
    }

    /// `name` read into memory by candle.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.ct.tensor(self.file, name, &Device::Cpu)
    }

    pub fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    /// A norm's weights as f32.
    pub fn norm(&mut self, name: &str) -> Result<Vec<f32>> {
        self.tensor(name)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// `name` in place in the mapped file, when our kernels take its type and shape.
    fn mapped(&self, name: &str) -> Result<Option<Weight>> {
        let Some(map) = &self.map else {
            return Ok(None);
        };
        let Some(info) = self.ct.tensor_infos.get(name) else {
            candle_core::bail!("cannot find tensor info for {name}")
        };
        let (Some(wt), &[rows, cols]) = (wtype(info.ggml_dtype), info.shape.dims()) else {
            return Ok(None);
        };
        if cols == 0 || !cols.is_multiple_of(wt.block_len()) || candle_only() {
            return Ok(None);
        }
        let start = self
            .ct
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok());
        let len = rows.checked_mul(cols / wt.block_len() * wt.block_bytes());
        match (start, len) {
            (Some(start), Some(len))
                if start
                    .checked_add(len)
                    .is_some_and(|end| end <= map.bytes().len()) =>
            {
                Ok(Some(Weight {
                    map: map.clone(),
                    start,
                    wt,
                    rows,
                    cols,
                }))
            }
            _ => candle_core::bail!("tensor {name} runs past the end of the file"),
        }
    }

    /// A matrix: mapped for our kernels, else read for candle's.
    pub fn linear(&mut self, name: &str) -> Result<Linear> {
        match self.mapped(name)? {
            Some(w) => Ok(Linear::Own(w)),
            None => Ok(Linear::Candle(QMatMul::from_qtensor(self.tensor(name)?)?)),
        }
    }

    /// The token embedding `name` (rows of `hidden`), and the output head: `output.weight`
    /// when the file has one, else the same table.
    pub fn embeddings(&mut self, name: &str, hidden: usize) -> Result<(Embeddings, Linear)> {
        let table = match self.mapped(name)? {
            Some(w) if w.cols == hidden => Table::Mapped(w),
            _ => Table::Read(Arc::new(self.tensor(name)?)),
        };
        let output = if self.has("output.weight") {
            self.linear("output.weight")?
        } else {
            match &table {
                Table::Mapped(w) => Linear::Own(w.clone()),
                Table::Read(t) => Linear::Candle(QMatMul::from_arc(t.clone())?),
            }
        };
        Ok((
            Embeddings {
                table,
                hidden,
                dense: OnceLock::new(),
            },
            output,
        ))
    }
}

/// A weight matrix (out × in) applied to rows of its input width.
pub enum Linear {
    /// Our kernels, over the tensor's GGUF blocks in the mapped file.
    Own(Weight),
    Candle(QMatMul),
}

impl Linear {
    /// Each `ls[i]` over the same `x` into `outs[i]`: in one pass of our kernels when they
    /// take all of them (activations quantized once, one parallel section), else one by one.
    pub fn group(ls: &[&Linear], x: &[f32], outs: &mut [&mut Vec<f32>]) -> Result<()> {
        let mut ms = Vec::with_capacity(ls.len());
        for l in ls {
            match l {
                Self::Own(w) => ms.push(w.matrix()),
                Self::Candle(_) => break,
            }
        }
        let fits = ms.len() == ls.len()
            && ms.len() <= kernels::GROUP_MAX
            && ms
                .iter()
                .all(|m| m.cols == ms[0].cols && m.wt.k_quant() == ms[0].wt.k_quant());
        if !fits {
            for (l, out) in ls.iter().zip(outs.iter_mut()) {
                l.matmul(x, out)?;
            }
            return Ok(());
        }
        let n = x.len() / ms[0].cols;
        for (m, out) in ms.iter().zip(outs.iter_mut()) {
            out.clear();
            out.resize(n * m.rows, 0.0);
        }
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        kernels::matmul_group(&ms, x, &mut slices)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// `out` ← each row of `x` times the matrix.
    pub fn matmul(&self, x: &[f32], out: &mut Vec<f32>) -> Result<()> {
        match self {
            Self::Own(w) => {
                let m = w.matrix();
                out.clear();
                out.resize(x.len() / m.cols * m.rows, 0.0);
                kernels::matmul(m, x, out).map_err(|e| candle_core::Error::Msg(e.to_string()))
            }
            Self::Candle(q) => {
                let cols = match q {
                    QMatMul::QTensor(w) => w.shape().dims2()?.1,
                    QMatMul::Tensor(w) | QMatMul::TensorF16(w) => w.dims2()?.1,
                };
                let t = Tensor::from_slice(x, (x.len() / cols, cols), &Device::Cpu)?;
                *out = q.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(())
            }
        }
    }
}

enum Table {
    Mapped(Weight),
    Read(Arc<QTensor>),
}

pub struct Embeddings {
    table: Table,
    hidden: usize,
    /// A read table whose rows are not whole blocks: the whole table as f32, made on first
    /// use.
    dense: OnceLock<Tensor>,
}

impl Embeddings {
    /// Rows `ids`, back to back in `out`.
    pub fn lookup_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let vocab = match &self.table {
            Table::Mapped(w) => w.rows,
            Table::Read(t) => t.shape().dims().first().copied().unwrap_or(0),
        };
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        out.clear();
        out.resize(ids.len() * self.hidden, 0.0);
        match &self.table {
            Table::Mapped(w) => {
                let m = w.matrix();
                let rb = m.row_bytes();
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.hidden)) {
                    let at = id as usize * rb;
                    kernels::dequantize(m.wt, &m.data[at..at + rb], row);
                }
            }
            Table::Read(t) if self.hidden.is_multiple_of(t.dtype().block_size()) => {
                let data = t.data()?;
                let rb = self.hidden / t.dtype().block_size() * t.dtype().type_size();
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.hidden)) {
                    let start = id as usize * rb;
                    let bytes = data.get(start..start + rb).ok_or_else(|| {
                        candle_core::Error::Msg("embedding row out of range".into())
                    })?;
                    let v = qtensor_from_ggml(t.dtype(), bytes, vec![self.hidden], &Device::Cpu)?
                        .dequantize(&Device::Cpu)?
                        .to_vec1::<f32>()?;
                    row.copy_from_slice(&v);
                }
            }
            Table::Read(t) => {
                let dense = match self.dense.get() {
                    Some(d) => d,
                    None => {
                        let d = t.dequantize(&Device::Cpu)?;
                        self.dense.get_or_init(|| d)
                    }
                };
                let rows = dense.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?;
                out.copy_from_slice(&rows.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}
