//! Exports of the audit log: JSONL (every field, the checkpoints and the device public key;
//! what `verify_export` and `docs/verify_audit.py` read) and CSV (for spreadsheets: every cell
//! that a spreadsheet would read as a formula is defused with a leading `'`).
//!
//! JSONL lines: first `{"device": {"format": "outpost-audit-1", "device_id", "public_key",
//! "exported_at"}}`, then `{"record": {…}}` per record in seq order, then
//! `{"checkpoint": {…}}` for each checkpoint inside the exported range.
//!
//! Records come from any [`RecordSource`]: the device's `audit.db` or the hub's copy of a
//! device's chain write the same export.

use std::io::Write;
use std::path::Path;

use super::{AuditError, Query, Record, RecordSource, now_rfc3339};
use crate::signing::PublicKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

const CSV_COLUMNS: [&str; 14] = [
    "seq",
    "ts",
    "device_id",
    "actor",
    "roles",
    "action",
    "resource",
    "outcome",
    "reason",
    "request_id",
    "policy_version",
    "details",
    "prev_hash",
    "hash",
];

fn io(e: std::io::Error) -> AuditError {
    AuditError::Export(format!("writing the export: {e}"))
}

/// Writes the records `q` selects from `source` (its time range; other filters would break
/// the chain and are refused) to `out`, under the header naming `device_id` and
/// `public_key`. Returns the number of records written.
pub fn export(
    source: &dyn RecordSource,
    q: &Query,
    format: Format,
    device_id: &str,
    public_key: Option<&PublicKey>,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    if q.actor.is_some() || q.action.is_some() || q.outcome.is_some() {
        return Err(AuditError::Export(
            "exports take a time range only: filtering records would break the chain".into(),
        ));
    }
    let mut count = 0u64;
    let mut range: Option<(u64, u64)> = None;
    match format {
        Format::Jsonl => {
            let header = serde_json::json!({"device": {
                "format": "outpost-audit-1",
                "device_id": device_id,
                "public_key": public_key.map(PublicKey::to_hex),
                "exported_at": now_rfc3339(),
            }});
            writeln!(out, "{header}").map_err(io)?;
        }
        Format::Csv => writeln!(out, "{}", CSV_COLUMNS.join(",")).map_err(io)?,
    }
    source.for_each_record(q, &mut |r| {
        count += 1;
        range = Some(range.map_or((r.seq, r.seq), |(a, _)| (a, r.seq)));
        match format {
            Format::Jsonl => {
                let line = serde_json::json!({ "record": r });
                writeln!(out, "{line}").map_err(io)
            }
            Format::Csv => writeln!(out, "{}", csv_row(&r)).map_err(io),
        }
    })?;
    if format == Format::Jsonl
        && let Some((first, last)) = range
    {
        for cp in source.checkpoints()? {
            if (first..=last).contains(&cp.seq) {
                let line = serde_json::json!({ "checkpoint": cp });
                writeln!(out, "{line}").map_err(io)?;
            }
        }
    }
    out.flush().map_err(io)?;
    Ok(count)
}

/// [`export`] into the file at `path`, which appears whole or not at all (written beside it
/// under a temporary name, then renamed over it).
pub fn export_to_file(
    source: &dyn RecordSource,
    q: &Query,
    format: Format,
    device_id: &str,
    public_key: Option<&PublicKey>,
    path: &Path,
) -> Result<u64, AuditError> {
    let cannot = |e: &dyn std::fmt::Display| {
        AuditError::Export(format!("cannot write {}: {e}", path.display()))
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| cannot(&e))?;
    let n = {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        export(source, q, format, device_id, public_key, &mut w)?
    };
    tmp.persist(path).map_err(|e| cannot(&e.error))?;
    Ok(n)
}

fn csv_row(r: &Record) -> String {
    let cells = [
        r.seq.to_string(),
        r.ts.clone(),
        r.device_id.clone(),
        r.actor.clone(),
        r.roles.join(";"),
        r.action.clone(),
        r.resource.clone().unwrap_or_default(),
        r.outcome.as_str().to_string(),
        r.reason.clone(),
        r.request_id.clone().unwrap_or_default(),
        r.policy_version.map(|v| v.to_string()).unwrap_or_default(),
        r.details.to_string(),
        r.prev_hash.clone(),
        r.hash.clone(),
    ];
    cells
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",")
}

/// One CSV cell: formula triggers defused, quoted when needed (RFC 4180).
pub fn csv_cell(value: &str) -> String {
    let defused = if value.starts_with(['=', '+', '-', '@', '\t', '\r', '|', '%']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if defused.contains([',', '"', '\n', '\r']) || defused != defused.trim() {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}
