//! `devices enroll`: a device's client certificate (CN = its id, signed by the fleet CA),
//! its registration in the store (groups, audit public key), recorded in the hub's own
//! audit chain (`<data_dir>/audit.db`, the policy crate's log, signed with
//! `<data_dir>/hub-audit.key`): the intent durably first (no record, no action), then the
//! files and the row, then the outcome.
//!
//! Everything that can be checked is checked before the intent is written: the id and
//! groups, the audit key (the PEM `outpost keys device` prints), the CA, that the device is
//! not enrolled yet, and that `OUT/ID.pem` and `OUT/ID.key` do not exist.

use std::path::{Path, PathBuf};

use outpost_policy::audit::{AuditLog, AuditSettings, Entry, Outcome};
use outpost_policy::signing::{KeyPair, PublicKey};

use super::pki::{Ca, PkiPaths};
use super::store::{DeviceRecord, StoreConfig};
use super::{HUB_IDENTITY, HubError, Result, make_dir, refuse_existing, write_new};
use crate::protocol::{DeviceId, GroupId};

/// The hub's audit log and its key, in the data directory.
pub const AUDIT_DB: &str = "audit.db";
pub const AUDIT_KEY: &str = "hub-audit.key";
/// The `action` of an enrollment's audit records.
pub const ACTION_ENROLL: &str = "devices:enroll";

/// What `devices enroll` was asked.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    pub id: DeviceId,
    pub groups: Vec<GroupId>,
    pub audit_key: PathBuf,
    pub pki: PathBuf,
    pub out: PathBuf,
    /// Who asks (`local:<user>` on the command line).
    pub actor: String,
}

/// Opens the hub's own audit log (creating its key on first use).
pub fn open_audit_log(data_dir: &Path) -> Result<AuditLog> {
    let key = KeyPair::load_or_generate(&data_dir.join(AUDIT_KEY))?;
    Ok(AuditLog::open(
        &data_dir.join(AUDIT_DB),
        key,
        AuditSettings::new(HUB_IDENTITY),
    )?)
}

/// Runs `act` between its intent and outcome records in the hub's own audit chain (no
/// record, no action): the intent durably first, then `act`, then the outcome (`done`'s
/// words on success, the error on failure). Generic over the error so that tools beside
/// the hub (the fleet simulator) record their actions the same way.
pub fn audited_action<T, E>(
    data_dir: &Path,
    mut intent: Entry,
    act: impl FnOnce() -> Result<T, E>,
    done: impl FnOnce(&T) -> String,
) -> Result<T, E>
where
    E: From<super::HubError> + std::fmt::Display,
{
    let log = open_audit_log(data_dir)?;
    log.append(intent.clone()).map_err(super::HubError::from)?;
    let result = act();
    match &result {
        Ok(v) => {
            intent.outcome = Outcome::Success;
            intent.reason = done(v);
        }
        Err(e) => {
            intent.outcome = Outcome::Failure;
            // `{:#}`: the whole chain of an error that has one (anyhow).
            intent.reason = format!("{e:#}");
        }
    }
    let recorded = log.append(intent).map_err(super::HubError::from);
    let closed = log.close().map_err(super::HubError::from);
    let value = result?;
    recorded?;
    closed?;
    Ok(value)
}

/// Enrolls one device; see the module header for the order of things.
pub fn enroll(data_dir: &Path, store: &StoreConfig, req: &EnrollRequest) -> Result<DeviceRecord> {
    let audit_key = PublicKey::load(&req.audit_key)?;
    let ca = Ca::load(&PkiPaths::new(&req.pki))?;
    let data_dir = make_dir(data_dir)?;
    let mut store = store.open()?;
    if store.device(&req.id)?.is_some() {
        return Err(HubError::AlreadyEnrolled(req.id.to_string()));
    }
    let out = make_dir(&req.out)?;
    let cert_path = out.join(format!("{}.pem", req.id));
    let key_path = out.join(format!("{}.key", req.id));
    let ca_path = out.join("ca.pem");
    refuse_existing(&[cert_path.clone(), key_path.clone()])?;
    if let Ok(existing) = std::fs::read_to_string(&ca_path)
        && existing != ca.cert_pem()
    {
        return Err(HubError::BadFile {
            what: "CA certificate",
            path: ca_path,
            reason: "exists and is another CA's; refusing to overwrite it".into(),
        });
    }
    let mut groups = req.groups.clone();
    groups.sort();
    groups.dedup();

    let mut intent = Entry::new(
        &req.actor,
        ACTION_ENROLL,
        Outcome::Allowed,
        "local command line",
    );
    intent.resource = Some(req.id.to_string());
    intent.details = serde_json::json!({
        "groups": groups.iter().map(GroupId::as_str).collect::<Vec<_>>(),
        "audit_key": audit_key.to_hex(),
        "cert": cert_path.display().to_string(),
    });
    let act = || -> Result<DeviceRecord> {
        let issued = ca.client(req.id.as_str())?;
        issued.write(&cert_path, &key_path)?;
        if !ca_path.exists() {
            write_new(&ca_path, ca.cert_pem().as_bytes(), 0o644)?;
        }
        let record = DeviceRecord::enrolled(req.id.clone(), groups, audit_key.to_hex(), &req.actor);
        store.enroll(&record)?;
        Ok(record)
    };
    audited_action(
        &data_dir,
        intent,
        || {
            let result = act();
            if result.is_err() {
                // A failed enrollment leaves no certificate behind, so it can simply be run
                // again.
                for p in [&cert_path, &key_path] {
                    let _ = std::fs::remove_file(p);
                }
            }
            result
        },
        |_| "enrolled".into(),
    )
}
