//! Architectures: one decoder ([`decoder`]) for every architecture we run, over the matrices
//! of the memory-mapped GGUF file ([`common`]).
//!
//! A GGUF file's `general.architecture` picks the variant: `llama` (SmolLM2, Llama 2/3,
//! TinyLlama), `gemma3`, `qwen2`, `qwen3`, `phi3`. Everything else is refused by name before
//! any weight is read.

use std::fs::File;

mod check;
mod common;
mod decoder;
mod ops;
#[cfg(test)]
mod tests;

pub use check::{HyperparameterError, check as check_hyperparameters};

use crate::EngineError;
use crate::gguf::GgufInfo;

/// Architectures this engine runs.
pub const SUPPORTED: [&str; 5] = ["llama", "gemma3", "qwen2", "qwen3", "phi3"];

/// Tensor types a model may hold. The engine reads all but `i32` (`quant`): its kernels
/// multiply q4_0, q4_1, q5_0, q8_0, q4_k and q6_k, the others go through rows decoded to
/// f32. An `i32` tensor (some converters add one) loads as long as no weight needs it.
pub const SUPPORTED_TYPES: [&str; 16] = [
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_k", "q3_k", "q4_k",
    "q5_k", "q6_k", "q8_k", "i32",
];

/// Why the weights could not be loaded or run (a shape, a missing tensor, a position past
/// the context).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

pub(crate) type Result<T> = std::result::Result<T, ModelError>;

/// Returns a [`ModelError`] from a format string.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::arch::ModelError(format!($($arg)*)))
    };
}
pub(crate) use bail;

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        EngineError::Model(e.0)
    }
}

/// The weights of one loaded model.
pub struct Weights(decoder::Decoder);

impl Weights {
    /// `info` is the file's header as `gguf::read_model` read it; `max_positions` the
    /// context window (sizes the KV cache).
    pub fn load(
        arch: &str,
        info: &GgufInfo,
        file: &mut File,
        max_positions: usize,
    ) -> Result<Self> {
        if !SUPPORTED.contains(&arch) {
            bail!("unsupported architecture '{arch}'");
        }
        let src = common::Source::new(info, file)?;
        decoder::Decoder::load(arch, &src, info, max_positions).map(Self)
    }

    /// Drops the KV cache (the next forward must start at position 0).
    pub fn clear_cache(&mut self) {
        self.0.clear_cache();
    }

    /// Runs `tokens` at positions `pos..` and returns the logits after the last one.
    /// `pos == 0` starts a new sequence (the KV cache is replaced).
    pub fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
    ) -> std::result::Result<Vec<f32>, EngineError> {
        Ok(self.0.forward(tokens, pos)?)
    }
}
