//! The health check a model passes before it is activated: a few greedy tokens from a
//! short prompt within a time limit, with every logit finite. It catches what loading
//! cannot: weights full of NaN or infinities, a model too slow for this device, a
//! tokenizer that cannot encode plain text.

use std::time::{Duration, Instant};

use super::{LoadedModel, argmax};
use crate::EngineError;

/// What a health check runs.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Greedy tokens to generate after the prompt.
    pub tokens: usize,
    /// The whole check (prefill and decode) must end within this.
    pub time_limit: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            tokens: 4,
            time_limit: Duration::from_secs(30),
        }
    }
}

/// A check that passed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthReport {
    pub prompt_tokens: usize,
    pub tokens: usize,
    pub elapsed_ms: u64,
}

/// Why a model failed its health check.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("health check: {0}")]
    Engine(#[from] EngineError),
    #[error("health check: the tokenizer made no tokens of the test prompt")]
    EmptyPrompt,
    #[error(
        "health check: logit {index} is {value} at step {step} (the weights hold NaN or infinities)"
    )]
    NonFinite {
        step: usize,
        index: usize,
        value: f32,
    },
    #[error("health check: {tokens} tokens took over {} ms (limit {} ms)", elapsed.as_millis(), limit.as_millis())]
    TooSlow {
        tokens: usize,
        elapsed: Duration,
        limit: Duration,
    },
}

/// The prompt every check starts from: plain text any tokenizer encodes.
const PROMPT: &str = "The capital of France is";

impl LoadedModel {
    /// Runs the check; the model's cache is cleared afterwards either way.
    pub fn health_check(&mut self, check: &HealthCheck) -> Result<HealthReport, HealthError> {
        let result = self.run_health_check(check);
        self.clear_cache();
        result
    }

    fn run_health_check(&mut self, check: &HealthCheck) -> Result<HealthReport, HealthError> {
        let started = Instant::now();
        let prompt = self.encode_text(PROMPT)?;
        if prompt.is_empty() {
            return Err(HealthError::EmptyPrompt);
        }
        let steps = check
            .tokens
            .max(1)
            .min(self.context_length.saturating_sub(prompt.len()).max(1));
        let mut logits = self.weights.forward(&prompt, 0)?;
        for step in 0..steps {
            if let Some((index, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(HealthError::NonFinite { step, index, value });
            }
            let elapsed = started.elapsed();
            if elapsed > check.time_limit {
                return Err(HealthError::TooSlow {
                    tokens: step,
                    elapsed,
                    limit: check.time_limit,
                });
            }
            if step + 1 < steps {
                let next = argmax(&logits);
                logits = self.weights.forward(&[next], prompt.len() + step)?;
            }
        }
        let elapsed = started.elapsed();
        if elapsed > check.time_limit {
            return Err(HealthError::TooSlow {
                tokens: steps,
                elapsed,
                limit: check.time_limit,
            });
        }
        Ok(HealthReport {
            prompt_tokens: prompt.len(),
            tokens: steps,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoadOptions;
    use crate::testing::GgufBuilder;

    fn load(bytes: &[u8]) -> LoadedModel {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        LoadedModel::load(&path, &LoadOptions::default()).unwrap()
    }

    #[test]
    fn a_sound_model_passes() {
        let mut m = load(&GgufBuilder::tiny_llama().build());
        let r = m.health_check(&HealthCheck::default()).unwrap();
        assert_eq!(r.tokens, 4);
        assert!(r.prompt_tokens > 0);
    }

    #[test]
    fn nan_weights_fail_and_say_so() {
        let mut m = load(&GgufBuilder::tiny_llama().poison_with_nan().build());
        let e = m.health_check(&HealthCheck::default()).unwrap_err();
        assert!(matches!(e, HealthError::NonFinite { step: 0, .. }), "{e}");
        assert!(e.to_string().contains("NaN"), "{e}");
    }

    #[test]
    fn a_time_limit_of_zero_fails_as_too_slow() {
        let mut m = load(&GgufBuilder::tiny_llama().build());
        let check = HealthCheck {
            tokens: 2,
            time_limit: Duration::ZERO,
        };
        assert!(matches!(
            m.health_check(&check),
            Err(HealthError::TooSlow { .. })
        ));
    }
}
