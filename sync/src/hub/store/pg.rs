//! The hub's store on PostgreSQL (`[hub] store = "postgres://user@host/db"`): [`PgStore`],
//! the same [`HubStore`]/[`IngestTx`] as `hub.db`, for hubs side by side on one database.
//! The only home of the `postgres` and `r2d2` crates.
//!
//! Client: the blocking `postgres` client (tokio-postgres under it, each connection driven
//! by a small runtime of its own) in an `r2d2` pool ([`POOL_SIZE`] connections). The store
//! traits are synchronous and ingest runs on a thread of its own, so a blocking client fits
//! them without a runtime handle threaded through every call; the pool gives each
//! transaction a live connection (one PostgreSQL dropped is replaced on the next checkout,
//! so `serve` goes on after a database restart without reopening its store). A `postgres`
//! client must never be used, or dropped, on an async runtime's thread (it blocks on a
//! runtime of its own): [`PgStore`]'s `Drop` hands the pool to a plain thread when it is
//! dropped there.
//!
//! Text is ordered and compared bytewise (`COLLATE "C"`), as SQLite does, whatever the
//! database's collation, so both stores list and filter alike.
//!
//! Format: the tables of `hub.db` (the same [`super::MIGRATIONS`], which are kept to SQL
//! both databases run), plus `schema_version(version)`, one row, the number of migrations
//! applied. [`PgStore::open`] migrates in one transaction under a transaction-scoped
//! advisory lock ([`MIGRATION_LOCK`]), so hubs starting at once apply each step once; a
//! database of a newer version is refused and left untouched. [`PgStore::open_read_only`]
//! (the auditors' commands) opens sessions with `default_transaction_read_only = on`,
//! migrates nothing and refuses any version other than its own. Every statement is
//! parameterized; nothing from a payload is ever spliced into SQL. Every session runs with
//! `synchronous_commit = on`, whatever the server's default: a commit is on disk when it
//! returns.
//!
//! Ingest and the acks with several hubs. [`IngestTx`] is one READ COMMITTED transaction.
//! Before it reads or writes anything of a device it locks that device's `devices` row
//! (`SELECT … FOR UPDATE`); `serve` first locks every device of a group in id order
//! ([`IngestTx::lock_devices`]), so two hubs never wait on each other in a cycle. Why no hub
//! ever acks a record that is not durably stored:
//! - Records are inserted only by ingest, only as the continuation of the head it read
//!   (`head + 1 ..`), and only while it holds the device's row lock. The head is read after
//!   the lock is granted, by a later statement, and under READ COMMITTED each statement sees
//!   everything committed before it began: a hub that waited for the lock sees the rows the
//!   other hub committed while holding it. So no two transactions ever extend one device's
//!   chain from the same head, and the rows stay `1..=head` without a gap (the primary key
//!   `(device_id, seq)` with `ON CONFLICT DO NOTHING` is the second guard: a row is never
//!   stored twice).
//! - The ack a hub sends is the head its transaction ended with (`acked_seq`), and it is
//!   sent only after `COMMIT` returned, with `synchronous_commit = on`: every record up to
//!   it was in the database before the transaction, or written by it and now durable. The
//!   "highest contiguous seq" is therefore the maximum stored seq of the device.
//! - A hub killed before its `COMMIT` returns has acked nothing of that transaction; the
//!   other hub, once the lock is released (the server ends a dead session's transaction),
//!   reads the head as it is, and the device sends again what was not acked.
//! - Reads without the lock ([`HubStore::audit_head_seq`], for parked batches) only decide
//!   when to try again; what is stored and acked is decided under the lock.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use outpost_policy::audit::{Checkpoint, GENESIS, Query, Record};
use postgres::NoTls;
use postgres::types::ToSql;

use super::{
    AlertRow, AuditAlert, AuditHead, DeviceRecord, HubStore, IngestTx, MIGRATIONS, SqlArg,
    StoredRecord, audit_records_sql,
};
use crate::hub::{HubError, Result};
use crate::protocol::{DeviceId, GroupId};

pub mod migrate;
mod releases;
#[cfg(test)]
mod tests;

/// Connections a store holds at most (ingest uses one at a time; reads take another).
pub const POOL_SIZE: u32 = 4;
/// How long a checkout waits for a connection before the operation fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a writing session may sit idle inside a transaction before PostgreSQL ends it
/// (`idle_in_transaction_session_timeout`), releasing its locks. A hub's transactions send
/// their statements back to back; one idle this long belongs to a hub that hangs (stopped,
/// swapped out, its VM frozen) while holding its devices' row locks, which would otherwise
/// hold up every other hub that takes one of those devices until it came back. Its
/// transaction is then lost, never committed, so never acked: the devices send again.
/// (Not on read-only sessions: an export that streams to a slow reader waits between
/// fetches.)
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);
/// The advisory lock migrations run under (any fixed number; "outpost1" in ASCII).
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7431;

type Conn = r2d2::PooledConnection<Manager>;

/// Makes the pool's connections: a client and the statements ingest prepared on it.
#[derive(Debug)]
struct Manager {
    config: postgres::Config,
}

/// A pooled connection: its client, and ingest's statements prepared once on it (each
/// would otherwise be parsed again on every call: a round trip and a plan per statement).
pub(crate) struct PgConn {
    client: postgres::Client,
    statements: std::collections::HashMap<&'static str, postgres::Statement>,
}

impl std::ops::Deref for PgConn {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        &mut self.client
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> std::result::Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.config.connect(NoTls)?,
            statements: std::collections::HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> std::result::Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// A hub store in a PostgreSQL database.
pub struct PgStore {
    /// The URL without its password, for messages.
    label: PathBuf,
    pool: Option<r2d2::Pool<Manager>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore({})", self.label.display())
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A `postgres` connection closes by blocking on its own runtime, which panics on a
        // runtime's thread: close them on a plain thread then.
        if let Some(pool) = self.pool.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(pool));
        }
    }
}

/// Whether `url` is a PostgreSQL URL this store can open (checked by the configuration).
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres://user@host/database URL".into());
    }
    let config = postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    if config.get_dbname().is_none() {
        return Err("names no database (postgres://user@host/DATABASE)".into());
    }
    Ok(())
}

/// `url` without its password: `postgres://user@host:port/db`.
pub fn redacted(url: &str) -> String {
    let Ok(c) = postgres::Config::from_str(url) else {
        return "postgres://(unparsable URL)".into();
    };
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            match c.get_ports().get(i) {
                Some(p) => format!("{host}:{p}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        c.get_user().unwrap_or(""),
        hosts.join(","),
        c.get_dbname().unwrap_or("")
    )
}

/// Whether the `schema_version` table exists (in the session's schema).
fn schema_table(
    c: &mut impl postgres::GenericClient,
) -> std::result::Result<bool, postgres::Error> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables \
         WHERE schemaname = current_schema() AND tablename = 'schema_version')",
        &[],
    )?
    .get(0))
}

fn pg_err(label: &std::path::Path) -> impl Fn(postgres::Error) -> HubError + use<> {
    let path = label.to_path_buf();
    move |e| HubError::Store {
        path: path.clone(),
        message: match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        },
    }
}

fn i64_of(label: &std::path::Path, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| HubError::Store {
        path: label.to_path_buf(),
        message: format!("{n} is beyond BIGINT"),
    })
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PgStore {
    /// Connects to `url` and migrates its schema (creating the tables in an empty
    /// database); a database of a newer schema is refused untouched.
    pub fn open(url: &str) -> Result<Self> {
        let store = Self::connect(url, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Connects read-only (`default_transaction_read_only`): nothing is created, migrated
    /// or written; a schema other than this hub's is refused.
    pub fn open_read_only(url: &str) -> Result<Self> {
        let store = Self::connect(url, true)?;
        let found = store.schema_version()?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(HubError::Schema {
                path: store.label.clone(),
                found,
                known,
            });
        }
        if found < known {
            return Err(HubError::Store {
                path: store.label.clone(),
                message: if found == 0 {
                    "no hub store in this database (no hub has opened it to write)".into()
                } else {
                    format!(
                        "schema version {found} is older than this hub's ({known}); a command \
                         that writes (devices enroll, serve) migrates it; nothing was changed"
                    )
                },
            });
        }
        Ok(store)
    }

    fn connect(url: &str, read_only: bool) -> Result<Self> {
        let label = PathBuf::from(redacted(url));
        check_url(url).map_err(|message| HubError::Store {
            path: label.clone(),
            message,
        })?;
        let mut config = postgres::Config::from_str(url).map_err(pg_err(&label))?;
        let mut options = config.get_options().unwrap_or("").to_string();
        options.push_str(" -c synchronous_commit=on");
        if read_only {
            options.push_str(" -c default_transaction_read_only=on");
        } else {
            options.push_str(&format!(
                " -c idle_in_transaction_session_timeout={}",
                IDLE_IN_TRANSACTION.as_millis()
            ));
        }
        config.options(options.trim());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let manager = Manager { config };
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(manager)
            .map_err(|e| HubError::Store {
                path: label.clone(),
                message: format!("cannot connect: {e}"),
            })?;
        Ok(Self {
            label,
            pool: Some(pool),
        })
    }

    /// The URL without its password.
    pub fn label(&self) -> &std::path::Path {
        &self.label
    }

    fn conn(&self) -> Result<Conn> {
        let pool = self.pool.as_ref().ok_or_else(|| HubError::Store {
            path: self.label.clone(),
            message: "closed".into(),
        })?;
        pool.get().map_err(|e| HubError::Store {
            path: self.label.clone(),
            message: format!("no connection: {e}"),
        })
    }

    /// The number of migrations applied (0: no hub schema here).
    fn schema_version(&self) -> Result<i64> {
        let err = pg_err(&self.label);
        let mut c = self.conn()?;
        if !schema_table(&mut c.client).map_err(&err)? {
            return Ok(0);
        }
        let row = c
            .query_opt("SELECT version FROM schema_version", &[])
            .map_err(&err)?;
        Ok(row.map_or(0, |r| i64::from(r.get::<_, i32>(0))))
    }

    fn migrate(&self) -> Result<()> {
        let err = pg_err(&self.label);
        let known = MIGRATIONS.len() as i64;
        // The common case, schema current: no lock, nothing written.
        if self.schema_version()? == known {
            return Ok(());
        }
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(&err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(&err)?;
        // Read after the lock, by a query (its snapshot sees what a hub that held the
        // lock before committed; a catalog lookup such as to_regclass may not yet).
        let exists = schema_table(&mut tx).map_err(&err)?;
        let found = match exists {
            false => 0,
            true => tx
                .query_opt("SELECT version FROM schema_version", &[])
                .map_err(&err)?
                .map_or(0, |r| i64::from(r.get::<_, i32>(0))),
        };
        if found > known {
            // Dropping the transaction rolls it back: nothing changed.
            return Err(HubError::Schema {
                path: self.label.clone(),
                found,
                known,
            });
        }
        if !exists {
            tx.batch_execute(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version (version) VALUES (0);",
            )
            .map_err(&err)?;
        }
        for sql in &MIGRATIONS[found.max(0) as usize..] {
            tx.batch_execute(sql).map_err(&err)?;
        }
        let version = i32::try_from(known).unwrap_or(i32::MAX);
        tx.execute("UPDATE schema_version SET version = $1", &[&version])
            .map_err(&err)?;
        tx.commit().map_err(&err)
    }

    fn read_devices(&self, only: Option<&DeviceId>) -> Result<Vec<DeviceRecord>> {
        let err = pg_err(&self.label);
        let mut c = self.conn()?;
        let columns = "SELECT id, audit_key, enrolled_at, enrolled_by, online, last_seen, \
                       agent_version, active_model, acked_seq, audit_last_seq FROM devices";
        let rows = match only {
            Some(id) => c.query(&format!("{columns} WHERE id = $1"), &[&id.as_str()]),
            None => c.query(&format!("{columns} ORDER BY id COLLATE \"C\""), &[]),
        }
        .map_err(&err)?;
        let groups = match only {
            Some(id) => c.query(
                "SELECT device_id, group_id FROM device_groups WHERE device_id = $1 \
                 ORDER BY group_id COLLATE \"C\"",
                &[&id.as_str()],
            ),
            None => c.query(
                "SELECT device_id, group_id FROM device_groups \
                 ORDER BY device_id COLLATE \"C\", group_id COLLATE \"C\"",
                &[],
            ),
        }
        .map_err(&err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.get(0);
            let acked = r.get::<_, Option<i64>>(8).map(u64_of);
            let audit_lag = r
                .get::<_, Option<i64>>(9)
                .map(|last| u64_of(last).saturating_sub(acked.unwrap_or(0)));
            let mut device_groups = Vec::new();
            for g in groups.iter().filter(|g| g.get::<_, &str>(0) == id) {
                device_groups.push(GroupId::try_from(g.get::<_, String>(1))?);
            }
            out.push(DeviceRecord {
                id: DeviceId::try_from(id)?,
                groups: device_groups,
                audit_key: r.get(1),
                enrolled_at: r.get(2),
                enrolled_by: r.get(3),
                online: r.get(4),
                last_seen: r.get(5),
                agent_version: r.get(6),
                active_model: r.get(7),
                acked_seq: acked,
                audit_lag,
            });
        }
        Ok(out)
    }
}

impl HubStore for PgStore {
    fn enroll(&mut self, d: &DeviceRecord) -> Result<()> {
        let err = pg_err(&self.label);
        let mut c = self.conn()?;
        let mut tx = c.transaction().map_err(&err)?;
        let added = tx
            .execute(
                "INSERT INTO devices (id, audit_key, enrolled_at, enrolled_by) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                &[&d.id.as_str(), &d.audit_key, &d.enrolled_at, &d.enrolled_by],
            )
            .map_err(&err)?;
        if added == 0 {
            return Err(HubError::AlreadyEnrolled(d.id.to_string()));
        }
        for g in &d.groups {
            tx.execute(
                "INSERT INTO device_groups (device_id, group_id) VALUES ($1, $2)",
                &[&d.id.as_str(), &g.as_str()],
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
        let mut conn = self.conn()?;
        conn.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            .map_err(pg_err(&self.label))?;
        Ok(Box::new(PgIngest {
            conn: RefCell::new(conn),
            label: &self.label,
            locked: RefCell::new(BTreeSet::new()),
            open: true,
        }))
    }

    fn audit_head_seq(&self, id: &DeviceId) -> Result<u64> {
        let row = self
            .conn()?
            .query_one(
                "SELECT MAX(seq) FROM audit_records WHERE device_id = $1",
                &[&id.as_str()],
            )
            .map_err(pg_err(&self.label))?;
        Ok(row.get::<_, Option<i64>>(0).map_or(0, u64_of))
    }

    fn for_each_audit_record(
        &self,
        device: &DeviceId,
        q: &Query,
        f: &mut dyn FnMut(&StoredRecord<'_>) -> Result<()>,
    ) -> Result<()> {
        let err = pg_err(&self.label);
        // Text compares bytewise, as SQLite does (`ts` ranges), whatever the database's
        // collation.
        let (sql, args) = audit_records_sql(device, q, |n| format!("${n}"), " COLLATE \"C\"");
        let params: Vec<Box<dyn ToSql + Sync>> = args
            .into_iter()
            .map(|a| -> Box<dyn ToSql + Sync> {
                match a {
                    SqlArg::Text(s) => Box::new(s),
                    SqlArg::Int(i) => Box::new(i),
                }
            })
            .collect();
        let mut c = self.conn()?;
        // Rows come off the socket as they are read (the client's queue is bounded), so a
        // device's millions of records stream in constant memory.
        let mut rows = c
            .query_raw(&sql, params.iter().map(|p| p.as_ref() as &dyn ToSql))
            .map_err(&err)?;
        use postgres::fallible_iterator::FallibleIterator;
        while let Some(row) = rows.next().map_err(&err)? {
            let stored = StoredRecord {
                seq: row.try_get(0).map_err(&err)?,
                record_json: row.try_get(1).map_err(&err)?,
                hash: row.try_get(2).map_err(&err)?,
                ts: row.try_get(3).map_err(&err)?,
                actor: row.try_get(4).map_err(&err)?,
                action: row.try_get(5).map_err(&err)?,
                outcome: row.try_get(6).map_err(&err)?,
            };
            f(&stored)?;
        }
        Ok(())
    }

    fn audit_checkpoints(&self, device: &DeviceId) -> Result<Vec<Checkpoint>> {
        let rows = self
            .conn()?
            .query(
                "SELECT seq, checkpoint_json FROM audit_checkpoints WHERE device_id = $1 \
                 ORDER BY seq",
                &[&device.as_str()],
            )
            .map_err(pg_err(&self.label))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (seq, json): (i64, &str) = (r.get(0), r.get(1));
            out.push(super::parse_checkpoint(&self.label, device, seq, json)?);
        }
        Ok(out)
    }

    fn audit_alerts(&self, device: &DeviceId, newest: u64) -> Result<(u64, Vec<AuditAlert>)> {
        let err = pg_err(&self.label);
        let mut c = self.conn()?;
        let count: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM audit_alerts WHERE device_id = $1",
                &[&device.as_str()],
            )
            .map_err(&err)?
            .get(0);
        let limit = i64::try_from(newest).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT at, kind, seq, detail FROM audit_alerts WHERE device_id = $1 \
                 ORDER BY at COLLATE \"C\" DESC, seq DESC LIMIT $2",
                &[&device.as_str(), &limit],
            )
            .map_err(&err)?;
        let mut alerts: Vec<AuditAlert> = rows
            .iter()
            .map(|r| AuditAlert {
                at: r.get(0),
                kind: r.get(1),
                seq: r
                    .get::<_, Option<i64>>(2)
                    .and_then(|s| u64::try_from(s).ok()),
                detail: r.get(3),
            })
            .collect();
        alerts.reverse();
        Ok((u64_of(count), alerts))
    }
}

/// Ingest's transaction on one pooled connection (module header: the device row locks).
struct PgIngest<'a> {
    conn: RefCell<Conn>,
    label: &'a std::path::Path,
    /// Devices whose row this transaction holds locked.
    locked: RefCell<BTreeSet<String>>,
    /// Not committed yet: dropped, it rolls back.
    open: bool,
}

impl Drop for PgIngest<'_> {
    fn drop(&mut self) {
        if self.open {
            // A connection that cannot roll back is broken; the pool drops it.
            let _ = self.conn.get_mut().batch_execute("ROLLBACK");
        }
    }
}

/// The transaction's connection, running each statement as prepared once on it.
struct Cached<'a>(std::cell::RefMut<'a, Conn>);

type PgResult<T> = std::result::Result<T, postgres::Error>;

impl Cached<'_> {
    fn statement(&mut self, sql: &'static str) -> PgResult<postgres::Statement> {
        let conn: &mut PgConn = &mut self.0;
        if let Some(s) = conn.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = conn.client.prepare(sql)?;
        conn.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> PgResult<Vec<postgres::Row>> {
        let s = self.statement(sql)?;
        self.0.client.query(&s, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> PgResult<Option<postgres::Row>> {
        let s = self.statement(sql)?;
        self.0.client.query_opt(&s, params)
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<u64> {
        let s = self.statement(sql)?;
        self.0.client.execute(&s, params)
    }
}

impl PgIngest<'_> {
    fn client(&self) -> Cached<'_> {
        Cached(self.conn.borrow_mut())
    }

    /// Locks `id`'s row for the rest of the transaction, once.
    fn lock(&self, id: &DeviceId) -> Result<()> {
        if self.locked.borrow().contains(id.as_str()) {
            return Ok(());
        }
        self.client()
            .query_opt(
                "SELECT id FROM devices WHERE id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .map_err(pg_err(self.label))?;
        self.locked.borrow_mut().insert(id.to_string());
        Ok(())
    }

    fn update_device(
        &self,
        id: &DeviceId,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<()> {
        self.lock(id)?;
        self.client()
            .execute(sql, params)
            .map_err(pg_err(self.label))?;
        Ok(())
    }
}

impl IngestTx for PgIngest<'_> {
    fn lock_devices(&mut self, ids: &[&DeviceId]) -> Result<()> {
        let mut todo: Vec<&str> = ids
            .iter()
            .map(|d| d.as_str())
            .filter(|d| !self.locked.borrow().contains(*d))
            .collect();
        todo.sort_unstable();
        todo.dedup();
        if todo.is_empty() {
            return Ok(());
        }
        // Rows are locked in the order the sort returns them: every hub takes them in id
        // order, so no two wait on each other in a cycle.
        self.client()
            .query(
                "SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&todo],
            )
            .map_err(pg_err(self.label))?;
        self.locked
            .borrow_mut()
            .extend(todo.into_iter().map(str::to_string));
        Ok(())
    }

    fn audit_key(&self, id: &DeviceId) -> Result<Option<String>> {
        self.lock(id)?;
        let row = self
            .client()
            .query_opt(
                "SELECT audit_key FROM devices WHERE id = $1",
                &[&id.as_str()],
            )
            .map_err(pg_err(self.label))?;
        Ok(row.map(|r| r.get(0)))
    }

    fn audit_head(&self, id: &DeviceId) -> Result<AuditHead> {
        self.lock(id)?;
        let row = self
            .client()
            .query_opt(
                "SELECT seq, hash FROM audit_records WHERE device_id = $1 \
                 ORDER BY seq DESC LIMIT 1",
                &[&id.as_str()],
            )
            .map_err(pg_err(self.label))?;
        Ok(match row {
            Some(r) => AuditHead {
                seq: u64_of(r.get(0)),
                hash: r.get(1),
            },
            None => AuditHead {
                seq: 0,
                hash: GENESIS.to_string(),
            },
        })
    }

    fn reported_state(&self, id: &DeviceId) -> Result<Option<String>> {
        self.lock(id)?;
        let row = self
            .client()
            .query_opt(
                "SELECT reported_json FROM devices WHERE id = $1",
                &[&id.as_str()],
            )
            .map_err(pg_err(self.label))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    fn stored_hashes(&self, id: &DeviceId, first: u64, last: u64) -> Result<Vec<(u64, String)>> {
        self.lock(id)?;
        let (first, last) = (i64_of(self.label, first)?, i64_of(self.label, last)?);
        let rows = self
            .client()
            .query(
                "SELECT seq, hash FROM audit_records \
                 WHERE device_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq",
                &[&id.as_str(), &first, &last],
            )
            .map_err(pg_err(self.label))?;
        Ok(rows.iter().map(|r| (u64_of(r.get(0)), r.get(1))).collect())
    }

    fn insert_records(&mut self, id: &DeviceId, records: &[Record], at: &str) -> Result<u64> {
        self.lock(id)?;
        if records.is_empty() {
            return Ok(0);
        }
        let n = records.len();
        let (mut seqs, mut jsons, mut hashes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut ts, mut actors, mut actions, mut outcomes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for r in records {
            seqs.push(i64_of(self.label, r.seq)?);
            jsons.push(serde_json::to_string(r).map_err(|e| HubError::Store {
                path: self.label.to_path_buf(),
                message: format!("serializing record {}: {e}", r.seq),
            })?);
            hashes.push(r.hash.as_str());
            ts.push(r.ts.as_str());
            actors.push(r.actor.as_str());
            actions.push(r.action.as_str());
            outcomes.push(r.outcome.as_str());
        }
        // One statement per batch, every value bound as an array parameter.
        let added = self
            .client()
            .execute(
                "INSERT INTO audit_records \
                 (device_id, seq, record_json, hash, received_at, ts, actor, action, outcome) \
                 SELECT $1, r.seq, r.record_json, r.hash, $2, r.ts, r.actor, r.action, r.outcome \
                 FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], \
                             $8::text[], $9::text[]) \
                      AS r(seq, record_json, hash, ts, actor, action, outcome) \
                 ON CONFLICT (device_id, seq) DO NOTHING",
                &[
                    &id.as_str(),
                    &at,
                    &seqs,
                    &jsons,
                    &hashes,
                    &ts,
                    &actors,
                    &actions,
                    &outcomes,
                ],
            )
            .map_err(pg_err(self.label))?;
        Ok(added)
    }

    fn insert_checkpoint(&mut self, id: &DeviceId, cp: &Checkpoint, at: &str) -> Result<bool> {
        self.lock(id)?;
        let json = serde_json::to_string(cp).map_err(|e| HubError::Store {
            path: self.label.to_path_buf(),
            message: format!("serializing checkpoint {}: {e}", cp.seq),
        })?;
        let seq = i64_of(self.label, cp.seq)?;
        let added = self
            .client()
            .execute(
                "INSERT INTO audit_checkpoints (device_id, seq, checkpoint_json, received_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (device_id, seq) DO NOTHING",
                &[&id.as_str(), &seq, &json, &at],
            )
            .map_err(pg_err(self.label))?;
        Ok(added > 0)
    }

    fn set_acked_seq(&mut self, id: &DeviceId, seq: u64, at: &str) -> Result<()> {
        let seq = i64_of(self.label, seq)?;
        self.update_device(
            id,
            "UPDATE devices SET acked_seq = $2, last_seen = $3, online = COALESCE(online, TRUE) \
             WHERE id = $1",
            &[&id.as_str(), &seq, &at],
        )
    }

    fn record_alert(&mut self, a: &AlertRow<'_>) -> Result<bool> {
        self.lock(a.device_id)?;
        let seq = i64_of(self.label, a.seq)?;
        let err = pg_err(self.label);
        let mut c = self.client();
        // The device's row lock makes this check-then-insert safe between hubs.
        let seen = c
            .query_opt(
                "SELECT 1 FROM audit_alerts WHERE device_id = $1 AND kind = $2 AND seq = $3",
                &[&a.device_id.as_str(), &a.kind, &seq],
            )
            .map_err(&err)?
            .is_some();
        if seen {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO audit_alerts (device_id, at, kind, seq, detail) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&a.device_id.as_str(), &a.at, &a.kind, &seq, &a.detail],
        )
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
            id,
            "UPDATE devices SET online = $2, agent_version = $3, last_seen = $4 WHERE id = $1",
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
            id,
            "UPDATE devices SET reported_json = $2, active_model = $3, last_seen = $4, \
             online = COALESCE(online, TRUE) WHERE id = $1",
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
        let last = audit_last_seq.map(|s| i64_of(self.label, s)).transpose()?;
        self.update_device(
            id,
            "UPDATE devices SET telemetry_json = $2, telemetry_at = $3, last_seen = $3, \
             online = COALESCE(online, TRUE), audit_last_seq = COALESCE($4, audit_last_seq) \
             WHERE id = $1",
            &[&id.as_str(), &json, &at, &last],
        )
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        self.open = false;
        self.conn
            .get_mut()
            .batch_execute("COMMIT")
            .map_err(pg_err(self.label))
    }
}

pub mod testing {
    //! A throwaway PostgreSQL database for tests (this crate's and the end-to-end ones):
    //! created with a unique name on the server at [`SERVER`] (or `OUTPOST_TEST_PG`, a
    //! URL of a database to connect to for `CREATE DATABASE`), dropped when the guard is
    //! dropped, whether the test passed or not. Without a server, [`TestDb::create`] says
    //! why and returns `None` (the test skips), except under `CI=true`, where it panics:
    //! CI must run every test.

    use super::{NoTls, redacted};

    /// Where tests find PostgreSQL (trust authentication, as on the CI machine).
    pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A database that exists while this lives.
    #[derive(Debug)]
    pub struct TestDb {
        admin: String,
        name: String,
        url: String,
    }

    impl TestDb {
        /// A new empty database, or `None` (with the reason printed) when no server answers
        /// and `CI` is not `true`.
        pub fn create() -> Option<TestDb> {
            let admin = std::env::var("OUTPOST_TEST_PG").unwrap_or_else(|_| SERVER.to_string());
            let name = format!(
                "outpost_test_{}_{:016x}",
                std::process::id(),
                rand::random::<u64>()
            );
            // On a plain thread: a test may run this on an async runtime, where the blocking
            // client cannot block.
            let (a, n) = (admin.clone(), name.clone());
            let created = std::thread::spawn(move || {
                postgres::Client::connect(&a, NoTls)
                    .and_then(|mut c| c.batch_execute(&format!("CREATE DATABASE \"{n}\"")))
                    .map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("the connecting thread panicked".into()));
            if let Err(e) = created {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "PostgreSQL at {} is not usable and CI=true: the store tests must run: {e}",
                    redacted(&admin)
                );
                eprintln!(
                    "skipping: PostgreSQL at {} is not usable: {e}",
                    redacted(&admin)
                );
                return None;
            }
            let mut config: postgres::Config = admin.parse().ok()?;
            config.dbname(&name);
            let url = match (config.get_hosts().first(), config.get_ports().first()) {
                (Some(postgres::config::Host::Tcp(h)), Some(p)) => format!(
                    "postgres://{}@{h}:{p}/{name}",
                    config.get_user().unwrap_or("postgres")
                ),
                _ => format!(
                    "postgres://{}@127.0.0.1:5432/{name}",
                    config.get_user().unwrap_or("postgres")
                ),
            };
            Some(TestDb { admin, name, url })
        }

        /// Its URL.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// A plain client on it, for a test's own statements (never on an async runtime).
        pub fn client(&self) -> postgres::Client {
            match postgres::Client::connect(&self.url, NoTls) {
                Ok(c) => c,
                Err(e) => panic!("connecting to {}: {e}", self.url),
            }
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let name = self.name.clone();
            let admin = self.admin.clone();
            // On a plain thread: a test may drop this on an async runtime.
            let done = std::thread::spawn(move || {
                postgres::Client::connect(&admin, NoTls).and_then(|mut c| {
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                })
            })
            .join();
            if let Ok(Err(e)) = done {
                eprintln!("could not drop test database {}: {e}", self.name);
            }
        }
    }
}
