//! The routes, the error shape, authentication and the management and audit endpoints.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use outpost_engine::registry::{ModelRef, RegistryError};
use outpost_policy::audit::{self, AuditReader, Entry, Format, Outcome};
use outpost_policy::identity::Identity;
use outpost_policy::rbac::Action;
use serde::Deserialize;
use tracing::Instrument as _;

use super::State;
use super::openai;
use crate::activation::{self, ActivationError, Change};
use crate::context::{AuditedError, audited};

/// Routes and the middleware that counts and tags every request.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/rollback", post(rollback))
        .route("/api/v1/models/{reference}/activate", post(activate))
        .route("/api/v1/models/{reference}", delete(remove))
        .route("/api/v1/audit", get(audit_query))
        .route("/api/v1/audit/export", get(audit_export))
        .route("/api/v1/audit/verify", get(audit_verify))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(state.api.max_body.0).unwrap_or(usize::MAX),
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// A request id for the audit log and the client (`x-request-id`).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

async fn observe(Shared(state): Shared<Arc<State>>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = metric_method(req.method());
    let mut id = [0u8; 12];
    let _ = getrandom::fill(&mut id);
    let id = hex::encode(id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id);
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    state.metrics.record_request(&route, method, status);
    span.in_scope(|| {
        tracing::info!(
            method,
            route = %route,
            status,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            request_id = %id,
            "Request answered."
        );
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The method as a metric label: one of a fixed set, so hostile requests with made-up
/// methods cannot grow the label space.
fn metric_method(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// An error in the OpenAI shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        Self {
            status,
            message: message.into(),
            kind,
            code,
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind,
            "code": self.code, "param": null}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        for (name, value) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.headers_mut().insert(name.clone(), v);
            }
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::InvalidRef(_)
            | RegistryError::InvalidLabel { .. }
            | RegistryError::Ambiguous { .. } => StatusCode::BAD_REQUEST,
            RegistryError::InUse { .. } | RegistryError::NothingToRollback(_) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match status {
            StatusCode::NOT_FOUND => "model_not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::BAD_REQUEST => "invalid_request",
            _ => "registry_error",
        };
        Self::new(status, code, e.to_string())
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// A verified, authorized caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub request_id: String,
}

impl Caller {
    /// An audit entry for this caller.
    pub fn entry(&self, state: &State, action: Action, outcome: Outcome, reason: &str) -> Entry {
        let mut e = Entry::new(&self.identity.sub, action.as_str(), outcome, reason);
        e.roles = self.identity.roles.clone();
        e.request_id = Some(self.request_id.clone());
        e.policy_version = Some(state.policy.version);
        e
    }
}

/// Checks the bearer token: 401 (with `WWW-Authenticate`) when it is missing or invalid.
/// Every refusal is audited and counted.
pub async fn authenticate(
    state: &Arc<State>,
    headers: &HeaderMap,
    request_id: &str,
    action: Action,
) -> Result<Identity, ApiError> {
    let refuse = |why: String, challenge: &str| {
        state.metrics.unauthenticated();
        let mut e = Entry::new("unauthenticated", action.as_str(), Outcome::Denied, &why);
        e.request_id = Some(request_id.to_string());
        e.policy_version = Some(state.policy.version);
        state.note(e);
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", why)
            .with_header(header::WWW_AUTHENTICATE, challenge)
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(refuse(
            "a bearer token is required (Authorization: Bearer <JWT>)".into(),
            "Bearer realm=\"outpost\"",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(refuse(
            "the Authorization header must be `Bearer <JWT>`".into(),
            "Bearer realm=\"outpost\", error=\"invalid_request\"",
        ));
    };
    // Verification may raise the trusted clock's floor, an fsync: off the async workers.
    let token = token.to_string();
    let s = state.clone();
    let verified = tokio::task::spawn_blocking(move || match s.clock.lock() {
        Ok(mut clock) => Ok(s.verifier.verify(&token, &mut clock)),
        Err(_) => Err(ApiError::internal("clock lock poisoned")),
    })
    .await
    .map_err(|e| ApiError::internal(format!("task failed: {e}")))??;
    verified.map_err(|e| {
        refuse(
            format!("invalid token: {e}"),
            "Bearer realm=\"outpost\", error=\"invalid_token\"",
        )
    })
}

/// 403 (audited) unless the policy lets `identity` do `action` (on `resource`). The caller
/// records the allowed action itself, before doing it.
pub fn authorize(
    state: &State,
    identity: Identity,
    request_id: &str,
    action: Action,
    resource: Option<&str>,
) -> Result<(Caller, String), ApiError> {
    let caller = Caller {
        identity,
        request_id: request_id.to_string(),
    };
    let decision = state.policy.authorize(&caller.identity, action, resource);
    if !decision.allowed {
        state.metrics.forbidden();
        let mut e = caller.entry(state, action, Outcome::Denied, &decision.reason);
        e.resource = resource.map(str::to_string);
        state.note(e);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("not permitted: {}", decision.reason),
        ));
    }
    Ok((caller, decision.reason))
}

/// Authenticate and authorize in one step; the allowed read is durably recorded before it
/// is answered (so an auditor's next query sees it, and a crash cannot lose it).
pub async fn guard(
    state: &Arc<State>,
    headers: &HeaderMap,
    request_id: &RequestId,
    action: Action,
    resource: Option<&str>,
) -> Result<Caller, ApiError> {
    let identity = authenticate(state, headers, &request_id.0, action).await?;
    let (caller, reason) = authorize(state, identity, &request_id.0, action, resource)?;
    let mut e = caller.entry(state, action, Outcome::Allowed, &reason);
    e.resource = resource.map(str::to_string);
    state.record(e).await.map_err(|e| refuse_unrecorded(&e))?;
    Ok(caller)
}

/// The registry, for a blocking task.
pub fn lock_registry(
    state: &State,
) -> Result<std::sync::MutexGuard<'_, outpost_engine::Registry>, ApiError> {
    state
        .registry
        .lock()
        .map_err(|_| ApiError::internal("registry lock poisoned"))
}

/// Runs blocking work (SQLite, files) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state, &headers, &rid.0, Action::DeviceRead).await?;
    authorize(&state, identity, &rid.0, Action::DeviceRead, None)?;
    let dir = state.data_dir.clone();
    let writable = blocking(move || Ok(crate::context::probe_writable(dir.root()).is_ok())).await?;
    let model = state.current_model().map(|m| m.record.label());
    let ready = writable
        && model.is_some()
        && !state
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst);
    let body = serde_json::json!({"ready": ready, "model": model, "storage_writable": writable});
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, axum::Json(body)).into_response())
}

async fn metrics(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !state.api.metrics_public {
        let identity = authenticate(&state, &headers, &rid.0, Action::DeviceRead).await?;
        authorize(&state, identity, &rid.0, Action::DeviceRead, None)?;
    }
    let model = state.current_model();
    let text = state.metrics.render(
        model
            .as_ref()
            .map(|m| (m.record.label(), m.depth()))
            .as_ref()
            .map(|(l, d)| (l.as_str(), *d)),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The registry's models, for a caller allowed `models:read` (both model lists).
pub async fn registered_models(
    state: &Arc<State>,
    headers: &HeaderMap,
    rid: &RequestId,
) -> Result<Vec<outpost_engine::ModelRecord>, ApiError> {
    guard(state, headers, rid, Action::ModelsRead, None).await?;
    let s = state.clone();
    blocking(move || Ok(lock_registry(&s)?.list()?)).await
}

async fn list_models(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let models = registered_models(&state, &headers, &rid).await?;
    Ok(axum::Json(models).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasQuery {
    alias: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn activate(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    Path(reference): Path<String>,
    q: QueryResult<AliasQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let r: ModelRef = reference.parse().map_err(ApiError::from)?;
    change_alias(
        state,
        headers,
        rid,
        Some(reference),
        q.alias,
        Change::Activate(r),
    )
    .await
}

async fn rollback(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    q: QueryResult<AliasQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    change_alias(state, headers, rid, None, q.alias, Change::Rollback).await
}

/// Activate or roll back through the activation service: recorded first; for `default`
/// the new model is loaded and health-checked before the registry changes, so a model that
/// cannot serve leaves everything as it was (422).
async fn change_alias(
    state: Arc<State>,
    headers: HeaderMap,
    rid: RequestId,
    resource: Option<String>,
    alias: Option<String>,
    change: Change,
) -> Result<Response, ApiError> {
    let alias = alias.unwrap_or_else(|| "default".into());
    let identity = authenticate(&state, &headers, &rid.0, Action::ModelsActivate).await?;
    let (caller, reason) = authorize(
        &state,
        identity,
        &rid.0,
        Action::ModelsActivate,
        resource.as_deref(),
    )?;
    let _one_at_a_time = state.swap.lock().await;
    let mut intent = caller.entry(&state, Action::ModelsActivate, Outcome::Allowed, &reason);
    intent.resource = resource.clone();
    intent.details = serde_json::json!({"alias": alias,
        "rollback": matches!(change, Change::Rollback)});
    let s = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let audit = s.audit.clone();
        audited(
            &audit,
            intent,
            || {
                activation::change_alias(
                    &s.registry,
                    s.as_ref(),
                    &alias,
                    &change,
                    &s.load_options,
                    &s.health_check,
                )
            },
            |a| {
                format!(
                    "'{}' now points at {}",
                    a.activation.alias,
                    a.activation.model.label()
                )
            },
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("task failed: {e}")))?;
    state.metrics.audit_record();
    match result {
        Ok(a) => Ok(axum::Json(a.activation).into_response()),
        Err(AuditedError::Unrecorded(e)) => Err(refuse_unrecorded(&e.to_string())),
        Err(AuditedError::Failed(e)) => Err(ApiError::from(e)),
    }
}

impl From<ActivationError> for ApiError {
    fn from(e: ActivationError) -> Self {
        match e {
            ActivationError::Registry(r) => r.into(),
            e @ (ActivationError::Load { .. } | ActivationError::Unhealthy { .. }) => {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "model_load_failed",
                    e.to_string(),
                )
            }
            e => ApiError::internal(e.to_string()),
        }
    }
}

async fn remove(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    Path(reference): Path<String>,
    q: QueryResult<RemoveQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let r: ModelRef = reference.parse().map_err(ApiError::from)?;
    let identity = authenticate(&state, &headers, &rid.0, Action::ModelsWrite).await?;
    let (caller, reason) = authorize(
        &state,
        identity,
        &rid.0,
        Action::ModelsWrite,
        Some(&reference),
    )?;
    let _one_at_a_time = state.swap.lock().await;
    let mut intent = caller.entry(&state, Action::ModelsWrite, Outcome::Allowed, &reason);
    intent.resource = Some(reference.clone());
    intent.details = serde_json::json!({"remove": true, "force": q.force});
    let s = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let audit = s.audit.clone();
        audited(
            &audit,
            intent,
            || {
                let removed = lock_registry(&s)?.remove(&r, q.force)?;
                // A forced removal of the model behind `default` unsets the alias: stop
                // serving it. Requests already running finish; its blob stays until the
                // engine lets go.
                if s.current_model()
                    .is_some_and(|m| m.record.label() == removed.model.label())
                {
                    s.install(None);
                }
                Ok::<_, ApiError>(removed)
            },
            |_| "removed".into(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("task failed: {e}")))?;
    state.metrics.audit_record();
    match result {
        Ok(removed) => Ok(axum::Json(removed).into_response()),
        Err(AuditedError::Unrecorded(e)) => Err(refuse_unrecorded(&e.to_string())),
        Err(AuditedError::Failed(e)) => Err(e),
    }
}

/// No record, no action: a 503 when the audit log cannot take the intent.
pub fn refuse_unrecorded(e: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        format!("refusing to act without an audit record: {e}"),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    since: Option<String>,
    until: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    limit: Option<u64>,
    /// Cursor: only records after this seq (the `next_cursor` of the previous page).
    after: Option<u64>,
    format: Option<String>,
}

const MAX_PAGE: u64 = 1000;

fn audit_filters(p: &AuditParams) -> Result<audit::Query, ApiError> {
    let time = |s: &Option<String>, name: &str| {
        s.as_deref()
            .map(crate::context::parse_time)
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("{name}: {e:#}")))
    };
    let outcome = p
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o).ok_or_else(|| {
                ApiError::bad_request("outcome must be allowed, denied, success or failure")
            })
        })
        .transpose()?;
    Ok(audit::Query {
        since: time(&p.since, "since")?,
        until: time(&p.until, "until")?,
        actor: p.actor.clone(),
        action: p.action.clone(),
        outcome,
        after_seq: p.after,
        limit: None,
        newest: false,
    })
}

fn audit_reader(state: &State) -> Result<AuditReader, ApiError> {
    AuditReader::open(&state.data_dir.audit_db()).map_err(|e| ApiError::internal(e.to_string()))
}

async fn audit_query(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    q: QueryResult<AuditParams>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    guard(&state, &headers, &rid, Action::AuditRead, None).await?;
    if p.format.is_some() {
        return Err(ApiError::bad_request(
            "format applies to /api/v1/audit/export",
        ));
    }
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let mut query = audit_filters(&p)?;
    // One more than asked, to know whether another page follows.
    query.limit = Some(limit + 1);
    let s = state.clone();
    let mut records = blocking(move || {
        audit_reader(&s)?
            .query(&query)
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    let more = records.len() as u64 > limit;
    records.truncate(limit as usize);
    let next = if more {
        records.last().map(|r| r.seq)
    } else {
        None
    };
    Ok(axum::Json(serde_json::json!({"records": records, "next_cursor": next})).into_response())
}

async fn audit_export(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    q: QueryResult<AuditParams>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    guard(&state, &headers, &rid, Action::AuditExport, None).await?;
    let (format, content_type) = match p.format.as_deref().unwrap_or("jsonl") {
        "jsonl" => (Format::Jsonl, "application/x-ndjson"),
        "csv" => (Format::Csv, "text/csv; charset=utf-8"),
        f => {
            return Err(ApiError::bad_request(format!(
                "format '{f}': use jsonl or csv"
            )));
        }
    };
    if p.actor.is_some() || p.action.is_some() || p.outcome.is_some() || p.after.is_some() {
        return Err(ApiError::bad_request(
            "exports take since and until only: filtering records would break the chain",
        ));
    }
    let query = audit_filters(&p)?;
    let reader = {
        let s = state.clone();
        blocking(move || audit_reader(&s)).await?
    };
    // The export is written on a blocking thread into a channel the body streams from.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    let key = state.audit.public_key().clone();
    let device = state.device_id.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(64 * 1024),
        };
        let result = audit::export(&reader, &query, format, &device, Some(&key), &mut w);
        let flushed = std::io::Write::flush(&mut w);
        if let Err(e) = result
            .map(|_| ())
            .map_err(|e| e.to_string())
            .and(flushed.map_err(|e| e.to_string()))
        {
            // The body ends with an error: the client sees a broken transfer, not a short file.
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let ext = if matches!(format, Format::Csv) {
        "csv"
    } else {
        "jsonl"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"audit-{}.{ext}\"", state.device_id),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Bytes written go to the response body in 64 KiB pieces.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(64 * 1024));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

async fn audit_verify(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    guard(&state, &headers, &rid, Action::AuditRead, None).await?;
    let s = state.clone();
    let report = blocking(move || {
        let key = s.audit.public_key().clone();
        audit::verify_log(&audit_reader(&s)?, Some(&key))
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    Ok(axum::Json(report).into_response())
}
