//! The OpenAI wire format: the request bodies as the endpoints accept them (unknown fields
//! ignored, every limit checked), their translation into the engine's parameters, and the
//! response and chunk shapes. Nothing here runs a model or touches the audit log.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use outpost_engine::generate::FinishReason;
use outpost_engine::{GenerateParams, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::State;
use super::super::engine::{ModelWorker, TokenInfo};
use super::super::http::ApiError;

/// Parameters both endpoints take. Unknown fields are ignored, as OpenAI's clients send
/// some this server has no use for.
#[derive(Debug, Deserialize)]
pub(super) struct Common {
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) max_tokens: Option<i64>,
    pub(super) max_completion_tokens: Option<i64>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<i64>,
    pub(super) stop: Option<Stop>,
    pub(super) n: Option<i64>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) presence_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) messages: Vec<ChatMessage>,
    pub(super) logprobs: Option<bool>,
    pub(super) top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatMessage {
    pub(super) role: String,
    pub(super) content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    #[serde(flatten)]
    pub(super) common: Common,
    pub(super) prompt: Prompt,
    pub(super) logprobs: Option<i64>,
    #[serde(default)]
    pub(super) echo: bool,
    pub(super) suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Which endpoint: shapes the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// The largest `top_logprobs` accepted (OpenAI's limit).
pub(super) const MAX_TOP_LOGPROBS: i64 = 20;
pub(super) const MAX_STOPS: usize = 4;

/// The body as JSON of type `T`, or a 4xx that says what is wrong.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    state: &State,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the request body is larger than the limit of {} bytes",
                    state.api.max_body.0
                ),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the request does not match the API"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// The sampling parameters, checked.
pub(super) fn params(
    c: &Common,
    worker: &ModelWorker,
    logprobs: (bool, usize),
) -> Result<GenerateParams, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n must be 1"));
    }
    for (name, v) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_request(format!(
                "{name} is not supported (use 0)"
            )));
        }
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2"));
    }
    if let Some(p) = c.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad_request("top_p must be above 0 and at most 1"));
    }
    let context = worker.context_length;
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => context,
        Some(n) if n < 1 => {
            return Err(ApiError::bad_request("max_tokens must be at least 1"));
        }
        Some(n) if n as u64 > context as u64 => {
            return Err(ApiError::bad_request(format!(
                "max_tokens {n} is more than the context window of {} ({context} tokens)",
                worker.record.label()
            )));
        }
        Some(n) => n as usize,
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request(format!(
            "stop takes at most {MAX_STOPS} non-empty strings of at most 256 bytes"
        )));
    }
    Ok(GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p: c.top_p.filter(|&p| p < 1.0),
            seed: c.seed.map(|s| s as u64),
            ..SamplingParams::default()
        },
        stop,
        top_logprobs: logprobs.1,
        logprobs: logprobs.0,
    })
}

/// The parts of a response that do not change between chunks.
pub(super) struct Answer {
    pub(super) id: String,
    pub(super) created: i64,
    pub(super) model: String,
    pub(super) kind: Kind,
    pub(super) logprobs: bool,
    pub(super) include_usage: bool,
}

/// OpenAI's finish reason; none for a cancelled generation (only at shutdown or when the
/// client left), which did not finish: the client is told why instead.
pub(super) fn finish_reason(f: FinishReason) -> Option<&'static str> {
    match f {
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => None,
    }
}

/// What a client whose generation was cut short by a shutdown is told.
pub(super) fn stopped_by_shutdown() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the daemon stopped this generation while shutting down",
    )
}

pub(super) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion})
}

impl Answer {
    pub(super) fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// `logprobs` for these tokens, in the endpoint's shape.
    pub(super) fn logprobs(&self, tokens: &[TokenInfo]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let entry = |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(&t.text, t.logprob);
                        e["top_logprobs"] = t.top.iter().map(|(s, lp)| entry(s, *lp)).collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let mut offset = 0usize;
                let mut offsets = Vec::new();
                for t in tokens {
                    offsets.push(offset);
                    offset += t.text.len();
                }
                json!({
                    "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    pub(super) fn choice(
        &self,
        text: &str,
        tokens: &[TokenInfo],
        finish: Option<&str>,
        chunk: bool,
    ) -> Value {
        match self.kind {
            Kind::Chat => {
                let body = if chunk {
                    (
                        "delta",
                        if text.is_empty() && finish.is_some() {
                            json!({})
                        } else {
                            json!({"role": "assistant", "content": text})
                        },
                    )
                } else {
                    ("message", json!({"role": "assistant", "content": text}))
                };
                json!({"index": 0, body.0: body.1, "logprobs": self.logprobs(tokens),
                    "finish_reason": finish})
            }
            Kind::Completion => json!({"index": 0, "text": text,
                "logprobs": self.logprobs(tokens), "finish_reason": finish}),
        }
    }

    pub(super) fn envelope(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "system_fingerprint": crate::VERSION, "choices": choices})
    }
}

pub(super) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}
