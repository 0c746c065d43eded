//! The durable outbox: `<data>/outbox.db`, owned by this module alone. SQLite is the source
//! of truth for what has left the device; rumqttc's memory is only a cache.
//!
//! On disk: SQLite in WAL mode with `synchronous=FULL`; the schema version is `PRAGMA
//! user_version`, advanced by [`MIGRATIONS`] inside the `BEGIN IMMEDIATE` transaction that
//! read it (as `registry.db` and `audit.db` do); a version above the last migration was
//! written by a newer Outpost and is refused before anything is changed. Tables:
//! - `state`: one row (`id = 1`): `last_acked_seq` (the audit upload cursor: every record up
//!   to it is stored durably at the hub), `last_ack_at`, `connected` and
//!   `connected_changed_at`, `last_error` and `last_error_at`, `telemetry_dropped` (snapshots
//!   evicted or refused by the quota, ever). Triggers make the cursor and the drop counter
//!   fail to decrease.
//! - `telemetry`: queued snapshots, oldest first (`id` is `AUTOINCREMENT`, never reused).
//! - `desired` (schema 2): per target (`group:G`, `device:ID`), the last desired state the
//!   device accepted: `version`, `rollout`, `digest`, the document as received, when. A
//!   trigger makes `version` only increase (no replay or rollback survives a restart).
//! - `rollout_outcomes` (schema 3): per (rollout, `name:version`), how far the device got
//!   with it: `activating` (written durably before the health-gated activation starts),
//!   then `staged`, `active`, `failed` or `rolled_back` with the reason. A row that still
//!   says `activating` when the loop starts means the agent stopped during the activation
//!   (killed, out of memory): the loop records it as `failed` instead of trying again, so a
//!   model that kills the agent cannot make it loop on restarts.
//! - `transfers` (schema 4): per blob (`sha256`) being downloaded or last downloaded: the
//!   rollout and `name:version` it is for, `size`, `chunk_size`, `chunks`, `bitmap` (bit `i`
//!   of byte `i / 8`, least significant first, set once chunk `i` is verified AND the partial
//!   file was fsynced with it), `state` (`downloading`, `staged`: verified whole and handed
//!   to the installer, `failed` with `reason`), `attempts` (whole downloads begun: a
//!   whole-hash mismatch starts another), `chunks_rejected` (chunks whose hash did not
//!   match). The partial file itself belongs to `sync::transfer` (see its header); a row in
//!   `downloading` is what keeps it alive.
//!
//! Rules:
//! - The cursor moves only on an ack, and only forward: an ack at or below it is stale (QoS 1
//!   redelivers) and ignored; an ack above the highest seq this process has sent is refused
//!   (a hub cannot make the device skip records it never sent). "Sent" lives in memory and
//!   starts at the cursor: writing it down would cost an fsync per batch, and after a restart
//!   every record above the cursor is sent again anyway, so an ack refused for that reason
//!   only costs one more round trip. Nothing here deletes audit records; they stay in
//!   `audit.db`, and the cursor says how far the hub has them.
//! - Telemetry is held to a byte quota (payload bytes; SQLite's own overhead is not counted):
//!   pushing a snapshot evicts the oldest ones until the queue fits, in the same transaction,
//!   and counts them in `telemetry_dropped`; a snapshot larger than the whole quota is
//!   dropped and counted.
//! - One writer process: [`Outbox::open`] holds an exclusive `flock` on `outbox.db` for its
//!   life. [`Outbox::open_read_only`] (for `outpost sync status`) creates and changes
//!   nothing, reads a missing file as an empty outbox, and reports `connected` only while a
//!   writer holds the lock, so a daemon killed while connected does not read as connected.
//!
//! Crash rules: every change is one transaction, so a kill at any instant leaves the old or
//! the new state; a committed change survives power loss (`synchronous=FULL`).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_policy::audit::now_rfc3339;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use serde::Serialize;

/// The schema, one migration per entry; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE state (
    id                   INTEGER PRIMARY KEY CHECK (id = 1),
    last_acked_seq       INTEGER NOT NULL DEFAULT 0 CHECK (last_acked_seq >= 0),
    last_ack_at          TEXT,
    connected            INTEGER NOT NULL DEFAULT 0 CHECK (connected IN (0, 1)),
    connected_changed_at TEXT,
    last_error           TEXT,
    last_error_at        TEXT,
    telemetry_dropped    INTEGER NOT NULL DEFAULT 0 CHECK (telemetry_dropped >= 0)
);
INSERT INTO state (id) VALUES (1);
CREATE TRIGGER state_cursor_forward BEFORE UPDATE OF last_acked_seq ON state
    WHEN NEW.last_acked_seq < OLD.last_acked_seq
    BEGIN SELECT RAISE(ABORT, 'the audit upload cursor never moves backwards'); END;
CREATE TRIGGER state_drops_forward BEFORE UPDATE OF telemetry_dropped ON state
    WHEN NEW.telemetry_dropped < OLD.telemetry_dropped
    BEGIN SELECT RAISE(ABORT, 'the telemetry drop counter never decreases'); END;
CREATE TRIGGER state_one_row BEFORE DELETE ON state
    BEGIN SELECT RAISE(ABORT, 'the outbox state row is never deleted'); END;
CREATE TABLE telemetry (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      TEXT NOT NULL,
    payload BLOB NOT NULL
);
"#,
    r#"
CREATE TABLE desired (
    target      TEXT PRIMARY KEY,
    version     INTEGER NOT NULL CHECK (version > 0),
    rollout     INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    doc_json    TEXT NOT NULL,
    accepted_at TEXT NOT NULL
);
CREATE TRIGGER desired_forward BEFORE UPDATE OF version ON desired
    WHEN NEW.version <= OLD.version
    BEGIN SELECT RAISE(ABORT, 'a desired state version never moves backwards'); END;
"#,
    r#"
CREATE TABLE rollout_outcomes (
    rollout    INTEGER NOT NULL,
    model      TEXT NOT NULL,
    state      TEXT NOT NULL,
    reason     TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rollout, model)
);
"#,
    r#"
CREATE TABLE transfers (
    sha256          TEXT PRIMARY KEY,
    rollout         INTEGER NOT NULL,
    model           TEXT NOT NULL,
    size            INTEGER NOT NULL CHECK (size >= 0),
    chunk_size      INTEGER NOT NULL CHECK (chunk_size > 0),
    chunks          INTEGER NOT NULL CHECK (chunks >= 0),
    bitmap          BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('downloading', 'staged', 'failed')),
    reason          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 1 CHECK (attempts > 0),
    chunks_rejected INTEGER NOT NULL DEFAULT 0,
    started_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
"#,
];

/// The version this build writes.
const CURRENT: i64 = MIGRATIONS.len() as i64;

/// Longest `last_error` kept (bytes); longer messages are cut at a character boundary.
pub const MAX_ERROR_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {}: {source}", path.display())]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox {}: {what}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "outbox {} is in use by another process (an outpost daemon already syncs this data directory)",
        path.display()
    )]
    Busy { path: PathBuf },
    #[error(
        "outbox {} has schema version {found}, which this outpost does not know (it knows up to {known}): a newer outpost wrote it; nothing was changed",
        path.display()
    )]
    Schema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "outbox {}: an ack for audit seq {acked} is above the highest seq sent ({sent}); refused",
        path.display()
    )]
    AckBeyondSent {
        path: PathBuf,
        acked: u64,
        sent: u64,
    },
    #[error("outbox {} is open read-only", path.display())]
    ReadOnly { path: PathBuf },
}

type Result<T, E = OutboxError> = std::result::Result<T, E>;

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> OutboxError {
    let path = path.to_path_buf();
    move |source| OutboxError::Db {
        path: path.clone(),
        source,
    }
}

/// What `outpost sync status` and `/metrics` show, as stored. `pending_records` needs the
/// audit log's last seq, which the caller has: see [`OutboxStatus::pending_records`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStatus {
    /// Connected to the broker, as last recorded by a writer that is still running.
    pub connected: bool,
    /// Whether a process holds the outbox for writing (a daemon running sync).
    pub writer_running: bool,
    pub connected_changed_at: Option<String>,
    pub last_acked_seq: u64,
    pub last_ack_at: Option<String>,
    pub telemetry_queued: u64,
    pub telemetry_queued_bytes: u64,
    pub telemetry_dropped: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

impl OutboxStatus {
    /// Audit records not yet acknowledged, given the audit log's last seq.
    pub fn pending_records(&self, audit_last_seq: u64) -> u64 {
        audit_last_seq.saturating_sub(self.last_acked_seq)
    }
}

/// What an ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    Advanced {
        from: u64,
        to: u64,
    },
    /// At or below the cursor (a redelivery, or an older ack arriving late): ignored.
    Stale {
        cursor: u64,
    },
}

/// What pushing a telemetry snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryPush {
    /// False when the snapshot alone is over the quota (it was dropped and counted).
    pub queued: bool,
    /// Older snapshots evicted to make room.
    pub evicted: u64,
}

/// A queued telemetry snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedTelemetry {
    pub id: i64,
    pub payload: Vec<u8>,
}

/// A desired state the device accepted, as `outbox.db` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedDesired {
    /// `group:G` or `device:ID`.
    pub target: String,
    pub version: u64,
    pub rollout: u64,
    pub digest: String,
    pub doc_json: String,
}

/// How far the device got with one (rollout, model), as `rollout_outcomes` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutOutcome {
    pub rollout: u64,
    /// `name:version`.
    pub model: String,
    /// `activating`, `staged`, `active`, `failed` or `rolled_back`.
    pub state: String,
    pub reason: Option<String>,
}

/// A blob download as `outbox.db` keeps it (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub sha256: String,
    pub rollout: u64,
    pub model: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub bitmap: Vec<u8>,
    pub state: String,
    pub reason: Option<String>,
    pub attempts: u64,
    pub chunks_rejected: u64,
}

impl TransferRow {
    /// Whether chunk `i` is done.
    pub fn has(&self, i: u64) -> bool {
        let (byte, bit) = ((i / 8) as usize, i % 8);
        self.bitmap.get(byte).is_some_and(|b| b & (1 << bit) != 0)
    }

    /// Marks chunk `i` done (in memory).
    pub fn set(&mut self, i: u64) {
        let byte = (i / 8) as usize;
        if let Some(b) = self.bitmap.get_mut(byte) {
            *b |= 1 << (i % 8);
        }
    }

    /// Chunks done.
    pub fn done(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// An empty bitmap for `chunks` chunks.
    pub fn empty_bitmap(chunks: u64) -> Vec<u8> {
        vec![0u8; chunks.div_ceil(8) as usize]
    }
}

/// `outbox.db`, open for writing (one process) or reading.
pub struct Outbox {
    // Declared before `lock`, so SQLite closes its file before the lock's is closed.
    conn: Connection,
    path: PathBuf,
    /// The writer's exclusive `flock`; `None` when read-only.
    lock: Option<File>,
    /// Read-only: whether a writer held the lock when this was opened.
    writer_running: bool,
    /// Highest audit seq handed to the link by this process since the last rewind (starts
    /// at the cursor).
    sent_seq: u64,
    /// Tests: abort the process inside the next write transaction, before it commits.
    #[cfg(test)]
    abort_before_commit: bool,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.lock.is_some() {
            "writer"
        } else {
            "read-only"
        };
        write!(f, "Outbox({}, {mode})", self.path.display())
    }
}

impl Outbox {
    /// Opens `path` for writing, creating and migrating it as needed, and takes the writer's
    /// lock; [`OutboxError::Busy`] when another process holds it. The link starts out
    /// disconnected.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| OutboxError::Io { what, path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("creating the data directory"))?;
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening"))?;
        take_writer_lock(&lock, path)?;
        let err = db_err(path);
        let mut conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(&err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        migrate(&mut conn, path)?;
        let mut outbox = Self {
            conn,
            path: path.to_path_buf(),
            lock: Some(lock),
            writer_running: true,
            sent_seq: 0,
            #[cfg(test)]
            abort_before_commit: false,
        };
        outbox.sent_seq = outbox.last_acked_seq()?;
        outbox.set_connected(false)?;
        Ok(outbox)
    }

    /// Opens `path` for reading only: creates, migrates and changes nothing, and works while
    /// the daemon writes. A missing (or never initialized) file reads as an empty outbox.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let empty = || -> Result<Self> {
            let mut conn = Connection::open_in_memory().map_err(db_err(path))?;
            migrate(&mut conn, path)?;
            Ok(Self::reader(conn, path, false))
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return empty(),
            Err(source) => {
                return Err(OutboxError::Io {
                    what: "opening",
                    path: path.into(),
                    source,
                });
            }
        };
        // Probe the writer's lock, then close this file before SQLite opens its own (closing
        // a second descriptor of a file drops the process's POSIX locks on it, SQLite's too).
        let writer_running = matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock));
        drop(file);
        // On a read-only disk SQLite cannot create the WAL index; `immutable` tells it no
        // one can write there, which is then true.
        let conn = open_read_only_db(path, false).or_else(|_| open_read_only_db(path, true))?;
        let found = version(&conn, path)?;
        if found == 0 {
            // Created by a writer that has not yet written its schema.
            let mut outbox = empty()?;
            outbox.writer_running = writer_running;
            return Ok(outbox);
        }
        Ok(Self::reader(conn, path, writer_running))
    }

    fn reader(conn: Connection, path: &Path, writer_running: bool) -> Self {
        Self {
            conn,
            path: path.to_path_buf(),
            lock: None,
            writer_running,
            sent_seq: 0,
            #[cfg(test)]
            abort_before_commit: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything the status commands show, read in one statement (one snapshot).
    pub fn status(&self) -> Result<OutboxStatus> {
        let mut s = self
            .conn
            .query_row(
                "SELECT last_acked_seq, last_ack_at, connected, connected_changed_at,
                        last_error, last_error_at, telemetry_dropped,
                        (SELECT count(*) FROM telemetry),
                        (SELECT coalesce(sum(length(payload)), 0) FROM telemetry)
                 FROM state WHERE id = 1",
                [],
                |r| {
                    Ok(OutboxStatus {
                        connected: r.get(2)?,
                        writer_running: false,
                        connected_changed_at: r.get(3)?,
                        last_acked_seq: get_u64(r, 0)?,
                        last_ack_at: r.get(1)?,
                        telemetry_queued: get_u64(r, 7)?,
                        telemetry_queued_bytes: get_u64(r, 8)?,
                        telemetry_dropped: get_u64(r, 6)?,
                        last_error: r.get(4)?,
                        last_error_at: r.get(5)?,
                    })
                },
            )
            .map_err(db_err(&self.path))?;
        s.writer_running = self.writer_running;
        s.connected &= s.writer_running;
        Ok(s)
    }

    /// The audit upload cursor: every record up to it is stored at the hub.
    pub fn last_acked_seq(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT last_acked_seq FROM state WHERE id = 1", [], |r| {
                get_u64(r, 0)
            })
            .map_err(db_err(&self.path))
    }

    /// Records that audit records up to `last_seq` were handed to the link (in memory only;
    /// see the module header).
    pub fn note_sent(&mut self, last_seq: u64) {
        self.sent_seq = self.sent_seq.max(last_seq);
    }

    /// Forgets what was sent above the cursor, so it is sent again (after a reconnect, or
    /// when acks stopped coming): the next batch starts right after the cursor.
    pub fn rewind(&mut self) -> Result<u64> {
        self.rewind_to(u64::MAX)
    }

    /// Sets "sent" back to `seq`, at most the cursor: the next batch starts right after it.
    /// Below the cursor only when the hub no longer holds records it acknowledged (restored
    /// from an older copy): they are still in the audit log, so they go again; the cursor
    /// itself never moves back.
    pub fn rewind_to(&mut self, seq: u64) -> Result<u64> {
        let cursor = self.last_acked_seq()?;
        self.sent_seq = seq.min(cursor);
        Ok(self.sent_seq)
    }

    /// The highest audit seq sent by this process, or the cursor.
    pub fn sent_seq(&self) -> u64 {
        self.sent_seq
    }

    /// Applies the hub's ack of every record up to `acked_seq`.
    pub fn ack(&mut self, acked_seq: u64) -> Result<Acked> {
        let sent = self.sent_seq;
        let path = self.path.clone();
        self.write(|tx| {
            let cursor: u64 =
                tx.query_row("SELECT last_acked_seq FROM state WHERE id = 1", [], |r| {
                    get_u64(r, 0)
                })?;
            if acked_seq <= cursor {
                return Ok(Ok(Acked::Stale { cursor }));
            }
            if acked_seq > sent {
                return Ok(Err(OutboxError::AckBeyondSent {
                    path,
                    acked: acked_seq,
                    sent,
                }));
            }
            let to = i64::try_from(acked_seq).map_err(|_| out_of_range(acked_seq))?;
            tx.execute(
                "UPDATE state SET last_acked_seq = ?1, last_ack_at = ?2 WHERE id = 1",
                params![to, now_rfc3339()],
            )?;
            Ok(Ok(Acked::Advanced {
                from: cursor,
                to: acked_seq,
            }))
        })?
    }

    /// Queues a telemetry snapshot under `quota_bytes`, evicting the oldest first.
    pub fn push_telemetry(&mut self, payload: &[u8], quota_bytes: u64) -> Result<TelemetryPush> {
        self.write(|tx| {
            let len = payload.len() as u64;
            if len > quota_bytes {
                tx.execute(
                    "UPDATE state SET telemetry_dropped = telemetry_dropped + 1 WHERE id = 1",
                    [],
                )?;
                return Ok(TelemetryPush {
                    queued: false,
                    evicted: 0,
                });
            }
            tx.execute(
                "INSERT INTO telemetry (ts, payload) VALUES (?1, ?2)",
                params![now_rfc3339(), payload],
            )?;
            let total: i64 = tx.query_row(
                "SELECT coalesce(sum(length(payload)), 0) FROM telemetry",
                [],
                |r| r.get(0),
            )?;
            let mut over = (total as u64).saturating_sub(quota_bytes);
            let mut evicted = 0u64;
            let mut through = None;
            if over > 0 {
                // Oldest first; the row just inserted fits alone, so this stops before it.
                let mut stmt =
                    tx.prepare("SELECT id, length(payload) FROM telemetry ORDER BY id")?;
                let mut rows = stmt.query([])?;
                while over > 0 {
                    let Some(row) = rows.next()? else { break };
                    let id: i64 = row.get(0)?;
                    let len: i64 = row.get(1)?;
                    over = over.saturating_sub(len as u64);
                    evicted += 1;
                    through = Some(id);
                }
            }
            if let Some(id) = through {
                tx.execute("DELETE FROM telemetry WHERE id <= ?1", [id])?;
                tx.execute(
                    "UPDATE state SET telemetry_dropped = telemetry_dropped + ?1 WHERE id = 1",
                    [evicted as i64],
                )?;
            }
            Ok(TelemetryPush {
                queued: true,
                evicted,
            })
        })
    }

    /// Up to `limit` queued snapshots, oldest first.
    pub fn next_telemetry(&self, limit: usize) -> Result<Vec<QueuedTelemetry>> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT id, payload FROM telemetry ORDER BY id LIMIT ?1")
            .map_err(&err)?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(QueuedTelemetry {
                    id: r.get(0)?,
                    payload: r.get(1)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Removes the snapshots up to `through_id` (their PubAck arrived); returns how many.
    pub fn remove_telemetry(&mut self, through_id: i64) -> Result<usize> {
        self.write(|tx| tx.execute("DELETE FROM telemetry WHERE id <= ?1", [through_id]))
    }

    /// Records whether the link is connected (no write when it is unchanged).
    pub fn set_connected(&mut self, connected: bool) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE state SET connected = ?1, connected_changed_at = ?2
                 WHERE id = 1 AND (connected != ?1 OR connected_changed_at IS NULL)",
                params![connected, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Records the link's latest error (kept after a reconnect, with its time).
    pub fn set_error(&mut self, message: &str) -> Result<()> {
        let mut end = message.len().min(MAX_ERROR_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.write(|tx| {
            tx.execute(
                "UPDATE state SET last_error = ?1, last_error_at = ?2 WHERE id = 1",
                params![&message[..end], now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Records the desired state accepted for `target` (its version must be above the one
    /// stored: the trigger refuses anything else).
    pub fn accept_desired(&mut self, d: &AcceptedDesired) -> Result<()> {
        self.write(|tx| {
            let version = i64::try_from(d.version).map_err(|_| out_of_range(d.version))?;
            let rollout = i64::try_from(d.rollout).map_err(|_| out_of_range(d.rollout))?;
            tx.execute(
                "INSERT INTO desired (target, version, rollout, digest, doc_json, accepted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (target) DO UPDATE SET version = excluded.version,
                    rollout = excluded.rollout, digest = excluded.digest,
                    doc_json = excluded.doc_json, accepted_at = excluded.accepted_at",
                params![
                    d.target,
                    version,
                    rollout,
                    d.digest,
                    d.doc_json,
                    now_rfc3339()
                ],
            )?;
            Ok(())
        })
    }

    /// Every accepted desired state, by target.
    pub fn accepted_desired(&self) -> Result<Vec<AcceptedDesired>> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT target, version, rollout, digest, doc_json FROM desired ORDER BY target",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AcceptedDesired {
                    target: r.get(0)?,
                    version: get_u64(r, 1)?,
                    rollout: get_u64(r, 2)?,
                    digest: r.get(3)?,
                    doc_json: r.get(4)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Records how far the device got with `o.rollout` and `o.model` (replacing what was
    /// recorded for them), durably.
    pub fn set_rollout_outcome(&mut self, o: &RolloutOutcome) -> Result<()> {
        self.write(|tx| {
            let rollout = i64::try_from(o.rollout).map_err(|_| out_of_range(o.rollout))?;
            tx.execute(
                "INSERT INTO rollout_outcomes (rollout, model, state, reason, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (rollout, model) DO UPDATE SET state = excluded.state,
                    reason = excluded.reason, updated_at = excluded.updated_at",
                params![rollout, o.model, o.state, o.reason, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Records a download starting (or starting again): its row, replacing any other row for
    /// the same blob, with an empty bitmap, `downloading`, and `attempts`.
    pub fn start_transfer(&mut self, t: &TransferRow) -> Result<()> {
        let n = |v: u64| i64::try_from(v).map_err(|_| out_of_range(v));
        self.write(|tx| {
            let now = now_rfc3339();
            tx.execute(
                "INSERT OR REPLACE INTO transfers (sha256, rollout, model, size, chunk_size,
                    chunks, bitmap, state, reason, attempts, chunks_rejected, started_at,
                    updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
                params![
                    t.sha256,
                    n(t.rollout)?,
                    t.model,
                    n(t.size)?,
                    n(t.chunk_size)?,
                    n(t.chunks)?,
                    t.bitmap,
                    t.state,
                    t.reason,
                    n(t.attempts)?,
                    n(t.chunks_rejected)?,
                    now
                ],
            )?;
            Ok(())
        })
    }

    /// What was recorded for `rollout` and `model`, if anything.
    pub fn rollout_outcome(&self, rollout: u64, model: &str) -> Result<Option<RolloutOutcome>> {
        let err = db_err(&self.path);
        let id = i64::try_from(rollout).map_err(|_| err(out_of_range(rollout)))?;
        self.conn
            .query_row(
                "SELECT state, reason FROM rollout_outcomes WHERE rollout = ?1 AND model = ?2",
                params![id, model],
                |r| {
                    Ok(RolloutOutcome {
                        rollout,
                        model: model.to_string(),
                        state: r.get(0)?,
                        reason: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(&err)
    }

    /// Stores a download's bitmap and rejected-chunk count (one transaction, however many
    /// chunks it adds: the caller fsyncs the partial file first).
    pub fn save_chunks(&mut self, sha256: &str, bitmap: &[u8], rejected: u64) -> Result<()> {
        let rejected = i64::try_from(rejected).map_err(|_| out_of_range(rejected));
        self.write(|tx| {
            tx.execute(
                "UPDATE transfers SET bitmap = ?2, chunks_rejected = ?3, updated_at = ?4
                 WHERE sha256 = ?1",
                params![sha256, bitmap, rejected?, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Sets a download's state (`staged`, `failed` with a reason).
    pub fn set_transfer_state(
        &mut self,
        sha256: &str,
        state: &str,
        reason: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE transfers SET state = ?2, reason = ?3, updated_at = ?4 WHERE sha256 = ?1",
                params![sha256, state, reason, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// A download (or its outcome) now serves another rollout of the same blob.
    pub fn set_transfer_rollout(&mut self, sha256: &str, rollout: u64) -> Result<()> {
        let rollout = i64::try_from(rollout).map_err(|_| out_of_range(rollout));
        self.write(|tx| {
            tx.execute(
                "UPDATE transfers SET rollout = ?2, updated_at = ?3 WHERE sha256 = ?1",
                params![sha256, rollout?, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Every recorded download.
    pub fn transfers(&self) -> Result<Vec<TransferRow>> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT sha256, rollout, model, size, chunk_size, chunks, bitmap, state, reason,
                        attempts, chunks_rejected FROM transfers ORDER BY sha256",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TransferRow {
                    sha256: r.get(0)?,
                    rollout: get_u64(r, 1)?,
                    model: r.get(2)?,
                    size: get_u64(r, 3)?,
                    chunk_size: get_u64(r, 4)?,
                    chunks: get_u64(r, 5)?,
                    bitmap: r.get(6)?,
                    state: r.get(7)?,
                    reason: r.get(8)?,
                    attempts: get_u64(r, 9)?,
                    chunks_rejected: get_u64(r, 10)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits it.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T> {
        if self.lock.is_none() {
            return Err(OutboxError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let err = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let out = f(&tx).map_err(&err)?;
        #[cfg(test)]
        if self.abort_before_commit {
            std::process::abort();
        }
        tx.commit().map_err(&err)?;
        Ok(out)
    }
}

fn take_writer_lock(file: &File, path: &Path) -> Result<()> {
    // A status reader holds a shared lock for an instant; wait that out, not a daemon.
    for _ in 0..20 {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(25)),
            Err(TryLockError::Error(source)) => {
                return Err(OutboxError::Io {
                    what: "locking",
                    path: path.into(),
                    source,
                });
            }
        }
    }
    Err(OutboxError::Busy { path: path.into() })
}

/// Brings the file to [`CURRENT`] in one transaction; refuses a newer one.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let err = db_err(path);
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
fn version(conn: &Connection, path: &Path) -> Result<i64> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .optional()
        .map_err(db_err(path))?
        .unwrap_or(0);
    if (0..=CURRENT).contains(&found) {
        Ok(found)
    } else {
        Err(OutboxError::Schema {
            path: path.into(),
            found,
            known: CURRENT,
        })
    }
}

fn open_read_only_db(path: &Path, immutable: bool) -> Result<Connection> {
    open_read_only_sqlite(path, immutable).map_err(db_err(path))
}

/// A read-only connection to the SQLite file `path`, opened for real (SQLite opens lazily,
/// so a probe read shows a failure here). `immutable`: for a read-only disk, where SQLite
/// cannot create the WAL index and no one can write. Shared by `outbox.db` and `hub.db`.
pub(crate) fn open_read_only_sqlite(path: &Path, immutable: bool) -> rusqlite::Result<Connection> {
    // A URI, so `immutable` can be given; characters that mean something in a URI are escaped.
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    if immutable {
        uri.push_str("?immutable=1");
    }
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(conn)
}

fn get_u64(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Integer, Box::new(e))
    })
}

fn out_of_range(v: u64) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("{v} does not fit SQLite's integer").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` (`;`-separated steps) against the outbox at `dir/outbox.db` and compares
    /// what the steps said, one line each, with `expect`. Steps: `open` (a writer, beside any open one),
    /// `close`, `ro` (a read-only open, kept beside the writer), `sent N`, `ack N`, `quota N`,
    /// `push N` (an N-byte snapshot), `take` (queued ids), `remove ID`, `connected 0|1`,
    /// `error MSG`, `status` (the writer's, else the reader's), `ro-status`, `ro-ack N`.
    fn check(dir: &Path, script: &str, expect: &str) {
        let path = dir.join("outbox.db");
        let mut w: Option<Outbox> = None;
        let mut r: Option<Outbox> = None;
        let mut quota = u64::MAX;
        let mut out = Vec::new();
        fn show<T: std::fmt::Debug>(res: Result<T>) -> String {
            match res {
                Ok(v) => format!("{v:?}"),
                Err(e) => format!("err: {e}"),
            }
        }
        fn brief(s: Result<OutboxStatus>) -> String {
            match s {
                Ok(s) => format!(
                    "acked={} queued={}/{}B dropped={} connected={} writer={} error={:?}",
                    s.last_acked_seq,
                    s.telemetry_queued,
                    s.telemetry_queued_bytes,
                    s.telemetry_dropped,
                    s.connected,
                    s.writer_running,
                    s.last_error
                ),
                Err(e) => format!("err: {e}"),
            }
        }
        for step in script.split(';').map(str::trim) {
            let (op, arg) = step.split_once(' ').unwrap_or((step, ""));
            let n = || arg.parse::<u64>().unwrap();
            let line = match op {
                "open" => match Outbox::open(&path) {
                    Ok(o) => {
                        w = Some(o);
                        "opened".into()
                    }
                    Err(e) => format!("err: {e}"),
                },
                "close" => {
                    w = None;
                    "closed".into()
                }
                "ro" => match Outbox::open_read_only(&path) {
                    Ok(o) => {
                        r = Some(o);
                        "opened read-only".into()
                    }
                    Err(e) => format!("err: {e}"),
                },
                "sent" => {
                    let o = w.as_mut().unwrap();
                    o.note_sent(n());
                    format!("sent {}", o.sent_seq())
                }
                "rewind-to" => {
                    let o = w.as_mut().unwrap();
                    let r = o.rewind_to(n()).map(|s| format!("sent {s}"));
                    r.unwrap_or_else(|e| format!("err: {e}"))
                }
                "rewind" => {
                    let o = w.as_mut().unwrap();
                    let r = o
                        .rewind()
                        .map(|c| format!("rewound to {c}, sent {}", o.sent_seq()));
                    r.unwrap_or_else(|e| format!("err: {e}"))
                }
                "ack" => show(w.as_mut().unwrap().ack(n())),
                "ro-ack" => show(r.as_mut().unwrap().ack(n())),
                "quota" => {
                    quota = n();
                    format!("quota {quota}")
                }
                "push" => {
                    let payload = vec![b'x'; n() as usize];
                    show(w.as_mut().unwrap().push_telemetry(&payload, quota))
                }
                "take" => show(
                    w.as_ref()
                        .unwrap()
                        .next_telemetry(100)
                        .map(|q| q.iter().map(|t| t.id).collect::<Vec<_>>()),
                ),
                "remove" => show(w.as_mut().unwrap().remove_telemetry(arg.parse().unwrap())),
                "connected" => show(w.as_mut().unwrap().set_connected(arg == "1")),
                "error" => show(w.as_mut().unwrap().set_error(arg)),
                "status" => brief(w.as_ref().or(r.as_ref()).unwrap().status()),
                "ro-status" => brief(r.as_ref().unwrap().status()),
                other => panic!("unknown step {other}"),
            };
            out.push(line);
        }
        assert_eq!(out.join("\n"), expect.trim(), "script: {script}");
    }

    fn integrity(path: &Path) -> String {
        let c = Connection::open(path).unwrap();
        c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn the_cursor_only_moves_forward_on_acks_of_what_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display();
        check(
            dir.path(),
            "open; status; ack 1; sent 10; sent 4; ack 5; ack 3; ack 5; ack 11; status",
            &format!(
                "
opened
acked=0 queued=0/0B dropped=0 connected=false writer=true error=None
err: outbox {p}/outbox.db: an ack for audit seq 1 is above the highest seq sent (0); refused
sent 10
sent 10
Advanced {{ from: 0, to: 5 }}
Stale {{ cursor: 5 }}
Stale {{ cursor: 5 }}
err: outbox {p}/outbox.db: an ack for audit seq 11 is above the highest seq sent (10); refused
acked=5 queued=0/0B dropped=0 connected=false writer=true error=None"
            ),
        );
        // Across a reopen: the cursor is kept, and "sent" starts again at it.
        check(
            dir.path(),
            "open; status; ack 4; ack 6; sent 12; ack 12; sent 20; rewind; ack 15; sent 20; ack 15; rewind-to 9; ack 12; rewind-to 40; close; open; status",
            &format!(
                "
opened
acked=5 queued=0/0B dropped=0 connected=false writer=true error=None
Stale {{ cursor: 5 }}
err: outbox {p}/outbox.db: an ack for audit seq 6 is above the highest seq sent (5); refused
sent 12
Advanced {{ from: 5, to: 12 }}
sent 20
rewound to 12, sent 12
err: outbox {p}/outbox.db: an ack for audit seq 15 is above the highest seq sent (12); refused
sent 20
Advanced {{ from: 12, to: 15 }}
sent 9
Stale {{ cursor: 15 }}
sent 15
closed
opened
acked=15 queued=0/0B dropped=0 connected=false writer=true error=None"
            ),
        );
        // The database itself refuses to move the cursor back, whoever asks.
        let c = Connection::open(dir.path().join("outbox.db")).unwrap();
        let e = c
            .execute("UPDATE state SET last_acked_seq = 3", [])
            .unwrap_err();
        assert!(e.to_string().contains("never moves backwards"), "{e}");
    }

    #[test]
    fn telemetry_evicts_oldest_first_and_counts_drops() {
        let dir = tempfile::tempdir().unwrap();
        check(
            dir.path(),
            "open; quota 100; push 40; push 40; take; push 40; take; status;
             push 100; take; push 101; status; push 1; push 1; take; remove 6; take; status;
             close; open; status",
            "
opened
quota 100
TelemetryPush { queued: true, evicted: 0 }
TelemetryPush { queued: true, evicted: 0 }
[1, 2]
TelemetryPush { queued: true, evicted: 1 }
[2, 3]
acked=0 queued=2/80B dropped=1 connected=false writer=true error=None
TelemetryPush { queued: true, evicted: 2 }
[4]
TelemetryPush { queued: false, evicted: 0 }
acked=0 queued=1/100B dropped=4 connected=false writer=true error=None
TelemetryPush { queued: true, evicted: 1 }
TelemetryPush { queued: true, evicted: 0 }
[5, 6]
2
[]
acked=0 queued=0/0B dropped=5 connected=false writer=true error=None
closed
opened
acked=0 queued=0/0B dropped=5 connected=false writer=true error=None",
        );
    }

    #[test]
    fn read_only_opens_create_nothing_and_see_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        check(
            &missing,
            "ro; status; ro-ack 1",
            &format!(
                "
opened read-only
acked=0 queued=0/0B dropped=0 connected=false writer=false error=None
err: outbox {}/outbox.db is open read-only",
                missing.display()
            ),
        );
        assert!(!missing.exists(), "a read-only open created the folder");

        let p = dir.path().display();
        let long = "é".repeat(600);
        check(
            dir.path(),
            &format!(
                "open; connected 1; error broker: connection refused; sent 3; ack 3; quota 10;
                 push 4; ro; ro-status; ro-ack 3; error {long}"
            ),
            &format!(
                "
opened
()
()
sent 3
Advanced {{ from: 0, to: 3 }}
quota 10
TelemetryPush {{ queued: true, evicted: 0 }}
opened read-only
acked=3 queued=1/4B dropped=0 connected=true writer=true error=Some(\"broker: connection refused\")
err: outbox {p}/outbox.db is open read-only
()"
            ),
        );
        // The writer was dropped while connected (as a kill would leave it): the file still
        // says connected, but no writer holds it, so a reader does not report it.
        check(
            dir.path(),
            "ro; ro-status",
            &format!(
                "
opened read-only
acked=3 queued=1/4B dropped=0 connected=false writer=false error=Some(\"{}\")",
                "é".repeat(MAX_ERROR_LEN / 2)
            ),
        );
        // One writer at a time; a new one starts disconnected.
        check(
            dir.path(),
            "open; open; status",
            &format!(
                "
opened
err: outbox {p}/outbox.db is in use by another process (an outpost daemon already syncs this data directory)
acked=3 queued=1/4B dropped=0 connected=false writer=true error=Some(\"{}\")",
                "é".repeat(MAX_ERROR_LEN / 2)
            ),
        );
    }

    #[test]
    fn a_newer_schema_is_refused_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        check(dir.path(), "open; close", "opened\nclosed");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let refused = format!(
            "err: outbox {} has schema version 99, which this outpost does not know (it knows up to 4): a newer outpost wrote it; nothing was changed",
            path.display()
        );
        check(dir.path(), "open", &refused);
        check(dir.path(), "ro", &refused);
        let v: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 99);
    }

    #[test]
    fn accepted_desired_states_only_move_forward_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let row = |target: &str, version| AcceptedDesired {
            target: target.into(),
            version,
            rollout: version + 10,
            digest: format!("d{version}"),
            doc_json: format!("{{\"version\":{version}}}"),
        };
        {
            let mut o = Outbox::open(&path).unwrap();
            assert!(o.accepted_desired().unwrap().is_empty());
            o.accept_desired(&row("group:lab", 1)).unwrap();
            o.accept_desired(&row("group:lab", 3)).unwrap();
            o.accept_desired(&row("device:e1", 1)).unwrap();
            for stale in [3, 2] {
                let err = o.accept_desired(&row("group:lab", stale)).unwrap_err();
                assert!(err.to_string().contains("never moves backwards"), "{err}");
            }
        }
        let o = Outbox::open_read_only(&path).unwrap();
        assert_eq!(
            o.accepted_desired().unwrap(),
            [row("device:e1", 1), row("group:lab", 3)]
        );
        assert!(matches!(
            Outbox::open_read_only(&path)
                .unwrap()
                .accept_desired(&row("x", 9)),
            Err(OutboxError::ReadOnly { .. })
        ));
    }

    #[test]
    fn rollout_outcomes_are_kept_per_rollout_and_model_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let outcome = |rollout, model: &str, state: &str, reason: Option<&str>| RolloutOutcome {
            rollout,
            model: model.into(),
            state: state.into(),
            reason: reason.map(Into::into),
        };
        {
            let mut o = Outbox::open(&path).unwrap();
            assert_eq!(o.rollout_outcome(7, "m:2").unwrap(), None);
            o.set_rollout_outcome(&outcome(7, "m:2", "activating", None))
                .unwrap();
            o.set_rollout_outcome(&outcome(7, "m:2", "failed", Some("NaN")))
                .unwrap();
            o.set_rollout_outcome(&outcome(8, "m:2", "active", None))
                .unwrap();
        }
        let o = Outbox::open_read_only(&path).unwrap();
        assert_eq!(
            o.rollout_outcome(7, "m:2").unwrap(),
            Some(outcome(7, "m:2", "failed", Some("NaN")))
        );
        assert_eq!(
            o.rollout_outcome(8, "m:2").unwrap(),
            Some(outcome(8, "m:2", "active", None))
        );
        assert_eq!(o.rollout_outcome(7, "m:3").unwrap(), None);
    }

    #[test]
    fn a_transfer_bitmap_survives_reopening_and_a_new_attempt_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let mut row = TransferRow {
            sha256: "ab".repeat(32),
            rollout: 4,
            model: "m:1".into(),
            size: 20 * 100 + 7,
            chunk_size: 100,
            chunks: 21,
            bitmap: TransferRow::empty_bitmap(21),
            state: "downloading".into(),
            reason: None,
            attempts: 1,
            chunks_rejected: 0,
        };
        assert_eq!(row.bitmap.len(), 3);
        {
            let mut o = Outbox::open(&path).unwrap();
            o.start_transfer(&row).unwrap();
            for i in [0, 7, 8, 20, 99] {
                row.set(i);
            }
            o.save_chunks(&row.sha256, &row.bitmap, 2).unwrap();
        }
        let mut o = Outbox::open(&path).unwrap();
        let back = o.transfers().unwrap().pop().unwrap();
        let done: Vec<u64> = (0..21).filter(|&i| back.has(i)).collect();
        assert_eq!(done, [0, 7, 8, 20]);
        assert_eq!(
            (back.done(), back.chunks_rejected, back.has(99)),
            (4, 2, false)
        );
        o.set_transfer_state(&row.sha256, "failed", Some("whole hash"))
            .unwrap();
        let failed = o.transfers().unwrap().pop().unwrap();
        assert_eq!(
            (failed.state.as_str(), failed.reason.as_deref()),
            ("failed", Some("whole hash"))
        );
        // Starting again replaces the row: nothing done, one more attempt.
        row.bitmap = TransferRow::empty_bitmap(21);
        row.attempts = 2;
        o.start_transfer(&row).unwrap();
        let again = Outbox::open_read_only(&path).unwrap().transfers().unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].done(), again[0].attempts), (0, 2));
        assert_eq!(integrity(&path), "ok");
    }

    #[test]
    fn a_transaction_cut_short_leaves_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        check(
            dir.path(),
            "open; sent 9; ack 4; push 10; close",
            "opened\nsent 9\nAdvanced { from: 0, to: 4 }\nTelemetryPush { queued: true, evicted: 0 }\nclosed",
        );
        // A connection dropped inside a transaction (its changes never committed).
        {
            let mut c = Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute("UPDATE state SET last_acked_seq = 9", [])
                .unwrap();
            tx.execute("DELETE FROM telemetry", []).unwrap();
            drop(tx);
        }
        let old = "acked=4 queued=1/10B dropped=0 connected=false writer=true error=None";
        check(dir.path(), "open; status", &format!("opened\n{old}"));

        // A process killed inside a write transaction, after its changes reached the WAL
        // (a 4 MiB snapshot through a tiny page cache spills), and one killed just after a
        // commit: the old state, then the new one.
        for (mode, expect) in [
            ("before", old.to_string()),
            (
                "after",
                "acked=9 queued=1/10B dropped=1 connected=false writer=true error=None".into(),
            ),
        ] {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "outbox::tests::crash_child", "--ignored"])
                .args(["--test-threads=1", "--nocapture"])
                .env(
                    "OUTPOST_TEST_OUTBOX_CRASH",
                    format!("{mode}:{}", path.display()),
                )
                .output()
                .unwrap();
            assert!(
                !status.status.success(),
                "the child did not crash: {}",
                String::from_utf8_lossy(&status.stdout)
            );
            if mode == "before" {
                // The uncommitted changes did reach the disk.
                let wal = std::fs::metadata(dir.path().join("outbox.db-wal")).unwrap();
                assert!(wal.len() > 4 << 20, "WAL of {} bytes", wal.len());
            }
            assert_eq!(integrity(&path), "ok");
            check(dir.path(), "open; status", &format!("opened\n{expect}"));
        }
    }

    /// Run by `a_transaction_cut_short_leaves_the_old_state` in a child process, which it
    /// aborts mid-transaction or just after a commit.
    #[test]
    #[ignore = "run as a child process by a_transaction_cut_short_leaves_the_old_state"]
    fn crash_child() {
        let Ok(arg) = std::env::var("OUTPOST_TEST_OUTBOX_CRASH") else {
            return;
        };
        let (mode, path) = arg.split_once(':').unwrap();
        let mut o = Outbox::open(Path::new(path)).unwrap();
        o.conn.pragma_update(None, "cache_size", 2).unwrap();
        o.note_sent(9);
        let big = vec![b'y'; 4 << 20];
        if mode == "before" {
            o.abort_before_commit = true;
            let _ = o.push_telemetry(&big, 8 << 20);
            unreachable!("the transaction aborts the process");
        }
        o.ack(9).unwrap();
        o.push_telemetry(&[b'z'; 10], 10).unwrap();
        std::process::abort();
    }
}
