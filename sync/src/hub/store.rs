//! The hub's store: the [`HubStore`] trait, [`StoreConfig`] (which store a command opens)
//! and the SQLite backend, `<data_dir>/hub.db` (the only module that opens it); the
//! PostgreSQL backend is [`pg`], on the same tables.
//!
//! Format (schema version in `PRAGMA user_version`, migrations in [`MIGRATIONS`], applied in
//! one transaction each; a newer version is refused untouched). The SQL is kept portable
//! (plain types, no SQLite-only syntax in the tables): [`pg`] runs the same migrations, so
//! every new one must run on both databases:
//! - `devices(id, audit_key, enrolled_at, enrolled_by, online, last_seen, agent_version,
//!   active_model, acked_seq)`: one row per enrolled device; `audit_key` is the hex Ed25519
//!   key its checkpoints are verified with; the link columns stay null until `serve`.
//! - `device_groups(device_id, group_id)`.
//! - `audit_records(device_id, seq, record_json, hash, received_at, ts, actor, action,
//!   outcome)`, primary key `(device_id, seq)`: the cloud copy of each device's chain;
//!   `record_json` is the policy crate's `Record` as serde writes it, the last four columns
//!   copy its fields for the query filters.
//! - `audit_checkpoints(device_id, seq, checkpoint_json, received_at)`: the device's signed
//!   checkpoints (`Checkpoint` as serde writes it) that the hub verified.
//! - `audit_alerts(device_id, at, kind, seq, detail)`: breaks, forks, truncations and forged
//!   checkpoints the hub saw, and a hub found behind a device (kept: they are evidence).
//! - `devices` also keeps the device's last reported audit seq, its reported state and its
//!   last telemetry snapshot (JSON, as received).
//! - Releases (schema 3, [`releases`]): `models(name, version, release_no, sha256, size,
//!   manifest_json, published_at, published_by)` (the signed manifests `models publish`
//!   made; the blobs are files under `<data_dir>/blobs/sha256/`), `rollouts(id, model,
//!   target, alias, activate, batch_percent, max_failures, state, created_at, created_by)`
//!   and `desired_docs(target, version, rollout_id, doc_json, created_at)`: every signed
//!   desired state, `version` counted per target (the newest is what `serve` publishes).
//! - Phased rollouts (schema 4): `desired_docs.batch` (0, 1, … in the order a phased
//!   rollout releases them; 0 for the rest) and `released` (1 once `serve` may publish the
//!   document; a phased rollout's later batches are stored signed with 0 until
//!   [`releases::ReleaseStore::release_batch`]). Only released documents count as a
//!   target's newest.
//! - Blob serving (schema 5, [`releases`]): `blob_requests(device_id, sha256,
//!   chunks_requested, refused)`: chunk requests `serve` received per device and blob (the
//!   `chunks_requested` of `rollout status`: a rollout's blob is its model's), and how many of
//!   them it refused (rate limit, bad range, unknown blob).
//!
//! Crash rules: WAL, `synchronous = FULL`; each change is one transaction.
//!
//! Ingest's writes (the `serve` loop, see [`super::ingest`]) go through [`IngestTx`], one
//! write transaction that reads before it writes: [`HubStore::begin_ingest`] takes the write
//! lock first (SQLite `BEGIN IMMEDIATE`; PostgreSQL locks the device's row with
//! `SELECT … FOR UPDATE`, see [`pg`]), so hub processes sharing one `hub.db` never decide on a head
//! another one is changing. Invariants of the audit tables, kept by ingest: a device's
//! records are `1..=acked_seq` without a gap (only a continuation of the stored head is
//! ever inserted), each record's `hash` is what its contents give and links to the previous
//! one, every stored checkpoint verified against the enrolled key and its record; inserts
//! are `ON CONFLICT (device_id, seq) DO NOTHING`, so a redelivered batch changes nothing.
//!
//! Reading: the auditors' commands open the file with [`SqliteStore::open_read_only`], which
//! creates, migrates and writes nothing (an auditor changes nothing). The audit reads stream
//! a device's records row by row (a device may have millions), with the device log's filters
//! as bound parameters, in SQL PostgreSQL also runs.

use std::path::{Path, PathBuf};

use outpost_policy::audit::{Checkpoint, GENESIS, Query, Record};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{HubError, Result};
use crate::protocol::{DeviceId, GroupId};

pub mod pg;
pub mod releases;

/// Each entry takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE devices (
    id            VARCHAR(64) PRIMARY KEY,
    audit_key     VARCHAR(64) NOT NULL,
    enrolled_at   VARCHAR(40) NOT NULL,
    enrolled_by   VARCHAR(200) NOT NULL,
    online        BOOLEAN,
    last_seen     VARCHAR(40),
    agent_version VARCHAR(200),
    active_model  VARCHAR(400),
    acked_seq     BIGINT
);
CREATE TABLE device_groups (
    device_id VARCHAR(64) NOT NULL REFERENCES devices(id),
    group_id  VARCHAR(64) NOT NULL,
    PRIMARY KEY (device_id, group_id)
);
CREATE TABLE audit_records (
    device_id   VARCHAR(64) NOT NULL REFERENCES devices(id),
    seq         BIGINT NOT NULL,
    record_json TEXT NOT NULL,
    hash        VARCHAR(64) NOT NULL,
    received_at VARCHAR(40) NOT NULL,
    PRIMARY KEY (device_id, seq)
);
",
    "
ALTER TABLE audit_records ADD COLUMN ts VARCHAR(40);
ALTER TABLE audit_records ADD COLUMN actor TEXT;
ALTER TABLE audit_records ADD COLUMN action TEXT;
ALTER TABLE audit_records ADD COLUMN outcome VARCHAR(20);
CREATE TABLE audit_checkpoints (
    device_id       VARCHAR(64) NOT NULL REFERENCES devices(id),
    seq             BIGINT NOT NULL,
    checkpoint_json TEXT NOT NULL,
    received_at     VARCHAR(40) NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE audit_alerts (
    device_id VARCHAR(64) NOT NULL,
    at        VARCHAR(40) NOT NULL,
    kind      VARCHAR(40) NOT NULL,
    seq       BIGINT,
    detail    TEXT NOT NULL
);
ALTER TABLE devices ADD COLUMN audit_last_seq BIGINT;
ALTER TABLE devices ADD COLUMN reported_json TEXT;
ALTER TABLE devices ADD COLUMN telemetry_json TEXT;
ALTER TABLE devices ADD COLUMN telemetry_at VARCHAR(40);
",
    "
CREATE TABLE models (
    name          VARCHAR(200) NOT NULL,
    version       VARCHAR(200) NOT NULL,
    release_no    BIGINT NOT NULL,
    sha256        VARCHAR(64) NOT NULL,
    size          BIGINT NOT NULL,
    manifest_json TEXT NOT NULL,
    published_at  VARCHAR(40) NOT NULL,
    published_by  VARCHAR(200) NOT NULL,
    PRIMARY KEY (name, version),
    UNIQUE (name, release_no)
);
CREATE TABLE rollouts (
    id            BIGINT PRIMARY KEY,
    model         VARCHAR(401) NOT NULL,
    target        VARCHAR(80) NOT NULL,
    alias         VARCHAR(200) NOT NULL,
    activate      BOOLEAN NOT NULL,
    batch_percent INTEGER NOT NULL,
    max_failures  BIGINT,
    state         VARCHAR(20) NOT NULL,
    created_at    VARCHAR(40) NOT NULL,
    created_by    VARCHAR(200) NOT NULL
);
CREATE TABLE desired_docs (
    target     VARCHAR(80) NOT NULL,
    version    BIGINT NOT NULL,
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
    doc_json   TEXT NOT NULL,
    created_at VARCHAR(40) NOT NULL,
    PRIMARY KEY (target, version)
);
",
    "
ALTER TABLE desired_docs ADD COLUMN batch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE desired_docs ADD COLUMN released INTEGER NOT NULL DEFAULT 1;
",
    "
CREATE TABLE blob_requests (
    device_id        VARCHAR(64) NOT NULL,
    sha256           VARCHAR(64) NOT NULL,
    chunks_requested BIGINT NOT NULL,
    refused          BIGINT NOT NULL,
    updated_at       VARCHAR(40) NOT NULL,
    PRIMARY KEY (device_id, sha256)
);
",
];

/// An enrolled device as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub groups: Vec<GroupId>,
    /// The device's audit public key, hex.
    #[serde(skip)]
    pub audit_key: String,
    #[serde(skip)]
    pub enrolled_at: String,
    #[serde(skip)]
    pub enrolled_by: String,
    pub online: Option<bool>,
    pub last_seen: Option<String>,
    pub agent_version: Option<String>,
    pub active_model: Option<String>,
    pub acked_seq: Option<u64>,
    /// Records the device holds that the hub has not stored: the `audit_last_seq` of its
    /// last telemetry minus `acked_seq` (null until the device reports one).
    pub audit_lag: Option<u64>,
}

impl DeviceRecord {
    /// A device as enrollment registers it (enrolled now, by `by`): nothing seen of it yet.
    pub fn enrolled(id: DeviceId, groups: Vec<GroupId>, audit_key: String, by: &str) -> Self {
        Self {
            id,
            groups,
            audit_key,
            enrolled_at: outpost_policy::audit::now_rfc3339(),
            enrolled_by: by.to_string(),
            online: None,
            last_seen: None,
            agent_version: None,
            active_model: None,
            acked_seq: None,
            audit_lag: None,
        }
    }
}

/// What the hub keeps about devices and their audit chains; in `hub.db` ([`SqliteStore`]) or
/// PostgreSQL ([`pg::PgStore`]).
pub trait HubStore {
    /// Registers a device; [`HubError::AlreadyEnrolled`] if its id is taken.
    fn enroll(&mut self, device: &DeviceRecord) -> Result<()>;
    /// One device, if enrolled.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>>;
    /// Every enrolled device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>>;
    /// Starts ingest's write transaction, holding the write lock from its first statement;
    /// dropped without [`IngestTx::commit`], it changes nothing.
    fn begin_ingest(&mut self) -> Result<Box<dyn IngestTx + '_>>;
    /// The device's stored head seq (0 when nothing is stored), read without the write
    /// lock: what `serve` looks at before it takes the lock for parked batches.
    fn audit_head_seq(&self, id: &DeviceId) -> Result<u64>;

    // Audit reads (the auditors' commands): what ingest stored, never changed.

    /// Streams `device`'s stored records that `q` selects (the device log's filters: time
    /// range, actor, action, outcome, `after_seq`, `limit`, `newest`), in seq order, one
    /// borrowed row at a time.
    fn for_each_audit_record(
        &self,
        device: &DeviceId,
        q: &Query,
        f: &mut dyn FnMut(&StoredRecord<'_>) -> Result<()>,
    ) -> Result<()>;
    /// `device`'s stored checkpoints, by seq.
    fn audit_checkpoints(&self, device: &DeviceId) -> Result<Vec<Checkpoint>>;
    /// How many alerts were recorded for `device`, and the newest `newest` of them (oldest
    /// first).
    fn audit_alerts(&self, device: &DeviceId, newest: u64) -> Result<(u64, Vec<AuditAlert>)>;
}

/// Everything the hub keeps, as one object: the devices and their audit chains
/// ([`HubStore`]) and the releases ([`releases::ReleaseStore`]).
pub trait Store: HubStore + releases::ReleaseStore + Send + std::fmt::Debug {}
impl<T: HubStore + releases::ReleaseStore + Send + std::fmt::Debug> Store for T {}

/// Where the hub's store is (`[hub] store`): `<data_dir>/hub.db` when it is absent, else a
/// PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The data directory holding `hub.db`.
    Sqlite(PathBuf),
    /// A `postgres://` URL.
    Postgres(String),
}

impl StoreConfig {
    /// `[hub] store` (a `postgres://` URL), else `hub.db` in `data_dir`; the message says
    /// what is wrong with the URL.
    pub fn new(store: Option<&str>, data_dir: &Path) -> std::result::Result<Self, String> {
        match store {
            None => Ok(Self::Sqlite(data_dir.to_path_buf())),
            Some(url) => {
                pg::check_url(url)?;
                Ok(Self::Postgres(url.to_string()))
            }
        }
    }

    /// `sqlite:PATH` (a data directory, or its `hub.db`) or a `postgres://` URL, as
    /// `outpost-hub migrate` takes them.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = Path::new(path);
            if path.as_os_str().is_empty() {
                return Err("sqlite: needs a path (sqlite:/var/lib/outpost-hub)".into());
            }
            let dir = if path.file_name() == Some(std::ffi::OsStr::new(SqliteStore::FILE)) {
                path.parent().unwrap_or(Path::new(".")).to_path_buf()
            } else {
                path.to_path_buf()
            };
            return Ok(Self::Sqlite(dir));
        }
        pg::check_url(s).map_err(|e| format!("{e} (or sqlite:PATH)"))?;
        Ok(Self::Postgres(s.to_string()))
    }

    /// Opens the store to write, creating and migrating it (for SQLite, the data directory
    /// too).
    pub fn open(&self) -> Result<Box<dyn Store>> {
        Ok(match self {
            Self::Sqlite(dir) => Box::new(SqliteStore::open(&super::make_dir(dir)?)?),
            Self::Postgres(url) => Box::new(pg::PgStore::open(url)?),
        })
    }

    /// Opens the store to read only: nothing created, migrated or written.
    pub fn open_read_only(&self) -> Result<Box<dyn Store>> {
        Ok(match self {
            Self::Sqlite(dir) => Box::new(SqliteStore::open_read_only(dir)?),
            Self::Postgres(url) => Box::new(pg::PgStore::open_read_only(url)?),
        })
    }

    /// Whether there may be a store to read: `hub.db` exists, or a database is named.
    pub fn may_exist(&self) -> bool {
        match self {
            Self::Sqlite(dir) => dir.join(SqliteStore::FILE).exists(),
            Self::Postgres(_) => true,
        }
    }

    /// The file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(dir) => dir.join(SqliteStore::FILE).display().to_string(),
            Self::Postgres(url) => pg::redacted(url),
        }
    }
}

/// One stored record of a device's chain, borrowed from the store while streaming:
/// `record_json` is the record as the device sent it, the other columns index it.
#[derive(Debug, Clone, Copy)]
pub struct StoredRecord<'a> {
    pub seq: i64,
    pub record_json: &'a str,
    pub hash: &'a str,
    pub ts: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub action: Option<&'a str>,
    pub outcome: Option<&'a str>,
}

/// A break, fork, truncation or forged checkpoint that ingest saw from a device (and
/// refused), or the hub found behind the device (`behind`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditAlert {
    pub at: String,
    pub kind: String,
    pub seq: Option<u64>,
    pub detail: String,
}

/// `<data_dir>/hub.db`.
pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.path.display())
    }
}

impl SqliteStore {
    pub const FILE: &'static str = "hub.db";

    /// Opens (creating and migrating) `<data_dir>/hub.db`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(Self::FILE);
        let err = store_err(&path);
        let mut conn = Connection::open(&path).map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(&err)?;
        // Switching a new file to WAL needs it alone for a moment, and SQLite reports
        // "locked" at once rather than waiting: another process opening it too retries.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(err(e)),
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(&err)?;
        // Each step reads the version inside the write transaction that advances it, so
        // processes opening a fresh file at once (`serve` and `devices enroll`) never apply
        // one migration twice.
        let known = MIGRATIONS.len() as i64;
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(&err)?;
        // Schema current (the common case): no write lock taken.
        if current != known {
            loop {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&err)?;
                let found: i64 = tx
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .map_err(&err)?;
                if found > known {
                    return Err(HubError::Schema { path, found, known });
                }
                let Some(sql) = MIGRATIONS.get(found.max(0) as usize) else {
                    break;
                };
                tx.execute_batch(sql).map_err(&err)?;
                tx.pragma_update(None, "user_version", found.max(0) + 1)
                    .map_err(&err)?;
                tx.commit().map_err(&err)?;
            }
        }
        Ok(Self { path, conn })
    }

    /// Opens an existing `<data_dir>/hub.db` for reading only: nothing is created, migrated
    /// or written. A file of another schema version is refused (an older one is migrated by
    /// the next command that writes, e.g. `devices enroll` or `serve`).
    pub fn open_read_only(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(Self::FILE);
        let err = store_err(&path);
        if !path.exists() {
            return Err(HubError::Store {
                path,
                message: "no hub store here (no device has been enrolled)".into(),
            });
        }
        // On a read-only disk SQLite cannot create the WAL index; `immutable` tells it no one
        // can write there, which is then true (as the registry does).
        let (conn, found) = open_read_only_db(&path, false)
            .or_else(|_| open_read_only_db(&path, true))
            .map_err(&err)?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(HubError::Schema { path, found, known });
        }
        if found < known {
            return Err(HubError::Store {
                path,
                message: format!(
                    "schema version {found} is older than this hub's ({known}); a command that \
                     writes (devices enroll, serve) migrates it; nothing was changed"
                ),
            });
        }
        Ok(Self { path, conn })
    }

    fn groups_of(&self, id: &str) -> Result<Vec<GroupId>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT group_id FROM device_groups WHERE device_id = ?1 ORDER BY group_id")
            .map_err(&err)?;
        let rows = stmt
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(&err)?;
        let mut out = Vec::new();
        for g in rows {
            out.push(GroupId::try_from(g.map_err(&err)?)?);
        }
        Ok(out)
    }

    fn read_devices(&self, only: Option<&DeviceId>) -> Result<Vec<DeviceRecord>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, audit_key, enrolled_at, enrolled_by, online, last_seen, \
                 agent_version, active_model, acked_seq, audit_last_seq FROM devices \
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([only.map(DeviceId::as_str)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<bool>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, Option<i64>>(9)?,
                ))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                audit_key,
                enrolled_at,
                enrolled_by,
                online,
                last_seen,
                agent,
                model,
                acked,
                reported,
            ) = row.map_err(&err)?;
            let acked = acked.and_then(|a| u64::try_from(a).ok());
            // What the device says it holds beyond what the hub stored (its telemetry's
            // `audit_last_seq`); unknown until it reports one.
            let audit_lag = reported
                .and_then(|r| u64::try_from(r).ok())
                .map(|r| r.saturating_sub(acked.unwrap_or(0)));
            out.push(DeviceRecord {
                groups: self.groups_of(&id)?,
                id: DeviceId::try_from(id)?,
                audit_key,
                enrolled_at,
                enrolled_by,
                online,
                last_seen,
                agent_version: agent,
                active_model: model,
                acked_seq: acked,
                audit_lag,
            });
        }
        Ok(out)
    }
}

/// A read-only connection to `path` and its schema version.
fn open_read_only_db(path: &Path, immutable: bool) -> rusqlite::Result<(Connection, i64)> {
    let conn = crate::outbox::open_read_only_sqlite(path, immutable)?;
    let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok((conn, version))
}

fn store_err(path: &Path) -> impl Fn(rusqlite::Error) -> HubError + use<> {
    let path = path.to_path_buf();
    move |e| HubError::Store {
        path: path.clone(),
        message: e.to_string(),
    }
}

impl HubStore for SqliteStore {
    fn enroll(&mut self, d: &DeviceRecord) -> Result<()> {
        let err = store_err(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let taken = tx
            .query_row(
                "SELECT 1 FROM devices WHERE id = ?1",
                [d.id.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map_err(&err)?
            .is_some();
        if taken {
            return Err(HubError::AlreadyEnrolled(d.id.to_string()));
        }
        tx.execute(
            "INSERT INTO devices (id, audit_key, enrolled_at, enrolled_by) VALUES (?1, ?2, ?3, ?4)",
            params![d.id.as_str(), d.audit_key, d.enrolled_at, d.enrolled_by],
        )
        .map_err(&err)?;
        for g in &d.groups {
            tx.execute(
                "INSERT INTO device_groups (device_id, group_id) VALUES (?1, ?2)",
                params![d.id.as_str(), g.as_str()],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        Ok(self.read_devices(Some(id))?.into_iter().next())
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.read_devices(None)
    }

    fn begin_ingest(&mut self) -> Result<Box<dyn IngestTx + '_>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err(&self.path))?;
        Ok(Box::new(SqliteIngest {
            tx,
            path: &self.path,
        }))
    }

    fn audit_head_seq(&self, id: &DeviceId) -> Result<u64> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT seq FROM audit_records WHERE device_id = ?1 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
            .map_err(store_err(&self.path))?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }

    fn for_each_audit_record(
        &self,
        device: &DeviceId,
        q: &Query,
        f: &mut dyn FnMut(&StoredRecord<'_>) -> Result<()>,
    ) -> Result<()> {
        let err = store_err(&self.path);
        let (sql, args) = audit_records_sql(device, q, |n| format!("?{n}"), "");
        let args = args.into_iter().map(|a| match a {
            SqlArg::Text(s) => rusqlite::types::Value::Text(s),
            SqlArg::Int(i) => rusqlite::types::Value::Integer(i),
        });
        let mut stmt = self.conn.prepare(&sql).map_err(&err)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args)).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let text = |i: usize| -> Result<&str> {
                row.get_ref(i)
                    .and_then(|v| v.as_str().map_err(Into::into))
                    .map_err(&err)
            };
            let opt_text = |i: usize| -> Result<Option<&str>> {
                row.get_ref(i)
                    .and_then(|v| v.as_str_or_null().map_err(Into::into))
                    .map_err(&err)
            };
            let stored = StoredRecord {
                seq: row.get(0).map_err(&err)?,
                record_json: text(1)?,
                hash: text(2)?,
                ts: opt_text(3)?,
                actor: opt_text(4)?,
                action: opt_text(5)?,
                outcome: opt_text(6)?,
            };
            f(&stored)?;
        }
        Ok(())
    }

    fn audit_checkpoints(&self, device: &DeviceId) -> Result<Vec<Checkpoint>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, checkpoint_json FROM audit_checkpoints WHERE device_id = ?1 \
                 ORDER BY seq",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([device.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, json) = row.map_err(&err)?;
            out.push(parse_checkpoint(&self.path, device, seq, &json)?);
        }
        Ok(out)
    }

    fn audit_alerts(&self, device: &DeviceId, newest: u64) -> Result<(u64, Vec<AuditAlert>)> {
        let err = store_err(&self.path);
        let count: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM audit_alerts WHERE device_id = ?1",
                [device.as_str()],
                |r| r.get(0),
            )
            .map_err(&err)?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at, kind, seq, detail FROM audit_alerts WHERE device_id = ?1 \
                 ORDER BY at DESC, seq DESC LIMIT ?2",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map(
                params![device.as_str(), i64::try_from(newest).unwrap_or(i64::MAX)],
                |r| {
                    Ok(AuditAlert {
                        at: r.get(0)?,
                        kind: r.get(1)?,
                        seq: r
                            .get::<_, Option<i64>>(2)?
                            .and_then(|s| u64::try_from(s).ok()),
                        detail: r.get(3)?,
                    })
                },
            )
            .map_err(&err)?;
        let mut alerts = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&err)?;
        alerts.reverse();
        Ok((u64::try_from(count).unwrap_or(0), alerts))
    }
}

// ---------------------------------------------------------------------------------------------
// Ingest: the write side of the audit tables and of the devices' link columns (`serve`).

/// The stored head of a device's chain: its highest seq (the records below it are all there)
/// and that record's hash; seq 0 with the genesis hash when nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

/// A row of `audit_alerts`.
#[derive(Debug, Clone, Copy)]
pub struct AlertRow<'a> {
    pub device_id: &'a DeviceId,
    pub at: &'a str,
    pub kind: &'a str,
    pub seq: u64,
    pub detail: &'a str,
}

/// Ingest's write transaction ([`HubStore::begin_ingest`]). Times are RFC 3339 UTC. The
/// caller keeps the audit tables' invariants (module header); this only reads and writes.
pub trait IngestTx {
    /// Takes the write locks of these devices now, in a fixed order (PostgreSQL locks each
    /// device's row, in id order, so hubs applying groups of messages never deadlock; SQLite
    /// holds the whole file's lock from the start and does nothing here). Every other method
    /// locks its device anyway; this only fixes the order.
    fn lock_devices(&mut self, _ids: &[&DeviceId]) -> Result<()> {
        Ok(())
    }
    /// The enrolled device's audit public key (hex), or `None` when not enrolled.
    fn audit_key(&self, id: &DeviceId) -> Result<Option<String>>;
    /// The device's stored head.
    fn audit_head(&self, id: &DeviceId) -> Result<AuditHead>;
    /// The device's last reported state (JSON, as [`IngestTx::set_reported_state`] wrote
    /// it), if any.
    fn reported_state(&self, id: &DeviceId) -> Result<Option<String>>;
    /// `(seq, hash)` of the stored records `first..=last`, by seq.
    fn stored_hashes(&self, id: &DeviceId, first: u64, last: u64) -> Result<Vec<(u64, String)>>;
    /// Inserts records (skipping any seq already stored); how many were new.
    fn insert_records(&mut self, id: &DeviceId, records: &[Record], at: &str) -> Result<u64>;
    /// Inserts a verified checkpoint (skipping one whose seq is stored); whether it was new.
    fn insert_checkpoint(&mut self, id: &DeviceId, cp: &Checkpoint, at: &str) -> Result<bool>;
    /// Sets the device's `acked_seq` (the new stored head) and `last_seen`.
    fn set_acked_seq(&mut self, id: &DeviceId, seq: u64, at: &str) -> Result<()>;
    /// Records an alert, unless one of the same device, kind and seq is there already;
    /// whether it was new.
    fn record_alert(&mut self, alert: &AlertRow<'_>) -> Result<bool>;
    /// The device's link status (`status` topic). Only this changes a known `online`: the
    /// other setters (acked seq, reported state, telemetry) set it to true when it is still
    /// unknown, as a device whose status the broker did not replay is evidently connected.
    fn set_status(
        &mut self,
        id: &DeviceId,
        online: bool,
        agent_version: &str,
        at: &str,
    ) -> Result<()>;
    /// The device's reported state (JSON) and the model behind its `default` alias.
    fn set_reported_state(
        &mut self,
        id: &DeviceId,
        json: &str,
        active_model: Option<&str>,
        at: &str,
    ) -> Result<()>;
    /// The device's last telemetry snapshot (JSON) and, when it says, its last audit seq.
    fn set_telemetry(
        &mut self,
        id: &DeviceId,
        json: &str,
        audit_last_seq: Option<u64>,
        at: &str,
    ) -> Result<()>;
    /// Makes every change durable (an fsync of the WAL).
    fn commit(self: Box<Self>) -> Result<()>;
}

struct SqliteIngest<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

/// A seq as SQL's BIGINT (ingest refuses larger seqs before they get here).
fn sql_seq(path: &Path, seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| HubError::Store {
        path: path.to_path_buf(),
        message: format!("seq {seq} is beyond BIGINT"),
    })
}

impl SqliteIngest<'_> {
    /// Runs an UPDATE of one device's row.
    fn update_device(&self, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<()> {
        self.tx
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map_err(store_err(self.path))?;
        Ok(())
    }
}

impl IngestTx for SqliteIngest<'_> {
    fn audit_key(&self, id: &DeviceId) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT audit_key FROM devices WHERE id = ?1")
            .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
            .map_err(store_err(self.path))
    }

    fn audit_head(&self, id: &DeviceId) -> Result<AuditHead> {
        let row: Option<(i64, String)> = self
            .tx
            .prepare_cached(
                "SELECT seq, hash FROM audit_records WHERE device_id = ?1 \
                 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(store_err(self.path))?;
        Ok(match row {
            Some((seq, hash)) => AuditHead {
                seq: u64::try_from(seq).unwrap_or(0),
                hash,
            },
            None => AuditHead {
                seq: 0,
                hash: GENESIS.to_string(),
            },
        })
    }

    fn reported_state(&self, id: &DeviceId) -> Result<Option<String>> {
        let json: Option<Option<String>> = self
            .tx
            .prepare_cached("SELECT reported_json FROM devices WHERE id = ?1")
            .and_then(|mut s| s.query_row([id.as_str()], |r| r.get(0)).optional())
            .map_err(store_err(self.path))?;
        Ok(json.flatten())
    }

    fn stored_hashes(&self, id: &DeviceId, first: u64, last: u64) -> Result<Vec<(u64, String)>> {
        let err = store_err(self.path);
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT seq, hash FROM audit_records \
                 WHERE device_id = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map(
                params![
                    id.as_str(),
                    sql_seq(self.path, first)?,
                    sql_seq(self.path, last)?
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, hash) = row.map_err(&err)?;
            out.push((u64::try_from(seq).unwrap_or(0), hash));
        }
        Ok(out)
    }

    fn insert_records(&mut self, id: &DeviceId, records: &[Record], at: &str) -> Result<u64> {
        let err = store_err(self.path);
        let mut stmt = self
            .tx
            .prepare_cached(
                "INSERT INTO audit_records \
                 (device_id, seq, record_json, hash, received_at, ts, actor, action, outcome) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (device_id, seq) DO NOTHING",
            )
            .map_err(&err)?;
        let mut added = 0;
        for r in records {
            let json = serde_json::to_string(r).map_err(|e| HubError::Store {
                path: self.path.to_path_buf(),
                message: format!("serializing record {}: {e}", r.seq),
            })?;
            added += stmt
                .execute(params![
                    id.as_str(),
                    sql_seq(self.path, r.seq)?,
                    json,
                    r.hash,
                    at,
                    r.ts,
                    r.actor,
                    r.action,
                    r.outcome.as_str(),
                ])
                .map_err(&err)? as u64;
        }
        Ok(added)
    }

    fn insert_checkpoint(&mut self, id: &DeviceId, cp: &Checkpoint, at: &str) -> Result<bool> {
        let json = serde_json::to_string(cp).map_err(|e| HubError::Store {
            path: self.path.to_path_buf(),
            message: format!("serializing checkpoint {}: {e}", cp.seq),
        })?;
        let seq = sql_seq(self.path, cp.seq)?;
        let added = self
            .tx
            .prepare_cached(
                "INSERT INTO audit_checkpoints (device_id, seq, checkpoint_json, received_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (device_id, seq) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![id.as_str(), seq, json, at]))
            .map_err(store_err(self.path))?;
        Ok(added > 0)
    }

    fn set_acked_seq(&mut self, id: &DeviceId, seq: u64, at: &str) -> Result<()> {
        let seq = sql_seq(self.path, seq)?;
        self.update_device(
            "UPDATE devices SET acked_seq = ?2, last_seen = ?3, online = COALESCE(online, TRUE) \
             WHERE id = ?1",
            &[&id.as_str(), &seq, &at],
        )
    }

    fn record_alert(&mut self, a: &AlertRow<'_>) -> Result<bool> {
        let err = store_err(self.path);
        let seq = sql_seq(self.path, a.seq)?;
        let seen = self
            .tx
            .prepare_cached(
                "SELECT 1 FROM audit_alerts WHERE device_id = ?1 AND kind = ?2 AND seq = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![a.device_id.as_str(), a.kind, seq], |_| Ok(()))
                    .optional()
            })
            .map_err(&err)?
            .is_some();
        if seen {
            return Ok(false);
        }
        self.tx
            .prepare_cached(
                "INSERT INTO audit_alerts (device_id, at, kind, seq, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![a.device_id.as_str(), a.at, a.kind, seq, a.detail]))
            .map_err(&err)?;
        Ok(true)
    }

    fn set_status(
        &mut self,
        id: &DeviceId,
        online: bool,
        agent_version: &str,
        at: &str,
    ) -> Result<()> {
        self.update_device(
            "UPDATE devices SET online = ?2, agent_version = ?3, last_seen = ?4 WHERE id = ?1",
            &[&id.as_str(), &online, &agent_version, &at],
        )
    }

    fn set_reported_state(
        &mut self,
        id: &DeviceId,
        json: &str,
        active_model: Option<&str>,
        at: &str,
    ) -> Result<()> {
        self.update_device(
            "UPDATE devices SET reported_json = ?2, active_model = ?3, last_seen = ?4, \
             online = COALESCE(online, TRUE) WHERE id = ?1",
            &[&id.as_str(), &json, &active_model, &at],
        )
    }

    fn set_telemetry(
        &mut self,
        id: &DeviceId,
        json: &str,
        audit_last_seq: Option<u64>,
        at: &str,
    ) -> Result<()> {
        let last = audit_last_seq.map(|s| sql_seq(self.path, s)).transpose()?;
        self.update_device(
            "UPDATE devices SET telemetry_json = ?2, telemetry_at = ?3, last_seen = ?3, \
             online = COALESCE(online, TRUE), audit_last_seq = COALESCE(?4, audit_last_seq) \
             WHERE id = ?1",
            &[&id.as_str(), &json, &at, &last],
        )
    }

    fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().map_err(store_err(self.path))
    }
}

/// A value bound to a statement of [`audit_records_sql`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SqlArg {
    Text(String),
    Int(i64),
}

/// The statement and its parameters for [`HubStore::for_each_audit_record`], with the
/// backend's placeholders (`placeholder(n)`: `?n` for SQLite, `$n` for PostgreSQL) and
/// `text_collation` after the time column (PostgreSQL's `COLLATE "C"`: bytewise): every
/// value bound, never spliced; no SQLite-only syntax (`newest` is a subquery, not
/// `LIMIT -1`).
pub(crate) fn audit_records_sql(
    device: &DeviceId,
    q: &Query,
    placeholder: impl Fn(usize) -> String,
    text_collation: &str,
) -> (String, Vec<SqlArg>) {
    let int = |v: u64| SqlArg::Int(i64::try_from(v).unwrap_or(i64::MAX));
    let mut args: Vec<SqlArg> = vec![SqlArg::Text(device.to_string())];
    let mut clauses = vec![format!("device_id = {}", placeholder(1))];
    let mut add = |clause: &str, v: SqlArg| {
        args.push(v);
        clauses.push(format!("{clause} {}", placeholder(args.len())));
    };
    if let Some(s) = &q.since {
        add(&format!("ts{text_collation} >="), SqlArg::Text(s.clone()));
    }
    if let Some(u) = &q.until {
        add(&format!("ts{text_collation} <"), SqlArg::Text(u.clone()));
    }
    if let Some(a) = &q.actor {
        add("actor =", SqlArg::Text(a.clone()));
    }
    if let Some(a) = &q.action {
        add("action =", SqlArg::Text(a.clone()));
    }
    if let Some(o) = q.outcome {
        add("outcome =", SqlArg::Text(o.as_str().to_string()));
    }
    if let Some(s) = q.after_seq {
        add("seq >", int(s));
    }
    let select = format!(
        "SELECT seq, record_json, hash, ts, actor, action, outcome FROM audit_records WHERE {}",
        clauses.join(" AND ")
    );
    let sql = match q.limit {
        None => format!("{select} ORDER BY seq"),
        Some(l) => {
            args.push(int(l));
            let n = placeholder(args.len());
            if q.newest {
                format!("SELECT * FROM ({select} ORDER BY seq DESC LIMIT {n}) newest ORDER BY seq")
            } else {
                format!("{select} ORDER BY seq LIMIT {n}")
            }
        }
    };
    (sql, args)
}

/// A stored checkpoint row read back: it must parse and say the seq it is stored under.
pub(crate) fn parse_checkpoint(
    path: &Path,
    device: &DeviceId,
    seq: i64,
    json: &str,
) -> Result<Checkpoint> {
    let bad = |why: String| HubError::Store {
        path: path.to_path_buf(),
        message: format!("checkpoint {seq} of device {device} {why}"),
    };
    let cp: Checkpoint =
        serde_json::from_str(json).map_err(|e| bad(format!("is not a checkpoint: {e}")))?;
    if i64::try_from(cp.seq).ok() != Some(seq) {
        return Err(bad(format!("says it is checkpoint {}", cp.seq)));
    }
    Ok(cp)
}
