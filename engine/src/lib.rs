//! `outpost-engine`: GGUF models on the CPU, and the registry that stores them.
//!
//! This crate is synchronous and offline by construction: it never does network I/O and
//! never imports tokio (a test in `outpost-tests` reads `cargo metadata` to hold that). The
//! agent drives it from its own threads.
//!
//! - [`gguf`]: reading and validating the GGUF container (untrusted input, capped).
//! - [`registry`]: the content-addressed blob store and `registry.db`.
//! - [`arch`]: the architectures (one decoder over the mapped weights).
//! - [`tokenizer`]: tokenizers built from the GGUF metadata; streaming detokenization.
//! - [`chat`]: chat templates from the file, with untrusted contents kept out of specials.
//! - [`generate`]: loading, sampling, generation, timings.
//! - [`quant`]: ggml's block types, decoded and encoded.
//! - [`quantize`]: writing a model in another quantization.
//! - [`lease`]: a model loaded from the registry with its blob locked while it lives.
//! - [`testing`]: GGUF files built in code, for tests in this and other crates.

pub mod arch;
pub mod chat;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod lease;
pub mod quant;
pub mod quantize;
pub mod registry;
pub mod testing;
pub mod tokenizer;

use std::path::PathBuf;

pub use arch::HyperparameterError;
pub use chat::TemplateError;
pub use generate::{
    Event, GenerateParams, Generation, LoadOptions, LoadedModel, Prompt, SamplingParams,
    prompt_digest,
};
pub use lease::ModelLease;
pub use registry::{ModelRecord, ModelRef, Registry, RegistryError};
pub use tokenizer::TokenizerError;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{} is not a valid GGUF model: {source}", path.display())]
    Gguf {
        path: PathBuf,
        source: gguf::GgufError,
    },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unsupported architecture '{0}' (supported: llama, gemma3, qwen2, qwen3, phi3)")]
    UnsupportedArchitecture(String),
    #[error("unsupported {0}")]
    Unsupported(String),
    #[error(
        "the model needs an estimated {} MiB, above the memory budget of {} MiB",
        needed / (1 << 20),
        budget / (1 << 20)
    )]
    OverBudget { needed: u64, budget: u64 },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
    /// The file's hyperparameters or tensor shapes contradict each other.
    #[error("{architecture} model: {source}")]
    Hyperparameters {
        architecture: String,
        source: HyperparameterError,
    },
    /// The weights do not fit what the architecture needs, or a computation was refused.
    #[error("model: {0}")]
    Model(String),
    /// The blob could not be opened or locked.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the prompt is {prompt} tokens, but the context window is {context}")]
    ContextOverflow { prompt: usize, context: usize },
    #[error(
        "the prompt is {bytes} bytes, which is at least {at_least} tokens, but the context window is {context}"
    )]
    PromptTooLarge {
        bytes: usize,
        at_least: usize,
        context: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfVocabulary { id: u32, vocab: usize },
}
