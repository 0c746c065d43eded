//! Quantization: a new GGUF with every matrix in the target type, the tokenizer and all other
//! metadata kept, `general.file_type` updated.
//!
//! Rows must be a whole number of blocks. Where a matrix's rows are not (K-quants need 256;
//! SmolLM2's 576 is not), that matrix falls back to the legacy type of similar size, as
//! llama.cpp does: q4_k → q4_1, q5_k → q5_1, q6_k → q8_0.
//! Vectors (norms, biases) stay as they are. Requantizing an already quantized file works
//! (weights are dequantized first) but compounds the error; callers warn.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use serde::Serialize;

use crate::EngineError;

/// The types `quantize` writes, by the names the CLI takes.
pub const TARGETS: [&str; 8] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k",
];

fn target(name: &str) -> Option<(GgmlDType, u32)> {
    // (type, llama.cpp's general.file_type for a file mostly of that type)
    Some(match name {
        "q4_0" => (GgmlDType::Q4_0, 2),
        "q4_1" => (GgmlDType::Q4_1, 3),
        "q5_0" => (GgmlDType::Q5_0, 8),
        "q5_1" => (GgmlDType::Q5_1, 9),
        "q8_0" => (GgmlDType::Q8_0, 7),
        "q4_k" => (GgmlDType::Q4K, 14),
        "q5_k" => (GgmlDType::Q5K, 16),
        "q6_k" => (GgmlDType::Q6K, 18),
        _ => return None,
    })
}

/// The type used for rows that are not a whole number of the target's blocks.
fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4K => GgmlDType::Q4_1,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
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

/// Writes `src` quantized to `to` into `dst`.
pub fn quantize(src: &Path, dst: &Path, to: &str) -> Result<QuantizeReport, EngineError> {
    let (dtype, ftype) = target(to).ok_or_else(|| {
        EngineError::Unsupported(format!(
            "quantization '{to}' (use one of {})",
            TARGETS.join(", ")
        ))
    })?;
    // Our own validation (caps, bounds) before candle reads anything.
    crate::gguf::inspect(src).map_err(|source| EngineError::Gguf {
        path: src.to_path_buf(),
        source,
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    let mut file = File::open(src).map_err(io(src))?;
    let content = gguf_file::Content::read(&mut file).map_err(crate::arch::model_err)?;
    let dev = Device::Cpu;
    let model_err = crate::arch::model_err;
    let mut report = QuantizeReport {
        to: to.to_string(),
        tensors_quantized: 0,
        fallbacks: Vec::new(),
        kept: 0,
        requantized: false,
    };
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let qt = content.tensor(&mut file, name, &dev).map_err(model_err)?;
        let dims = qt.shape().dims().to_vec();
        if dims.len() < 2 {
            report.kept += 1;
            tensors.push((name.clone(), qt));
            continue;
        }
        if !matches!(
            qt.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            report.requantized = true;
        }
        let row = dims.last().copied().unwrap_or(0);
        let mut ty = dtype;
        if row % ty.block_size() != 0 {
            ty = fallback(ty);
            if row % ty.block_size() != 0 {
                report.kept += 1;
                tensors.push((name.clone(), qt));
                continue;
            }
            report
                .fallbacks
                .push((name.clone(), format!("{ty:?}").to_lowercase()));
        }
        let f = qt.dequantize(&dev).map_err(model_err)?;
        let q = QTensor::quantize(&f, ty).map_err(model_err)?;
        report.tensors_quantized += 1;
        tensors.push((name.clone(), q));
    }
    let file_type = Value::U32(ftype);
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    metadata.push(("general.file_type", &file_type));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let out = File::create(dst).map_err(io(dst))?;
    let mut w = BufWriter::new(out);
    gguf_file::write(&mut w, &metadata, &refs).map_err(model_err)?;
    w.flush().map_err(io(dst))?;
    w.get_ref().sync_all().map_err(io(dst))?;
    Ok(report)
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
