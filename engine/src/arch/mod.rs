//! Architectures: the only module that knows `candle-transformers`.
//!
//! `llama` and `gemma3` are our own implementations (see `llama.rs` and `gemma3.rs` for
//! why); the others are candle's.
//!
//! A GGUF file's `general.architecture` picks the implementation: `llama` (SmolLM2, Llama 2/3,
//! TinyLlama), `gemma3`, `qwen2`, `qwen3`, `phi3`. Everything else is refused by name before
//! any weight is read. Our llama and Gemma 3 use the matrices our kernels take in place in the
//! memory-mapped file; candle's architectures read their weights into memory (its GGUF loader
//! copies; see ARCHITECTURE.md).

use std::collections::HashMap;
use std::fs::File;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_phi3, quantized_qwen2, quantized_qwen3};

mod check;
mod common;
mod gemma3;
mod llama;
mod ops;

pub use check::{HyperparameterError, check as check_hyperparameters};

use crate::EngineError;

/// Architectures this engine runs.
pub const SUPPORTED: [&str; 5] = ["llama", "gemma3", "qwen2", "qwen3", "phi3"];

/// Tensor types candle's CPU kernels handle.
pub const SUPPORTED_TYPES: [&str; 16] = [
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_k", "q3_k", "q4_k",
    "q5_k", "q6_k", "q8_k", "i32",
];

/// The weights of one loaded model.
pub enum Weights {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
    Qwen2(quantized_qwen2::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
}

/// candle's error, kept as the source.
pub(crate) fn model_err(source: candle_core::Error) -> EngineError {
    EngineError::Model { source }
}

/// The first line of candle's message, without the backtrace it appends when
/// `RUST_BACKTRACE` is set.
pub(crate) fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The GGUF header as candle reads it (metadata with arrays, tensor infos).
pub fn read_content(file: &mut File) -> Result<Content, EngineError> {
    Content::read(file).map_err(model_err)
}

pub type Metadata = HashMap<String, Value>;

impl Weights {
    /// `max_positions`: the context window (sizes rotary tables where we build them).
    pub fn load(
        arch: &str,
        content: Content,
        file: &mut File,
        max_positions: usize,
    ) -> Result<Self, EngineError> {
        let dev = Device::Cpu;
        Ok(match arch {
            "llama" => {
                Self::Llama(llama::Llama::load(&content, file, max_positions).map_err(model_err)?)
            }
            "gemma3" => Self::Gemma3(
                gemma3::Gemma3::load(&content, file, max_positions).map_err(model_err)?,
            ),
            "qwen2" => Self::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(content, file, &dev).map_err(model_err)?,
            ),
            "qwen3" => Self::Qwen3(
                quantized_qwen3::ModelWeights::from_gguf(content, file, &dev).map_err(model_err)?,
            ),
            "phi3" => Self::Phi3(
                quantized_phi3::ModelWeights::from_gguf(false, content, file, &dev)
                    .map_err(model_err)?,
            ),
            other => return Err(EngineError::UnsupportedArchitecture(other.to_string())),
        })
    }

    /// Drops the KV cache (the next forward must start at position 0). candle's phi3 has no
    /// way to do so; its cache goes at the next sequence's start.
    pub fn clear_cache(&mut self) {
        match self {
            Self::Llama(m) => m.clear_cache(),
            Self::Gemma3(m) => m.clear_cache(),
            Self::Qwen2(m) => m.clear_kv_cache(),
            Self::Qwen3(m) => m.clear_kv_cache(),
            Self::Phi3(_) => {}
        }
    }

    /// Runs `tokens` at positions `pos..` and returns the logits after the last one.
    /// `pos == 0` starts a new sequence (the KV cache is replaced).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, EngineError> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err)?;
        let logits = match self {
            Self::Llama(m) => return m.forward(tokens, pos).map_err(model_err),
            Self::Gemma3(m) => return m.forward(tokens, pos).map_err(model_err),
            Self::Qwen2(m) => m.forward(&input, pos),
            Self::Qwen3(m) => {
                if pos == 0 {
                    m.clear_kv_cache();
                }
                m.forward(&input, pos)
            }
            Self::Phi3(m) => m.forward(&input, pos),
        }
        .map_err(model_err)?;
        // Some implementations return (batch, vocab), others (batch, seq, vocab).
        let logits = logits.squeeze(0).map_err(model_err)?;
        let logits = if logits.rank() == 2 {
            let n = logits.dim(0).map_err(model_err)?;
            logits.get(n - 1).map_err(model_err)?
        } else {
            logits
        };
        logits
            .to_dtype(candle_core::DType::F32)
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(model_err)
    }
}
