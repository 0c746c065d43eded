//! The OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.
//!
//! Every request is authenticated, authorized on the model it names, and recorded before it
//! runs (model, endpoint, SHA-256 of the prompt); its outcome is recorded after (token counts,
//! finish reason) — also when the client goes away mid-answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State as Shared;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_engine::chat::Message;
use outpost_engine::generate::FinishReason;
use outpost_engine::{EngineError, GenerateParams, Generation, SamplingParams};
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::rbac::Action;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::State;
use super::engine::{Input, Job, JobEvent, ModelWorker, Rejected, TokenInfo};
use super::http::{
    ApiError, RequestId, authenticate, authorize, blocking, lock_registry, refuse_unrecorded,
    registered_models,
};

/// Parameters both endpoints take. Unknown fields are ignored, as OpenAI's clients send
/// some this server has no use for.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: Prompt,
    logprobs: Option<i64>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Which endpoint: shapes the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The largest `top_logprobs` accepted (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;
const MAX_STOPS: usize = 4;

pub async fn list_models(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let models = registered_models(&state, &headers, &rid).await?;
    let loaded = state.current_model().map(|m| m.record.sha256.clone());
    let data: Vec<Value> = models
        .iter()
        .map(|m| {
            let created = time::OffsetDateTime::parse(
                &m.imported_at,
                &time::format_description::well_known::Rfc3339,
            )
            .map_or(0, |t| t.unix_timestamp());
            json!({"id": m.label(), "object": "model", "created": created,
                "owned_by": "outpost", "aliases": m.aliases,
                "loaded": loaded.as_deref() == Some(m.sha256.as_str())})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

pub async fn chat_completions(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state, &headers, &rid.0, Action::InferenceRun).await?;
    let req: ChatRequest = parse_body(&state, body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role '{other}' is not supported (system, developer, user, assistant)"
                )));
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}]: content parts of type '{kind}' are not supported (text only)"
                            )));
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(role, &text));
    }
    let top = req.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return Err(ApiError::bad_request(format!(
            "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
        )));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    if top > 0 && !logprobs {
        return Err(ApiError::bad_request("top_logprobs needs logprobs: true"));
    }
    let input = Input::Chat(messages);
    let prompt_sha = input.digest();
    run(
        state,
        rid,
        identity,
        Kind::Chat,
        req.common,
        input,
        (logprobs, top as usize),
        prompt_sha,
    )
    .await
}

pub async fn completions(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state, &headers, &rid.0, Action::InferenceRun).await?;
    let req: CompletionRequest = parse_body(&state, body)?;
    if req.echo {
        return Err(ApiError::bad_request("echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix is not supported"));
    }
    let one = "n=1 only: give one prompt per request";
    let input = match req.prompt {
        Prompt::Text(t) => Input::Text(t),
        Prompt::Texts(mut v) if v.len() == 1 => Input::Text(v.remove(0)),
        Prompt::Tokens(ids) => Input::Tokens(ids),
        Prompt::TokenLists(mut v) if v.len() == 1 => Input::Tokens(v.remove(0)),
        _ => return Err(ApiError::bad_request(one)),
    };
    let digest = input.digest();
    let top = req.logprobs.unwrap_or(-1);
    if !(-1..=5).contains(&top) {
        return Err(ApiError::bad_request("logprobs must be between 0 and 5"));
    }
    run(
        state,
        rid,
        identity,
        Kind::Completion,
        req.common,
        input,
        (top >= 0, top.max(0) as usize),
        digest,
    )
    .await
}

/// The body as JSON of type `T`, or a 4xx that says what is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(
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
fn params(
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

/// The loaded model `name` means: absent, `default`, or anything naming the loaded model.
async fn resolve(state: &Arc<State>, name: Option<&str>) -> Result<Arc<ModelWorker>, ApiError> {
    let current = state.current_model();
    let not_loaded = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_not_loaded",
            "no model is loaded: activate one as 'default'",
        )
        .with_header(header::RETRY_AFTER, "5")
    };
    let name = match name {
        None | Some("default") => return current.ok_or_else(not_loaded),
        Some(n) => n.to_string(),
    };
    if let Some(c) = &current
        && (name == c.record.label() || name == c.record.name)
    {
        return Ok(c.clone());
    }
    let s = state.clone();
    let record = blocking(move || Ok(lock_registry(&s)?.resolve_ref_or_alias(&name)?)).await?;
    match current {
        Some(c) if c.record.sha256 == record.sha256 => Ok(c),
        Some(c) => Err(ApiError::bad_request(format!(
            "{} is in the registry but not loaded; this device serves {} (activate {} as 'default' to serve it)",
            record.label(),
            c.record.label(),
            record.label()
        ))),
        None => Err(not_loaded()),
    }
}

/// What the audit records about one inference.
struct Audited {
    state: Arc<State>,
    entry: Entry,
    done: bool,
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Audited {
    /// The outcome record, once.
    fn take(&mut self, outcome: Outcome, reason: &str, extra: Value) -> Option<Entry> {
        if self.done {
            return None;
        }
        self.done = true;
        let mut e = self.entry.clone();
        e.outcome = outcome;
        e.reason = reason.to_string();
        if let (Value::Object(d), Value::Object(x)) = (&mut e.details, extra) {
            d.extend(x);
        }
        Some(e)
    }

    /// Queues the outcome record without waiting.
    fn finish(&mut self, outcome: Outcome, reason: &str, extra: Value) {
        if let Some(e) = self.take(outcome, reason, extra) {
            self.state.note(e);
        }
    }
}

impl Drop for Audited {
    /// The client went away: stop generating, and say so in the log.
    fn drop(&mut self) {
        if !self.done {
            self.cancel.store(true, Ordering::SeqCst);
            let extra = json!({"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens});
            self.finish(
                Outcome::Failure,
                "client disconnected; generation cancelled",
                extra,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: Arc<State>,
    rid: RequestId,
    identity: outpost_policy::identity::Identity,
    kind: Kind,
    common: Common,
    input: Input,
    logprobs: (bool, usize),
    prompt_sha: String,
) -> Result<Response, ApiError> {
    let worker = resolve(&state, common.model.as_deref()).await?;
    let label = worker.record.label();
    let (caller, reason) = authorize(&state, identity, &rid.0, Action::InferenceRun, Some(&label))?;
    let gen_params = params(&common, &worker, logprobs)?;
    if let Input::Tokens(ids) = &input
        && let Some(bad) = ids.iter().find(|&&i| i as usize >= worker.vocab_size)
    {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is outside the vocabulary of {label} ({} tokens)",
            worker.vocab_size
        )));
    }
    let endpoint = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let mut entry = caller.entry(&state, Action::InferenceRun, Outcome::Allowed, &reason);
    entry.resource = Some(label.clone());
    entry.details = json!({"endpoint": endpoint, "prompt_sha256": prompt_sha,
        "stream": common.stream, "max_tokens": gen_params.max_tokens});
    state
        .record(entry.clone())
        .await
        .map_err(|e| refuse_unrecorded(&e))?;
    let cancel = Arc::new(AtomicBool::new(false));
    let mut audited = Audited {
        state: state.clone(),
        entry,
        done: false,
        cancel: cancel.clone(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    if state.shutting_down.load(Ordering::SeqCst) {
        audited.finish(Outcome::Failure, "the daemon is stopping", json!({}));
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is stopping",
        )
        .with_header(header::RETRY_AFTER, "5"));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        input,
        params: gen_params,
        events: tx,
        cancel: cancel.clone(),
    };
    if let Err(why) = worker.submit(job) {
        let (message, code) = match why {
            Rejected::Busy => {
                state.metrics.rejected_busy();
                ("the inference queue is full; retry shortly", "queue_full")
            }
            Rejected::Gone => ("the engine for this model has stopped", "engine_stopped"),
        };
        audited.finish(Outcome::Failure, message, json!({}));
        return Err(
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
                .with_header(header::RETRY_AFTER, "2"),
        );
    }
    // The job is queued; the first event says whether the prompt fits.
    match rx.recv().await {
        Some(JobEvent::Started { prompt_tokens }) => audited.prompt_tokens = prompt_tokens,
        Some(JobEvent::Failed(e)) => {
            let err = engine_error(&e);
            audited.finish(Outcome::Failure, &err.message, json!({}));
            return Err(err);
        }
        _ => {
            audited.finish(Outcome::Failure, "the engine stopped", json!({}));
            return Err(ApiError::internal("the engine stopped"));
        }
    }
    let answer = Answer {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rid.0
        ),
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        model: label,
        kind,
        logprobs: logprobs.0,
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
    };
    if common.stream {
        Ok(stream(answer, rx, audited))
    } else {
        whole(answer, rx, audited).await
    }
}

fn engine_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::ContextOverflow { .. } | EngineError::EmptyPrompt => ApiError::new(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            e.to_string(),
        ),
        EngineError::Template(_)
        | EngineError::Tokenizer(_)
        | EngineError::TokenOutOfVocabulary { .. } => ApiError::bad_request(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// The parts of a response that do not change between chunks.
struct Answer {
    id: String,
    created: i64,
    model: String,
    kind: Kind,
    logprobs: bool,
    include_usage: bool,
}

/// OpenAI's finish reason; none for a cancelled generation (only at shutdown or when the
/// client left), which did not finish: the client is told why instead.
fn finish_reason(f: FinishReason) -> Option<&'static str> {
    match f {
        FinishReason::Length => Some("length"),
        FinishReason::Stop | FinishReason::Eos => Some("stop"),
        FinishReason::Cancelled => None,
    }
}

/// What a client whose generation was cut short by a shutdown is told.
fn stopped_by_shutdown() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the daemon stopped this generation while shutting down",
    )
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion})
}

impl Answer {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// `logprobs` for these tokens, in the endpoint's shape.
    fn logprobs(&self, tokens: &[TokenInfo]) -> Value {
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

    fn choice(&self, text: &str, tokens: &[TokenInfo], finish: Option<&str>, chunk: bool) -> Value {
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

    fn envelope(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "system_fingerprint": crate::VERSION, "choices": choices})
    }
}

async fn whole(
    answer: Answer,
    mut rx: UnboundedReceiver<JobEvent>,
    mut audited: Audited,
) -> Result<Response, ApiError> {
    let mut tokens = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Token(t) => {
                tokens.push(t);
                audited.completion_tokens += 1;
            }
            JobEvent::Started { .. } | JobEvent::Text(_) => {}
            JobEvent::Done(g) => {
                settle(&mut audited, &g).await;
                let Some(finish) = finish_reason(g.finish_reason) else {
                    return Err(stopped_by_shutdown());
                };
                let mut body = answer.envelope(
                    vec![answer.choice(&g.text, &tokens, Some(finish), false)],
                    false,
                );
                body["usage"] = usage(audited.prompt_tokens, g.tokens.len());
                return Ok(axum::Json(body).into_response());
            }
            JobEvent::Failed(e) => {
                let err = engine_error(&e);
                audited.finish(Outcome::Failure, &err.message, json!({}));
                return Err(err);
            }
        }
    }
    audited.finish(Outcome::Failure, "the engine stopped", json!({}));
    Err(ApiError::internal("the engine stopped"))
}

/// Records how a generation ended, durably, before the answer's last bytes go out.
async fn settle(audited: &mut Audited, g: &Generation) {
    let (outcome, reason) = if g.finish_reason == FinishReason::Cancelled {
        (Outcome::Failure, "cancelled")
    } else {
        (Outcome::Success, "answered")
    };
    if let Some(e) = audited.take(outcome, reason, outcome_details(audited.prompt_tokens, g))
        && let Err(err) = audited.state.record(e).await
    {
        tracing::error!(error = %err, "The outcome of an inference was not recorded.");
    }
}

fn outcome_details(prompt_tokens: usize, g: &Generation) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": g.tokens.len(),
        "finish_reason": g.finish_reason,
        "prefill_tokens_per_s": (g.timings.prefill_tokens_per_s * 10.0).round() / 10.0,
        "decode_tokens_per_s": (g.timings.decode_tokens_per_s * 10.0).round() / 10.0})
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Server-sent events: a chunk per piece of text, the finish reason, usage when asked, then
/// `data: [DONE]`. When the client goes away, the body is dropped and so is `audited`,
/// which cancels the generation.
fn stream(answer: Answer, rx: UnboundedReceiver<JobEvent>, audited: Audited) -> Response {
    struct St {
        answer: Answer,
        rx: UnboundedReceiver<JobEvent>,
        audited: Audited,
        pending: Vec<TokenInfo>,
        first: bool,
        ended: bool,
    }
    let st = St {
        answer,
        rx,
        audited,
        pending: Vec::new(),
        first: true,
        ended: false,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        if st.first && st.answer.kind == Kind::Chat {
            st.first = false;
            let v = st
                .answer
                .envelope(vec![st.answer.choice("", &[], None, true)], true);
            return Some((Ok::<_, std::io::Error>(sse(&v)), st));
        }
        loop {
            let event = st.rx.recv().await;
            match event {
                Some(JobEvent::Token(t)) => {
                    st.pending.push(t);
                    st.audited.completion_tokens += 1;
                }
                Some(JobEvent::Started { .. }) => {}
                Some(JobEvent::Text(text)) => {
                    let tokens = std::mem::take(&mut st.pending);
                    let v = st
                        .answer
                        .envelope(vec![st.answer.choice(&text, &tokens, None, true)], true);
                    return Some((Ok(sse(&v)), st));
                }
                Some(JobEvent::Done(g)) => {
                    settle(&mut st.audited, &g).await;
                    let mut out = String::new();
                    let tokens = std::mem::take(&mut st.pending);
                    match finish_reason(g.finish_reason) {
                        Some(finish) => {
                            let last = st.answer.envelope(
                                vec![st.answer.choice("", &tokens, Some(finish), true)],
                                true,
                            );
                            out.push_str(&format!("data: {last}\n\n"));
                        }
                        // Cancelled, only at shutdown (a client that left reads nothing):
                        // no finish reason, the error says why it ended.
                        None => {
                            let err = stopped_by_shutdown();
                            out.push_str(&format!("data: {}\n\n", err.body()));
                        }
                    }
                    if st.answer.include_usage {
                        let mut u = st.answer.envelope(Vec::new(), true);
                        u["usage"] = usage(st.audited.prompt_tokens, g.tokens.len());
                        out.push_str(&format!("data: {u}\n\n"));
                    }
                    out.push_str("data: [DONE]\n\n");
                    st.ended = true;
                    return Some((Ok(Bytes::from(out)), st));
                }
                Some(JobEvent::Failed(e)) => {
                    let err = engine_error(&e);
                    st.audited.finish(Outcome::Failure, &err.message, json!({}));
                    st.ended = true;
                    let out = format!("data: {}\n\ndata: [DONE]\n\n", err.body());
                    return Some((Ok(Bytes::from(out)), st));
                }
                None => {
                    st.audited
                        .finish(Outcome::Failure, "the engine stopped", json!({}));
                    st.ended = true;
                    let err = ApiError::internal("the engine stopped");
                    let out = format!("data: {}\n\ndata: [DONE]\n\n", err.body());
                    return Some((Ok(Bytes::from(out)), st));
                }
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
