//! The service layer's base: what every command and the daemon share. The data directory and
//! the name of every file in it, the device's identity, opening the audit log, the token
//! verifier and the trusted clock, the local actor's name, time parsing, and [`audited`], the
//! one rule for privileged actions (no durable record of the intent, no action).
//!
//! `commands` (the CLI) and `daemon` both build on this module; neither imports the other,
//! except that `commands` calls `daemon::run` to start the daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use outpost_policy::audit::{AuditError, AuditLog, AuditSettings, Entry, Outcome};
use outpost_policy::identity::{PinnedKey, Verifier};
use outpost_policy::rbac::{Action, Policy};
use outpost_policy::revocation::RevocationList;
use outpost_policy::signing::{KeyPair, PublicKey};
use outpost_policy::time::TrustedClock;
use outpost_sync::conn::{self, LinkConfig};
use outpost_sync::protocol::DeviceId;
use outpost_sync::release::PinnedKeys;

use crate::config::{self, ConfigError, Loaded};

/// The data directory, and where each long-lived file in it lives. Each file has one owning
/// module (ARCHITECTURE.md, "Invariants"); this type only names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    /// The directory itself (the registry takes it whole: `registry.db` and `blobs/`).
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// The model registry (`engine::registry`).
    pub fn registry_db(&self) -> PathBuf {
        self.0.join("registry.db")
    }

    /// Model files by content (`engine::registry`).
    pub fn blobs(&self) -> PathBuf {
        self.0.join("blobs")
    }

    /// The hash-chained audit log (`policy::audit`).
    pub fn audit_db(&self) -> PathBuf {
        self.0.join("audit.db")
    }

    /// Sync cursors, pending transfers and telemetry (`sync`).
    pub fn outbox_db(&self) -> PathBuf {
        self.0.join("outbox.db")
    }

    /// Partial model downloads (`sync::transfer`'s; on the registry's filesystem, so an
    /// install is a rename).
    pub fn downloads(&self) -> PathBuf {
        self.0.join("downloads")
    }

    /// The device key that signs audit checkpoints, unless `[device] key` says elsewhere.
    pub fn device_key(&self) -> PathBuf {
        self.0.join("device.key")
    }

    /// The trusted clock's floor (`policy::time`).
    pub fn trusted_time(&self) -> PathBuf {
        self.0.join("trusted-time")
    }

    /// Every file and folder above by name, as `config check --json` shows them.
    pub fn files(&self) -> std::collections::BTreeMap<&'static str, PathBuf> {
        [
            ("registry", self.registry_db()),
            ("blobs", self.blobs()),
            ("audit", self.audit_db()),
            ("outbox", self.outbox_db()),
            ("downloads", self.downloads()),
            ("device_key", self.device_key()),
            ("trusted_time", self.trusted_time()),
        ]
        .into_iter()
        .collect()
    }

    pub fn display(&self) -> std::path::Display<'_> {
        self.0.display()
    }
}

/// What every command gets: the validated configuration and the global flags.
#[derive(Debug)]
pub struct Context {
    pub loaded: Loaded,
    pub json: bool,
    data_dir_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
}

impl Context {
    pub fn new(
        loaded: Loaded,
        json: bool,
        data_dir_flag: Option<PathBuf>,
        config_flag: Option<PathBuf>,
    ) -> Self {
        Self {
            loaded,
            json,
            data_dir_flag,
            config_flag,
        }
    }

    /// Flag or `OUTPOST_DATA_DIR`, else `[device] data_dir`, else the default.
    pub fn data_dir(&self) -> DataDir {
        DataDir::new(
            self.data_dir_flag
                .clone()
                .or_else(|| self.loaded.config.device.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR)),
        )
    }

    /// Refuses root in a data directory another user owns (the packaged service's user
    /// `outpost`): what root would create there (a database's `-wal` and `-shm`, a blob, the
    /// device key) is root's, mode 0600, and the service could no longer open it. The
    /// message says how to run the command as the owner. A data directory that does not
    /// exist yet belongs to whoever creates it.
    pub fn check_data_dir_owner(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let data = self.data_dir();
        let Ok(meta) = std::fs::metadata(data.root()) else {
            return Ok(());
        };
        let owner = meta.uid();
        if !nix::unistd::geteuid().is_root() || owner == 0 {
            return Ok(());
        }
        let user = match nix::unistd::User::from_uid(owner.into()) {
            Ok(Some(u)) => u.name,
            _ => format!("'#{owner}'"),
        };
        anyhow::bail!(
            "the data directory {} belongs to user {user}, and what root writes there the \
             service cannot read: run the command as {user} (sudo -u {user} outpost ...)",
            data.display()
        )
    }

    /// The `--config` given, for child processes.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_flag.as_deref()
    }

    /// `[device] id`, else the host name (made a valid id), else `unknown-device`.
    pub fn device_id(&self) -> String {
        if let Some(id) = &self.loaded.config.device.id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let id: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if id.is_empty() {
            "unknown-device".into()
        } else {
            id
        }
    }

    /// The audiences a token must name one of: the device id and its groups.
    pub fn audiences(&self) -> Vec<String> {
        let mut v = vec![self.device_id()];
        v.extend(self.loaded.config.device.groups.iter().cloned());
        v
    }

    /// Where the device key lives: `[device] key`, else `<data>/device.key`.
    pub fn device_key_path(&self) -> PathBuf {
        self.loaded
            .config
            .device
            .key
            .clone()
            .unwrap_or_else(|| self.data_dir().device_key())
    }

    /// The audit log, for appending (creates the data dir, the log and the device key).
    /// Fails early, and clearly, when the data directory cannot take a write: every
    /// privileged action needs its record, so none happens then.
    pub fn open_audit(&self) -> anyhow::Result<AuditLog> {
        let data = self.data_dir();
        std::fs::create_dir_all(data.root())
            .with_context(|| format!("cannot create the data directory {}", data.display()))?;
        probe_writable(data.root()).with_context(|| {
            format!(
                "refusing to act: the data directory {} cannot take a write",
                data.display()
            )
        })?;
        let key = KeyPair::load_or_generate(&self.device_key_path())?;
        let mut settings = AuditSettings::new(&self.device_id());
        let audit = &self.loaded.config.audit;
        if let Some(n) = audit.checkpoint_every {
            settings.checkpoint_every = n;
        }
        if let Some(s) = audit.checkpoint_interval_secs {
            settings.checkpoint_interval = Duration::from_secs(s);
        }
        Ok(AuditLog::open(&data.audit_db(), key, settings)?)
    }

    /// The token verifier and the policy, from `[auth]`. Problems are configuration errors.
    pub fn auth(&self) -> Result<(Verifier, Policy), ConfigError> {
        let auth = &self.loaded.config.auth;
        let bad = |message: String| ConfigError {
            file: self.loaded.files.last().cloned(),
            line: None,
            message,
        };
        let mut keys = Vec::new();
        for i in &auth.issuers {
            keys.push(
                PinnedKey::load(&i.iss, &i.kid, i.algorithm, &i.public_key)
                    .map_err(|e| bad(format!("key `auth.issuers` (kid {}): {e}", i.kid)))?,
            );
        }
        let mut verifier = Verifier::new(keys, self.audiences(), auth.leeway_secs);
        if let Some(p) = &auth.revoked {
            verifier.revoked =
                RevocationList::load(p).map_err(|e| bad(format!("key `auth.revoked`: {e}")))?;
        }
        let policy = match &auth.policy {
            Some(p) => Policy::load(p).map_err(|e| bad(format!("key `auth.policy`: {e}")))?,
            None => Policy::builtin(),
        };
        Ok((verifier, policy))
    }

    /// `[sync]` as the link's settings, its files checked (readable, the key matching the
    /// certificate, the certificate's CN equal to `[device] id`); `None` without `[sync]`.
    /// Problems are configuration errors naming the config file and the `sync.*` key.
    pub fn sync_link(&self) -> Result<Option<LinkConfig>, ConfigError> {
        let Some(sync) = &self.loaded.config.sync else {
            return Ok(None);
        };
        // `config::load` already refused a `[sync]` without a valid `[device] id`.
        let id = self.loaded.config.device.id.as_deref().unwrap_or_default();
        let id = DeviceId::new(id).map_err(|e| self.loaded.error("device", "id", e))?;
        let link = sync.link(id.clone());
        conn::check_identity(&link, &id)
            .map_err(|e| self.loaded.error("sync", config::sync_key(&e), e))?;
        self.release_keys()?;
        Ok(Some(link))
    }

    /// `[[sync.release_keys]]`, each key read (an unreadable file or one that is not an
    /// Ed25519 public key is a configuration error naming it).
    pub fn release_keys(&self) -> Result<PinnedKeys, ConfigError> {
        let mut keys = PinnedKeys::new();
        let Some(sync) = &self.loaded.config.sync else {
            return Ok(keys);
        };
        for k in &sync.release_keys {
            let key = PublicKey::load(&k.public_key).map_err(|e| {
                self.loaded
                    .error("sync", "release_keys", format!("kid '{}': {e}", k.kid))
            })?;
            if !keys.insert(&k.kid, key) {
                return Err(self.loaded.error(
                    "sync",
                    "release_keys",
                    format!("kid '{}' is listed twice", k.kid),
                ));
            }
        }
        Ok(keys)
    }

    /// The trusted clock, its floor kept in `<data>/trusted-time`.
    pub fn clock(&self) -> TrustedClock {
        TrustedClock::open(&self.data_dir().trusted_time())
    }
}

/// Writes (and removes) 64 KiB in `dir`: a read-only or full disk shows here, with its own
/// error, instead of as a SQLite I/O error halfway through an action.
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = tempfile::tempfile_in(dir)?;
    f.write_all(&[0u8; 64 * 1024])?;
    f.flush()
}

/// `local:<user>` for whoever runs the CLI. The name comes from the system's user database
/// (NSS: `/etc/passwd`, LDAP, systemd's `DynamicUser` accounts alike), else `uid-<n>`.
pub fn local_actor() -> String {
    let uid = nix::unistd::Uid::current();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => format!("local:{}", user.name),
        _ => format!("local:uid-{uid}"),
    }
}

/// Why an audited action did not happen, or failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditedError<E> {
    /// The intent could not be recorded, so nothing was done.
    #[error("refusing to act without an audit record")]
    Unrecorded(#[source] AuditError),
    /// The action ran and failed (its outcome is recorded).
    #[error(transparent)]
    Failed(E),
}

/// An audit entry for `actor` doing `action`, allowed for `reason`.
pub fn intent(actor: &str, action: Action, resource: Option<&str>, reason: &str) -> Entry {
    let mut e = Entry::new(actor, action.as_str(), Outcome::Allowed, reason);
    e.resource = resource.map(str::to_string);
    e
}

/// Runs a privileged action under the audit log, for the CLI and the daemon alike: the
/// `intent` is recorded durably before anything changes (no record, no action), then `f`
/// runs, then its outcome is recorded (`done` describes a success, the error a failure).
/// Blocking: the daemon calls it from a blocking task.
pub fn audited<T, E: std::fmt::Display>(
    log: &AuditLog,
    intent: Entry,
    f: impl FnOnce() -> Result<T, E>,
    done: impl FnOnce(&T) -> String,
) -> Result<T, AuditedError<E>> {
    log.append(intent.clone())
        .map_err(AuditedError::Unrecorded)?;
    let result = f();
    let mut outcome = intent;
    match &result {
        Ok(v) => {
            outcome.outcome = Outcome::Success;
            outcome.reason = done(v);
        }
        Err(e) => {
            outcome.outcome = Outcome::Failure;
            outcome.reason = format!("{e:#}");
        }
    }
    if let Err(e) = log.append(outcome) {
        tracing::warn!(error = %e, "The outcome of an action could not be recorded in the audit log.");
    }
    result.map_err(AuditedError::Failed)
}

/// [`audited`] for a command run by a local user (`local:<name>`, "local command line").
pub fn audited_local<T>(
    log: &AuditLog,
    action: Action,
    resource: Option<&str>,
    details: serde_json::Value,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut e = intent(&local_actor(), action, resource, "local command line");
    e.details = details;
    audited(log, e, f, |_| "done".into()).map_err(|e| match e {
        AuditedError::Unrecorded(source) => {
            anyhow::Error::new(source).context("refusing to act without an audit record")
        }
        AuditedError::Failed(e) => e,
    })
}

/// Durations and times as people write them: one parser for the device's and the hub's
/// commands, in the policy crate.
pub use outpost_policy::time::{parse_duration, parse_time};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_directory_names_its_files() {
        let d = DataDir::new("/var/lib/outpost");
        assert_eq!(d.audit_db(), Path::new("/var/lib/outpost/audit.db"));
        assert_eq!(d.registry_db(), Path::new("/var/lib/outpost/registry.db"));
        assert_eq!(d.outbox_db(), Path::new("/var/lib/outpost/outbox.db"));
        assert_eq!(d.blobs(), Path::new("/var/lib/outpost/blobs"));
        assert_eq!(d.device_key(), Path::new("/var/lib/outpost/device.key"));
        assert_eq!(d.trusted_time(), Path::new("/var/lib/outpost/trusted-time"));
    }
}
