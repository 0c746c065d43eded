//! The auditors' reads of the hub's copy of a device's chain (`outpost-hub audit
//! query|export|verify --device ID`), through the policy crate's export and chain verifier:
//! the same filters, export format and rules as `outpost audit` on the device, over records
//! from `hub.db` instead of `audit.db`.
//!
//! Rules:
//! - Nothing here writes: the commands open the store with `SqliteStore::open_read_only`.
//! - Trust: verification pins the device's *enrolled* key (`devices.audit_key`), never the
//!   key a checkpoint carries, and starts at seq 1: the hub's copy is a whole log. Exports
//!   carry the enrolled key in their header, so `docs/verify_audit.py` and `outpost audit
//!   verify --export` check them the same way.
//! - Each stored record is checked as the device's `record_json`, in the export format
//!   (exactly its fields), and its index columns (`seq`, `hash`, `ts`, `actor`, `action`,
//!   `outcome`) must agree with it: queries filter on those columns, so a verified copy
//!   answers queries truthfully.
//! - A record's `device_id` is not held against the enrolled id: the key is the device's
//!   identity, and a log begun before `[device] id` was set names the host instead.
//! - Alerts (`audit_alerts`: a break, fork, truncation or forged checkpoint that ingest saw
//!   and refused) are reported beside the verification, not as its failure: ingest stores
//!   nothing that does not extend the verified chain, so an alert is evidence about the
//!   device, while `ok` says whether the hub's copy holds. Scripts read `alerts` in the JSON.

use std::io::Write;
use std::path::Path;

use outpost_policy::audit::{
    self, AuditError, ChainVerifier, Checkpoint, Format, Query, Record, RecordSource, VerifyReport,
    parse_record,
};
use outpost_policy::signing::PublicKey;
use serde::Serialize;

use super::store::{AuditAlert, DeviceRecord, HubStore, StoredRecord};
use super::{HubError, Result};
use crate::protocol::DeviceId;

/// How many of the newest alerts `verify` shows (the count is always complete).
pub const ALERTS_SHOWN: u64 = 20;

/// One enrolled device's chain as the hub holds it.
pub struct DeviceChain<'a> {
    store: &'a dyn HubStore,
    device: DeviceRecord,
    key: PublicKey,
}

impl std::fmt::Debug for DeviceChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceChain({})", self.device.id)
    }
}

/// What `verify` found: the chain report as the device's `audit verify` gives it, plus the
/// device and the alerts ingest recorded for it.
#[derive(Debug, Clone, Serialize)]
pub struct HubVerifyReport {
    pub device: String,
    #[serde(flatten)]
    pub chain: VerifyReport,
    /// Every alert recorded for the device.
    pub alerts: u64,
    /// The newest of them (at most [`ALERTS_SHOWN`]), oldest first.
    pub latest_alerts: Vec<AuditAlert>,
}

impl<'a> DeviceChain<'a> {
    /// The chain of `id`, which must be enrolled with a usable audit key.
    pub fn open(store: &'a dyn HubStore, id: &DeviceId) -> Result<Self> {
        let device = store
            .device(id)?
            .ok_or_else(|| HubError::NotEnrolled(id.to_string()))?;
        let key = PublicKey::from_hex(&device.audit_key).ok_or_else(|| HubError::EnrolledKey {
            device: id.to_string(),
            key: device.audit_key.clone(),
        })?;
        Ok(Self { store, device, key })
    }

    pub fn device(&self) -> &DeviceRecord {
        &self.device
    }

    /// The enrolled key, which every checkpoint must be signed with.
    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    /// Streams the records `q` selects, oldest first. A stored record that is not a record
    /// is an error naming its seq (`verify` says more).
    pub fn for_each(&self, q: &Query, mut f: impl FnMut(Record) -> Result<()>) -> Result<()> {
        self.store
            .for_each_audit_record(&self.device.id, q, &mut |row| f(self.parse(row)?))
    }

    /// Records `q` selects, oldest first (for a page; use [`for_each`](Self::for_each) for
    /// everything).
    pub fn query(&self, q: &Query) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        self.for_each(q, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The export of the device's `audit export` (same format, header with the device id and
    /// the enrolled key), written from the hub's copy. Returns the number of records.
    pub fn export(&self, q: &Query, format: Format, out: &mut dyn Write) -> Result<u64> {
        Ok(audit::export(
            self,
            q,
            format,
            self.device.id.as_str(),
            Some(&self.key),
            out,
        )?)
    }

    /// [`export`](Self::export) into the file at `path`, which appears whole or not at all.
    pub fn export_to_file(&self, q: &Query, format: Format, path: &Path) -> Result<u64> {
        Ok(audit::export_to_file(
            self,
            q,
            format,
            self.device.id.as_str(),
            Some(&self.key),
            path,
        )?)
    }

    /// Verifies the hub's copy from seq 1 against the enrolled key; see the module header.
    pub fn verify(&self) -> Result<HubVerifyReport> {
        let mut verifier = ChainVerifier::new(true, self.store.audit_checkpoints(&self.device.id)?);
        self.store
            .for_each_audit_record(&self.device.id, &Query::default(), &mut |row| {
                feed(&mut verifier, row);
                Ok(())
            })?;
        let chain = verifier.finish(Some(&self.key), false);
        let (alerts, latest_alerts) = self.store.audit_alerts(&self.device.id, ALERTS_SHOWN)?;
        Ok(HubVerifyReport {
            device: self.device.id.to_string(),
            chain,
            alerts,
            latest_alerts,
        })
    }

    fn parse(&self, row: &StoredRecord<'_>) -> Result<Record> {
        serde_json::from_str(row.record_json).map_err(|e| HubError::Chain {
            device: self.device.id.to_string(),
            message: format!("stored record {} is not a record: {e}", row.seq),
        })
    }
}

/// One stored row into the verifier: the record as the device sent it, in the export
/// format, and its index columns held against it.
fn feed(verifier: &mut ChainVerifier, row: &StoredRecord<'_>) {
    let value: serde_json::Value = match serde_json::from_str(row.record_json) {
        Ok(v) => v,
        Err(e) => return verifier.feed_unreadable(row.seq, &format!("not JSON: {e}")),
    };
    let (record, problem) = match parse_record(&value) {
        Ok(parsed) => parsed,
        Err(e) => return verifier.feed_unreadable(row.seq, &format!("not a record: {e}")),
    };
    if i64::try_from(record.seq).ok() != Some(row.seq) {
        let why = format!(
            "it is stored as seq {} but says seq {}",
            row.seq, record.seq
        );
        return verifier.feed_unreadable(row.seq, &why);
    }
    let problem = problem.or_else(|| columns_disagree(row, &record));
    verifier.feed_record(&record, problem);
}

/// Which index column disagrees with the record, if any.
fn columns_disagree(row: &StoredRecord<'_>, r: &Record) -> Option<String> {
    let columns = [
        ("hash", Some(row.hash), r.hash.as_str()),
        ("ts", row.ts, r.ts.as_str()),
        ("actor", row.actor, r.actor.as_str()),
        ("action", row.action, r.action.as_str()),
        ("outcome", row.outcome, r.outcome.as_str()),
    ];
    columns
        .into_iter()
        .find(|(_, stored, actual)| *stored != Some(*actual))
        .map(|(name, stored, actual)| {
            let stored = stored.map_or("nothing".to_string(), |s| format!("{s:?}"));
            format!(
                "its {name} column says {stored}, the record {actual:?} (queries filter on \
                 the column)"
            )
        })
}

impl RecordSource for DeviceChain<'_> {
    fn for_each_record(
        &self,
        q: &Query,
        f: &mut dyn FnMut(Record) -> std::result::Result<(), AuditError>,
    ) -> std::result::Result<(), AuditError> {
        self.for_each(q, |r| f(r).map_err(HubError::Audit))
            .map_err(into_audit_error)
    }

    fn checkpoints(&self) -> std::result::Result<Vec<Checkpoint>, AuditError> {
        self.store
            .audit_checkpoints(&self.device.id)
            .map_err(into_audit_error)
    }
}

/// Back through the policy crate's export: its own errors as they were, the store's as text.
fn into_audit_error(e: HubError) -> AuditError {
    match e {
        HubError::Audit(a) => a,
        other => AuditError::Export(other.to_string()),
    }
}

impl HubVerifyReport {
    /// For people: the device's `audit verify` line, then the alerts, if any.
    pub fn summary(&self) -> String {
        let mut s = self.chain.summary();
        if self.alerts > 0 {
            s.push_str(&format!(
                "\n{} alert(s) recorded for device {} (ingest refused what they describe; \
                 the copy verified above does not contain it):",
                self.alerts, self.device
            ));
            if self.alerts > self.latest_alerts.len() as u64 {
                s.push_str(&format!(" the newest {}:", self.latest_alerts.len()));
            }
            for a in &self.latest_alerts {
                let seq = a.seq.map_or("-".to_string(), |s| s.to_string());
                s.push_str(&format!("\n  {} {} seq {seq}: {}", a.at, a.kind, a.detail));
            }
        }
        s
    }
}
