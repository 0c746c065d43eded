//! The hub's store: the [`HubStore`] trait and its SQLite backend, `<data_dir>/hub.db` (the
//! only module that opens it).
//!
//! Format (schema version in `PRAGMA user_version`, migrations in [`MIGRATIONS`], applied in
//! one transaction each; a newer version is refused untouched). The SQL is kept portable
//! (plain types, no SQLite-only syntax in the tables) for the PostgreSQL backend to come:
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
//!   checkpoints the hub saw (kept: they are evidence).
//! - `devices` also keeps the device's last reported audit seq, its reported state and its
//!   last telemetry snapshot (JSON, as received).
//!
//! Crash rules: WAL, `synchronous = FULL`; each change is one transaction.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{HubError, Result};
use crate::protocol::{DeviceId, GroupId};

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
    /// Records the device holds that the hub does not (null until `serve` knows).
    pub audit_lag: Option<u64>,
}

/// What the hub keeps; SQLite now, PostgreSQL when a fleet outgrows one machine.
pub trait HubStore {
    /// Registers a device; [`HubError::AlreadyEnrolled`] if its id is taken.
    fn enroll(&mut self, device: &DeviceRecord) -> Result<()>;
    /// One device, if enrolled.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>>;
    /// Every enrolled device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>>;
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
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(&err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(&err)?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(HubError::Schema { path, found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            let tx = conn.transaction().map_err(&err)?;
            tx.execute_batch(sql).map_err(&err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(&err)?;
            tx.commit().map_err(&err)?;
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
                 agent_version, active_model, acked_seq FROM devices \
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
                ))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, audit_key, enrolled_at, enrolled_by, online, last_seen, agent, model, acked) =
                row.map_err(&err)?;
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
                acked_seq: acked.and_then(|a| u64::try_from(a).ok()),
                audit_lag: None,
            });
        }
        Ok(out)
    }
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
}
