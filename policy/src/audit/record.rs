//! The record format and its canonical form: what a record and a checkpoint hold, the RFC 8785
//! bytes their hashes and signatures cover, and the cap on `details`.
//!
//! Format (also in `docs/audit-format.md`, for auditors):
//! - A record has exactly the fields `seq`, `ts`, `device_id`, `actor`, `roles`, `action`,
//!   `resource`, `outcome`, `reason`, `request_id`, `policy_version`, `details`, `prev_hash`,
//!   `hash`; absent values are `null`, never missing. `hash` is
//!   `hex(SHA-256(JCS(record without "hash")))` (JCS: RFC 8785); `prev_hash` is the previous
//!   record's `hash`, 64 zeros for seq 1. Seqs start at 1 and have no gaps.
//! - A checkpoint signs `JCS({"device_id", "seq", "hash", "ts"})` (the record `seq`'s hash)
//!   with the device key; it is stored with the signature and the public key, both hex.
//! - `details` is a JSON object of at most [`MAX_DETAILS`] canonical bytes; anything else is
//!   replaced by `{"truncated", "original_bytes", "original_sha256"}`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jcs;

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Largest `details`, as canonical JSON; larger ones are replaced by a digest.
pub const MAX_DETAILS: usize = 4096;

/// How a decision or an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Outcome::Allowed,
            Outcome::Denied,
            Outcome::Success,
            Outcome::Failure,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// What a caller asks to record; the log adds seq, time, device and the chain.
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub roles: Vec<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: Outcome,
    pub reason: String,
    pub request_id: Option<String>,
    pub policy_version: Option<u64>,
    /// A JSON object; prompts never go here, only their SHA-256 and token counts.
    pub details: serde_json::Value,
}

impl Entry {
    pub fn new(actor: &str, action: &str, outcome: Outcome, reason: &str) -> Self {
        Self {
            actor: actor.into(),
            roles: Vec::new(),
            action: action.into(),
            resource: None,
            outcome,
            reason: reason.into(),
            request_id: None,
            policy_version: None,
            details: serde_json::Value::Object(Default::default()),
        }
    }
}

/// A record as stored and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub device_id: String,
    pub actor: String,
    pub roles: Vec<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: Outcome,
    pub reason: String,
    pub request_id: Option<String>,
    pub policy_version: Option<u64>,
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// Canonical JSON of a record without its hash, with `details` given as canonical text.
/// Keys are written in RFC 8785 order by hand (they are fixed), which is what makes appending
/// and verifying fast; a test holds this equal to the generic canonicalizer.
fn canonical_body(r: &RowRef<'_>) -> String {
    let mut s = String::with_capacity(512 + r.details.len());
    write_canonical_body(&mut s, r);
    s
}

/// [`canonical_body`] into `s` (cleared first), so hot loops reuse one buffer.
pub(super) fn write_canonical_body(s: &mut String, r: &RowRef<'_>) {
    s.clear();
    let s = &mut *s;
    let opt = |s: &mut String, v: Option<&str>| match v {
        Some(v) => jcs::push_str(s, v),
        None => s.push_str("null"),
    };
    s.push_str("{\"action\":");
    jcs::push_str(s, r.action);
    s.push_str(",\"actor\":");
    jcs::push_str(s, r.actor);
    s.push_str(",\"details\":");
    s.push_str(r.details);
    s.push_str(",\"device_id\":");
    jcs::push_str(s, r.device_id);
    s.push_str(",\"outcome\":");
    jcs::push_str(s, r.outcome);
    s.push_str(",\"policy_version\":");
    match r.policy_version {
        Some(v) => {
            let _ = write!(s, "{v}");
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"prev_hash\":");
    jcs::push_str(s, r.prev_hash);
    s.push_str(",\"reason\":");
    jcs::push_str(s, r.reason);
    s.push_str(",\"request_id\":");
    opt(s, r.request_id);
    s.push_str(",\"resource\":");
    opt(s, r.resource);
    s.push_str(",\"roles\":");
    s.push_str(r.roles);
    s.push_str(",\"seq\":");
    let _ = write!(s, "{}", r.seq);
    s.push_str(",\"ts\":");
    jcs::push_str(s, r.ts);
    s.push('}');
}

/// Borrowed view of a record's fields, `roles` and `details` as canonical JSON text.
pub(super) struct RowRef<'a> {
    pub seq: u64,
    pub ts: &'a str,
    pub device_id: &'a str,
    pub actor: &'a str,
    pub roles: &'a str,
    pub action: &'a str,
    pub resource: Option<&'a str>,
    pub outcome: &'a str,
    pub reason: &'a str,
    pub request_id: Option<&'a str>,
    pub policy_version: Option<u64>,
    pub details: &'a str,
    pub prev_hash: &'a str,
}

pub(super) fn hash_hex(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

impl Record {
    /// One line for people, as `audit query` prints it on the device and the hub: seq, time,
    /// outcome, actor, action, resource, reason, in fixed-width columns.
    pub fn summary_line(&self) -> String {
        format!(
            "{:>6} {} {:<8} {:<20} {:<16} {:<16} {}",
            self.seq,
            self.ts,
            self.outcome.as_str(),
            self.actor,
            self.action,
            self.resource.as_deref().unwrap_or("-"),
            self.reason
        )
    }

    /// The hash this record's contents give (what `hash` must be).
    pub fn compute_hash(&self) -> String {
        let details = jcs::to_string(&self.details).unwrap_or_default();
        let roles = jcs::to_string(&self.roles).unwrap_or_default();
        hash_hex(&canonical_body(&self.as_row(&roles, &details)))
    }

    fn as_row<'a>(&'a self, roles: &'a str, details: &'a str) -> RowRef<'a> {
        RowRef {
            seq: self.seq,
            ts: &self.ts,
            device_id: &self.device_id,
            actor: &self.actor,
            roles,
            action: &self.action,
            resource: self.resource.as_deref(),
            outcome: self.outcome.as_str(),
            reason: &self.reason,
            request_id: self.request_id.as_deref(),
            policy_version: self.policy_version,
            details,
            prev_hash: &self.prev_hash,
        }
    }
}

/// A signed checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub device_id: String,
    pub seq: u64,
    pub hash: String,
    pub ts: String,
    pub public_key: String,
    pub signature: String,
}

impl Checkpoint {
    /// The bytes the signature covers: `JCS({"device_id","hash","seq","ts"})`.
    pub fn signed_message(&self) -> String {
        let mut s = String::from("{\"device_id\":");
        jcs::push_str(&mut s, &self.device_id);
        s.push_str(",\"hash\":");
        jcs::push_str(&mut s, &self.hash);
        s.push_str(",\"seq\":");
        s.push_str(&self.seq.to_string());
        s.push_str(",\"ts\":");
        jcs::push_str(&mut s, &self.ts);
        s.push('}');
        s
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    format_ts(time::OffsetDateTime::now_utc())
}

pub fn format_ts(t: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// Details as a value and as canonical text, replaced by a digest when over [`MAX_DETAILS`]
/// or not an object.
pub(super) fn capped_details(details: serde_json::Value) -> (serde_json::Value, String) {
    let text = jcs::to_string(&details).unwrap_or_else(|_| "{}".into());
    if details.is_object() && text.len() <= MAX_DETAILS {
        return (details, text);
    }
    let v = serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "original_sha256": hash_hex(&text),
    });
    let t = jcs::to_string(&v).unwrap_or_else(|_| "{}".into());
    (v, t)
}

/// Whether SHA-256 of `body` is the lowercase hex `expected`, without allocating.
pub(super) fn hash_equals(body: &str, expected: &str) -> bool {
    let mut hex_buf = [0u8; 64];
    let digest = Sha256::digest(body.as_bytes());
    hex::encode_to_slice(digest, &mut hex_buf).is_ok() && hex_buf == expected.as_bytes()
}
