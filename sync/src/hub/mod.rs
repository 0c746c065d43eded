//! The cloud side, `outpost-hub`: its configuration ([`config`]), the fleet's PKI ([`pki`],
//! the only home of `rcgen`), the broker's configuration and ACL ([`broker`] for Mosquitto, [`rabbitmq`]), its store
//! ([`store`]: the [`HubStore`] trait and `<data_dir>/hub.db`), enrollment ([`enroll`],
//! recorded in the hub's own audit chain, `<data_dir>/audit.db`), serving: what a device's
//! message does to the store ([`ingest`]) and the loop around the broker link ([`serve`]),
//! and the auditors' reads of each device's chain as the hub holds it ([`audit`]: query,
//! export, verify against the enrolled key).
//!
//! Files of the hub's data directory: `hub.db` (owned by [`store`]), `audit.db` (owned by the
//! policy crate's audit log) and `hub-audit.key` (the key that signs the hub's checkpoints).
//! Invariants: the hub acts only after its intent is durably in `audit.db` (no record, no
//! action); it acks only what is committed to `hub.db`, and stores nothing a check refused.

pub mod audit;
pub mod blobs;
pub mod broker;
pub mod config;
pub mod enroll;
mod gguf_keys;
pub mod ingest;
pub mod metrics;
pub mod pki;
pub mod rabbitmq;
pub mod rollout;
pub mod serve;
pub mod store;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use store::{DeviceRecord, HubStore, SqliteStore, Store, StoreConfig};

/// The hub's MQTT identity: the CN of its client certificate, the broker username its ACL
/// names, and the client id it connects with.
pub const HUB_IDENTITY: &str = "outpost-hub";

/// What went wrong in a hub command, naming the file, device or setting concerned.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("certificates: {0}")]
    Pki(String),
    #[error("{} is not a usable {what}: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("hub store {}: {message}", path.display())]
    Store { path: PathBuf, message: String },
    #[error(
        "hub store {} has schema version {found}, newer than this hub knows ({known}); nothing was changed",
        path.display()
    )]
    Schema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("device {0} is already enrolled")]
    AlreadyEnrolled(String),
    #[error("model {0} is already published (publish it under another version)")]
    AlreadyPublished(String),
    #[error("{0}")]
    Release(String),
    #[error("serving stopped: {0}")]
    Serve(String),
    #[error("ingest for device {device}: {message}")]
    Ingest { device: String, message: String },
    #[error("device {0} is not enrolled on this hub")]
    NotEnrolled(String),
    #[error("device {device}'s enrolled audit key {key:?} is not an Ed25519 public key")]
    EnrolledKey { device: String, key: String },
    #[error("the hub's copy of device {device}'s audit chain: {message}")]
    Chain { device: String, message: String },
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    #[error(transparent)]
    Conn(#[from] crate::ConnError),
    #[error(transparent)]
    Key(#[from] outpost_policy::signing::KeyError),
    #[error(transparent)]
    Audit(#[from] outpost_policy::audit::AuditError),
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HubError + use<> {
    let path = path.to_path_buf();
    move |source| HubError::Io { what, path, source }
}

/// Creates `path` with `contents` and `mode`, never replacing a file; fsynced.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                HubError::Exists(path.to_path_buf())
            } else {
                HubError::Io {
                    what: "creating",
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", path))
}

/// Fails with [`HubError::Exists`] if any of `paths` exists.
pub(crate) fn refuse_existing(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        if p.symlink_metadata().is_ok() {
            return Err(HubError::Exists(p.clone()));
        }
    }
    Ok(())
}

/// Creates `dir` (and its parents) if missing, then returns its absolute path.
pub(crate) fn make_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err("creating folder", dir))?;
    std::fs::canonicalize(dir).map_err(io_err("resolving", dir))
}

/// Reads a small text file (certificates, keys), refusing one over `max` bytes.
pub(crate) fn read_small(what: &'static str, path: &Path, max: u64) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(io_err("reading", path))?;
    if meta.len() > max {
        return Err(HubError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: format!("{} bytes is over the limit of {max}", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io_err("reading", path))
}

#[cfg(test)]
mod tests;
