//! The read side: [`AuditReader`] opens `audit.db` read-only and changes nothing; queries
//! with filters and paging, the checkpoints, and the raw rows verification reads without
//! trusting their types. [`RecordSource`] is what exports read from: `AuditReader`, or any
//! other store of one device's chain (the hub's copy), so the export format has one writer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::record::{RowRef, hash_equals, write_canonical_body};
use super::{AuditError, Checkpoint, Outcome, Record, schema, store_err};
use crate::jcs;

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

/// Where one device's records and checkpoints come from: the local `audit.db`
/// ([`AuditReader`]) or another store of the same chain (the hub's copy).
pub trait RecordSource {
    /// Streams the records `q` selects, oldest first (seq order), without holding them all.
    fn for_each_record(
        &self,
        q: &Query,
        f: &mut dyn FnMut(Record) -> Result<(), AuditError>,
    ) -> Result<(), AuditError>;

    /// Every checkpoint, by seq.
    fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError>;
}

impl RecordSource for AuditReader {
    fn for_each_record(
        &self,
        q: &Query,
        f: &mut dyn FnMut(Record) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        self.for_each(q, f)
    }

    fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        AuditReader::checkpoints(self)
    }
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
        schema::version(&conn, path)?;
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
        self.checkpoints_after(0)
    }

    /// The checkpoints over seqs above `seq`, by seq (a reader following the log reads only
    /// what is new).
    pub fn checkpoints_after(&self, seq: u64) -> Result<Vec<Checkpoint>, AuditError> {
        self.checkpoints_where("seq > ?1", seq)
    }

    /// The newest checkpoint at or below `seq` (if any) and every one above it, by seq: what
    /// a reader that sends records after `seq` needs, without the older ones.
    pub fn checkpoints_from(&self, seq: u64) -> Result<Vec<Checkpoint>, AuditError> {
        self.checkpoints_where(
            "seq >= COALESCE((SELECT MAX(seq) FROM checkpoints WHERE seq <= ?1), 0)",
            seq,
        )
    }

    fn checkpoints_where(&self, clause: &str, seq: u64) -> Result<Vec<Checkpoint>, AuditError> {
        let err = store_err(&self.path);
        let sql = format!(
            "SELECT device_id, seq, hash, ts, public_key, signature FROM checkpoints \
             WHERE {clause} ORDER BY seq"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&err)?;
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map([seq], |r| {
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
    pub(super) fn for_each_raw(
        &self,
        mut f: impl FnMut(&RawRecord<'_>) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let err = store_err(&self.path);
        let sql = format!("SELECT {RECORD_COLUMNS} FROM records ORDER BY seq");
        let mut stmt = self.conn.prepare(&sql).map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            f(&RawRecord::from_row(row).map_err(&err)?)?;
        }
        Ok(())
    }

    /// Streams up to `limit` records after `after_seq`, oldest first, each as the JSON object
    /// a [`Record`] serializes to, written straight from the row: `roles` and `details` go
    /// as the canonical text the log stored (checked to be JSON), nothing is parsed into a
    /// [`Record`]. What sync sends; `f` gets the seq and the text, and returns `false` to stop.
    pub fn for_each_json_after(
        &self,
        after_seq: u64,
        limit: usize,
        mut f: impl FnMut(u64, &str) -> bool,
    ) -> Result<(), AuditError> {
        let err = store_err(&self.path);
        let sql =
            format!("SELECT {RECORD_COLUMNS} FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&err)?;
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query([after, limit]).map_err(&err)?;
        let mut buf = String::with_capacity(1024);
        while let Some(row) = rows.next().map_err(&err)? {
            let raw = RawRecord::from_row(row).map_err(&err)?;
            let seq = raw
                .write_json(&mut buf)
                .map_err(|message| AuditError::Store {
                    path: self.path.clone(),
                    message,
                })?;
            if !f(seq, &buf) {
                break;
            }
        }
        Ok(())
    }
}

/// A row as stored, before any interpretation (verification must not trust types).
pub(super) struct RawRecord<'a> {
    pub seq: i64,
    pub ts: &'a str,
    pub device_id: &'a str,
    pub actor: &'a str,
    pub roles: &'a str,
    pub action: &'a str,
    pub resource: Option<&'a str>,
    pub outcome: &'a str,
    pub reason: &'a str,
    pub request_id: Option<&'a str>,
    pub policy_version: Option<i64>,
    pub details: &'a str,
    pub prev_hash: &'a str,
    pub hash: &'a str,
}

impl<'a> RawRecord<'a> {
    fn from_row(row: &'a rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let text = |i: usize| -> rusqlite::Result<&'a str> {
            row.get_ref(i).and_then(|v| v.as_str().map_err(Into::into))
        };
        let opt_text = |i: usize| -> rusqlite::Result<Option<&'a str>> {
            row.get_ref(i)
                .and_then(|v| v.as_str_or_null().map_err(Into::into))
        };
        Ok(RawRecord {
            seq: row.get::<_, i64>(0)?,
            ts: text(1)?,
            device_id: text(2)?,
            actor: text(3)?,
            roles: text(4)?,
            action: text(5)?,
            resource: opt_text(6)?,
            outcome: text(7)?,
            reason: text(8)?,
            request_id: opt_text(9)?,
            policy_version: row.get(10)?,
            details: text(11)?,
            prev_hash: text(12)?,
            hash: text(13)?,
        })
    }

    /// This row as a record's JSON object (the fields of [`Record`], in its order) into
    /// `out` (cleared first); its seq. An error when the row could not be read back as a
    /// [`Record`]: a negative number, an unknown outcome, roles or details that are not JSON.
    fn write_json(&self, out: &mut String) -> Result<u64, String> {
        let seq = u64::try_from(self.seq)
            .map_err(|_| format!("record {} has a negative seq", self.seq))?;
        let bad = |what: &str| format!("record {seq}: {what}");
        if Outcome::parse(self.outcome).is_none() {
            return Err(bad("unknown outcome"));
        }
        if serde_json::from_str::<Vec<String>>(self.roles).is_err() {
            return Err(bad("roles are not a list of strings"));
        }
        if !self.details.starts_with('{')
            || serde_json::from_str::<serde::de::IgnoredAny>(self.details).is_err()
        {
            return Err(bad("details are not a JSON object"));
        }
        let opt = |out: &mut String, v: Option<&str>| match v {
            Some(v) => jcs::push_str(out, v),
            None => out.push_str("null"),
        };
        out.clear();
        let _ = write!(out, "{{\"seq\":{seq},\"ts\":");
        jcs::push_str(out, self.ts);
        out.push_str(",\"device_id\":");
        jcs::push_str(out, self.device_id);
        out.push_str(",\"actor\":");
        jcs::push_str(out, self.actor);
        out.push_str(",\"roles\":");
        out.push_str(self.roles);
        out.push_str(",\"action\":");
        jcs::push_str(out, self.action);
        out.push_str(",\"resource\":");
        opt(out, self.resource);
        out.push_str(",\"outcome\":");
        jcs::push_str(out, self.outcome);
        out.push_str(",\"reason\":");
        jcs::push_str(out, self.reason);
        out.push_str(",\"request_id\":");
        opt(out, self.request_id);
        out.push_str(",\"policy_version\":");
        match self.policy_version {
            Some(v) if v >= 0 => {
                let _ = write!(out, "{v}");
            }
            Some(_) => return Err(bad("negative policy_version")),
            None => out.push_str("null"),
        }
        out.push_str(",\"details\":");
        out.push_str(self.details);
        out.push_str(",\"prev_hash\":");
        jcs::push_str(out, self.prev_hash);
        out.push_str(",\"hash\":");
        jcs::push_str(out, self.hash);
        out.push('}');
        Ok(seq)
    }

    /// Whether this row's contents give its stored hash; `buf` is scratch space.
    pub(super) fn hash_matches(&self, buf: &mut String) -> Result<bool, String> {
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
