//! The device's sync loop: audit records, state and telemetry up to the hub, acks down.
//!
//! [`SyncLoop::run`] is one task of the daemon's task tree. Its SQLite work (`outbox.db`,
//! reading `audit.db`) blocks, so the loop runs on a thread of its own (driving its futures
//! with the runtime's handle) and never stalls a runtime worker; the [`conn::Link`] it starts
//! runs on the runtime as usual. What the agent knows and this crate does not (models,
//! aliases, metrics) comes through the [`DeviceSource`] trait; what the loop has done is in
//! [`SyncStats`], which the daemon's `/metrics` reads.
//!
//! Audit upload rules:
//! - Records leave in seq order from the outbox's cursor, packed by [`BatchBuilder`]
//!   (`batch_max_records`, `batch_max_bytes`), QoS 1, each batch with the newest checkpoint
//!   at or below its last seq (so the hub can verify it at once). At most [`Settings::window`]
//!   batches are unacknowledged at a time.
//! - Only the hub's `audit/ack` moves the cursor (in `outbox.db`, durably). A PubAck from the
//!   broker means nothing for audit records: the broker is not storage.
//! - After every (re)connect, and whenever the ack has not moved for
//!   [`Settings::ack_timeout`] with batches outstanding, everything above the cursor is sent
//!   again ([`Outbox::rewind`]); the hub stores by (device, seq) and acks duplicates.
//! - A record never leaves the log: nothing here deletes or skips one. A record too large
//!   for a batch stops the upload with an error in `sync status` rather than being dropped.
//!   An audit log that ends below the cursor (restored from an old copy, truncated) is
//!   reported the same way; the hub sees the new records fail to link when they come.
//!
//! State and telemetry: on every connect the retained `status` (online, agent version; the
//! last will says offline) and `state/reported` go out; `state/reported` again whenever it
//! changes (looked at every [`Settings::state_interval`]). Telemetry snapshots are queued in
//! `outbox.db` under the byte quota every `telemetry_interval` and sent while connected; a
//! snapshot leaves the queue on its PubAck.
//!
//! Desired state (sync part 2, first slice): the loop subscribes to its own and its groups'
//! desired-state topics, checks each retained document with [`release::verify_desired`]
//! (pinned release keys, target, expiry against the trusted clock, version above the last one
//! accepted for that target), records the outcome through [`DeviceSource::desired`] (the
//! agent's audit log, `sync:desired`), keeps what it accepted in `outbox.db` (per target),
//! and reports the document it follows ([`release::pick_desired`]) in `state/reported`. The
//! same document delivered again (retained messages come on every connect) is neither
//! re-checked nor re-recorded; an empty payload (the hub cleared a halted rollout) changes
//! nothing.
//!
//! Model download ([`crate::transfer`], rules in its header): when the followed document's
//! model is not in the registry, the loop fetches its blob in chunks on
//! `devices/{id}/blobs/get` (a window of requests in flight, each answered by a chunk frame
//! on `devices/{id}/blobs`), verifies and writes each chunk, stores the bitmap once per burst
//! of chunks after an fsync, re-requests what timed out or failed its hash, verifies the
//! whole SHA-256, and hands the file to [`DeviceSource::install`] (the agent's registry
//! import by rename). Each step is recorded through [`DeviceSource::record`]; progress goes
//! out in `state/reported` (`transfer`).
//!
//! The device's state in the rollout it follows is [`apply::step`]'s: while the model is not
//! installed it reports the download's progress (`downloading`, chunks done in percent, or
//! `failed`); once installed it runs the health-gated activation through
//! [`DeviceSource::activate`] (on this thread, which waits for it) when the document asks
//! for it, keeps the outcome in `outbox.db` and reports it in `state/reported` (`rollout`).
//! A successful install steps the rollout at once, so activation follows the install
//! without waiting for the next state tick.
//!
//! Stopping (the daemon's SIGTERM): no new batches; the loop waits up to [`FLUSH_GRACE`] for
//! the acks of the batches in flight, then stops the link gracefully (offline status,
//! DISCONNECT) and returns.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_policy::audit::{AuditReader, Checkpoint, Entry, Outcome, Query, now_rfc3339};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::apply::{self, ActivateError, ActivateRequest};
use crate::conn::{self, ConnError, Link, LinkConfig, LinkEvent, LinkHandle, PublishId, Session};
use crate::outbox::TransferRow;
use crate::outbox::{AcceptedDesired, Acked, Outbox, OutboxError};
use crate::protocol::chunk::MAX_CHUNK_REQUEST_BYTES;
use crate::protocol::{
    self, AuditAck, BatchBuilder, BatchLimits, DeviceId, EncodedBatch, GroupId, LinkState, Pushed,
    ReportedModel, ReportedState, RolloutReport, RolloutState, Status, Telemetry, Topics, V1,
};
use crate::protocol::{ChunkFrame, FrameBody, TransferReport};
use crate::release::{self, DesiredState, PinnedKeys, Refusal, Target};
use crate::transfer::{
    self, ChunkOutcome, Download, InstallOutcome, InstallRequest, TransferEvent, TransferSettings,
};

/// How long a stopping loop waits for the acks of batches in flight.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// Queued link events handled together, at most (their acks cost one outbox write).
const EVENT_BURST: usize = 256;
/// Telemetry snapshots sent and not yet PubAcked, at most.
const TELEMETRY_WINDOW: usize = 16;

/// What the loop needs to know; [`Settings::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker link; its client id is the device id.
    pub link: LinkConfig,
    pub audit_db: PathBuf,
    pub outbox_db: PathBuf,
    pub batch: BatchLimits,
    /// Audit batches sent and not yet acknowledged by the hub, at most.
    pub window: usize,
    /// Send everything above the cursor again when no ack came for this long.
    pub ack_timeout: Duration,
    /// How often the audit log is looked at for new records.
    pub poll_interval: Duration,
    /// How often the reported state is compared with what was last published.
    pub state_interval: Duration,
    pub telemetry_interval: Duration,
    pub telemetry_quota_bytes: u64,
    /// Reported in `status`.
    pub agent_version: String,
    /// `[device] groups`, in order (the precedence among group documents).
    pub groups: Vec<GroupId>,
    /// `[[sync.release_keys]]`: the keys desired states and manifests must be signed with.
    pub release_keys: PinnedKeys,
    /// Model downloads (the partial files' folder, the window, the chunk timeout).
    pub transfer: TransferSettings,
}

impl Settings {
    /// The defaults: batches of 500 records or 128 KiB, 8 in flight, resend after 15 s
    /// without an ack, a look at the log every second, state every 5 s, telemetry every
    /// minute under 8 MiB.
    /// Downloads go to `downloads/` beside `outbox_db`.
    pub fn new(link: LinkConfig, audit_db: PathBuf, outbox_db: PathBuf, version: &str) -> Self {
        let downloads = outbox_db
            .parent()
            .map_or_else(|| PathBuf::from("downloads"), |d| d.join("downloads"));
        Self {
            transfer: TransferSettings::new(downloads),
            link,
            audit_db,
            outbox_db,
            batch: BatchLimits {
                max_records: 500,
                max_bytes: 131_072,
            },
            window: 8,
            ack_timeout: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            state_interval: Duration::from_secs(5),
            telemetry_interval: Duration::from_secs(60),
            telemetry_quota_bytes: 8 << 20,
            agent_version: version.to_string(),
            groups: Vec::new(),
            release_keys: PinnedKeys::new(),
        }
    }
}

/// What the device reports about itself in `state/reported` (the loop adds the cursor).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    pub models: Vec<ReportedModel>,
    /// Alias → `name:version`.
    pub aliases: BTreeMap<String, String>,
    pub policy_version: Option<u64>,
}

/// The agent's side of the loop: called from the loop's own thread, so blocking is fine.
pub trait DeviceSource: Send + Sync + 'static {
    /// Installed models, aliases and the policy version now.
    fn reported(&self) -> Result<Reported, String>;
    /// A metrics snapshot for telemetry (the loop adds its own figures).
    fn telemetry(&self) -> serde_json::Map<String, serde_json::Value>;
    /// A message from the cloud was refused (malformed, an unknown schema version, for
    /// another device): the agent records it in the audit log. The loop calls this at most
    /// once per [`REFUSAL_AUDIT_EVERY`], with how many refusals it did not report since.
    fn refused(&self, topic: &str, reason: &str, unreported: u64);
    /// A backlog was drained (every record acknowledged after at least
    /// [`DRAINED_AFTER_BATCHES`] batches): a moment to give freed memory back.
    fn drained(&self) {}
    /// A desired state was accepted or refused: the agent records it in the audit log.
    fn desired(&self, decision: &DesiredDecision);
    /// The trusted clock (Unix seconds) that expiry is checked against.
    fn trusted_now(&self) -> i64 {
        outpost_policy::time::system_now()
    }
    /// A verified document was signed at `t`: the trusted clock's floor may rise to it.
    fn observe_time(&self, t: i64) {
        let _ = t;
    }
    /// The desired state the device follows asks to activate a model that is installed:
    /// run the health-gated activation (load within the memory budget, a short generation,
    /// then switch the alias and serve it), recording each step in the audit log. Blocks
    /// for as long as that takes. See [`crate::apply`].
    fn activate(&self, req: &ActivateRequest) -> Result<(), ActivateError> {
        let _ = req;
        Err(ActivateError::NotNow(
            "this agent cannot activate models".into(),
        ))
    }
    /// A rollout's outcome was decided without an activation (the agent stopped during
    /// one, the installed bytes differ from the manifest's): the agent records it.
    fn rollout_noted(&self, report: &RolloutReport) {
        let _ = report;
    }
    /// A verified download: import the file at `req.path` into the registry as
    /// `req.name:req.version`, MOVING it (rename on the same filesystem, no copy), checking
    /// its digest against `req.sha256`. On success the file is gone from `req.path` (or
    /// still there when the registry already had those bytes: the loop deletes it). Activation
    /// is not the installer's job.
    fn install(&self, req: &InstallRequest) -> Result<InstallOutcome, String>;
    /// A step of a download happened (see [`TransferEvent::audit_entry`]): the agent appends
    /// the record to its audit log.
    fn record(&self, entry: Entry);
}

/// What the loop decided about one desired-state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDecision {
    /// The topic it came on.
    pub topic: String,
    /// `Ok(())` when accepted, else why not.
    pub outcome: Result<(), Refusal>,
    /// From the document, when it could be read.
    pub rollout: Option<u64>,
    pub version: Option<u64>,
    pub target: Option<String>,
    pub model: Option<String>,
}

/// The audit action of a desired-state decision.
pub const ACTION_DESIRED: &str = "sync:desired";

impl DesiredDecision {
    /// Its audit record (actor `outpost-sync`, action [`ACTION_DESIRED`]): `allowed` when
    /// accepted, `denied` with the refusal as the reason and its label in `details`.
    pub fn audit_entry(&self) -> Entry {
        let (outcome, reason) = match &self.outcome {
            Ok(()) => (Outcome::Allowed, "desired state accepted".to_string()),
            Err(e) => (Outcome::Denied, e.to_string()),
        };
        let mut entry = Entry::new("outpost-sync", ACTION_DESIRED, outcome, &reason);
        entry.resource = Some(self.topic.clone());
        entry.details = serde_json::json!({
            "rollout": self.rollout, "version": self.version, "target": self.target,
            "model": self.model, "refusal": self.outcome.as_ref().err().map(Refusal::label),
        });
        entry
    }
}

/// Batches sent since the loop was last idle, above which reaching idle calls
/// [`DeviceSource::drained`].
pub const DRAINED_AFTER_BATCHES: u64 = 64;

/// How often, at most, a refused message is audited (a flood must not flood the log).
pub const REFUSAL_AUDIT_EVERY: Duration = Duration::from_secs(60);

/// What the loop has done, for `/metrics`; updated as it goes.
#[derive(Debug, Default)]
pub struct SyncStats {
    connected: AtomicBool,
    connects: AtomicU64,
    last_acked_seq: AtomicU64,
    audit_last_seq: AtomicU64,
    batches_sent: AtomicU64,
    records_sent: AtomicU64,
    bytes_sent: AtomicU64,
    resends: AtomicU64,
    telemetry_queued_bytes: AtomicU64,
    telemetry_dropped: AtomicU64,
}

/// A copy of [`SyncStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub connected: bool,
    /// Connections established after the first.
    pub reconnects: u64,
    pub last_acked_seq: u64,
    pub pending_records: u64,
    pub batches_sent: u64,
    pub records_sent: u64,
    /// Payload bytes handed to the broker (audit, state, status, telemetry).
    pub bytes_sent: u64,
    /// Times everything above the cursor was sent again after an ack timeout.
    pub resends: u64,
    pub telemetry_queued_bytes: u64,
    pub telemetry_dropped: u64,
}

impl SyncStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let acked = get(&self.last_acked_seq);
        StatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            reconnects: get(&self.connects).saturating_sub(1),
            last_acked_seq: acked,
            pending_records: get(&self.audit_last_seq).saturating_sub(acked),
            batches_sent: get(&self.batches_sent),
            records_sent: get(&self.records_sent),
            bytes_sent: get(&self.bytes_sent),
            resends: get(&self.resends),
            telemetry_queued_bytes: get(&self.telemetry_queued_bytes),
            telemetry_dropped: get(&self.telemetry_dropped),
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }

    fn set(a: &AtomicU64, n: u64) {
        a.store(n, Ordering::Relaxed);
    }
}

/// The loop: build it, then [`SyncLoop::run`] it as a task of the daemon.
pub struct SyncLoop {
    settings: Settings,
    source: Arc<dyn DeviceSource>,
    stats: Arc<SyncStats>,
}

impl std::fmt::Debug for SyncLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLoop")
            .field("broker", &self.settings.link.broker)
            .finish()
    }
}

impl SyncLoop {
    pub fn new(settings: Settings, source: Arc<dyn DeviceSource>, stats: Arc<SyncStats>) -> Self {
        Self {
            settings,
            source,
            stats,
        }
    }

    /// Runs until `shutdown`, then flushes and stops (see the module header). Never fails:
    /// a problem is logged, kept as `last_error` in `outbox.db`, and retried; only an outbox
    /// that cannot be opened at all (another process holds it) ends the loop early, and the
    /// daemon goes on offline.
    pub async fn run(self, shutdown: CancellationToken) {
        let runtime = tokio::runtime::Handle::current();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let span = tracing::info_span!("sync", device_id = %self.settings.link.client_id);
        let spawned = std::thread::Builder::new()
            .name("outpost-sync".into())
            .spawn(move || {
                runtime.block_on(self.run_here(shutdown).instrument(span));
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                if finished.await.is_err() {
                    error!("The sync thread stopped unexpectedly; sync is off until a restart.");
                }
            }
            Err(e) => error!(error = %e, "Sync is off: its thread could not be started."),
        }
    }

    async fn run_here(self, shutdown: CancellationToken) {
        let outbox = match Outbox::open(&self.settings.outbox_db) {
            Ok(o) => o,
            Err(e) => {
                error!(error = %e, "Sync is off: the outbox cannot be opened.");
                return;
            }
        };
        let topics = Topics::new(self.settings.link.client_id.clone());
        let status = |state| Status {
            v: V1,
            state,
            agent_version: self.settings.agent_version.clone(),
        };
        let (will, online) = match (
            protocol::encode(&status(LinkState::Offline), protocol::MAX_STATUS_BYTES),
            protocol::encode(&status(LinkState::Online), protocol::MAX_STATUS_BYTES),
        ) {
            (Ok(w), Ok(o)) => (w, o),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "Sync is off: the status message cannot be encoded.");
                return;
            }
        };
        let session = Session {
            will: conn::Will {
                topic: topics.status().to_string(),
                payload: will,
            },
            subscriptions: topics.subscriptions(&self.settings.groups),
        };
        let link_stop = CancellationToken::new();
        let (link, mut events, link_task) =
            match Link::spawn(&self.settings.link, session, link_stop.clone()) {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %e, "Sync is off: the link cannot be set up.");
                    return;
                }
            };
        info!(broker = %self.settings.link.broker, "Sync started.");
        let accepted = load_accepted(&outbox);
        let mut up = Uplink {
            accepted,
            refused_digests: std::collections::HashSet::new(),
            rollout: None,
            cursor: outbox.last_acked_seq().unwrap_or(0),
            outbox,
            link,
            topics,
            online_status: online,
            up: false,
            best_ack: None,
            timeouts: 0,
            ack_pending: None,
            checkpoint_acked: 0,
            busy_batches: 0,
            refusals: 0,
            refusal_audited: None,
            settings: self.settings,
            source: self.source,
            stats: self.stats,
            reader: None,
            checkpoints: Vec::new(),
            inflight: VecDeque::new(),
            last_progress: Instant::now(),
            telemetry: VecDeque::new(),
            published_state: None,
            last_error: None,
            stopping: false,
            transfer_rows: BTreeMap::new(),
            download: None,
            next_request_id: rand::random::<u64>() >> 1,
        };
        up.load_transfers();
        SyncStats::set(&up.stats.last_acked_seq, up.cursor);
        // A model staged before a restart (or an activation cut short) is taken up now.
        up.step_rollout();
        up.main_loop(&shutdown, &mut events).await;
        up.flush(&mut events).await;
        link_stop.cancel();
        up.drain_until_stopped(&mut events, link_task).await;
        up.stats.connected.store(false, Ordering::Relaxed);
        if let Err(e) = up.outbox.set_connected(false) {
            warn!(error = %e, "The outbox could not record the disconnect.");
        }
        info!(last_acked_seq = up.cursor, "Sync stopped.");
    }
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    last_seq: u64,
    /// The seq of the checkpoint it carries.
    checkpoint: Option<u64>,
}

/// A telemetry snapshot sent and not yet PubAcked.
#[derive(Debug)]
struct TelemetrySent {
    publish: PublishId,
    row: i64,
    acked: bool,
}

/// The loop's state, on its own thread.
struct Uplink {
    settings: Settings,
    source: Arc<dyn DeviceSource>,
    stats: Arc<SyncStats>,
    outbox: Outbox,
    link: LinkHandle,
    topics: Topics,
    /// The encoded online status.
    online_status: Vec<u8>,
    /// Connected, as this loop has seen it (set on `Connected`, cleared on `Disconnected`):
    /// nothing is sent between the link's reconnect and the rewind that follows it.
    up: bool,
    /// The highest ack received since the last rewind (the hub's head as it last said).
    best_ack: Option<u64>,
    /// Ack timeouts in a row without progress.
    timeouts: u32,
    /// The highest ack received and not yet applied (see [`Uplink::apply_ack`]).
    ack_pending: Option<u64>,
    /// The newest checkpoint that went up in a batch the hub acknowledged.
    checkpoint_acked: u64,
    /// Batches sent since the loop was last idle.
    busy_batches: u64,
    /// Refused messages since the last one audited, and when that was.
    refusals: u64,
    refusal_audited: Option<Instant>,
    reader: Option<AuditReader>,
    /// The log's checkpoints in seq order, as read so far.
    checkpoints: Vec<Checkpoint>,
    /// The outbox's cursor, mirrored.
    cursor: u64,
    inflight: VecDeque<InFlight>,
    /// When the cursor last moved, or the first batch of a window went out.
    last_progress: Instant,
    telemetry: VecDeque<TelemetrySent>,
    /// The state last published (retained), to publish only changes.
    published_state: Option<ReportedState>,
    /// The last error kept in the outbox, to write each only once.
    last_error: Option<String>,
    stopping: bool,
    /// The desired states accepted, by target (mirrors `outbox.db`).
    accepted: BTreeMap<Target, DesiredState>,
    /// Digests of documents refused by this process (a retained document comes again on
    /// every connect; it is recorded once).
    refused_digests: std::collections::HashSet<String>,
    /// The device's state in the rollout of the document it follows, as last stepped.
    rollout: Option<RolloutReport>,
    /// Recorded downloads by blob (mirrors `outbox.db`'s `transfers`).
    transfer_rows: BTreeMap<String, TransferRow>,
    /// The download in progress.
    download: Option<Download>,
    /// The last chunk request id used (random start: a previous process's answers are
    /// strays).
    next_request_id: u64,
}

/// The accepted desired states `outbox.db` holds (one that no longer reads is skipped with a
/// warning: its version still guards against replays in the table).
pub fn load_accepted(outbox: &Outbox) -> BTreeMap<Target, DesiredState> {
    let rows = match outbox.accepted_desired() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "Accepted desired states cannot be read.");
            return BTreeMap::new();
        }
    };
    let mut out = BTreeMap::new();
    for row in rows {
        match DesiredState::decode(row.doc_json.as_bytes()) {
            Ok(d) => {
                out.insert(d.target.clone(), d);
            }
            Err(e) => {
                warn!(desired_target = %row.target, error = %e, "A stored desired state does not read.")
            }
        }
    }
    out
}

impl Uplink {
    async fn main_loop(
        &mut self,
        shutdown: &CancellationToken,
        events: &mut mpsc::Receiver<LinkEvent>,
    ) {
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = tokio::time::interval(self.settings.state_interval);
        state.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let every = self.settings.telemetry_interval;
        let mut telemetry = tokio::time::interval_at(Instant::now() + every, every);
        telemetry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                event = events.recv() => match event {
                    Some(e) => self.on_events(e, events),
                    None => return,
                },
                _ = poll.tick() => self.on_poll(),
                _ = state.tick() => {
                    self.tend_download();
                    self.step_rollout();
                    self.publish_state(false);
                }
                _ = telemetry.tick() => {
                    self.snapshot_telemetry();
                    self.send_telemetry();
                }
            }
        }
    }

    /// Waits, up to [`FLUSH_GRACE`], for the acks of what is in flight.
    async fn flush(&mut self, events: &mut mpsc::Receiver<LinkEvent>) {
        self.stopping = true;
        if self.inflight.is_empty() || !self.up {
            return;
        }
        info!(
            batches = self.inflight.len(),
            "Stopping: waiting for the hub's acks of the batches in flight."
        );
        let deadline = Instant::now() + FLUSH_GRACE;
        while !self.inflight.is_empty() && self.up {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(batches = self.inflight.len(), last_acked_seq = self.cursor,
                        "Stopping without every ack; the rest is sent again at the next start.");
                    return;
                }
                event = events.recv() => match event {
                    Some(e) => self.on_events(e, events),
                    None => return,
                },
            }
        }
    }

    /// Keeps reading events (acks, PubAcks) while the link stops, so it never waits on a
    /// full event queue, until its task ends.
    async fn drain_until_stopped(
        &mut self,
        events: &mut mpsc::Receiver<LinkEvent>,
        mut link_task: JoinHandle<()>,
    ) {
        loop {
            tokio::select! {
                _ = &mut link_task => return,
                event = events.recv() => match event {
                    Some(e) => self.on_events(e, events),
                    None => {
                        let _ = (&mut link_task).await;
                        return;
                    }
                },
            }
        }
    }

    /// Handles `first` and the events already queued behind it (a bounded number), then the
    /// highest ack among them.
    fn on_events(&mut self, first: LinkEvent, events: &mut mpsc::Receiver<LinkEvent>) {
        self.on_event(first);
        for _ in 0..EVENT_BURST {
            match events.try_recv() {
                Ok(e) => self.on_event(e),
                Err(_) => break,
            }
        }
        self.apply_ack();
        self.flush_download();
    }

    fn on_event(&mut self, event: LinkEvent) {
        if matches!(event, LinkEvent::Connected | LinkEvent::Disconnected { .. }) {
            // Acks received before the link changed still count.
            self.apply_ack();
        }
        match event {
            LinkEvent::Connected => self.on_connected(),
            LinkEvent::ConnectFailed { reason, .. } => self.note_error(&reason),
            LinkEvent::Disconnected { reason, .. } => {
                self.up = false;
                self.stats.connected.store(false, Ordering::Relaxed);
                self.rewind(None);
                self.telemetry.clear();
                if let Some(d) = self.download.as_mut() {
                    d.forget_inflight();
                }
                if let Err(e) = self.outbox.set_connected(false) {
                    warn!(error = %e, "The outbox could not record the disconnect.");
                }
                self.note_error(&reason);
            }
            LinkEvent::Message { topic, payload } => {
                if topic == self.topics.audit_ack() {
                    self.on_ack(&payload);
                } else if topic == self.topics.blobs() {
                    self.on_chunk(&payload);
                } else if let Some(target) = Target::of_topic(&topic) {
                    self.on_desired(&topic, &target, &payload);
                } else {
                    debug!(topic = %topic, bytes = payload.len(), "Message not handled here.");
                }
            }
            LinkEvent::PubAck(id) => self.on_puback(id),
            LinkEvent::SubscribeRefused { filters } => {
                let what = if filters.iter().any(|f| f == self.topics.audit_ack()) {
                    "acks cannot arrive"
                } else {
                    "desired states cannot arrive there (is each of [device] groups enrolled?)"
                };
                self.note_error(&format!(
                    "the broker refused the subscriptions {} (its ACL?): {what}",
                    filters.join(", ")
                ));
            }
        }
    }

    /// A desired-state document arrived (see the module header).
    fn on_desired(&mut self, topic: &str, topic_target: &Target, payload: &[u8]) {
        if payload.is_empty() {
            debug!(
                topic,
                "No desired state retained here (cleared by the hub)."
            );
            return;
        }
        let mut decision = DesiredDecision {
            topic: topic.to_string(),
            outcome: Ok(()),
            rollout: None,
            version: None,
            target: None,
            model: None,
        };
        let doc = match DesiredState::decode(payload) {
            Ok(d) => d,
            Err(e) => {
                decision.outcome = Err(Refusal::Malformed(e.to_string()));
                return self.decided(&decision, None);
            }
        };
        let digest = doc.digest();
        if self
            .accepted
            .get(&doc.target)
            .is_some_and(|a| a.digest() == digest)
            || self.refused_digests.contains(&digest)
        {
            return;
        }
        decision.rollout = Some(doc.rollout);
        decision.version = Some(doc.version);
        decision.target = Some(doc.target.to_string());
        decision.model = Some(doc.model.clone());
        let last = self.accepted.get(&doc.target).map(|a| a.version);
        let checked = release::verify_desired(
            &doc,
            &self.settings.release_keys,
            self.topics.device_id(),
            &self.settings.groups,
            last,
            self.source.trusted_now(),
        )
        .and_then(|()| {
            if doc.target == *topic_target {
                Ok(())
            } else {
                Err(Refusal::WrongTopic {
                    topic: topic_target.to_string(),
                    target: doc.target.to_string(),
                })
            }
        });
        if let Err(e) = checked {
            decision.outcome = Err(e);
            return self.decided(&decision, Some(digest));
        }
        let row = AcceptedDesired {
            target: doc.target.to_string(),
            version: doc.version,
            rollout: doc.rollout,
            digest,
            doc_json: String::from_utf8_lossy(payload).into_owned(),
        };
        if let Err(e) = self.outbox.accept_desired(&row) {
            self.note_error(&format!("recording a desired state: {e}"));
            return;
        }
        self.source.observe_time(doc.issued_at);
        self.accepted.insert(doc.target.clone(), doc);
        self.decided(&decision, None);
        self.tend_download();
        self.publish_state(false);
        if self.step_rollout() {
            self.publish_state(false);
        }
    }

    /// Takes the rollout of the document the device follows one step further
    /// ([`apply::step`]); true when what it reports changed.
    fn step_rollout(&mut self) -> bool {
        let followed = release::pick_desired(
            &self.accepted,
            self.topics.device_id(),
            &self.settings.groups,
        )
        .cloned();
        let next = match followed {
            None => None,
            Some(doc) => {
                let reported = match self.source.reported() {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "The reported state cannot be read.");
                        return false;
                    }
                };
                let download = self.rollout_download(&doc);
                match apply::step(
                    &mut self.outbox,
                    self.source.as_ref(),
                    &doc,
                    &reported,
                    download.as_ref(),
                ) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        self.note_error(&format!("recording a rollout's outcome: {e}"));
                        return false;
                    }
                }
            }
        };
        if next == self.rollout {
            return false;
        }
        if let Some(r) = &next {
            info!(rollout = r.rollout, model = %r.model, state = r.state.as_str(),
                reason = r.reason.as_deref(), "Rollout state changed.");
        }
        self.rollout = next;
        true
    }

    /// The download of `doc`'s blob as the rollout reports it: `downloading` with the
    /// percent of chunks verified, or `failed`, with the document and the transfer's reason
    /// (or its chunk count); none when nothing of it was recorded for this rollout.
    fn rollout_download(&self, doc: &DesiredState) -> Option<apply::Download> {
        let t = self
            .transfer_report()
            .filter(|t| t.rollout == doc.rollout && t.sha256 == doc.manifest.sha256)?;
        let state = if t.state == "failed" {
            RolloutState::Failed
        } else {
            RolloutState::Downloading
        };
        let progress = (t.chunks_done.saturating_mul(100))
            .checked_div(t.chunks_total)
            .unwrap_or(100)
            .min(100);
        let why = t
            .reason
            .unwrap_or_else(|| format!("{} of {} chunks verified", t.chunks_done, t.chunks_total));
        Some(apply::Download {
            state,
            progress: u8::try_from(progress).unwrap_or(100),
            reason: Some(format!(
                "desired state {} version {} accepted; {why}",
                doc.target, doc.version
            )),
        })
    }

    /// Logs and records a decision; a refused document's digest is remembered.
    fn decided(&mut self, decision: &DesiredDecision, refused_digest: Option<String>) {
        match &decision.outcome {
            Ok(()) => info!(
                topic = %decision.topic,
                rollout = decision.rollout,
                version = decision.version,
                model = decision.model.as_deref(),
                "Desired state accepted."
            ),
            Err(e) => warn!(topic = %decision.topic, reason = e.label(), error = %e,
                "Desired state refused."),
        }
        if let Some(d) = refused_digest {
            // Bounded: a hub sending endless new forgeries costs memory no longer.
            if self.refused_digests.len() >= 1024 {
                self.refused_digests.clear();
            }
            self.refused_digests.insert(d);
        }
        self.source.desired(decision);
    }

    fn on_connected(&mut self) {
        SyncStats::add(&self.stats.connects, 1);
        self.stats.connected.store(true, Ordering::Relaxed);
        if let Err(e) = self.outbox.set_connected(true) {
            warn!(error = %e, "The outbox could not record the connection.");
        }
        // Whatever was in flight before is forgotten by the link: start from the cursor.
        self.up = true;
        self.rewind(None);
        self.telemetry.clear();
        let status = self.topics.status().to_string();
        self.publish(&status, self.online_status.clone(), true);
        self.tend_download();
        self.publish_state(true);
        self.fill();
        self.send_telemetry();
        self.request_chunks();
    }

    fn on_ack(&mut self, payload: &[u8]) {
        let ack = match protocol::decode::<AuditAck>(payload, protocol::MAX_ACK_BYTES) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "An audit ack was refused.");
                self.refused(&e.to_string());
                return;
            }
        };
        if &ack.device_id != self.topics.device_id() {
            warn!(names = %ack.device_id, "An audit ack for another device was refused.");
            self.refused(&format!("an audit ack names device {}", ack.device_id));
            return;
        }
        self.ack_pending = Some(
            self.ack_pending
                .map_or(ack.acked_seq, |p| p.max(ack.acked_seq)),
        );
    }

    /// Applies the highest ack received since the last call: one outbox write (an fsync)
    /// for all the acks that were waiting, not one each.
    fn apply_ack(&mut self) {
        let Some(a) = self.ack_pending.take() else {
            return;
        };
        let applied = match self.outbox.ack(a) {
            // The hub holds more than this process sent since its last rewind, so it holds
            // everything sent: the cursor moves to that, never beyond (a hub cannot make the
            // device skip records it was never sent).
            Err(OutboxError::AckBeyondSent { sent, .. }) => {
                debug!(
                    acked = a,
                    sent, "The hub holds more than was sent since the rewind."
                );
                self.outbox.ack(sent)
            }
            other => other,
        };
        match applied {
            Ok(Acked::Advanced { to, .. }) => {
                self.cursor = to;
                SyncStats::set(&self.stats.last_acked_seq, to);
                debug!(acked_seq = to, "Audit records acknowledged.");
            }
            Ok(Acked::Stale { .. }) => {}
            Err(e) => {
                self.note_error(&format!("recording an audit ack: {e}"));
                return;
            }
        }
        // The hub has every record up to `a`: those batches are done, even below the cursor
        // (after a rewind to a hub that lost records).
        while let Some(done) = self.inflight.front().filter(|b| b.last_seq <= a) {
            if let Some(cp) = done.checkpoint {
                self.checkpoint_acked = self.checkpoint_acked.max(cp);
            }
            self.inflight.pop_front();
        }
        if self.best_ack.is_none_or(|b| a > b) {
            self.best_ack = Some(a);
            self.last_progress = Instant::now();
            self.timeouts = 0;
        }
        if !self.stopping {
            self.fill();
        }
    }

    fn on_puback(&mut self, id: PublishId) {
        if let Some(t) = self.telemetry.iter_mut().find(|t| t.publish == id) {
            t.acked = true;
        }
        let mut through = None;
        while self.telemetry.front().is_some_and(|t| t.acked) {
            through = self.telemetry.pop_front().map(|t| t.row);
        }
        if let Some(row) = through
            && let Err(e) = self.outbox.remove_telemetry(row)
        {
            warn!(error = %e, "Sent telemetry could not be removed from the outbox.");
        }
    }

    fn on_poll(&mut self) {
        let last = self.audit_last_seq();
        if let Some(last) = last {
            SyncStats::set(&self.stats.audit_last_seq, last);
            if last < self.cursor {
                self.note_error(&format!(
                    "the audit log ends at seq {last}, below seq {} that the hub already holds: \
                     the log was truncated or restored from an older copy",
                    self.cursor
                ));
            }
        }
        if let Some(d) = self.download.as_mut() {
            let expired = d.expire(self.settings.transfer.chunk_timeout, Instant::now());
            if expired > 0 {
                info!(
                    requests = expired,
                    "Chunk requests unanswered: asking again."
                );
                self.request_chunks();
            }
        }
        if !self.inflight.is_empty() && self.last_progress.elapsed() >= self.settings.ack_timeout {
            self.on_ack_timeout();
        }
        self.fill();
        self.send_checkpoint();
        self.send_telemetry();
        if self.up && self.inflight.is_empty() && self.busy_batches > 0 {
            if self.busy_batches >= DRAINED_AFTER_BATCHES {
                info!(
                    batches = self.busy_batches,
                    last_acked_seq = self.cursor,
                    "Audit backlog drained."
                );
                // Closing the reader gives back its page cache (megabytes after a long
                // backlog); it opens again for the next batch.
                self.reader = None;
                self.source.drained();
            }
            self.busy_batches = 0;
        }
        if let Ok(s) = self.outbox.status() {
            SyncStats::set(&self.stats.telemetry_queued_bytes, s.telemetry_queued_bytes);
            SyncStats::set(&self.stats.telemetry_dropped, s.telemetry_dropped);
        }
    }

    /// Reports a refused ack to the agent's audit log, at most once per
    /// [`REFUSAL_AUDIT_EVERY`].
    fn refused(&mut self, reason: &str) {
        self.refusals += 1;
        if self
            .refusal_audited
            .is_some_and(|t| t.elapsed() < REFUSAL_AUDIT_EVERY)
        {
            return;
        }
        self.refusal_audited = Some(Instant::now());
        let topic = self.topics.audit_ack().to_string();
        self.source.refused(&topic, reason, self.refusals - 1);
        self.refusals = 0;
    }

    /// No ack moved for `ack_timeout` with batches out: send again, from the cursor, or from
    /// the hub's head when the hub said it holds less than it acknowledged before.
    fn on_ack_timeout(&mut self) {
        self.timeouts += 1;
        SyncStats::add(&self.stats.resends, 1);
        let cursor = self.cursor;
        let behind = self.best_ack.filter(|&h| h < cursor);
        if let Some(h) = behind {
            self.note_error(&format!(
                "the hub holds this device's records only up to seq {h}, below seq {cursor} it \
                 acknowledged before (restored from an older copy?): sending from seq {} again",
                h + 1
            ));
        } else if self.timeouts >= 3 {
            self.note_error(&format!(
                "no ack from the hub for the records after seq {cursor} ({} tries): the hub may \
                 be refusing them; see its alerts (outpost-hub audit verify --device {})",
                self.timeouts,
                self.topics.device_id()
            ));
        }
        info!(
            from_seq = behind.unwrap_or(cursor) + 1,
            waited_secs = self.settings.ack_timeout.as_secs(),
            "No audit ack came: sending again."
        );
        self.rewind(behind);
    }

    /// Starts sending again after `to` (the cursor when `None`): nothing is in flight.
    fn rewind(&mut self, to: Option<u64>) {
        match self.outbox.rewind_to(to.unwrap_or(u64::MAX)) {
            Ok(_) => {}
            Err(e) => warn!(error = %e, "The outbox could not be read."),
        }
        self.inflight.clear();
        // Read again from the new floor: the newest checkpoint at or below it may have
        // been pruned from the list.
        self.checkpoints.clear();
        self.best_ack = None;
        self.last_progress = Instant::now();
    }

    /// The audit log, opened read-only once it exists.
    fn reader(&mut self) -> Option<&AuditReader> {
        if self.reader.is_none() && self.settings.audit_db.exists() {
            match AuditReader::open(&self.settings.audit_db) {
                Ok(r) => self.reader = Some(r),
                Err(e) => warn!(error = %e, "The audit log cannot be read."),
            }
        }
        self.reader.as_ref()
    }

    /// Reads the checkpoints signed since the last look (one indexed query; the list is
    /// short: one per `checkpoint_every` records).
    fn refresh_checkpoints(&mut self) {
        // Batches start after "sent": older checkpoints than the newest at or below it are
        // no longer needed (the list stays short however long the log; a fresh start over
        // a long log does not read them all).
        let floor = self.outbox.sent_seq();
        let last = self.checkpoints.last().map(|c| c.seq);
        let Some(reader) = self.reader() else { return };
        let read = match last {
            Some(after) => reader.checkpoints_after(after),
            None => reader.checkpoints_from(floor),
        };
        match read {
            Ok(new) => self.checkpoints.extend(new),
            Err(e) => warn!(error = %e, "The audit log's checkpoints cannot be read."),
        }
        let keep = self
            .checkpoints
            .partition_point(|c| c.seq <= floor)
            .saturating_sub(1);
        self.checkpoints.drain(..keep);
        if self.checkpoints.capacity() > 64
            && self.checkpoints.capacity() > 4 * self.checkpoints.len()
        {
            self.checkpoints.shrink_to_fit();
        }
    }

    fn audit_last_seq(&mut self) -> Option<u64> {
        let newest = Query {
            limit: Some(1),
            newest: true,
            ..Query::default()
        };
        let reader = self.reader()?;
        match reader.query(&newest) {
            Ok(r) => Some(r.last().map_or(0, |r| r.seq)),
            Err(e) => {
                warn!(error = %e, "The audit log cannot be read.");
                self.reader = None;
                self.checkpoints.clear();
                None
            }
        }
    }

    /// Sends batches until the window is full or the log is exhausted.
    fn fill(&mut self) {
        if self.stopping {
            return;
        }
        while self.inflight.len() < self.settings.window && self.up {
            let from = self.outbox.sent_seq();
            match self.next_batch(from) {
                Ok(Some(batch)) => {
                    let last = batch.last_seq;
                    if !self.send_batch(batch) {
                        return;
                    }
                    self.outbox.note_sent(last);
                }
                Ok(None) => return,
                Err(e) => {
                    self.note_error(&e);
                    return;
                }
            }
        }
    }

    /// Once every record is acknowledged, a checkpoint signed since the last one the hub
    /// took goes up on its own, with its record (a batch the hub already holds): otherwise
    /// the tail of a quiet log would stay unsigned at the hub until more records come.
    fn send_checkpoint(&mut self) {
        if !self.up
            || self.stopping
            || !self.inflight.is_empty()
            || self.outbox.sent_seq() != self.cursor
        {
            return;
        }
        self.refresh_checkpoints();
        let Some(cp) = newest_at_or_below(&self.checkpoints, self.cursor).map(|c| c.seq) else {
            return;
        };
        if cp <= self.checkpoint_acked {
            return;
        }
        let batch = self.read_batch(cp - 1, 1);
        match batch {
            Ok(Some(b)) if b.last_seq == cp => {
                self.send_batch(b);
            }
            Ok(_) => {}
            Err(e) => self.note_error(&e),
        }
    }

    /// Hands a batch to the link; false when it was not taken (not connected, queue full).
    fn send_batch(&mut self, batch: EncodedBatch) -> bool {
        let (first, last, count, len) = (
            batch.first_seq,
            batch.last_seq,
            batch.records,
            batch.payload.len(),
        );
        let checkpoint = newest_at_or_below(&self.checkpoints, last).map(|c| c.seq);
        let topic = self.topics.audit().to_string();
        match self.link.try_publish(&topic, batch.payload, false) {
            Ok(_) => {
                if self.inflight.is_empty() {
                    self.last_progress = Instant::now();
                }
                self.inflight.push_back(InFlight {
                    last_seq: last,
                    checkpoint,
                });
                SyncStats::add(&self.stats.batches_sent, 1);
                self.busy_batches += 1;
                SyncStats::add(&self.stats.records_sent, count as u64);
                SyncStats::add(&self.stats.bytes_sent, len as u64);
                debug!(
                    first_seq = first,
                    last_seq = last,
                    records = count,
                    bytes = len,
                    checkpoint,
                    "Audit batch sent."
                );
                true
            }
            Err(ConnError::NotConnected | ConnError::Closed | ConnError::QueueFull) => false,
            Err(e) => {
                self.note_error(&format!("sending audit records {first}..={last}: {e}"));
                false
            }
        }
    }

    /// The batch of records after `from`, with the newest checkpoint at or below its end.
    fn next_batch(&mut self, from: u64) -> Result<Option<EncodedBatch>, String> {
        self.refresh_checkpoints();
        self.read_batch(from, self.settings.batch.max_records)
    }

    /// Up to `count` records after `from`, packed as they are read (the log's JSON text as
    /// stored, never parsed here), with the newest checkpoint at or below the batch's end.
    fn read_batch(&self, from: u64, count: usize) -> Result<Option<EncodedBatch>, String> {
        let Some(reader) = self.reader.as_ref() else {
            return Ok(None);
        };
        let upto = from.saturating_add(count as u64);
        let mut b = start_batch(
            self.topics.device_id(),
            &self.checkpoints,
            upto,
            self.settings.batch,
        )?;
        let mut failed = None;
        reader
            .for_each_json_after(from, count, |seq, json| {
                match b.push_json(seq, json.as_bytes()) {
                    Ok(Pushed::Added) => true,
                    Ok(Pushed::Full) => false,
                    Err(e) => {
                        failed = Some(e.to_string());
                        false
                    }
                }
            })
            .map_err(|e| format!("reading the audit log: {e}"))?;
        if let Some(e) = failed {
            return Err(e);
        }
        seal_batch(b, &self.checkpoints)
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Option<PublishId> {
        let len = payload.len() as u64;
        match self.link.try_publish(topic, payload, retain) {
            Ok(id) => {
                SyncStats::add(&self.stats.bytes_sent, len);
                Some(id)
            }
            Err(e) => {
                debug!(topic, error = %e, "Not published now.");
                None
            }
        }
    }

    /// Publishes `state/reported` if it changed since the last publish (or `force`).
    fn publish_state(&mut self, force: bool) {
        if !self.up || self.stopping {
            return;
        }
        let reported = match self.source.reported() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "The reported state cannot be read.");
                return;
            }
        };
        let state = ReportedState {
            v: V1,
            models: reported.models,
            aliases: reported.aliases,
            policy_version: reported.policy_version,
            last_acked_seq: self.cursor,
            desired: release::following(
                &self.accepted,
                self.topics.device_id(),
                &self.settings.groups,
            ),
            rollout: self.rollout.clone(),
            transfer: self.transfer_report(),
        };
        if !force && self.published_state.as_ref() == Some(&state) {
            return;
        }
        let max = protocol::MAX_STATE_BYTES;
        match protocol::encode(&state, max) {
            Ok(payload) => {
                let topic = self.topics.state_reported().to_string();
                if self.publish(&topic, payload, true).is_some() {
                    self.published_state = Some(state);
                }
            }
            Err(e) => self.note_error(&format!("reporting the state: {e}")),
        }
    }

    /// Queues a telemetry snapshot in the outbox, under the quota.
    fn snapshot_telemetry(&mut self) {
        let mut metrics = self.source.telemetry();
        let snap = self.stats.snapshot();
        let audit_last = self.stats.audit_last_seq.load(Ordering::Relaxed);
        for (k, v) in [
            ("audit_last_seq", audit_last),
            ("last_acked_seq", snap.last_acked_seq),
            ("pending_records", snap.pending_records),
            ("reconnects", snap.reconnects),
            ("telemetry_dropped", snap.telemetry_dropped),
        ] {
            metrics.insert(k.into(), v.into());
        }
        let msg = Telemetry {
            v: V1,
            ts: now_rfc3339(),
            metrics,
        };
        let payload = match protocol::encode(&msg, protocol::MAX_TELEMETRY_BYTES) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "A telemetry snapshot was not queued.");
                return;
            }
        };
        match self
            .outbox
            .push_telemetry(&payload, self.settings.telemetry_quota_bytes)
        {
            Ok(p) if !p.queued || p.evicted > 0 => {
                debug!(
                    queued = p.queued,
                    evicted = p.evicted,
                    "Telemetry over its quota: the oldest snapshots were dropped."
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "A telemetry snapshot was not queued."),
        }
    }

    /// Sends queued snapshots not yet in flight.
    fn send_telemetry(&mut self) {
        if !self.up || self.telemetry.len() >= TELEMETRY_WINDOW {
            return;
        }
        let after = self.telemetry.back().map_or(i64::MIN, |t| t.row);
        let queued = match self.outbox.next_telemetry(TELEMETRY_WINDOW * 2) {
            Ok(q) => q,
            Err(e) => {
                warn!(error = %e, "Queued telemetry cannot be read.");
                return;
            }
        };
        let topic = self.topics.telemetry().to_string();
        for t in queued.into_iter().filter(|t| t.id > after) {
            if self.telemetry.len() >= TELEMETRY_WINDOW {
                break;
            }
            match self.publish(&topic, t.payload, false) {
                Some(publish) => self.telemetry.push_back(TelemetrySent {
                    publish,
                    row: t.id,
                    acked: false,
                }),
                None => break,
            }
        }
    }

    /// Logs a problem and keeps it as `last_error` (each distinct message once).
    fn note_error(&mut self, message: &str) {
        if self.last_error.as_deref() == Some(message) {
            return;
        }
        warn!(error = %message, "Sync problem.");
        if let Err(e) = self.outbox.set_error(message) {
            warn!(error = %e, "The outbox could not record the error.");
        }
        self.last_error = Some(message.to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// Model downloads (rules in `crate::transfer`)

impl Uplink {
    /// Reads the recorded downloads, resumes none yet (that waits for the followed document),
    /// and deletes partial files no row keeps.
    fn load_transfers(&mut self) {
        match self.outbox.transfers() {
            Ok(rows) => {
                self.transfer_rows = rows.into_iter().map(|r| (r.sha256.clone(), r)).collect();
            }
            Err(e) => warn!(error = %e, "Recorded downloads cannot be read."),
        }
        let rows = &self.transfer_rows;
        let keep = |sha: &str| {
            rows.get(sha)
                .is_some_and(|r| r.state == "downloading" || r.state == "staged")
        };
        match transfer::remove_stale_partials(&self.settings.transfer.dir, &keep) {
            Ok(0) => {}
            Ok(n) => info!(
                files = n,
                "Partial downloads no transfer records were removed."
            ),
            Err(e) => warn!(error = %e, "The downloads folder cannot be cleaned."),
        }
    }

    /// What `state/reported` says of downloads: the one in progress, else the recorded one
    /// of the followed document's blob.
    fn transfer_report(&self) -> Option<TransferReport> {
        if let Some(d) = &self.download {
            return Some(d.report());
        }
        let doc = release::pick_desired(
            &self.accepted,
            self.topics.device_id(),
            &self.settings.groups,
        )?;
        self.transfer_rows
            .get(&doc.manifest.sha256)
            .filter(|r| r.rollout == doc.rollout)
            .map(transfer::report_of)
    }

    fn record_transfer(&self, row: &TransferRow, event: &TransferEvent) {
        let entry = event.audit_entry(&row.model, &row.sha256, row.rollout);
        match event {
            TransferEvent::ChunkRejected { .. }
            | TransferEvent::WholeHashMismatch { .. }
            | TransferEvent::Failed { .. }
            | TransferEvent::RefusedDiskSpace { .. } => {
                warn!(model = %row.model, sha256 = %row.sha256, event = ?event, "Download problem.")
            }
            _ => info!(model = %row.model, sha256 = %row.sha256, event = ?event, "Download step."),
        }
        self.source.record(entry);
    }

    /// Starts, resumes or leaves alone the download the followed desired state needs.
    fn tend_download(&mut self) {
        if self.stopping {
            return;
        }
        let Some(doc) = release::pick_desired(
            &self.accepted,
            self.topics.device_id(),
            &self.settings.groups,
        )
        .cloned() else {
            return;
        };
        let sha = doc.manifest.sha256.clone();
        if let Some(d) = self.download.as_mut()
            && d.sha256() == sha
        {
            if d.doc.rollout != doc.rollout {
                // Another rollout of the same blob: the download goes on for it.
                d.doc = doc.clone();
                d.row.rollout = doc.rollout;
                let row = d.row.clone();
                if let Err(e) = self.outbox.set_transfer_rollout(&sha, doc.rollout) {
                    self.note_error(&format!("recording a download's rollout: {e}"));
                }
                self.transfer_rows.insert(sha, row);
            }
            self.request_chunks();
            return;
        }
        if let Some(old) = self.download.take() {
            // Another document is followed now: that download is no longer wanted.
            let reason = format!("superseded by rollout {}", doc.rollout);
            self.fail_download(old.row, &reason, Some(&old.path));
        }
        let installed = match self.source.reported() {
            Ok(r) => r.models.iter().any(|m| {
                m.sha256 == sha && m.name == doc.manifest.name && m.version == doc.manifest.version
            }),
            Err(e) => {
                warn!(error = %e, "The registry cannot be read; the download waits.");
                return;
            }
        };
        let row = self.transfer_rows.get(&sha).cloned();
        let dir = self.settings.transfer.dir.clone();
        let partial = transfer::partial_path(&dir, &sha);
        if installed {
            // Installed already (a crash after the install, or another rollout of the same
            // model): the record says so for the rollout followed now.
            if let Some(mut r) = row.filter(|r| r.state != "staged" || r.rollout != doc.rollout) {
                if r.rollout != doc.rollout {
                    if let Err(e) = self.outbox.set_transfer_rollout(&sha, doc.rollout) {
                        self.note_error(&format!("recording a download's rollout: {e}"));
                    }
                    r.rollout = doc.rollout;
                }
                self.set_row_state(r, "staged", None);
                let _ = std::fs::remove_file(&partial);
            }
            return;
        }
        match row {
            Some(r) if r.rollout == doc.rollout && r.state == "failed" => {}
            Some(r) if r.rollout == doc.rollout && r.state == "staged" => {
                // Verified, and the install did not happen (a crash in between).
                if partial.is_file() {
                    self.install(r, &doc, partial);
                }
            }
            Some(r)
                if r.state == "downloading"
                    && r.size == doc.manifest.size
                    && r.chunk_size == doc.manifest.chunk_size =>
            {
                let done = r.done();
                match Download::resume(r.clone(), doc.clone(), &dir) {
                    Ok(d) => {
                        self.record_transfer(&r, &TransferEvent::Resumed { chunks_done: done });
                        self.download = Some(d);
                        self.flush_download();
                    }
                    Err(e) => {
                        warn!(error = %e, "The partial download cannot be resumed; starting over.");
                        let attempts = r.attempts + 1;
                        self.start_download(doc, attempts);
                    }
                }
            }
            _ => self.start_download(doc, 1),
        }
    }

    /// Checks the disk, records the row, creates the partial file, starts requesting.
    fn start_download(&mut self, doc: DesiredState, attempts: u64) {
        let m = &doc.manifest;
        let dir = self.settings.transfer.dir.clone();
        let chunks = m.chunk_sha256.len() as u64;
        let mut row = TransferRow {
            sha256: m.sha256.clone(),
            rollout: doc.rollout,
            model: doc.model.clone(),
            size: m.size,
            chunk_size: m.chunk_size,
            chunks,
            bitmap: TransferRow::empty_bitmap(chunks),
            state: "downloading".into(),
            reason: None,
            attempts,
            chunks_rejected: 0,
        };
        let need = m.size.saturating_add(transfer::SPACE_MARGIN);
        let free = std::fs::create_dir_all(&dir).and_then(|()| transfer::free_space(&dir));
        let refusal = match free {
            Ok(free) if free < need => {
                self.record_transfer(&row, &TransferEvent::RefusedDiskSpace { need, free });
                Some(format!(
                    "not enough disk space: {need} bytes needed, {free} free"
                ))
            }
            Ok(_) => None,
            Err(e) => Some(format!("the downloads folder {}: {e}", dir.display())),
        };
        if let Some(reason) = refusal {
            row.state = "failed".into();
            row.reason = Some(reason.clone());
            if let Err(e) = self.outbox.start_transfer(&row) {
                self.note_error(&format!("recording a download: {e}"));
            }
            self.record_transfer(&row, &TransferEvent::Failed { reason });
            self.transfer_rows.insert(row.sha256.clone(), row);
            self.publish_state(false);
            return;
        }
        if let Err(e) = self.outbox.start_transfer(&row) {
            self.note_error(&format!("recording a download: {e}"));
            return;
        }
        self.transfer_rows.insert(row.sha256.clone(), row.clone());
        match Download::create(row.clone(), doc, &dir) {
            Ok(d) => {
                self.record_transfer(&row, &TransferEvent::Started);
                self.download = Some(d);
                self.request_chunks();
                self.publish_state(false);
            }
            Err(e) => {
                let reason = format!("creating the partial file: {e}");
                let path = transfer::partial_path(&dir, &row.sha256);
                self.fail_download(row, &reason, Some(&path));
            }
        }
    }

    /// Fills the window of chunk requests.
    fn request_chunks(&mut self) {
        if !self.up || self.stopping {
            return;
        }
        let Some(d) = self.download.as_mut() else {
            return;
        };
        let requests = d.next_requests(
            self.settings.transfer.window,
            &mut self.next_request_id,
            Instant::now(),
        );
        let topic = self.topics.blobs_get();
        for r in requests {
            let sent = protocol::encode(&r, MAX_CHUNK_REQUEST_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    let len = p.len() as u64;
                    self.link
                        .try_publish(topic, p, false)
                        .map(|_| len)
                        .map_err(|e| e.to_string())
                });
            match sent {
                Ok(len) => SyncStats::add(&self.stats.bytes_sent, len),
                Err(e) => {
                    debug!(error = %e, "Chunk request not sent now.");
                    d.unsent(r.id);
                }
            }
        }
    }

    /// A chunk frame arrived.
    fn on_chunk(&mut self, payload: &[u8]) {
        let frame = match ChunkFrame::parse(payload) {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "A chunk frame was refused.");
                return;
            }
        };
        let Some(d) = self.download.as_mut() else {
            debug!(request_id = frame.request_id, "A chunk for no download.");
            return;
        };
        let outcome = match frame.body {
            FrameBody::Refused(reason) => {
                if !d.owns(frame.request_id) {
                    return;
                }
                let reason = format!("the hub refused a chunk request: {reason}");
                if let Some(d) = self.download.take() {
                    self.fail_download(d.row, &reason, Some(&d.path));
                }
                return;
            }
            FrameBody::Chunk(bytes) => {
                d.on_chunk(frame.request_id, &frame.sha256, frame.offset, bytes)
            }
        };
        match outcome {
            ChunkOutcome::Written => {}
            ChunkOutcome::Stray => debug!(request_id = frame.request_id, "A stray chunk."),
            ChunkOutcome::Rejected { chunk, reason } => {
                let row = d.row.clone();
                self.record_transfer(&row, &TransferEvent::ChunkRejected { chunk, reason });
            }
            ChunkOutcome::GaveUp { chunk, reason } => {
                let row = d.row.clone();
                self.record_transfer(
                    &row,
                    &TransferEvent::ChunkRejected {
                        chunk,
                        reason: reason.clone(),
                    },
                );
                if let Some(d) = self.download.take() {
                    self.fail_download(d.row, &reason, Some(&d.path));
                }
            }
        }
    }

    /// After a burst of events: makes the chunks written durable (fsync, then the bitmap),
    /// finishes a complete download, or asks for more.
    fn flush_download(&mut self) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        match d.take_unsaved() {
            Ok(0) => {}
            Ok(_) => {
                let saved =
                    self.outbox
                        .save_chunks(&d.row.sha256, &d.row.bitmap, d.row.chunks_rejected);
                match saved {
                    Ok(()) => {
                        self.transfer_rows
                            .insert(d.row.sha256.clone(), d.row.clone());
                    }
                    Err(e) => {
                        let reason = format!("recording verified chunks: {e}");
                        if let Some(d) = self.download.take() {
                            self.fail_download(d.row, &reason, Some(&d.path));
                        }
                        return;
                    }
                }
            }
            Err(e) => {
                let reason = format!("flushing the partial file: {e}");
                if let Some(d) = self.download.take() {
                    self.fail_download(d.row, &reason, Some(&d.path));
                }
                return;
            }
        }
        if d.complete() {
            self.finish_download();
        } else {
            self.request_chunks();
        }
    }

    /// Every chunk is verified: the whole hash, then the install (or another attempt).
    fn finish_download(&mut self) {
        let Some(d) = self.download.take() else {
            return;
        };
        let transfer::Parts { row, doc, path } = d.into_parts();
        let found = match transfer::hash_file(&path) {
            Ok(h) => h,
            Err(e) => {
                let reason = format!("reading the download back: {e}");
                return self.fail_download(row, &reason, Some(&path));
            }
        };
        if found != row.sha256 {
            self.record_transfer(
                &row,
                &TransferEvent::WholeHashMismatch {
                    attempt: row.attempts,
                    found,
                },
            );
            let _ = std::fs::remove_file(&path);
            if row.attempts >= transfer::MAX_ATTEMPTS {
                let reason = format!(
                    "the whole SHA-256 did not match after {} downloads",
                    row.attempts
                );
                return self.fail_download(row, &reason, None);
            }
            let attempts = row.attempts + 1;
            return self.start_download(doc, attempts);
        }
        self.record_transfer(&row, &TransferEvent::Verified);
        let row = self.set_row_state(row, "staged", None);
        self.install(row, &doc, path);
    }

    /// Hands a verified file to the installer.
    fn install(&mut self, row: TransferRow, doc: &DesiredState, path: PathBuf) {
        let req = InstallRequest {
            path: path.clone(),
            sha256: row.sha256.clone(),
            size: row.size,
            name: doc.manifest.name.clone(),
            version: doc.manifest.version.clone(),
            rollout: doc.rollout,
            alias: doc.alias.clone(),
            activate: doc.activate,
        };
        match self.source.install(&req) {
            Ok(out) => {
                // The registry had the bytes already: the file was not taken.
                let _ = std::fs::remove_file(&path);
                self.record_transfer(
                    &row,
                    &TransferEvent::Installed {
                        model: out.model,
                        created: out.created,
                    },
                );
                self.transfer_rows.insert(row.sha256.clone(), row);
                // Installed: activate now when the document asks for it (health-gated).
                self.step_rollout();
                self.publish_state(false);
            }
            Err(e) => {
                let reason = format!("installing: {e}");
                self.fail_download(row, &reason, Some(&path));
            }
        }
    }

    /// Records `state` (and a reason) for a download; returns the row as it now is.
    fn set_row_state(
        &mut self,
        mut row: TransferRow,
        state: &str,
        reason: Option<&str>,
    ) -> TransferRow {
        if let Err(e) = self.outbox.set_transfer_state(&row.sha256, state, reason) {
            self.note_error(&format!("recording a download's state: {e}"));
        }
        row.state = state.into();
        row.reason = reason.map(str::to_string);
        self.transfer_rows.insert(row.sha256.clone(), row.clone());
        row
    }

    /// A download failed for good (for its rollout): recorded, its partial file deleted.
    fn fail_download(&mut self, row: TransferRow, reason: &str, partial: Option<&std::path::Path>) {
        if let Some(p) = partial {
            let _ = std::fs::remove_file(p);
        }
        // The rejected chunks counted since the last save are kept with the failure.
        if let Err(e) = self
            .outbox
            .save_chunks(&row.sha256, &row.bitmap, row.chunks_rejected)
        {
            self.note_error(&format!("recording a download: {e}"));
        }
        let row = self.set_row_state(row, "failed", Some(reason));
        self.record_transfer(
            &row,
            &TransferEvent::Failed {
                reason: reason.to_string(),
            },
        );
        self.publish_state(false);
    }
}

/// The newest checkpoint with seq at or below `seq` (`checkpoints` in seq order).
fn newest_at_or_below(checkpoints: &[Checkpoint], seq: u64) -> Option<&Checkpoint> {
    let n = checkpoints.partition_point(|c| c.seq <= seq);
    n.checked_sub(1).map(|i| &checkpoints[i])
}

/// A batch builder for records up to `upto`, with room for the newest checkpoint at or below
/// it (the one [`seal_batch`] puts in is no longer: it is that one or an older one).
fn start_batch(
    device: &DeviceId,
    checkpoints: &[Checkpoint],
    upto: u64,
    limits: BatchLimits,
) -> Result<BatchBuilder, String> {
    let cp = newest_at_or_below(checkpoints, upto);
    BatchBuilder::new(device, cp, limits).map_err(|e| e.to_string())
}

/// The payload of `b`, with the newest checkpoint at or below its last record.
fn seal_batch(
    mut b: BatchBuilder,
    checkpoints: &[Checkpoint],
) -> Result<Option<EncodedBatch>, String> {
    let cp = newest_at_or_below(checkpoints, b.last_seq());
    b.set_checkpoint(cp).map_err(|e| e.to_string())?;
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::AuditBatch;
    use crate::protocol::fixtures::checkpoint;
    use outpost_policy::audit::Record;

    fn record(seq: u64) -> Record {
        crate::protocol::fixtures::record(seq, &"r".repeat(100))
    }

    /// `records` (in seq order) up to `upto`, packed within `limits` as the loop packs them.
    fn pack(
        device: &DeviceId,
        records: &[Record],
        checkpoints: &[Checkpoint],
        upto: u64,
        limits: BatchLimits,
    ) -> Result<Option<EncodedBatch>, String> {
        let mut b = start_batch(device, checkpoints, upto, limits)?;
        for r in records.iter().take_while(|r| r.seq <= upto) {
            if b.push(r).map_err(|e| e.to_string())? == Pushed::Full {
                break;
            }
        }
        seal_batch(b, checkpoints)
    }

    #[test]
    fn the_checkpoint_sent_is_the_newest_at_or_below_the_batch_end() {
        let cps: Vec<_> = [10, 20, 30].into_iter().map(checkpoint).collect();
        let seq = |upto| newest_at_or_below(&cps, upto).map(|c| c.seq);
        assert_eq!(
            [seq(0), seq(9), seq(10), seq(29), seq(30), seq(1000)],
            [None, None, Some(10), Some(20), Some(30), Some(30)]
        );
        assert_eq!(newest_at_or_below(&[], 5), None);
    }

    #[test]
    fn a_batch_cut_short_by_bytes_carries_a_checkpoint_it_covers() {
        let device = DeviceId::new("edge-01").unwrap();
        let records: Vec<_> = (1..=40).map(record).collect();
        let cps: Vec<_> = [5, 15, 35].into_iter().map(checkpoint).collect();
        let one = serde_json::to_vec(&records[0]).unwrap().len();
        // Room for about 12 records: the batch ends near seq 12, below checkpoint 15.
        let limits = BatchLimits {
            max_records: 100,
            max_bytes: 12 * (one + 1) + 600,
        };
        let first = pack(&device, &records, &cps, 40, limits).unwrap().unwrap();
        assert!(first.last_seq < 15, "{}", first.last_seq);
        // Built with room for checkpoint 35, sealed with the one it covers.
        let batch: AuditBatch = protocol::decode(&first.payload, usize::MAX).unwrap();
        assert_eq!(batch.checkpoint.map(|c| c.seq), Some(5));
        assert!(first.payload.len() <= limits.max_bytes);
        let again = pack(&device, &records, &cps, first.last_seq, limits)
            .unwrap()
            .unwrap();
        assert_eq!(
            (again.first_seq, again.last_seq),
            (first.first_seq, first.last_seq)
        );
        assert!(again.payload.len() <= limits.max_bytes);
        let batch: AuditBatch = protocol::decode(&again.payload, usize::MAX).unwrap();
        batch.check(&device).unwrap();
        assert_eq!(batch.checkpoint.map(|c| c.seq), Some(5));
        // Up to a bound, the records stop there.
        let short = pack(&device, &records, &cps, 3, limits).unwrap().unwrap();
        assert_eq!((short.first_seq, short.last_seq), (1, 3));
        let batch: AuditBatch = protocol::decode(&short.payload, usize::MAX).unwrap();
        assert_eq!(batch.checkpoint, None);
    }
}
