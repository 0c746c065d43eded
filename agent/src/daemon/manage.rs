//! The management endpoints: the registry's models, activation and rollback through the
//! activation service (load, health check, then switch), and removal; each change recorded
//! before it happens and its outcome after.

use std::sync::Arc;

use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_engine::registry::ModelRef;
use outpost_policy::audit::Outcome;
use outpost_policy::rbac::Action;
use serde::Deserialize;

use super::State;
use super::auth::{authenticate, authorize, guard, refuse_unrecorded};
use super::http::{ApiError, QueryResult, RequestId, blocking, query};
use crate::activation::{self, ActivationError, Change};
use crate::context::{AuditedError, audited};

/// The registry, for a blocking task.
pub fn lock_registry(
    state: &State,
) -> Result<std::sync::MutexGuard<'_, outpost_engine::Registry>, ApiError> {
    state
        .registry
        .lock()
        .map_err(|_| ApiError::internal("registry lock poisoned"))
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

pub async fn list_models(
    Shared(state): Shared<Arc<State>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let models = registered_models(&state, &headers, &rid).await?;
    Ok(axum::Json(models).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasQuery {
    alias: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

pub async fn activate(
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

pub async fn rollback(
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

pub async fn remove(
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
