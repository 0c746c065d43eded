//! The audit log: `<data>/audit.db`, a SHA-256 hash chain with Ed25519-signed checkpoints.
//!
//! Format (also in `docs/audit-format.md`, for auditors):
//! - A record has exactly the fields `seq`, `ts`, `device_id`, `actor`, `roles`, `action`,
//!   `resource`, `outcome`, `reason`, `request_id`, `policy_version`, `details`, `prev_hash`,
//!   `hash`; absent values are `null`, never missing. `hash` is
//!   `hex(SHA-256(JCS(record without "hash")))` (JCS: RFC 8785); `prev_hash` is the previous
//!   record's `hash`, 64 zeros for seq 1. Seqs start at 1 and have no gaps.
//! - A checkpoint signs `JCS({"device_id", "seq", "hash", "ts"})` (the record `seq`'s hash)
//!   with the device key; it is stored with the signature and the public key, both hex.
//!
//! Storage rules:
//! - One writer thread per process owns the write connection and commits in groups: every
//!   append waiting when it wakes goes into one transaction (`synchronous = FULL`), and each
//!   caller is answered only after that commit, so an acknowledged record is durable.
//! - Each transaction reads the chain's tail inside `BEGIN IMMEDIATE`, so several processes
//!   (the daemon, a CLI command) append to one chain without forking it.
//! - Triggers make UPDATE and DELETE fail on records and checkpoints. (Someone with the file
//!   can drop them; that is what the chain and the checkpoints are for.)
//! - Checkpoints are written every `checkpoint_every` records, every `checkpoint_interval`
//!   when records arrived meanwhile, and when the log is closed (the agent stops).

mod export;
mod verify;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jcs;
use crate::signing::{KeyPair, PublicKey};

pub use export::{Format, export};
pub use verify::{VerifyReport, verify_export, verify_log};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Largest `details`, as canonical JSON; larger ones are replaced by a digest.
pub const MAX_DETAILS: usize = 4096;
/// Most appends committed in one transaction.
const MAX_BATCH: usize = 8192;

const SCHEMA: &str = r#"
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
"#;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {message}", path.display())]
    Store { path: PathBuf, message: String },
    #[error("audit log {}: the writer has stopped", .0.display())]
    Closed(PathBuf),
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

/// How a decision or an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Outcome::Allowed,
            Outcome::Denied,
            Outcome::Success,
            Outcome::Failure,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// What a caller asks to record; the log adds seq, time, device and the chain.
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub roles: Vec<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: Outcome,
    pub reason: String,
    pub request_id: Option<String>,
    pub policy_version: Option<u64>,
    /// A JSON object; prompts never go here, only their SHA-256 and token counts.
    pub details: serde_json::Value,
}

impl Entry {
    pub fn new(actor: &str, action: &str, outcome: Outcome, reason: &str) -> Self {
        Self {
            actor: actor.into(),
            roles: Vec::new(),
            action: action.into(),
            resource: None,
            outcome,
            reason: reason.into(),
            request_id: None,
            policy_version: None,
            details: serde_json::Value::Object(Default::default()),
        }
    }
}

/// A record as stored and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub device_id: String,
    pub actor: String,
    pub roles: Vec<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: Outcome,
    pub reason: String,
    pub request_id: Option<String>,
    pub policy_version: Option<u64>,
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// Canonical JSON of a record without its hash, with `details` given as canonical text.
/// Keys are written in RFC 8785 order by hand (they are fixed), which is what makes appending
/// and verifying fast; a test holds this equal to the generic canonicalizer.
fn canonical_body(r: &RowRef<'_>) -> String {
    let mut s = String::with_capacity(512 + r.details.len());
    write_canonical_body(&mut s, r);
    s
}

/// [`canonical_body`] into `s` (cleared first), so hot loops reuse one buffer.
fn write_canonical_body(s: &mut String, r: &RowRef<'_>) {
    s.clear();
    let s = &mut *s;
    let opt = |s: &mut String, v: Option<&str>| match v {
        Some(v) => jcs::push_str(s, v),
        None => s.push_str("null"),
    };
    s.push_str("{\"action\":");
    jcs::push_str(s, r.action);
    s.push_str(",\"actor\":");
    jcs::push_str(s, r.actor);
    s.push_str(",\"details\":");
    s.push_str(r.details);
    s.push_str(",\"device_id\":");
    jcs::push_str(s, r.device_id);
    s.push_str(",\"outcome\":");
    jcs::push_str(s, r.outcome);
    s.push_str(",\"policy_version\":");
    match r.policy_version {
        Some(v) => {
            let _ = write!(s, "{v}");
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"prev_hash\":");
    jcs::push_str(s, r.prev_hash);
    s.push_str(",\"reason\":");
    jcs::push_str(s, r.reason);
    s.push_str(",\"request_id\":");
    opt(s, r.request_id);
    s.push_str(",\"resource\":");
    opt(s, r.resource);
    s.push_str(",\"roles\":");
    s.push_str(r.roles);
    s.push_str(",\"seq\":");
    let _ = write!(s, "{}", r.seq);
    s.push_str(",\"ts\":");
    jcs::push_str(s, r.ts);
    s.push('}');
}

/// Borrowed view of a record's fields, `roles` and `details` as canonical JSON text.
struct RowRef<'a> {
    seq: u64,
    ts: &'a str,
    device_id: &'a str,
    actor: &'a str,
    roles: &'a str,
    action: &'a str,
    resource: Option<&'a str>,
    outcome: &'a str,
    reason: &'a str,
    request_id: Option<&'a str>,
    policy_version: Option<u64>,
    details: &'a str,
    prev_hash: &'a str,
}

fn hash_hex(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

impl Record {
    /// The hash this record's contents give (what `hash` must be).
    pub fn compute_hash(&self) -> String {
        let details = jcs::to_string(&self.details).unwrap_or_default();
        let roles = jcs::to_string(&self.roles).unwrap_or_default();
        hash_hex(&canonical_body(&self.as_row(&roles, &details)))
    }

    fn as_row<'a>(&'a self, roles: &'a str, details: &'a str) -> RowRef<'a> {
        RowRef {
            seq: self.seq,
            ts: &self.ts,
            device_id: &self.device_id,
            actor: &self.actor,
            roles,
            action: &self.action,
            resource: self.resource.as_deref(),
            outcome: self.outcome.as_str(),
            reason: &self.reason,
            request_id: self.request_id.as_deref(),
            policy_version: self.policy_version,
            details,
            prev_hash: &self.prev_hash,
        }
    }
}

/// A signed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub device_id: String,
    pub seq: u64,
    pub hash: String,
    pub ts: String,
    pub public_key: String,
    pub signature: String,
}

impl Checkpoint {
    /// The bytes the signature covers: `JCS({"device_id","hash","seq","ts"})`.
    pub fn signed_message(&self) -> String {
        let mut s = String::from("{\"device_id\":");
        jcs::push_str(&mut s, &self.device_id);
        s.push_str(",\"hash\":");
        jcs::push_str(&mut s, &self.hash);
        s.push_str(",\"seq\":");
        s.push_str(&self.seq.to_string());
        s.push_str(",\"ts\":");
        jcs::push_str(&mut s, &self.ts);
        s.push('}');
        s
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    format_ts(time::OffsetDateTime::now_utc())
}

pub fn format_ts(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// When and how often checkpoints are signed.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub device_id: String,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
}

impl AuditSettings {
    pub fn new(device_id: &str) -> Self {
        Self {
            device_id: device_id.into(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(300),
        }
    }
}

type Reply<T> = SyncSender<Result<T, AuditError>>;

/// An entry with its canonical parts computed on the caller's thread, so the single writer
/// thread only chains, hashes and inserts.
struct Prepared {
    entry: Entry,
    roles: String,
    details: String,
}

impl Prepared {
    fn new(mut entry: Entry) -> Self {
        let (value, details) = capped_details(std::mem::take(&mut entry.details));
        entry.details = value;
        let roles = jcs::to_string(&entry.roles).unwrap_or_else(|_| "[]".into());
        Self {
            entry,
            roles,
            details,
        }
    }
}

enum Msg {
    Append(Box<Prepared>, Reply<Record>),
    Checkpoint(Reply<Option<Checkpoint>>),
}

/// An append in flight; [`Pending::wait`] returns once it is durable.
pub struct Pending {
    rx: Receiver<Result<Record, AuditError>>,
    path: PathBuf,
}

impl Pending {
    pub fn wait(self) -> Result<Record, AuditError> {
        self.rx.recv().unwrap_or(Err(AuditError::Closed(self.path)))
    }
}

/// The append side of the log: a handle to the writer thread.
pub struct AuditLog {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    public_key: PublicKey,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditLog({})", self.path.display())
    }
}

impl AuditLog {
    /// Opens (creating) the log at `path` and starts its writer thread.
    pub fn open(path: &Path, key: KeyPair, settings: AuditSettings) -> Result<Self, AuditError> {
        let err = store_err(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AuditError::Store {
                path: path.into(),
                message: e.to_string(),
            })?;
            // SQLite says "unable to open database file" on a read-only disk; say what it is.
            tempfile::tempfile_in(dir).map_err(|e| AuditError::Store {
                path: path.into(),
                message: format!("cannot write to {}: {e}", dir.display()),
            })?;
        }
        let conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(&err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.execute_batch(SCHEMA).map_err(&err)?;
        let public_key = key.public();
        let (tx, rx) = mpsc::sync_channel(MAX_BATCH);
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            key,
            settings,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Store {
                path: path.into(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            path: path.to_path_buf(),
            public_key,
        })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Queues an append; wait on the result for durability. Many queued appends share one
    /// commit.
    pub fn submit(&self, entry: Entry) -> Pending {
        let (reply, rx) = mpsc::sync_channel(1);
        if let Some(tx) = &self.tx {
            // A send error means the writer is gone; `wait` then reports it.
            let _ = tx.send(Msg::Append(Box::new(Prepared::new(entry)), reply));
        }
        Pending {
            rx,
            path: self.path.clone(),
        }
    }

    /// Appends and returns once the record is durable.
    pub fn append(&self, entry: Entry) -> Result<Record, AuditError> {
        self.submit(entry).wait()
    }

    /// Signs a checkpoint of the chain's current tail now (None if the chain is empty or
    /// the tail is already checkpointed).
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| AuditError::Closed(self.path.clone()))?;
        tx.send(Msg::Checkpoint(reply))
            .map_err(|_| AuditError::Closed(self.path.clone()))?;
        rx.recv()
            .unwrap_or_else(|_| Err(AuditError::Closed(self.path.clone())))
    }

    /// Stops the writer after a final checkpoint.
    pub fn close(mut self) -> Result<Option<Checkpoint>, AuditError> {
        let cp = self.checkpoint();
        self.shutdown();
        cp
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let _ = self.checkpoint();
        }
        self.shutdown();
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    key: KeyPair,
    settings: AuditSettings,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let wait = self
                .settings
                .checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed());
            let first = match rx.recv_timeout(wait) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    if self.since_checkpoint > 0 {
                        let _ = self.write_checkpoint();
                    }
                    self.last_checkpoint = Instant::now();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // A commit never crosses a checkpoint boundary, so checkpoints fall every
            // `checkpoint_every` records exactly.
            let room = self
                .settings
                .checkpoint_every
                .saturating_sub(self.since_checkpoint)
                .clamp(1, MAX_BATCH as u64) as usize;
            let mut appends = Vec::new();
            let mut controls = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Append(e, r) => appends.push((*e, r)),
                    Msg::Checkpoint(r) => controls.push(r),
                }
                if appends.len() < room {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                let (entries, replies): (Vec<_>, Vec<_>) = appends.into_iter().unzip();
                match self.write_batch(entries) {
                    Ok(records) => {
                        self.since_checkpoint += records.len() as u64;
                        for (r, reply) in records.into_iter().zip(replies) {
                            let _ = reply.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
                if self.since_checkpoint >= self.settings.checkpoint_every {
                    let _ = self.write_checkpoint();
                }
            }
            for reply in controls {
                let _ = reply.send(self.write_checkpoint());
            }
        }
    }

    fn write_batch(&mut self, entries: Vec<Prepared>) -> Result<Vec<Record>, AuditError> {
        let err = store_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let tail: Option<(u64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(&err)?;
        let (mut seq, mut prev) = tail.unwrap_or((0, GENESIS.to_string()));
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO records (seq, ts, device_id, actor, roles, action, resource,
                        outcome, reason, request_id, policy_version, details, prev_hash, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(&err)?;
            let ts = now_rfc3339();
            let mut body = String::with_capacity(1024);
            for p in entries {
                let Prepared {
                    entry: e,
                    roles,
                    details,
                } = p;
                seq += 1;
                let row = RowRef {
                    seq,
                    ts: &ts,
                    device_id: &self.settings.device_id,
                    actor: &e.actor,
                    roles: &roles,
                    action: &e.action,
                    resource: e.resource.as_deref(),
                    outcome: e.outcome.as_str(),
                    reason: &e.reason,
                    request_id: e.request_id.as_deref(),
                    policy_version: e.policy_version,
                    details: &details,
                    prev_hash: &prev,
                };
                write_canonical_body(&mut body, &row);
                let hash = hash_hex(&body);
                stmt.execute(params![
                    seq as i64,
                    ts,
                    self.settings.device_id,
                    e.actor,
                    roles,
                    e.action,
                    e.resource,
                    e.outcome.as_str(),
                    e.reason,
                    e.request_id,
                    e.policy_version.map(|v| v as i64),
                    details,
                    prev,
                    hash
                ])
                .map_err(&err)?;
                out.push(Record {
                    seq,
                    ts: ts.clone(),
                    device_id: self.settings.device_id.clone(),
                    actor: e.actor,
                    roles: e.roles,
                    action: e.action,
                    resource: e.resource,
                    outcome: e.outcome,
                    reason: e.reason,
                    request_id: e.request_id,
                    policy_version: e.policy_version,
                    details: e.details,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                });
            }
        }
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    fn write_checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        let err = store_err(&self.path);
        let tail: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&err)?;
        let Some((seq, hash)) = tail else {
            return Ok(None);
        };
        let mut cp = Checkpoint {
            device_id: self.settings.device_id.clone(),
            seq: seq as u64,
            hash,
            ts: now_rfc3339(),
            public_key: self.key.public_hex(),
            signature: String::new(),
        };
        cp.signature = self.key.sign_hex(cp.signed_message().as_bytes());
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO checkpoints (seq, hash, ts, device_id, public_key, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![seq, cp.hash, cp.ts, cp.device_id, cp.public_key, cp.signature],
            )
            .map_err(&err)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok((inserted == 1).then_some(cp))
    }
}

/// Details as a value and as canonical text, replaced by a digest when over [`MAX_DETAILS`]
/// or not an object.
fn capped_details(details: serde_json::Value) -> (serde_json::Value, String) {
    let text = jcs::to_string(&details).unwrap_or_else(|_| "{}".into());
    if details.is_object() && text.len() <= MAX_DETAILS {
        return (details, text);
    }
    let v = serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "original_sha256": hash_hex(&text),
    });
    let t = jcs::to_string(&v).unwrap_or_else(|_| "{}".into());
    (v, t)
}

/// Filters for reading the log.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since: Option<String>,
    pub until: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    /// Only records with a larger seq (cursor paging).
    pub after_seq: Option<u64>,
    pub limit: Option<u64>,
    /// The newest `limit` records (still returned oldest first).
    pub newest: bool,
}

/// The read side: opens `audit.db` read-only, changes nothing.
pub struct AuditReader {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for AuditReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditReader({})", self.path.display())
    }
}

const RECORD_COLUMNS: &str = "seq, ts, device_id, actor, roles, action, resource, outcome, \
    reason, request_id, policy_version, details, prev_hash, hash";

impl AuditReader {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if !path.exists() {
            return Err(AuditError::Store {
                path: path.into(),
                message: "no audit log here (nothing has been recorded yet)".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(store_err(path))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(store_err(path))?;
        Ok(Self {
            conn,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records matching `q`, oldest first.
    pub fn query(&self, q: &Query) -> Result<Vec<Record>, AuditError> {
        let mut out = Vec::new();
        self.for_each(q, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Streams records matching `q`, oldest first, without holding them all.
    pub fn for_each(
        &self,
        q: &Query,
        mut f: impl FnMut(Record) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let err = store_err(&self.path);
        let mut clauses = vec!["1 = 1".to_string()];
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            clauses.push(format!("{clause} ?{}", args.len()));
        };
        if let Some(s) = &q.since {
            add("ts >=", s.clone().into());
        }
        if let Some(u) = &q.until {
            add("ts <", u.clone().into());
        }
        if let Some(a) = &q.actor {
            add("actor =", a.clone().into());
        }
        if let Some(a) = &q.action {
            add("action =", a.clone().into());
        }
        if let Some(o) = q.outcome {
            add("outcome =", o.as_str().to_string().into());
        }
        if let Some(s) = q.after_seq {
            add("seq >", (s as i64).into());
        }
        let order = if q.newest { "DESC" } else { "ASC" };
        let limit = q.limit.map_or(-1, |l| l as i64);
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE {} ORDER BY seq {order} LIMIT {limit}",
            clauses.join(" AND ")
        );
        let mut stmt = self.conn.prepare(&sql).map_err(&err)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args)).map_err(&err)?;
        let mut newest_first = Vec::new();
        while let Some(row) = rows.next().map_err(&err)? {
            let r = record_from_row(row).map_err(&err)?;
            if q.newest {
                newest_first.push(r);
            } else {
                f(r)?;
            }
        }
        for r in newest_first.into_iter().rev() {
            f(r)?;
        }
        Ok(())
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device_id, seq, hash, ts, public_key, signature FROM checkpoints
                 ORDER BY seq",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    device_id: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    hash: r.get(2)?,
                    ts: r.get(3)?,
                    public_key: r.get(4)?,
                    signature: r.get(5)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Every row as stored, borrowed from SQLite (no copies), for verification.
    fn for_each_raw(
        &self,
        mut f: impl FnMut(&RawRecord<'_>) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let err = store_err(&self.path);
        let sql = format!("SELECT {RECORD_COLUMNS} FROM records ORDER BY seq");
        let mut stmt = self.conn.prepare(&sql).map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let text = |i: usize| -> Result<&str, AuditError> {
                row.get_ref(i)
                    .and_then(|v| v.as_str().map_err(Into::into))
                    .map_err(&err)
            };
            let opt_text = |i: usize| -> Result<Option<&str>, AuditError> {
                row.get_ref(i)
                    .and_then(|v| v.as_str_or_null().map_err(Into::into))
                    .map_err(&err)
            };
            let raw = RawRecord {
                seq: row.get::<_, i64>(0).map_err(&err)?,
                ts: text(1)?,
                device_id: text(2)?,
                actor: text(3)?,
                roles: text(4)?,
                action: text(5)?,
                resource: opt_text(6)?,
                outcome: text(7)?,
                reason: text(8)?,
                request_id: opt_text(9)?,
                policy_version: row.get(10).map_err(&err)?,
                details: text(11)?,
                prev_hash: text(12)?,
                hash: text(13)?,
            };
            f(&raw)?;
        }
        Ok(())
    }
}

/// A row as stored, before any interpretation (verification must not trust types).
struct RawRecord<'a> {
    seq: i64,
    ts: &'a str,
    device_id: &'a str,
    actor: &'a str,
    roles: &'a str,
    action: &'a str,
    resource: Option<&'a str>,
    outcome: &'a str,
    reason: &'a str,
    request_id: Option<&'a str>,
    policy_version: Option<i64>,
    details: &'a str,
    prev_hash: &'a str,
    hash: &'a str,
}

impl RawRecord<'_> {
    /// Whether this row's contents give its stored hash; `buf` is scratch space.
    fn hash_matches(&self, buf: &mut String) -> Result<bool, String> {
        let seq = u64::try_from(self.seq).map_err(|_| "negative seq".to_string())?;
        let policy_version = self
            .policy_version
            .map(u64::try_from)
            .transpose()
            .map_err(|_| "negative policy_version".to_string())?;
        let mut row = RowRef {
            seq,
            ts: self.ts,
            device_id: self.device_id,
            actor: self.actor,
            roles: self.roles,
            action: self.action,
            resource: self.resource,
            outcome: self.outcome,
            reason: self.reason,
            request_id: self.request_id,
            policy_version,
            details: self.details,
            prev_hash: self.prev_hash,
        };
        // Fast path: the stored roles and details are the canonical text the writer hashed.
        write_canonical_body(buf, &row);
        if hash_equals(buf, self.hash) {
            return Ok(true);
        }
        // They may be equivalent JSON spelt differently: canonicalize and retry.
        let roles: Vec<String> =
            serde_json::from_str(self.roles).map_err(|e| format!("roles are not a list: {e}"))?;
        let details: serde_json::Value =
            serde_json::from_str(self.details).map_err(|e| format!("details are not JSON: {e}"))?;
        let roles = jcs::to_string(&roles).map_err(|e| e.to_string())?;
        let details = jcs::to_string(&details).map_err(|e| e.to_string())?;
        row.roles = &roles;
        row.details = &details;
        write_canonical_body(buf, &row);
        Ok(hash_equals(buf, self.hash))
    }
}

/// Whether SHA-256 of `body` is the lowercase hex `expected`, without allocating.
fn hash_equals(body: &str, expected: &str) -> bool {
    let mut hex_buf = [0u8; 64];
    let digest = Sha256::digest(body.as_bytes());
    hex::encode_to_slice(digest, &mut hex_buf).is_ok() && hex_buf == expected.as_bytes()
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let roles: String = row.get(4)?;
    let outcome: String = row.get(7)?;
    let details: String = row.get(11)?;
    Ok(Record {
        seq: row.get::<_, i64>(0)? as u64,
        ts: row.get(1)?,
        device_id: row.get(2)?,
        actor: row.get(3)?,
        roles: serde_json::from_str(&roles).map_err(|e| bad(4, e.to_string()))?,
        action: row.get(5)?,
        resource: row.get(6)?,
        outcome: Outcome::parse(&outcome).ok_or_else(|| bad(7, format!("outcome {outcome:?}")))?,
        reason: row.get(8)?,
        request_id: row.get(9)?,
        policy_version: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        details: serde_json::from_str(&details).map_err(|e| bad(11, e.to_string()))?,
        prev_hash: row.get(12)?,
        hash: row.get(13)?,
    })
}

#[cfg(test)]
mod tests;
