//! `fleet-sim`: many simulated devices in one process, for measuring the hub and the broker
//! (a bench tool, not part of the agent; `bench/scale.py` drives it, `docs/scale.md` has its
//! figures).
//!
//! - `enroll`: N device identities from the hub's PKI (`outpost-hub pki init`'s folder): a
//!   client certificate per device (`hub::pki::Ca::client`, CN = the device id), an Ed25519
//!   audit key per device, each registered in the hub's store with that key
//!   (`HubStore::enroll`). One intent and one outcome record in the hub's own audit chain
//!   cover the whole batch (`devices enroll` writes two per device, which for 10,000
//!   devices costs minutes of process starts and fsyncs).
//! - `run`: each device is a tokio task with its own link, chain and key. What goes over
//!   the wire is the real code: `conn::Link` (rumqttc over rustls, mTLS with the device's
//!   certificate, reconnects with backoff), `protocol::Topics`, `protocol::BatchBuilder`,
//!   `protocol::encode`/`decode`, `AuditAck`; records are hashed by
//!   `outpost_policy::audit::Record::compute_hash` and checkpoints signed with the device's
//!   key over `Checkpoint::signed_message`. What is simulated is the device's storage: the
//!   chain lives in memory (no `audit.db`/`outbox.db`, no writer or sync thread per
//!   device: 10,000 SQLite pairs would need ~10 file descriptors each, over this machine's
//!   hard limit of 20,000, and two OS threads each). The upload follows `sync::device`'s
//!   rules: batches from the acked cursor, at most `--window` unacknowledged, each with the
//!   newest checkpoint at or below its last seq, everything above the cursor again after a
//!   (re)connect and after `--ack-timeout` without progress; only the hub's ack moves the
//!   cursor. Status (online, retained; the will says offline) and `state/reported` go out
//!   on every connect, `state/reported` again when the ack moved (at most every 5 s).
//! - Bad input: `--flooders K` devices write `--flood-rate` records per second and publish
//!   a batch on every write, ignoring the window (a device far above its rate, one message
//!   per record); `--replayers K` devices also publish their first batch again every
//!   `--replay-every` seconds (old batches); `--half-open K` raw TCP connections send the
//!   first bytes of a TLS ClientHello and then nothing.
//! - `verify`: after a run, every device of its `--json` report is checked in the store with
//!   the hub's own verifier (`hub::audit::DeviceChain::verify`, the enrolled key pinned):
//!   stored seqs `1..=written` exactly (nothing lost, nothing twice), every checkpoint
//!   verified, the whole chain signed. Exit 1 when any device fails.
//!
//! The process raises its own open-file limit to the hard limit (`setrlimit`), never the
//! machine's.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use outpost_policy::audit::{Checkpoint, Entry, Outcome, Record, now_rfc3339};
use outpost_policy::signing::KeyPair;
use outpost_sync::conn::{Backoff, ConnError, Link, LinkConfig, LinkEvent, LinkHandle, Session};
use outpost_sync::hub::audit::DeviceChain;
use outpost_sync::hub::enroll::{ACTION_ENROLL, audited_action};
use outpost_sync::hub::pki::{Ca, PkiPaths};
use outpost_sync::hub::{DeviceRecord, StoreConfig};
use outpost_sync::protocol::{
    self, AuditAck, BatchBuilder, BatchLimits, DeviceId, LinkState, MAX_ACK_BYTES, MAX_STATE_BYTES,
    MAX_STATUS_BYTES, Pushed, ReportedState, Status, Topics, V1,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    about = "Simulated Outpost devices against a real broker and hub"
)]
struct Cli {
    /// Log filter (tracing directives) for the simulator's own logs, on stderr.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make N device identities and enroll them in the hub's store.
    Enroll(EnrollArgs),
    /// Run the devices against the broker.
    Run(RunArgs),
    /// Check a run's devices in the hub's store: every record once, every chain verified.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// The hub's data directory (`hub.db` there unless --store names PostgreSQL).
    #[arg(long)]
    data_dir: PathBuf,
    /// `[hub] store`: a postgres:// URL.
    #[arg(long)]
    store: Option<String>,
}

impl StoreArgs {
    fn config(&self) -> Result<StoreConfig> {
        StoreConfig::new(self.store.as_deref(), &self.data_dir).map_err(anyhow::Error::msg)
    }
}

#[derive(Args)]
struct EnrollArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The PKI folder of `outpost-hub pki init`.
    #[arg(long)]
    pki: PathBuf,
    /// Where the devices' files go: `ca.pem`, `ID.pem`, `ID.key`, `ID.audit.pem`. A device
    /// whose three files are already there (an earlier `enroll` from the same PKI) keeps
    /// them and is enrolled in this store with its key.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    devices: u32,
    /// Device ids are PREFIX-00000, PREFIX-00001, …
    #[arg(long, default_value = "sim")]
    prefix: String,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The folder `enroll --out` wrote.
    #[arg(long)]
    dir: PathBuf,
    /// mqtts://HOST:PORT
    #[arg(long)]
    broker: String,
    #[arg(long)]
    devices: u32,
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Seconds between two records of a device.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Seconds the devices write (after the first one starts); then each writes a final
    /// record with a checkpoint and waits for its acks.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Devices started per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Seconds to wait for the last acks after writing stops.
    #[arg(long, default_value_t = 120.0)]
    drain: f64,
    /// Audit batches sent and not yet acknowledged, at most.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Seconds without an ack (batches out) before everything above the cursor goes again.
    #[arg(long, default_value_t = 15.0)]
    ack_timeout: f64,
    /// A signed checkpoint every this many records.
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 30)]
    keep_alive: u64,
    /// Each device drops its connection and reconnects after a random time of this mean
    /// (seconds; 0: never).
    #[arg(long, default_value_t = 0.0)]
    reconnect_every: f64,
    /// Devices (the last ones) that flood: --flood-rate records per second, a batch
    /// published on every write, no window.
    #[arg(long, default_value_t = 0)]
    flooders: u32,
    #[arg(long, default_value_t = 500.0)]
    flood_rate: f64,
    /// Devices (before the flooders) that also publish their first batch again every
    /// --replay-every seconds.
    #[arg(long, default_value_t = 0)]
    replayers: u32,
    #[arg(long, default_value_t = 1.0)]
    replay_every: f64,
    /// Raw TCP connections to the broker that send a partial TLS ClientHello and then
    /// nothing, for the whole run.
    #[arg(long, default_value_t = 0)]
    half_open: u32,
    /// Write the report as JSON here (the devices' written counts included, for `verify`).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The `run --json` report.
    #[arg(long)]
    report: PathBuf,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Enroll(a) => enroll(&a),
        Command::Run(a) => run(a),
        Command::Verify(a) => verify(&a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn device_id(prefix: &str, i: u32) -> String {
    format!("{prefix}-{i:05}")
}

fn audit_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.audit.pem"))
}

// ---------------------------------------------------------------------------------------------
// enroll

fn enroll(a: &EnrollArgs) -> Result<bool> {
    let ca = Ca::load(&PkiPaths::new(&a.pki))?;
    let config = a.store.config()?;
    std::fs::create_dir_all(&a.store.data_dir)
        .with_context(|| format!("creating {}", a.store.data_dir.display()))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut store = config.open()?;
    let mut intent = Entry::new(
        "local:fleet-sim",
        ACTION_ENROLL,
        Outcome::Allowed,
        "fleet simulator",
    );
    intent.details = json!({ "devices": a.devices, "prefix": a.prefix });
    let started = StdInstant::now();
    let reused = audited_action(
        &a.store.data_dir,
        intent,
        || -> Result<u32> {
            let mut reused = 0u32;
            std::fs::write(a.out.join("ca.pem"), ca.cert_pem())
                .with_context(|| format!("writing {}", a.out.join("ca.pem").display()))?;
            for i in 0..a.devices {
                let id = device_id(&a.prefix, i);
                let (key_path, cert, cert_key) = (
                    audit_key_path(&a.out, &id),
                    a.out.join(format!("{id}.pem")),
                    a.out.join(format!("{id}.key")),
                );
                // A device made by an earlier run (same PKI) is enrolled again as it is.
                let key = if key_path.exists() && cert.exists() && cert_key.exists() {
                    reused += 1;
                    KeyPair::load(&key_path)?
                } else {
                    let key = KeyPair::generate()?;
                    key.write_private(&key_path)?;
                    ca.client(&id)?.write(&cert, &cert_key)?;
                    key
                };
                store.enroll(&DeviceRecord::enrolled(
                    DeviceId::new(&id)?,
                    Vec::new(),
                    key.public_hex(),
                    "local:fleet-sim",
                ))?;
            }
            Ok(reused)
        },
        |_| format!("enrolled {} simulated devices", a.devices),
    )?;
    println!(
        "Enrolled {} devices ({}-00000 …; {reused} with files from an earlier run) in {:.1} s; their files are in {}.",
        a.devices,
        a.prefix,
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// run

/// What a device does besides the normal upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Normal,
    Flooder,
    Replayer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Normal => "normal",
            Role::Flooder => "flooder",
            Role::Replayer => "replayer",
        }
    }
}

/// Figures every device adds to as it goes (the sampler reads them each second).
#[derive(Default)]
struct Totals {
    connected_now: AtomicU64,
    ever_connected: AtomicU64,
    written: AtomicU64,
    acked: AtomicU64,
}

/// What one device did.
struct DeviceReport {
    id: String,
    role: Role,
    /// From its start to its first ConnAck.
    connect_ms: Option<u64>,
    written: u64,
    acked: u64,
    batches_sent: u64,
    publish_refused: u64,
    rewinds: u64,
    connects: u64,
    disconnects: u64,
    connect_failures: u64,
    replays: u64,
    /// Per record acked: ms from its write to the ack that covered it.
    lags: Vec<u32>,
    error: Option<String>,
}

/// A record written and not yet acknowledged.
struct Held {
    seq: u64,
    json: Vec<u8>,
    written: Instant,
}

struct Device {
    id: DeviceId,
    role: Role,
    topics: Topics,
    key: KeyPair,
    args: Arc<RunArgs>,
    totals: Arc<Totals>,
    link: LinkHandle,
    up: bool,
    prev_hash: String,
    /// Records above the acked cursor, in seq order.
    held: VecDeque<Held>,
    /// Signed checkpoints not yet covered by an ack (and the newest one always).
    checkpoints: Vec<Checkpoint>,
    written: u64,
    acked: u64,
    /// Highest seq sent since the last rewind.
    sent: u64,
    /// Last seq of each batch out, oldest first.
    inflight: VecDeque<u64>,
    last_progress: Instant,
    reported_acked: Option<u64>,
    reported_at: Instant,
    first_batch: Option<Vec<u8>>,
    report: DeviceReport,
}

const STATE_EVERY: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);

impl Device {
    /// Appends one record to the in-memory chain (and a checkpoint every
    /// `checkpoint_every` records, or when `checkpoint` asks).
    fn write(&mut self, action: &str, checkpoint: bool) -> Result<()> {
        let seq = self.written + 1;
        let mut r = Record {
            seq,
            ts: now_rfc3339(),
            device_id: self.id.to_string(),
            actor: "fleet-sim".into(),
            roles: Vec::new(),
            action: action.into(),
            resource: None,
            outcome: Outcome::Success,
            reason: "simulated".into(),
            request_id: None,
            policy_version: None,
            details: json!({ "role": self.role.as_str() }),
            prev_hash: std::mem::take(&mut self.prev_hash),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        self.prev_hash = r.hash.clone();
        let json = serde_json::to_vec(&r)?;
        self.held.push_back(Held {
            seq,
            json,
            written: Instant::now(),
        });
        self.written = seq;
        self.totals.written.fetch_add(1, Ordering::Relaxed);
        if checkpoint || seq.is_multiple_of(self.args.checkpoint_every.max(1)) {
            let mut cp = Checkpoint {
                device_id: self.id.to_string(),
                seq,
                hash: r.hash,
                ts: now_rfc3339(),
                public_key: self.key.public_hex(),
                signature: String::new(),
            };
            cp.signature = self.key.sign_hex(cp.signed_message().as_bytes());
            self.checkpoints.push(cp);
        }
        Ok(())
    }

    /// One batch from `from` (the first seq), up to the batch limits, with the newest
    /// checkpoint at or below its last seq.
    fn batch(&self, from: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let limits = BatchLimits {
            max_records: 500,
            max_bytes: 131_072,
        };
        let newest = self.checkpoints.last();
        let mut b = BatchBuilder::new(&self.id, newest, limits)?;
        for h in self.held.iter().filter(|h| h.seq >= from) {
            if b.push_json(h.seq, &h.json)? == Pushed::Full {
                break;
            }
        }
        let last = b.last_seq();
        let cp = self.checkpoints.iter().rev().find(|c| c.seq <= last);
        b.set_checkpoint(cp)?;
        Ok(b.finish().map(|e| (e.last_seq, e.payload)))
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        match self.link.try_publish(topic, payload, retain) {
            Ok(_) => true,
            Err(ConnError::NotConnected | ConnError::Closed) => {
                self.up = false;
                false
            }
            Err(e) => {
                debug!(device = %self.id, error = %e, "Publish refused.");
                self.report.publish_refused += 1;
                false
            }
        }
    }

    /// Sends what the window allows (a flooder: whatever it has not sent, at once, whatever
    /// is out).
    fn pump(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        if self.role == Role::Flooder {
            if let Some((last, payload)) = self.batch(self.sent + 1)? {
                let topic = self.topics.audit().to_string();
                if self.publish(&topic, payload, false) {
                    self.report.batches_sent += 1;
                    self.sent = self.sent.max(last);
                    if self.inflight.is_empty() {
                        self.last_progress = Instant::now();
                    }
                    self.inflight.push_back(last);
                }
            }
            return Ok(());
        }
        while self.up && self.inflight.len() < self.args.window && self.sent < self.written {
            let Some((last, payload)) = self.batch(self.sent + 1)? else {
                break;
            };
            if self.first_batch.is_none() {
                self.first_batch = Some(payload.clone());
            }
            let topic = self.topics.audit().to_string();
            if !self.publish(&topic, payload, false) {
                break;
            }
            if self.inflight.is_empty() {
                self.last_progress = Instant::now();
            }
            self.report.batches_sent += 1;
            self.inflight.push_back(last);
            self.sent = last;
        }
        Ok(())
    }

    fn rewind(&mut self) {
        self.sent = self.acked;
        self.inflight.clear();
        self.last_progress = Instant::now();
    }

    fn report_state(&mut self) -> Result<()> {
        let state = ReportedState {
            v: V1,
            models: Vec::new(),
            aliases: Default::default(),
            policy_version: None,
            last_acked_seq: self.acked,
            desired: None,
            rollout: None,
            transfer: None,
        };
        let payload = protocol::encode(&state, MAX_STATE_BYTES)?;
        let topic = self.topics.state_reported().to_string();
        if self.publish(&topic, payload, true) {
            self.reported_acked = Some(self.acked);
            self.reported_at = Instant::now();
        }
        Ok(())
    }

    fn on_connected(&mut self, started: Instant) -> Result<()> {
        self.up = true;
        self.report.connects += 1;
        if self.report.connect_ms.is_none() {
            self.report.connect_ms = Some(started.elapsed().as_millis() as u64);
            self.totals.ever_connected.fetch_add(1, Ordering::Relaxed);
        }
        self.totals.connected_now.fetch_add(1, Ordering::Relaxed);
        let status = Status {
            v: V1,
            state: LinkState::Online,
            agent_version: "fleet-sim".into(),
        };
        let topic = self.topics.status().to_string();
        self.publish(&topic, protocol::encode(&status, MAX_STATUS_BYTES)?, true);
        self.report_state()?;
        self.rewind();
        self.pump()
    }

    fn on_down(&mut self) {
        if self.up {
            self.totals.connected_now.fetch_sub(1, Ordering::Relaxed);
        }
        self.up = false;
    }

    fn on_ack(&mut self, payload: &[u8]) -> Result<()> {
        let ack: AuditAck = match protocol::decode(payload, MAX_ACK_BYTES) {
            Ok(a) => a,
            Err(e) => {
                warn!(device = %self.id, error = %e, "An ack was refused.");
                return Ok(());
            }
        };
        if ack.device_id != self.id || ack.acked_seq <= self.acked {
            return Ok(());
        }
        // Never beyond what was written (a hub ahead of the device is a hub's bug).
        let to = ack.acked_seq.min(self.written);
        let now = Instant::now();
        while let Some(h) = self.held.front() {
            if h.seq > to {
                break;
            }
            let lag = now.duration_since(h.written).as_millis();
            self.report
                .lags
                .push(u32::try_from(lag).unwrap_or(u32::MAX));
            self.held.pop_front();
        }
        self.totals
            .acked
            .fetch_add(to - self.acked, Ordering::Relaxed);
        self.acked = to;
        self.sent = self.sent.max(to);
        while self.inflight.front().is_some_and(|l| *l <= to) {
            self.inflight.pop_front();
        }
        // Keep the newest checkpoint (it may have to go up again); drop covered older ones.
        let keep_from = self
            .checkpoints
            .iter()
            .rposition(|c| c.seq <= to)
            .unwrap_or(0);
        self.checkpoints.drain(..keep_from);
        self.last_progress = now;
        self.pump()
    }

    fn on_tick(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        if !self.inflight.is_empty()
            && self.last_progress.elapsed() >= Duration::from_secs_f64(self.args.ack_timeout)
        {
            self.report.rewinds += 1;
            self.rewind();
            self.pump()?;
        }
        if self.reported_acked != Some(self.acked) && self.reported_at.elapsed() >= STATE_EVERY {
            self.report_state()?;
        }
        Ok(())
    }

    fn replay(&mut self) {
        if !self.up {
            return;
        }
        if let Some(payload) = self.first_batch.clone() {
            let topic = self.topics.audit().to_string();
            if self.publish(&topic, payload, false) {
                self.report.replays += 1;
            }
        }
    }
}

/// The link settings for device `id` from the enrolled files.
fn link_config(args: &RunArgs, id: &DeviceId) -> LinkConfig {
    let mut config = LinkConfig::new(args.broker.clone(), id.clone());
    config.ca = Some(args.dir.join("ca.pem"));
    config.cert = Some(args.dir.join(format!("{id}.pem")));
    config.key = Some(args.dir.join(format!("{id}.key")));
    config.keep_alive = Duration::from_secs(args.keep_alive);
    config.backoff = Backoff {
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
    };
    config
}

fn session(topics: &Topics) -> Result<Session> {
    let will = Status {
        v: V1,
        state: LinkState::Offline,
        agent_version: "fleet-sim".into(),
    };
    Ok(Session {
        will: outpost_sync::conn::Will {
            topic: topics.status().to_string(),
            payload: protocol::encode(&will, MAX_STATUS_BYTES)?,
        },
        subscriptions: topics.subscriptions(&[]),
    })
}

/// A random delay of mean `mean` seconds (exponential), for reconnects.
fn exp_delay(mean: f64) -> Duration {
    let u: f64 = rand::random::<f64>().max(1e-9);
    Duration::from_secs_f64(-u.ln() * mean)
}

impl DeviceReport {
    fn new(id: &DeviceId, role: Role) -> Self {
        Self {
            id: id.to_string(),
            role,
            connect_ms: None,
            written: 0,
            acked: 0,
            batches_sent: 0,
            publish_refused: 0,
            rewinds: 0,
            connects: 0,
            disconnects: 0,
            connect_failures: 0,
            replays: 0,
            lags: Vec::new(),
            error: None,
        }
    }
}

/// One device, from its start time to the end of its drain.
async fn device_task(
    id: DeviceId,
    role: Role,
    args: Arc<RunArgs>,
    totals: Arc<Totals>,
    start_at: Instant,
    stop_writing: Instant,
    deadline: Instant,
) -> DeviceReport {
    sleep_until(start_at).await;
    let started = Instant::now();
    let setup = (|| -> Result<_> {
        let key = KeyPair::load(&audit_key_path(&args.dir, id.as_str()))?;
        let topics = Topics::new(id.clone());
        let config = link_config(&args, &id);
        let link_stop = CancellationToken::new();
        let (handle, events, task) = Link::spawn(&config, session(&topics)?, link_stop.clone())?;
        Ok((key, topics, config, link_stop, handle, events, task))
    })();
    let (key, topics, config, link_stop, handle, events, task) = match setup {
        Ok(s) => s,
        Err(e) => {
            let mut report = DeviceReport::new(&id, role);
            report.error = Some(format!("{e:#}"));
            return report;
        }
    };
    let d = Device {
        id: id.clone(),
        role,
        topics,
        key,
        args: args.clone(),
        totals,
        link: handle,
        up: false,
        prev_hash: "0".repeat(64),
        held: VecDeque::new(),
        checkpoints: Vec::new(),
        written: 0,
        acked: 0,
        sent: 0,
        inflight: VecDeque::new(),
        last_progress: Instant::now(),
        reported_acked: None,
        reported_at: Instant::now(),
        first_batch: None,
        report: DeviceReport::new(&id, role),
    };
    let link = LinkParts {
        config,
        stop: link_stop,
        events,
        task,
    };
    device_loop(d, link, started, stop_writing, deadline).await
}

/// A device's link as the loop holds it (replaced on every simulated reconnect).
struct LinkParts {
    config: LinkConfig,
    stop: CancellationToken,
    events: mpsc::Receiver<LinkEvent>,
    task: tokio::task::JoinHandle<()>,
}

async fn device_loop(
    mut d: Device,
    mut link: LinkParts,
    started: Instant,
    stop_writing: Instant,
    deadline: Instant,
) -> DeviceReport {
    let args = d.args.clone();
    let role = d.role;
    let interval = if role == Role::Flooder {
        Duration::from_secs_f64(1.0 / args.flood_rate.max(0.001))
    } else {
        Duration::from_secs_f64(args.interval.max(0.001))
    };
    // Devices do not write in lockstep: the first record comes within one interval.
    let mut next_write = Instant::now() + interval.mul_f64(rand::random::<f64>());
    let mut next_tick = Instant::now() + TICK;
    let far = deadline + Duration::from_secs(3600);
    let mut next_reconnect = if args.reconnect_every > 0.0 {
        Instant::now() + exp_delay(args.reconnect_every)
    } else {
        far
    };
    let replay_every = Duration::from_secs_f64(args.replay_every.max(0.01));
    let mut next_replay = if role == Role::Replayer {
        Instant::now() + replay_every
    } else {
        far
    };
    let mut writing = true;
    let result: Result<()> = async {
        loop {
            if !writing && d.acked >= d.written {
                break;
            }
            tokio::select! {
                event = link.events.recv() => match event {
                    Some(LinkEvent::Connected) => d.on_connected(started)?,
                    Some(LinkEvent::Disconnected { .. }) => {
                        d.report.disconnects += 1;
                        d.on_down();
                    }
                    Some(LinkEvent::ConnectFailed { .. }) => d.report.connect_failures += 1,
                    Some(LinkEvent::Message { topic, payload }) => {
                        if topic == d.topics.audit_ack() {
                            d.on_ack(&payload)?;
                        }
                    }
                    Some(_) => {}
                    None => bail!("the link stopped"),
                },
                _ = sleep_until(next_write), if writing => {
                    if Instant::now() >= stop_writing {
                        writing = false;
                        // The last record, signed at once (as the agent's stop record).
                        d.write("sim:stop", true)?;
                    } else {
                        d.write("sim:write", false)?;
                        next_write += interval;
                        // A flooder that fell behind does not try to catch up in one burst.
                        if next_write < Instant::now() {
                            next_write = Instant::now() + interval;
                        }
                    }
                    d.pump()?;
                }
                _ = sleep_until(next_tick) => {
                    next_tick += TICK;
                    d.on_tick()?;
                }
                _ = sleep_until(next_replay), if writing => {
                    next_replay += replay_every;
                    d.replay();
                }
                _ = sleep_until(next_reconnect), if writing => {
                    // Drop the connection and make a new link (a new TCP and TLS session).
                    link.stop.cancel();
                    let _ = (&mut link.task).await;
                    d.on_down();
                    link.stop = CancellationToken::new();
                    let (handle, events, task) =
                        Link::spawn(&link.config, session(&d.topics)?, link.stop.clone())?;
                    d.link = handle;
                    link.events = events;
                    link.task = task;
                    next_reconnect = Instant::now() + exp_delay(args.reconnect_every);
                }
                _ = sleep_until(deadline) => break,
            }
        }
        Ok(())
    }
    .await;
    d.on_down();
    link.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), link.task).await;
    d.report.written = d.written;
    d.report.acked = d.acked;
    if let Err(e) = result {
        d.report.error = Some(format!("{e:#}"));
    }
    d.report
}

/// Raw TCP connections that send the start of a ClientHello and then sit.
async fn half_open(broker: &str, n: u32) -> Result<Vec<tokio::net::TcpStream>> {
    let addr = broker
        .strip_prefix("mqtts://")
        .or_else(|| broker.strip_prefix("mqtt://"))
        .unwrap_or(broker)
        .to_string();
    // A TLS record header (handshake, TLS 1.0 record version, 512 bytes announced) and
    // the first bytes of a ClientHello (type 1, 508 bytes announced, version 3.3).
    let partial: [u8; 11] = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.write_all(&partial).await?;
        out.push(s);
    }
    Ok(out)
}

/// How many of the half-open connections the broker has closed.
fn closed_by_peer(conns: &[tokio::net::TcpStream]) -> u64 {
    let mut buf = [0u8; 64];
    conns
        .iter()
        .filter(|s| match s.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        })
        .count() as u64
}

/// Raises this process's open-file limit to its hard limit; returns (soft, hard).
fn raise_fd_limit() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                return (hard, hard);
            }
            (soft, hard)
        }
        Err(e) => {
            warn!(error = %e, "The open-file limit could not be read.");
            (0, 0)
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

fn run(args: RunArgs) -> Result<bool> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.flooders + args.replayers > args.devices {
        bail!("--flooders plus --replayers is more than --devices");
    }
    let (soft, hard) = raise_fd_limit();
    let needed = u64::from(args.devices) + u64::from(args.half_open) + 64;
    if soft < needed {
        warn!(
            soft,
            hard, needed, "The open-file limit is below one per device: some will not connect."
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_async(Arc::new(args.clone()), soft))?;
    println!("{}", report.text);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.ok)
}

struct RunReport {
    text: String,
    json: Value,
    ok: bool,
}

async fn run_async(args: Arc<RunArgs>, fd_limit: u64) -> Result<RunReport> {
    let totals = Arc::new(Totals::default());
    let half = if args.half_open > 0 {
        let t = StdInstant::now();
        let conns = half_open(&args.broker, args.half_open).await?;
        println!(
            "{} half-open TLS connections made in {:.1} s.",
            conns.len(),
            t.elapsed().as_secs_f64()
        );
        conns
    } else {
        Vec::new()
    };
    let t0 = Instant::now();
    let stop_writing = t0 + Duration::from_secs_f64(args.duration);
    let deadline = stop_writing + Duration::from_secs_f64(args.drain);
    let per = Duration::from_secs_f64(1.0 / args.connect_rate.max(0.001));
    let n = args.devices;
    let first_flooder = n - args.flooders;
    let first_replayer = first_flooder - args.replayers;
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let id = DeviceId::new(&device_id(&args.prefix, i))?;
        let role = if i >= first_flooder {
            Role::Flooder
        } else if i >= first_replayer {
            Role::Replayer
        } else {
            Role::Normal
        };
        tasks.push(tokio::spawn(device_task(
            id,
            role,
            args.clone(),
            totals.clone(),
            t0 + per * i,
            stop_writing,
            deadline,
        )));
    }
    // The sampler: connected devices and acked records, once a second.
    let (sample_tx, mut sample_rx) = mpsc::unbounded_channel::<(f64, u64, u64, u64)>();
    let sampler_stop = CancellationToken::new();
    let sampler = {
        let totals = totals.clone();
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let _ = sample_tx.send((
                            t0.elapsed().as_secs_f64(),
                            totals.connected_now.load(Ordering::Relaxed),
                            totals.written.load(Ordering::Relaxed),
                            totals.acked.load(Ordering::Relaxed),
                        ));
                    }
                }
            }
        })
    };
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => reports.push(r),
            Err(e) => bail!("a device task failed: {e}"),
        }
    }
    let finished = t0.elapsed().as_secs_f64();
    sampler_stop.cancel();
    let _ = sampler.await;
    let mut samples = Vec::new();
    while let Ok(s) = sample_rx.try_recv() {
        samples.push(s);
    }
    let half_closed = closed_by_peer(&half);
    drop(half);
    Ok(summarize(
        &args,
        &reports,
        &samples,
        finished,
        half_closed,
        fd_limit,
    ))
}

fn summarize(
    args: &RunArgs,
    reports: &[DeviceReport],
    samples: &[(f64, u64, u64, u64)],
    finished: f64,
    half_closed: u64,
    fd_limit: u64,
) -> RunReport {
    let n = reports.len() as u64;
    let mut connect: Vec<u32> = reports
        .iter()
        .filter_map(|r| r.connect_ms.map(|m| u32::try_from(m).unwrap_or(u32::MAX)))
        .collect();
    connect.sort_unstable();
    let connected = connect.len() as u64;
    // When the last device first connected: the end of the connect phase.
    let all_connected_at = samples.iter().find(|s| s.1 >= n).map(|s| s.0);
    let mut lags: Vec<u32> = reports
        .iter()
        .filter(|r| r.role != Role::Flooder)
        .flat_map(|r| r.lags.iter().copied())
        .collect();
    lags.sort_unstable();
    let mut flood_lags: Vec<u32> = reports
        .iter()
        .filter(|r| r.role == Role::Flooder)
        .flat_map(|r| r.lags.iter().copied())
        .collect();
    flood_lags.sort_unstable();
    let sum = |f: &dyn Fn(&DeviceReport) -> u64| reports.iter().map(f).sum::<u64>();
    let written = sum(&|r| r.written);
    let acked = sum(&|r| r.acked);
    let unacked: Vec<&DeviceReport> = reports.iter().filter(|r| r.acked < r.written).collect();
    let errors: Vec<&DeviceReport> = reports.iter().filter(|r| r.error.is_some()).collect();
    // Sustained rate: acked records per second from when every device was connected to
    // when writing stopped (the whole writing time when they never all were).
    let steady_from = all_connected_at.unwrap_or(0.0);
    let steady_to = args.duration;
    let at = |t: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .map(|s| (s.0, s.2, s.3))
    };
    let sustained = match (at(steady_from), at(steady_to)) {
        (Some(a), Some(b)) if b.0 > a.0 => Some((
            (b.2 - a.2.min(b.2)) as f64 / (b.0 - a.0),
            (b.1 - a.1.min(b.1)) as f64 / (b.0 - a.0),
            b.0 - a.0,
        )),
        _ => None,
    };
    let ms = |v: Option<u32>| v.map_or("-".into(), |m| format!("{m} ms"));
    let role_sum = |role: Role, f: &dyn Fn(&DeviceReport) -> u64| {
        reports
            .iter()
            .filter(|r| r.role == role)
            .map(f)
            .sum::<u64>()
    };
    let mut text = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        text,
        "Devices: {n} ({} flooders, {} replayers), open-file limit {fd_limit}.",
        args.flooders, args.replayers
    );
    let _ = writeln!(
        text,
        "Connected: {connected} of {n}; connect time p50 {}, p99 {}, max {}; all connected after {}.",
        ms(percentile(&connect, 0.5)),
        ms(percentile(&connect, 0.99)),
        ms(connect.last().copied()),
        all_connected_at.map_or("never".into(), |t| format!("{t:.1} s")),
    );
    let _ = writeln!(
        text,
        "Records: {written} written, {acked} acked by the hub, {} devices with records unacked at the end.",
        unacked.len()
    );
    if let Some((rate, wrate, secs)) = sustained {
        let _ = writeln!(
            text,
            "Sustained: {rate:.0} records/s acked ({wrate:.0} written/s) over {secs:.0} s with every device connected."
        );
    }
    let _ = writeln!(
        text,
        "Lag from write to hub ack (non-flooders, {} records): p50 {}, p99 {}, max {}.",
        lags.len(),
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.99)),
        ms(lags.last().copied()),
    );
    let _ = writeln!(
        text,
        "Links: {} connects, {} disconnects, {} failed attempts; {} rewinds after an ack timeout; {} publishes refused by the link.",
        sum(&|r| r.connects),
        sum(&|r| r.disconnects),
        sum(&|r| r.connect_failures),
        sum(&|r| r.rewinds),
        sum(&|r| r.publish_refused),
    );
    if args.flooders > 0 {
        let _ = writeln!(
            text,
            "Flooders: {} records written, {} acked, {} batches sent; lag p50 {}, p99 {}.",
            role_sum(Role::Flooder, &|r| r.written),
            role_sum(Role::Flooder, &|r| r.acked),
            role_sum(Role::Flooder, &|r| r.batches_sent),
            ms(percentile(&flood_lags, 0.5)),
            ms(percentile(&flood_lags, 0.99)),
        );
    }
    if args.replayers > 0 {
        let _ = writeln!(
            text,
            "Replayers: {} old batches published again.",
            role_sum(Role::Replayer, &|r| r.replays)
        );
    }
    if args.half_open > 0 {
        let _ = writeln!(
            text,
            "Half-open TLS connections: {} made, {half_closed} closed by the broker by the end.",
            args.half_open
        );
    }
    for r in errors.iter().take(5) {
        let _ = writeln!(
            text,
            "Device {} failed: {}",
            r.id,
            r.error.as_deref().unwrap_or("")
        );
    }
    let ok = errors.is_empty() && unacked.is_empty() && connected == n;
    let _ = write!(
        text,
        "{} in {finished:.1} s.",
        if ok {
            "Every record acked"
        } else {
            "NOT every record acked"
        }
    );
    let json = json!({
        "devices": n,
        "flooders": args.flooders,
        "replayers": args.replayers,
        "half_open": args.half_open,
        "half_open_closed_by_broker": half_closed,
        "interval_s": args.interval,
        "duration_s": args.duration,
        "connect_rate": args.connect_rate,
        "fd_limit": fd_limit,
        "connected": connected,
        "connect_ms": {
            "p50": percentile(&connect, 0.5), "p99": percentile(&connect, 0.99),
            "max": connect.last(),
        },
        "all_connected_s": all_connected_at,
        "written": written,
        "acked": acked,
        "sustained": sustained.map(|(acked, written, secs)| json!({
            "acked_per_s": acked, "written_per_s": written, "seconds": secs,
        })),
        "lag_ms": {
            "records": lags.len(), "p50": percentile(&lags, 0.5),
            "p99": percentile(&lags, 0.99), "max": lags.last(),
        },
        "flooder_lag_ms": {
            "records": flood_lags.len(), "p50": percentile(&flood_lags, 0.5),
            "p99": percentile(&flood_lags, 0.99),
        },
        "connects": sum(&|r| r.connects),
        "disconnects": sum(&|r| r.disconnects),
        "connect_failures": sum(&|r| r.connect_failures),
        "rewinds": sum(&|r| r.rewinds),
        "publish_refused": sum(&|r| r.publish_refused),
        "replays": sum(&|r| r.replays),
        "finished_s": finished,
        "ok": ok,
        "samples": samples.iter().map(|s| json!([s.0, s.1, s.2, s.3])).collect::<Vec<_>>(),
        "per_device": reports.iter().map(|r| json!({
            "id": r.id, "role": r.role.as_str(), "written": r.written, "acked": r.acked,
            "batches_sent": r.batches_sent, "connect_ms": r.connect_ms, "error": r.error,
        })).collect::<Vec<_>>(),
    });
    RunReport { text, json, ok }
}

// ---------------------------------------------------------------------------------------------
// verify

fn verify(a: &VerifyArgs) -> Result<bool> {
    let text = std::fs::read_to_string(&a.report)
        .with_context(|| format!("reading {}", a.report.display()))?;
    let report: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run report", a.report.display()))?;
    let Some(devices) = report["per_device"].as_array() else {
        bail!("{} has no per_device list", a.report.display());
    };
    let store = a.store.config()?.open_read_only()?;
    let started = StdInstant::now();
    let (mut ok, mut records, mut failures) = (0u64, 0u64, Vec::new());
    for d in devices {
        let (Some(id), Some(written)) = (d["id"].as_str(), d["written"].as_u64()) else {
            bail!(
                "a device in {} has no id or written count",
                a.report.display()
            );
        };
        let id = DeviceId::new(id)?;
        let v = DeviceChain::open(store.as_ref(), &id)?.verify()?;
        let c = &v.chain;
        let problem = if !c.ok {
            Some(c.summary())
        } else if c.records != written || c.last_seq != Some(written).filter(|w| *w > 0) {
            Some(format!(
                "{} records stored (last seq {:?}), {written} written",
                c.records, c.last_seq
            ))
        } else if c.signed_through != c.last_seq {
            Some(format!(
                "signed through {:?} of {:?}",
                c.signed_through, c.last_seq
            ))
        } else if v.alerts > 0 {
            Some(format!("{} alerts", v.alerts))
        } else {
            None
        };
        records += c.records;
        match problem {
            None => ok += 1,
            Some(p) => failures.push((id.to_string(), p)),
        }
    }
    let all = failures.is_empty();
    println!(
        "Verified {} devices in {:.1} s: {ok} whole (every record once, chain and checkpoints verified, all signed), {} not; {records} records.",
        devices.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    for (id, why) in failures.iter().take(20) {
        println!("  {id}: {why}");
    }
    if let Some(path) = &a.json {
        let out = json!({
            "devices": devices.len(), "ok": ok, "records": records, "all_ok": all,
            "failures": failures.iter().map(|(i, w)| json!({"id": i, "why": w})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(all)
}
