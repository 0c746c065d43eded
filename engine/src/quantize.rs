//! Quantization: a new GGUF with every matrix in the target type, the tokenizer and all other
//! metadata kept, `general.file_type` updated.
//!
//! Rows must be a whole number of blocks. Where a matrix's rows are not (K-quants need 256;
//! SmolLM2's 576 is not), that matrix falls back to the legacy type of similar size, as
//! llama.cpp does: q4_k → q4_1, q5_k → q5_1, q6_k → q8_0.
//! Vectors (norms, biases) stay as they are. Requantizing an already quantized file works
//! (weights are dequantized first) but compounds the error; callers warn.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::EngineError;
use crate::gguf::{self, MetaValue, TensorInfo};
use crate::quant::{self, QType};

/// The types `quantize` writes, by the names the CLI takes.
pub const TARGETS: [&str; 8] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k",
];

fn target(name: &str) -> Option<(QType, u32)> {
    // (type, llama.cpp's general.file_type for a file mostly of that type)
    Some(match name {
        "q4_0" => (QType::Q4_0, 2),
        "q4_1" => (QType::Q4_1, 3),
        "q5_0" => (QType::Q5_0, 8),
        "q5_1" => (QType::Q5_1, 9),
        "q8_0" => (QType::Q8_0, 7),
        "q4_k" => (QType::Q4K, 14),
        "q5_k" => (QType::Q5K, 16),
        "q6_k" => (QType::Q6K, 18),
        _ => return None,
    })
}

/// The type used for rows that are not a whole number of the target's blocks.
fn fallback(t: QType) -> QType {
    match t {
        QType::Q4K => QType::Q4_1,
        QType::Q5K => QType::Q5_1,
        QType::Q6K => QType::Q8_0,
        other => other,
    }
}

/// What a quantization did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub to: String,
    pub tensors_quantized: usize,
    /// Matrices whose rows did not fit the target's blocks, and the type they got.
    pub fallbacks: Vec<(String, String)>,
    pub kept: usize,
    /// The source had quantized matrices (they were dequantized first).
    pub requantized: bool,
}

/// One tensor of the output: where its data comes from and what it becomes.
struct Planned<'a> {
    info: &'a TensorInfo,
    /// `None`: copied as it is.
    to: Option<QType>,
    bytes: u64,
}

/// Rows encoded per parallel work item.
const ROWS_PER_TASK: usize = 64;
/// Rows read, decoded and encoded at once: memory stays at a few MB per tensor whatever
/// its size (a 27B model's embedding is 8 GB as f32).
const ROWS_PER_CHUNK: usize = 1024;

/// Writes `src` quantized to `to` into `dst`.
pub fn quantize(src: &Path, dst: &Path, to: &str) -> Result<QuantizeReport, EngineError> {
    let (qtype, ftype) = target(to).ok_or_else(|| {
        EngineError::Unsupported(format!(
            "quantization '{to}' (use one of {})",
            TARGETS.join(", ")
        ))
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    // Our own validation (caps, bounds) of everything this function then reads.
    let info = gguf::inspect(src).map_err(|source| EngineError::Gguf {
        path: src.to_path_buf(),
        source,
    })?;
    let alignment = info
        .metadata
        .get("general.alignment")
        .and_then(MetaValue::as_u64)
        .unwrap_or(32);
    let mut report = QuantizeReport {
        to: to.to_string(),
        tensors_quantized: 0,
        fallbacks: Vec::new(),
        kept: 0,
        requantized: false,
    };
    let mut tensors: Vec<&TensorInfo> = info.tensors.iter().collect();
    tensors.sort_by_key(|t| t.offset);
    let mut plan = Vec::with_capacity(tensors.len());
    for t in tensors {
        let keep = Planned {
            info: t,
            to: None,
            bytes: t.bytes,
        };
        let row = t.dims.first().copied().unwrap_or(0);
        if t.dims.len() < 2 {
            report.kept += 1;
            plan.push(keep);
            continue;
        }
        let Some(from) = QType::from_ggml_id(t.ggml_type.id()) else {
            return Err(EngineError::Unsupported(format!(
                "tensor type {} (tensor '{}'): it cannot be decoded to quantize it",
                t.ggml_type, t.name
            )));
        };
        if !matches!(from, QType::F32 | QType::F16 | QType::BF16) {
            report.requantized = true;
        }
        let mut ty = qtype;
        if !row.is_multiple_of(ty.block_len() as u64) {
            ty = fallback(ty);
            if !row.is_multiple_of(ty.block_len() as u64) {
                report.kept += 1;
                plan.push(keep);
                continue;
            }
            report
                .fallbacks
                .push((t.name.clone(), ty.name().to_string()));
        }
        report.tensors_quantized += 1;
        plan.push(Planned {
            info: t,
            to: Some(ty),
            bytes: t.elements / ty.block_len() as u64 * ty.block_bytes() as u64,
        });
    }

    let mut file = File::open(src).map_err(io(src))?;
    let out = File::create(dst).map_err(io(dst))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    let kept_kvs: Vec<_> = info
        .kv_spans
        .iter()
        .filter(|(k, _)| k != "general.file_type")
        .collect();
    header.extend_from_slice(&(kept_kvs.len() as u64 + 1).to_le_bytes());
    // Every other key/value as the source has it, byte for byte (types included, which
    // llama.cpp checks), then the new file type.
    // (The key/values lie back to back after the 24-byte preamble: one read for all.)
    let kv_end = info.kv_spans.last().map_or(24, |(_, r)| r.end);
    let mut kv_bytes = vec![0u8; (kv_end - 24) as usize];
    file.seek(SeekFrom::Start(24)).map_err(io(src))?;
    file.read_exact(&mut kv_bytes).map_err(io(src))?;
    for (_, span) in &kept_kvs {
        header.extend_from_slice(&kv_bytes[(span.start - 24) as usize..(span.end - 24) as usize]);
    }
    put_string(&mut header, "general.file_type");
    header.extend_from_slice(&4u32.to_le_bytes()); // u32
    header.extend_from_slice(&ftype.to_le_bytes());
    let mut offset = 0u64;
    for p in &plan {
        put_string(&mut header, &p.info.name);
        header.extend_from_slice(&(p.info.dims.len() as u32).to_le_bytes());
        for d in &p.info.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        let id = p.to.map_or(p.info.ggml_type.id(), QType::ggml_id);
        header.extend_from_slice(&id.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + p.bytes).next_multiple_of(alignment);
    }
    let pad = (header.len() as u64).next_multiple_of(alignment) - header.len() as u64;
    header.resize(header.len() + pad as usize, 0);
    w.write_all(&header).map_err(io(dst))?;

    for p in &plan {
        let t = p.info;
        file.seek(SeekFrom::Start(info.data_offset + t.offset))
            .map_err(io(src))?;
        let written = match (p.to, QType::from_ggml_id(t.ggml_type.id())) {
            (Some(to), Some(from)) => {
                let row = t.dims.first().copied().unwrap_or(1) as usize;
                if row == 0 || !row.is_multiple_of(from.block_len()) {
                    return Err(EngineError::Unsupported(format!(
                        "tensor '{}': rows of {row} values are not whole {} blocks",
                        t.name,
                        from.name()
                    )));
                }
                let rows = t.elements as usize / row;
                let row_bytes = row / from.block_len() * from.block_bytes();
                // A chunk of rows at a time: read, decode, encode, write.
                let chunk = ROWS_PER_CHUNK.min(rows);
                let mut raw = vec![0u8; chunk * row_bytes];
                let mut x = vec![0f32; chunk * row];
                let (mut done, mut written) = (0, 0u64);
                while done < rows {
                    let n = chunk.min(rows - done);
                    file.read_exact(&mut raw[..n * row_bytes])
                        .map_err(io(src))?;
                    quant::dequantize(from, &raw[..n * row_bytes], &mut x[..n * row]);
                    let data = encode(to, &x[..n * row], row)
                        .map_err(|e| EngineError::Unsupported(format!("{}: {e}", t.name)))?;
                    w.write_all(&data).map_err(io(dst))?;
                    written += data.len() as u64;
                    done += n;
                }
                written
            }
            _ => std::io::copy(&mut (&mut file).take(t.bytes), &mut w).map_err(io(dst))?,
        };
        if written != p.bytes {
            return Err(EngineError::Unsupported(format!(
                "tensor '{}': {written} bytes written where {} were announced",
                t.name, p.bytes
            )));
        }
        let pad = written.next_multiple_of(alignment) - written;
        w.write_all(&vec![0u8; pad as usize]).map_err(io(dst))?;
    }
    w.flush().map_err(io(dst))?;
    w.get_ref().sync_all().map_err(io(dst))?;
    Ok(report)
}

/// `x` (rows of `row` values) encoded as `to`, rows in parallel.
fn encode(to: QType, x: &[f32], row: usize) -> Result<Vec<u8>, String> {
    let parts: Vec<Result<Vec<u8>, String>> = x
        .par_chunks(row * ROWS_PER_TASK)
        .map(|rows| {
            let mut out = Vec::with_capacity(rows.len() / to.block_len() * to.block_bytes());
            quant::quantize(to, rows, &mut out).map(|()| out)
        })
        .collect();
    let mut data = Vec::with_capacity(x.len() / to.block_len() * to.block_bytes());
    for p in parts {
        data.extend_from_slice(&p?);
    }
    Ok(data)
}

/// A GGUF string: u64 length, then the bytes.
fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{GenerateParams, LoadOptions, LoadedModel};
    use crate::testing::GgufBuilder;
    use std::sync::atomic::AtomicBool;

    /// The one helper: quantize the tiny model to `to`; return the report, the sizes and
    /// the greedy tokens of the result.
    fn check(to: &str) -> (QuantizeReport, u64, u64, Vec<u32>) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f32.gguf");
        let dst = dir.path().join("q.gguf");
        std::fs::write(&src, GgufBuilder::tiny_llama().build()).unwrap();
        let report = quantize(&src, &dst, to).unwrap();
        let info = crate::gguf::inspect(&dst).unwrap();
        assert_eq!(
            info.metadata
                .get("tokenizer.ggml.model")
                .and_then(|v| v.as_str()),
            Some("gpt2")
        );
        let mut m = LoadedModel::load(&dst, &LoadOptions::default()).unwrap();
        let prompt = m.encode_text("hello").unwrap();
        let p = GenerateParams {
            max_tokens: 4,
            ..Default::default()
        };
        let g = m
            .generate(&prompt, &p, &mut |_| {}, &AtomicBool::new(false))
            .unwrap();
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        (report, size(&src), size(&dst), g.tokens)
    }

    #[test]
    fn legacy_types_shrink_the_model_and_it_still_runs() {
        for to in ["q8_0", "q4_0", "q5_1"] {
            let (r, before, after, _) = check(to);
            assert!(after < before / 2, "{to}: {before} -> {after}");
            assert_eq!(
                r.tensors_quantized, 15,
                "{to}: embedding + 7 matrices x 2 layers"
            );
            assert_eq!(r.kept, 5, "{to}: the norms");
            assert!(!r.requantized && r.fallbacks.is_empty());
        }
    }

    #[test]
    fn k_quants_fall_back_where_rows_do_not_fit_their_blocks() {
        let (r, _, _, tokens) = check("q4_k");
        // Every matrix here has rows of 64 or 128, below the 256 of a K-quant block.
        assert_eq!(r.fallbacks.len(), 15);
        assert!(
            r.fallbacks.iter().all(|(_, t)| t == "q4_1"),
            "{:?}",
            r.fallbacks
        );
        assert!(!tokens.is_empty());
    }

    #[test]
    fn metadata_is_copied_byte_for_byte_and_candle_reads_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f32.gguf");
        let dst = dir.path().join("q.gguf");
        std::fs::write(&src, GgufBuilder::tiny_llama().build()).unwrap();
        quantize(&src, &dst, "q8_0").unwrap();
        let (a, b) = (
            crate::gguf::inspect(&src).unwrap(),
            crate::gguf::inspect(&dst).unwrap(),
        );
        let (a_bytes, b_bytes) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let raw = |bytes: &[u8], r: &std::ops::Range<u64>| {
            bytes[r.start as usize..r.end as usize].to_vec()
        };
        for (key, span) in a.kv_spans.iter().filter(|(k, _)| k != "general.file_type") {
            let theirs = b.kv_spans.iter().find(|(k, _)| k == key).unwrap();
            assert_eq!(raw(&a_bytes, span), raw(&b_bytes, &theirs.1), "{key}");
        }
        assert_eq!(b.metadata["general.file_type"], MetaValue::UInt(7));
        // Another reader of GGUF (candle's, a test dependency) decodes what we wrote to the
        // same values.
        let name = "blk.1.ffn_down.weight";
        let mut f = File::open(&dst).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let dev = candle_core::Device::Cpu;
        let t = ct.tensor(&mut f, name, &dev).unwrap();
        assert_eq!(t.dtype(), candle_core::quantized::GgmlDType::Q8_0);
        let theirs: Vec<f32> = t
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let info = b.tensor(name).unwrap();
        let start = (b.data_offset + info.offset) as usize;
        let mut ours = vec![0.0; info.elements as usize];
        quant::dequantize(
            QType::Q8_0,
            &b_bytes[start..start + info.bytes as usize],
            &mut ours,
        );
        assert_eq!(ours, theirs);
    }

    #[test]
    fn large_tensors_are_encoded_chunk_by_chunk_to_the_same_bytes() {
        // 2,500 rows: two whole chunks and a partial one.
        let (row, rows) = (64usize, 2500usize);
        let x: Vec<f32> = (0..row * rows)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut b = GgufBuilder::new("llama");
        b.tensor_f32("big.weight", &[row as u64, rows as u64], &x);
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("f32.gguf"), dir.path().join("q.gguf"));
        std::fs::write(&src, b.build()).unwrap();
        quantize(&src, &dst, "q4_0").unwrap();
        let info = crate::gguf::inspect(&dst).unwrap();
        let t = info.tensor("big.weight").unwrap();
        let bytes = std::fs::read(&dst).unwrap();
        let start = (info.data_offset + t.offset) as usize;
        let mut whole = Vec::new();
        quant::quantize(QType::Q4_0, &x, &mut whole).unwrap();
        assert_eq!(&bytes[start..start + t.bytes as usize], whole.as_slice());
    }

    #[test]
    fn unknown_targets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f32.gguf");
        std::fs::write(&src, GgufBuilder::tiny_llama().build()).unwrap();
        let e = quantize(&src, &dir.path().join("x"), "q3_xs")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("unsupported quantization 'q3_xs'"), "{e}");
    }
}
