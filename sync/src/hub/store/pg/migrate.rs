//! `outpost-hub migrate --from sqlite:PATH --to postgres://…`: moves a hub's store from
//! `hub.db` into an empty PostgreSQL database, then verifies every device's chain there.
//!
//! Rules:
//! - The source is opened read-only (nothing in `hub.db` changes; a `serve` writing it
//!   meanwhile should be stopped first, or what it writes after the copy began stays
//!   behind) and must be of this hub's schema version; the target is migrated to the same
//!   version, and refused when any of its tables holds a row (a migration never merges).
//! - Every table of the schema is copied whole, column by column as PostgreSQL types them
//!   (read from `information_schema`, so a table a later migration adds is copied without a
//!   change here), parents before children, in one transaction with `COPY … FORMAT binary`:
//!   a failure leaves the target empty. `audit_alerts` keeps its order (`rowid`).
//! - After the commit: each table's row count is compared with the source's, and every
//!   enrolled device's chain is verified in the target with the auditors' verifier
//!   ([`crate::hub::audit::DeviceChain::verify`]: from seq 1, against the enrolled key).

use std::path::Path;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use rusqlite::types::ValueRef;
use serde::Serialize;

use super::{PgStore, pg_err};
use crate::hub::audit::{DeviceChain, HubVerifyReport};
use crate::hub::store::{HubStore, SqliteStore};
use crate::hub::{HubError, Result};

/// Parents before children (foreign keys); tables not listed come after, by name.
const ORDER: &[&str] = &[
    "devices",
    "device_groups",
    "audit_records",
    "audit_checkpoints",
    "audit_alerts",
    "models",
    "rollouts",
    "desired_docs",
];

/// What `migrate` did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Each table and the rows copied.
    pub tables: Vec<(String, u64)>,
    /// Every device's chain, verified in the target.
    pub devices: Vec<HubVerifyReport>,
}

impl MigrateReport {
    /// Whether every device's chain verified.
    pub fn ok(&self) -> bool {
        self.devices.iter().all(|d| d.chain.ok)
    }
}

/// A column as the target types it.
struct Column {
    name: String,
    ty: Type,
}

/// Copies `<from_dir>/hub.db` into the empty database at `to_url` and verifies it there.
pub fn sqlite_to_postgres(from_dir: &Path, to_url: &str) -> Result<MigrateReport> {
    let source = SqliteStore::open_read_only(from_dir)?;
    let target = PgStore::open(to_url)?;
    let label = target.label.clone();
    let err = pg_err(&label);
    let bad = |message: String| HubError::Store {
        path: label.clone(),
        message,
    };
    let mut c = target.conn()?;
    let mut tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' \
             AND table_name <> 'schema_version'",
            &[],
        )
        .map_err(&err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tables.sort_by_key(|t| {
        (
            ORDER.iter().position(|o| o == t).unwrap_or(ORDER.len()),
            t.clone(),
        )
    });
    for t in &tables {
        // The name comes from the catalogue, never from input; quoted all the same.
        let any: bool = c
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM \"{t}\")"), &[])
            .map_err(&err)?
            .get(0);
        if any {
            return Err(bad(format!(
                "table {t} holds rows; migrate copies into an empty database only (nothing \
                 was changed)"
            )));
        }
    }

    let mut copied = Vec::with_capacity(tables.len());
    let mut tx = c.transaction().map_err(&err)?;
    for t in &tables {
        let columns: Vec<Column> = tx
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 \
                 ORDER BY ordinal_position",
                &[t],
            )
            .map_err(&err)?
            .iter()
            .map(|r| {
                let (name, ty): (String, String) = (r.get(0), r.get(1));
                let ty = match ty.as_str() {
                    "bigint" => Type::INT8,
                    "integer" => Type::INT4,
                    "boolean" => Type::BOOL,
                    "text" => Type::TEXT,
                    "character varying" => Type::VARCHAR,
                    other => {
                        return Err(bad(format!(
                            "column {t}.{name} has type {other}, unknown here"
                        )));
                    }
                };
                Ok(Column { name, ty })
            })
            .collect::<Result<_>>()?;
        let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
        let names = names.join(", ");
        let types: Vec<Type> = columns.iter().map(|c| c.ty.clone()).collect();
        let writer = tx
            .copy_in(&format!(
                "COPY \"{t}\" ({names}) FROM STDIN (FORMAT binary)"
            ))
            .map_err(&err)?;
        let mut writer = BinaryCopyInWriter::new(writer, &types);
        let src_err = |e: rusqlite::Error| HubError::Store {
            path: from_dir.join(SqliteStore::FILE),
            message: format!("reading table {t}: {e}"),
        };
        let mut stmt = source
            .conn
            .prepare(&format!("SELECT {names} FROM \"{t}\" ORDER BY rowid"))
            .map_err(src_err)?;
        let mut rows = stmt.query([]).map_err(src_err)?;
        while let Some(row) = rows.next().map_err(src_err)? {
            let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(columns.len());
            for (i, col) in columns.iter().enumerate() {
                let v = row.get_ref(i).map_err(src_err)?;
                values.push(convert(v, &col.ty).ok_or_else(|| {
                    bad(format!(
                        "{t}.{}: a value of type {:?} does not fit {}",
                        col.name,
                        v.data_type(),
                        col.ty
                    ))
                })?);
            }
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_ref()).collect();
            writer.write(&refs).map_err(&err)?;
        }
        let n = writer.finish().map_err(&err)?;
        copied.push((t.clone(), n));
    }
    tx.commit().map_err(&err)?;

    // Counted again on both sides, then every chain verified where it now is.
    for (t, n) in &copied {
        let src: i64 = source
            .conn
            .query_row(&format!("SELECT COUNT(*) FROM \"{t}\""), [], |r| r.get(0))
            .map_err(|e| HubError::Store {
                path: from_dir.join(SqliteStore::FILE),
                message: format!("counting {t}: {e}"),
            })?;
        let dst: i64 = c
            .query_one(&format!("SELECT COUNT(*) FROM \"{t}\""), &[])
            .map_err(&err)?
            .get(0);
        if i64::try_from(*n).ok() != Some(src) || src != dst {
            return Err(bad(format!(
                "table {t}: {src} rows in the source, {n} copied, {dst} in the target"
            )));
        }
    }
    drop(c);
    let mut devices = Vec::new();
    for d in target.devices()? {
        devices.push(DeviceChain::open(&target, &d.id)?.verify()?);
    }
    Ok(MigrateReport {
        tables: copied,
        devices,
    })
}

/// A SQLite value as the target column's type; `None` when it does not fit.
fn convert(v: ValueRef<'_>, ty: &Type) -> Option<Box<dyn ToSql + Sync>> {
    Some(match (v, ty) {
        (ValueRef::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (ValueRef::Null, t) if *t == Type::INT4 => Box::new(None::<i32>),
        (ValueRef::Null, t) if *t == Type::BOOL => Box::new(None::<bool>),
        (ValueRef::Null, _) => Box::new(None::<String>),
        (ValueRef::Integer(i), t) if *t == Type::INT8 => Box::new(i),
        (ValueRef::Integer(i), t) if *t == Type::INT4 => Box::new(i32::try_from(i).ok()?),
        (ValueRef::Integer(i), t) if *t == Type::BOOL => Box::new(i != 0),
        (ValueRef::Text(s), t) if *t == Type::TEXT || *t == Type::VARCHAR => {
            Box::new(std::str::from_utf8(s).ok()?.to_string())
        }
        _ => return None,
    })
}
