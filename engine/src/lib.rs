//! `outpost-engine`: GGUF models on the CPU, and the registry that stores them.
//!
//! This crate is synchronous and offline by construction: it never does network I/O and
//! never imports tokio (a test in `outpost-tests` reads `cargo metadata` to hold that). The
//! agent drives it from its own threads.
//!
//! - [`gguf`]: reading and validating the GGUF container (untrusted input, capped).
//! - [`registry`]: the content-addressed blob store and `registry.db`.
//! - [`testing`]: GGUF files built in code, for tests in this and other crates.

pub mod gguf;
pub mod registry;
pub mod testing;

pub use registry::{ModelRecord, ModelRef, Registry, RegistryError};
