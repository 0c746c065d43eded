//! `outpost-hub serve`: the hub's ingest loop. One broker link ([`crate::conn::Link`]) with
//! the hub's shared subscriptions (`$share/hub/…`, so hubs side by side split the load), a
//! prepare thread, an ingest thread that owns `hub.db`, and the acks.
//!
//! Flow: the link's messages go, in the order they arrived, through bounded queues to two
//! threads (their work is blocking or CPU-bound and never runs on the async runtime): the
//! prepare thread ([`PREPARE_THREAD`]) reads and checks each one without the store
//! ([`ingest::prepare`]: decoding, the hash chain inside a batch); the ingest thread
//! ([`INGEST_THREAD`]), which owns `hub.db`, takes what is queued (up to [`MAX_GROUP`]
//! messages), applies them in ONE write transaction ([`ingest::apply`]) and commits: one
//! fsync for the group. The two overlap, so hashing and storing use two cores. Only after
//! the commit does the ingest thread publish the acks (`AuditAck` with the device's stored head; one per device per group),
//! through [`LinkHandle::try_publish`], which never waits: an ack refused (link down, queue
//! full) is logged at debug and counted, and the device's resend gets a duplicate's ack.
//!
//! An `ahead` batch (it starts after the stored head + 1: with several hubs on a shared
//! subscription, Mosquitto hands a device's batches out round-robin, so the one before it
//! may be in another hub's hands right now) is parked rather than acked at once: the thread
//! applies the parked batches again every [`PARK_RETRY`] and after each group that stored
//! something, in seq order per device, so it is stored and acked as soon as the head
//! reaches it; after [`PARK_FOR`] (or beyond [`PARK_MAX_BYTES`]) it counts as `ahead` and
//! is acked with the head as it is, and the device sends it again. Without this, every
//! overtaken batch would cost the device its resend delay.
//!
//! Rules:
//! - Nothing is acked that is not committed. A group whose transaction fails is rolled
//!   back and its messages are applied one per transaction, so one message the store cannot
//!   take (a hub-side inconsistency) does not hold up the others; what still fails is
//!   logged, counted as a store error and not acked (the device sends it again).
//! - The hub's MQTT client id is unique per process (several hubs share the certificate
//!   and its CN `outpost-hub`, which the broker takes as the username; the client id is
//!   free): `outpost-hub.<[hub] instance>`, else `outpost-hub.<16 random hex digits>`. Two
//!   processes with one client id would take each other's connection over and over.
//! - Its last will is the retained `offline` status on `hubs/outpost-hub/status`; `online`
//!   is published, retained, after every connect.
//! - Shutdown: stop reading the link; the two threads finish what they were given (the
//!   acks queued) within [`INGEST_GRACE`]; parked batches are dropped unacked; then the link
//!   stops gracefully (its queued publishes acked, the offline status, DISCONNECT).
//! - Counters ([`Metrics`]) are logged every `summary_every` and at shutdown; alerts are
//!   also rows of `audit_alerts`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_policy::audit::now_rfc3339;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::ingest::{self, AlertKind, Handled, Kind, Outcome, Prepared, Refusal};
use super::store::{HubStore, SqliteStore};
use super::{HUB_IDENTITY, Result, make_dir};
use crate::conn::{Link, LinkConfig, LinkEvent, LinkHandle, Session, Will};
use crate::protocol::{
    self, AuditAck, DeviceId, DeviceTopic, LinkState, Status, V1, device_topic, hub_status_topic,
};

/// Messages waiting for each of the two threads; when full, the link waits (back-pressure).
pub const WORK_QUEUE: usize = 1024;
/// Most messages applied in one transaction.
pub const MAX_GROUP: usize = 128;
/// How long shutdown waits for the threads to finish what they were given.
pub const INGEST_GRACE: Duration = Duration::from_secs(5);
/// How long an `ahead` batch waits for the head to reach it (another hub storing the
/// batch before it, or a redelivery) before it is acked with the head as it is.
pub const PARK_FOR: Duration = Duration::from_secs(5);
/// Most payload bytes parked at once; an `ahead` batch beyond it is acked at once.
pub const PARK_MAX_BYTES: usize = 16 << 20;
/// How often parked batches are tried again.
pub const PARK_RETRY: Duration = Duration::from_millis(25);
/// The ingest thread's name.
pub const INGEST_THREAD: &str = "hub-ingest";
/// The prepare thread's name.
pub const PREPARE_THREAD: &str = "hub-prepare";
/// Largest ack or status the hub publishes.
const MAX_OWN_MESSAGE: usize = 1024;

/// What `serve` needs, validated by the configuration.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// The broker link, with this process's unique client id.
    pub link: LinkConfig,
    pub data_dir: PathBuf,
    /// How often the counters are logged.
    pub summary_every: Duration,
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

/// The hub's counters (exposed over HTTP by a later issue; logged for now).
#[derive(Debug, Default)]
pub struct Metrics {
    received: AtomicU64,
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
}

/// The counters at one instant; label maps hold only the labels seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub received: u64,
    pub batches_stored: u64,
    pub batches_duplicate: u64,
    pub batches_ahead: u64,
    /// Times an `ahead` batch was parked to be tried again.
    pub batches_parked: u64,
    /// Audit batches refused without an alert, by reason.
    pub batches_refused: Vec<(&'static str, u64)>,
    /// Audit batches refused with an alert, by kind.
    pub alerts: Vec<(&'static str, u64)>,
    pub records_stored: u64,
    pub checkpoints_stored: u64,
    /// Status, reported state and telemetry written, by kind.
    pub updated: Vec<(&'static str, u64)>,
    /// Other messages refused, by reason.
    pub refused: Vec<(&'static str, u64)>,
    pub ignored: u64,
    pub acks_sent: u64,
    pub acks_unsent: u64,
    pub store_errors: u64,
}

fn inc(c: &AtomicU64, by: u64) {
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
        }
    }

    /// One `info` line with every counter.
    pub fn log(&self, message: &'static str) {
        let s = self.snapshot();
        info!(
            received = s.received,
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
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The ingest thread

/// A message from the link, for the prepare thread.
#[derive(Debug)]
struct Message {
    topic: String,
    payload: Vec<u8>,
}

/// What the ingest thread is given.
enum Work {
    /// A message, read and checked by the prepare thread.
    Item(Item),
    /// Time to try the parked batches again.
    Tick,
}

/// The prepare thread: reads and checks each message (decoding, the hash chain inside a
/// batch) without the store, in order, and hands it to the ingest thread.
fn prepare_loop(mut messages: mpsc::Receiver<Message>, work: mpsc::Sender<Work>) {
    while let Some(m) = messages.blocking_recv() {
        let item = Item {
            prepared: ingest::prepare(&m.topic, &m.payload),
            bytes: m.payload.len(),
        };
        if work.blocking_send(Work::Item(item)).is_err() {
            break;
        }
    }
    debug!("Prepare thread done.");
}

/// A message read and checked, with its size (what parking it costs).
struct Item {
    prepared: Prepared,
    bytes: usize,
}

/// An `ahead` batch waiting for the head to reach it.
struct Parked {
    item: Item,
    since: Instant,
}

struct Worker {
    store: SqliteStore,
    link: LinkHandle,
    metrics: Arc<Metrics>,
    parked: Vec<Parked>,
    parked_bytes: usize,
    /// [`PARK_FOR`], shorter in tests.
    park_for: Duration,
}

impl Worker {
    fn new(store: SqliteStore, link: LinkHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            link,
            metrics,
            parked: Vec::new(),
            parked_bytes: 0,
            park_for: PARK_FOR,
        }
    }

    fn run(mut self, mut queue: mpsc::Receiver<Work>) {
        while let Some(first) = queue.blocking_recv() {
            let mut group = Vec::new();
            let mut tick = false;
            let mut next = Some(first);
            while let Some(work) = next {
                match work {
                    Work::Item(item) => group.push(item),
                    Work::Tick => tick = true,
                }
                next = if group.len() < MAX_GROUP {
                    queue.try_recv().ok()
                } else {
                    None
                };
            }
            let stored = !group.is_empty() && self.handle(group);
            if tick || stored {
                self.retry_parked();
            }
        }
        if !self.parked.is_empty() {
            info!(
                batches = self.parked.len(),
                "Parked audit batches dropped at shutdown; their devices send them again."
            );
        }
        debug!("Ingest thread done.");
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
        let mut tx = self.store.begin_ingest()?;
        let mut handled = Vec::with_capacity(items.len());
        for item in items {
            handled.push(ingest::apply(tx.as_mut(), &item.prepared, &now)?);
        }
        tx.commit()?;
        Ok(handled)
    }

    /// After a commit: `ahead` batches are parked when `may_park` (and they fit), the rest
    /// counted and logged; then one ack per device (its newest head). Whether anything was
    /// stored.
    fn report(&mut self, items: Vec<Item>, handled: Vec<Handled>, may_park: bool) -> bool {
        let mut acks: Vec<(DeviceId, u64)> = Vec::new();
        let mut stored = false;
        for (item, h) in items.into_iter().zip(handled) {
            if may_park && matches!(h.outcome, Outcome::Ahead { .. }) && self.park(item) {
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
        self.parked_bytes += item.bytes;
        inc(&self.metrics.batches_parked, 1);
        self.parked.push(Parked {
            item,
            since: Instant::now(),
        });
        true
    }

    /// Applies the parked batches again, in seq order per device: stored ones are acked,
    /// ones still ahead stay parked until [`PARK_FOR`] is over, then count as `ahead` and
    /// are acked with the head.
    fn retry_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let mut parked = std::mem::take(&mut self.parked);
        self.parked_bytes = 0;
        parked.sort_by(|a, b| {
            (a.item.prepared.device(), a.item.prepared.seqs())
                .cmp(&(b.item.prepared.device(), b.item.prepared.seqs()))
        });
        let items: Vec<&Item> = parked.iter().map(|p| &p.item).collect();
        let result = (|| -> Result<Vec<Handled>> {
            let now = now_rfc3339();
            let mut tx = self.store.begin_ingest()?;
            let mut handled = Vec::with_capacity(items.len());
            for item in &items {
                handled.push(ingest::apply(tx.as_mut(), &item.prepared, &now)?);
            }
            tx.commit()?;
            Ok(handled)
        })();
        let handled = match result {
            Ok(h) => h,
            Err(e) => {
                // Nothing changed; they are dropped unacked and the devices send them again.
                inc(&self.metrics.store_errors, 1);
                error!(error = %e, batches = parked.len(), "Parked batches not applied; not acked.");
                return;
            }
        };
        let mut done_items = Vec::new();
        let mut done = Vec::new();
        for (p, h) in parked.into_iter().zip(handled) {
            if matches!(h.outcome, Outcome::Ahead { .. }) && p.since.elapsed() < self.park_for {
                self.parked_bytes += p.item.bytes;
                self.parked.push(p);
            } else {
                done_items.push(p.item);
                done.push(h);
            }
        }
        self.report(done_items, done, false);
    }

    fn ack(&self, device: DeviceId, acked_seq: u64) {
        let topic = device_topic(&device, DeviceTopic::AuditAck);
        let ack = AuditAck {
            v: V1,
            device_id: device,
            acked_seq,
        };
        let sent = protocol::encode(&ack, MAX_OWN_MESSAGE)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                self.link
                    .try_publish(&topic, p, false)
                    .map_err(|e| e.to_string())
            });
        match sent {
            Ok(_) => inc(&self.metrics.acks_sent, 1),
            Err(e) => {
                inc(&self.metrics.acks_unsent, 1);
                debug!(device = %ack.device_id, acked_seq, error = %e, "Ack not sent; the device will send again.");
            }
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
        Outcome::Alerted { alert, new } => error!(
            device,
            kind = alert.kind.as_str(),
            seq = alert.seq,
            detail = %alert.detail,
            repeated = !new,
            "Audit chain alert; batch refused."
        ),
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
    store: SqliteStore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("client_id", &self.settings.link.client_id)
            .field("data_dir", &self.settings.data_dir)
            .finish()
    }
}

fn status(state: LinkState) -> Result<Vec<u8>> {
    let s = Status {
        v: V1,
        state,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(protocol::encode(&s, MAX_OWN_MESSAGE)?)
}

impl Server {
    /// Opens (creating) `<data_dir>/hub.db` and checks the link's configuration.
    pub fn open(settings: ServeSettings) -> Result<Server> {
        settings.link.validate()?;
        let dir = make_dir(&settings.data_dir)?;
        let store = SqliteStore::open(&dir)?;
        Ok(Server {
            settings,
            store,
            metrics: Arc::default(),
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
            metrics,
        } = self;
        let hub = DeviceId::new(HUB_IDENTITY)?;
        let status_topic = hub_status_topic(&hub);
        let online = status(LinkState::Online)?;
        let session = Session {
            will: Will {
                topic: status_topic.clone(),
                payload: status(LinkState::Offline)?,
            },
            subscriptions: protocol::hub_subscriptions(),
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

        let (messages, messages_rx) = mpsc::channel::<Message>(WORK_QUEUE);
        let (work, work_rx) = mpsc::channel::<Work>(WORK_QUEUE);
        let worker = Worker::new(store, link.clone(), metrics.clone());
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

        let every = settings.summary_every;
        let mut summary = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut retry = tokio::time::interval(PARK_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Why serving stopped other than by shutdown: the exit is then a failure.
        let mut failure: Option<&'static str> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = summary.tick() => metrics.log("Ingest summary."),
                // Skipped when the queue is full: the thread is busy and retries after
                // each group that stored something anyway.
                _ = retry.tick() => { let _ = work.try_send(Work::Tick); }
                event = events.recv() => match event {
                    Some(LinkEvent::Connected) => {
                        if let Err(e) = link.try_publish(&status_topic, online.clone(), true) {
                            warn!(error = %e, "Online status not sent.");
                        }
                        info!(broker = %broker, client_id = %settings.link.client_id, "Serving.");
                    }
                    Some(LinkEvent::Message { topic, payload }) => {
                        inc(&metrics.received, 1);
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            sent = messages.send(Message { topic, payload }) => {
                                if sent.is_err() {
                                    failure = Some("the ingest threads stopped");
                                    break;
                                }
                            }
                        }
                    }
                    // The link logs these itself and reconnects.
                    Some(LinkEvent::ConnectFailed { .. } | LinkEvent::Disconnected { .. }) => {}
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
        // A link waiting to hand over an event sees the receiver gone and goes on.
        drop(events);
        // The threads finish what they were given (the acks queued), and return.
        drop(messages);
        drop(work);
        let joined = tokio::task::spawn_blocking(move || {
            let prepared = prepare_thread.join();
            let ingested = ingest_thread.join();
            prepared.and(ingested)
        });
        match tokio::time::timeout(INGEST_GRACE, joined).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => {
                error!("An ingest thread failed.");
                failure = failure.or(Some("an ingest thread failed"));
            }
            Err(_) => warn!(
                grace_secs = INGEST_GRACE.as_secs(),
                "The ingest threads did not finish in time; what they had not committed is not acked."
            ),
        }
        link_stop.cancel();
        let _ = link_task.await;
        metrics.log("Stopped.");
        match failure {
            Some(why) => Err(super::HubError::Serve(why.into())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
