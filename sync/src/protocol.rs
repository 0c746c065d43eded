//! The MQTT protocol, version 1: pure data, no I/O. The only place topic strings are built
//! and parsed, the message types with their schema version, the size-capped decoder, and the
//! packing of audit records into batches.
//!
//! Topics (all under `outpost/v1/`; `{id}` and `{g}` match `[A-Za-z0-9._-]{1,64}`):
//!
//! | topic | direction | QoS, retained | payload |
//! |---|---|---|---|
//! | `devices/{id}/status` | up | 1, retained (also the last will) | [`Status`] |
//! | `devices/{id}/audit` | up | 1 | [`AuditBatch`] |
//! | `devices/{id}/telemetry` | up | 1 | [`Telemetry`] |
//! | `devices/{id}/state/reported` | up | 1, retained | [`ReportedState`] |
//! | `devices/{id}/state/desired`, `groups/{g}/state/desired` | down | 1, retained | [`crate::release::DesiredState`] |
//! | `devices/{id}/audit/ack` | down | 1 | [`AuditAck`] |
//! | `devices/{id}/blobs/get` | up | 1 | [`ChunkRequest`] |
//! | `devices/{id}/blobs` | down | 1 | a binary chunk frame ([`ChunkFrame`]) |
//!
//! The hub subscribes to the upward topics through the shared subscription group `hub`
//! (`$share/hub/outpost/v1/devices/+/audit`, …), so several hubs split the load.
//!
//! Messages are JSON objects whose first field is `"v": 1`. [`decode`] refuses, in this
//! order: a payload over its size cap (before any parsing), anything that is not one JSON
//! object, a missing or unknown `v` (a typed error naming the version found), then fields
//! that do not fit the type (unknown fields included: a change of shape is a new version).
//!
//! Invariants: nothing here does I/O; a topic string is built only by [`device_topic`],
//! [`group_desired_topic`] and the constants here, and read only by [`parse_topic`];
//! [`BatchBuilder`] never produces a payload over its byte limit.

use std::collections::BTreeMap;
use std::fmt;

use outpost_policy::audit::{Checkpoint, Record};

pub mod chunk;
pub use chunk::{ChunkFrame, ChunkRequest, FrameBody, TransferReport};
use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema version every message of this protocol carries as `"v"`.
pub const VERSION: u64 = 1;
/// Every topic starts with this.
pub const PREFIX: &str = "outpost/v1";
/// The hub's shared subscription group.
pub const HUB_SHARE_GROUP: &str = "hub";
/// Longest device or group id.
pub const MAX_ID_LEN: usize = 64;

// Size caps, shared by both ends: a receiver decodes with them ([`decode`]'s `max_len`), a
// sender should never produce more.

/// Largest audit batch payload: the links' default packet limit (a device's
/// `batch_max_bytes` must fit both).
pub const MAX_AUDIT_BATCH_BYTES: usize = 256 * 1024;
/// Largest [`Status`] payload.
pub const MAX_STATUS_BYTES: usize = 4 * 1024;
/// Largest [`ReportedState`] payload.
pub const MAX_STATE_BYTES: usize = 64 * 1024;
/// Largest [`Telemetry`] payload.
pub const MAX_TELEMETRY_BYTES: usize = 64 * 1024;
/// Largest [`AuditAck`] payload.
pub const MAX_ACK_BYTES: usize = 4096;

/// Why bytes or a topic were refused; each variant names what it was looking at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{kind} message of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} message is malformed: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("{kind} message has schema version {found}; this outpost knows version {VERSION}")]
    UnknownVersion { kind: &'static str, found: u64 },
    #[error("{what} {value:?} is not a valid id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-')")]
    InvalidId { what: &'static str, value: String },
    #[error("topic {topic:?}: {reason}")]
    Topic { topic: String, reason: &'static str },
    #[error("audit batch for {device_id}: {reason}")]
    BadBatch { device_id: String, reason: String },
    #[error(
        "audit record seq {seq} needs {len} bytes in a batch, over the batch limit of {max} bytes"
    )]
    RecordTooLarge { seq: u64, len: usize, max: usize },
    #[error("encoding {kind}: {reason}")]
    Encode { kind: &'static str, reason: String },
}

type Result<T, E = ProtocolError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Ids and topics

fn check_id(what: &'static str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        // A hostile id may be long; the error keeps a bounded prefix of it.
        Err(ProtocolError::InvalidId {
            what,
            value: s.chars().take(80).collect(),
        })
    }
}

macro_rules! id_type {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A validated ", $what, " (`[A-Za-z0-9._-]{1,64}`).")]
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: &str) -> Result<Self> {
                check_id($what, s)?;
                Ok(Self(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ProtocolError;
            fn try_from(s: String) -> Result<Self> {
                check_id($what, &s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(DeviceId, "device id");
id_type!(GroupId, "group id");

/// The topics under `devices/{id}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    Status,
    Audit,
    AuditAck,
    Telemetry,
    StateReported,
    StateDesired,
    Blobs,
    /// Chunk requests (up): per device, so the broker's ACL proves who asks.
    BlobsGet,
}

impl DeviceTopic {
    pub const ALL: [DeviceTopic; 8] = [
        DeviceTopic::Status,
        DeviceTopic::Audit,
        DeviceTopic::AuditAck,
        DeviceTopic::Telemetry,
        DeviceTopic::StateReported,
        DeviceTopic::StateDesired,
        DeviceTopic::Blobs,
        DeviceTopic::BlobsGet,
    ];

    /// What follows `devices/{id}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            DeviceTopic::Status => "status",
            DeviceTopic::Audit => "audit",
            DeviceTopic::AuditAck => "audit/ack",
            DeviceTopic::Telemetry => "telemetry",
            DeviceTopic::StateReported => "state/reported",
            DeviceTopic::StateDesired => "state/desired",
            DeviceTopic::Blobs => "blobs",
            DeviceTopic::BlobsGet => "blobs/get",
        }
    }

    /// Whether the device publishes here (else the cloud does).
    pub fn is_upward(self) -> bool {
        matches!(
            self,
            DeviceTopic::Status
                | DeviceTopic::Audit
                | DeviceTopic::Telemetry
                | DeviceTopic::StateReported
                | DeviceTopic::BlobsGet
        )
    }

    /// MQTT QoS of messages on this topic (every one is 1: a row leaves the outbox on PubAck).
    pub fn qos(self) -> u8 {
        1
    }

    /// Whether messages here are published retained.
    pub fn retained(self) -> bool {
        matches!(
            self,
            DeviceTopic::Status | DeviceTopic::StateReported | DeviceTopic::StateDesired
        )
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.suffix() == s)
    }
}

/// `outpost/v1/devices/{id}/{kind}`.
pub fn device_topic(id: &DeviceId, kind: DeviceTopic) -> String {
    format!("{PREFIX}/devices/{id}/{}", kind.suffix())
}

/// `outpost/v1/groups/{g}/state/desired`.
pub fn group_desired_topic(group: &GroupId) -> String {
    format!("{PREFIX}/groups/{group}/state/desired")
}

/// `outpost/v1/hubs/{id}/status`: a hub's own status and last will (`id` is its
/// certificate's CN), the one topic a hub publishes outside devices' and groups' topics.
pub fn hub_status_topic(hub: &DeviceId) -> String {
    format!("{PREFIX}/hubs/{hub}/status")
}

/// ACL topic patterns for the broker configuration (Mosquitto syntax): `%u` stands for the
/// client's username, which the broker takes from its certificate's CN.
pub mod acl {
    use super::{DeviceTopic, GroupId, PREFIX};

    /// `outpost/v1/devices/%u/{kind}`: a topic of the connected device itself.
    pub fn own_device(kind: DeviceTopic) -> String {
        format!("{PREFIX}/devices/%u/{}", kind.suffix())
    }

    /// `outpost/v1/devices/+/{kind}`: that topic of every device (the hub's role).
    pub fn every_device(kind: DeviceTopic) -> String {
        format!("{PREFIX}/devices/+/{}", kind.suffix())
    }

    /// `outpost/v1/groups/+/state/desired`: every group's desired state (the hub writes it).
    pub fn every_group_desired() -> String {
        format!("{PREFIX}/groups/+/state/desired")
    }

    /// `outpost/v1/groups/{g}/state/desired`.
    pub fn group_desired(group: &GroupId) -> String {
        super::group_desired_topic(group)
    }
}

/// One device's topics, built once.
#[derive(Debug, Clone)]
pub struct Topics {
    id: DeviceId,
    status: String,
    audit: String,
    audit_ack: String,
    telemetry: String,
    state_reported: String,
    state_desired: String,
    blobs: String,
    blobs_get: String,
}

impl Topics {
    pub fn new(id: DeviceId) -> Self {
        let t = |k| device_topic(&id, k);
        Self {
            status: t(DeviceTopic::Status),
            audit: t(DeviceTopic::Audit),
            audit_ack: t(DeviceTopic::AuditAck),
            telemetry: t(DeviceTopic::Telemetry),
            state_reported: t(DeviceTopic::StateReported),
            state_desired: t(DeviceTopic::StateDesired),
            blobs: t(DeviceTopic::Blobs),
            blobs_get: t(DeviceTopic::BlobsGet),
            id,
        }
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.id
    }
    pub fn status(&self) -> &str {
        &self.status
    }
    pub fn audit(&self) -> &str {
        &self.audit
    }
    pub fn audit_ack(&self) -> &str {
        &self.audit_ack
    }
    pub fn telemetry(&self) -> &str {
        &self.telemetry
    }
    pub fn state_reported(&self) -> &str {
        &self.state_reported
    }
    pub fn state_desired(&self) -> &str {
        &self.state_desired
    }
    pub fn blobs(&self) -> &str {
        &self.blobs
    }
    pub fn blobs_get(&self) -> &str {
        &self.blobs_get
    }

    /// What the device subscribes to: its downward topics and its groups' desired state.
    pub fn subscriptions(&self, groups: &[GroupId]) -> Vec<String> {
        let mut out = vec![
            self.audit_ack.clone(),
            self.state_desired.clone(),
            self.blobs.clone(),
        ];
        out.extend(groups.iter().map(group_desired_topic));
        out
    }
}

/// The hub's subscriptions: every upward topic of every device (blob requests included);
/// with `shared`, in the shared subscription group [`HUB_SHARE_GROUP`] (hubs side by side
/// split the load), else plain (one hub, on a broker without `$share/`).
pub fn hub_subscriptions(shared: bool) -> Vec<String> {
    DeviceTopic::ALL
        .into_iter()
        .filter(|k| k.is_upward())
        .map(|k| {
            let filter = acl::every_device(k);
            if shared {
                format!("$share/{HUB_SHARE_GROUP}/{filter}")
            } else {
                filter
            }
        })
        .collect()
}

/// What a received topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Device { id: DeviceId, kind: DeviceTopic },
    GroupDesired { group: GroupId },
}

/// Reads a topic a message arrived on; anything not built by this module is refused.
pub fn parse_topic(topic: &str) -> Result<Route> {
    let bad = |reason| ProtocolError::Topic {
        topic: topic.chars().take(200).collect(),
        reason,
    };
    let rest = topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| bad("not under outpost/v1/"))?;
    let (scope, rest) = rest.split_once('/').ok_or_else(|| bad("unknown topic"))?;
    let (id, suffix) = rest.split_once('/').ok_or_else(|| bad("unknown topic"))?;
    match scope {
        "devices" => {
            let kind = DeviceTopic::from_suffix(suffix).ok_or_else(|| bad("unknown topic"))?;
            let id = DeviceId::new(id).map_err(|_| bad("invalid device id"))?;
            Ok(Route::Device { id, kind })
        }
        "groups" if suffix == "state/desired" => {
            let group = GroupId::new(id).map_err(|_| bad("invalid group id"))?;
            Ok(Route::GroupDesired { group })
        }
        _ => Err(bad("unknown topic")),
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// The `"v": 1` of every message: serializes as 1 and accepts nothing else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(VERSION)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            VERSION => Ok(V1),
            v => Err(de::Error::custom(format!("unknown schema version {v}"))),
        }
    }
}

/// A message type of this protocol.
pub trait Message: Serialize + DeserializeOwned {
    /// Its name in errors and logs.
    const KIND: &'static str;
}

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Online,
    Offline,
}

/// `devices/{id}/status`, retained, and the last will (`offline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub v: V1,
    pub state: LinkState,
    pub agent_version: String,
}

impl Message for Status {
    const KIND: &'static str = "status";
}

/// `devices/{id}/audit`: records `first_seq..=last_seq`, in order, and the latest checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBatch {
    pub v: V1,
    pub device_id: DeviceId,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: Vec<Record>,
    pub checkpoint: Option<Checkpoint>,
}

impl Message for AuditBatch {
    const KIND: &'static str = "audit batch";
}

impl AuditBatch {
    /// The checks a receiver makes before looking at the records: the batch is for the device
    /// whose topic it came on (the topic's id wins over any id in a payload), it is not empty,
    /// and its records are `first_seq..=last_seq` without gap or reordering. Chain and
    /// checkpoint verification are the hub's.
    pub fn check(&self, topic_device: &DeviceId) -> Result<()> {
        let bad = |reason: String| ProtocolError::BadBatch {
            device_id: topic_device.to_string(),
            reason,
        };
        if self.device_id != *topic_device {
            return Err(bad(format!(
                "names device {} in its payload",
                self.device_id
            )));
        }
        let (Some(first), Some(last)) = (self.records.first(), self.records.last()) else {
            return Err(bad("has no records".into()));
        };
        if self.first_seq == 0 || first.seq != self.first_seq || last.seq != self.last_seq {
            return Err(bad(format!(
                "says seqs {}..={} but holds {}..={}",
                self.first_seq, self.last_seq, first.seq, last.seq
            )));
        }
        for (i, r) in self.records.iter().enumerate() {
            let expected = self.first_seq.checked_add(i as u64);
            if expected != Some(r.seq) {
                return Err(bad(format!(
                    "record {i} has seq {}, expected {}",
                    r.seq,
                    expected.map_or("none".into(), |e| e.to_string())
                )));
            }
        }
        Ok(())
    }
}

/// `devices/{id}/audit/ack`: the highest contiguous seq the hub has stored durably.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAck {
    pub v: V1,
    pub device_id: DeviceId,
    pub acked_seq: u64,
}

impl Message for AuditAck {
    const KIND: &'static str = "audit ack";
}

/// `devices/{id}/telemetry`: a metrics snapshot (`ts` RFC 3339 UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    pub v: V1,
    pub ts: String,
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl Message for Telemetry {
    const KIND: &'static str = "telemetry";
}

/// A model installed on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedModel {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Where it came from: `import` (by hand) or `rollout:ID` (optional in v1, like
    /// `desired`; left out when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `devices/{id}/state/reported`, retained: installed models, aliases (alias →
/// `name:version`), the policy version, the last acked audit seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    pub v: V1,
    pub models: Vec<ReportedModel>,
    pub aliases: BTreeMap<String, String>,
    pub policy_version: Option<u64>,
    pub last_acked_seq: u64,
    /// The desired state the device follows (see `release::pick_desired`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Following>,
    /// How far the device got with the rollout of the document it follows (optional in v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutReport>,
    /// The download of the followed model, while there is one (or its last outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferReport>,
}

/// A device's state in one rollout, as `state/reported` carries it and `rollout status`
/// shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Accepted; the model is not on the device yet.
    Pending,
    /// The model's blob is being fetched.
    Downloading,
    /// Installed in the registry, not activated (the document does not ask to, or it waits).
    Staged,
    /// The alias points at the model and the daemon serves it.
    Active,
    /// The model did not pass its load or health check; the previous model kept serving.
    Failed,
    /// The alias had been switched to the model and was put back to the previous one.
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Downloading => "downloading",
            Self::Staged => "staged",
            Self::Active => "active",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Downloading,
            Self::Staged,
            Self::Active,
            Self::Failed,
            Self::RolledBack,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// A state the device does not leave for this (rollout, model) on its own.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Active | Self::Failed | Self::RolledBack)
    }

    /// Counts against a phased rollout's `--max-failures`.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::RolledBack)
    }
}

/// The device's progress with the rollout of the document it follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutReport {
    pub rollout: u64,
    /// `name:version`.
    pub model: String,
    pub state: RolloutState,
    /// Percent done (the download while `downloading`; 100 once `staged` or later).
    pub progress: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Which signed desired state a device follows: its rollout, target and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Following {
    pub rollout: u64,
    pub target: String,
    pub version: u64,
    /// `name:version`.
    pub model: String,
}

impl Message for ReportedState {
    const KIND: &'static str = "reported state";
}

/// Serializes `msg`, refusing a payload over `max_len` (checked before it goes anywhere: an
/// oversized publish poisons rumqttc's reconnect loop).
pub fn encode<T: Message>(msg: &T, max_len: usize) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(msg).map_err(|e| ProtocolError::Encode {
        kind: T::KIND,
        reason: e.to_string(),
    })?;
    if bytes.len() > max_len {
        return Err(ProtocolError::TooLarge {
            kind: T::KIND,
            len: bytes.len(),
            max: max_len,
        });
    }
    Ok(bytes)
}

/// Reads a `T` from untrusted bytes: size first, then one JSON object, then its `v`, then
/// its shape (see the module header).
pub fn decode<T: Message>(bytes: &[u8], max_len: usize) -> Result<T> {
    let kind = T::KIND;
    if bytes.len() > max_len {
        return Err(ProtocolError::TooLarge {
            kind,
            len: bytes.len(),
            max: max_len,
        });
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        kind,
        reason: e.to_string(),
    };
    // A first pass reads only `v` (and skips everything else without allocating), so a
    // message of another version is named as such rather than as a shape mismatch.
    let found = serde_json::from_slice::<VersionProbe>(bytes)
        .map_err(malformed)?
        .0
        .ok_or_else(|| ProtocolError::Malformed {
            kind,
            reason: "no \"v\" field".into(),
        })?;
    if found != VERSION {
        return Err(ProtocolError::UnknownVersion { kind, found });
    }
    serde_json::from_slice(bytes).map_err(malformed)
}

/// The top-level `v` of a JSON object (`None` when absent).
struct VersionProbe(Option<u64>);

impl<'de> Deserialize<'de> for VersionProbe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Probe;
        impl<'de> Visitor<'de> for Probe {
            type Value = VersionProbe;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VersionProbe, A::Error> {
                let mut v = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "v" {
                        if v.is_some() {
                            return Err(de::Error::duplicate_field("v"));
                        }
                        v = Some(map.next_value::<u64>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(VersionProbe(v))
            }
        }
        d.deserialize_map(Probe)
    }
}

// ---------------------------------------------------------------------------------------------
// Audit batches

/// How big a batch may get (`[sync] batch_max_records`, `batch_max_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

/// One audit batch, serialized: what goes on `devices/{id}/audit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: usize,
    pub payload: Vec<u8>,
}

/// Whether [`BatchBuilder::push`] took the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// The batch is full; the record was not taken and starts the next batch.
    Full,
}

/// Packs audit records, in seq order and without gaps, into one [`AuditBatch`] payload of
/// at most `max_records` records and `max_bytes` bytes. Each record is serialized once, and
/// the payload is assembled around them in [`AuditBatch`]'s field order (a test holds it
/// equal to serializing the struct), so the size is exact as records are added.
#[derive(Debug)]
pub struct BatchBuilder {
    device_id: DeviceId,
    limits: BatchLimits,
    /// `],"checkpoint":…}`
    tail: Vec<u8>,
    /// The records so far, comma-separated.
    body: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    count: usize,
}

impl BatchBuilder {
    pub fn new(
        device_id: &DeviceId,
        checkpoint: Option<&Checkpoint>,
        limits: BatchLimits,
    ) -> Result<Self> {
        let encode_err = |e: serde_json::Error| ProtocolError::Encode {
            kind: AuditBatch::KIND,
            reason: e.to_string(),
        };
        let mut tail = b"],\"checkpoint\":".to_vec();
        serde_json::to_writer(&mut tail, &checkpoint).map_err(encode_err)?;
        tail.push(b'}');
        let builder = Self {
            device_id: device_id.clone(),
            limits,
            tail,
            body: Vec::new(),
            first_seq: 0,
            last_seq: 0,
            count: 0,
        };
        if limits.max_records == 0 {
            return Err(ProtocolError::BadBatch {
                device_id: device_id.to_string(),
                reason: "batch_max_records is 0".into(),
            });
        }
        Ok(builder)
    }

    /// `{"v":1,"device_id":…,"first_seq":F,"last_seq":L,"records":[` (a [`DeviceId`]'s
    /// characters need no JSON escaping).
    fn head(&self, first: u64, last: u64) -> String {
        format!(
            "{{\"v\":{VERSION},\"device_id\":\"{}\",\"first_seq\":{first},\"last_seq\":{last},\"records\":[",
            self.device_id
        )
    }

    /// Adds `record`, the next in seq order. A record that does not fit in an empty batch
    /// is an error, never a silent drop: the device never drops an audit record.
    pub fn push(&mut self, record: &Record) -> Result<Pushed> {
        let rec = serde_json::to_vec(record).map_err(|e| ProtocolError::Encode {
            kind: AuditBatch::KIND,
            reason: e.to_string(),
        })?;
        self.push_json(record.seq, &rec)
    }

    /// Adds the record `seq`, the next in seq order, given as its JSON object (what
    /// [`Record`] serializes to, fields in any order: the device sends the text its log
    /// stored without parsing it). The caller vouches that `json` is one JSON object.
    pub fn push_json(&mut self, seq: u64, rec: &[u8]) -> Result<Pushed> {
        if self.count > 0 && Some(seq) != self.last_seq.checked_add(1) {
            return Err(ProtocolError::BadBatch {
                device_id: self.device_id.to_string(),
                reason: format!("record seq {seq} does not follow seq {}", self.last_seq),
            });
        }
        if self.count >= self.limits.max_records {
            return Ok(Pushed::Full);
        }
        let first = if self.count == 0 { seq } else { self.first_seq };
        let comma = usize::from(self.count > 0);
        let len =
            self.head(first, seq).len() + self.body.len() + comma + rec.len() + self.tail.len();
        if len > self.limits.max_bytes {
            if self.count == 0 {
                return Err(ProtocolError::RecordTooLarge {
                    seq,
                    len,
                    max: self.limits.max_bytes,
                });
            }
            return Ok(Pushed::Full);
        }
        if comma == 1 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(rec);
        self.first_seq = first;
        self.last_seq = seq;
        self.count += 1;
        Ok(Pushed::Added)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The seq of the last record added (0 when none was).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Replaces the checkpoint given to [`BatchBuilder::new`] by `checkpoint`, whose JSON must
    /// be no longer (an older checkpoint of the same device is not: its seq is smaller and
    /// its other fields have fixed lengths). A longer one would overrun `max_bytes`: then the
    /// batch goes without a checkpoint (allowed; a later batch carries one) and `false` says so.
    pub fn set_checkpoint(&mut self, checkpoint: Option<&Checkpoint>) -> Result<bool> {
        let mut tail = b"],\"checkpoint\":".to_vec();
        serde_json::to_writer(&mut tail, &checkpoint).map_err(|e| ProtocolError::Encode {
            kind: AuditBatch::KIND,
            reason: e.to_string(),
        })?;
        tail.push(b'}');
        let fits = tail.len() <= self.tail.len();
        self.tail = if fits {
            tail
        } else {
            b"],\"checkpoint\":null}".to_vec()
        };
        Ok(fits)
    }

    /// The payload, or `None` when no record was added.
    pub fn finish(self) -> Option<EncodedBatch> {
        if self.count == 0 {
            return None;
        }
        let head = self.head(self.first_seq, self.last_seq);
        let mut payload = Vec::with_capacity(head.len() + self.body.len() + self.tail.len());
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(&self.body);
        payload.extend_from_slice(&self.tail);
        Some(EncodedBatch {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            records: self.count,
            payload,
        })
    }
}

/// Fixtures for this crate's unit tests: records and checkpoints with fixed, made-up hashes
/// (for packing and parsing; chain checks use real logs).
#[cfg(test)]
pub(crate) mod fixtures {
    use outpost_policy::audit::{Checkpoint, Outcome, Record};

    pub fn record(seq: u64, reason: &str) -> Record {
        Record {
            seq,
            ts: "2026-12-01T12:00:00.000Z".into(),
            device_id: "edge-01".into(),
            actor: "local:root".into(),
            roles: vec!["admin".into()],
            action: "models:activate".into(),
            resource: Some("smollm2".into()),
            outcome: Outcome::Success,
            reason: reason.into(),
            request_id: None,
            policy_version: Some(3),
            details: serde_json::json!({"k": "v"}),
            prev_hash: "0".repeat(64),
            hash: "a".repeat(64),
        }
    }

    pub fn checkpoint(seq: u64) -> Checkpoint {
        Checkpoint {
            device_id: "edge-01".into(),
            seq,
            hash: "a".repeat(64),
            ts: "2026-12-01T12:00:00.000Z".into(),
            public_key: "b".repeat(64),
            signature: "c".repeat(128),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{checkpoint, record};
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    /// Packs records `seqs` (each with a `reason` of `pad` bytes) under `limits`, and
    /// describes the batches as `first..=last` each; each payload is also decoded back.
    fn pack(seqs: std::ops::RangeInclusive<u64>, pad: usize, limits: BatchLimits) -> String {
        let id = dev("edge-01");
        let cp = checkpoint(1);
        let mut out = Vec::new();
        let mut b = BatchBuilder::new(&id, Some(&cp), limits).unwrap();
        for seq in seqs {
            let r = record(seq, &"x".repeat(pad));
            loop {
                match b.push(&r) {
                    Ok(Pushed::Added) => break,
                    Ok(Pushed::Full) => {
                        let next = BatchBuilder::new(&id, Some(&cp), limits).unwrap();
                        let done = std::mem::replace(&mut b, next).finish().unwrap();
                        out.push(describe(done, limits, &id));
                    }
                    Err(e) => {
                        out.push(format!("err: {e}"));
                        return out.join(" ");
                    }
                }
            }
        }
        if let Some(done) = b.finish() {
            out.push(describe(done, limits, &id));
        }
        out.join(" ")
    }

    fn describe(e: EncodedBatch, limits: BatchLimits, id: &DeviceId) -> String {
        assert!(
            e.payload.len() <= limits.max_bytes,
            "{} bytes",
            e.payload.len()
        );
        let batch: AuditBatch = decode(&e.payload, limits.max_bytes).unwrap();
        batch.check(id).unwrap();
        // The hand-assembled payload is exactly the struct's serialization.
        assert_eq!(serde_json::to_vec(&batch).unwrap(), e.payload);
        assert_eq!(batch.records.len(), e.records);
        format!("{}..={}", e.first_seq, e.last_seq)
    }

    /// Runs one line of input and compares what happened with `expect`. Inputs:
    /// `topic T` (parse a topic), `id S` (a device id), `status|ack|batch|telemetry|state
    /// [max=N] JSON` (decode a payload, with a size cap of N, default 4096), `encode max=N
    /// JSON` (decode a status, then encode it under a cap of N).
    fn check(input: &str, expect: &str) {
        let (what, rest) = input.split_once(' ').unwrap_or((input, ""));
        let (max, json) = match rest.strip_prefix("max=") {
            Some(r) => {
                let (n, j) = r.split_once(' ').unwrap();
                (n.parse().unwrap(), j)
            }
            None => (4096, rest),
        };
        fn show<T: fmt::Debug>(r: Result<T>) -> String {
            match r {
                Ok(v) => format!("ok: {v:?}"),
                Err(e) => format!("err: {e}"),
            }
        }
        let got = match what {
            "topic" => show(parse_topic(rest)),
            "id" => show(DeviceId::new(rest)),
            "status" => show(decode::<Status>(json.as_bytes(), max)),
            "encode" => show(
                decode::<Status>(json.as_bytes(), 4096)
                    .and_then(|m| encode(&m, max))
                    .map(|b| String::from_utf8(b).unwrap()),
            ),
            "ack" => show(decode::<AuditAck>(json.as_bytes(), max)),
            "telemetry" => show(decode::<Telemetry>(json.as_bytes(), max)),
            "state" => show(decode::<ReportedState>(json.as_bytes(), max)),
            "batch" => show(decode::<AuditBatch>(json.as_bytes(), max).and_then(|b| {
                b.check(&dev("edge-01"))?;
                Ok((b.first_seq, b.last_seq))
            })),
            other => panic!("unknown input {other}"),
        };
        assert_eq!(got, expect, "input: {input}");
    }

    #[test]
    fn topics_are_built_and_parsed_back() {
        let t = Topics::new(dev("edge-01"));
        assert_eq!(t.status(), "outpost/v1/devices/edge-01/status");
        assert_eq!(t.audit(), "outpost/v1/devices/edge-01/audit");
        assert_eq!(t.audit_ack(), "outpost/v1/devices/edge-01/audit/ack");
        assert_eq!(t.telemetry(), "outpost/v1/devices/edge-01/telemetry");
        assert_eq!(
            t.state_reported(),
            "outpost/v1/devices/edge-01/state/reported"
        );
        assert_eq!(
            t.state_desired(),
            "outpost/v1/devices/edge-01/state/desired"
        );
        assert_eq!(t.blobs(), "outpost/v1/devices/edge-01/blobs");
        assert_eq!(t.blobs_get(), "outpost/v1/devices/edge-01/blobs/get");
        let g = GroupId::new("lab").unwrap();
        assert_eq!(
            t.subscriptions(std::slice::from_ref(&g)),
            [
                "outpost/v1/devices/edge-01/audit/ack",
                "outpost/v1/devices/edge-01/state/desired",
                "outpost/v1/devices/edge-01/blobs",
                "outpost/v1/groups/lab/state/desired",
            ]
        );
        assert_eq!(
            hub_subscriptions(true),
            [
                "$share/hub/outpost/v1/devices/+/status",
                "$share/hub/outpost/v1/devices/+/audit",
                "$share/hub/outpost/v1/devices/+/telemetry",
                "$share/hub/outpost/v1/devices/+/state/reported",
                "$share/hub/outpost/v1/devices/+/blobs/get",
            ]
        );
        assert_eq!(
            hub_subscriptions(false),
            [
                "outpost/v1/devices/+/status",
                "outpost/v1/devices/+/audit",
                "outpost/v1/devices/+/telemetry",
                "outpost/v1/devices/+/state/reported",
                "outpost/v1/devices/+/blobs/get",
            ]
        );
        for kind in DeviceTopic::ALL {
            let topic = device_topic(&dev("A.b_c-9"), kind);
            assert_eq!(
                parse_topic(&topic).unwrap(),
                Route::Device {
                    id: dev("A.b_c-9"),
                    kind
                }
            );
        }
        assert_eq!(
            parse_topic(&group_desired_topic(&g)).unwrap(),
            Route::GroupDesired { group: g }
        );
    }

    #[test]
    fn hostile_topics_and_ids_are_refused() {
        check(
            "topic outpost/v1/devices/e1/blobs/get",
            "ok: Device { id: DeviceId(\"e1\"), kind: BlobsGet }",
        );
        check(
            "topic outpost/v1/devices/e1/audit/ack",
            "ok: Device { id: DeviceId(\"e1\"), kind: AuditAck }",
        );
        let refused = [
            ("outpost/v2/devices/e1/audit", "not under outpost/v1/"),
            ("outpost/v1", "not under outpost/v1/"),
            ("outpost/v1/", "unknown topic"),
            ("outpost/v1/devices/e1", "unknown topic"),
            ("outpost/v1/devices/e1/", "unknown topic"),
            ("outpost/v1/devices/e1/audit/", "unknown topic"),
            ("outpost/v1/devices/e1/audit/ack/x", "unknown topic"),
            ("outpost/v1/devices//audit", "invalid device id"),
            ("outpost/v1/devices/+/audit", "invalid device id"),
            ("outpost/v1/devices/#/audit", "invalid device id"),
            ("outpost/v1/devices/e 1/audit", "invalid device id"),
            ("outpost/v1/devices/é/audit", "invalid device id"),
            ("outpost/v1/groups/g/state/reported", "unknown topic"),
            ("outpost/v1/groups/g\0/state/desired", "invalid group id"),
            (
                "$share/hub/outpost/v1/devices/e1/audit",
                "not under outpost/v1/",
            ),
            ("outpost/v1/blobs/get/x", "unknown topic"),
            ("outpost/v1/blobs/get", "unknown topic"),
            ("outpost/v1/devices/e1/blobs/get/x", "unknown topic"),
        ];
        for (topic, reason) in refused {
            check(
                &format!("topic {topic}"),
                &format!("err: topic {topic:?}: {reason}"),
            );
        }
        let long = format!("outpost/v1/devices/{}/audit", "a".repeat(65));
        check(
            &format!("topic {long}"),
            &format!("err: topic {long:?}: invalid device id"),
        );
        check(
            &format!("id {}", "a".repeat(64)),
            &format!("ok: DeviceId(\"{}\")", "a".repeat(64)),
        );
        check(
            "id ../x",
            "err: device id \"../x\" is not a valid id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-')",
        );
    }

    #[test]
    fn messages_decode_and_hostile_payloads_are_refused() {
        check(
            r#"status {"v":1,"state":"online","agent_version":"0.1.0"}"#,
            r#"ok: Status { v: V1, state: Online, agent_version: "0.1.0" }"#,
        );
        check(
            r#"ack {"v":1,"device_id":"edge-01","acked_seq":42}"#,
            r#"ok: AuditAck { v: V1, device_id: DeviceId("edge-01"), acked_seq: 42 }"#,
        );
        check(
            r#"telemetry {"v":1,"ts":"t","metrics":{"rss":1}}"#,
            r#"ok: Telemetry { v: V1, ts: "t", metrics: {"rss": Number(1)} }"#,
        );
        check(
            r#"state {"v":1,"models":[],"aliases":{"default":"m:1"},"policy_version":null,"last_acked_seq":0}"#,
            r#"ok: ReportedState { v: V1, models: [], aliases: {"default": "m:1"}, policy_version: None, last_acked_seq: 0, desired: None, rollout: None, transfer: None }"#,
        );
        // Size is checked first: an oversized payload is refused unread.
        check(
            "ack max=10 {\"v\":1,\"device_id\":\"e\",\"acked_seq\":1}",
            "err: audit ack message of 37 bytes is over the limit of 10 bytes",
        );
        check(
            "ack max=3 not json at all",
            "err: audit ack message of 15 bytes is over the limit of 3 bytes",
        );
        // What is sent is size-checked too.
        check(
            r#"encode max=49 {"agent_version":"0.1.0","state":"offline","v":1}"#,
            r#"ok: "{\"v\":1,\"state\":\"offline\",\"agent_version\":\"0.1.0\"}""#,
        );
        check(
            r#"encode max=48 {"v":1,"state":"offline","agent_version":"0.1.0"}"#,
            "err: status message of 49 bytes is over the limit of 48 bytes",
        );
        // Versions.
        check(
            r#"status {"v":2,"state":"online","agent_version":"9"}"#,
            "err: status message has schema version 2; this outpost knows version 1",
        );
        check(
            r#"status {"state":"online","whatever":{"v":1},"v":0}"#,
            "err: status message has schema version 0; this outpost knows version 1",
        );
        check(
            r#"status {"state":"online","agent_version":"x"}"#,
            "err: status message is malformed: no \"v\" field",
        );
        check(
            r#"status {"v":"1","state":"online","agent_version":"x"}"#,
            "err: status message is malformed: invalid type: string \"1\", expected u64 at line 1 column 8",
        );
        check(
            r#"status {"v":1,"v":1,"state":"online","agent_version":"x"}"#,
            "err: status message is malformed: duplicate field `v` at line 1 column 10",
        );
        check(
            r#"status {"v":-1}"#,
            "err: status message is malformed: invalid value: integer `-1`, expected u64 at line 1 column 7",
        );
        // Not one JSON object.
        check(
            "status ",
            "err: status message is malformed: EOF while parsing a value at line 1 column 0",
        );
        check(
            r#"status [1,"online","x"]"#,
            "err: status message is malformed: invalid type: sequence, expected a JSON object at line 1 column 0",
        );
        check(
            r#"status {"v":1,"state":"online","agent_version":"x"} {}"#,
            "err: status message is malformed: trailing characters at line 1 column 46",
        );
        check(
            r#"status {"v":1,"state":"online","agent_version":"x""#,
            "err: status message is malformed: EOF while parsing an object at line 1 column 43",
        );
        check(
            "status {\"v\":1,\"state\":\"online\",\"agent_version\":\"\u{fffd}\\ud800\"}",
            "err: status message is malformed: unexpected end of hex escape at line 1 column 51",
        );
        // Shape.
        check(
            r#"status {"v":1,"state":"maybe","agent_version":"x"}"#,
            "err: status message is malformed: unknown variant `maybe`, expected `online` or `offline` at line 1 column 22",
        );
        check(
            r#"status {"v":1,"state":"online","agent_version":"x","extra":1}"#,
            "err: status message is malformed: unknown field `extra`, expected one of `v`, `state`, `agent_version` at line 1 column 51",
        );
        check(
            r#"ack {"v":1,"device_id":"../../etc","acked_seq":1}"#,
            "err: audit ack message is malformed: device id \"../../etc\" is not a valid id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-') at line 1 column 30",
        );
        check(
            r#"ack {"v":1,"device_id":"e","acked_seq":18446744073709551616}"#,
            "err: audit ack message is malformed: invalid type: floating point `1.8446744073709552e+19`, expected u64 at line 1 column 55",
        );
        let deep = format!(
            r#"telemetry {{"v":1,"ts":"t","metrics":{{"m":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        check(
            &deep,
            "err: telemetry message is malformed: recursion limit exceeded at line 1 column 157",
        );
    }

    #[test]
    fn audit_batches_are_checked_against_their_topic_and_seqs() {
        let id = dev("edge-01");
        let good = AuditBatch {
            v: V1,
            device_id: id.clone(),
            first_seq: 5,
            last_seq: 6,
            records: vec![record(5, "a"), record(6, "b")],
            checkpoint: Some(checkpoint(4)),
        };
        let json = |b: &AuditBatch| format!("batch {}", serde_json::to_string(b).unwrap());
        check(&json(&good), "ok: (5, 6)");
        let mut other = good.clone();
        other.device_id = dev("edge-02");
        check(
            &format!("batch max=100000 {}", &json(&other)[6..]),
            "err: audit batch for edge-01: names device edge-02 in its payload",
        );
        let mut empty = good.clone();
        empty.records.clear();
        check(
            &json(&empty),
            "err: audit batch for edge-01: has no records",
        );
        let mut lying = good.clone();
        lying.last_seq = 7;
        check(
            &json(&lying),
            "err: audit batch for edge-01: says seqs 5..=7 but holds 5..=6",
        );
        let mut gap = good.clone();
        gap.records = vec![record(5, "a"), record(7, "b")];
        gap.last_seq = 7;
        check(
            &json(&gap),
            "err: audit batch for edge-01: record 1 has seq 7, expected 6",
        );
        let mut reordered = good.clone();
        reordered.records.swap(0, 1);
        reordered.first_seq = 6;
        reordered.last_seq = 5;
        check(
            &json(&reordered),
            "err: audit batch for edge-01: record 1 has seq 5, expected 7",
        );
        let mut zero = good.clone();
        zero.records = vec![record(0, "a")];
        zero.first_seq = 0;
        zero.last_seq = 0;
        check(
            &json(&zero),
            "err: audit batch for edge-01: says seqs 0..=0 but holds 0..=0",
        );
        let mut wrapping = good;
        wrapping.records = vec![record(u64::MAX, "a"), record(0, "b")];
        wrapping.first_seq = u64::MAX;
        wrapping.last_seq = 0;
        check(
            &json(&wrapping),
            "err: audit batch for edge-01: record 1 has seq 0, expected none",
        );
    }

    #[test]
    fn a_checkpoint_swapped_in_at_the_end_never_overruns_the_reserved_room() {
        let id = dev("edge-01");
        let limits = BatchLimits {
            max_records: 10,
            max_bytes: 1 << 20,
        };
        let decoded = |b: BatchBuilder| -> AuditBatch {
            decode(&b.finish().unwrap().payload, usize::MAX).unwrap()
        };
        // Room reserved for checkpoint 100; an older one fits and is what goes.
        let mut b = BatchBuilder::new(&id, Some(&checkpoint(100)), limits).unwrap();
        b.push(&record(1, "")).unwrap();
        assert!(b.set_checkpoint(Some(&checkpoint(9))).unwrap());
        assert_eq!(decoded(b).checkpoint.map(|c| c.seq), Some(9));
        // No room reserved: a checkpoint does not fit, and the batch goes without one.
        let mut b = BatchBuilder::new(&id, None, limits).unwrap();
        b.push(&record(1, "")).unwrap();
        assert!(!b.set_checkpoint(Some(&checkpoint(1))).unwrap());
        assert_eq!(decoded(b).checkpoint, None);
    }

    #[test]
    fn batches_pack_in_order_within_both_limits() {
        let one = {
            let mut b = BatchBuilder::new(
                &dev("edge-01"),
                Some(&checkpoint(1)),
                BatchLimits {
                    max_records: 1,
                    max_bytes: usize::MAX,
                },
            )
            .unwrap();
            b.push(&record(1, "")).unwrap();
            b.finish().unwrap().payload.len()
        };
        let limits = |max_records, max_bytes| BatchLimits {
            max_records,
            max_bytes,
        };
        // By count.
        assert_eq!(pack(1..=5, 0, limits(2, 1 << 20)), "1..=2 3..=4 5..=5");
        assert_eq!(pack(1..=3, 0, limits(500, 1 << 20)), "1..=3");
        // By bytes: exactly one record per batch fits, then exactly two (a record adds its
        // own length plus a comma).
        let rec = serde_json::to_vec(&record(1, "")).unwrap().len();
        assert_eq!(pack(1..=3, 0, limits(500, one)), "1..=1 2..=2 3..=3");
        assert_eq!(pack(1..=3, 0, limits(500, one + rec + 1)), "1..=2 3..=3");
        assert_eq!(pack(1..=3, 0, limits(500, one + rec)), "1..=1 2..=2 3..=3");
        // Seqs with more digits make the envelope longer, and that is counted too.
        assert_eq!(
            pack(9..=10, 0, limits(500, one)),
            format!(
                "9..=9 err: audit record seq 10 needs {} bytes in a batch, over the batch limit of {one} bytes",
                one + 3
            )
        );
        // A record that cannot fit alone is an error, never a silent drop.
        assert_eq!(
            pack(1..=2, 0, limits(500, one - 1)),
            format!(
                "err: audit record seq 1 needs {one} bytes in a batch, over the batch limit of {} bytes",
                one - 1
            )
        );
        assert_eq!(
            pack(1..=3, 5000, limits(500, 4096)),
            format!(
                "err: audit record seq 1 needs {} bytes in a batch, over the batch limit of 4096 bytes",
                one + 5000
            )
        );
        // Out of order.
        let mut b = BatchBuilder::new(&dev("e"), None, limits(10, 1 << 20)).unwrap();
        b.push(&record(3, "")).unwrap();
        assert_eq!(
            b.push(&record(5, "")).unwrap_err().to_string(),
            "audit batch for e: record seq 5 does not follow seq 3"
        );
        assert_eq!(
            BatchBuilder::new(&dev("e"), None, limits(0, 1))
                .unwrap_err()
                .to_string(),
            "audit batch for e: batch_max_records is 0"
        );
    }
}
