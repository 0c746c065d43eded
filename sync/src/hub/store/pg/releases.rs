//! [`ReleaseStore`] on PostgreSQL: the release tables of [`super::super::releases`] (the
//! same schema, the same meanings), each method one statement or one transaction. A
//! version counted per target (`add_rollout`) is counted under a transaction-scoped
//! advisory lock, as SQLite's `BEGIN IMMEDIATE` does it for `hub.db`, so two administrators
//! at once never sign the same version.

use super::{PgStore, i64_of, pg_err, u64_of};
use crate::hub::store::releases::{
    ChunkCount, CurrentDesired, DesiredRow, ReleaseStore, RolloutRow, StoredModel, target_of,
};
use crate::hub::{HubError, Result};
use crate::protocol::DeviceId;
use crate::release::Target;

/// The advisory lock `add_rollout` counts versions under ("outpost2").
const ROLLOUT_LOCK: i64 = 0x6f75_7470_6f73_7432;

const ROLLOUT_COLUMNS: &str = "id, model, target, alias, activate, batch_percent, max_failures, \
                               state, created_at, created_by";

/// A `models` row, columns in the order the queries select them.
fn stored_model(r: &postgres::Row) -> StoredModel {
    StoredModel {
        name: r.get(0),
        version: r.get(1),
        release: u64_of(r.get(2)),
        sha256: r.get(3),
        size: u64_of(r.get(4)),
        manifest_json: r.get(5),
        published_at: r.get(6),
        published_by: r.get(7),
    }
}

impl PgStore {
    fn rollout_from_row(&self, r: &postgres::Row) -> Result<RolloutRow> {
        Ok(RolloutRow {
            id: u64_of(r.get(0)),
            model: r.get(1),
            target: target_of(&self.label, r.get(2))?,
            alias: r.get(3),
            activate: r.get(4),
            batch_percent: u8::try_from(r.get::<_, i32>(5)).unwrap_or(100),
            max_failures: r
                .get::<_, Option<i64>>(6)
                .and_then(|n| u64::try_from(n).ok()),
            state: r.get(7),
            created_at: r.get(8),
            created_by: r.get(9),
        })
    }
}

impl ReleaseStore for PgStore {
    fn add_model(&mut self, m: &StoredModel) -> Result<()> {
        let err = pg_err(&self.label);
        let added = self
            .conn()?
            .execute(
                "INSERT INTO models (name, version, release_no, sha256, size, manifest_json, \
                 published_at, published_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (name, version) DO NOTHING",
                &[
                    &m.name,
                    &m.version,
                    &i64_of(&self.label, m.release)?,
                    &m.sha256,
                    &i64_of(&self.label, m.size)?,
                    &m.manifest_json,
                    &m.published_at,
                    &m.published_by,
                ],
            )
            .map_err(&err)?;
        if added == 0 {
            return Err(HubError::AlreadyPublished(format!(
                "{}:{}",
                m.name, m.version
            )));
        }
        Ok(())
    }

    fn next_release(&self, name: &str) -> Result<u64> {
        let row = self
            .conn()?
            .query_one(
                "SELECT MAX(release_no) FROM models WHERE name = $1",
                &[&name],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.get::<_, Option<i64>>(0).map_or(0, u64_of) + 1)
    }

    fn model(&self, name: &str, version: &str) -> Result<Option<StoredModel>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT name, version, release_no, sha256, size, manifest_json, published_at, \
                 published_by FROM models WHERE name = $1 AND version = $2",
                &[&name, &version],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.as_ref().map(stored_model))
    }

    fn add_rollout(
        &mut self,
        rollout: &RolloutRow,
        targets: &[(Target, u32)],
        sign: &mut dyn FnMut(u64, &Target, u64) -> Result<String>,
    ) -> Result<u64> {
        let err = pg_err(&self.label);
        let label = self.label.clone();
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(&err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROLLOUT_LOCK])
            .map_err(&err)?;
        let last: Option<i64> = tx
            .query_one("SELECT MAX(id) FROM rollouts", &[])
            .map_err(&err)?
            .get(0);
        let id = last.map_or(0, u64_of) + 1;
        let id_sql = i64_of(&label, id)?;
        tx.execute(
            &format!(
                "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            &[
                &id_sql,
                &rollout.model,
                &rollout.target.to_string(),
                &rollout.alias,
                &rollout.activate,
                &i32::from(rollout.batch_percent),
                &rollout
                    .max_failures
                    .map(|n| i64_of(&label, n))
                    .transpose()?,
                &rollout.state,
                &rollout.created_at,
                &rollout.created_by,
            ],
        )
        .map_err(&err)?;
        for (target, batch) in targets {
            let t = target.to_string();
            let batch_sql = i32::try_from(*batch).map_err(|_| HubError::Store {
                path: label.clone(),
                message: format!("batch {batch} is out of range"),
            })?;
            let last: Option<i64> = tx
                .query_one(
                    "SELECT MAX(version) FROM desired_docs WHERE target = $1",
                    &[&t],
                )
                .map_err(&err)?
                .get(0);
            let version = last.map_or(0, u64_of) + 1;
            let doc = sign(id, target, version)?;
            tx.execute(
                "INSERT INTO desired_docs (target, version, rollout_id, doc_json, created_at, \
                 batch, released) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &t,
                    &i64_of(&label, version)?,
                    &id_sql,
                    &doc,
                    &rollout.created_at,
                    &batch_sql,
                    &i32::from(*batch == 0),
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(id)
    }

    fn rollouts(&self, id: Option<u64>) -> Result<Vec<RolloutRow>> {
        let err = pg_err(&self.label);
        let mut c = self.conn()?;
        let rows = match id {
            Some(id) => c.query(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1 ORDER BY id"),
                &[&i64_of(&self.label, id)?],
            ),
            None => c.query(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id"),
                &[],
            ),
        }
        .map_err(&err)?;
        rows.iter().map(|r| self.rollout_from_row(r)).collect()
    }

    fn rollout_docs(&self, id: u64) -> Result<Vec<DesiredRow>> {
        let rows = self
            .conn()?
            .query(
                "SELECT target, version, doc_json, batch, released FROM desired_docs \
                 WHERE rollout_id = $1 ORDER BY batch, target COLLATE \"C\"",
                &[&i64_of(&self.label, id)?],
            )
            .map_err(pg_err(&self.label))?;
        rows.iter()
            .map(|r| {
                Ok(DesiredRow {
                    target: target_of(&self.label, r.get(0))?,
                    version: u64_of(r.get(1)),
                    rollout_id: id,
                    doc_json: r.get(2),
                    batch: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                    released: r.get::<_, i32>(4) != 0,
                })
            })
            .collect()
    }

    fn set_rollout_state(&mut self, id: u64, state: &str) -> Result<bool> {
        let n = self
            .conn()?
            .execute(
                "UPDATE rollouts SET state = $2 WHERE id = $1",
                &[&i64_of(&self.label, id)?, &state],
            )
            .map_err(pg_err(&self.label))?;
        Ok(n > 0)
    }

    fn release_batch(&mut self, id: u64, batch: u32) -> Result<usize> {
        let batch = i32::try_from(batch).unwrap_or(i32::MAX);
        let n = self
            .conn()?
            .execute(
                "UPDATE desired_docs SET released = 1 \
                 WHERE rollout_id = $1 AND batch = $2 AND released = 0",
                &[&i64_of(&self.label, id)?, &batch],
            )
            .map_err(pg_err(&self.label))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn current_desired(&self) -> Result<Vec<CurrentDesired>> {
        let rows = self
            .conn()?
            .query(
                "SELECT d.target, d.version, d.rollout_id, r.state, d.doc_json \
                 FROM desired_docs d JOIN rollouts r ON r.id = d.rollout_id \
                 WHERE d.released = 1 AND d.version = (SELECT MAX(version) FROM desired_docs x \
                                    WHERE x.target = d.target AND x.released = 1) \
                 ORDER BY d.target COLLATE \"C\"",
                &[],
            )
            .map_err(pg_err(&self.label))?;
        rows.iter()
            .map(|r| {
                Ok(CurrentDesired {
                    target: target_of(&self.label, r.get(0))?,
                    version: u64_of(r.get(1)),
                    rollout_id: u64_of(r.get(2)),
                    halted: r.get::<_, &str>(3) == "halted",
                    doc_json: r.get(4),
                })
            })
            .collect()
    }

    fn group_members(&self, group: &str) -> Result<Vec<DeviceId>> {
        let rows = self
            .conn()?
            .query(
                "SELECT device_id FROM device_groups WHERE group_id = $1 \
                 ORDER BY device_id COLLATE \"C\"",
                &[&group],
            )
            .map_err(pg_err(&self.label))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(DeviceId::try_from(r.get::<_, String>(0))?);
        }
        Ok(out)
    }

    fn reported_json(&self, id: &DeviceId) -> Result<Option<String>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT reported_json FROM devices WHERE id = $1",
                &[&id.as_str()],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    fn model_by_sha(&self, sha256: &str) -> Result<Option<StoredModel>> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT name, version, release_no, sha256, size, manifest_json, published_at, \
                 published_by FROM models WHERE sha256 = $1 \
                 ORDER BY published_at COLLATE \"C\" DESC LIMIT 1",
                &[&sha256],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.as_ref().map(stored_model))
    }

    fn add_chunk_counts(&mut self, counts: &[ChunkCount]) -> Result<()> {
        let err = pg_err(&self.label);
        let label = self.label.clone();
        let now = outpost_policy::audit::now_rfc3339();
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(&err)?;
        for n in counts {
            tx.execute(
                "INSERT INTO blob_requests (device_id, sha256, chunks_requested, refused, \
                 updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (device_id, sha256) DO UPDATE SET \
                    chunks_requested = blob_requests.chunks_requested \
                                       + excluded.chunks_requested, \
                    refused = blob_requests.refused + excluded.refused, \
                    updated_at = excluded.updated_at",
                &[
                    &n.device.as_str(),
                    &n.sha256,
                    &i64_of(&label, n.requested)?,
                    &i64_of(&label, n.refused)?,
                    &now,
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    fn chunks_requested(&self, device: &DeviceId, sha256: &str) -> Result<u64> {
        let row = self
            .conn()?
            .query_opt(
                "SELECT chunks_requested FROM blob_requests WHERE device_id = $1 AND sha256 = $2",
                &[&device.as_str(), &sha256],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.map_or(0, |r| u64_of(r.get(0))))
    }
}
