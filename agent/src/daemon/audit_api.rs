//! The audit endpoints: query (paged by seq), export (streamed from a blocking thread) and
//! verify, for callers allowed `audit:read` or `audit:export`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as Shared;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use outpost_policy::audit::{self, AuditReader, Format, Outcome};
use outpost_policy::rbac::Action;
use serde::Deserialize;

use super::State;
use super::auth::guard;
use super::http::{ApiError, QueryResult, RequestId, blocking, query};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
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

pub async fn audit_query(
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

pub async fn audit_export(
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

pub async fn audit_verify(
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
