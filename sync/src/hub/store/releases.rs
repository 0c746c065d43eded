//! The release tables of the hub's store (schema 3, and 5's `blob_requests`): published
//! models, rollouts, the signed desired-state documents and the chunk-request counts, behind
//! [`ReleaseStore`]. This file is the SQLite side; the PostgreSQL side is
//! `store::pg::releases`, the same statements with `$n` placeholders. A new table or query is
//! one more trait method, implemented in both.

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{SqliteStore, store_err};
use crate::hub::{HubError, Result};
use crate::protocol::DeviceId;
use crate::release::Target;

/// A published model: its manifest as signed, and who published it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModel {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
    pub size: u64,
    pub manifest_json: String,
    pub published_at: String,
    pub published_by: String,
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub id: u64,
    /// `name:version`.
    pub model: String,
    pub target: Target,
    pub alias: String,
    pub activate: bool,
    pub batch_percent: u8,
    pub max_failures: Option<u64>,
    /// `running` or `halted` as set by the commands (`done` is worked out from devices).
    pub state: String,
    pub created_at: String,
    pub created_by: String,
}

/// One signed desired state of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRow {
    pub target: Target,
    pub version: u64,
    pub rollout_id: u64,
    pub doc_json: String,
    /// Its batch in a phased rollout (0 otherwise).
    pub batch: u32,
    /// Whether `serve` may publish it (a later batch is not, until released).
    pub released: bool,
}

/// What `serve` publishes for one target: the newest document, and whether its rollout is
/// halted (then the retained message is cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentDesired {
    pub target: Target,
    pub version: u64,
    pub rollout_id: u64,
    pub halted: bool,
    pub doc_json: String,
}

/// The release side of the hub's store.
pub trait ReleaseStore {
    /// Records a published model; [`HubError::AlreadyPublished`] when `name:version` is.
    fn add_model(&mut self, m: &StoredModel) -> Result<()>;
    /// The next release number of `name` (1 for the first).
    fn next_release(&self, name: &str) -> Result<u64>;
    fn model(&self, name: &str, version: &str) -> Result<Option<StoredModel>>;
    /// In one write transaction: a new rollout id, then for each of `targets` (with its
    /// batch) the next version of that target, the document `sign(rollout_id, target,
    /// version)` returns, stored (released when its batch is 0). Returns the rollout's id.
    fn add_rollout(
        &mut self,
        rollout: &RolloutRow,
        targets: &[(Target, u32)],
        sign: &mut dyn FnMut(u64, &Target, u64) -> Result<String>,
    ) -> Result<u64>;
    /// Every rollout (or one), by id.
    fn rollouts(&self, id: Option<u64>) -> Result<Vec<RolloutRow>>;
    /// The documents of a rollout.
    fn rollout_docs(&self, id: u64) -> Result<Vec<DesiredRow>>;
    /// Sets a rollout's state; false when there is no such rollout.
    fn set_rollout_state(&mut self, id: u64, state: &str) -> Result<bool>;
    /// Lets `serve` publish the documents of a rollout's `batch`; how many there were.
    fn release_batch(&mut self, id: u64, batch: u32) -> Result<usize>;
    /// The newest document of every target.
    fn current_desired(&self) -> Result<Vec<CurrentDesired>>;
    /// The devices enrolled in a group.
    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>>;
    /// A device's last reported state (JSON as received).
    fn reported_json(&self, id: &DeviceId) -> Result<Option<String>>;
    /// The published model whose blob is `sha256` (the newest publication of it).
    fn model_by_sha(&self, sha256: &str) -> Result<Option<StoredModel>>;
    /// Adds chunk requests received (and refused) per device and blob, in one transaction.
    fn add_chunk_counts(&mut self, counts: &[ChunkCount]) -> Result<()>;
    /// Chunk requests received from `device` for `sha256`.
    fn chunks_requested(&self, device: &DeviceId, sha256: &str) -> Result<u64>;
}

/// Chunk requests `serve` received from one device for one blob since it last wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkCount {
    pub device: DeviceId,
    pub sha256: String,
    pub requested: u64,
    pub refused: u64,
}

fn to_i64(path: &std::path::Path, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| HubError::Store {
        path: path.to_path_buf(),
        message: format!("{n} does not fit the store"),
    })
}

pub(crate) fn target_of(path: &std::path::Path, s: &str) -> Result<Target> {
    Target::parse(s).map_err(|e| HubError::Store {
        path: path.to_path_buf(),
        message: format!("stored target {s:?}: {e}"),
    })
}

/// A `models` row, columns in the order the queries select them.
fn stored_model(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredModel> {
    Ok(StoredModel {
        name: r.get(0)?,
        version: r.get(1)?,
        release: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        sha256: r.get(3)?,
        size: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
        manifest_json: r.get(5)?,
        published_at: r.get(6)?,
        published_by: r.get(7)?,
    })
}

const ROLLOUT_COLUMNS: &str = "id, model, target, alias, activate, batch_percent, max_failures, \
                               state, created_at, created_by";

impl SqliteStore {
    fn rollout_from_row(&self, r: &rusqlite::Row<'_>) -> Result<RolloutRow> {
        let err = store_err(&self.path);
        let target: String = r.get(2).map_err(&err)?;
        Ok(RolloutRow {
            id: u64::try_from(r.get::<_, i64>(0).map_err(&err)?).unwrap_or(0),
            model: r.get(1).map_err(&err)?,
            target: target_of(&self.path, &target)?,
            alias: r.get(3).map_err(&err)?,
            activate: r.get(4).map_err(&err)?,
            batch_percent: u8::try_from(r.get::<_, i64>(5).map_err(&err)?).unwrap_or(100),
            max_failures: r
                .get::<_, Option<i64>>(6)
                .map_err(&err)?
                .and_then(|n| u64::try_from(n).ok()),
            state: r.get(7).map_err(&err)?,
            created_at: r.get(8).map_err(&err)?,
            created_by: r.get(9).map_err(&err)?,
        })
    }
}

impl ReleaseStore for SqliteStore {
    fn add_model(&mut self, m: &StoredModel) -> Result<()> {
        let err = store_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let taken = tx
            .query_row(
                "SELECT 1 FROM models WHERE name = ?1 AND version = ?2",
                params![m.name, m.version],
                |_| Ok(()),
            )
            .optional()
            .map_err(&err)?
            .is_some();
        if taken {
            return Err(HubError::AlreadyPublished(format!(
                "{}:{}",
                m.name, m.version
            )));
        }
        tx.execute(
            "INSERT INTO models (name, version, release_no, sha256, size, manifest_json, \
             published_at, published_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                m.name,
                m.version,
                to_i64(&self.path, m.release)?,
                m.sha256,
                to_i64(&self.path, m.size)?,
                m.manifest_json,
                m.published_at,
                m.published_by
            ],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)
    }

    fn next_release(&self, name: &str) -> Result<u64> {
        let max: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(release_no) FROM models WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(store_err(&self.path))?;
        Ok(max.and_then(|n| u64::try_from(n).ok()).unwrap_or(0) + 1)
    }

    fn model(&self, name: &str, version: &str) -> Result<Option<StoredModel>> {
        self.conn
            .query_row(
                "SELECT name, version, release_no, sha256, size, manifest_json, published_at, \
                 published_by FROM models WHERE name = ?1 AND version = ?2",
                params![name, version],
                stored_model,
            )
            .optional()
            .map_err(store_err(&self.path))
    }

    fn add_rollout(
        &mut self,
        rollout: &RolloutRow,
        targets: &[(Target, u32)],
        sign: &mut dyn FnMut(u64, &Target, u64) -> Result<String>,
    ) -> Result<u64> {
        let err = store_err(&self.path);
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let last: Option<i64> = tx
            .query_row("SELECT MAX(id) FROM rollouts", [], |r| r.get(0))
            .map_err(&err)?;
        let id = last.and_then(|n| u64::try_from(n).ok()).unwrap_or(0) + 1;
        tx.execute(
            &format!(
                "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
            params![
                to_i64(&path, id)?,
                rollout.model,
                rollout.target.to_string(),
                rollout.alias,
                rollout.activate,
                i64::from(rollout.batch_percent),
                rollout.max_failures.map(|n| to_i64(&path, n)).transpose()?,
                rollout.state,
                rollout.created_at,
                rollout.created_by
            ],
        )
        .map_err(&err)?;
        for (target, batch) in targets {
            let t = target.to_string();
            let last: Option<i64> = tx
                .query_row(
                    "SELECT MAX(version) FROM desired_docs WHERE target = ?1",
                    [&t],
                    |r| r.get(0),
                )
                .map_err(&err)?;
            let version = last.and_then(|n| u64::try_from(n).ok()).unwrap_or(0) + 1;
            let doc = sign(id, target, version)?;
            tx.execute(
                "INSERT INTO desired_docs (target, version, rollout_id, doc_json, created_at, \
                 batch, released) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t,
                    to_i64(&path, version)?,
                    to_i64(&path, id)?,
                    doc,
                    rollout.created_at,
                    i64::from(*batch),
                    i64::from(*batch == 0)
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(id)
    }

    fn rollouts(&self, id: Option<u64>) -> Result<Vec<RolloutRow>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ?1 IS NULL OR id = ?1 ORDER BY id"
            ))
            .map_err(&err)?;
        let id = id.map(|n| to_i64(&self.path, n)).transpose()?;
        let mut rows = stmt.query([id]).map_err(&err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(&err)? {
            out.push(self.rollout_from_row(r)?);
        }
        Ok(out)
    }

    fn rollout_docs(&self, id: u64) -> Result<Vec<DesiredRow>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT target, version, doc_json, batch, released FROM desired_docs \
                 WHERE rollout_id = ?1 ORDER BY batch, target",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([to_i64(&self.path, id)?], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (target, version, doc_json, batch, released) = row.map_err(&err)?;
            out.push(DesiredRow {
                target: target_of(&self.path, &target)?,
                version: u64::try_from(version).unwrap_or(0),
                rollout_id: id,
                doc_json,
                batch: u32::try_from(batch).unwrap_or(0),
                released: released != 0,
            });
        }
        Ok(out)
    }

    fn set_rollout_state(&mut self, id: u64, state: &str) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "UPDATE rollouts SET state = ?2 WHERE id = ?1",
                params![to_i64(&self.path, id)?, state],
            )
            .map_err(store_err(&self.path))?;
        Ok(n > 0)
    }

    fn release_batch(&mut self, id: u64, batch: u32) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE desired_docs SET released = 1 \
                 WHERE rollout_id = ?1 AND batch = ?2 AND released = 0",
                params![to_i64(&self.path, id)?, i64::from(batch)],
            )
            .map_err(store_err(&self.path))
    }

    fn current_desired(&self) -> Result<Vec<CurrentDesired>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.target, d.version, d.rollout_id, r.state, d.doc_json \
                 FROM desired_docs d JOIN rollouts r ON r.id = d.rollout_id \
                 WHERE d.released = 1 AND d.version = (SELECT MAX(version) FROM desired_docs x \
                                    WHERE x.target = d.target AND x.released = 1) \
                 ORDER BY d.target",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(&err)?;
        let mut out = Vec::new();
        for row in rows {
            let (target, version, rollout, state, doc_json) = row.map_err(&err)?;
            out.push(CurrentDesired {
                target: target_of(&self.path, &target)?,
                version: u64::try_from(version).unwrap_or(0),
                rollout_id: u64::try_from(rollout).unwrap_or(0),
                halted: state == "halted",
                doc_json,
            });
        }
        Ok(out)
    }

    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
        let err = store_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT device_id FROM device_groups WHERE group_id = ?1 ORDER BY device_id")
            .map_err(&err)?;
        let rows = stmt
            .query_map([group], |r| r.get::<_, String>(0))
            .map_err(&err)?;
        let mut out = Vec::new();
        for id in rows {
            out.push(DeviceId::try_from(id.map_err(&err)?)?);
        }
        Ok(out)
    }

    fn model_by_sha(&self, sha256: &str) -> Result<Option<StoredModel>> {
        self.conn
            .query_row(
                "SELECT name, version, release_no, sha256, size, manifest_json, published_at, \
                 published_by FROM models WHERE sha256 = ?1 ORDER BY published_at DESC LIMIT 1",
                params![sha256],
                stored_model,
            )
            .optional()
            .map_err(store_err(&self.path))
    }

    fn add_chunk_counts(&mut self, counts: &[ChunkCount]) -> Result<()> {
        let err = store_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let now = outpost_policy::audit::now_rfc3339();
        for c in counts {
            tx.execute(
                "INSERT INTO blob_requests (device_id, sha256, chunks_requested, refused, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (device_id, sha256) DO UPDATE SET
                    chunks_requested = blob_requests.chunks_requested + excluded.chunks_requested,
                    refused = blob_requests.refused + excluded.refused,
                    updated_at = excluded.updated_at",
                params![
                    c.device.as_str(),
                    c.sha256,
                    to_i64(&self.path, c.requested)?,
                    to_i64(&self.path, c.refused)?,
                    now
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    fn chunks_requested(&self, device: &DeviceId, sha256: &str) -> Result<u64> {
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT chunks_requested FROM blob_requests WHERE device_id = ?1 AND sha256 = ?2",
                params![device.as_str(), sha256],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_err(&self.path))?;
        Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }

    fn reported_json(&self, id: &DeviceId) -> Result<Option<String>> {
        let json: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT reported_json FROM devices WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_err(&self.path))?;
        Ok(json.flatten())
    }
}
