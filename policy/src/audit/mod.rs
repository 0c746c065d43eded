//! The audit log: `<data>/audit.db`, a SHA-256 hash chain with Ed25519-signed checkpoints.
//!
//! One job per module (the format for auditors is in `docs/audit-format.md`):
//! - `record`: what a record and a checkpoint are, their canonical JSON, hashes and signed
//!   bytes ([`Entry`], [`Record`], [`Checkpoint`], [`Outcome`]);
//! - `schema`: `audit.db`'s tables and triggers, its schema version and migrations;
//! - `writer`: the append side, one writer thread per process with group commit and
//!   checkpoints ([`AuditLog`], [`AuditSettings`]);
//! - `reader`: the read side, read-only queries ([`AuditReader`], [`Query`]), and
//!   [`RecordSource`], what exports read from (this log or another store of a chain);
//! - `verify`: the chain and checkpoint rules ([`ChainVerifier`]), on the database, a JSONL
//!   export or records from any other source;
//! - `export`: JSONL and CSV exports, from any [`RecordSource`].
//!
//! Invariant: only this module opens `audit.db`; appends go through the writer thread, and
//! reading never changes the file.

mod export;
mod reader;
mod record;
mod schema;
mod verify;
mod writer;

use std::path::{Path, PathBuf};

pub use export::{Format, export, export_to_file};
pub use reader::{AuditReader, Query, RecordSource};
pub use record::{
    Checkpoint, Entry, GENESIS, MAX_DETAILS, Outcome, Record, format_ts, now_rfc3339,
};
pub use verify::{ChainVerifier, VerifyReport, parse_record, verify_export, verify_log};
pub use writer::{AuditLog, AuditSettings, Pending, Unqueued};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {message}", path.display())]
    Store { path: PathBuf, message: String },
    #[error("audit log {}: the writer has stopped", .0.display())]
    Closed(PathBuf),
    #[error(
        "audit log {} has schema version {found}, which this outpost does not know (it knows up to {known}): a newer outpost wrote it; nothing was changed",
        path.display()
    )]
    Schema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{0}")]
    Export(String),
}

fn store_err(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError {
    let path = path.to_path_buf();
    move |e| AuditError::Store {
        path: path.clone(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
