//! `audit.db`'s tables, triggers and schema version, and the migrations between versions.
//!
//! The schema version is SQLite's `PRAGMA user_version`: migration `i` of [`MIGRATIONS`] moves
//! it from `i` to `i + 1`, inside the `BEGIN IMMEDIATE` transaction that read it, so two
//! processes opening one file migrate it once. Rules:
//! - Version 0 is a log written before versions existed (Outpost 0.1): migration 1 is that
//!   schema, written `IF NOT EXISTS`, so such a file is adopted in place as version 1 with
//!   its records untouched (and its append-only triggers restored if someone dropped them).
//! - A version above the last migration was written by a newer Outpost: it is refused by the
//!   writer and the reader alike, before anything in the file is changed.
//! - The read side never migrates (it opens the file read-only); it reads every version up to
//!   the current one, which is sound while each migration only adds to what the reader uses.
//! - Tables: `records` and `checkpoints` (columns as in `record`); triggers make `UPDATE` and
//!   `DELETE` fail on both.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{AuditError, store_err};

/// The schema, one migration per entry; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of Outpost 0.1, which set no version.
    r#"
CREATE TABLE IF NOT EXISTS records (
    seq            INTEGER PRIMARY KEY,
    ts             TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    actor          TEXT NOT NULL,
    roles          TEXT NOT NULL,
    action         TEXT NOT NULL,
    resource       TEXT,
    outcome        TEXT NOT NULL,
    reason         TEXT NOT NULL,
    request_id     TEXT,
    policy_version INTEGER,
    details        TEXT NOT NULL,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    ts         TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature  TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"#,
];

/// The version this build writes.
pub(super) const CURRENT: i64 = MIGRATIONS.len() as i64;

/// Brings the file to [`CURRENT`], in one transaction; refuses a newer one.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let err = store_err(path);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let found = version(&tx, path)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(&err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(&err)?;
    }
    tx.commit().map_err(&err)
}

/// The file's schema version, when this build can read it (0 to [`CURRENT`]).
pub(super) fn version(conn: &Connection, path: &Path) -> Result<i64, AuditError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(store_err(path))?;
    if (0..=CURRENT).contains(&found) {
        Ok(found)
    } else {
        Err(AuditError::Schema {
            path: path.into(),
            found,
            known: CURRENT,
        })
    }
}
