//! Signed release documents: the model **manifest** and the **desired state** that points a
//! device or a group at one, with their canonical bytes, Ed25519 signatures, and the device's
//! checks ([`verify_desired`]) and precedence rule ([`pick_desired`]). Pure data, no I/O.
//!
//! Signing: a document's signatures cover `CONTEXT || JCS(document without "signatures")`,
//! RFC 8785 canonical JSON from `outpost_policy::jcs` (as the audit log's hashes are), where
//! `CONTEXT` is `outpost/v1 manifest\n` or `outpost/v1 desired-state\n`, so a signature over
//! one kind of document can never be replayed as the other. A desired state embeds its whole
//! manifest (with the manifest's own signatures) and signs over it. Signatures are lowercase
//! hex (`policy::signing`), one per `kid`; times are Unix seconds.
//!
//! The device's rules ([`verify_desired`]), in this order, each refusal a [`Refusal`]:
//! 1. the desired state and its manifest are signed, every signature whose `kid` the device
//!    pins verifies, and at least one such signature exists on each (unknown kids alone:
//!    refused; one pinned signature that fails: refused, even beside a good one);
//! 2. the document targets this device or one of its groups;
//! 3. neither the desired state nor the manifest has expired against the trusted clock;
//! 4. its version is above the last one applied for the same target (no replay, no rollback);
//! 5. it is consistent (its `model` is the manifest's `name:version`, the manifest's chunk
//!    list covers its size).
//!
//! Precedence ([`pick_desired`]): a device follows its own document when it has one, else
//! the document of its first group, in the order `[device] groups` lists them, that has one.

use std::collections::BTreeMap;
use std::fmt;

use outpost_policy::jcs;
use outpost_policy::signing::{KeyPair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::protocol::{self, DeviceId, GroupId, Message, ProtocolError, V1};

/// The bytes before a manifest's canonical JSON in what its signatures cover.
pub const MANIFEST_CONTEXT: &str = "outpost/v1 manifest\n";
/// The bytes before a desired state's canonical JSON in what its signatures cover.
pub const DESIRED_CONTEXT: &str = "outpost/v1 desired-state\n";
/// Largest desired-state payload (it embeds the manifest and its chunk list): under the
/// links' 256 KiB packet limit with room for the topic.
pub const MAX_DESIRED_BYTES: usize = 224 * 1024;
/// Most signatures on one document.
pub const MAX_SIGNATURES: usize = 8;

/// One signature: the signer's key id and the hex Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub kid: String,
    pub sig: String,
}

/// What `outpost-hub models publish` prints and signs: one model file in the hub's blob
/// store. `release` counts the publications of `name` (1, 2, …), so a device can tell a
/// newer release from an older one whatever the version strings say; `chunk_sha256[i]`
/// is the SHA-256 of bytes `i * chunk_size ..` (the last chunk may be shorter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u64,
    pub chunk_sha256: Vec<String>,
    pub architecture: String,
    pub quantization: String,
    /// Unix seconds after which devices refuse it.
    pub expires: i64,
    #[serde(default)]
    pub signatures: Vec<Signature>,
}

/// Whom a desired state is for: `group:G` or `device:ID`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Group(GroupId),
    Device(DeviceId),
}

impl Target {
    /// Reads `group:G` or `device:ID`.
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        match s.split_once(':') {
            Some(("group", g)) => Ok(Target::Group(GroupId::new(g)?)),
            Some(("device", d)) => Ok(Target::Device(DeviceId::new(d)?)),
            _ => Err(ProtocolError::Malformed {
                kind: "target",
                reason: format!(
                    "{:?} is neither group:G nor device:ID",
                    s.chars().take(80).collect::<String>()
                ),
            }),
        }
    }

    /// The topic its desired state is published on (retained).
    pub fn desired_topic(&self) -> String {
        match self {
            Target::Group(g) => protocol::group_desired_topic(g),
            Target::Device(d) => protocol::device_topic(d, protocol::DeviceTopic::StateDesired),
        }
    }

    /// Whether a device with this id and these groups is targeted.
    pub fn includes(&self, device: &DeviceId, groups: &[GroupId]) -> bool {
        match self {
            Target::Device(d) => d == device,
            Target::Group(g) => groups.contains(g),
        }
    }

    /// The target a desired-state topic is for (`None` for any other topic).
    pub fn of_topic(topic: &str) -> Option<Self> {
        match protocol::parse_topic(topic).ok()? {
            protocol::Route::GroupDesired { group } => Some(Target::Group(group)),
            protocol::Route::Device {
                id,
                kind: protocol::DeviceTopic::StateDesired,
            } => Some(Target::Device(id)),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Group(g) => write!(f, "group:{g}"),
            Target::Device(d) => write!(f, "device:{d}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Target::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `devices/{id}/state/desired` or `groups/{g}/state/desired`, retained: what the target
/// should run. `version` is monotonic per target (the hub counts it); `model` is
/// `name:version` of the embedded `manifest`; `alias` is the alias to point at it, switched
/// only when `activate` (after the health check, on the device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub v: V1,
    pub rollout: u64,
    pub version: u64,
    pub target: Target,
    pub model: String,
    pub manifest: Manifest,
    pub alias: String,
    pub activate: bool,
    /// Unix seconds when it was signed (a lower bound for the device's trusted clock).
    pub issued_at: i64,
    /// Unix seconds after which devices refuse it.
    pub expires: i64,
    #[serde(default)]
    pub signatures: Vec<Signature>,
}

impl Message for DesiredState {
    const KIND: &'static str = "desired state";
}

/// A signing or encoding failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DocumentError(String);

/// `CONTEXT || JCS(doc without its top-level "signatures")`.
fn signed_bytes<T: Serialize>(context: &str, doc: &T) -> Result<Vec<u8>, DocumentError> {
    let mut value =
        serde_json::to_value(doc).map_err(|e| DocumentError(format!("encoding: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("signatures");
    }
    let canonical =
        jcs::to_string(&value).map_err(|e| DocumentError(format!("canonicalizing: {e}")))?;
    let mut out = Vec::with_capacity(context.len() + canonical.len());
    out.extend_from_slice(context.as_bytes());
    out.extend_from_slice(canonical.as_bytes());
    Ok(out)
}

/// What a document signs and verifies through.
trait Signed: Serialize {
    const CONTEXT: &'static str;
    const WHAT: &'static str;
    fn signatures(&self) -> &[Signature];
    fn signatures_mut(&mut self) -> &mut Vec<Signature>;
}

impl Signed for Manifest {
    const CONTEXT: &'static str = MANIFEST_CONTEXT;
    const WHAT: &'static str = "manifest";
    fn signatures(&self) -> &[Signature] {
        &self.signatures
    }
    fn signatures_mut(&mut self) -> &mut Vec<Signature> {
        &mut self.signatures
    }
}

impl Signed for DesiredState {
    const CONTEXT: &'static str = DESIRED_CONTEXT;
    const WHAT: &'static str = "desired state";
    fn signatures(&self) -> &[Signature] {
        &self.signatures
    }
    fn signatures_mut(&mut self) -> &mut Vec<Signature> {
        &mut self.signatures
    }
}

fn sign<T: Signed>(doc: &mut T, key: &KeyPair, kid: &str) -> Result<(), DocumentError> {
    let sig = key.sign_hex(&signed_bytes(T::CONTEXT, doc)?);
    let sigs = doc.signatures_mut();
    sigs.retain(|s| s.kid != kid);
    sigs.push(Signature {
        kid: kid.to_string(),
        sig,
    });
    Ok(())
}

impl Manifest {
    /// Adds (or replaces) the signature of `kid`.
    pub fn sign(&mut self, key: &KeyPair, kid: &str) -> Result<(), DocumentError> {
        sign(self, key, kid)
    }
}

impl DesiredState {
    /// Adds (or replaces) the signature of `kid`; sign the manifest first (this signature
    /// covers it).
    pub fn sign(&mut self, key: &KeyPair, kid: &str) -> Result<(), DocumentError> {
        sign(self, key, kid)
    }

    /// The retained payload, size-checked.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        protocol::encode(self, MAX_DESIRED_BYTES)
    }

    /// Reads a received payload (size cap first, then version, then shape).
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        protocol::decode(bytes, MAX_DESIRED_BYTES)
    }

    /// The SHA-256 of the signed bytes plus signatures, hex: the same document redelivered
    /// (retained messages come again on every connect) has the same digest.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(signed_bytes(DESIRED_CONTEXT, self).unwrap_or_default());
        for s in &self.signatures {
            h.update(s.kid.as_bytes());
            h.update([0]);
            h.update(s.sig.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }
}

/// The release keys a device pins: `kid` → Ed25519 public key (`[[sync.release_keys]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinnedKeys(BTreeMap<String, PublicKey>);

impl PinnedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pins `key` as `kid`; false when `kid` is already pinned (nothing changes).
    pub fn insert(&mut self, kid: &str, key: PublicKey) -> bool {
        if self.0.contains_key(kid) {
            return false;
        }
        self.0.insert(kid.to_string(), key);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Why a device refused a desired state; each names what it looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("{what} carries no signature")]
    Unsigned { what: &'static str },
    #[error("{what} is signed only by keys this device does not pin ({kids})")]
    UnknownKid { what: &'static str, kids: String },
    #[error("{what}: the signature of key {kid} does not verify")]
    BadSignature { what: &'static str, kid: String },
    #[error("targets {target}, not this device ({device}) or its groups")]
    NotTargeted { target: String, device: String },
    #[error("arrived on the topic of {topic} but targets {target}")]
    WrongTopic { topic: String, target: String },
    #[error("{what} expired at {expires} (trusted time is {now})")]
    Expired {
        what: &'static str,
        expires: i64,
        now: i64,
    },
    #[error("version {version} is not above version {last} already applied for {target}")]
    Replay {
        target: String,
        version: u64,
        last: u64,
    },
    #[error("inconsistent: {0}")]
    Inconsistent(String),
}

impl Refusal {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Unsigned { .. } => "unsigned",
            Refusal::UnknownKid { .. } => "unknown_kid",
            Refusal::BadSignature { .. } => "bad_signature",
            Refusal::NotTargeted { .. } => "not_targeted",
            Refusal::WrongTopic { .. } => "wrong_topic",
            Refusal::Expired { .. } => "expired",
            Refusal::Replay { .. } => "replay",
            Refusal::Inconsistent(_) => "inconsistent",
        }
    }
}

/// Rule 1 for one document: pinned signatures all verify, and there is at least one.
fn check_signatures<T: Signed>(doc: &T, keys: &PinnedKeys) -> Result<(), Refusal> {
    let sigs = doc.signatures();
    if sigs.is_empty() {
        return Err(Refusal::Unsigned { what: T::WHAT });
    }
    if sigs.len() > MAX_SIGNATURES {
        return Err(Refusal::Malformed(format!(
            "{} carries {} signatures, over {MAX_SIGNATURES}",
            T::WHAT,
            sigs.len()
        )));
    }
    let message = signed_bytes(T::CONTEXT, doc).map_err(|e| Refusal::Malformed(e.0))?;
    let mut verified = false;
    for s in sigs {
        let Some(key) = keys.0.get(&s.kid) else {
            continue;
        };
        if !key.verify_hex(&message, &s.sig) {
            return Err(Refusal::BadSignature {
                what: T::WHAT,
                kid: s.kid.chars().take(64).collect(),
            });
        }
        verified = true;
    }
    if !verified {
        let kids: Vec<String> = sigs
            .iter()
            .map(|s| s.kid.chars().take(64).collect())
            .collect();
        return Err(Refusal::UnknownKid {
            what: T::WHAT,
            kids: kids.join(", "),
        });
    }
    Ok(())
}

/// The device's checks of a desired state (the module header's rules, in order).
/// `last_applied` is the version last accepted for the document's target.
pub fn verify_desired(
    doc: &DesiredState,
    keys: &PinnedKeys,
    device: &DeviceId,
    groups: &[GroupId],
    last_applied: Option<u64>,
    trusted_now: i64,
) -> Result<(), Refusal> {
    check_signatures(doc, keys)?;
    check_signatures(&doc.manifest, keys)?;
    if !doc.target.includes(device, groups) {
        return Err(Refusal::NotTargeted {
            target: doc.target.to_string(),
            device: device.to_string(),
        });
    }
    if doc.expires <= trusted_now {
        return Err(Refusal::Expired {
            what: "desired state",
            expires: doc.expires,
            now: trusted_now,
        });
    }
    if doc.manifest.expires <= trusted_now {
        return Err(Refusal::Expired {
            what: "manifest",
            expires: doc.manifest.expires,
            now: trusted_now,
        });
    }
    if let Some(last) = last_applied
        && doc.version <= last
    {
        return Err(Refusal::Replay {
            target: doc.target.to_string(),
            version: doc.version,
            last,
        });
    }
    check_consistent(doc)
}

/// Rule 5: the document agrees with its manifest, and the manifest with itself.
fn check_consistent(doc: &DesiredState) -> Result<(), Refusal> {
    let m = &doc.manifest;
    let bad = |s: String| Err(Refusal::Inconsistent(s));
    if doc.model != format!("{}:{}", m.name, m.version) {
        return bad(format!(
            "names model {} but its manifest is {}:{}",
            doc.model, m.name, m.version
        ));
    }
    let hex64 =
        |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !hex64(&m.sha256) {
        return bad("the manifest's sha256 is not 64 lowercase hex digits".into());
    }
    if m.chunk_size == 0 {
        return bad("the manifest's chunk_size is 0".into());
    }
    let chunks = m.size.div_ceil(m.chunk_size);
    if chunks != m.chunk_sha256.len() as u64 {
        return bad(format!(
            "the manifest lists {} chunk hashes for {} bytes in chunks of {} ({chunks} chunks)",
            m.chunk_sha256.len(),
            m.size,
            m.chunk_size
        ));
    }
    if !m.chunk_sha256.iter().all(|c| hex64(c)) {
        return bad("a chunk hash of the manifest is not 64 lowercase hex digits".into());
    }
    if doc.alias.is_empty() {
        return bad("the alias is empty".into());
    }
    Ok(())
}

/// The precedence rule: among `accepted` documents (by target), the device's own wins;
/// else the first of `groups` (the configured order) that has one.
pub fn pick_desired<'a>(
    accepted: &'a BTreeMap<Target, DesiredState>,
    device: &DeviceId,
    groups: &[GroupId],
) -> Option<&'a DesiredState> {
    accepted.get(&Target::Device(device.clone())).or_else(|| {
        groups
            .iter()
            .find_map(|g| accepted.get(&Target::Group(g.clone())))
    })
}

/// What `state/reported` (and `outpost sync status`) say the device follows: the document
/// [`pick_desired`] picks.
pub fn following(
    accepted: &BTreeMap<Target, DesiredState>,
    device: &DeviceId,
    groups: &[GroupId],
) -> Option<protocol::Following> {
    pick_desired(accepted, device, groups).map(|d| protocol::Following {
        rollout: d.rollout,
        target: d.target.to_string(),
        version: d.version,
        model: d.model.clone(),
    })
}

#[cfg(test)]
mod tests;
