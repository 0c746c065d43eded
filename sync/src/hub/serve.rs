//! `outpost-hub serve`: the hub's ingest loop. One broker link ([`crate::conn::Link`]) with
//! the hub's shared subscriptions (`$share/hub/…`, so hubs side by side split the load), a
//! prepare thread, an ingest thread that owns `hub.db`, and the acks.
//!
//! Flow: the link's messages go, in the order they arrived, through queues to two threads
//! (their work is blocking or CPU-bound and never runs on the async runtime): the prepare
//! thread ([`PREPARE_THREAD`]) reads and checks each one without the store
//! ([`ingest::prepare`]: decoding, the hash chain inside a batch); the ingest thread
//! ([`INGEST_THREAD`]), which owns `hub.db`, takes what is queued into its backlog, takes
//! up to [`MAX_GROUP`] messages from it round-robin by device (one of each device in turn,
//! each device's in their order: a device with many waiting cannot take the others' turns),
//! applies them in ONE write transaction ([`ingest::apply`]) and commits: one fsync for the
//! group. The two overlap, so hashing and storing use two cores. Only after
//! the commit does the ingest thread publish the acks (`AuditAck` with the device's stored
//! head; one per device per group), through [`LinkHandle::try_publish`], which never waits.
//!
//! Back-pressure, by bytes: the serve loop never waits while it holds the link's events, so
//! the link keeps polling the broker (its keep-alive PINGREQs go out however busy the
//! store is; a link blocked on a full queue would be dropped by the broker after 1.5 ×
//! keep-alive). What the hub holds from the link, from the moment the loop takes a message
//! until the ingest thread is done with it (parked batches included), is bounded by
//! `ServeSettings::queue_max_bytes` ([`QUEUE_MAX_BYTES`], 32 MiB): each message costs its
//! payload, its topic and [`MESSAGE_OVERHEAD`], held as semaphore permits that travel
//! with it. A message that does not fit is dropped WITHOUT an ack and counted as `shed`:
//! rumqttc has PubAcked it at the MQTT level, which means nothing here, since the hub's
//! `AuditAck` (sent only after the commit) is the durable one; the device sends an unacked
//! batch again (the hub acks duplicates), status and reported state on its next connect or
//! change, and a shed telemetry snapshot is lost.
//!
//! Limits per device, before the budget: each device's upward messages (audit, status,
//! state, telemetry; chunk requests have the blob server's own limit) draw from a token
//! bucket of `ServeSettings::ingest_rate` messages per second holding up to its `burst`
//! ([`DEFAULT_INGEST_RATE`], [`DEFAULT_INGEST_BURST`]), and what one device's messages hold
//! at once is capped: `ServeSettings::device_max_bytes` of the byte budget
//! ([`DEVICE_MAX_BYTES`], an eighth of it) and `device_max_messages` messages
//! ([`DEVICE_MAX_MESSAGES`], 32). A message without a token, or beyond its device's share,
//! is dropped WITHOUT an ack, like a shed one, and counted as `limited`, in total and per
//! device (`/metrics`); the first of a run of them is logged per device at most every
//! [`LIMITED_LOG_EVERY`]. A device far above its rate (a flood, a device replaying old
//! batches over and over) therefore cannot fill the budget, and the ingest thread serves
//! the devices in turn (one message of each at a time, [`Backlog`]), so the others'
//! messages wait for one of its messages each, not behind the whole flood, even when the
//! hub is slower than what arrives; its audit batches come again after its ack timeout and
//! nothing is lost. The rate bounds messages per second, the share what is held at once. A
//! well-behaved device sends a few messages a second and holds fewer than its share (its
//! window of 8 batches bounds the audit upload), and a backlog drains at up to `rate` × 500
//! records per second. The default (1,000 a second) sits well above one device draining a
//! backlog as fast as a release build does (about 240 batches of 500 a second, 119,652
//! records/s in `bench/sync.py`): a limit below that would drop a draining device's batches
//! and stall it for an ack timeout each time. A hub so far behind that a device's resent
//! windows pile up on its share limits a well-behaved device too (counted as `limited`;
//! nothing is lost): a steady `limited` count for many devices means a slow hub, for a few
//! a flood. What the intake remembers per device is forgotten once the device holds nothing
//! and has been quiet long enough for its bucket to be full again (checked every
//! [`LAG_POLL`]).
//!
//! An `ahead` batch (it starts after the stored head + 1: with several hubs on a shared
//! subscription, Mosquitto hands a device's batches out round-robin, so the one before it
//! may be in another hub's hands right now) is parked rather than acked at once, and
//! applied again in seq order per device after each group that stored something and every
//! [`PARK_RETRY`] while anything is parked (the thread sleeps otherwise). A retry first
//! reads the heads without the write lock and takes it only when a parked batch's head
//! reached it or its time ran out; its checkpoint's signature was verified when it first
//! came ([`ingest`] keeps that). It is stored and acked as soon as the head reaches it;
//! after [`PARK_FOR`] (or beyond [`PARK_MAX_BYTES`]) it counts as `ahead` and is acked with
//! the head as it is, and the device sends it again. When one times out, the device's last
//! reported `last_acked_seq` is compared with the head ([`ingest::note_behind`]): above it,
//! the hub is behind the device (`hub.db` restored from an older backup), alerted once as
//! `behind`. Without parking, every overtaken batch would cost the device its resend delay.
//! Not parked, but counted as `ahead` and acked at once: a batch of a device that had an
//! audit batch dropped here (limited or shed) within the last [`PARK_FOR`], since the gap
//! before it is that batch, which only the device's own resend fills; a flooder's disorder
//! then costs the hub no retries.
//!
//! Rules:
//! - Nothing is acked that is not committed. A group whose transaction fails is rolled
//!   back and its messages are applied one per transaction, so one message the store cannot
//!   take (a hub-side inconsistency) does not hold up the others; what still fails is
//!   logged, counted as a store error and not acked (the device sends it again).
//! - An ack the link cannot take (disconnected, queue full) is counted as unsent and kept,
//!   the newest head per device; it is sent again after the next `Connected` and every
//!   [`ACK_RETRY`] while connected, until one for that device goes out.
//! - The hub's MQTT client id is unique per process (several hubs share the certificate
//!   and its CN `outpost-hub`, which the broker takes as the username; the client id is
//!   free): `outpost-hub.<[hub] instance>`, else `outpost-hub.<16 random hex digits>`. Two
//!   processes with one client id would take each other's connection over and over.
//! - Its last will is the retained `offline` status on `hubs/outpost-hub/status`; `online`
//!   is published, retained, after every connect.
//! - Shutdown, in order: (1) stop taking messages: the link unsubscribes
//!   ([`LinkHandle::stop_receiving`]), so the broker hands what this hub has not read to the
//!   other hubs; what arrives until the broker has confirmed (UNSUBACK) and then been quiet
//!   for [`UNSUBSCRIBE_QUIET`] (it still sends what it had queued for this client), at most
//!   [`UNSUBSCRIBE_GRACE`] in all, is handled as usual; (2) the threads finish what they were given
//!   (the acks queued) within [`INGEST_GRACE`]; parked batches are still tried as long as
//!   they move (the batch before them is usually in another hub's hands, and the two hubs
//!   store their halves of a stream in turn): until none has been stored for
//!   [`SHUTDOWN_PARK_WAIT`], or [`SHUTDOWN_PARK_MAX`] in all, then dropped unacked; a message the broker still delivers meanwhile is shed; (3) the link
//!   stops gracefully (its queued publishes acked, the offline status, DISCONNECT).
//! - Counters ([`Metrics`]) are logged every `summary_every` and at shutdown; alerts are
//!   also rows of `audit_alerts`. The first sighting of an alert is logged at `error`, a
//!   repeat (same device, kind and seq) at `debug`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self as queue, RecvTimeoutError};
use std::time::{Duration, Instant};

use outpost_policy::audit::now_rfc3339;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::blobs::{self, BlobMetrics, BlobRequest, BlobServer, Bucket, Gate, RateLimit};
use super::ingest::{self, AlertKind, Handled, Kind, Outcome, Prepared, Refusal};
use super::rollout;
use super::store::{Store, StoreConfig};
use super::{HUB_IDENTITY, Result, make_dir};
use crate::conn::{Link, LinkConfig, LinkEvent, LinkHandle, Session, Will};
use crate::protocol::{
    self, AuditAck, DeviceId, DeviceTopic, LinkState, MAX_ACK_BYTES, MAX_STATUS_BYTES, Route,
    Status, V1, device_topic, hub_status_topic,
};

/// Most bytes held from the link at once (queued, being handled, parked); a message beyond
/// it is shed.
pub const QUEUE_MAX_BYTES: usize = 32 << 20;
/// What a message costs beyond its payload and topic, so empty ones are bounded too.
pub const MESSAGE_OVERHEAD: usize = 256;
/// Most bytes of the budget one device's messages may hold at once
/// ([`ServeSettings::device_max_bytes`]): an eighth, two windows of a device's usual 128 KiB
/// audit batches (one of the largest, 256 KiB), so that a flood from a few devices leaves
/// the others most of the budget.
pub const DEVICE_MAX_BYTES: usize = QUEUE_MAX_BYTES / 8;
/// Most messages one device may have in the hub's hands at once
/// ([`ServeSettings::device_max_messages`]): a device's window is 8 audit batches, a
/// rewind can put a second copy of it behind the first, and status, state and telemetry
/// come beside them; 32 is twice that. With the ingest thread's turns ([`Backlog`]), it
/// bounds how much of a flood the hub holds at once, not how often the flooder is served.
pub const DEVICE_MAX_MESSAGES: usize = 32;
/// Most messages applied in one transaction.
pub const MAX_GROUP: usize = 128;
/// How long shutdown waits for the broker to confirm the unsubscribe and send what it had
/// queued for this hub.
pub const UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(2);
/// After the broker confirmed the unsubscribe, how long without a message ends step (1) of
/// the shutdown (what the broker had queued for this hub still comes).
pub const UNSUBSCRIBE_QUIET: Duration = Duration::from_millis(200);
/// How long shutdown waits for the threads to finish what they were given.
pub const INGEST_GRACE: Duration = Duration::from_secs(5);
/// At shutdown, how long parked batches are still tried after the last one was stored.
pub const SHUTDOWN_PARK_WAIT: Duration = Duration::from_secs(1);
/// At shutdown, the most time parked batches are still tried (within [`INGEST_GRACE`]).
pub const SHUTDOWN_PARK_MAX: Duration = Duration::from_secs(4);
/// How long an `ahead` batch waits for the head to reach it (another hub storing the
/// batch before it, or a redelivery) before it is acked with the head as it is.
pub const PARK_FOR: Duration = Duration::from_secs(5);
/// Most payload bytes parked at once (within [`QUEUE_MAX_BYTES`]); an `ahead` batch beyond
/// it is acked at once.
pub const PARK_MAX_BYTES: usize = 16 << 20;
/// How often parked batches are tried again while there are any.
pub const PARK_RETRY: Duration = Duration::from_millis(10);
/// Default per-device rate limit: upward messages per second ([`ServeSettings::ingest_rate`]).
pub const DEFAULT_INGEST_RATE: f64 = 1000.0;
/// Default per-device burst: messages a device may send at once.
pub const DEFAULT_INGEST_BURST: f64 = 2000.0;
/// How often, at most, a device's messages dropped over its rate are logged.
pub const LIMITED_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often unsent acks are tried again while connected.
pub const ACK_RETRY: Duration = Duration::from_millis(250);
/// How often `hub.db` is looked at for new, halted or resumed desired states while connected.
pub const DESIRED_POLL: Duration = Duration::from_secs(1);
/// The ingest thread's name.
pub const INGEST_THREAD: &str = "hub-ingest";
/// The prepare thread's name.
pub const PREPARE_THREAD: &str = "hub-prepare";

/// What `serve` needs, validated by the configuration.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The broker link, with this process's unique client id.
    pub link: LinkConfig,
    pub data_dir: PathBuf,
    /// Where the store is (`[hub] store`; `<data_dir>/hub.db` without it).
    pub store: StoreConfig,
    /// How often the counters are logged.
    pub summary_every: Duration,
    /// The byte budget of what the hub holds from the link ([`QUEUE_MAX_BYTES`]).
    pub queue_max_bytes: usize,
    /// One device's share of it ([`DEVICE_MAX_BYTES`]).
    pub device_max_bytes: usize,
    /// The most messages one device may have in the hub's hands ([`DEVICE_MAX_MESSAGES`]).
    pub device_max_messages: usize,
    /// Subscribe through `$share/hub/…` (see [`protocol::hub_subscriptions`]).
    pub shared_subscriptions: bool,
    /// Where `/metrics` is served (`[hub] listen`), if anywhere.
    pub listen: Option<std::net::SocketAddr>,
    /// Chunk requests per device ([`super::blobs`]).
    pub chunk_rate: RateLimit,
    /// Upward messages per device (see the module header).
    pub ingest_rate: RateLimit,
}

/// `outpost-hub.<instance>`, or `outpost-hub.<16 random hex digits>` without one.
pub fn client_id(instance: Option<&str>) -> std::result::Result<DeviceId, protocol::ProtocolError> {
    match instance {
        Some(i) => DeviceId::new(&format!("{HUB_IDENTITY}.{i}")),
        None => DeviceId::new(&format!("{HUB_IDENTITY}.{:016x}", rand::random::<u64>())),
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Upper bounds (seconds) of the store latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// How often the ingest thread reads every device's acked seq and lag for `/metrics`
/// (only with `[hub] listen`).
pub const LAG_POLL: Duration = Duration::from_secs(5);

/// The hub's counters: logged every `summary_every`, and on `/metrics` with `[hub] listen`
/// ([`super::metrics`]).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ingest transactions by duration (begin to commit), per [`LATENCY_BUCKETS`] (not
    /// cumulative; the last slot is over the largest bound).
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    /// Every device's acked seq and lag as the store last said.
    devices: std::sync::Mutex<Vec<DeviceLag>>,
    received: AtomicU64,
    shed: AtomicU64,
    limited: AtomicU64,
    /// Messages dropped over a per-device limit, by device (only devices that were limited).
    limited_devices: std::sync::Mutex<BTreeMap<DeviceId, u64>>,
    queued_bytes: AtomicU64,
    batches_stored: AtomicU64,
    batches_duplicate: AtomicU64,
    batches_ahead: AtomicU64,
    batches_parked: AtomicU64,
    batches_refused: [AtomicU64; Refusal::ALL.len()],
    alerts: [AtomicU64; AlertKind::ALL.len()],
    records_stored: AtomicU64,
    checkpoints_stored: AtomicU64,
    updated: [AtomicU64; Kind::ALL.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    ignored: AtomicU64,
    acks_sent: AtomicU64,
    acks_unsent: AtomicU64,
    store_errors: AtomicU64,
    subscribe_refused: AtomicU64,
    disconnects: AtomicU64,
}

/// The counters at one instant; label maps hold only the labels seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub received: u64,
    /// Messages dropped unacked: over the byte budget, or delivered after shutdown closed
    /// the queues.
    pub shed: u64,
    /// Messages dropped unacked over their device's limits: its message rate, or its share
    /// of the hub (bytes or messages held).
    pub limited: u64,
    /// Bytes held from the link when last looked (a gauge, set by the serve loop).
    pub queued_bytes: u64,
    pub batches_stored: u64,
    pub batches_duplicate: u64,
    pub batches_ahead: u64,
    /// Times an `ahead` batch was parked to be tried again.
    pub batches_parked: u64,
    /// Audit batches refused without an alert, by reason.
    pub batches_refused: Vec<(&'static str, u64)>,
    /// Alerts seen, by kind: audit batches refused with one, and `behind` (a timed-out
    /// `ahead` batch from a device that reports more acked than the hub holds).
    pub alerts: Vec<(&'static str, u64)>,
    pub records_stored: u64,
    pub checkpoints_stored: u64,
    /// Status, reported state and telemetry written, by kind.
    pub updated: Vec<(&'static str, u64)>,
    /// Other messages refused, by reason.
    pub refused: Vec<(&'static str, u64)>,
    pub ignored: u64,
    pub acks_sent: u64,
    /// Acks the link could not take (each attempt; they are tried again).
    pub acks_unsent: u64,
    pub store_errors: u64,
    /// Filters the broker refused to subscribe the hub to.
    pub subscribe_refused: u64,
    /// Connections to the broker lost (the link reconnects).
    pub disconnects: u64,
}

/// The store latency histogram at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Per bucket of [`LATENCY_BUCKETS`], not cumulative.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_micros: u64,
}

/// One device's acked seq and audit lag (see [`super::store::DeviceRecord`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLag {
    pub id: DeviceId,
    pub acked_seq: Option<u64>,
    pub audit_lag: Option<u64>,
}

pub(crate) fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

fn labelled<T: Copy>(
    counters: &[AtomicU64],
    labels: &[T],
    name: impl Fn(T) -> &'static str,
) -> Vec<(&'static str, u64)> {
    labels
        .iter()
        .zip(counters)
        .map(|(l, c)| (name(*l), c.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn show(pairs: &[(&'static str, u64)]) -> String {
    if pairs.is_empty() {
        return "none".into();
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Metrics {
    /// Records one ingest transaction's duration.
    pub fn observe_transaction(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        inc(&self.latency[slot], 1);
        inc(
            &self.latency_sum_micros,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// The store latency histogram.
    pub fn latency(&self) -> LatencySnapshot {
        let buckets: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        LatencySnapshot {
            count: buckets.iter().sum(),
            buckets: buckets[..LATENCY_BUCKETS.len()].to_vec(),
            sum_micros: self.latency_sum_micros.load(Ordering::Relaxed),
        }
    }

    /// Messages dropped over a per-device limit, per device that was limited.
    pub fn limited_devices(&self) -> Vec<(DeviceId, u64)> {
        self.limited_devices
            .lock()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    fn count_limited(&self, device: &DeviceId) {
        inc(&self.limited, 1);
        if let Ok(mut d) = self.limited_devices.lock() {
            *d.entry(device.clone()).or_default() += 1;
        }
    }

    /// Every device's acked seq and lag, as last read from the store.
    pub fn devices(&self) -> Vec<DeviceLag> {
        self.devices.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn set_devices(&self, devices: Vec<DeviceLag>) {
        if let Ok(mut d) = self.devices.lock() {
            *d = devices;
        }
    }

    /// Counts one handled message.
    pub fn count(&self, h: &Handled) {
        match (&h.outcome, h.kind) {
            (
                Outcome::Stored {
                    records,
                    checkpoint,
                    ..
                },
                _,
            ) => {
                inc(&self.batches_stored, 1);
                inc(&self.records_stored, *records);
                inc(&self.checkpoints_stored, u64::from(checkpoint.is_some()));
            }
            (Outcome::Duplicate { .. }, _) => inc(&self.batches_duplicate, 1),
            (Outcome::Ahead { .. }, _) => inc(&self.batches_ahead, 1),
            (Outcome::Alerted { alert, .. }, _) => inc(&self.alerts[alert.kind.index()], 1),
            (Outcome::Refused { reason, .. }, Kind::Audit) => {
                inc(&self.batches_refused[reason.index()], 1)
            }
            (Outcome::Refused { reason, .. }, _) => inc(&self.refused[reason.index()], 1),
            (Outcome::Updated, kind) => inc(&self.updated[kind.index()], 1),
            (Outcome::Ignored, _) => inc(&self.ignored, 1),
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            received: get(&self.received),
            shed: get(&self.shed),
            limited: get(&self.limited),
            queued_bytes: get(&self.queued_bytes),
            batches_stored: get(&self.batches_stored),
            batches_duplicate: get(&self.batches_duplicate),
            batches_ahead: get(&self.batches_ahead),
            batches_parked: get(&self.batches_parked),
            batches_refused: labelled(&self.batches_refused, &Refusal::ALL, Refusal::as_str),
            alerts: labelled(&self.alerts, &AlertKind::ALL, AlertKind::as_str),
            records_stored: get(&self.records_stored),
            checkpoints_stored: get(&self.checkpoints_stored),
            updated: labelled(&self.updated, &Kind::ALL, Kind::as_str),
            refused: labelled(&self.refused, &Refusal::ALL, Refusal::as_str),
            ignored: get(&self.ignored),
            acks_sent: get(&self.acks_sent),
            acks_unsent: get(&self.acks_unsent),
            store_errors: get(&self.store_errors),
            subscribe_refused: get(&self.subscribe_refused),
            disconnects: get(&self.disconnects),
        }
    }

    /// One `info` line with every counter.
    pub fn log(&self, message: &'static str) {
        let s = self.snapshot();
        info!(
            received = s.received,
            shed = s.shed,
            limited = s.limited,
            queued_bytes = s.queued_bytes,
            batches_stored = s.batches_stored,
            batches_duplicate = s.batches_duplicate,
            batches_ahead = s.batches_ahead,
            batches_parked = s.batches_parked,
            batches_refused = %show(&s.batches_refused),
            alerts = %show(&s.alerts),
            records_stored = s.records_stored,
            checkpoints_stored = s.checkpoints_stored,
            updated = %show(&s.updated),
            refused = %show(&s.refused),
            ignored = s.ignored,
            acks_sent = s.acks_sent,
            acks_unsent = s.acks_unsent,
            store_errors = s.store_errors,
            subscribe_refused = s.subscribe_refused,
            disconnects = s.disconnects,
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The byte budget

/// What a message from the link costs against the budget.
fn cost(topic: &str, payload: &[u8]) -> usize {
    payload.len() + topic.len() + MESSAGE_OVERHEAD
}

/// What a device's messages not yet done with (queued, being handled, parked) hold.
#[derive(Debug, Default)]
struct DeviceHeld {
    bytes: AtomicUsize,
    messages: AtomicUsize,
}

/// What the intake knows of one device that sent lately (forgotten after [`Intake::idle`]).
struct DeviceIntake {
    bucket: Bucket,
    held: Arc<DeviceHeld>,
    /// When an audit batch of this device was last dropped (over its rate or its share, or
    /// shed): its batches that follow have a gap before them which only its resend fills.
    dropped: Option<Instant>,
    /// When its being limited was last logged.
    logged: Option<Instant>,
    /// When it last sent.
    seen: Instant,
}

/// A message's share of the budget, with its device's: returned when the message is done.
#[derive(Debug)]
struct Held {
    _permit: OwnedSemaphorePermit,
    device: Option<(Arc<DeviceHeld>, usize)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((held, bytes)) = &self.device {
            held.bytes.fetch_sub(*bytes, Ordering::Relaxed);
            held.messages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a device's message was dropped by a per-device limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Rate,
    Share,
}

/// The serve loop's side of the queues: admits a message within its device's rate, its
/// device's share of the byte budget and the budget, or drops it; never waits.
struct Intake {
    budget: Arc<Semaphore>,
    max: usize,
    /// `None` once shutdown closed the queues.
    messages: Option<queue::Sender<Message>>,
    metrics: Arc<Metrics>,
    /// Messages shed since the last one admitted (logged when shedding starts and ends).
    shedding: u64,
    /// The blob server's queue (`None` once closed: requests then go to ingest, which
    /// ignores them).
    blobs: Option<queue::SyncSender<BlobRequest>>,
    blob_metrics: Arc<BlobMetrics>,
    /// The per-device rate limit on upward messages.
    ingest_rate: RateLimit,
    /// Most bytes and messages one device's may hold ([`ServeSettings::device_max_bytes`],
    /// [`ServeSettings::device_max_messages`]).
    device_max: usize,
    device_max_messages: usize,
    devices: HashMap<DeviceId, DeviceIntake>,
    /// When `devices` was last pruned.
    pruned: Instant,
}

impl Intake {
    fn new(max: usize, messages: queue::Sender<Message>, metrics: Arc<Metrics>) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Semaphore::new(max)),
            max,
            messages: Some(messages),
            metrics,
            shedding: 0,
            blobs: None,
            blob_metrics: Arc::default(),
            ingest_rate: RateLimit {
                rate: DEFAULT_INGEST_RATE,
                burst: DEFAULT_INGEST_BURST,
            },
            // Unlimited until `Server::run` sets it from the settings.
            device_max: usize::MAX,
            device_max_messages: usize::MAX,
            devices: HashMap::new(),
            pruned: Instant::now(),
        }
    }

    /// How long a device that holds nothing is remembered after its last message: by then
    /// its bucket is full again, its last drop too old to matter and its log line due.
    fn idle(&self) -> Duration {
        let refill = self.ingest_rate.burst / self.ingest_rate.rate;
        let refill = Duration::try_from_secs_f64(refill).unwrap_or(Duration::MAX);
        refill.max(PARK_FOR).max(LIMITED_LOG_EVERY)
    }

    /// Forgets the devices that hold nothing and have been quiet for [`Self::idle`], every
    /// [`LAG_POLL`]: the map holds the devices sending now, not every device ever seen.
    fn prune(&mut self, now: Instant) {
        if now.duration_since(self.pruned) < LAG_POLL {
            return;
        }
        self.pruned = now;
        let idle = self.idle();
        self.devices.retain(|_, d| {
            d.held.messages.load(Ordering::Relaxed) > 0 || now.duration_since(d.seen) < idle
        });
    }

    /// Whether `device` may send one more message of `bytes` now: a token in its bucket and
    /// room in its share; else why not (counted as limited, and logged; a dropped `audit`
    /// batch leaves a gap in the device's stream).
    fn within_limits(
        &mut self,
        device: &DeviceId,
        bytes: usize,
        audit: bool,
        now: Instant,
    ) -> Result<(), Over> {
        let limit = self.ingest_rate;
        // The device's id is cloned only for its first message, not for every one.
        let d = match self.devices.get_mut(device) {
            Some(d) => d,
            None => self
                .devices
                .entry(device.clone())
                .or_insert_with(|| DeviceIntake {
                    bucket: Bucket::full(limit, now),
                    held: Arc::default(),
                    dropped: None,
                    logged: None,
                    seen: now,
                }),
        };
        d.seen = now;
        // The rate first: a message over its share has used a token too, as it should (a
        // flooder sending into a full share is still sending).
        let over = if !d.bucket.take(limit, now) {
            Over::Rate
        } else if d.held.bytes.load(Ordering::Relaxed) + bytes > self.device_max
            || d.held.messages.load(Ordering::Relaxed) >= self.device_max_messages
        {
            Over::Share
        } else {
            return Ok(());
        };
        if audit {
            d.dropped = Some(now);
        }
        self.metrics.count_limited(device);
        if d.logged
            .is_none_or(|t| now.duration_since(t) >= LIMITED_LOG_EVERY)
        {
            d.logged = Some(now);
            match over {
                Over::Rate => warn!(
                    device_id = %device,
                    rate = limit.rate,
                    burst = limit.burst,
                    "A device is over its message rate: its messages are dropped unacked (it sends its audit batches again)."
                ),
                Over::Share => warn!(
                    device_id = %device,
                    held_bytes = d.held.bytes.load(Ordering::Relaxed),
                    held_messages = d.held.messages.load(Ordering::Relaxed),
                    device_max_bytes = self.device_max,
                    device_max_messages = self.device_max_messages,
                    "A device holds its whole share of the hub (bytes or messages held): its messages are dropped unacked until the hub is through them (it sends its audit batches again)."
                ),
            }
        }
        Err(over)
    }

    /// Hands a message to the prepare thread if the budget has room, else sheds it (a chunk
    /// request goes to the blob server instead); false when the threads are gone.
    fn take(&mut self, topic: String, payload: Vec<u8>) -> bool {
        inc(&self.metrics.received, 1);
        let route = protocol::parse_topic(&topic);
        if let Some(blobs) = &self.blobs
            && let Ok(Route::Device {
                id,
                kind: DeviceTopic::BlobsGet,
            }) = route
        {
            let request = BlobRequest {
                device: id,
                payload,
            };
            if blobs.try_send(request).is_err() {
                inc(&self.blob_metrics.dropped, 1);
            }
            return true;
        }
        let bytes = cost(&topic, &payload);
        let now = Instant::now();
        self.prune(now);
        let (device, audit) = match route {
            Ok(Route::Device { id, kind }) => (Some(id), kind == DeviceTopic::Audit),
            _ => (None, false),
        };
        if let Some(id) = &device
            && let Err(over) = self.within_limits(id, bytes, audit, now)
        {
            debug!(topic = %topic, bytes = payload.len(), ?over, "Message over its device's limit dropped.");
            return true;
        }
        let permit = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok());
        let device = device.and_then(|id| self.devices.get_mut(&id));
        let (Some(messages), Some(permit)) = (&self.messages, permit) else {
            inc(&self.metrics.shed, 1);
            if let Some(d) = device
                && audit
            {
                d.dropped = Some(now);
            }
            if self.shedding == 0 {
                warn!(
                    budget_bytes = self.max,
                    held_bytes = self.held(),
                    closed = self.messages.is_none(),
                    "Messages dropped unacked (over the byte budget, or stopping); their devices send them again."
                );
            }
            self.shedding += 1;
            debug!(topic = %topic, bytes = payload.len(), "Message shed.");
            return true;
        };
        if self.shedding > 0 {
            info!(shed = self.shedding, "Taking messages again.");
            self.shedding = 0;
        }
        // A batch of a device that lost an audit batch here lately is not parked if it comes
        // `ahead`: the gap before it is the dropped batch, which only the device's own resend
        // fills.
        let may_park = device
            .as_ref()
            .and_then(|d| d.dropped)
            .is_none_or(|t| now.duration_since(t) >= PARK_FOR);
        let held = Held {
            _permit: permit,
            device: device.map(|d| {
                d.held.bytes.fetch_add(bytes, Ordering::Relaxed);
                d.held.messages.fetch_add(1, Ordering::Relaxed);
                (d.held.clone(), bytes)
            }),
        };
        messages
            .send(Message {
                topic,
                payload,
                held,
                may_park,
            })
            .is_ok()
    }

    /// Bytes held now.
    fn held(&self) -> usize {
        self.max.saturating_sub(self.budget.available_permits())
    }

    /// Closes the prepare thread's queue: what it holds is still handled, later messages
    /// are shed.
    fn close(&mut self) {
        self.messages = None;
        self.blobs = None;
    }
}

// ---------------------------------------------------------------------------------------------
// The ingest thread

/// A message from the link, for the prepare thread, with its share of the budget.
#[derive(Debug)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    held: Held,
    /// Whether the ingest thread may park it if it comes `ahead`.
    may_park: bool,
}

/// What the ingest thread is given.
enum Work {
    /// A message, read and checked by the prepare thread (boxed: a prepared message is
    /// large and the queue holds many).
    Item(Box<Item>),
    /// The link connected (again): time to send the unsent acks.
    Connected,
}

/// The prepare thread: reads and checks each message (decoding, the hash chain inside a
/// batch) without the store, in order, and hands it to the ingest thread.
fn prepare_loop(messages: queue::Receiver<Message>, work: queue::Sender<Work>) {
    while let Ok(m) = messages.recv() {
        let item = Item {
            prepared: ingest::prepare(&m.topic, &m.payload),
            bytes: m.payload.len(),
            may_park: m.may_park,
            _held: Some(m.held),
        };
        if work.send(Work::Item(Box::new(item))).is_err() {
            break;
        }
    }
    debug!("Prepare thread done.");
}

/// A message read and checked, with its size (what parking it costs) and its share of the
/// budget (returned when it is dropped; `None` only in tests).
struct Item {
    prepared: Prepared,
    bytes: usize,
    /// False for a batch of a device that lost a message here lately (see [`Intake::take`]).
    may_park: bool,
    _held: Option<Held>,
}

/// The devices `items` concern (for [`super::store::IngestTx::lock_devices`]).
fn devices_of<'a>(items: impl Iterator<Item = &'a Item>) -> Vec<&'a DeviceId> {
    items.filter_map(|i| i.prepared.device()).collect()
}

/// What the ingest thread has been given and not yet applied, served round-robin by device:
/// a group takes one message of each device in turn (a device's own stay in their order), so
/// a device with many messages waiting (a flood, a big resend) takes its turn like the
/// others instead of the hub's time in arrival order. Bounded by the byte budget (each item
/// holds its share of it).
#[derive(Default)]
struct Backlog {
    by_device: HashMap<Option<DeviceId>, VecDeque<Item>>,
    /// Devices with something waiting, in the order of their next turn.
    turns: VecDeque<Option<DeviceId>>,
    len: usize,
}

impl Backlog {
    fn push(&mut self, item: Item) {
        let key = item.prepared.device().cloned();
        let waiting = self.by_device.entry(key.clone()).or_default();
        if waiting.is_empty() {
            self.turns.push_back(key);
        }
        waiting.push_back(item);
        self.len += 1;
    }

    /// Up to `max` messages, one per device per turn.
    fn group(&mut self, max: usize) -> Vec<Item> {
        let mut group = Vec::with_capacity(max.min(self.len));
        while group.len() < max {
            let Some(key) = self.turns.pop_front() else {
                break;
            };
            let Some(waiting) = self.by_device.get_mut(&key) else {
                continue;
            };
            if let Some(item) = waiting.pop_front() {
                group.push(item);
                self.len -= 1;
            }
            if waiting.is_empty() {
                self.by_device.remove(&key);
            } else {
                self.turns.push_back(key);
            }
        }
        group
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Most messages taken from the queue into the [`Backlog`] at once (the queue holds what
/// the prepare thread handed over since, within the byte budget).
const BACKLOG_TAKE_MAX: usize = 1 << 16;

/// An `ahead` batch waiting for the head to reach it.
struct Parked {
    item: Item,
    since: Instant,
}

struct Worker {
    store: Box<dyn Store>,
    link: LinkHandle,
    metrics: Arc<Metrics>,
    backlog: Backlog,
    parked: Vec<Parked>,
    parked_bytes: usize,
    /// When parked batches were last looked at.
    last_retry: Instant,
    /// Acks the link did not take: the newest head per device.
    unsent: BTreeMap<DeviceId, u64>,
    /// When unsent acks were last tried.
    last_ack_try: Instant,
    /// [`PARK_FOR`], shorter in tests.
    park_for: Duration,
    /// Desired-state topic → the payload last published retained there (empty: cleared);
    /// emptied on every connect, so everything goes out again.
    desired: BTreeMap<String, Vec<u8>>,
    /// When `hub.db`'s desired states were last looked at.
    last_desired: Instant,
    /// Whether `/metrics` is served (then devices' lags are read every [`LAG_POLL`]).
    poll_lag: bool,
    /// When they were last read.
    last_lag: Option<Instant>,
    /// The hub's data directory (its audit chain records what phased rollouts do).
    data_dir: PathBuf,
}

impl Worker {
    fn new(
        store: Box<dyn Store>,
        link: LinkHandle,
        metrics: Arc<Metrics>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            store,
            link,
            metrics,
            backlog: Backlog::default(),
            parked: Vec::new(),
            parked_bytes: 0,
            last_retry: Instant::now(),
            unsent: BTreeMap::new(),
            last_ack_try: Instant::now(),
            park_for: PARK_FOR,
            desired: BTreeMap::new(),
            last_desired: Instant::now(),
            poll_lag: false,
            last_lag: None,
            data_dir,
        }
    }

    /// Reads every device's acked seq and lag for `/metrics`.
    fn refresh_lag(&mut self) {
        self.last_lag = Some(Instant::now());
        let started = Instant::now();
        match self.store.devices() {
            Ok(devices) => self.metrics.set_devices(
                devices
                    .into_iter()
                    .map(|d| DeviceLag {
                        id: d.id,
                        acked_seq: d.acked_seq,
                        audit_lag: d.audit_lag,
                    })
                    .collect(),
            ),
            Err(e) => warn!(error = %e, "Reading the devices' lag failed."),
        }
        debug!(
            took_ms = started.elapsed().as_millis() as u64,
            "Devices' lag read."
        );
    }

    fn run(mut self, queue: queue::Receiver<Work>) {
        let mut closed = false;
        loop {
            // Asleep until work comes, unless a backlog, parked batches or unsent acks need
            // it; once the queue is closed, only the backlog is left to do.
            let first = if closed {
                None
            } else {
                let wake = if self.backlog.is_empty() {
                    self.wake_at()
                } else {
                    Some(Instant::now())
                };
                match wake {
                    None => match queue.recv() {
                        Ok(work) => Some(work),
                        Err(_) => break,
                    },
                    Some(at) => {
                        match queue.recv_timeout(at.saturating_duration_since(Instant::now())) {
                            Ok(work) => Some(work),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => {
                                closed = true;
                                None
                            }
                        }
                    }
                }
            };
            if closed && self.backlog.is_empty() {
                break;
            }
            let mut connected = false;
            let mut next = first;
            let mut taken = 0;
            while let Some(work) = next {
                match work {
                    Work::Item(item) => self.backlog.push(*item),
                    Work::Connected => connected = true,
                }
                taken += 1;
                next = if taken < BACKLOG_TAKE_MAX {
                    queue.try_recv().ok()
                } else {
                    None
                };
            }
            let group = self.backlog.group(MAX_GROUP);
            let stored = !group.is_empty() && self.handle(group);
            if stored || self.due(self.last_retry, PARK_RETRY, !self.parked.is_empty()) {
                self.retry_parked();
            }
            if connected || self.due(self.last_ack_try, ACK_RETRY, !self.unsent.is_empty()) {
                self.resend_acks();
            }
            if connected {
                self.desired.clear();
            }
            if connected || self.due(self.last_desired, DESIRED_POLL, self.link.is_connected()) {
                self.publish_desired();
            }
            if self.poll_lag && self.last_lag.is_none_or(|t| t.elapsed() >= LAG_POLL) {
                self.refresh_lag();
            }
        }
        self.finish();
        debug!("Ingest thread done.");
    }

    /// When the thread must wake without work: the next parked retry, the next ack retry
    /// (only while connected: `Connected` wakes it otherwise); `None` to sleep until work.
    fn wake_at(&self) -> Option<Instant> {
        let parked = (!self.parked.is_empty()).then(|| self.last_retry + PARK_RETRY);
        let acks = (!self.unsent.is_empty() && self.link.is_connected())
            .then(|| self.last_ack_try + ACK_RETRY);
        let desired = self
            .link
            .is_connected()
            .then(|| self.last_desired + DESIRED_POLL);
        let lag = self
            .poll_lag
            .then(|| self.last_lag.map_or_else(Instant::now, |t| t + LAG_POLL));
        parked
            .into_iter()
            .chain(acks)
            .chain(desired)
            .chain(lag)
            .min()
    }

    fn due(&self, last: Instant, every: Duration, pending: bool) -> bool {
        pending && last.elapsed() >= every
    }

    /// At shutdown (the queue closed and emptied): parked batches are tried as long as
    /// they move (the batch before them is usually being stored by another hub right now),
    /// the rest dropped unacked; unsent acks get one last try.
    fn finish(&mut self) {
        let started = Instant::now();
        let mut moved = Instant::now();
        while !self.parked.is_empty()
            && moved.elapsed() < SHUTDOWN_PARK_WAIT
            && started.elapsed() < SHUTDOWN_PARK_MAX
        {
            std::thread::sleep(PARK_RETRY);
            let before = self.parked.len();
            self.retry_parked();
            if self.parked.len() < before {
                moved = Instant::now();
            }
        }
        if !self.parked.is_empty() {
            info!(
                batches = self.parked.len(),
                "Parked audit batches dropped at shutdown; their devices send them again."
            );
            self.parked.clear();
            self.parked_bytes = 0;
        }
        self.resend_acks();
    }

    /// Applies `group` in one transaction (one per message if that fails), then reports;
    /// whether anything was stored.
    fn handle(&mut self, group: Vec<Item>) -> bool {
        match self.apply(&group) {
            Ok(handled) => self.report(group, handled, true),
            Err(e) if group.len() > 1 => {
                warn!(error = %e, messages = group.len(), "Ingest transaction failed; applying its messages one by one.");
                let mut stored = false;
                for item in group {
                    match self.apply(std::slice::from_ref(&item)) {
                        Ok(handled) => stored |= self.report(vec![item], handled, true),
                        Err(e) => self.failed(&item, &e),
                    }
                }
                stored
            }
            Err(e) => {
                self.failed(&group[0], &e);
                false
            }
        }
    }

    fn failed(&self, item: &Item, e: &super::HubError) {
        inc(&self.metrics.store_errors, 1);
        error!(
            kind = item.prepared.kind().as_str(),
            device = item.prepared.device().map_or("-", DeviceId::as_str),
            bytes = item.bytes,
            error = %e,
            "Message not stored; not acked."
        );
    }

    /// Applies the items in one transaction and commits.
    fn apply(&mut self, items: &[Item]) -> Result<Vec<Handled>> {
        let now = now_rfc3339();
        let started = Instant::now();
        let mut tx = self.store.begin_ingest()?;
        tx.lock_devices(&devices_of(items.iter()))?;
        let mut handled = Vec::with_capacity(items.len());
        for item in items {
            handled.push(ingest::apply(tx.as_mut(), &item.prepared, &now)?);
        }
        tx.commit()?;
        self.metrics.observe_transaction(started.elapsed());
        Ok(handled)
    }

    /// After a commit: `ahead` batches are parked when `may_park` (and they fit), the rest
    /// counted and logged; then one ack per device (its newest head). Whether anything was
    /// stored.
    fn report(&mut self, items: Vec<Item>, handled: Vec<Handled>, may_park: bool) -> bool {
        let mut acks: Vec<(DeviceId, u64)> = Vec::new();
        let mut stored = false;
        for (item, h) in items.into_iter().zip(handled) {
            if may_park
                && item.may_park
                && matches!(h.outcome, Outcome::Ahead { .. })
                && self.park(item)
            {
                continue;
            }
            stored |= matches!(h.outcome, Outcome::Stored { .. });
            self.metrics.count(&h);
            log_handled(&h);
            if let (Some(seq), Some(device)) = (h.outcome.acked_seq(), h.device) {
                match acks.iter_mut().find(|(d, _)| *d == device) {
                    Some(a) => a.1 = a.1.max(seq),
                    None => acks.push((device, seq)),
                }
            }
        }
        for (device, acked_seq) in acks {
            self.ack(device, acked_seq);
        }
        stored
    }

    /// Parks an `ahead` batch, unless the parked ones already hold [`PARK_MAX_BYTES`];
    /// whether it was parked. The same batch again (a resend) replaces the parked one.
    fn park(&mut self, item: Item) -> bool {
        let same = |p: &Parked| {
            p.item.prepared.device() == item.prepared.device()
                && p.item.prepared.seqs() == item.prepared.seqs()
        };
        if let Some(i) = self.parked.iter().position(same) {
            let old = self.parked.swap_remove(i);
            self.parked_bytes -= old.item.bytes;
        }
        if self.parked_bytes + item.bytes > PARK_MAX_BYTES {
            return false;
        }
        if self.parked.is_empty() {
            // The first retry one period from now, not at once.
            self.last_retry = Instant::now();
        }
        self.parked_bytes += item.bytes;
        inc(&self.metrics.batches_parked, 1);
        self.parked.push(Parked {
            item,
            since: Instant::now(),
        });
        true
    }

    /// Whether trying the parked batches again can change anything: one timed out, or its
    /// device's head (read without the write lock) reached it. A failed read says yes (the
    /// retry then reports the store's error).
    fn parked_may_move(&self) -> bool {
        if self
            .parked
            .iter()
            .any(|p| p.since.elapsed() >= self.park_for)
        {
            return true;
        }
        let mut heads: BTreeMap<&DeviceId, u64> = BTreeMap::new();
        for p in &self.parked {
            let (Some(device), Some((first, _))) =
                (p.item.prepared.device(), p.item.prepared.seqs())
            else {
                return true;
            };
            let head = match heads.get(device) {
                Some(h) => *h,
                None => match self.store.audit_head_seq(device) {
                    Ok(h) => *heads.entry(device).or_insert(h),
                    Err(_) => return true,
                },
            };
            if first <= head.saturating_add(1) {
                return true;
            }
        }
        false
    }

    /// Applies the parked batches again, in seq order per device, when that can change
    /// anything: stored ones are acked, ones still ahead stay parked until [`PARK_FOR`] is
    /// over, then count as `ahead` and are acked with the head (and the hub checks whether
    /// it is behind their device, in the same transaction).
    fn retry_parked(&mut self) {
        self.last_retry = Instant::now();
        if self.parked.is_empty() || !self.parked_may_move() {
            return;
        }
        let mut parked = std::mem::take(&mut self.parked);
        self.parked_bytes = 0;
        parked.sort_by(|a, b| {
            (a.item.prepared.device(), a.item.prepared.seqs())
                .cmp(&(b.item.prepared.device(), b.item.prepared.seqs()))
        });
        let expired: Vec<bool> = parked
            .iter()
            .map(|p| p.since.elapsed() >= self.park_for)
            .collect();
        let store = &mut self.store;
        let metrics = &self.metrics;
        let result = (|| -> Result<(Vec<Handled>, Vec<Handled>)> {
            let now = now_rfc3339();
            let started = Instant::now();
            let mut tx = store.begin_ingest()?;
            tx.lock_devices(&devices_of(parked.iter().map(|p| &p.item)))?;
            let mut handled = Vec::with_capacity(parked.len());
            for p in &parked {
                handled.push(ingest::apply(tx.as_mut(), &p.item.prepared, &now)?);
            }
            // The head of each device one of whose batches gives up waiting now.
            let mut gave_up: BTreeMap<&DeviceId, u64> = BTreeMap::new();
            for (h, expired) in handled.iter().zip(&expired) {
                if let (true, Outcome::Ahead { head, .. }, Some(device)) =
                    (*expired, &h.outcome, &h.device)
                {
                    let e = gave_up.entry(device).or_insert(*head);
                    *e = (*e).max(*head);
                }
            }
            let mut behind = Vec::new();
            for (device, head) in gave_up {
                if let Some(outcome) = ingest::note_behind(tx.as_mut(), device, head, &now)? {
                    behind.push(Handled {
                        kind: Kind::Audit,
                        device: Some(device.clone()),
                        outcome,
                    });
                }
            }
            tx.commit()?;
            metrics.observe_transaction(started.elapsed());
            Ok((handled, behind))
        })();
        let (handled, behind) = match result {
            Ok(h) => h,
            Err(e) => {
                // Nothing changed; they are dropped unacked and the devices send them again.
                inc(&self.metrics.store_errors, 1);
                error!(error = %e, batches = parked.len(), "Parked batches not applied; not acked.");
                return;
            }
        };
        for h in &behind {
            self.metrics.count(h);
            log_handled(h);
        }
        let mut done_items = Vec::new();
        let mut done = Vec::new();
        for ((p, h), expired) in parked.into_iter().zip(handled).zip(expired) {
            if matches!(h.outcome, Outcome::Ahead { .. }) && !expired {
                self.parked_bytes += p.item.bytes;
                self.parked.push(p);
            } else {
                done_items.push(p.item);
                done.push(h);
            }
        }
        self.report(done_items, done, false);
    }

    /// Publishes an ack; one the link does not take is kept (the newest per device) for
    /// [`Worker::resend_acks`].
    fn ack(&mut self, device: DeviceId, acked_seq: u64) {
        let topic = device_topic(&device, DeviceTopic::AuditAck);
        let ack = AuditAck {
            v: V1,
            device_id: device,
            acked_seq,
        };
        let sent = protocol::encode(&ack, MAX_ACK_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                self.link
                    .try_publish(&topic, p, false)
                    .map_err(|e| e.to_string())
            });
        let device = ack.device_id;
        match sent {
            Ok(_) => {
                inc(&self.metrics.acks_sent, 1);
                if self.unsent.get(&device).is_some_and(|s| *s <= acked_seq) {
                    self.unsent.remove(&device);
                }
            }
            Err(e) => {
                inc(&self.metrics.acks_unsent, 1);
                debug!(device = %device, acked_seq, error = %e, "Ack not sent; tried again later.");
                let kept = self.unsent.entry(device).or_insert(acked_seq);
                *kept = (*kept).max(acked_seq);
            }
        }
    }

    /// Publishes, retained, each target's newest desired state that changed since it was
    /// last published (an empty payload, which clears the retained message, while its
    /// rollout is halted). One the link does not take goes at the next look.
    fn publish_desired(&mut self) {
        self.last_desired = Instant::now();
        if !self.link.is_connected() {
            return;
        }
        match rollout::advance(&self.data_dir, self.store.as_mut()) {
            Ok(steps) => {
                for a in steps {
                    info!(rollout = a.rollout, step = ?a.step, "Phased rollout moved.");
                }
            }
            Err(e) => warn!(error = %e, "Rollouts cannot be advanced now."),
        }
        let current = match self.store.current_desired() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "Desired states cannot be read.");
                return;
            }
        };
        for d in current {
            let topic = d.target.desired_topic();
            let payload = if d.halted {
                Vec::new()
            } else {
                d.doc_json.into_bytes()
            };
            if self.desired.get(&topic) == Some(&payload) {
                continue;
            }
            match self.link.try_publish(&topic, payload.clone(), true) {
                Ok(_) => {
                    info!(desired_target = %d.target, version = d.version, rollout = d.rollout_id,
                        halted = d.halted, "Desired state published.");
                    self.desired.insert(topic, payload);
                }
                Err(e) => {
                    debug!(desired_target = %d.target, error = %e, "Desired state not published now.");
                }
            }
        }
    }

    /// Sends the unsent acks again, if the link is connected.
    fn resend_acks(&mut self) {
        self.last_ack_try = Instant::now();
        if self.unsent.is_empty() || !self.link.is_connected() {
            return;
        }
        for (device, acked_seq) in std::mem::take(&mut self.unsent) {
            self.ack(device, acked_seq);
        }
    }
}

fn log_handled(h: &Handled) {
    let device = h.device.as_ref().map_or("-", DeviceId::as_str);
    let kind = h.kind.as_str();
    match &h.outcome {
        Outcome::Stored {
            first_seq,
            last_seq,
            records,
            head,
            checkpoint,
        } => debug!(
            device,
            first_seq,
            last_seq,
            records,
            head,
            checkpoint = ?checkpoint,
            "Audit batch stored."
        ),
        Outcome::Duplicate { head } => debug!(device, head, "Audit batch already stored."),
        Outcome::Ahead { first_seq, head } => {
            debug!(
                device,
                first_seq, head, "Audit batch ahead of the stored head."
            )
        }
        Outcome::Alerted { alert, new } => {
            let message = match alert.kind {
                AlertKind::Behind => "The hub's store is behind the device; alert recorded.",
                _ => "Audit chain alert; batch refused.",
            };
            let (kind, seq, detail) = (alert.kind.as_str(), alert.seq, &alert.detail);
            // The first sighting is the news; a device resending its batch repeats it.
            if *new {
                error!(device, kind, seq, detail = %detail, "{message}");
            } else {
                debug!(device, kind, seq, detail = %detail, repeated = true, "{message}");
            }
        }
        Outcome::Refused { reason, detail } => warn!(
            device,
            kind,
            reason = reason.as_str(),
            detail = %detail,
            "Message refused."
        ),
        Outcome::Updated => debug!(device, kind, "Device updated."),
        Outcome::Ignored => debug!(kind, "Message ignored."),
    }
}

// ---------------------------------------------------------------------------------------------
// The loop

/// `serve`: [`Server::open`] checks and opens what it needs, [`Server::run`] serves until
/// shutdown.
pub struct Server {
    settings: ServeSettings,
    store: Box<dyn Store>,
    /// The blob server's own connection (chunk counts), opened here, off the runtime: the
    /// PostgreSQL client blocks on a runtime of its own.
    blob_store: Box<dyn Store>,
    metrics: Arc<Metrics>,
    /// `/metrics`, bound by `open` (so a taken port fails before anything starts).
    metrics_listener: Option<std::net::TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("client_id", &self.settings.link.client_id)
            .field("data_dir", &self.settings.data_dir)
            .finish()
    }
}

fn log_blob_metrics(m: &BlobMetrics, message: &'static str) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    info!(
        requests = get(&m.requests),
        served = get(&m.served),
        served_bytes = get(&m.served_bytes),
        rate_limited = get(&m.rate_limited),
        refused = get(&m.refused),
        dropped = get(&m.dropped),
        "{message}"
    );
}

fn status(state: LinkState) -> Result<Vec<u8>> {
    let s = Status {
        v: V1,
        state,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(protocol::encode(&s, MAX_STATUS_BYTES)?)
}

impl Server {
    /// Opens (creating) `<data_dir>/hub.db` and checks the link's configuration (and that
    /// the byte budget holds the largest packet the link takes).
    pub fn open(settings: ServeSettings) -> Result<Server> {
        settings.link.validate()?;
        let largest = settings.link.max_packet_size + MESSAGE_OVERHEAD;
        for (name, bytes) in [
            ("queue_max_bytes", settings.queue_max_bytes),
            ("device_max_bytes", settings.device_max_bytes),
        ] {
            if bytes < largest {
                return Err(super::HubError::Serve(format!(
                    "{name} ({bytes}) must hold at least one packet of max_packet_size ({} \
                     bytes) and its overhead: {largest} bytes",
                    settings.link.max_packet_size
                )));
            }
        }
        if settings.device_max_messages == 0 {
            return Err(super::HubError::Serve(
                "device_max_messages must be at least 1".into(),
            ));
        }
        make_dir(&settings.data_dir)?;
        let metrics_listener = settings
            .listen
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| {
                        super::HubError::Serve(format!("listening for /metrics on {addr}: {e}"))
                    })
            })
            .transpose()?;
        let store = settings.store.open()?;
        let blob_store = settings.store.open()?;
        Ok(Server {
            settings,
            store,
            blob_store,
            metrics: Arc::default(),
            metrics_listener,
        })
    }

    /// The counters, shared with the running server.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown`, then stops as the module header says; an error when it
    /// stopped for another reason (the link or a thread gone), so the exit is a failure.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Server {
            settings,
            store,
            blob_store,
            metrics,
            metrics_listener,
        } = self;
        let metrics_stop = shutdown.child_token();
        let poll_lag = metrics_listener.is_some();
        if let Some(l) = metrics_listener {
            let listener = tokio::net::TcpListener::from_std(l)
                .map_err(|e| super::HubError::Serve(format!("listening for /metrics: {e}")))?;
            tokio::spawn(super::metrics::run(
                listener,
                metrics.clone(),
                metrics_stop.clone(),
            ));
        }
        let hub = DeviceId::new(HUB_IDENTITY)?;
        let status_topic = hub_status_topic(&hub);
        let online = status(LinkState::Online)?;
        let session = Session {
            will: Will {
                topic: status_topic.clone(),
                payload: status(LinkState::Offline)?,
            },
            subscriptions: protocol::hub_subscriptions(settings.shared_subscriptions),
        };
        let link_stop = CancellationToken::new();
        let (link, mut events, link_task) =
            Link::spawn(&settings.link, session, link_stop.clone())?;
        let broker = settings.link.broker.clone();
        info!(
            broker = %broker,
            client_id = %settings.link.client_id,
            data_dir = %settings.data_dir.display(),
            "Starting."
        );

        let (messages, messages_rx) = queue::channel::<Message>();
        let (work, work_rx) = queue::channel::<Work>();
        let mut worker = Worker::new(
            store,
            link.clone(),
            metrics.clone(),
            settings.data_dir.clone(),
        );
        worker.poll_lag = poll_lag;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| super::HubError::Io {
                    what: "starting a thread to serve",
                    path: settings.data_dir.clone(),
                    source: e,
                })
        };
        let ingest_thread = spawn(INGEST_THREAD, Box::new(move || worker.run(work_rx)))?;
        let prepare_work = work.clone();
        let prepare_thread = spawn(
            PREPARE_THREAD,
            Box::new(move || prepare_loop(messages_rx, prepare_work)),
        )?;
        let mut intake = Intake::new(settings.queue_max_bytes, messages, metrics.clone());
        intake.ingest_rate = settings.ingest_rate;
        intake.device_max = settings.device_max_bytes;
        intake.device_max_messages = settings.device_max_messages;
        // The blob server: its own connection to the store (counts) and its own thread.
        let (blob_tx, blob_rx) = queue::sync_channel::<BlobRequest>(blobs::QUEUE_LEN);
        let gate = Gate::new(blob_store, &settings.data_dir, settings.chunk_rate);
        let blob_server = BlobServer::new(gate, link.clone(), intake.blob_metrics.clone());
        let blob_thread = spawn(
            blobs::BLOB_THREAD,
            Box::new(move || blob_server.run(blob_rx)),
        )?;
        intake.blobs = Some(blob_tx);
        let blob_metrics = intake.blob_metrics.clone();

        let every = settings.summary_every;
        let mut summary = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // Why serving stopped other than by shutdown: the exit is then a failure.
        let mut failure: Option<&'static str> = None;
        // Nothing in this loop waits but `select!` itself: the link is never held up.
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = summary.tick() => {
                    metrics.queued_bytes.store(intake.held() as u64, Ordering::Relaxed);
                    metrics.log("Ingest summary.");
                    log_blob_metrics(&blob_metrics, "Blob summary.");
                }
                event = events.recv() => match event {
                    Some(LinkEvent::Connected) => {
                        if let Err(e) = link.try_publish(&status_topic, online.clone(), true) {
                            warn!(error = %e, "Online status not sent.");
                        }
                        // The acks the link could not take go now.
                        let _ = work.send(Work::Connected);
                        info!(broker = %broker, client_id = %settings.link.client_id, "Serving.");
                    }
                    Some(LinkEvent::Message { topic, payload }) => {
                        if !intake.take(topic, payload) {
                            failure = Some("the ingest threads stopped");
                            break;
                        }
                    }
                    Some(LinkEvent::SubscribeRefused { filters }) => {
                        inc(&metrics.subscribe_refused, filters.len() as u64);
                        error!(
                            filters = ?filters,
                            "The broker refused the hub's subscriptions; nothing arrives on them (check its ACL for the outpost-hub user)."
                        );
                    }
                    // The link logs these itself and reconnects.
                    Some(LinkEvent::Disconnected { .. }) => inc(&metrics.disconnects, 1),
                    Some(LinkEvent::ConnectFailed { .. }) => {}
                    Some(LinkEvent::PubAck(_)) => {}
                    None => {
                        failure = Some("the broker link stopped");
                        break;
                    }
                },
            }
        }

        match failure {
            Some(why) => error!(reason = why, "Stopping."),
            None => info!("Stopping."),
        }
        // (1) No new messages: the broker hands what this hub has not read to the other
        // hubs. What it sent before confirming is handled as usual.
        if failure.is_none() {
            let stopped = link.stop_receiving();
            tokio::pin!(stopped);
            let grace = tokio::time::sleep(UNSUBSCRIBE_GRACE);
            tokio::pin!(grace);
            // After the confirmation, until the link has been quiet for UNSUBSCRIBE_QUIET:
            // the broker still sends what it had queued for this client.
            let quiet = tokio::time::sleep(UNSUBSCRIBE_GRACE);
            tokio::pin!(quiet);
            let mut confirmed = false;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped, if !confirmed => {
                        confirmed = true;
                        quiet.as_mut().reset(tokio::time::Instant::now() + UNSUBSCRIBE_QUIET);
                    }
                    _ = &mut quiet, if confirmed => break,
                    _ = &mut grace => {
                        if !confirmed {
                            warn!(
                                grace_secs = UNSUBSCRIBE_GRACE.as_secs(),
                                "The broker did not confirm the unsubscribe in time; stopping anyway."
                            );
                        }
                        break;
                    }
                    event = events.recv() => match event {
                        Some(LinkEvent::Message { topic, payload }) => {
                            if !intake.take(topic, payload) {
                                failure = Some("the ingest threads stopped");
                                break;
                            }
                            if confirmed {
                                quiet.as_mut().reset(tokio::time::Instant::now() + UNSUBSCRIBE_QUIET);
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            debug!(confirmed, "No longer taking messages.");
        }
        // (2) The threads finish what they were given (the acks queued), and return; the
        // link's events are still read (a message the broker still delivers is shed), so it
        // never waits on this loop.
        intake.close();
        drop(work);
        let joined = tokio::task::spawn_blocking(move || {
            let prepared = prepare_thread.join();
            let ingested = ingest_thread.join();
            let served = blob_thread.join();
            prepared.and(ingested).and(served)
        });
        tokio::pin!(joined);
        let grace = tokio::time::sleep(INGEST_GRACE);
        tokio::pin!(grace);
        let mut reading = true;
        loop {
            tokio::select! {
                biased;
                joined = &mut joined => {
                    if !matches!(joined, Ok(Ok(()))) {
                        error!("An ingest thread failed.");
                        failure = failure.or(Some("an ingest thread failed"));
                    }
                    break;
                }
                _ = &mut grace => {
                    warn!(
                        grace_secs = INGEST_GRACE.as_secs(),
                        "The ingest threads did not finish in time; what they had not committed is not acked."
                    );
                    break;
                }
                event = events.recv(), if reading => match event {
                    Some(LinkEvent::Message { topic, payload }) => {
                        intake.take(topic, payload);
                    }
                    Some(_) => {}
                    None => reading = false,
                },
            }
        }
        // (3) The link stops gracefully (the acks it holds, the offline status).
        drop(events);
        link_stop.cancel();
        let _ = link_task.await;
        metrics
            .queued_bytes
            .store(intake.held() as u64, Ordering::Relaxed);
        metrics_stop.cancel();
        metrics.log("Stopped.");
        log_blob_metrics(&blob_metrics, "Blob server stopped.");
        match failure {
            Some(why) => Err(super::HubError::Serve(why.into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
