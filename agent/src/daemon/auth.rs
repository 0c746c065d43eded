//! Who is calling: the bearer token verified (off the async workers: it may raise the
//! trusted clock's floor, an fsync), the policy's decision, and the audit records of both.
//! A 401 or 403 is recorded without waiting; an allowed read is recorded durably before it
//! is answered.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::identity::Identity;
use outpost_policy::rbac::Action;

use super::State;
use super::http::{ApiError, RequestId};

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

/// No record, no action: a 503 when the audit log cannot take the intent.
pub fn refuse_unrecorded(e: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        format!("refusing to act without an audit record: {e}"),
    )
}
