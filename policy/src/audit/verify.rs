//! Verification of the chain and its checkpoints: one set of rules ([`ChainVerifier`]) for
//! every source of records: `audit.db` ([`verify_log`]), a JSONL export ([`verify_export`]),
//! and any other store of a device's chain (the hub's copy feeds records to a
//! `ChainVerifier` itself).
//!
//! Reports the first bad seq and why: a record missing (deleted), a record whose `prev_hash`
//! does not link (reordered or inserted), a record whose contents do not give its hash
//! (edited), the log ending before a signed checkpoint (truncated), a checkpoint that does not
//! match its record (history rewritten) or whose signature fails (forged), a checkpoint
//! signed by a key other than the one verified against.
//!
//! Exports carry more rules, since their lines are easy to drop:
//! - every checkpoint must name a record in the export: one before its first record means
//!   records were cut from the head (an export only carries checkpoints inside its range);
//! - with a key pinned by the auditor, at least one checkpoint must cover the records, or
//!   nothing in the export is signed by that key;
//! - records have exactly the fields of the format, and a first record with seq 1 links to
//!   the genesis hash.
//!
//! What no verifier can see from the records alone: records cut after the last checkpoint,
//! together with the checkpoints over them (the export then is a shorter, valid log). The
//! report's `signed_through` says how far the signatures reach; the hub's copy of the
//! checkpoints is what catches the rest.

use std::collections::HashMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use super::reader::RawRecord;
use super::{AuditError, AuditReader, Checkpoint, GENESIS, Record};
use crate::signing::PublicKey;

/// Longest JSONL line read from an export.
const MAX_LINE: usize = 1 << 20;

/// The members of an exported record, no more, no fewer.
const RECORD_FIELDS: [&str; 14] = [
    "seq",
    "ts",
    "device_id",
    "actor",
    "roles",
    "action",
    "resource",
    "outcome",
    "reason",
    "request_id",
    "policy_version",
    "details",
    "prev_hash",
    "hash",
];

/// What verification found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The last seq a verified checkpoint covers; records after it are not signed yet.
    pub signed_through: Option<u64>,
    /// The first bad seq, when not ok.
    pub bad_seq: Option<u64>,
    pub reason: Option<String>,
    /// `pinned` (a key given by the verifier) or `log` (the key stored with the checkpoints).
    pub key: &'static str,
}

impl VerifyReport {
    /// The report for people, as `audit verify` prints it on the device and the hub: one
    /// line, "Audit log OK: …" or "Audit log FAILED at seq N: why".
    pub fn summary(&self) -> String {
        if !self.ok {
            return format!(
                "Audit log FAILED at seq {}: {}",
                self.bad_seq.unwrap_or(0),
                self.reason.as_deref().unwrap_or("unknown")
            );
        }
        let range = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!("seq {a} to {b}"),
            _ => "no records".into(),
        };
        let key = if self.key == "pinned" {
            "against the pinned device key"
        } else {
            "against the key stored in the log (pass --public-key to pin one)"
        };
        let reach = match (self.signed_through, self.last_seq) {
            (None, Some(_)) => "; no record is covered by a checkpoint yet".to_string(),
            (Some(s), Some(l)) if s < l => {
                format!("; signed through seq {s}, later records not covered by a checkpoint yet")
            }
            _ => String::new(),
        };
        format!(
            "Audit log OK: {} records ({range}), {} checkpoint signatures checked {key}{reach}.",
            self.records, self.checkpoints
        )
    }
}

struct Chain {
    /// Whether the first record must be seq 1 (a whole log) or may start anywhere (an export
    /// of a time range).
    from_genesis: bool,
    next_seq: Option<u64>,
    prev_hash: String,
    records: u64,
    first_seq: Option<u64>,
    error: Option<(u64, String)>,
    wanted: HashMap<u64, Option<String>>,
}

impl Chain {
    fn new(from_genesis: bool, checkpoints: &[Checkpoint]) -> Self {
        Self {
            from_genesis,
            next_seq: None,
            prev_hash: GENESIS.to_string(),
            records: 0,
            first_seq: None,
            error: None,
            wanted: checkpoints.iter().map(|c| (c.seq, None)).collect(),
        }
    }

    fn fail(&mut self, seq: u64, why: String) {
        if self.error.is_none() {
            self.error = Some((seq, why));
        }
    }

    /// Counts a record and checks that it comes next; its seq when it does.
    fn place(&mut self, seq: i64, prev_hash: &str) -> Option<u64> {
        if self.error.is_some() {
            return None;
        }
        self.records += 1;
        let Ok(seq) = u64::try_from(seq) else {
            self.fail(0, format!("record with negative seq {seq}"));
            return None;
        };
        let expected = match self.next_seq {
            Some(n) => n,
            None if self.from_genesis => 1,
            // A partial export: its first record's link is outside the export (seq 1 links
            // to the genesis hash, as in a whole log).
            None if seq > 1 => {
                self.prev_hash = prev_hash.to_string();
                seq
            }
            None => 1,
        };
        self.first_seq.get_or_insert(seq);
        if seq > expected {
            let what = if expected == seq - 1 {
                format!("record {expected} is missing (deleted)")
            } else {
                format!("records {expected} to {} are missing (deleted)", seq - 1)
            };
            self.fail(expected, what);
            return None;
        }
        if seq < expected {
            self.fail(seq, format!("record {seq} appears out of order"));
            return None;
        }
        Some(seq)
    }

    /// A record that could not be read at all, stored at `seq`.
    fn feed_unreadable(&mut self, seq: i64, why: &str) {
        if let Some(seq) = self.place(seq, "") {
            self.fail(seq, format!("record {seq} is malformed: {why}"));
        }
    }

    /// One record, in order; `matches`: whether its contents give its `hash`.
    fn feed(&mut self, seq: i64, prev_hash: &str, hash: &str, matches: Result<bool, String>) {
        let Some(seq) = self.place(seq, prev_hash) else {
            return;
        };
        if prev_hash != self.prev_hash {
            return self.fail(
                seq,
                format!(
                    "record {seq} does not link to record {} (reordered, inserted or rewritten)",
                    seq.saturating_sub(1)
                ),
            );
        }
        match matches {
            Err(e) => return self.fail(seq, format!("record {seq} is malformed: {e}")),
            Ok(false) => {
                return self.fail(
                    seq,
                    format!("record {seq} does not match its hash (edited)"),
                );
            }
            Ok(true) => {}
        }
        if let Some(slot) = self.wanted.get_mut(&seq) {
            *slot = Some(hash.to_string());
        }
        self.prev_hash.clear();
        self.prev_hash.push_str(hash);
        self.next_seq = Some(seq + 1);
    }

    /// Checks the checkpoints against the records fed. `key`: the key signatures must verify
    /// under (else each checkpoint's own); `require_signed`: fail when records were fed but
    /// no checkpoint covers any of them (an auditor's pinned key must sign something).
    fn finish(
        mut self,
        checkpoints: &[Checkpoint],
        key: Option<&PublicKey>,
        require_signed: bool,
    ) -> VerifyReport {
        let last_seq = self.next_seq.map(|n| n - 1);
        let mut signed_through = None;
        for cp in checkpoints {
            if self.error.as_ref().is_some_and(|(s, _)| *s <= cp.seq) {
                break;
            }
            let seq = cp.seq;
            if last_seq.is_none_or(|l| seq > l) {
                let end = last_seq.unwrap_or(0);
                self.fail(
                    end + 1,
                    format!(
                        "records end at seq {end}, but checkpoint {seq} was signed over more \
                         (truncated)"
                    ),
                );
                break;
            }
            let signer = match key {
                Some(k) if k.to_hex() != cp.public_key => {
                    self.fail(seq, format!("checkpoint {seq} is signed by another key"));
                    break;
                }
                Some(k) => Some(k.clone()),
                None => PublicKey::from_hex(&cp.public_key),
            };
            if !signer.is_some_and(|k| k.verify_hex(cp.signed_message().as_bytes(), &cp.signature))
            {
                self.fail(
                    seq,
                    format!("checkpoint {seq} has a bad signature (forged)"),
                );
                break;
            }
            match (self.wanted.get(&seq).cloned().flatten(), self.first_seq) {
                (Some(h), _) if h == cp.hash => signed_through = Some(seq),
                (None, Some(first)) if seq < first => {
                    self.fail(
                        seq,
                        format!(
                            "record {seq} is missing (deleted): checkpoint {seq} signs it, but \
                             the records start at seq {first}"
                        ),
                    );
                    break;
                }
                _ => {
                    self.fail(
                        seq,
                        format!("record {seq} differs from its signed checkpoint (rewritten)"),
                    );
                    break;
                }
            }
        }
        if require_signed
            && self.error.is_none()
            && signed_through.is_none()
            && let Some(first) = self.first_seq
        {
            self.fail(
                first,
                "no checkpoint covers these records, so nothing here is signed by the pinned \
                 key (checkpoints removed?)"
                    .into(),
            );
        }
        let (bad_seq, reason) = match self.error {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        VerifyReport {
            ok: bad_seq.is_none(),
            records: self.records,
            checkpoints: checkpoints.len() as u64,
            first_seq: self.first_seq,
            last_seq,
            signed_through,
            bad_seq,
            reason,
            key: if key.is_some() { "pinned" } else { "log" },
        }
    }
}

/// The chain rules over records from any source: records are fed in seq order, then
/// [`finish`](Self::finish) checks the checkpoints against them. `verify_log` and
/// `verify_export` are built on it, and so is the hub's verification of its copy of a
/// device's chain, so every verifier applies the same rules.
pub struct ChainVerifier {
    chain: Chain,
    checkpoints: Vec<Checkpoint>,
    buf: String,
}

impl std::fmt::Debug for ChainVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainVerifier")
            .field("records", &self.chain.records)
            .field("checkpoints", &self.checkpoints.len())
            .field("error", &self.chain.error)
            .finish()
    }
}

impl ChainVerifier {
    /// `whole_log`: the records are a whole log, so the first must be seq 1 (a local log, the
    /// hub's copy); otherwise they may start anywhere (an export of a time range).
    /// `checkpoints`: every checkpoint over these records, in any order.
    pub fn new(whole_log: bool, mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|c| c.seq);
        Self {
            chain: Chain::new(whole_log, &checkpoints),
            checkpoints,
            buf: String::with_capacity(1024),
        }
    }

    /// The next record. `problem`: what the source found wrong with it besides the chain
    /// (fields other than the format's, a store's index columns that disagree with it);
    /// the record is then reported as malformed, at its place in the chain.
    pub fn feed_record(&mut self, r: &Record, problem: Option<String>) {
        let matches = match problem {
            Some(p) => Err(p),
            None => Ok(r.compute_hash() == r.hash),
        };
        self.chain.feed(
            i64::try_from(r.seq).unwrap_or(i64::MAX),
            &r.prev_hash,
            &r.hash,
            matches,
        );
    }

    /// The next record, stored at `seq`, could not be read as a record at all.
    pub fn feed_unreadable(&mut self, seq: i64, why: &str) {
        self.chain.feed_unreadable(seq, why);
    }

    /// A row of `audit.db` as stored, without trusting its types.
    fn feed_raw(&mut self, raw: &RawRecord<'_>) {
        let matches = raw.hash_matches(&mut self.buf);
        self.chain.feed(raw.seq, raw.prev_hash, raw.hash, matches);
    }

    /// Checks the checkpoints against the records fed. `key`: the key every signature must
    /// verify under (else each checkpoint's own, and the report says `"key": "log"`);
    /// `require_signed`: fail when records were fed but no checkpoint covers any of them
    /// (an auditor's pinned key must sign something).
    pub fn finish(self, key: Option<&PublicKey>, require_signed: bool) -> VerifyReport {
        self.chain.finish(&self.checkpoints, key, require_signed)
    }
}

/// A record in the export format (a JSON object with exactly the format's fields), and what
/// is wrong with its shape, if anything. `Err`: it is not a record at all.
pub fn parse_record(v: &serde_json::Value) -> Result<(Record, Option<String>), serde_json::Error> {
    let fields_ok = v.as_object().is_some_and(|o| {
        o.len() == RECORD_FIELDS.len() && RECORD_FIELDS.iter().all(|f| o.contains_key(*f))
    });
    let record = Record::deserialize(v)?;
    let problem =
        (!fields_ok).then(|| format!("its fields are not exactly {}", RECORD_FIELDS.join(", ")));
    Ok((record, problem))
}

/// Verifies the whole log. `pinned`: the device public key the auditor trusts; without it,
/// the key stored with the checkpoints is used (and the report says so).
pub fn verify_log(
    reader: &AuditReader,
    pinned: Option<&PublicKey>,
) -> Result<VerifyReport, AuditError> {
    let mut verifier = ChainVerifier::new(true, reader.checkpoints()?);
    reader.for_each_raw(|raw| {
        verifier.feed_raw(raw);
        Ok(())
    })?;
    // A log cut short by a crash has an unsigned tail, or no checkpoint at all: not an error.
    Ok(verifier.finish(pinned, false))
}

/// Verifies a JSONL export (see `export`): its records may start anywhere, but must be
/// contiguous from there, and its checkpoints must hold.
pub fn verify_export(
    mut input: impl BufRead,
    pinned: Option<&PublicKey>,
) -> Result<VerifyReport, AuditError> {
    let mut records: Vec<(Record, Option<String>)> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut exported_key: Option<PublicKey> = None;
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = std::io::Read::take(&mut input, MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| AuditError::Export(format!("reading the export: {e}")))?;
        if read == 0 {
            break;
        }
        n += 1;
        if line.len() > MAX_LINE {
            return Err(AuditError::Export(format!(
                "line {n} is longer than {MAX_LINE} bytes"
            )));
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| AuditError::Export(format!("line {n} is not JSON: {e}")))?;
        let bad = |e: serde_json::Error| AuditError::Export(format!("line {n}: {e}"));
        if let Some(r) = v.get("record") {
            records.push(parse_record(r).map_err(bad)?);
        } else if let Some(c) = v.get("checkpoint") {
            checkpoints.push(serde_json::from_value(c.clone()).map_err(bad)?);
        } else if let Some(d) = v.get("device") {
            exported_key = d
                .get("public_key")
                .and_then(|k| k.as_str())
                .and_then(PublicKey::from_hex);
        } else {
            return Err(AuditError::Export(format!(
                "line {n} is neither a record, a checkpoint nor the device header"
            )));
        }
    }
    let mut verifier = ChainVerifier::new(false, checkpoints);
    for (r, problem) in records {
        verifier.feed_record(&r, problem);
    }
    let key = pinned.cloned().or(exported_key);
    let mut report = verifier.finish(key.as_ref(), pinned.is_some());
    if pinned.is_none() {
        report.key = "log";
    }
    Ok(report)
}
