//! Where weights come from ([`Source`]), the matrices ([`Linear`]) and the token embedding
//! table ([`Embeddings`]).
//!
//! Every tensor is used in place in the memory-mapped GGUF file (read into memory only where
//! mapping fails): the pages are shared with the page cache, and a tied output head is the
//! embedding table itself. The exception, on x86 (`kernels::copies`): the matrices our
//! kernels multiply are read from the file once at load into memory of their own, Q4_0, Q4_1,
//! Q5_0 and Q8_0 repacked on the way (`kernels::packs`), and used from there ([`Copies`]). Matrices of a type our kernels multiply
//! (`kernels::WType`) go through them; other types (f32, f16, bf16, Q5_1, Q8_1, Q2_K, Q3_K,
//! Q5_K, Q8_K) through [`Linear::Rows`], which decodes each row with `quant` and takes f32 dot
//! products. Norms and biases, which are small, are decoded to f32 at load. The embedding
//! table stays in its file type, rows decoded on lookup (for SmolLM2's 49k × 576 table that
//! is 108 MiB saved against f32; for Gemma 3's 262k × 640, 470 MiB).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use super::{ModelError, Result, bail};
use crate::gguf::{GgufInfo, TensorInfo};
use crate::kernels::{self, MappedFile, QMatrix, WType};
use crate::quant::{self, QType};

/// `OUTPOST_KERNELS=rows` sends every matmul through [`Linear::Rows`] (for comparisons).
fn rows_only() -> bool {
    static ONLY: OnceLock<bool> = OnceLock::new();
    *ONLY.get_or_init(|| std::env::var("OUTPOST_KERNELS").is_ok_and(|v| v == "rows"))
}

/// The model file's bytes: mapped (with the handle, for reads that bypass the mapping), or
/// read whole where mapping failed.
pub enum FileBytes {
    Mapped(MappedFile, File),
    Read(Vec<u8>),
}

impl FileBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(m, _) => m.bytes(),
            Self::Read(v) => v,
        }
    }

    /// `buf.len()` bytes from `offset`, without touching the mapping (so that what is read
    /// once to be repacked does not stay in this process's resident set).
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Self::Mapped(_, f) => f.read_exact_at(buf, offset as u64),
            Self::Read(v) => {
                let src = v.get(offset..offset + buf.len()).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the model's end")
                })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// The whole file in memory, from its first byte (the header was read through the same
/// handle, which left its position past the header).
pub(super) fn read_whole(file: &mut File) -> Result<FileBytes> {
    let mut v = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut v))
        .map_err(|e| ModelError(format!("reading the model: {e}")))?;
    Ok(FileBytes::Read(v))
}

/// A matrix (or table) in its GGUF blocks, inside the file.
#[derive(Clone)]
pub struct Weight {
    file: Arc<FileBytes>,
    start: usize,
    qt: QType,
    rows: usize,
    cols: usize,
    /// Where the kernels' own copy of it starts ([`Copies`]), packed where `packed`.
    owned: Option<(Arc<Copies>, usize)>,
    packed: bool,
}

impl Weight {
    fn row_bytes(&self) -> usize {
        self.cols / self.qt.block_len() * self.qt.block_bytes()
    }

    fn data(&self) -> &[u8] {
        &self.file.bytes()[self.start..self.start + self.rows * self.row_bytes()]
    }

    /// For our kernels, when they take the type.
    fn matrix(&self) -> Option<QMatrix<'_>> {
        let wt = WType::from_ggml_id(self.qt.ggml_id())?;
        Some(QMatrix {
            wt,
            rows: self.rows,
            cols: self.cols,
            data: self.owned_data().unwrap_or_else(|| self.data()),
            packed: self.packed,
        })
    }

    /// The kernels' copy of this matrix, where it has one.
    fn owned_data(&self) -> Option<&[u8]> {
        let (c, at) = self.owned.as_ref()?;
        Some(&c.bytes.bytes()[*at..*at + self.rows * self.row_bytes()])
    }

    /// Row `r` decoded into `out` (`cols` values).
    fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        match (self.owned_data(), WType::from_ggml_id(self.qt.ggml_id())) {
            (Some(p), Some(wt)) if self.packed => {
                let mut row = vec![0u8; rb];
                kernels::unpack_row(wt, self.cols, p, r, &mut row);
                quant::dequantize(self.qt, &row, out);
            }
            (Some(p), _) => quant::dequantize(self.qt, &p[r * rb..(r + 1) * rb], out),
            _ => quant::dequantize(self.qt, &self.data()[r * rb..(r + 1) * rb], out),
        }
    }
}

/// A matrix to copy: its tensor name, type, shape and where it starts in the file.
struct Entry {
    name: String,
    wt: WType,
    rows: usize,
    cols: usize,
    start: usize,
}

/// The kernels' own copy of every matrix they multiply (on x86, `kernels::copies`), Q4_0,
/// Q4_1, Q5_0 and Q8_0 packed on the way (`kernels::packs`), in one anonymous mapping (huge
/// pages once khugepaged merges it, where the system allows them). The matrices are read
/// from the file in chunks of about 1 MiB on rayon's pool, not through the mapping: a fault
/// there maps the whole page-cache folio around it (megabytes, on a recent kernel, of
/// matrices that are already copied), which would then stay resident beside the copies.
struct Copies {
    bytes: kernels::SealedBytes,
    /// Tensor name → (offset in `bytes`, packed).
    at: std::collections::HashMap<String, (usize, bool)>,
}

impl Copies {
    fn fill(file: &FileBytes, entries: Vec<Entry>) -> Result<Option<Self>> {
        if !kernels::copies() || rows_only() {
            return Ok(None);
        }
        // (file offset, copy offset, length, type, width, packed): about 1 MiB each, whole
        // packed groups (or rows) so that each is packed on its own.
        let mut jobs = Vec::new();
        let mut at = std::collections::HashMap::new();
        let mut total = 0usize;
        for e in entries {
            let rb = e.cols / e.wt.block_len() * e.wt.block_bytes();
            let Some(len) = e.rows.checked_mul(rb) else {
                continue;
            };
            let packed = kernels::packs(e.wt, e.rows);
            let unit = if packed { kernels::PACK_ROWS * rb } else { rb };
            let chunk = ((1 << 20) / unit.max(1)).max(1) * unit;
            let off = total.next_multiple_of(64);
            let mut done = 0;
            while done < len {
                let n = chunk.min(len - done);
                jobs.push((e.start + done, off + done, n, e.wt, e.cols, packed));
                done += n;
            }
            at.insert(e.name, (off, packed));
            total = off + len;
        }
        if total == 0 {
            return Ok(None);
        }
        // Populated in one call (every page is written next; one fault each costs more).
        let mut out = kernels::AnonBytes::new(total)
            .map_err(|e| ModelError(format!("allocating {total} bytes for the weights: {e}")))?;
        // Each job's destination, disjoint (jobs are in increasing offset order).
        let mut dsts = Vec::with_capacity(jobs.len());
        let (mut rest, mut pos): (&mut [u8], usize) = (out.bytes_mut(), 0);
        for &(_, off, n, ..) in &jobs {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - pos);
            let (dst, tail) = tail.split_at_mut(n);
            dsts.push(dst);
            (rest, pos) = (tail, off + n);
        }
        jobs.par_iter()
            .zip(dsts.into_par_iter())
            .try_for_each_init(Vec::new, |scratch: &mut Vec<u8>, (job, dst)| {
                let &(start, _, n, wt, cols, packed) = job;
                if packed {
                    scratch.resize(n, 0);
                    file.read_at(start, scratch)?;
                    kernels::pack_groups(wt, cols, scratch, dst);
                    Ok(())
                } else {
                    file.read_at(start, dst)
                }
            })
            .map_err(|e| ModelError(format!("reading the model's weights: {e}")))?;
        // Filled in ordinary pages, then offered to khugepaged, which merges them into huge
        // pages in the background (fewer TLB misses: decode 6–33% faster once merged, measured
        // with huge pages taken at fault). Taking them at fault instead made loads 2–3× slower
        // on the benchmark VM, where zeroing fresh 2 MiB pages dominated the load.
        let bytes = out
            .seal()
            .map_err(|e| ModelError(format!("sealing the weights' copy: {e}")))?;
        Ok(Some(Self { bytes, at }))
    }
}

/// The GGUF header and the file's bytes.
pub struct Source<'a> {
    info: &'a GgufInfo,
    file: Arc<FileBytes>,
    copies: Option<Arc<Copies>>,
}

impl<'a> Source<'a> {
    pub fn new(info: &'a GgufInfo, file: &mut File) -> Result<Self> {
        let mapped = MappedFile::map(file).and_then(|m| Ok((m, file.try_clone()?)));
        let bytes = match mapped {
            Ok((m, f)) => FileBytes::Mapped(m, f),
            Err(_) => read_whole(file)?,
        };
        Self::with_bytes(info, bytes)
    }

    pub(super) fn with_bytes(info: &'a GgufInfo, bytes: FileBytes) -> Result<Self> {
        if (bytes.bytes().len() as u64) < info.file_len {
            bail!("the model file shrank while it was being loaded");
        }
        let entries = info
            .tensors
            .iter()
            .filter_map(|t| {
                let wt = WType::from_ggml_id(t.ggml_type.id())?;
                let [cols, rows] = t.dims[..] else {
                    return None;
                };
                let (cols, rows) = (usize::try_from(cols).ok()?, usize::try_from(rows).ok()?);
                // Matrices `weight` would refuse are not copied either.
                let whole = cols > 0 && cols.is_multiple_of(wt.block_len());
                let bytes = (cols / wt.block_len() * wt.block_bytes()).checked_mul(rows)?;
                let start = usize::try_from(info.data_offset + t.offset).ok()?;
                (whole && bytes as u64 == t.bytes).then(|| Entry {
                    name: t.name.clone(),
                    wt,
                    rows,
                    cols,
                    start,
                })
            })
            .collect();
        let copies = Copies::fill(&bytes, entries)?.map(Arc::new);
        Ok(Self {
            info,
            file: Arc::new(bytes),
            copies,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.info.tensor(name).is_some()
    }

    fn tensor(&self, name: &str) -> Result<(&TensorInfo, QType, usize)> {
        let Some(t) = self.info.tensor(name) else {
            bail!("the model has no tensor {name}");
        };
        let Some(qt) = QType::from_ggml_id(t.ggml_type.id()) else {
            bail!(
                "tensor {name} has type {}, which is not supported",
                t.ggml_type
            );
        };
        // `gguf` checked that the data lies inside the file.
        let start = usize::try_from(self.info.data_offset + t.offset)
            .map_err(|_| ModelError(format!("tensor {name} lies beyond the address space")))?;
        Ok((t, qt, start))
    }

    /// A norm's or bias's weights as f32 (`len` of them).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (t, qt, start) = self.tensor(name)?;
        if t.elements != len as u64 || !len.is_multiple_of(qt.block_len()) {
            bail!("tensor {name} has {} values, {len} expected", t.elements);
        }
        let mut out = vec![0.0; len];
        // Read, not through the mapping: a few KiB that sit between matrices, where a fault
        // would map the whole page-cache folio around them (megabytes of a packed matrix's
        // pages, resident beside its copy).
        let mut bytes = vec![0u8; t.bytes as usize];
        self.file
            .read_at(start, &mut bytes)
            .map_err(|e| ModelError(format!("reading tensor {name}: {e}")))?;
        quant::dequantize(qt, &bytes, &mut out);
        Ok(out)
    }

    /// [`vector`](Self::vector) where the tensor exists.
    pub fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A matrix of `rows` rows of `cols` values, in place.
    fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let (t, qt, start) = self.tensor(name)?;
        let dims: Vec<u64> = t.dims.clone();
        if dims != [cols as u64, rows as u64] {
            bail!("tensor {name} is {dims:?}, [{cols}, {rows}] expected");
        }
        if !cols.is_multiple_of(qt.block_len()) {
            bail!("tensor {name}: rows of {cols} are not whole {qt:?} blocks");
        }
        let (owned, packed) = match self
            .copies
            .as_ref()
            .and_then(|c| Some((c, c.at.get(name)?)))
        {
            Some((c, &(at, packed))) => (Some((c.clone(), at)), packed),
            None => (None, false),
        };
        Ok(Weight {
            file: self.file.clone(),
            start,
            qt,
            rows,
            cols,
            owned,
            packed,
        })
    }

    /// The matrix `name`, `rows` × `cols`.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        Ok(Linear::from_weight(self.weight(name, rows, cols)?))
    }

    /// The token embedding `name` (`vocab` rows of `hidden`), and the output head:
    /// `output.weight` when the file has one, else the same table.
    pub fn embeddings(
        &self,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<(Embeddings, Linear)> {
        // Lookups read the kernels' copy where the table has one (a tied head's, packed), so
        // the table's pages in the mapping are never touched.
        let table = self.weight(name, vocab, hidden)?;
        let output = if self.has("output.weight") {
            self.linear("output.weight", vocab, hidden)?
        } else {
            Linear::from_weight(table.clone())
        };
        Ok((Embeddings { table }, output))
    }
}

/// A weight matrix (out × in) applied to rows of its input width.
pub enum Linear {
    /// Our kernels, over the tensor's GGUF blocks.
    Own(Weight),
    /// Any other type: each row decoded, then f32 dot products.
    Rows(Weight),
}

impl Linear {
    fn from_weight(w: Weight) -> Self {
        if w.matrix().is_some() && !rows_only() {
            Self::Own(w)
        } else {
            Self::Rows(w)
        }
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        match self {
            Self::Own(w) | Self::Rows(w) => w.rows,
        }
    }

    /// Each `ls[i]` over the same `x` into `outs[i]`: in one pass of our kernels when they
    /// take all of them (activations quantized once, one parallel section), else one by one.
    pub fn group(ls: &[&Linear], x: &[f32], outs: &mut [&mut Vec<f32>]) -> Result<()> {
        let mut ms = Vec::with_capacity(ls.len());
        for l in ls {
            match l {
                Self::Own(w) => ms.extend(w.matrix()),
                Self::Rows(_) => break,
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
        kernels::matmul_group(&ms, x, &mut slices).map_err(|e| ModelError(e.to_string()))
    }

    /// `out` ← each row of `x` times the matrix.
    pub fn matmul(&self, x: &[f32], out: &mut Vec<f32>) -> Result<()> {
        match self {
            Self::Own(w) => {
                let Some(m) = w.matrix() else {
                    bail!("a {:?} matrix in our kernels", w.qt);
                };
                out.clear();
                out.resize(x.len() / m.cols * m.rows, 0.0);
                kernels::matmul(m, x, out).map_err(|e| ModelError(e.to_string()))
            }
            Self::Rows(w) => rows_matmul(w, x, out),
        }
    }
}

/// Output rows per work item of [`rows_matmul`].
const ROWS_CHUNK: usize = 16;

/// `out` (n × rows) = `x` (n × cols) · `wᵀ`, decoding each row of `w` once per call.
fn rows_matmul(w: &Weight, x: &[f32], out: &mut Vec<f32>) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    if cols == 0 || !x.len().is_multiple_of(cols) {
        bail!("{} activations in rows of {cols}", x.len());
    }
    let n = x.len() / cols;
    out.clear();
    if n == 0 || rows == 0 {
        return Ok(());
    }
    // Row-major by weight row (each work item owns whole rows), transposed after.
    let mut by_row = vec![0f32; rows * n];
    by_row
        .par_chunks_mut(ROWS_CHUNK * n)
        .enumerate()
        .for_each_init(Vec::new, |tile: &mut Vec<f32>, (c, dst)| {
            // The work item's rows decoded once into a tile that stays in cache, then each
            // token's activations read once for all of them.
            let m = dst.len() / n;
            tile.resize(m * cols, 0.0);
            for (i, row) in tile.chunks_exact_mut(cols).enumerate() {
                w.row_into(c * ROWS_CHUNK + i, row);
            }
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                for (i, row) in tile.chunks_exact(cols).enumerate() {
                    dst[i * n + t] = kernels::dot_f32(row, xt);
                }
            }
        });
    out.resize(n * rows, 0.0);
    for (r, vals) in by_row.chunks_exact(n).enumerate() {
        for (t, v) in vals.iter().enumerate() {
            out[t * rows + r] = *v;
        }
    }
    Ok(())
}

pub struct Embeddings {
    table: Weight,
}

impl Embeddings {
    /// Rows `ids`, back to back in `out`.
    pub fn lookup_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let (vocab, hidden) = (self.table.rows, self.table.cols);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        out.clear();
        out.resize(ids.len() * hidden, 0.0);
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            self.table.row_into(id as usize, row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows` × `cols` matrix of `qt` from deterministic values, as a [`Weight`].
    fn weight(qt: QType, rows: usize, cols: usize) -> Weight {
        let mut seed = 3u32;
        let x: Vec<f32> = (0..rows * cols)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let mut bytes = Vec::new();
        quant::quantize(qt, &x, &mut bytes).unwrap();
        Weight {
            file: Arc::new(FileBytes::Read(bytes)),
            start: 0,
            qt,
            rows,
            cols,
            owned: None,
            packed: false,
        }
    }

    /// `w` with the kernels' copy, as `Source` makes it where the CPU wants one.
    fn copied(w: &Weight) -> Weight {
        let wt = WType::from_ggml_id(w.qt.ggml_id()).unwrap();
        let entry = Entry {
            name: "w".into(),
            wt,
            rows: w.rows,
            cols: w.cols,
            start: w.start,
        };
        match Copies::fill(&w.file, vec![entry]).unwrap() {
            None => w.clone(),
            Some(c) => {
                let (at, packed) = c.at["w"];
                Weight {
                    owned: Some((Arc::new(c), at)),
                    packed,
                    ..w.clone()
                }
            }
        }
    }

    #[test]
    fn rows_read_from_a_packed_copy_equal_the_files_rows() {
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q8_0] {
            let plain = weight(qt, 24, 96);
            let packed = copied(&plain);
            if !kernels::packs(packed.matrix().unwrap().wt, 24) {
                eprintln!("{qt:?} does not pack on this CPU");
                continue;
            }
            assert!(packed.packed && packed.owned.is_some(), "{qt:?} packed");
            for r in 0..24 {
                let (mut a, mut b) = (vec![0f32; 96], vec![0f32; 96]);
                plain.row_into(r, &mut a);
                packed.row_into(r, &mut b);
                assert_eq!(a, b, "{qt:?} row {r}");
            }
        }
    }

    #[test]
    fn decoded_rows_multiply_like_our_kernels_and_like_plain_f32() {
        let (rows, cols, n) = (40, 512, 3);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
            .collect();
        for qt in [QType::Q8_0, QType::Q4_1, QType::Q4K, QType::Q6K] {
            let w = weight(qt, rows, cols);
            let (mut by_rows, mut by_kernels, mut by_packed) = (Vec::new(), Vec::new(), Vec::new());
            Linear::Rows(w.clone()).matmul(&x, &mut by_rows).unwrap();
            Linear::Own(w.clone()).matmul(&x, &mut by_kernels).unwrap();
            // Packed where this CPU packs the type, else the same plain kernels.
            let packed = copied(&w);
            assert_eq!(
                packed.packed,
                kernels::packs(packed.matrix().unwrap().wt, rows)
            );
            assert_eq!(packed.owned.is_some(), kernels::copies());
            Linear::Own(packed).matmul(&x, &mut by_packed).unwrap();
            // The plain product of the decoded matrix: what `Rows` must give exactly.
            let mut dense = vec![0f32; rows * cols];
            for r in 0..rows {
                w.row_into(r, &mut dense[r * cols..(r + 1) * cols]);
            }
            for t in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..cols)
                        .map(|c| dense[r * cols + c] * x[t * cols + c])
                        .sum();
                    let got = by_rows[t * rows + r];
                    assert!(
                        (got - exact).abs() < 1e-3,
                        "{qt:?} [{t},{r}]: {got} vs {exact}"
                    );
                    // Our kernels quantize the activations to 8 bits: close, not equal.
                    let k = by_kernels[t * rows + r];
                    assert!(
                        (k - exact).abs() < 0.05 * (1.0 + exact.abs()),
                        "{qt:?} [{t},{r}]: kernels {k} vs {exact}"
                    );
                    // The same integer sums, packed or not.
                    let p = by_packed[t * rows + r];
                    assert!(
                        (p - k).abs() <= 1e-5 * (1.0 + k.abs()),
                        "{qt:?} [{t},{r}]: packed {p} vs {k}"
                    );
                }
            }
        }
    }
}
