//! The model registry: blobs in a content-addressed store plus metadata in `registry.db`.
//!
//! `<data>/registry.db` is SQLite in WAL mode, owned by this module alone. Schema version is
//! `PRAGMA user_version`, advanced by the migrations in [`MIGRATIONS`], each in a transaction.
//!
//! - `models`: one row per (name, version), naming a blob by SHA-256; several rows may share a
//!   blob. `name` alone resolves to the most recently imported version.
//! - `aliases`: alias → model, the current activation (`default`, `chat`, …).
//! - `alias_history`: per alias, the models that were active before, newest last; `rollback`
//!   pops it. Removing a model removes it from every alias and history.
//! - `events`: the install history (import, activate, rollback, remove), append-only.
//! - schema 2: `models.source`, where the model came from: `import` (by hand, the default
//!   for rows older than the column) or `rollout:ID` (installed by sync for that rollout).
//!
//! Crash rules: a model row is inserted only after its blob is durable (see [`blobs`]), and
//! every change to the tables is one transaction, so a kill at any instant leaves either the
//! old or the new state, plus at most an unreferenced blob or temp file that `gc` removes.

pub mod blobs;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use crate::gguf::{self, GgufError};
use blobs::io_err;
pub use blobs::{BlobStore, GcReport};

/// The schema, one migration per entry; entry `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE models (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL,
    version        TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size_bytes     INTEGER NOT NULL,
    architecture   TEXT NOT NULL,
    quantization   TEXT NOT NULL,
    parameters     INTEGER NOT NULL,
    context_length INTEGER,
    imported_at    TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX models_sha256 ON models (sha256);
CREATE TABLE aliases (
    alias        TEXT PRIMARY KEY,
    model_id     INTEGER NOT NULL REFERENCES models (id),
    activated_at TEXT NOT NULL
);
CREATE TABLE alias_history (
    id       INTEGER PRIMARY KEY,
    alias    TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models (id)
);
CREATE TABLE events (
    id      INTEGER PRIMARY KEY,
    at      TEXT NOT NULL,
    action  TEXT NOT NULL,
    name    TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    alias   TEXT
);
"#,
    r#"
ALTER TABLE models ADD COLUMN source TEXT NOT NULL DEFAULT 'import';
"#,
];

/// Longest name, version or alias.
const MAX_LABEL: usize = 64;

/// Everything that can go wrong in the registry, with the path, model or reference involved.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry database {}: {source}", path.display())]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "registry database {} has schema version {found}, but this outpost understands {known} (a newer one must be read by a newer outpost; an older one is upgraded by any write command)",
        path.display()
    )]
    SchemaMismatch {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("{} is not a valid GGUF model: {source}", path.display())]
    Gguf { path: PathBuf, source: GgufError },
    #[error("{} has no general.architecture: not a model file", path.display())]
    NoArchitecture { path: PathBuf },
    #[error(
        "invalid {what} '{value}': use 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    InvalidLabel { what: &'static str, value: String },
    #[error(
        "invalid model reference '{0}': use NAME, NAME:VERSION or sha256:<12 to 64 hex digits>"
    )]
    InvalidRef(String),
    #[error("{} has SHA-256 {found}, not the expected {expected}", path.display())]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("no model matches '{0}'")]
    NotFound(String),
    #[error("'{reference}' matches {count} models; give more digits")]
    Ambiguous { reference: String, count: usize },
    #[error("model {name}:{version} already exists")]
    VersionExists { name: String, version: String },
    #[error("model {model} is active as {aliases}; activate another model first or pass --force")]
    InUse { model: String, aliases: String },
    #[error("alias '{0}' has no earlier model to roll back to")]
    NothingToRollback(String),
}

type Result<T> = std::result::Result<T, RegistryError>;

/// A model as the CLI, the API and the tests see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub architecture: String,
    pub quantization: String,
    pub parameters: u64,
    pub class: SizeClass,
    pub context_length: Option<u64>,
    pub aliases: Vec<String>,
    pub imported_at: String,
    /// Where it came from: `import` or `rollout:ID` (see [`ModelSource`]).
    pub source: String,
    #[serde(skip)]
    id: i64,
}

/// Where a model came from, as `models.source` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// Imported by hand (`outpost models import`, the API).
    Import,
    /// Installed by sync for this rollout.
    Rollout(u64),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Import => f.write_str("import"),
            Self::Rollout(id) => write!(f, "rollout:{id}"),
        }
    }
}

impl ModelRecord {
    /// `name:version`.
    pub fn label(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

/// How big a model is, by parameter count rounded to a tenth of a billion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SizeClass {
    /// Up to 1.4B.
    Micro,
    /// 1.5B to 13.9B.
    Small,
    /// 14B to 30B.
    Medium,
    /// Above 30B.
    Large,
}

impl SizeClass {
    pub fn of(parameters: u64) -> Self {
        let tenths = (parameters + 50_000_000) / 100_000_000;
        match tenths {
            0..=14 => SizeClass::Micro,
            15..=139 => SizeClass::Small,
            140..=300 => SizeClass::Medium,
            _ => SizeClass::Large,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SizeClass::Micro => "micro",
            SizeClass::Small => "small",
            SizeClass::Medium => "medium",
            SizeClass::Large => "large",
        }
    }
}

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// The latest imported version of a name.
    Name(String),
    /// One exact version.
    Version(String, String),
    /// A unique SHA-256 prefix (12 to 64 hex digits).
    Digest(String),
}

impl std::str::FromStr for ModelRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || RegistryError::InvalidRef(s.to_string());
        if let Some(hex) = s.strip_prefix("sha256:") {
            let hex = hex.to_ascii_lowercase();
            if (12..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(ModelRef::Digest(hex));
            }
            return Err(bad());
        }
        match s.split_once(':') {
            Some((name, version)) => {
                if valid_label(name) && valid_label(version) {
                    Ok(ModelRef::Version(name.into(), version.into()))
                } else {
                    Err(bad())
                }
            }
            None if valid_label(s) => Ok(ModelRef::Name(s.into())),
            None => Err(bad()),
        }
    }
}

/// What `import` did.
#[derive(Debug)]
pub enum ImportOutcome {
    Imported(ModelRecord),
    /// The same bytes were already imported under this name; nothing changed.
    AlreadyPresent(ModelRecord),
}

impl ImportOutcome {
    pub fn record(&self) -> &ModelRecord {
        match self {
            ImportOutcome::Imported(m) | ImportOutcome::AlreadyPresent(m) => m,
        }
    }
}

/// What `remove` did.
#[derive(Debug, Serialize)]
pub struct Removed {
    pub model: ModelRecord,
    /// The blob was deleted (no other entry used it).
    pub blob_deleted: bool,
    /// The blob is shared with another entry or open by a running engine, so it stays.
    pub blob_kept: bool,
}

/// What `activate` or `rollback` changed.
#[derive(Debug, Serialize)]
pub struct Activation {
    pub alias: String,
    pub previous: Option<ModelRecord>,
    pub model: ModelRecord,
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Reads the GGUF header of `file` (errors name `named`, the file the user gave): what it
/// declares, and its architecture, which a model file must have.
fn inspect_model(file: &Path, named: &Path) -> Result<(gguf::GgufInfo, String)> {
    let mut f = File::open(file).map_err(io_err(file, "opening"))?;
    let len = f.metadata().map_err(io_err(named, "reading"))?.len();
    let info = gguf::inspect_reader(BufReader::with_capacity(1 << 16, &mut f), len).map_err(
        |source_err| RegistryError::Gguf {
            path: named.to_path_buf(),
            source: source_err,
        },
    )?;
    let architecture = info
        .architecture()
        .ok_or_else(|| RegistryError::NoArchitecture {
            path: named.to_path_buf(),
        })?
        .to_string();
    Ok((info, architecture))
}

fn check_label(what: &'static str, value: &str) -> Result<()> {
    if valid_label(value) {
        Ok(())
    } else {
        Err(RegistryError::InvalidLabel {
            what,
            value: value.to_string(),
        })
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

/// The registry of one data directory.
#[derive(Debug)]
pub struct Registry {
    db_path: PathBuf,
    conn: Connection,
    blobs: BlobStore,
}

const MODEL_COLUMNS: &str = "id, name, version, sha256, size_bytes, architecture, quantization, \
     parameters, context_length, imported_at, source";

impl Registry {
    /// Opens the registry in `data_dir` for reading and writing, creating the folder, the
    /// blob store and the database (and migrating it) as needed.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(io_err(data_dir, "creating the data directory"))?;
        // SQLite reports a read-only disk as "unable to open database file"; say what it is.
        tempfile::tempfile_in(data_dir)
            .map_err(io_err(data_dir, "writing to the data directory"))?;
        let blobs = BlobStore::open(data_dir.join("blobs").join("sha256"))?;
        let db_path = data_dir.join("registry.db");
        let conn = Connection::open(&db_path).map_err(db_err(&db_path))?;
        let mut registry = Self {
            db_path,
            conn,
            blobs,
        };
        registry.init()?;
        Ok(registry)
    }

    /// Opens the registry for reading only: nothing is created or migrated, and it works on a
    /// read-only disk. A data directory without a registry reads as an empty one.
    pub fn open_read_only(data_dir: &Path) -> Result<Self> {
        let blobs = BlobStore::at(data_dir.join("blobs").join("sha256"));
        let db_path = data_dir.join("registry.db");
        let conn = if db_path.exists() {
            // On a read-only disk SQLite cannot create the WAL index; `immutable` tells it no
            // one can write there, which is then true.
            open_read_only_db(&db_path, false).or_else(|_| open_read_only_db(&db_path, true))?
        } else {
            let mut empty = Self {
                db_path: db_path.clone(),
                conn: Connection::open_in_memory().map_err(db_err(&db_path))?,
                blobs,
            };
            empty.init()?;
            return Ok(empty);
        };
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err(&db_path))?;
        if version as usize != MIGRATIONS.len() {
            return Err(RegistryError::SchemaMismatch {
                path: db_path,
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        Ok(Self {
            db_path,
            conn,
            blobs,
        })
    }

    fn init(&mut self) -> Result<()> {
        let path = self.db_path.clone();
        self.conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(db_err(&path))?;
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err(&path))?;
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(db_err(&path))?;
        self.conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err(&path))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&path))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db_err(&path))?;
        if version as usize > MIGRATIONS.len() || version < 0 {
            return Err(RegistryError::SchemaMismatch {
                path,
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(db_err(&path))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db_err(&path))?;
        }
        tx.commit().map_err(db_err(&path))
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Path of a model's GGUF file.
    pub fn model_path(&self, model: &ModelRecord) -> PathBuf {
        self.blobs.path_of(&model.sha256)
    }

    /// Imports the GGUF file at `source` as `name` (version `version`, or the next number).
    /// `progress` is called with the bytes copied so far.
    pub fn import(
        &mut self,
        source: &Path,
        name: &str,
        version: Option<&str>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImportOutcome> {
        self.import_from(source, name, version, ModelSource::Import, progress)
    }

    /// [`Registry::import`], recording where the model came from (`origin`).
    pub fn import_from(
        &mut self,
        source: &Path,
        name: &str,
        version: Option<&str>,
        origin: ModelSource,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImportOutcome> {
        check_label("model name", name)?;
        if let Some(v) = version {
            check_label("version", v)?;
            if self.find_exact(name, v)?.is_some() {
                return Err(RegistryError::VersionExists {
                    name: name.into(),
                    version: v.into(),
                });
            }
        }
        let mut input = File::open(source).map_err(io_err(source, "opening"))?;
        if input
            .metadata()
            .map_err(io_err(source, "reading"))?
            .is_dir()
        {
            return Err(RegistryError::Io {
                what: "reading",
                path: source.to_path_buf(),
                source: std::io::Error::other("is a directory"),
            });
        }
        let pending = self.blobs.ingest(&mut input, source, progress)?;
        let (info, architecture) = inspect_model(pending.path(), source)?;
        let sha256 = pending.sha256.clone();
        let size = pending.size;
        let created = self.blobs.commit(pending)?;

        let result = self.insert_model(NewModel {
            name,
            version,
            sha256: &sha256,
            size,
            architecture: &architecture,
            quantization: &info.quantization(),
            parameters: info.parameters(),
            context_length: info.context_length(),
            source: origin,
        });
        if result.is_err() && created && !self.blob_referenced(&sha256)? {
            // Best effort: the blob is unreferenced either way, and gc would find it.
            let _ = self.blobs.delete(&sha256);
        }
        result
    }

    /// Installs a verified download: the GGUF file at `source` (on the data directory's
    /// filesystem), whose SHA-256 must be `sha256`, as `name:version`. The file is checked as
    /// GGUF where it is, then MOVED into the blob store ([`BlobStore::adopt`]: hashed again,
    /// renamed, no copy), then the row is inserted. `name:version` already installed with
    /// these bytes is [`ImportOutcome::AlreadyPresent`] (the file stays where it was); with
    /// other bytes, [`RegistryError::VersionExists`]. `provenance` is recorded as the row's
    /// `source` (a rollout's id for what sync installs).
    pub fn install_file(
        &mut self,
        source: &Path,
        sha256: &str,
        name: &str,
        version: &str,
        provenance: ModelSource,
    ) -> Result<ImportOutcome> {
        check_label("model name", name)?;
        check_label("version", version)?;
        if let Some(m) = self.find_exact(name, version)? {
            if m.sha256 == sha256 {
                return Ok(ImportOutcome::AlreadyPresent(m));
            }
            return Err(RegistryError::VersionExists {
                name: name.into(),
                version: version.into(),
            });
        }
        let (info, architecture) = inspect_model(source, source)?;
        let size = std::fs::metadata(source)
            .map_err(io_err(source, "reading"))?
            .len();
        let created = self.blobs.adopt(source, sha256)?;
        let result = self.insert_model(NewModel {
            name,
            version: Some(version),
            sha256,
            size,
            architecture: &architecture,
            quantization: &info.quantization(),
            parameters: info.parameters(),
            context_length: info.context_length(),
            source: provenance,
        });
        if result.is_err() && created && !self.blob_referenced(sha256)? {
            let _ = self.blobs.delete(sha256);
        }
        result
    }

    fn insert_model(&mut self, m: NewModel<'_>) -> Result<ImportOutcome> {
        let path = self.db_path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&path))?;
        let version = match m.version {
            Some(v) => v.to_string(),
            None => {
                let existing: Option<i64> = tx
                    .query_row(
                        "SELECT id FROM models WHERE name = ?1 AND sha256 = ?2
                         ORDER BY id DESC LIMIT 1",
                        params![m.name, m.sha256],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err(&path))?;
                if let Some(id) = existing {
                    drop(tx);
                    return Ok(ImportOutcome::AlreadyPresent(self.by_id(id)?));
                }
                let mut stmt = tx
                    .prepare("SELECT version FROM models WHERE name = ?1")
                    .map_err(db_err(&path))?;
                let versions = stmt
                    .query_map([m.name], |r| r.get::<_, String>(0))
                    .map_err(db_err(&path))?;
                let mut highest = 0u64;
                for v in versions {
                    let v = v.map_err(db_err(&path))?;
                    highest = highest.max(v.parse().unwrap_or(0));
                }
                drop(stmt);
                (highest + 1).to_string()
            }
        };
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM models WHERE name = ?1 AND version = ?2)",
                params![m.name, version],
                |r| r.get(0),
            )
            .map_err(db_err(&path))?;
        if taken {
            return Err(RegistryError::VersionExists {
                name: m.name.into(),
                version,
            });
        }
        let now = now_rfc3339();
        tx.execute(
            "INSERT INTO models (name, version, sha256, size_bytes, architecture, quantization,
                                 parameters, context_length, imported_at, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                m.name,
                version,
                m.sha256,
                m.size as i64,
                m.architecture,
                m.quantization,
                m.parameters as i64,
                m.context_length.map(|c| c as i64),
                now,
                m.source.to_string()
            ],
        )
        .map_err(db_err(&path))?;
        let id = tx.last_insert_rowid();
        log_event(&tx, &path, "import", m.name, &version, m.sha256, None)?;
        tx.commit().map_err(db_err(&path))?;
        Ok(ImportOutcome::Imported(self.by_id(id)?))
    }

    /// Every model, ordered by name then import order.
    pub fn list(&self) -> Result<Vec<ModelRecord>> {
        self.query_models("1 = 1 ORDER BY name, id", [])
    }

    /// The model a reference names.
    pub fn resolve(&self, reference: &ModelRef) -> Result<ModelRecord> {
        let (found, text) = match reference {
            ModelRef::Name(n) => (
                self.query_models("name = ?1 ORDER BY id DESC LIMIT 1", [n.as_str()])?,
                n.clone(),
            ),
            ModelRef::Version(n, v) => (
                self.find_exact(n, v)?.into_iter().collect(),
                format!("{n}:{v}"),
            ),
            ModelRef::Digest(prefix) => {
                let pattern = format!("{prefix}%");
                let all = self.query_models("sha256 LIKE ?1 ORDER BY id", [pattern.as_str()])?;
                let mut digests: Vec<&str> = all.iter().map(|m| m.sha256.as_str()).collect();
                digests.dedup();
                if digests.len() > 1 {
                    return Err(RegistryError::Ambiguous {
                        reference: format!("sha256:{prefix}"),
                        count: digests.len(),
                    });
                }
                // Several names may share one blob: the latest entry stands for it.
                (
                    all.into_iter().last().into_iter().collect(),
                    format!("sha256:{prefix}"),
                )
            }
        };
        found
            .into_iter()
            .next()
            .ok_or(RegistryError::NotFound(text))
    }

    /// The model `name` stands for, as every command and the API read a model name: an
    /// alias first (`default`, `chat`, …), else a reference (`NAME`, `NAME:VERSION`,
    /// `sha256:PREFIX`). A name that is neither gives [`RegistryError::NotFound`].
    pub fn resolve_ref_or_alias(&self, name: &str) -> Result<ModelRecord> {
        if let Some(m) = self.alias(name)? {
            return Ok(m);
        }
        match name.parse::<ModelRef>() {
            Ok(reference) => self.resolve(&reference),
            Err(_) => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// The model an alias points to, if any.
    pub fn alias(&self, alias: &str) -> Result<Option<ModelRecord>> {
        let id: Option<i64> = self
            .conn
            .query_row(
                "SELECT model_id FROM aliases WHERE alias = ?1",
                [alias],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err(&self.db_path))?;
        id.map(|id| self.by_id(id)).transpose()
    }

    /// Points `alias` at the model `reference` names; the previous model can be restored with
    /// [`Registry::rollback`]. Activating the model already active changes nothing.
    pub fn activate(&mut self, reference: &ModelRef, alias: &str) -> Result<Activation> {
        check_label("alias", alias)?;
        let model = self.resolve(reference)?;
        let previous = self.alias(alias)?;
        if previous.as_ref().map(|p| p.id) == Some(model.id) {
            return Ok(Activation {
                alias: alias.into(),
                previous,
                model,
            });
        }
        let path = self.db_path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&path))?;
        if let Some(p) = &previous {
            tx.execute(
                "INSERT INTO alias_history (alias, model_id) VALUES (?1, ?2)",
                params![alias, p.id],
            )
            .map_err(db_err(&path))?;
        }
        tx.execute(
            "INSERT INTO aliases (alias, model_id, activated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (alias) DO UPDATE SET model_id = ?2, activated_at = ?3",
            params![alias, model.id, now_rfc3339()],
        )
        .map_err(db_err(&path))?;
        log_event(
            &tx,
            &path,
            "activate",
            &model.name,
            &model.version,
            &model.sha256,
            Some(alias),
        )?;
        tx.commit().map_err(db_err(&path))?;
        Ok(Activation {
            alias: alias.into(),
            previous,
            model: self.by_id(model.id)?,
        })
    }

    /// The model [`Registry::rollback`] would point `alias` at, changing nothing.
    pub fn rollback_target(&self, alias: &str) -> Result<ModelRecord> {
        check_label("alias", alias)?;
        let model_id: Option<i64> = self
            .conn
            .query_row(
                "SELECT model_id FROM alias_history WHERE alias = ?1 ORDER BY id DESC LIMIT 1",
                [alias],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err(&self.db_path))?;
        match model_id {
            Some(id) => self.by_id(id),
            None => Err(RegistryError::NothingToRollback(alias.into())),
        }
    }

    /// Points `alias` back at the model that was active before the current one.
    pub fn rollback(&mut self, alias: &str) -> Result<Activation> {
        check_label("alias", alias)?;
        let previous = self.alias(alias)?;
        let path = self.db_path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&path))?;
        let top: Option<(i64, i64)> = tx
            .query_row(
                "SELECT id, model_id FROM alias_history WHERE alias = ?1 ORDER BY id DESC LIMIT 1",
                [alias],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err(&path))?;
        let Some((row, model_id)) = top else {
            return Err(RegistryError::NothingToRollback(alias.into()));
        };
        tx.execute("DELETE FROM alias_history WHERE id = ?1", [row])
            .map_err(db_err(&path))?;
        tx.execute(
            "INSERT INTO aliases (alias, model_id, activated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (alias) DO UPDATE SET model_id = ?2, activated_at = ?3",
            params![alias, model_id, now_rfc3339()],
        )
        .map_err(db_err(&path))?;
        let (name, version, sha): (String, String, String) = tx
            .query_row(
                "SELECT name, version, sha256 FROM models WHERE id = ?1",
                [model_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db_err(&path))?;
        log_event(&tx, &path, "rollback", &name, &version, &sha, Some(alias))?;
        tx.commit().map_err(db_err(&path))?;
        Ok(Activation {
            alias: alias.into(),
            previous,
            model: self.by_id(model_id)?,
        })
    }

    /// Removes a model entry; its blob goes too once no entry references it and no engine
    /// holds it open. An active model is refused unless `force`, which also unsets its aliases.
    pub fn remove(&mut self, reference: &ModelRef, force: bool) -> Result<Removed> {
        let model = self.resolve(reference)?;
        if !model.aliases.is_empty() && !force {
            return Err(RegistryError::InUse {
                model: model.label(),
                aliases: model.aliases.join(", "),
            });
        }
        let path = self.db_path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&path))?;
        for sql in [
            "DELETE FROM aliases WHERE model_id = ?1",
            "DELETE FROM alias_history WHERE model_id = ?1",
            "DELETE FROM models WHERE id = ?1",
        ] {
            tx.execute(sql, [model.id]).map_err(db_err(&path))?;
        }
        log_event(
            &tx,
            &path,
            "remove",
            &model.name,
            &model.version,
            &model.sha256,
            None,
        )?;
        tx.commit().map_err(db_err(&path))?;
        let blob_deleted =
            !self.blob_referenced(&model.sha256)? && self.blobs.delete(&model.sha256)?;
        Ok(Removed {
            blob_kept: !blob_deleted,
            blob_deleted,
            model,
        })
    }

    /// Deletes blobs no entry references and temp files left by interrupted imports.
    pub fn gc(&self) -> Result<GcReport> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT sha256 FROM models")
            .map_err(db_err(&self.db_path))?;
        let referenced: std::collections::HashSet<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(db_err(&self.db_path))?
            .collect::<rusqlite::Result<_>>()
            .map_err(db_err(&self.db_path))?;
        self.blobs.gc(&|sha| referenced.contains(sha))
    }

    fn blob_referenced(&self, sha256: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM models WHERE sha256 = ?1)",
                [sha256],
                |r| r.get(0),
            )
            .map_err(db_err(&self.db_path))
    }

    fn find_exact(&self, name: &str, version: &str) -> Result<Option<ModelRecord>> {
        Ok(self
            .query_models("name = ?1 AND version = ?2", [name, version])?
            .into_iter()
            .next())
    }

    fn by_id(&self, id: i64) -> Result<ModelRecord> {
        self.query_models("id = ?1", [id])?
            .into_iter()
            .next()
            .ok_or_else(|| RegistryError::NotFound(format!("model #{id}")))
    }

    fn query_models<P: rusqlite::Params>(&self, filter: &str, p: P) -> Result<Vec<ModelRecord>> {
        let path = &self.db_path;
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE {filter}");
        let mut stmt = self.conn.prepare(&sql).map_err(db_err(path))?;
        let rows = stmt
            .query_map(p, |r| {
                let parameters = r.get::<_, i64>(7)? as u64;
                Ok(ModelRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    sha256: r.get(3)?,
                    size_bytes: r.get::<_, i64>(4)? as u64,
                    architecture: r.get(5)?,
                    quantization: r.get(6)?,
                    parameters,
                    class: SizeClass::of(parameters),
                    context_length: r.get::<_, Option<i64>>(8)?.map(|c| c as u64),
                    aliases: Vec::new(),
                    imported_at: r.get(9)?,
                    source: r.get(10)?,
                })
            })
            .map_err(db_err(path))?;
        let mut models = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_err(path))?;
        let mut stmt = self
            .conn
            .prepare("SELECT alias FROM aliases WHERE model_id = ?1 ORDER BY alias")
            .map_err(db_err(path))?;
        for m in &mut models {
            m.aliases = stmt
                .query_map([m.id], |r| r.get(0))
                .map_err(db_err(path))?
                .collect::<rusqlite::Result<_>>()
                .map_err(db_err(path))?;
        }
        Ok(models)
    }
}

struct NewModel<'a> {
    name: &'a str,
    version: Option<&'a str>,
    sha256: &'a str,
    size: u64,
    architecture: &'a str,
    quantization: &'a str,
    parameters: u64,
    context_length: Option<u64>,
    source: ModelSource,
}

fn log_event(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    action: &str,
    name: &str,
    version: &str,
    sha256: &str,
    alias: Option<&str>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO events (at, action, name, version, sha256, alias)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now_rfc3339(), action, name, version, sha256, alias],
    )
    .map(drop)
    .map_err(db_err(path))
}

fn open_read_only_db(path: &Path, immutable: bool) -> Result<Connection> {
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
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&uri, flags).map_err(db_err(path))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(db_err(path))?;
    // Opening is lazy: read something to learn whether it worked.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(db_err(path))?;
    Ok(conn)
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> RegistryError {
    let path = path.to_path_buf();
    move |source| RegistryError::Db {
        path: path.clone(),
        source,
    }
}

#[cfg(test)]
mod tests;
