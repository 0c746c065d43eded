//! The routes, the middleware that tags, times, logs and counts every request, the OpenAI
//! error shape, and the probe endpoints (`/healthz`, `/readyz`, `/metrics`). Who may call
//! is in `auth`, the management endpoints in `manage`, the audit ones in `audit_api`, the
//! OpenAI ones in `openai`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, Query, Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use outpost_engine::registry::RegistryError;
use outpost_policy::rbac::Action;
use tracing::Instrument as _;

use super::State;
use super::{audit_api, manage, openai};
// The OpenAI endpoints import what they share with the others from here.
pub use super::auth::refuse_unrecorded;
pub use super::auth::{authenticate, authorize};
pub use super::manage::{lock_registry, registered_models};

/// Routes and the middleware that counts and tags every request.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/api/v1/models", get(manage::list_models))
        .route("/api/v1/models/rollback", post(manage::rollback))
        .route(
            "/api/v1/models/{reference}/activate",
            post(manage::activate),
        )
        .route("/api/v1/models/{reference}", delete(manage::remove))
        .route("/api/v1/audit", get(audit_api::audit_query))
        .route("/api/v1/audit/export", get(audit_api::audit_export))
        .route("/api/v1/audit/verify", get(audit_api::audit_verify))
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
    if let Some((stats, gauges)) = &state.sync {
        gauges.update(&stats.snapshot());
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

pub type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}
