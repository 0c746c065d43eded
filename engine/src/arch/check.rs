//! Hyperparameters checked against each other and against the tensors' shapes, before any
//! weight is read: a file whose numbers disagree gets a [`HyperparameterError`] naming what
//! disagrees, instead of a division by zero or an index out of range deep in a loader.
//!
//! GGUF lists a matrix's dimensions innermost first: `[inputs, outputs]`.

use crate::gguf::{GgufInfo, MetaValue};

/// Most layers accepted (the largest open models have fewer than 200).
const MAX_LAYERS: u64 = 1024;

/// What is inconsistent in a model's hyperparameters or tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HyperparameterError {
    #[error("{key} is missing or not a number")]
    Missing { key: String },
    #[error("{key} is {value}, but must be between {min} and {max}")]
    OutOfRange {
        key: String,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{heads} attention heads cannot share {kv_heads} KV heads")]
    KvHeads { heads: u64, kv_heads: u64 },
    #[error("{heads} attention heads do not divide the embedding length {embedding}")]
    HeadsDoNotDivide { heads: u64, embedding: u64 },
    #[error("the attention head size {head_dim} is odd: rotary embeddings rotate pairs")]
    OddHeadSize { head_dim: u64 },
    #[error("tensor '{0}' is missing")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, but the hyperparameters make it {expected:?}")]
    Shape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("the vocabulary has {tokens} tokens but the embedding only {rows} rows")]
    Vocabulary { tokens: u64, rows: u64 },
}

type Result<T> = std::result::Result<T, HyperparameterError>;

struct Md<'a> {
    info: &'a GgufInfo,
    arch: &'a str,
}

impl Md<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn opt(&self, k: &str) -> Option<u64> {
        self.info
            .metadata
            .get(&self.key(k))
            .and_then(MetaValue::as_u64)
    }

    fn get(&self, k: &str) -> Result<u64> {
        self.opt(k)
            .ok_or_else(|| HyperparameterError::Missing { key: self.key(k) })
    }

    fn range(&self, k: &str, value: u64, min: u64, max: u64) -> Result<u64> {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(HyperparameterError::OutOfRange {
                key: self.key(k),
                value,
                min,
                max,
            })
        }
    }
}

/// Checks the hyperparameters of a model of architecture `arch` (one of
/// [`SUPPORTED`](super::SUPPORTED)) and the shape of every tensor its loader reads.
pub fn check(arch: &str, info: &GgufInfo) -> Result<()> {
    let md = Md { info, arch };
    let layers = md.range("block_count", md.get("block_count")?, 1, MAX_LAYERS)?;
    let embd = md.range("embedding_length", md.get("embedding_length")?, 1, 1 << 20)?;
    let heads = md.range(
        "attention.head_count",
        md.get("attention.head_count")?,
        1,
        1 << 12,
    )?;
    let kv_heads = md.opt("attention.head_count_kv").unwrap_or(heads);
    if kv_heads == 0 || kv_heads > heads || !heads.is_multiple_of(kv_heads) {
        return Err(HyperparameterError::KvHeads { heads, kv_heads });
    }
    // Gemma 3 and Qwen 3 declare the head size; the others derive it from the embedding.
    let head_dim = match arch {
        "gemma3" | "qwen3" => md.range(
            "attention.key_length",
            md.get("attention.key_length")?,
            2,
            1 << 12,
        )?,
        _ => {
            if !embd.is_multiple_of(heads) {
                return Err(HyperparameterError::HeadsDoNotDivide {
                    heads,
                    embedding: embd,
                });
            }
            embd / heads
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(HyperparameterError::OddHeadSize { head_dim });
    }
    if arch == "gemma3" {
        let w = md.get("attention.sliding_window")?;
        md.range("attention.sliding_window", w, 1, u64::from(u32::MAX))?;
    }
    let shape = |name: &str| -> Result<&[u64]> {
        info.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.dims.as_slice())
            .ok_or_else(|| HyperparameterError::MissingTensor(name.into()))
    };
    let expect = |name: &str, expected: &[u64]| -> Result<()> {
        let found = shape(name)?;
        if found == expected {
            Ok(())
        } else {
            Err(HyperparameterError::Shape {
                name: name.into(),
                found: found.to_vec(),
                expected: expected.to_vec(),
            })
        }
    };
    let embedding = shape("token_embd.weight")?;
    let vocab = match embedding {
        [e, v] if *e == embd && *v > 0 => *v,
        _ => {
            return Err(HyperparameterError::Shape {
                name: "token_embd.weight".into(),
                found: embedding.to_vec(),
                expected: vec![embd, embedding.get(1).copied().unwrap_or(0).max(1)],
            });
        }
    };
    if let Some(len) = info
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::array_len)
        && len > vocab
    {
        return Err(HyperparameterError::Vocabulary {
            tokens: len,
            rows: vocab,
        });
    }
    expect("output_norm.weight", &[embd])?;
    if arch == "phi3" || info.tensors.iter().any(|t| t.name == "output.weight") {
        expect("output.weight", &[embd, vocab])?;
    }
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    for i in 0..layers {
        let t = |n: &str| format!("blk.{i}.{n}.weight");
        expect(&t("attn_norm"), &[embd])?;
        expect(&t("ffn_norm"), &[embd])?;
        expect(&t("attn_output"), &[q, embd])?;
        // The feed-forward width as the down projection declares it.
        let ff = match shape(&t("ffn_down"))? {
            [f, e] if *e == embd && *f > 0 => *f,
            found => {
                return Err(HyperparameterError::Shape {
                    name: t("ffn_down"),
                    found: found.to_vec(),
                    expected: vec![found.first().copied().unwrap_or(0).max(1), embd],
                });
            }
        };
        if arch == "phi3" {
            expect(&t("attn_qkv"), &[embd, q + 2 * kv])?;
            expect(&t("ffn_up"), &[embd, 2 * ff])?;
            continue;
        }
        expect(&t("attn_q"), &[embd, q])?;
        expect(&t("attn_k"), &[embd, kv])?;
        expect(&t("attn_v"), &[embd, kv])?;
        expect(&t("ffn_gate"), &[embd, ff])?;
        expect(&t("ffn_up"), &[embd, ff])?;
        if arch == "qwen2" {
            let b = |n: &str| format!("blk.{i}.{n}.bias");
            expect(&b("attn_q"), &[q])?;
            expect(&b("attn_k"), &[kv])?;
            expect(&b("attn_v"), &[kv])?;
        }
        if matches!(arch, "qwen3" | "gemma3") {
            expect(&t("attn_q_norm"), &[head_dim])?;
            expect(&t("attn_k_norm"), &[head_dim])?;
        }
        if arch == "gemma3" {
            expect(&t("post_attention_norm"), &[embd])?;
            expect(&t("post_ffw_norm"), &[embd])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::testing::GgufBuilder;
    use crate::{EngineError, HyperparameterError, LoadOptions, LoadedModel};

    /// Loads a tiny `arch` model after `edit`; the error, if any.
    fn load(arch: &str, edit: impl FnOnce(&mut GgufBuilder)) -> Result<LoadedModel, EngineError> {
        let dir = tempfile::tempdir().unwrap();
        let mut b = GgufBuilder::tiny(arch);
        edit(&mut b);
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b.build()).unwrap();
        LoadedModel::load(&path, &LoadOptions::default())
    }

    /// The hyperparameter error loading gives, checked to name the architecture.
    fn refused(arch: &str, edit: impl FnOnce(&mut GgufBuilder)) -> HyperparameterError {
        match load(arch, edit) {
            Err(EngineError::Hyperparameters {
                architecture,
                source,
            }) => {
                assert_eq!(architecture, arch);
                source
            }
            Err(other) => panic!("{arch}: not a hyperparameter error: {other}"),
            Ok(_) => panic!("{arch}: loaded"),
        }
    }

    #[test]
    fn every_architecture_loads_and_runs_its_tiny_model() {
        for arch in crate::arch::SUPPORTED {
            let mut m = load(arch, |_| {}).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let prompt = m.encode_text("hello").unwrap();
            let g = m
                .generate(
                    &prompt,
                    &crate::GenerateParams {
                        max_tokens: 3,
                        ..Default::default()
                    },
                    &mut |_| {},
                    &std::sync::atomic::AtomicBool::new(false),
                )
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert!(!g.tokens.is_empty(), "{arch}");
        }
    }

    #[test]
    fn inconsistent_hyperparameters_are_refused_by_name_for_every_architecture() {
        use HyperparameterError as H;
        for arch in crate::arch::SUPPORTED {
            let key = |k: &str| format!("{arch}.{k}");
            // Zero layers.
            let e = refused(arch, |b| {
                b.kv_u32(&key("block_count"), 0);
            });
            assert!(
                matches!(&e, H::OutOfRange { key: k, value: 0, .. } if *k == key("block_count")),
                "{arch}: {e}"
            );
            // More KV heads than heads.
            let e = refused(arch, |b| {
                b.kv_u32(&key("attention.head_count_kv"), 8);
            });
            assert_eq!(
                e,
                H::KvHeads {
                    heads: 4,
                    kv_heads: 8
                },
                "{arch}"
            );
            // Zero heads.
            let e = refused(arch, |b| {
                b.kv_u32(&key("attention.head_count"), 0);
            });
            assert!(matches!(e, H::OutOfRange { value: 0, .. }), "{arch}: {e}");
            // A head count that does not divide the embedding (64): architectures that
            // derive the head size say so; those that declare it find the projections wrong.
            let e = refused(arch, |b| {
                b.kv_u32(&key("attention.head_count"), 3);
                b.kv_u32(&key("attention.head_count_kv"), 3);
            });
            match arch {
                "gemma3" | "qwen3" => assert!(
                    matches!(&e, H::Shape { name, .. } if name == "blk.0.attn_output.weight"),
                    "{arch}: {e}"
                ),
                _ => assert_eq!(
                    e,
                    H::HeadsDoNotDivide {
                        heads: 3,
                        embedding: 64
                    },
                    "{arch}"
                ),
            }
            // An odd head size (rotary embeddings rotate pairs of values).
            let (e, head_dim) = match arch {
                "gemma3" | "qwen3" => (
                    refused(arch, |b| {
                        b.kv_u32(&key("attention.key_length"), 3);
                    }),
                    3,
                ),
                _ => (
                    refused(arch, |b| {
                        b.kv_u32(&key("attention.head_count"), 64);
                        b.kv_u32(&key("attention.head_count_kv"), 64);
                    }),
                    1,
                ),
            };
            assert_eq!(e, H::OddHeadSize { head_dim }, "{arch}");
            // A tensor whose shape disagrees with the declared dimensions.
            let (name, dims): (&str, &[u64]) = if arch == "phi3" {
                ("blk.1.attn_qkv.weight", &[64, 96])
            } else {
                ("blk.1.attn_k.weight", &[64, 48])
            };
            let e = refused(arch, |b| {
                b.reshape(name, dims);
            });
            assert!(
                matches!(&e, H::Shape { name: n, found, .. } if n == name && found == dims),
                "{arch}: {e}"
            );
            // A missing layer tensor.
            let e = refused(arch, |b| {
                b.kv_u32(&key("block_count"), 3);
            });
            assert!(
                matches!(&e, H::MissingTensor(n) if n.starts_with("blk.2.")),
                "{arch}: {e}"
            );
            // An embedding narrower than the model.
            let e = refused(arch, |b| {
                b.kv_u32(&key("embedding_length"), 128);
                b.kv_u32(&key("attention.key_length"), 32);
            });
            assert!(
                matches!(&e, H::Shape { name, .. } if name == "token_embd.weight"),
                "{arch}: {e}"
            );
        }
    }

    #[test]
    fn the_error_says_what_disagrees() {
        let e = load("llama", |b| {
            b.kv_u32("llama.attention.head_count", 5);
            b.kv_u32("llama.attention.head_count_kv", 5);
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "llama model: 5 attention heads do not divide the embedding length 64"
        );
    }
}
