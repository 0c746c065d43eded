//! The append side: [`AuditLog`], a handle to one writer thread per process, which chains,
//! hashes, inserts and signs checkpoints.
//!
//! Storage rules:
//! - One writer thread per process owns the write connection and commits in groups: every
//!   append waiting when it wakes goes into one transaction (`synchronous = FULL`), and each
//!   caller is answered only after that commit, so an acknowledged record is durable.
//! - Each transaction reads the chain's tail inside `BEGIN IMMEDIATE`, so several processes
//!   (the daemon, a CLI command) append to one chain without forking it.
//! - Canonical `roles` and `details` are computed on the caller's thread; the writer only
//!   chains, hashes and inserts.
//! - Checkpoints are written every `checkpoint_every` records (a commit never crosses that
//!   boundary, so they fall every N records exactly), every `checkpoint_interval` when records
//!   arrived meanwhile, and when the log is closed (the agent stops).
//! - Opening migrates the file to the current schema (see `schema`) before the first append.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::record::{GENESIS, RowRef, capped_details, hash_hex, now_rfc3339, write_canonical_body};
use super::{AuditError, Checkpoint, Entry, Record, schema, store_err};
use crate::jcs;
use crate::signing::{KeyPair, PublicKey};

/// Most appends committed in one transaction.
const MAX_BATCH: usize = 8192;

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

/// Why [`AuditLog::try_submit`] did not queue an entry (which it gives back).
#[derive(Debug, thiserror::Error)]
pub enum Unqueued {
    #[error("the audit writer's queue is full")]
    Full(Box<Entry>),
    #[error("the audit writer has stopped")]
    Closed(Box<Entry>),
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
        let mut conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(&err)?;
        // A file from a newer Outpost is refused before anything in it changes.
        schema::version(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        schema::migrate(&mut conn, path)?;
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

    /// Queues an append without ever waiting, for callers on async worker threads: refused
    /// when the writer's queue is full or the writer is gone; the caller counts and logs
    /// that, and the entry is returned to it.
    pub fn try_submit(&self, entry: Entry) -> Result<Pending, Unqueued> {
        let Some(tx) = &self.tx else {
            return Err(Unqueued::Closed(Box::new(entry)));
        };
        let (reply, rx) = mpsc::sync_channel(1);
        // A refused message is handed back by the channel: its entry goes back to the caller.
        let returned = |msg: Msg| match msg {
            Msg::Append(p, _) => Box::new(p.entry),
            // Only an append was sent; this arm cannot be reached.
            Msg::Checkpoint(_) => Box::new(Entry::new("", "", super::Outcome::Failure, "")),
        };
        match tx.try_send(Msg::Append(Box::new(Prepared::new(entry)), reply)) {
            Ok(()) => Ok(Pending {
                rx,
                path: self.path.clone(),
            }),
            Err(mpsc::TrySendError::Full(m)) => Err(Unqueued::Full(returned(m))),
            Err(mpsc::TrySendError::Disconnected(m)) => Err(Unqueued::Closed(returned(m))),
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
