//! Ingest: what the hub does with one message from a device, as decisions over a store
//! transaction ([`IngestTx`]); no MQTT here (`serve` feeds it and sends the acks).
//!
//! A message is handled in two steps. [`prepare`] needs no store: it reads the topic (the
//! device is the topic's, never a payload's), checks the size before parsing (the caps are
//! the protocol's, [`protocol::MAX_AUDIT_BATCH_BYTES`] and the others, shared with the
//! device), decodes with the protocol's decoder and, for an audit batch, checks its seqs,
//! that its envelope names the topic's device, and the chain inside the batch (each record's
//! hash is what its contents give, each `prev_hash` is the previous record's hash).
//! [`apply`] then runs inside the write transaction, so the head it reads is the head it
//! extends.
//!
//! Identity: the enrolled KEY is the device's identity, and the topic says which enrolled
//! device a message belongs to (the broker's ACL lets a certificate write only its own
//! topics). A batch's envelope (`AuditBatch.device_id`) must name the topic's device. The
//! `device_id` inside records and checkpoints is what the device's log wrote (a log begun
//! before `[device] id` was set names the host) and is not held against the topic's id: a
//! checkpoint is verified with the enrolled key over its own signed message, whatever device
//! it names, and the chain (hashes, links, the stored head) holds the records together.
//!
//! An audit batch, against the stored head H (the device's highest stored seq; all records
//! below it are stored, [`crate::hub::store`]'s invariant):
//! - refused, without a trace in the store ([`Refusal`], a closed set of metric labels):
//!   `too_large`, `malformed`, `unknown_version`, `unknown_device` (not enrolled),
//!   `wrong_device` (the envelope names another device than the topic), `bad_seqs` (gaps,
//!   reordering, seq 0, seqs beyond SQL's BIGINT);
//! - refused with an alert ([`AlertKind`]: a row in `audit_alerts`, kept once per device,
//!   kind and seq): `break` (the chain inside the batch does not hold: a record edited,
//!   re-hashed or reordered), `fork` (a record at or below H differs from the stored one),
//!   `truncation` (the record at H+1 does not link to the stored hash of H: the device's
//!   chain no longer continues the history the hub holds), `forged_checkpoint` (the batch's
//!   checkpoint carries another key than the enrolled one, does not verify with the enrolled
//!   key, or signs a hash other than its record's);
//! - `ahead` (it starts after H+1: a batch that overtook another, normal with several hubs
//!   or a redelivery): nothing stored, acked with H. When `serve` gives up waiting for the
//!   head to reach it, [`note_behind`] compares H with the `last_acked_seq` the device last
//!   reported: above H, the hub is behind the device (its `hub.db` restored from an older
//!   backup) and that is alerted as `behind` at seq H, once; the batch is still acked with
//!   H, which is what lets the device send from there again;
//! - `duplicate` (every record at or below H and equal to the stored one): acked with H;
//! - `stored`: the records above H inserted, the checkpoint too when it is at or below the
//!   new head (one beyond it is ignored: a later batch carries it again), `acked_seq` set to
//!   the new head; acked with it once the transaction has committed.
//!
//! A checkpoint's signature is verified once per prepared message: the key it verified with
//! is kept with it, so applying a parked batch again costs no second Ed25519 verification.
//!
//! Invariant: nothing a check refuses reaches the store; a checkpoint is stored only after
//! its signature verified with the enrolled key and its hash matched the stored record's.
//!
//! `status`, `state/reported` and `telemetry` update the device's row (unknown devices are
//! ignored and counted, bad payloads refused and counted); `devices/{id}/blobs/get` is
//! `serve`'s blob server's ([`super::blobs`]); here it is only counted and ignored.

use std::sync::OnceLock;

use outpost_policy::audit::{Checkpoint, Record};
use outpost_policy::signing::PublicKey;

use super::store::{AlertRow, IngestTx};
use super::{HubError, Result};
use crate::protocol::{
    self, AuditBatch, DeviceId, DeviceTopic, LinkState, MAX_AUDIT_BATCH_BYTES, MAX_STATE_BYTES,
    MAX_STATUS_BYTES, MAX_TELEMETRY_BYTES, ProtocolError, ReportedState, Route, Status, Telemetry,
};
/// Longest `agent_version` kept (the column is `VARCHAR(200)`).
pub const MAX_AGENT_VERSION: usize = 200;
/// Longest `default` alias target kept as the active model (`VARCHAR(400)`).
pub const MAX_ACTIVE_MODEL: usize = 400;
/// The alias whose target is the device's active model.
pub const DEFAULT_ALIAS: &str = "default";
/// The telemetry metric with the device's last audit seq.
pub const AUDIT_LAST_SEQ_METRIC: &str = "audit_last_seq";

/// Why a message was refused without an alert; the labels are a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    TooLarge,
    Malformed,
    UnknownVersion,
    UnknownDevice,
    WrongDevice,
    BadSeqs,
    /// A topic the hub does not read (it subscribes to none such).
    UnknownTopic,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::TooLarge,
        Refusal::Malformed,
        Refusal::UnknownVersion,
        Refusal::UnknownDevice,
        Refusal::WrongDevice,
        Refusal::BadSeqs,
        Refusal::UnknownTopic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed",
            Refusal::UnknownVersion => "unknown_version",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::WrongDevice => "wrong_device",
            Refusal::BadSeqs => "bad_seqs",
            Refusal::UnknownTopic => "unknown_topic",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What an alert says happened to a device's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    Break,
    Fork,
    Truncation,
    ForgedCheckpoint,
    /// The device reports an acked seq above the hub's head: the hub lost what it had
    /// acked (its store restored from an older backup). Not a refusal: see [`note_behind`].
    Behind,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::Break,
        AlertKind::Fork,
        AlertKind::Truncation,
        AlertKind::ForgedCheckpoint,
        AlertKind::Behind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Break => "break",
            AlertKind::Fork => "fork",
            AlertKind::Truncation => "truncation",
            AlertKind::ForgedCheckpoint => "forged_checkpoint",
            AlertKind::Behind => "behind",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A problem with a device's chain: the seq it concerns and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub seq: u64,
    pub detail: String,
}

/// Which topic a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Audit,
    Status,
    StateReported,
    Telemetry,
    BlobsGet,
    Other,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Audit,
        Kind::Status,
        Kind::StateReported,
        Kind::Telemetry,
        Kind::BlobsGet,
        Kind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audit => "audit",
            Kind::Status => "status",
            Kind::StateReported => "state_reported",
            Kind::Telemetry => "telemetry",
            Kind::BlobsGet => "blobs_get",
            Kind::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Audit: records above the head stored (`records` new ones), the head is now `head`;
    /// `checkpoint`: the seq of the checkpoint stored with them, if one was new.
    Stored {
        first_seq: u64,
        last_seq: u64,
        records: u64,
        head: u64,
        checkpoint: Option<u64>,
    },
    /// Audit: everything in the batch was stored already, and equal.
    Duplicate {
        head: u64,
    },
    /// Audit: the batch starts after `head + 1`; nothing stored.
    Ahead {
        first_seq: u64,
        head: u64,
    },
    /// Audit: refused with an alert; `new` is false when the same alert was stored before.
    Alerted {
        alert: Alert,
        new: bool,
    },
    /// Status, reported state or telemetry written to the device's row.
    Updated,
    /// Counted, not acted on (blob requests, until blob transfer exists).
    Ignored,
    Refused {
        reason: Refusal,
        detail: String,
    },
}

impl Outcome {
    /// The seq to ack to the device: the stored head after stored, duplicate and ahead
    /// batches; nothing for anything refused.
    pub fn acked_seq(&self) -> Option<u64> {
        match self {
            Outcome::Stored { head, .. }
            | Outcome::Duplicate { head }
            | Outcome::Ahead { head, .. } => Some(*head),
            _ => None,
        }
    }

    /// Its label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Stored { .. } => "stored",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Ahead { .. } => "ahead",
            Outcome::Alerted { alert, .. } => alert.kind.as_str(),
            Outcome::Updated => "updated",
            Outcome::Ignored => "ignored",
            Outcome::Refused { reason, .. } => reason.as_str(),
        }
    }
}

/// A handled message: its kind, its device (from the topic) and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub kind: Kind,
    pub device: Option<DeviceId>,
    pub outcome: Outcome,
}

/// A message read and checked without the store, for [`apply`].
#[derive(Debug, Clone)]
pub struct Prepared {
    kind: Kind,
    device: Option<DeviceId>,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Audit {
        batch: Box<AuditBatch>,
        /// A break inside the batch, alerted once the device is known to be enrolled.
        chain: Option<Alert>,
        /// The enrolled key (hex) the checkpoint's signature verified with, once it has: a
        /// parked batch applied again is not verified again.
        verified_with: OnceLock<String>,
    },
    Status(Status),
    /// Boxed: a reported state (rollout, download, models) is the largest body by far.
    State(Box<ReportedState>),
    Telemetry(Telemetry),
    Ignored,
    Refused {
        reason: Refusal,
        detail: String,
    },
}

impl Prepared {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// For an audit batch: its first and last seq.
    pub fn seqs(&self) -> Option<(u64, u64)> {
        match &self.body {
            Body::Audit { batch, .. } => Some((batch.first_seq, batch.last_seq)),
            _ => None,
        }
    }

    pub fn device(&self) -> Option<&DeviceId> {
        self.device.as_ref()
    }

    /// For an audit batch: the key its checkpoint's signature verified with, once it has.
    pub fn checkpoint_verified_with(&self) -> Option<&str> {
        match &self.body {
            Body::Audit { verified_with, .. } => verified_with.get().map(String::as_str),
            _ => None,
        }
    }
}

/// A bounded, printable excerpt of a string from a payload, for details and logs.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

fn refused(reason: Refusal, detail: impl Into<String>) -> Body {
    Body::Refused {
        reason,
        detail: detail.into(),
    }
}

/// How a decoder's error is counted.
fn decode_refusal(e: &ProtocolError) -> Refusal {
    match e {
        ProtocolError::TooLarge { .. } => Refusal::TooLarge,
        ProtocolError::UnknownVersion { .. } => Refusal::UnknownVersion,
        _ => Refusal::Malformed,
    }
}

/// Reads a message from `topic` without the store; see the module header.
pub fn prepare(topic: &str, payload: &[u8]) -> Prepared {
    let (id, kind) = match protocol::parse_topic(topic) {
        // `serve` hands chunk requests to its blob server; one that reaches ingest anyway
        // is counted and ignored.
        Ok(Route::Device {
            id,
            kind: DeviceTopic::BlobsGet,
        }) => {
            return Prepared {
                kind: Kind::BlobsGet,
                device: Some(id),
                body: Body::Ignored,
            };
        }
        Ok(Route::Device { id, kind }) if kind.is_upward() => (id, kind),
        Ok(_) => {
            return Prepared {
                kind: Kind::Other,
                device: None,
                body: refused(Refusal::UnknownTopic, format!("topic {}", clip(topic))),
            };
        }
        Err(e) => {
            return Prepared {
                kind: Kind::Other,
                device: None,
                body: refused(Refusal::UnknownTopic, e.to_string()),
            };
        }
    };
    let (kind, body) = match kind {
        DeviceTopic::Audit => (Kind::Audit, prepare_audit(&id, payload)),
        DeviceTopic::Status => (
            Kind::Status,
            match protocol::decode::<Status>(payload, MAX_STATUS_BYTES) {
                Ok(s) if s.agent_version.len() > MAX_AGENT_VERSION => refused(
                    Refusal::Malformed,
                    format!("agent_version is over {MAX_AGENT_VERSION} bytes"),
                ),
                Ok(s) => Body::Status(s),
                Err(e) => refused(decode_refusal(&e), e.to_string()),
            },
        ),
        DeviceTopic::StateReported => (
            Kind::StateReported,
            match protocol::decode::<ReportedState>(payload, MAX_STATE_BYTES) {
                Ok(s) if s.aliases.get(DEFAULT_ALIAS).map_or(0, String::len) > MAX_ACTIVE_MODEL => {
                    refused(
                        Refusal::Malformed,
                        format!("the {DEFAULT_ALIAS} alias is over {MAX_ACTIVE_MODEL} bytes"),
                    )
                }
                Ok(s) => Body::State(Box::new(s)),
                Err(e) => refused(decode_refusal(&e), e.to_string()),
            },
        ),
        DeviceTopic::Telemetry => (
            Kind::Telemetry,
            match protocol::decode::<Telemetry>(payload, MAX_TELEMETRY_BYTES) {
                Ok(t) => Body::Telemetry(t),
                Err(e) => refused(decode_refusal(&e), e.to_string()),
            },
        ),
        // `is_upward` above leaves only these four (chunk requests were taken out first).
        _ => (
            Kind::Other,
            refused(Refusal::UnknownTopic, format!("topic {}", clip(topic))),
        ),
    };
    Prepared {
        kind,
        device: Some(id),
        body,
    }
}

fn prepare_audit(id: &DeviceId, payload: &[u8]) -> Body {
    let batch = match protocol::decode::<AuditBatch>(payload, MAX_AUDIT_BATCH_BYTES) {
        Ok(b) => b,
        Err(e) => return refused(decode_refusal(&e), e.to_string()),
    };
    if let Err(e) = batch.check(id) {
        let reason = if batch.device_id != *id {
            Refusal::WrongDevice
        } else {
            Refusal::BadSeqs
        };
        return refused(reason, e.to_string());
    }
    if i64::try_from(batch.last_seq).is_err() {
        return refused(
            Refusal::BadSeqs,
            format!("seq {} is beyond what the store holds", batch.last_seq),
        );
    }
    // The records' own `device_id` is not checked: see the module header.
    let chain = chain_break(&batch.records);
    Body::Audit {
        batch: Box::new(batch),
        chain,
        verified_with: OnceLock::new(),
    }
}

/// The first record of `records` whose hash is not what its contents give, or that does
/// not link to the record before it.
fn chain_break(records: &[Record]) -> Option<Alert> {
    let mut prev: Option<&Record> = None;
    for r in records {
        if let Some(p) = prev
            && r.prev_hash != p.hash
        {
            return Some(Alert {
                kind: AlertKind::Break,
                seq: r.seq,
                detail: format!(
                    "record {} has prev_hash {}, record {} has hash {}",
                    r.seq,
                    clip(&r.prev_hash),
                    p.seq,
                    clip(&p.hash)
                ),
            });
        }
        let computed = r.compute_hash();
        if computed != r.hash {
            return Some(Alert {
                kind: AlertKind::Break,
                seq: r.seq,
                detail: format!(
                    "record {} says hash {}, its contents give {computed:?}",
                    r.seq,
                    clip(&r.hash)
                ),
            });
        }
        prev = Some(r);
    }
    None
}

/// Handles a prepared message inside `tx`; `now` is the time written with it (RFC 3339).
/// An error is the store's: the caller drops the transaction and sends no ack.
pub fn apply(tx: &mut dyn IngestTx, prepared: &Prepared, now: &str) -> Result<Handled> {
    let outcome = match (&prepared.body, &prepared.device) {
        (Body::Refused { reason, detail }, _) => Outcome::Refused {
            reason: *reason,
            detail: detail.clone(),
        },
        (Body::Ignored, _) => Outcome::Ignored,
        (_, None) => Outcome::Refused {
            reason: Refusal::UnknownTopic,
            detail: "no device in the topic".into(),
        },
        (body, Some(id)) => match tx.audit_key(id)? {
            None => Outcome::Refused {
                reason: Refusal::UnknownDevice,
                detail: format!("device {id} is not enrolled"),
            },
            Some(key) => apply_known(tx, id, &key, body, now)?,
        },
    };
    Ok(Handled {
        kind: prepared.kind,
        device: prepared.device.clone(),
        outcome,
    })
}

/// [`apply`] for an enrolled device.
fn apply_known(
    tx: &mut dyn IngestTx,
    id: &DeviceId,
    key: &str,
    body: &Body,
    now: &str,
) -> Result<Outcome> {
    Ok(match body {
        Body::Audit {
            batch,
            chain,
            verified_with,
        } => apply_audit(tx, id, key, batch, chain.clone(), verified_with, now)?,
        Body::Status(s) => {
            let online = s.state == LinkState::Online;
            tx.set_status(id, online, &s.agent_version, now)?;
            Outcome::Updated
        }
        Body::State(s) => {
            let active = s.aliases.get(DEFAULT_ALIAS).map(String::as_str);
            tx.set_reported_state(id, &to_json(id, s)?, active, now)?;
            Outcome::Updated
        }
        Body::Telemetry(t) => {
            let last = t
                .metrics
                .get(AUDIT_LAST_SEQ_METRIC)
                .and_then(serde_json::Value::as_u64)
                .filter(|s| i64::try_from(*s).is_ok());
            tx.set_telemetry(id, &to_json(id, t)?, last, now)?;
            Outcome::Updated
        }
        Body::Ignored => Outcome::Ignored,
        Body::Refused { reason, detail } => Outcome::Refused {
            reason: *reason,
            detail: detail.clone(),
        },
    })
}

fn to_json<T: serde::Serialize>(id: &DeviceId, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| inconsistent(id, format!("serializing: {e}")))
}

/// A hub-side problem (never the device's): the message is not handled, nor acked.
fn inconsistent(id: &DeviceId, message: String) -> HubError {
    HubError::Ingest {
        device: id.to_string(),
        message,
    }
}

/// Records `alert` for `id` and returns the outcome.
fn alerted(tx: &mut dyn IngestTx, id: &DeviceId, alert: Alert, now: &str) -> Result<Outcome> {
    let new = tx.record_alert(&AlertRow {
        device_id: id,
        at: now,
        kind: alert.kind.as_str(),
        seq: alert.seq,
        detail: &alert.detail,
    })?;
    Ok(Outcome::Alerted { alert, new })
}

fn apply_audit(
    tx: &mut dyn IngestTx,
    id: &DeviceId,
    key: &str,
    batch: &AuditBatch,
    chain: Option<Alert>,
    verified_with: &OnceLock<String>,
    now: &str,
) -> Result<Outcome> {
    if let Some(alert) = chain {
        return alerted(tx, id, alert, now);
    }
    let head = tx.audit_head(id)?;
    let (first, last) = (batch.first_seq, batch.last_seq);
    let at = |seq: u64| &batch.records[(seq - first) as usize];

    // What the hub holds already must be what the batch says.
    if first <= head.seq {
        let upto = last.min(head.seq);
        let stored = tx.stored_hashes(id, first, upto)?;
        for seq in first..=upto {
            let r = at(seq);
            let found = stored
                .get((seq - first) as usize)
                .filter(|(s, _)| *s == seq);
            match found {
                Some((_, hash)) if *hash == r.hash => {}
                Some((_, hash)) => {
                    let alert = Alert {
                        kind: AlertKind::Fork,
                        seq,
                        detail: format!(
                            "record {seq} has hash {}, the hub stored {hash:?}",
                            clip(&r.hash)
                        ),
                    };
                    return alerted(tx, id, alert, now);
                }
                None => {
                    return Err(inconsistent(
                        id,
                        format!("stored record {seq} is missing below the head {}", head.seq),
                    ));
                }
            }
        }
    }

    // Where the batch stands against the head.
    let ahead = first > head.seq.saturating_add(1);
    let new_head = if ahead || last <= head.seq {
        head.seq
    } else {
        let next = at(head.seq + 1);
        if next.prev_hash != head.hash {
            let alert = Alert {
                kind: AlertKind::Truncation,
                seq: next.seq,
                detail: format!(
                    "record {} has prev_hash {}, the hub's record {} has hash {:?}",
                    next.seq,
                    clip(&next.prev_hash),
                    head.seq,
                    head.hash
                ),
            };
            return alerted(tx, id, alert, now);
        }
        last
    };

    // The checkpoint: verified in full, or the whole batch is refused.
    let mut store_cp = None;
    if let Some(cp) = &batch.checkpoint {
        match checkpoint_problem(tx, id, key, cp, verified_with, batch, new_head)? {
            Some(alert) => return alerted(tx, id, alert, now),
            None if cp.seq <= new_head => store_cp = Some(cp),
            None => {}
        }
    }

    let mut records = 0;
    if new_head > head.seq {
        let from = (head.seq + 1 - first) as usize;
        records = tx.insert_records(id, &batch.records[from..], now)?;
    }
    let checkpoint = match store_cp {
        Some(cp) if tx.insert_checkpoint(id, cp, now)? => Some(cp.seq),
        _ => None,
    };
    if new_head > head.seq {
        tx.set_acked_seq(id, new_head, now)?;
    }
    Ok(if ahead {
        Outcome::Ahead {
            first_seq: first,
            head: new_head,
        }
    } else if new_head > head.seq {
        Outcome::Stored {
            first_seq: first,
            last_seq: last,
            records,
            head: new_head,
            checkpoint,
        }
    } else {
        Outcome::Duplicate { head: new_head }
    })
}

/// For a device whose `ahead` batch `serve` stopped waiting on, the stored head being
/// `head`: when the device's last reported state (`state/reported`) says it had an ack
/// above `head`, the hub is behind the device (its store restored from an older backup)
/// and that is alerted as `behind` at seq `head`, recorded once per head. `None` when the
/// device reported nothing above it.
pub fn note_behind(
    tx: &mut dyn IngestTx,
    id: &DeviceId,
    head: u64,
    now: &str,
) -> Result<Option<Outcome>> {
    let Some(json) = tx.reported_state(id)? else {
        return Ok(None);
    };
    // Written by `apply` from a decoded `ReportedState`; unreadable only if a later
    // version's hub wrote it, which says nothing about this device's acks.
    let Ok(state) = protocol::decode::<ReportedState>(json.as_bytes(), usize::MAX) else {
        return Ok(None);
    };
    if state.last_acked_seq <= head {
        return Ok(None);
    }
    let alert = Alert {
        kind: AlertKind::Behind,
        seq: head,
        detail: format!(
            "the device reports records acked up to seq {}, the hub holds up to seq {head}: \
             the hub's store is behind the device (restored from an older backup?)",
            state.last_acked_seq
        ),
    };
    alerted(tx, id, alert, now).map(Some)
}

/// What is wrong with a batch's checkpoint, if anything: it must carry the enrolled key and
/// verify with it (over its own signed message, whatever device it names), and, when at or
/// below the new head, sign its record's hash (from the batch, else from the store).
/// `verified_with` remembers the key the signature verified with.
fn checkpoint_problem(
    tx: &dyn IngestTx,
    id: &DeviceId,
    key: &str,
    cp: &Checkpoint,
    verified_with: &OnceLock<String>,
    batch: &AuditBatch,
    new_head: u64,
) -> Result<Option<Alert>> {
    let forged = |detail: String| {
        Ok(Some(Alert {
            kind: AlertKind::ForgedCheckpoint,
            seq: cp.seq,
            detail,
        }))
    };
    if !cp.public_key.eq_ignore_ascii_case(key) {
        return forged(format!(
            "checkpoint {} carries key {}, the enrolled key is {key}",
            cp.seq,
            clip(&cp.public_key)
        ));
    }
    if verified_with.get().map(String::as_str) != Some(key) {
        let Some(public) = PublicKey::from_hex(key) else {
            return Err(inconsistent(
                id,
                "the enrolled audit key is not an Ed25519 key".into(),
            ));
        };
        if !public.verify_hex(cp.signed_message().as_bytes(), &cp.signature) {
            return forged(format!(
                "checkpoint {}: the signature does not verify with the enrolled key",
                cp.seq
            ));
        }
        // Set once: a message is applied by one thread at a time, and a different enrolled
        // key later (never: keys are not changed) would just verify again.
        let _ = verified_with.set(key.to_string());
    }
    if cp.seq == 0 {
        return forged("checkpoint names seq 0".into());
    }
    if cp.seq > new_head {
        return Ok(None);
    }
    let hash = if (batch.first_seq..=batch.last_seq).contains(&cp.seq) {
        Some(
            batch.records[(cp.seq - batch.first_seq) as usize]
                .hash
                .clone(),
        )
    } else {
        tx.stored_hashes(id, cp.seq, cp.seq)?
            .into_iter()
            .next()
            .map(|(_, h)| h)
    };
    match hash {
        Some(h) if h == cp.hash => Ok(None),
        Some(h) => forged(format!(
            "checkpoint {} signs hash {}, record {} has hash {h:?}",
            cp.seq,
            clip(&cp.hash),
            cp.seq
        )),
        None => Err(inconsistent(
            id,
            format!("stored record {} is missing below the head", cp.seq),
        )),
    }
}

#[cfg(test)]
mod tests;
