//! `outpost-hub serve` as a real process against a real Mosquitto run from its own
//! `broker-config`, with simulated devices: a real audit log (`AuditLog`, checkpoints every
//! few records) read back with `AuditReader`, packed by `protocol::BatchBuilder`, published
//! over mTLS with the device's enrolled certificate through `conn::Link`, and acks read on
//! `devices/{id}/audit/ack`. The device does what the agent will: send from its acked
//! cursor, each batch with the newest checkpoint at or below its last seq, and send again
//! everything above the cursor when the ack stalls.
//!
//! Without Mosquitto these tests skip with a printed reason, except under `CI=true`.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_policy::audit::{
    AuditLog, AuditReader, AuditSettings, Checkpoint, Entry, Outcome, Query, Record,
};
use outpost_policy::signing::KeyPair;
use outpost_sync::conn::{ConnError, LinkConfig, LinkEvent};
use outpost_sync::hub::audit::DeviceChain;
use outpost_sync::hub::store::StoreConfig;
use outpost_sync::hub::store::pg::testing::TestDb;
use outpost_sync::protocol::{
    self, AuditAck, AuditBatch, BatchBuilder, BatchLimits, DeviceId, Pushed, Topics,
};
use support::*;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// A fleet: PKI, enrolled devices (each with its audit key), a running Mosquitto from
/// `broker-config`, and `hub.toml` for `serve`.
struct Fleet {
    tmp: TempDir,
    port: u16,
    _broker: Mosquitto,
    /// The PostgreSQL database of `[hub] store`, when the fleet's hubs use one (dropped
    /// after the broker and the hubs).
    pg: Option<TestDb>,
}

impl Fleet {
    fn new(devices: &[(&str, &KeyPair)]) -> Fleet {
        Self::with_store(devices, None)
    }

    /// A fleet whose hubs share a PostgreSQL store; `None` (the test skips) without one.
    fn on_postgres(devices: &[(&str, &KeyPair)]) -> Option<Fleet> {
        Some(Self::with_store(devices, Some(TestDb::create()?)))
    }

    fn with_store(devices: &[(&str, &KeyPair)], pg: Option<TestDb>) -> Fleet {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path();
        ok(&hub(dir, &["pki", "init", "--out", "pki"]));
        let port = free_port();
        write_hub_toml_with_store(dir, port, pg.as_ref().map(TestDb::url));
        for (id, key) in devices {
            let pem = dir.join(format!("{id}.pub.pem"));
            key.public().write(&pem).unwrap();
            ok(&hub(
                dir,
                &[
                    "--config",
                    "hub.toml",
                    "--data-dir",
                    "data",
                    "devices",
                    "enroll",
                    "--id",
                    id,
                    "--audit-key",
                    pem.to_str().unwrap(),
                    "--pki",
                    "pki",
                    "--out",
                    "out",
                ],
            ));
        }
        let broker = start_broker(dir, port);
        Fleet {
            tmp,
            port,
            _broker: broker,
            pg,
        }
    }

    /// The store the hubs write, as `[hub] store` names it.
    fn store(&self) -> StoreConfig {
        match &self.pg {
            Some(db) => StoreConfig::Postgres(db.url().into()),
            None => StoreConfig::Sqlite(self.dir().join("data")),
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Starts `outpost-hub --config hub.toml serve`, logging to `hub-<name>.log`, and waits
    /// for `Serving.`.
    fn start_hub(&self, name: &str) -> HubProcess {
        self.start_hub_with(name, "hub.toml")
    }

    /// [`Fleet::start_hub`] with another configuration file in the fleet's folder.
    fn start_hub_with(&self, name: &str, config: &str) -> HubProcess {
        let log = self.dir().join(format!("hub-{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(HUB)
            .args(["--config", config, "serve"])
            .current_dir(self.dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut hub = HubProcess { child, log };
        let starts = hub.log_text().matches("Serving.").count();
        hub.wait_for_log(|t| t.matches("Serving.").count() > starts, "Serving.");
        hub
    }

    fn device_link(&self, id: &str) -> LinkConfig {
        let dir = self.dir();
        let mut config = link_config(
            self.port,
            id,
            &dir.join("out/ca.pem"),
            &dir.join(format!("out/{id}.pem")),
            &dir.join(format!("out/{id}.key")),
        );
        // Big enough to try a packet the broker refuses.
        config.max_packet_size = 1 << 20;
        config
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir().join("data/hub.db")).unwrap()
    }

    fn devices_json(&self) -> serde_json::Value {
        let out = ok(&hub(
            self.dir(),
            &["--config", "hub.toml", "devices", "list", "--json"],
        ));
        serde_json::from_str(&out).unwrap()
    }
}

/// A running `outpost-hub serve`, killed on drop if still running.
struct HubProcess {
    child: Child,
    log: PathBuf,
}

impl HubProcess {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, done: impl Fn(&str) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if done(&self.log_text()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the hub exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "no {what:?} in the hub's log within 20 s:\n{}",
            self.log_text()
        );
    }

    /// SIGTERM, then the exit code (within 15 s).
    fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not exit within 15 s of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL, no questions asked.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub run in this test's process (its counters readable, its settings changed by the
/// test) over the fleet's `hub.toml`.
struct InProcessHub {
    metrics: std::sync::Arc<outpost_sync::hub::serve::Metrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<outpost_sync::hub::Result<()>>,
}

impl InProcessHub {
    fn start(
        fleet: &Fleet,
        tweak: impl FnOnce(&mut outpost_sync::hub::serve::ServeSettings),
    ) -> Self {
        use outpost_sync::hub::config::Config;
        use outpost_sync::hub::serve::Server;
        let config = Config::load(Some(&fleet.dir().join("hub.toml"))).unwrap();
        let mut settings = config.serve_settings(None).unwrap();
        tweak(&mut settings);
        let server = Server::open(settings).unwrap();
        let stop = CancellationToken::new();
        Self {
            metrics: server.metrics(),
            task: tokio::spawn(server.run(stop.clone())),
            stop,
        }
    }

    /// Stops it, and waits until it has (its counters no longer move).
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// What a device does with each ack it receives, beside moving its cursor.
type AckCheck = Box<dyn FnMut(&DeviceId, u64) + Send>;

/// A simulated device: its audit log, its link, its acked cursor.
struct Device {
    id: DeviceId,
    topics: Topics,
    _dir: TempDir,
    path: PathBuf,
    log: Option<AuditLog>,
    client: Client,
    acked: u64,
    limits: BatchLimits,
    /// Every ack received, in order.
    acks: Vec<u64>,
    resends: u32,
    /// Called with every ack as it arrives (to hold it against the store at that moment).
    on_ack: Option<AckCheck>,
}

fn open_log(path: &Path, id: &str, key: &KeyPair, every: u64) -> AuditLog {
    let copy = KeyPair::from_pem(&key.private_pem(), path).unwrap();
    let mut settings = AuditSettings::new(id);
    settings.checkpoint_every = every;
    AuditLog::open(path, copy, settings).unwrap()
}

impl Device {
    async fn connect(
        fleet: &Fleet,
        id: &str,
        key: &KeyPair,
        checkpoint_every: u64,
        stop: &CancellationToken,
    ) -> Device {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("audit.db");
        let log = open_log(&path, id, key, checkpoint_every);
        let did = DeviceId::new(id).unwrap();
        let topics = Topics::new(did.clone());
        let client = connect(
            &fleet.device_link(id),
            session(topics.status().to_string(), topics.subscriptions(&[])),
            stop,
        )
        .await;
        Device {
            id: did,
            topics,
            _dir: dir,
            path,
            log: Some(log),
            client,
            acked: 0,
            limits: BatchLimits {
                max_records: 50,
                max_bytes: 128 * 1024,
            },
            acks: Vec::new(),
            resends: 0,
            on_ack: None,
        }
    }

    /// Appends `n` records; returns the last seq.
    fn append(&self, n: usize) -> u64 {
        let log = self.log.as_ref().unwrap();
        let mut pending = Vec::new();
        for i in 0..n {
            let mut e = Entry::new(
                "local:test",
                "inference:run",
                Outcome::Allowed,
                &format!("request {i}"),
            );
            e.details = serde_json::json!({"tokens": i});
            pending.push(log.submit(e));
        }
        pending
            .into_iter()
            .map(|p| p.wait().unwrap().seq)
            .last()
            .unwrap_or(0)
    }

    fn read(&self) -> (Vec<Record>, Vec<Checkpoint>) {
        let reader = AuditReader::open(&self.path).unwrap();
        (
            reader.query(&Query::default()).unwrap(),
            reader.checkpoints().unwrap(),
        )
    }

    /// Sends every record above the cursor, in batches, each with the newest checkpoint at
    /// or below its last seq; returns the number of batches.
    async fn send_from_cursor(&mut self) -> usize {
        let batches = self.batches_from_cursor();
        let n = batches.len();
        for payload in batches {
            self.publish_raw(self.topics.audit().to_string(), payload)
                .await;
        }
        n
    }

    /// The payloads [`Device::send_from_cursor`] sends.
    fn batches_from_cursor(&self) -> Vec<Vec<u8>> {
        let reader = AuditReader::open(&self.path).unwrap();
        let records = reader
            .query(&Query {
                after_seq: Some(self.acked),
                ..Query::default()
            })
            .unwrap();
        let checkpoints = reader.checkpoints().unwrap();
        let mut batches = Vec::new();
        let mut i = 0;
        while i < records.len() {
            // The checkpoint for this batch: the newest at or below its last seq, which we
            // only know once packed; pack, then repack with it (it does not change the count
            // by more than the builder checks).
            let probe = pack(&self.id, None, &records[i..], self.limits);
            let last = records[i + probe - 1].seq;
            let cp = checkpoints.iter().rev().find(|c| c.seq <= last);
            let mut b = BatchBuilder::new(&self.id, cp, self.limits).unwrap();
            let mut n = 0;
            for r in &records[i..] {
                if r.seq > last || b.push(r).unwrap() == Pushed::Full {
                    break;
                }
                n += 1;
            }
            batches.push(b.finish().unwrap().payload);
            i += n;
        }
        batches
    }

    /// Queues a publish, waiting for room in the link's queue.
    async fn publish_raw(&mut self, topic: String, payload: Vec<u8>) {
        loop {
            match self
                .client
                .handle
                .try_publish(&topic, payload.clone(), false)
            {
                Ok(_) => return,
                Err(ConnError::QueueFull | ConnError::NotConnected) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("publish to {topic}: {e}"),
            }
        }
    }

    /// Waits up to 20 s for an ack, then reads `then_ms` more; returns the acks seen.
    async fn read_acks(&mut self, then_ms: u64) -> Vec<u64> {
        let mut got = Vec::new();
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Ok(Some(event)) =
            tokio::time::timeout_at(deadline, self.client.events.recv()).await
        {
            if let Some(seq) = self.on_event(event) {
                if got.is_empty() {
                    deadline = tokio::time::Instant::now() + Duration::from_millis(then_ms);
                }
                got.push(seq);
            }
        }
        got
    }

    fn on_event(&mut self, event: LinkEvent) -> Option<u64> {
        let LinkEvent::Message { topic, payload } = event else {
            return None;
        };
        assert_eq!(topic, self.topics.audit_ack(), "unexpected message");
        let ack: AuditAck = protocol::decode(&payload, 1024).unwrap();
        assert_eq!(ack.device_id, self.id);
        self.acks.push(ack.acked_seq);
        if let Some(check) = &mut self.on_ack {
            check(&self.id, ack.acked_seq);
        }
        // An ack never moves the cursor back.
        self.acked = self.acked.max(ack.acked_seq);
        Some(ack.acked_seq)
    }

    /// Waits until the hub has acked `target`, sending again from the cursor whenever the
    /// ack has not moved for `stall`.
    async fn drain(&mut self, target: u64, stall: Duration, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let mut last_progress = tokio::time::Instant::now();
        let mut seen = self.acked;
        while self.acked < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "acked {} of {target} within {within:?} (acks {:?})",
                self.acked,
                self.acks
            );
            match tokio::time::timeout(Duration::from_millis(100), self.client.events.recv()).await
            {
                Ok(Some(event)) => {
                    self.on_event(event);
                }
                Ok(None) => panic!("the device's link stopped"),
                Err(_) => {}
            }
            if self.acked > seen {
                seen = self.acked;
                last_progress = tokio::time::Instant::now();
            } else if last_progress.elapsed() >= stall && self.acked < target {
                self.resends += 1;
                self.send_from_cursor().await;
                last_progress = tokio::time::Instant::now();
            }
        }
    }
}

/// How many of `records` fit one batch under `limits`.
fn pack(id: &DeviceId, cp: Option<&Checkpoint>, records: &[Record], limits: BatchLimits) -> usize {
    let mut b = BatchBuilder::new(id, cp, limits).unwrap();
    let mut n = 0;
    for r in records {
        if b.push(r).unwrap() == Pushed::Full {
            break;
        }
        n += 1;
    }
    n
}

/// The store holds exactly the device's log: records 1..=n once each, as written, acked n;
/// every checkpoint one the device signed; no alerts.
fn assert_store_is(fleet: &Fleet, device: &Device, n: u64) {
    let (records, checkpoints) = device.read();
    assert_eq!(records.len() as u64, n);
    let db = fleet.db();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let mut stmt = db
        .prepare(
            "SELECT seq, record_json, hash FROM audit_records WHERE device_id = ?1 ORDER BY seq",
        )
        .unwrap();
    let rows: Vec<(i64, String, String)> = stmt
        .query_map([device.id.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len() as u64, n, "records stored");
    for ((seq, json, hash), original) in rows.iter().zip(&records) {
        assert_eq!(*seq as u64, original.seq);
        assert_eq!(json, &serde_json::to_string(original).unwrap());
        assert_eq!(hash, &original.hash);
    }
    let acked: i64 = db
        .query_row(
            "SELECT acked_seq FROM devices WHERE id = ?1",
            [device.id.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(acked as u64, n);
    let mut stmt = db
        .prepare("SELECT checkpoint_json FROM audit_checkpoints WHERE device_id = ?1")
        .unwrap();
    let stored: Vec<String> = stmt
        .query_map([device.id.as_str()], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(!stored.is_empty(), "no checkpoint stored");
    for json in stored {
        let cp: Checkpoint = serde_json::from_str(&json).unwrap();
        assert!(
            checkpoints.contains(&cp),
            "a checkpoint the device did not sign: {json}"
        );
    }
    let alerts: i64 = db
        .query_row("SELECT COUNT(*) FROM audit_alerts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(alerts, 0);
}

fn alerts(fleet: &Fleet) -> Vec<String> {
    let db = fleet.db();
    let mut stmt = db
        .prepare("SELECT device_id || ' ' || kind || '@' || seq FROM audit_alerts ORDER BY rowid")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stores_and_acks_and_refuses_hostile_input_without_stopping() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);

    // Configuration errors are exit 78, before anything connects.
    let dir = fleet.dir();
    std::fs::write(dir.join("nobroker.toml"), "[hub]\ndata_dir = \"data\"\n").unwrap();
    let (code, err) = failed(&hub(dir, &["--config", "nobroker.toml", "serve"]));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("nobroker.toml") && err.contains("[hub] broker: is required by serve"),
        "{err}"
    );
    let (code, err) = failed(&hub(dir, &["serve"]));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("serve needs --config FILE"), "{err}");
    std::fs::write(dir.join("badinstance.toml"), "[hub]\ninstance = \"a/b\"\n").unwrap();
    let (code, err) = failed(&hub(dir, &["--config", "badinstance.toml", "serve"]));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("[hub] instance"), "{err}");

    let hub_a = fleet.start_hub("a");
    let log = hub_a.log_text();
    assert!(
        log.contains(&format!("broker=mqtts://127.0.0.1:{}", fleet.port)),
        "{log}"
    );
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 10, &stop).await;

    // Status, reported state, telemetry; then batches, acked in order, no resend needed.
    let topics = dev.topics.clone();
    dev.publish_raw(
        topics.status().into(),
        br#"{"v":1,"state":"online","agent_version":"0.9.1"}"#.to_vec(),
    )
    .await;
    dev.publish_raw(
        topics.state_reported().into(),
        br#"{"v":1,"models":[],"aliases":{"default":"smollm2:1"},"policy_version":null,"last_acked_seq":0}"#.to_vec(),
    )
    .await;
    dev.publish_raw(
        topics.telemetry().into(),
        br#"{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{"audit_last_seq":33}}"#.to_vec(),
    )
    .await;
    dev.limits.max_records = 10;
    assert_eq!(dev.append(25), 25);
    assert_eq!(dev.send_from_cursor().await, 3);
    dev.drain(25, Duration::from_secs(30), Duration::from_secs(20))
        .await;
    assert_eq!(dev.resends, 0);
    // Batches that arrive together share a transaction and one ack.
    assert!(dev.acks.windows(2).all(|w| w[0] < w[1]), "{:?}", dev.acks);
    assert_eq!(dev.acks.last(), Some(&25));

    // Hostile input on the device's own topics: refused, no ack, the hub keeps going.
    let (records, checkpoints) = dev.read();
    let id = dev.id.clone();
    let batch = |records: &[Record], cp: Option<&Checkpoint>| AuditBatch {
        v: protocol::V1,
        device_id: id.clone(),
        first_seq: records[0].seq,
        last_seq: records[records.len() - 1].seq,
        records: records.to_vec(),
        checkpoint: cp.cloned(),
    };
    let mut edited = records[20..25].to_vec();
    edited[2].actor = "local:mallory".into();
    let mut forged = checkpoints.last().unwrap().clone();
    forged.signature = forged.signature.replace('a', "b").replace('1', "2");
    let mut other = batch(&records[20..25], None);
    other.device_id = DeviceId::new("dev-B").unwrap();
    let hostile: Vec<(String, Vec<u8>)> = vec![
        (topics.audit().into(), b"{\"v\":1,".to_vec()),
        (
            topics.audit().into(),
            serde_json::to_string(&batch(&records[20..25], None))
                .unwrap()
                .replacen("{\"v\":1", "{\"v\":2", 1)
                .into_bytes(),
        ),
        (topics.audit().into(), serde_json::to_vec(&other).unwrap()),
        (
            topics.audit().into(),
            serde_json::to_vec(&batch(&edited, None)).unwrap(),
        ),
        // The same broken batch again (a device resending it): the same alert.
        (
            topics.audit().into(),
            serde_json::to_vec(&batch(&edited, None)).unwrap(),
        ),
        (
            topics.audit().into(),
            serde_json::to_vec(&batch(&records[20..25], Some(&forged))).unwrap(),
        ),
        (
            topics.telemetry().into(),
            format!(
                r#"{{"v":1,"ts":"t","metrics":{{"x":"{}"}}}}"#,
                "y".repeat(100_000)
            )
            .into_bytes(),
        ),
        (topics.status().into(), b"offline".to_vec()),
    ];
    for (topic, payload) in hostile {
        dev.publish_raw(topic, payload).await;
    }
    // Then a genuine duplicate: its ack is the only one (one device's messages reach the
    // hub in order, and it acks after each commit).
    let dup = serde_json::to_vec(&batch(&records[20..25], checkpoints.last())).unwrap();
    dev.publish_raw(topics.audit().into(), dup).await;
    let got = dev.read_acks(1000).await;
    assert_eq!(got, [25], "acks after the hostile batches");
    assert_eq!(
        alerts(&fleet),
        ["dev-A break@23", "dev-A forged_checkpoint@20"]
    );

    // A packet over the broker's limit: the broker drops the device (the hub never sees
    // it), the device reconnects and carries on.
    dev.publish_raw(topics.audit().into(), vec![b' '; 300 * 1024])
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut dropped = false;
    loop {
        match tokio::time::timeout_at(deadline, dev.client.events.recv()).await {
            Ok(Some(LinkEvent::Disconnected { .. })) => dropped = true,
            Ok(Some(LinkEvent::Connected)) if dropped => break,
            Ok(Some(_)) => {}
            _ => panic!("the device was not dropped and reconnected"),
        }
    }
    // Its will said offline; back online, as the agent does after each connect.
    dev.publish_raw(
        topics.status().into(),
        br#"{"v":1,"state":"online","agent_version":"0.9.1"}"#.to_vec(),
    )
    .await;
    dev.append(5);
    dev.send_from_cursor().await;
    dev.drain(30, Duration::from_secs(3), Duration::from_secs(20))
        .await;
    assert_store_is_prefix(&fleet, &dev, 30);

    // devices list sees the link status, the model, the acked seq and the lag.
    let list = fleet.devices_json();
    let d = &list[0];
    assert_eq!(d["id"], "dev-A");
    assert_eq!(d["online"], true);
    assert_eq!(d["agent_version"], "0.9.1");
    assert_eq!(d["active_model"], "smollm2:1");
    assert_eq!(d["acked_seq"], 30);
    assert_eq!(d["audit_lag"], 3);
    assert!(d["last_seen"].is_string());

    // SIGTERM: exit 0, the counters in the last line.
    let (code, log) = hub_a.terminate();
    eprintln!("{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("Connection lost."), "{log}");
    let last = log.lines().rev().find(|l| l.contains("Stopped.")).unwrap();
    for field in [
        "batches_stored=4",
        "records_stored=30",
        "alerts=break=2,forged_checkpoint=1",
        "batches_refused=malformed=1,unknown_version=1,wrong_device=1",
        "refused=too_large=1,malformed=1",
        "store_errors=0",
    ] {
        assert!(last.contains(field), "{field} missing: {last}");
    }
    // Each alert is logged at `error` when first seen; the repeat only at `debug`.
    assert_eq!(
        log.matches("Audit chain alert; batch refused.").count(),
        2,
        "{log}"
    );
    stop.cancel();
}

/// Like [`assert_store_is`], for a store that also holds alerts.
fn assert_store_is_prefix(fleet: &Fleet, device: &Device, n: u64) {
    let db = fleet.db();
    let (count, max): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), MAX(seq) FROM audit_records WHERE device_id = ?1",
            [device.id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((count as u64, max as u64), (n, n));
    let (records, _) = device.read();
    let mut stmt = db
        .prepare("SELECT record_json FROM audit_records WHERE device_id = ?1 ORDER BY seq")
        .unwrap();
    let stored: Vec<String> = stmt
        .query_map([device.id.as_str()], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for (json, original) in stored.iter().zip(&records) {
        assert_eq!(json, &serde_json::to_string(original).unwrap());
    }
}

/// Through the hub's own read side (either store): `device`'s records are exactly its log
/// 1..=n, each once, acked n, its checkpoints all ones it signed, no alert, and its chain
/// verifies from seq 1 against the enrolled key. On a plain thread: the PostgreSQL client
/// may not block on the test's runtime.
fn assert_store_holds(fleet: &Fleet, device: &Device, n: u64) {
    let (records, checkpoints) = device.read();
    assert_eq!(records.len() as u64, n);
    let (store, id) = (fleet.store(), device.id.clone());
    std::thread::spawn(move || {
        let store = store.open_read_only().unwrap();
        let mut stored = Vec::new();
        store
            .for_each_audit_record(&id, &Query::default(), &mut |r| {
                stored.push((r.seq as u64, r.record_json.to_string()));
                Ok(())
            })
            .unwrap();
        assert_eq!(stored.len() as u64, n, "records stored");
        for ((seq, json), original) in stored.iter().zip(&records) {
            assert_eq!(*seq, original.seq);
            assert_eq!(json, &serde_json::to_string(original).unwrap());
        }
        assert_eq!(store.device(&id).unwrap().unwrap().acked_seq, Some(n));
        let cps = store.audit_checkpoints(&id).unwrap();
        assert!(!cps.is_empty(), "no checkpoint stored");
        assert!(cps.iter().all(|c| checkpoints.contains(c)));
        assert_eq!(store.audit_alerts(&id, 1).unwrap().0, 0);
        let report = DeviceChain::open(store.as_ref(), &id)
            .unwrap()
            .verify()
            .unwrap();
        assert!(report.chain.ok, "{}", report.chain.summary());
    })
    .join()
    .unwrap();
}

/// Holds every ack against the PostgreSQL store at the moment it arrives: the device's rows
/// are 1..=max without a gap and the ack is not above them.
fn check_acks_against(db: &TestDb) -> AckCheck {
    let url = db.url().to_string();
    Box::new(move |id: &DeviceId, acked: u64| {
        let (url, id) = (url.clone(), id.to_string());
        let (count, max) = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let row = c
                .query_one(
                    "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM audit_records \
                     WHERE device_id = $1",
                    &[&id],
                )
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        })
        .join()
        .unwrap();
        assert_eq!(count, max, "a gap in the stored records");
        assert!(acked <= max as u64, "acked {acked} while {max} stored");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_ingest_ends_with_every_record_once() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    killed_mid_ingest(Fleet::new(&[("dev-A", &key)]), &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_postgres_killed_mid_ingest_ends_with_every_record_once() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let Some(fleet) = Fleet::on_postgres(&[("dev-A", &key)]) else {
        return;
    };
    killed_mid_ingest(fleet, &key).await;
}

/// Three rounds of: a hub started, 2,000 records sent, the hub SIGKILLed at its first ack;
/// then one more hub drains it all.
async fn killed_mid_ingest(fleet: Fleet, key: &KeyPair) {
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", key, 100, &stop).await;
    dev.limits.max_records = 20;
    if let Some(db) = &fleet.pg {
        dev.on_ack = Some(check_acks_against(db));
    }

    let mut total = 0;
    for round in 0..3 {
        let hub = fleet.start_hub("a");
        total = dev.append(2000);
        dev.send_from_cursor().await;
        // Kill it as soon as its first ack of this round arrives: the rest is in flight.
        let before = dev.acked;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while dev.acked == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: no ack"
            );
            if let Ok(Some(e)) =
                tokio::time::timeout(Duration::from_millis(100), dev.client.events.recv()).await
            {
                dev.on_event(e);
            }
        }
        hub.kill();
        assert!(
            dev.acked < total,
            "round {round}: everything was acked before the kill"
        );
    }
    let hub = fleet.start_hub("a");
    let started = Instant::now();
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(60))
        .await;
    eprintln!(
        "drained {total} records after the last restart in {:?} ({} resends)",
        started.elapsed(),
        dev.resends
    );
    if fleet.pg.is_none() {
        assert_store_is(&fleet, &dev, total);
    }
    assert_store_holds(&fleet, &dev, total);
    let (code, log) = hub.terminate();
    assert_eq!(code, Some(0), "{log}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_postgres_one_killed_and_restarted_while_devices_upload() {
    if mosquitto().is_none() {
        return;
    }
    let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().unwrap()).collect();
    let ids = ["dev-A", "dev-B", "dev-C"];
    let enrolled: Vec<(&str, &KeyPair)> = ids.iter().copied().zip(&keys).collect();
    let Some(fleet) = Fleet::on_postgres(&enrolled) else {
        return;
    };
    let stop = CancellationToken::new();
    let a = fleet.start_hub("a");
    let b = fleet.start_hub("b");
    let mut devices = Vec::new();
    for (id, key) in &enrolled {
        let mut dev = Device::connect(&fleet, id, key, 50, &stop).await;
        dev.limits.max_records = 20;
        dev.on_ack = Some(check_acks_against(fleet.pg.as_ref().unwrap()));
        devices.push(dev);
    }
    // Everyone uploads; hub a is SIGKILLed as soon as every device has had an ack, with
    // most of the stream still in flight, and started again while they keep sending.
    let mut totals = Vec::new();
    for dev in &mut devices {
        totals.push(dev.append(1500));
        dev.send_from_cursor().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while devices.iter().any(|d| d.acked == 0) {
        assert!(tokio::time::Instant::now() < deadline, "no acks");
        for dev in &mut devices {
            while let Ok(e) = dev.client.events.try_recv() {
                dev.on_event(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill();
    assert!(
        devices.iter().zip(&totals).any(|(d, t)| d.acked < *t),
        "everything was acked before the kill"
    );
    for (dev, total) in devices.iter_mut().zip(totals.iter_mut()) {
        *total = dev.append(500);
        dev.send_from_cursor().await;
    }
    let a = fleet.start_hub("a");
    for (dev, total) in devices.iter_mut().zip(&totals) {
        dev.drain(*total, Duration::from_secs(3), Duration::from_secs(90))
            .await;
    }
    for (dev, total) in devices.iter().zip(&totals) {
        assert_store_holds(&fleet, dev, *total);
        assert!(dev.acks.iter().all(|a| a <= total));
    }
    for (name, hub) in [("a", a), ("b", b)] {
        let (code, log) = hub.terminate();
        assert_eq!(code, Some(0), "hub {name}: {log}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_side_by_side_share_the_work_and_the_store() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    let a = fleet.start_hub("a");
    let b = fleet.start_hub("b");
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 100, &stop).await;
    dev.limits.max_records = 20;
    let total = dev.append(1000);
    let started = Instant::now();
    dev.send_from_cursor().await;
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(60))
        .await;
    eprintln!(
        "two hubs drained {total} records in {:?} ({} resends)",
        started.elapsed(),
        dev.resends
    );
    assert_store_is(&fleet, &dev, total);

    for (name, hub) in [("a", a), ("b", b)] {
        let (code, log) = hub.terminate();
        assert_eq!(code, Some(0), "{log}");
        // One client id each: neither took the other's connection over.
        assert!(!log.contains("Connection lost."), "hub {name}: {log}");
        let last = log.lines().rev().find(|l| l.contains("Stopped.")).unwrap();
        eprintln!("hub {name}: {last}");
        assert!(
            !last.contains("received=0 "),
            "hub {name} got nothing: {last}"
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_hub_is_dropped_by_the_broker_and_the_other_takes_its_share() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    let a = fleet.start_hub("a");
    let b = fleet.start_hub("b");
    // Hub a hangs (SIGSTOP: its connection stays open, nothing is read or answered). The
    // broker still hands it every other batch until it drops it after 1.5 × its keep-alive
    // (10 s for a hub: 15 s); then the device's resends all reach b.
    let signal = |sig: &str, hub: &HubProcess| {
        let pid = hub.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP", &a);
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 100, &stop).await;
    dev.limits.max_records = 20;
    let total = dev.append(400);
    let started = Instant::now();
    dev.send_from_cursor().await;
    // With the devices' 30 s keep-alive, a hung hub held its share for 45 s.
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(40))
        .await;
    eprintln!(
        "{total} records acked with hub a hung, in {:?} ({} resends)",
        started.elapsed(),
        dev.resends
    );
    assert_store_is(&fleet, &dev, total);
    let broker_log = std::fs::read_to_string(fleet.dir().join("mosquitto.log")).unwrap();
    // (Each hub's client id is random here: the one dropped is the hung one.)
    let dropped = broker_log
        .lines()
        .filter(|l| l.contains("Client outpost-hub.") && l.contains("exceeded timeout"))
        .count();
    assert_eq!(
        dropped, 1,
        "the broker did not drop the hung hub:\n{broker_log}"
    );
    signal("-CONT", &a);
    for (name, hub) in [("a", a), ("b", b)] {
        let (code, log) = hub.terminate();
        assert_eq!(code, Some(0), "hub {name}: {log}");
    }
    assert_store_is(&fleet, &dev, total);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_store_costs_the_hub_neither_its_connection_nor_a_record() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    // The hub in this process, with a short keep-alive (the broker drops a client silent
    // for 1.5 × keep-alive) and a small byte budget.
    let hub = InProcessHub::start(&fleet, |settings| {
        settings.link.keep_alive = Duration::from_secs(2);
        settings.queue_max_bytes = 2 << 20;
        // This test is about the byte budget: the per-device limits (its message rate and its
        // share of the budget, which would hold this flood back before the budget fills) are
        // lifted.
        settings.device_max_bytes = usize::MAX;
        settings.device_max_messages = usize::MAX;
        settings.ingest_rate = outpost_sync::hub::blobs::RateLimit {
            rate: 1e9,
            burst: 1e9,
        };
    });
    let metrics = hub.metrics.clone();

    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 50, &stop).await;
    dev.limits.max_records = 20;
    dev.append(20);
    dev.send_from_cursor().await;
    dev.drain(20, Duration::from_secs(2), Duration::from_secs(20))
        .await;

    // Another writer holds hub.db for 7 s (the hub's busy timeout is 10 s): nothing is
    // stored meanwhile, while the device sends 6 MB of telemetry and 1,000 records.
    let db = fleet.db();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked = Instant::now();
    let telemetry = dev.topics.telemetry().to_string();
    for i in 0..5000 {
        let pad = "x".repeat(1000);
        let payload = format!(
            r#"{{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{{"n":{i},"pad":"{pad}"}}}}"#
        );
        dev.publish_raw(telemetry.clone(), payload.into_bytes())
            .await;
        // Its PubAcks, so the device's own link never waits on this test.
        while let Ok(e) = dev.client.events.try_recv() {
            dev.on_event(e);
        }
    }
    let total = dev.append(1000);
    dev.send_from_cursor().await;
    let flooded = locked.elapsed();
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(locked.elapsed())).await;
    db.execute_batch("COMMIT").unwrap();

    // Whatever was shed is sent again; everything is stored once.
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(60))
        .await;
    assert_store_is(&fleet, &dev, total);
    let m = metrics.snapshot();
    eprintln!("flood took {flooded:?}; {m:?}");
    assert!(
        flooded < Duration::from_secs(6),
        "the flood took {flooded:?}"
    );
    assert_eq!(m.disconnects, 0, "the hub lost its connection: {m:?}");
    assert!(m.shed > 0, "nothing was shed: {m:?}");
    assert_eq!(m.store_errors, 0, "{m:?}");
    let broker_log = std::fs::read_to_string(fleet.dir().join("mosquitto.log")).unwrap();
    assert!(
        !broker_log.contains("exceeded timeout"),
        "the broker dropped a client for its keep-alive:\n{broker_log}"
    );
    hub.stop().await;
    assert_eq!(metrics.snapshot().queued_bytes, 0);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_limited_and_counted_while_the_others_flow() {
    use outpost_sync::hub::blobs::RateLimit;
    if mosquitto().is_none() {
        return;
    }
    let (key_a, key_b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let fleet = Fleet::new(&[("dev-A", &key_a), ("dev-B", &key_b)]);
    let hub = InProcessHub::start(&fleet, |settings| {
        settings.ingest_rate = RateLimit {
            rate: 20.0,
            burst: 40.0,
        };
    });
    let metrics = hub.metrics.clone();

    let stop = CancellationToken::new();
    let mut flooder = Device::connect(&fleet, "dev-A", &key_a, 50, &stop).await;
    let mut quiet = Device::connect(&fleet, "dev-B", &key_b, 10, &stop).await;
    // dev-A sends 1,000 telemetry messages and its 100 records five times over, as fast as
    // its link takes them; dev-B sends its 20 records once, in the middle of the flood.
    let telemetry = flooder.topics.telemetry().to_string();
    let flood_total = flooder.append(100);
    let quiet_total = quiet.append(20);
    let started = Instant::now();
    for i in 0..1000 {
        let payload = format!(r#"{{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{{"n":{i}}}}}"#);
        flooder
            .publish_raw(telemetry.clone(), payload.into_bytes())
            .await;
        if i % 200 == 0 {
            flooder.send_from_cursor().await;
        }
        if i == 500 {
            quiet.send_from_cursor().await;
        }
        while let Ok(e) = flooder.client.events.try_recv() {
            flooder.on_event(e);
        }
    }
    // The quiet device's records flow at once: its first send is stored and acked.
    quiet
        .drain(
            quiet_total,
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(quiet.resends, 0, "dev-B had to send again");
    // The flooder is held to its rate and counted; what was dropped comes again.
    flooder
        .drain(flood_total, Duration::from_secs(1), Duration::from_secs(60))
        .await;
    assert_store_holds(&fleet, &quiet, quiet_total);
    assert_store_holds(&fleet, &flooder, flood_total);
    // The hub stopped before its counters are read: messages still arriving would move them
    // between the snapshot and the /metrics text.
    let elapsed = started.elapsed().as_secs_f64();
    hub.stop().await;
    let m = metrics.snapshot();
    eprintln!("flood of {elapsed:.1} s: {m:?}");
    // What got through is what the bucket allows (40 at once, 20 a second) plus dev-B's few
    // messages; the count received depends on how much of the flood the broker passed on
    // (telemetry is QoS 0), so it is the passed share that is checked, not a fixed count.
    let passed = m.received - m.limited;
    assert!(
        m.limited > 0 && passed as f64 <= 40.0 + 20.0 * elapsed + 30.0,
        "{passed} messages passed in {elapsed:.1} s: {m:?}"
    );
    let per_device = metrics.limited_devices();
    assert_eq!(per_device.len(), 1, "{per_device:?}");
    assert_eq!(per_device[0].0.as_str(), "dev-A");
    assert_eq!(per_device[0].1, m.limited);
    let text = outpost_sync::hub::metrics::render(&metrics);
    for line in [
        format!("outpost_hub_messages_limited_total {}", m.limited),
        format!(
            "outpost_hub_device_messages_limited_total{{device=\"dev-A\"}} {}",
            m.limited
        ),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_cannot_take_the_byte_budget_the_other_devices_need() {
    use outpost_sync::hub::blobs::RateLimit;
    if mosquitto().is_none() {
        return;
    }
    let (key_a, key_b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let fleet = Fleet::new(&[("dev-A", &key_a), ("dev-B", &key_b)]);
    // A 4 MiB budget, an eighth of it per device (the shipped proportion), and no message
    // rate limit: only the share stands between the flood and the budget.
    let hub = InProcessHub::start(&fleet, |settings| {
        settings.queue_max_bytes = 4 << 20;
        settings.device_max_bytes = 512 << 10;
        settings.ingest_rate = RateLimit {
            rate: 1e9,
            burst: 1e9,
        };
    });
    let metrics = hub.metrics.clone();

    let stop = CancellationToken::new();
    let mut flooder = Device::connect(&fleet, "dev-A", &key_a, 50, &stop).await;
    let mut quiet = Device::connect(&fleet, "dev-B", &key_b, 10, &stop).await;
    let quiet_total = quiet.append(20);
    // The store is busy (another writer holds hub.db) while dev-A sends 6 MB of telemetry
    // in messages of 5 KB, more than the whole budget and filling it to the last few KB;
    // then dev-B sends its 20 records (one batch larger than that), once.
    let db = fleet.db();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked = Instant::now();
    let telemetry = flooder.topics.telemetry().to_string();
    for i in 0..1200 {
        let pad = "x".repeat(5_000);
        let payload = format!(
            r#"{{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{{"n":{i},"pad":"{pad}"}}}}"#
        );
        flooder
            .publish_raw(telemetry.clone(), payload.into_bytes())
            .await;
        while let Ok(e) = flooder.client.events.try_recv() {
            flooder.on_event(e);
        }
    }
    // The whole flood in the hub's hands first (the device's link sends it in the
    // background; a batch sent now could overtake it in the broker).
    // Telemetry is QoS 0, which the broker may drop: what arrives is enough once the count
    // stops moving.
    let (mut seen, mut moved) = (0, Instant::now());
    while seen < 1200 && (seen < 100 || moved.elapsed() < Duration::from_millis(500)) {
        assert!(
            locked.elapsed() < Duration::from_secs(20),
            "the flood did not arrive: {:?}",
            metrics.snapshot()
        );
        while let Ok(e) = flooder.client.events.try_recv() {
            flooder.on_event(e);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let received = metrics.snapshot().received;
        if received > seen {
            (seen, moved) = (received, Instant::now());
        }
    }
    quiet.send_from_cursor().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.execute_batch("COMMIT").unwrap();
    eprintln!("store locked for {:?}", locked.elapsed());
    // dev-B's batches were taken while the flood was held to its share: they are stored and
    // acked as soon as the store is free, with no resend (the drain would resend after 30 s).
    quiet
        .drain(
            quiet_total,
            Duration::from_secs(30),
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(quiet.resends, 0, "dev-B had to send again");
    assert_store_holds(&fleet, &quiet, quiet_total);
    hub.stop().await;
    let m = metrics.snapshot();
    eprintln!("{m:?}");
    // The flood was limited (dev-A's share), never shed (the budget never filled).
    assert!(m.limited > 0, "{m:?}");
    assert_eq!(m.shed, 0, "{m:?}");
    let per_device = metrics.limited_devices();
    assert_eq!(per_device.len(), 1, "{per_device:?}");
    assert_eq!(per_device[0].0.as_str(), "dev-A");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_draining_a_backlog_fast_is_never_limited_by_the_default_rate() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    // The hub as shipped: no ingest_rate in hub.toml, so the default limit applies. Its
    // share of the hub (bytes and messages held) is lifted: this device publishes without a
    // window, so what it holds depends on how fast this (debug, busy) hub stores, where a
    // real device's window of 8 batches keeps it far below its share.
    let hub = InProcessHub::start(&fleet, |settings| {
        settings.device_max_bytes = usize::MAX;
        settings.device_max_messages = usize::MAX;
    });
    let metrics = hub.metrics.clone();

    // A release build drains a backlog at about 240 batches a second (bench/sync.py); this
    // device sends 1,500 batches at 500 a second, for 3 s. The first default (200 a second,
    // 400 at once) dropped a third of them, each costing the device an ack timeout.
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 100, &stop).await;
    dev.limits.max_records = 1;
    let total = dev.append(1500);
    let batches = dev.batches_from_cursor();
    assert_eq!(batches.len(), 1500);
    let audit = dev.topics.audit().to_string();
    let started = Instant::now();
    for (i, chunk) in batches.chunks(50).enumerate() {
        for payload in chunk {
            dev.publish_raw(audit.clone(), payload.clone()).await;
        }
        while let Ok(e) = dev.client.events.try_recv() {
            dev.on_event(e);
        }
        let due = Duration::from_millis(100 * (i as u64 + 1));
        tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
    }
    dev.drain(total, Duration::from_secs(20), Duration::from_secs(60))
        .await;
    assert_store_holds(&fleet, &dev, total);
    let m = metrics.snapshot();
    eprintln!("1,500 batches in {:?}: {m:?}", started.elapsed());
    assert_eq!(m.limited, 0, "a draining device was limited: {m:?}");
    assert_eq!(dev.resends, 0, "the device had to send again: {m:?}");
    hub.stop().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopping_mid_stream_hands_what_it_has_not_read_to_the_other() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    let a = fleet.start_hub("a");
    let b = fleet.start_hub("b");
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 100, &stop).await;
    dev.limits.max_records = 10;
    let total = dev.append(4000);
    // Hub a stops while the batches are still coming (one every 5 ms): what it took it
    // stores and acks, what it had not taken goes to hub b. The device never has to send
    // anything again.
    let mut a = Some(a);
    let mut stopping = None;
    let topic = dev.topics.audit().to_string();
    for (i, payload) in dev.batches_from_cursor().into_iter().enumerate() {
        if i == 100 {
            let a = a.take().unwrap();
            stopping = Some(std::thread::spawn(move || a.terminate()));
        }
        dev.publish_raw(topic.clone(), payload).await;
        while let Ok(e) = dev.client.events.try_recv() {
            dev.on_event(e);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dev.drain(total, Duration::from_secs(4), Duration::from_secs(60))
        .await;
    let (code, log) = stopping.unwrap().join().unwrap();
    assert_eq!(code, Some(0), "{log}");
    let last = log.lines().rev().find(|l| l.contains("Stopped.")).unwrap();
    eprintln!("hub a: {last}");
    assert!(last.contains(" shed=0 "), "hub a dropped messages: {last}");
    // It stopped taking batches half-way.
    assert!(!last.contains(" received=200 "), "{last}");
    assert!(!log.contains("Parked audit batches dropped"), "{log}");
    assert_eq!(dev.resends, 0, "acks {:?}", dev.acks);
    assert_store_is(&fleet, &dev, total);
    let (code, log) = b.terminate();
    assert_eq!(code, Some(0), "{log}");
    stop.cancel();
}

/// `GET path` on `addr`: the status line and the body.
fn http_get(addr: &str, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_its_metrics_on_listen() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let fleet = Fleet::new(&[("dev-A", &key)]);
    let addr = format!("127.0.0.1:{}", free_port());
    let toml = std::fs::read_to_string(fleet.dir().join("hub.toml")).unwrap();
    std::fs::write(
        fleet.dir().join("hub-metrics.toml"),
        format!("{toml}listen = \"{addr}\"\n"),
    )
    .unwrap();
    let hub = fleet.start_hub_with("m", "hub-metrics.toml");
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 25, &stop).await;
    dev.limits.max_records = 20;
    let total = dev.append(100);
    dev.publish_raw(dev.topics.audit().to_string(), b"{not json".to_vec())
        .await;
    dev.send_from_cursor().await;
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(30))
        .await;
    // The devices' gauges come from the store every few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (status, body) = http_get(&addr, "GET /metrics HTTP/1.1\r\nHost: hub\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if body.contains(&format!(
            "outpost_hub_device_acked_seq{{device=\"dev-A\"}} {total}"
        )) {
            break body;
        }
        assert!(Instant::now() < deadline, "no device gauge:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for line in [
        format!("outpost_hub_records_stored_total {total}"),
        "outpost_hub_batches_refused_total{reason=\"malformed\"} 1".to_string(),
        "outpost_hub_batches_refused_total{reason=\"too_large\"} 0".to_string(),
        "outpost_hub_alerts_total{kind=\"fork\"} 0".to_string(),
        "# TYPE outpost_hub_store_transaction_seconds histogram".to_string(),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    let count = body
        .lines()
        .find_map(|l| l.strip_prefix("outpost_hub_store_transaction_seconds_count "))
        .unwrap();
    assert!(count.parse::<u64>().unwrap() >= 1, "{body}");
    // Anything but GET /metrics is refused, and the hub goes on.
    assert_eq!(
        http_get(&addr, "GET / HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_get(&addr, "DELETE /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        http_get(&addr, "hello\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
    let (code, log) = hub.terminate();
    assert_eq!(code, Some(0), "{log}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_postgres_rides_out_its_connections_being_killed() {
    if mosquitto().is_none() {
        return;
    }
    let key = KeyPair::generate().unwrap();
    let Some(fleet) = Fleet::on_postgres(&[("dev-A", &key)]) else {
        return;
    };
    let hub = fleet.start_hub("a");
    let stop = CancellationToken::new();
    let mut dev = Device::connect(&fleet, "dev-A", &key, 50, &stop).await;
    dev.limits.max_records = 20;
    dev.on_ack = Some(check_acks_against(fleet.pg.as_ref().unwrap()));
    let total = dev.append(300);
    dev.send_from_cursor().await;
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(30))
        .await;
    // Every session the hub holds is ended by the server (as a database restart does).
    let url = fleet.pg.as_ref().unwrap().url().to_string();
    let killed: i64 = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
    })
    .join()
    .unwrap();
    assert!(killed > 0, "the hub held no connection");
    let total = dev.append(300);
    dev.send_from_cursor().await;
    dev.drain(total, Duration::from_secs(2), Duration::from_secs(30))
        .await;
    assert_store_holds(&fleet, &dev, total);
    let (code, log) = hub.terminate();
    assert_eq!(code, Some(0), "{log}");
    stop.cancel();
}
