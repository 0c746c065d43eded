//! Our decoder against candle-transformers' quantized models (a dev-dependency: the shipped
//! binary has no candle), on the tiny models `testing` builds for each architecture, with
//! norms varied so that each one counts: the logits of a prompt and of each decoded token
//! after it must agree. Gemma 3 is compared with llama.cpp instead (the golden tests): candle
//! 0.11.1's gates its MLP with SiLU where Gemma uses GELU.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{
    quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};

use super::Weights;
use crate::testing::GgufBuilder;

enum Theirs {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
}

impl Theirs {
    fn load(arch: &str, path: &Path) -> Self {
        let mut f = std::fs::File::open(path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let dev = Device::Cpu;
        match arch {
            "llama" => {
                Self::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap())
            }
            "qwen2" => {
                Self::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap())
            }
            "qwen3" => {
                Self::Qwen3(quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap())
            }
            "phi3" => Self::Phi3(
                quantized_phi3::ModelWeights::from_gguf(false, ct, &mut f, &dev).unwrap(),
            ),
            other => panic!("no candle model for {other}"),
        }
    }

    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Self::Llama(m) => m.forward(&x, pos),
            Self::Qwen2(m) => m.forward(&x, pos),
            Self::Qwen3(m) => m.forward(&x, pos),
            Self::Phi3(m) => m.forward(&x, pos),
        }
        .unwrap();
        let logits = logits.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let v = logits.to_vec1::<f32>().unwrap();
        // Some return every position's logits: keep the last.
        let vocab = 260;
        v[v.len() - vocab..].to_vec()
    }
}

/// Largest difference between the logits, against the largest logit.
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let gap = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    gap / scale.max(1e-6)
}

/// Prompt then 4 greedy steps through both; returns the largest relative gap seen.
fn compare(arch: &str) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, GgufBuilder::tiny(arch).vary_norms().build()).unwrap();
    let info = crate::gguf::read_model(&std::fs::File::open(&path).unwrap()).unwrap();
    let mut ours =
        Weights::load(arch, &info, &mut std::fs::File::open(&path).unwrap(), 64).unwrap();
    let mut theirs = Theirs::load(arch, &path);
    let prompt = [256u32, 104, 101, 108, 108, 111, 44, 32, 119];
    let (mut a, mut b) = (
        ours.forward(&prompt, 0).unwrap(),
        theirs.forward(&prompt, 0),
    );
    let mut worst = relative_gap(&a, &b);
    for pos in prompt.len()..prompt.len() + 4 {
        let next = crate::generate::argmax(&b);
        assert_eq!(
            crate::generate::argmax(&a),
            next,
            "{arch}: the greedy tokens part at {pos}"
        );
        a = ours.forward(&[next], pos).unwrap();
        b = theirs.forward(&[next], pos);
        worst = worst.max(relative_gap(&a, &b));
    }
    worst
}

#[test]
fn llama_computes_what_candle_computes() {
    let gap = compare("llama");
    assert!(gap < 1e-5, "llama: logits differ by {gap} of the largest");
}

#[test]
fn qwen2_computes_what_candle_computes() {
    let gap = compare("qwen2");
    assert!(gap < 1e-5, "qwen2: logits differ by {gap} of the largest");
}

#[test]
fn qwen3_computes_what_candle_computes() {
    // candle's Qwen 3 builds its rotary table in f16 unless `general.dtype` says f32; ours
    // is f32 (as llama.cpp's), hence the wider margin.
    let gap = compare("qwen3");
    assert!(gap < 1e-3, "qwen3: logits differ by {gap} of the largest");
}

#[test]
fn phi3_computes_what_candle_computes() {
    let gap = compare("phi3");
    assert!(gap < 1e-5, "phi3: logits differ by {gap} of the largest");
}

#[test]
fn a_model_read_into_memory_computes_what_the_mapped_one_does() {
    // Where a file cannot be mapped it is read whole, through the handle its header was
    // read from (whose position is then past the header).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, GgufBuilder::tiny("qwen2").vary_norms().build()).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let info = crate::gguf::read_model(&file).unwrap();
    let prompt = [256u32, 104, 101, 108];
    let mut mapped = Weights::load("qwen2", &info, &mut file, 64).unwrap();
    let read = super::common::read_whole(&mut file).unwrap();
    let src = super::common::Source::with_bytes(&info, read).unwrap();
    let mut in_memory = super::decoder::Decoder::load("qwen2", &src, &info, 64).unwrap();
    assert_eq!(
        mapped.forward(&prompt, 0).unwrap(),
        in_memory.forward(&prompt, 0).unwrap()
    );
}

/// A tiny llama built by `edit`, loaded.
fn load_llama(edit: impl Fn(&mut GgufBuilder)) -> Result<Weights, super::ModelError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut b = GgufBuilder::tiny("llama");
    edit(&mut b);
    std::fs::write(&path, b.build()).unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let info = crate::gguf::read_model(&file).unwrap();
    Weights::load("llama", &info, &mut file, 64)
}

/// The logits of a tiny llama built by `edit`, after a prompt of 12 tokens.
fn llama_logits(edit: impl Fn(&mut GgufBuilder)) -> Vec<f32> {
    load_llama(edit)
        .unwrap()
        .forward(
            &[256, 104, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108],
            0,
        )
        .unwrap()
}

#[test]
fn rope_freqs_and_linear_scaling_slow_the_rotations() {
    // The tiny llama's heads are 16 wide: 8 rotation frequencies.
    let plain = llama_logits(|_| {});
    let ones = llama_logits(|b| {
        b.tensor_f32("rope_freqs.weight", &[8], &[1.0; 8]);
    });
    assert_eq!(plain, ones, "factors of 1 change nothing");
    // Every frequency divided by 4, once per frequency and once as linear scaling: the
    // same rotations, so the same logits, and not the plain ones.
    let by_freqs = llama_logits(|b| {
        b.tensor_f32("rope_freqs.weight", &[8], &[4.0; 8]);
    });
    let by_linear = llama_logits(|b| {
        b.kv_str("llama.rope.scaling.type", "linear");
        b.kv_f32("llama.rope.scaling.factor", 4.0);
    });
    assert_eq!(by_freqs, by_linear);
    assert!(relative_gap(&by_freqs, &plain) > 1e-3);
}

#[test]
fn rope_freqs_of_the_wrong_size_or_not_positive_are_refused() {
    for (values, expect) in [
        (vec![1.0; 7], "has 7 values, 8 expected"),
        (
            vec![1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            "not a positive number",
        ),
    ] {
        let e = load_llama(|b| {
            b.tensor_f32("rope_freqs.weight", &[values.len() as u64], &values);
        })
        .err()
        .unwrap();
        assert!(e.0.contains(expect), "{e}");
    }
}
