//! The OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.
//!
//! Every request is authenticated, authorized on the model it names, and recorded before it
//! runs (model, endpoint, SHA-256 of the prompt); its outcome is recorded after (token counts,
//! finish reason) — also when the client goes away mid-answer. This module orchestrates
//! (authorize, record, queue, stream); `wire` holds the request and response shapes.

mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State as Shared;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use outpost_engine::chat::Message;
use outpost_engine::generate::FinishReason;
use outpost_engine::{EngineError, Generation};
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::rbac::Action;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::State;
use super::engine::{Input, Job, JobEvent, ModelWorker, Rejected, TokenInfo};
use super::http::{
    ApiError, RequestId, authenticate, authorize, blocking, lock_registry, refuse_unrecorded,
    registered_models,
};
use wire::{
    Answer, ChatRequest, Common, CompletionRequest, Content, Kind, MAX_TOP_LOGPROBS, Prompt,
    finish_reason, params, parse_body, sse, stopped_by_shutdown, usage,
};

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
        EngineError::ContextOverflow { .. }
        | EngineError::PromptTooLarge { .. }
        | EngineError::EmptyPrompt => ApiError::new(
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
