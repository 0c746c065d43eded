//! Sync end to end, as a fleet runs it: `outpost-hub pki init`, `devices enroll` with the
//! device's real audit key, a real Mosquitto started from `outpost-hub broker-config` (TLS,
//! per-device ACL), `outpost-hub serve`, and `outpost daemon` with `[sync]`. Records are
//! written while brokers, agents and hubs are killed; at the end the hub holds every record
//! of the device exactly once, in order, with the same hashes, and its chain verifies.
//! Without Mosquitto these tests skip with a printed reason, except under `CI=true`. The same
//! fleet also runs on RabbitMQ's MQTT plugin (`Fleet::rabbitmq`, tests in `brokers.rs`).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_engine::testing::GgufBuilder;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tempfile::TempDir;

use crate::daemon::Agent;
use crate::support::{Device, Run, Tmpfs, skip, workspace_bin};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// RabbitMQ's own start script (the one in /usr/sbin switches to the rabbitmq user).
const RABBITMQ: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
pub(crate) const DEVICE: &str = "edge-1";

/// Which broker the fleet runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BrokerKind {
    Mosquitto,
    /// A RabbitMQ node of the test's own (MQTT plugin, TLS, certificate logins).
    RabbitMq,
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) on drop; with `group`, its whole process group (a
/// start script and the server it runs).
pub(crate) struct Proc {
    child: Child,
    log: PathBuf,
    group: bool,
}

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
            group: false,
        }
    }

    /// Spawns `cmd` as the leader of a new process group, signalled as a whole.
    fn spawn_group(cmd: &mut Command, log: &Path) -> Proc {
        let mut p = Proc::spawn(cmd.process_group(0), log);
        p.group = true;
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn signal(&self, sig: &str) {
        let target = if self.group {
            format!("-{}", self.child.id())
        } else {
            self.child.id().to_string()
        };
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), "--", &target])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {target}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cloud side: PKI, a hub data directory, a broker and hub processes.
pub(crate) struct Fleet {
    pub(crate) dir: TempDir,
    port: u16,
    kind: BrokerKind,
    /// RabbitMQ's distribution port (the node's name is `outpost-<port>@localhost`).
    dist_port: u16,
    broker: Option<Proc>,
    hub: Option<Proc>,
}

impl Fleet {
    pub(crate) fn new() -> Option<Fleet> {
        Fleet::on(BrokerKind::Mosquitto)
    }

    /// The fleet on a RabbitMQ node of its own; the hub without shared subscriptions.
    pub(crate) fn rabbitmq() -> Option<Fleet> {
        Fleet::on(BrokerKind::RabbitMq)
    }

    fn on(kind: BrokerKind) -> Option<Fleet> {
        let server = match kind {
            BrokerKind::Mosquitto => MOSQUITTO,
            BrokerKind::RabbitMq => RABBITMQ,
        };
        if !Path::new(server).exists() {
            return skip(&format!("{server} is not installed"));
        }
        let f = Fleet {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            kind,
            dist_port: free_port(),
            broker: None,
            hub: None,
        };
        // Before the config exists: loading it checks the files it names.
        f.hub_run(false, &["pki", "init", "--out", f.pki().to_str().unwrap()])
            .ok();
        let conf = format!(
            "[hub]\ndata_dir = \"{}\"\nbroker = \"mqtts://127.0.0.1:{}\"\nca = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\nshared_subscriptions = {}\n",
            f.hub_data().display(),
            f.port,
            f.pki().join("ca.pem").display(),
            f.pki().join("hub.pem").display(),
            f.pki().join("hub.key").display(),
            kind == BrokerKind::Mosquitto,
        );
        std::fs::write(f.hub_config(), conf).unwrap();
        Some(f)
    }

    /// The broker's TLS port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
    pub(crate) fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }
    pub(crate) fn hub_data(&self) -> PathBuf {
        self.dir.path().join("hub-data")
    }
    fn hub_config(&self) -> PathBuf {
        self.dir.path().join("hub.toml")
    }

    pub(crate) fn hub_cli(&self, args: &[&str]) -> Run {
        self.hub_run(true, args)
    }

    fn hub_run(&self, with_config: bool, args: &[&str]) -> Run {
        let mut cmd = Command::new(workspace_bin("outpost-hub"));
        if with_config {
            cmd.arg("--config").arg(self.hub_config());
        }
        let out = cmd.args(args).output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Enrolls the agent's device with its real audit key and gives its config a `[sync]`.
    pub(crate) fn enroll(&self, agent: &Agent, extra_sync: &str) {
        self.enroll_as(agent, DEVICE, extra_sync);
    }

    /// [`Fleet::enroll`] as device `id` in group `lab` (the agent's config says so too).
    fn enroll_as(&self, agent: &Agent, id: &str, extra_sync: &str) {
        if id != "edge-1" {
            let config = std::fs::read_to_string(&agent.d.config).unwrap();
            std::fs::write(
                &agent.d.config,
                config.replace("id = \"edge-1\"\n", &format!("id = \"{id}\"\n")),
            )
            .unwrap();
        }
        let key = self.dir.path().join(format!("{id}.audit.pem"));
        std::fs::write(&key, agent.d.run(&["keys", "device"]).ok()).unwrap();
        let out = self.dir.path().join("devices");
        self.hub_cli(&[
            "devices",
            "enroll",
            "--id",
            id,
            "--group",
            "lab",
            "--audit-key",
            key.to_str().unwrap(),
            "--pki",
            self.pki().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .ok();
        let mut config = OpenOptions::new()
            .append(true)
            .open(&agent.d.config)
            .unwrap();
        write!(
            config,
            "\n[sync]\nbroker = \"mqtts://127.0.0.1:{}\"\nca = \"{}\"\ncert = \"{}\"\n\
             key = \"{}\"\n{extra_sync}\n",
            self.port,
            out.join("ca.pem").display(),
            out.join(format!("{id}.pem")).display(),
            out.join(format!("{id}.key")).display(),
        )
        .unwrap();
    }

    pub(crate) fn start_broker(&mut self) {
        if self.kind == BrokerKind::RabbitMq {
            return self.start_rabbitmq();
        }
        let conf_dir = self.dir.path().join("broker");
        if !conf_dir.join("mosquitto.conf").exists() {
            self.hub_cli(&[
                "broker-config",
                "--pki",
                self.pki().to_str().unwrap(),
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--out",
                conf_dir.to_str().unwrap(),
            ])
            .ok();
        }
        let log = self.dir.path().join("mosquitto.log");
        let broker = Proc::spawn(
            Command::new(MOSQUITTO)
                .arg("-c")
                .arg(conf_dir.join("mosquitto.conf")),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen: {}",
                broker.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self.broker = Some(broker);
    }

    /// A RabbitMQ node from `broker-config --broker rabbitmq`'s files, with its database,
    /// logs and Erlang cookie in the fleet's folder (kept across restarts, as a server's).
    fn start_rabbitmq(&mut self) {
        let conf_dir = self.dir.path().join("broker");
        if !conf_dir.join("rabbitmq.conf").exists() {
            self.hub_cli(&[
                "broker-config",
                "--broker",
                "rabbitmq",
                "--pki",
                self.pki().to_str().unwrap(),
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--out",
                conf_dir.to_str().unwrap(),
            ])
            .ok();
        }
        let node = self.dir.path().join("rabbitmq");
        let log = self.dir.path().join("rabbitmq.stderr");
        let path = |name: &str| node.join(name);
        std::fs::create_dir_all(&node).unwrap();
        let broker = Proc::spawn_group(
            Command::new(RABBITMQ)
                .env("HOME", &node)
                .env(
                    "RABBITMQ_NODENAME",
                    format!("outpost-{}@localhost", self.port),
                )
                .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
                .env("RABBITMQ_CONFIG_FILE", conf_dir.join("rabbitmq"))
                .env(
                    "RABBITMQ_ENABLED_PLUGINS_FILE",
                    conf_dir.join("enabled_plugins"),
                )
                .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
                .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
                .env("RABBITMQ_LOG_BASE", path("log"))
                .env("RABBITMQ_LOGS", self.dir.path().join("rabbitmq.log"))
                .env("RABBITMQ_PID_FILE", path("pid"))
                .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
                .env("RABBITMQ_PLUGINS_EXPAND_DIR", path("plugins"))
                .env("RABBITMQ_QUORUM_DIR", path("quorum"))
                .env("RABBITMQ_STREAM_DIR", path("stream")),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rabbitmq did not listen: {}\n{}",
                broker.log(),
                tail(
                    &std::fs::read_to_string(self.dir.path().join("rabbitmq.log"))
                        .unwrap_or_default(),
                    30
                )
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.broker = Some(broker);
    }

    pub(crate) fn kill_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.signal("KILL");
        }
    }

    pub(crate) fn start_hub(&mut self) {
        let log = self.dir.path().join("hub.log");
        let hub = Proc::spawn(
            Command::new(workspace_bin("outpost-hub"))
                .arg("--config")
                .arg(self.hub_config())
                .arg("serve"),
            &log,
        );
        self.hub = Some(hub);
    }

    pub(crate) fn kill_hub(&mut self) {
        if let Some(h) = self.hub.take() {
            h.signal("KILL");
        }
    }

    /// The hub's copy of the device's chain: (seq, hash) in seq order.
    fn hub_records(&self) -> Vec<(u64, String)> {
        let path = self.hub_data().join("hub.db");
        let Ok(c) = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
            return Vec::new();
        };
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        let Ok(mut stmt) =
            c.prepare("SELECT seq, hash FROM audit_records WHERE device_id = ?1 ORDER BY seq")
        else {
            return Vec::new();
        };
        stmt.query_map([DEVICE], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    pub(crate) fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let broker = match self.kind {
            BrokerKind::Mosquitto => "mosquitto.log",
            BrokerKind::RabbitMq => "rabbitmq.log",
        };
        format!(
            "--- hub.log (tail)\n{}\n--- {broker} (tail)\n{}",
            tail(&read("hub.log"), 40),
            tail(&read(broker), 20)
        )
    }
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The device's chain: (seq, hash) in seq order, read from its audit.db.
pub(crate) fn device_records(agent: &Agent) -> Vec<(u64, String)> {
    let c = Connection::open_with_flags(
        agent.d.data.join("audit.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut stmt = c
        .prepare("SELECT seq, hash FROM records ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

pub(crate) fn sync_status(agent: &Agent) -> Value {
    agent.d.run(&["sync", "status", "--json"]).json()
}

/// Waits until the hub holds every record the device has (the device's cursor says so too)
/// and the newest checkpoint the device signed over them, then checks the hub's copy: every
/// seq once, from 1, in order, with the device's hashes, verifying against the enrolled key.
pub(crate) fn assert_drained(fleet: &Fleet, agent: &Agent, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let device = device_records(agent);
        let status = sync_status(agent);
        let hub = fleet.hub_records();
        let last = device.last().map_or(0, |r| r.0);
        let newest_checkpoint = device_checkpoints(agent).last().copied().unwrap_or(0);
        let mut report = Value::Null;
        if status["last_acked_seq"] == last && hub.len() as u64 == last {
            assert_eq!(status["pending_records"], 0, "{status}");
            assert_eq!(
                hub, device,
                "the hub's copy differs from the device's chain"
            );
            // The hub's copy verifies on its own, against the key the device enrolled with,
            // and the device's newest checkpoint reached it (it goes up on its own once the
            // records are acknowledged).
            report = fleet
                .hub_cli(&["audit", "verify", "--device", DEVICE, "--json"])
                .json();
            assert_eq!(report["ok"], true, "{report}");
            assert_eq!(report["records"], last, "{report}");
            if report["signed_through"] == newest_checkpoint {
                eprintln!("drained {last} records; the hub's copy verifies");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not drained after {limit:?}: device at seq {last} (newest checkpoint \
             {newest_checkpoint}), hub holds {} records, status {status}, hub verify \
             {report}\n{}\n--- agent log (tail)\n{}",
            hub.len(),
            fleet.logs(),
            tail(&agent.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The seqs of the device's checkpoints.
fn device_checkpoints(agent: &Agent) -> Vec<u64> {
    let c = Connection::open_with_flags(
        agent.d.data.join("audit.db"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut stmt = c
        .prepare("SELECT seq FROM checkpoints ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok(r.get::<_, i64>(0)? as u64))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Appends `count` records to the agent's audit log from another process (the audit log
/// takes appends from several processes into one chain).
pub(crate) fn append_records(agent: &Agent, count: u64) {
    let out = Command::new(workspace_bin("audit-writer"))
        .arg(&agent.d.data)
        .arg(DEVICE)
        .arg(count.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit-writer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An audit-writer appending until killed.
pub(crate) fn writer(agent: &Agent) -> Proc {
    let log = agent.d.root.path().join("writer.log");
    Proc::spawn(
        Command::new(workspace_bin("audit-writer"))
            .arg(&agent.d.data)
            .arg(DEVICE),
        &log,
    )
}

pub(crate) fn agent(fleet: &Fleet, extra_sync: &str) -> Agent {
    let agent = Agent::new("");
    fleet.enroll(&agent, extra_sync);
    agent
}

#[test]
fn records_reach_the_hub_once_in_order_and_the_status_and_metrics_say_so() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    fleet.start_broker();
    fleet.start_hub();
    let mut agent = agent(&fleet, "telemetry_interval_secs = 1");
    agent.start();
    append_records(&agent, 1234);
    assert_drained(&fleet, &agent, Duration::from_secs(60));
    let status = sync_status(&agent);
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["daemon_running"], true, "{status}");

    let token = agent.token("ops", "operator", &[]);
    let metrics = agent.request("GET", "/metrics", Some(&token), None);
    let text = metrics.text();
    for line in ["outpost_sync_connected 1", "outpost_sync_pending_records 0"] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    let acked = status["last_acked_seq"].as_u64().unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("outpost_sync_acked_seq {acked}")),
        "{text}"
    );

    // The hub knows the device: online, its version, its lag.
    let devices = fleet.hub_cli(&["devices", "list", "--json"]).json();
    let d = &devices[0];
    assert_eq!(d["id"], DEVICE, "{devices}");
    assert_eq!(d["online"], true, "{devices}");
    assert!(d["acked_seq"].as_u64().unwrap() >= acked, "{devices}");

    // SIGTERM: the daemon flushes and stops cleanly; the broker then holds its offline
    // status (the hub records it).
    agent.signal("TERM");
    assert_eq!(
        agent.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        agent.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let devices = fleet.hub_cli(&["devices", "list", "--json"]).json();
        if devices[0]["online"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still online: {devices}\n{}",
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_device_offline_with_a_large_backlog_drains_it_while_writing_more() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    let mut agent = agent(&fleet, "");
    // 100,000 records written while no broker exists.
    append_records(&agent, 100_000);
    agent.start();
    std::thread::sleep(Duration::from_secs(1));
    let status = sync_status(&agent);
    assert_eq!(status["connected"], false, "{status}");
    assert!(
        status["pending_records"].as_u64().unwrap() >= 100_000,
        "{status}"
    );
    fleet.start_broker();
    fleet.start_hub();
    let w = writer(&agent);
    std::thread::sleep(Duration::from_secs(3));
    w.signal("KILL");
    drop(w);
    assert_drained(&fleet, &agent, Duration::from_secs(240));
}

#[test]
fn broker_restarts_lose_nothing_while_records_are_written() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    fleet.start_broker();
    fleet.start_hub();
    let mut agent = agent(&fleet, "");
    agent.start();
    let w = writer(&agent);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1500));
        fleet.kill_broker();
        std::thread::sleep(Duration::from_millis(700));
        fleet.start_broker();
    }
    w.signal("KILL");
    drop(w);
    assert_drained(&fleet, &agent, Duration::from_secs(120));
    let status = sync_status(&agent);
    assert!(status["last_error"].is_string(), "{status}");
}

#[test]
fn agents_and_hubs_killed_mid_sync_lose_and_duplicate_nothing() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    fleet.start_broker();
    fleet.start_hub();
    let mut agent = agent(&fleet, "batch_max_records = 50");
    append_records(&agent, 20_000);
    agent.start();
    let w = writer(&agent);
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(700));
        if round % 2 == 0 {
            agent.signal("KILL");
            let _ = agent.wait(Duration::from_secs(5));
            agent.start();
        } else {
            fleet.kill_hub();
            std::thread::sleep(Duration::from_millis(300));
            fleet.start_hub();
        }
    }
    w.signal("KILL");
    drop(w);
    assert_drained(&fleet, &agent, Duration::from_secs(180));
}

#[test]
fn a_device_that_lost_its_outbox_or_a_hub_restored_from_an_old_copy_catch_up() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    fleet.start_broker();
    fleet.start_hub();
    let mut agent = agent(&fleet, "");
    agent.start();
    append_records(&agent, 3000);
    assert_drained(&fleet, &agent, Duration::from_secs(60));

    // The device loses outbox.db (its cursor): it starts again from seq 1, the hub answers
    // with its head, and the device's cursor catches up without a record stored twice.
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(5));
    std::fs::remove_file(agent.d.data.join("outbox.db")).unwrap();
    agent.start();
    append_records(&agent, 500);
    assert_drained(&fleet, &agent, Duration::from_secs(60));

    // The hub is restored from a copy taken now, more records are acked, then the copy comes
    // back: the device sends again what the hub lost, from the hub's head.
    fleet.kill_hub();
    let db = fleet.hub_data().join("hub.db");
    let old = fleet.dir.path().join("hub.db.old");
    copy_db(&db, &old);
    fleet.start_hub();
    append_records(&agent, 2000);
    assert_drained(&fleet, &agent, Duration::from_secs(60));
    fleet.kill_hub();
    copy_db(&old, &db);
    let head_before = fleet.hub_records().len();
    fleet.start_hub();
    append_records(&agent, 100);
    assert_drained(&fleet, &agent, Duration::from_secs(120));
    assert!(
        head_before < device_records(&agent).len() - 2000,
        "{head_before}"
    );
}

/// Copies a SQLite database file with its WAL (the source is not open for writing).
fn copy_db(from: &Path, to: &Path) {
    for suffix in ["", "-wal"] {
        let (f, t) = (
            PathBuf::from(format!("{}{suffix}", from.display())),
            PathBuf::from(format!("{}{suffix}", to.display())),
        );
        let _ = std::fs::remove_file(&t);
        if f.exists() {
            std::fs::copy(&f, &t).unwrap();
        }
    }
    let _ = std::fs::remove_file(format!("{}-shm", to.display()));
}

#[test]
fn a_malformed_ack_is_refused_and_audited_and_sync_goes_on() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    fleet.start_broker();
    fleet.start_hub();
    let mut agent = agent(&fleet, "");
    agent.start();
    append_records(&agent, 10);
    assert_drained(&fleet, &agent, Duration::from_secs(60));
    // Only the hub may publish acks (the ACL): with its certificate, three bad ones.
    let pki = fleet.pki();
    for payload in [
        "not json",
        r#"{"v":2,"device_id":"edge-1","acked_seq":999999}"#,
        r#"{"v":1,"device_id":"edge-2","acked_seq":999999}"#,
    ] {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &fleet.port.to_string(), "-q", "1"])
            .args([
                "-i",
                "hostile-hub",
                "-t",
                "outpost/v1/devices/edge-1/audit/ack",
            ])
            .arg("--cafile")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("hub.pem"))
            .arg("--key")
            .arg(pki.join("hub.key"))
            .args(["-m", payload])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mosquitto_pub failed");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let records = agent
            .d
            .run(&["audit", "query", "--action", "sync:receive", "--json"])
            .json();
        if let Some(r) = records.as_array().and_then(|a| a.first()) {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no audit record of the refusal");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(refused["outcome"], "denied", "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().contains("malformed"),
        "{refused}"
    );
    // Nothing moved the cursor past what was stored, and sync goes on.
    append_records(&agent, 10);
    assert_drained(&fleet, &agent, Duration::from_secs(60));
}

#[test]
fn a_signed_rollout_reaches_the_daemon_and_a_forged_one_is_refused_and_audited() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    let mut agent = Agent::new("");
    // The administrator's release key and a forger's, made as the docs say.
    let keys = fleet.dir.path().join("release");
    for name in ["release-1", "forger"] {
        agent
            .d
            .run(&[
                "keys",
                "generate",
                "--out",
                keys.to_str().unwrap(),
                "--name",
                name,
            ])
            .ok();
    }
    let config = std::fs::read_to_string(&agent.d.config).unwrap();
    std::fs::write(
        &agent.d.config,
        config.replace("id = \"edge-1\"\n", "id = \"edge-1\"\ngroups = [\"lab\"]\n"),
    )
    .unwrap();
    fleet.enroll(
        &agent,
        &format!(
            "[[sync.release_keys]]\nkid = \"release-1\"\npublic_key = \"{}\"",
            keys.join("release-1.pub.pem").display()
        ),
    );
    // The broker's ACL lists each enrolled device's groups: it starts after the enrollment.
    fleet.start_broker();
    fleet.start_hub();
    let model = fleet.dir.path().join("tiny.gguf");
    std::fs::write(&model, GgufBuilder::tiny_llama().build()).unwrap();
    let key = |name: &str| keys.join(format!("{name}.key.pem"));
    let manifest = fleet
        .hub_cli(&[
            "models",
            "publish",
            model.to_str().unwrap(),
            "--name",
            "tiny",
            "--version",
            "1",
            "--key",
            key("release-1").to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .json();
    assert_eq!(manifest["architecture"], "llama", "{manifest}");
    let start = |target: &str, signer: &str| {
        fleet
            .hub_cli(&[
                "rollout",
                "start",
                "--model",
                "tiny:1",
                "--target",
                target,
                "--key",
                key(signer).to_str().unwrap(),
                "--kid",
                "release-1",
            ])
            .json()
    };
    assert_eq!(start("group:lab", "release-1")["rollout"], 1);
    agent.start();

    let desired = |outcome: &str| -> Vec<Value> {
        let records = agent
            .d
            .run(&["audit", "query", "--action", "sync:desired", "--json"])
            .json();
        records
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["outcome"] == outcome)
            .cloned()
            .collect()
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}\n{}", fleet.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("the rollout accepted and audited", &|| {
        !desired("allowed").is_empty()
    });
    let accepted = &desired("allowed")[0];
    assert_eq!(accepted["details"]["rollout"], 1, "{accepted}");
    assert_eq!(accepted["resource"], "outpost/v1/groups/lab/state/desired");
    let reason = |id: usize| {
        fleet.hub_cli(&["rollout", "status", "--json"]).json()["rollouts"][id]["devices"][0]
            ["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // The device downloads and installs the (tiny) model at once and, without `--activate`,
    // reports it staged; before that it reported the accepted document and its download.
    wait("the hub sees the device staged in rollout 1", &|| {
        reason(0) == "installed; the desired state does not ask to activate it"
    });
    let state = fleet.hub_cli(&["rollout", "status", "--json"]).json()["rollouts"][0]["devices"][0]
        ["state"]
        .clone();
    assert_eq!(state, "staged");
    let status = sync_status(&agent);
    assert_eq!(
        status["desired"],
        serde_json::json!({"rollout": 1, "target": "group:lab", "version": 1, "model": "tiny:1"}),
        "{status}"
    );

    // A rollout for the device itself, signed with a key it does not pin under the pinned
    // kid: refused and audited; the device still follows the group's document.
    assert_eq!(start("device:edge-1", "forger")["rollout"], 2);
    wait("the forged rollout refused and audited", &|| {
        !desired("denied").is_empty()
    });
    let refused = &desired("denied")[0];
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("the signature of key release-1 does not verify"),
        "{refused}"
    );
    assert_eq!(refused["details"]["refusal"], "bad_signature");
    assert_eq!(
        reason(1),
        "the device follows rollout 1 (group:lab)",
        "{}",
        fleet.logs()
    );
}

/// An agent enrolled as `id` in group `lab`, pinning `keys/release-1.pub.pem`, with the
/// models in `models` imported by hand (version 1 each); the first becomes `default`.
fn lab_agent(fleet: &Fleet, id: &str, keys: &Path, models: &[(&Path, &str)]) -> Agent {
    let agent = Agent::new("");
    let config = std::fs::read_to_string(&agent.d.config).unwrap();
    std::fs::write(
        &agent.d.config,
        config.replace("id = \"edge-1\"\n", "id = \"edge-1\"\ngroups = [\"lab\"]\n"),
    )
    .unwrap();
    fleet.enroll_as(
        &agent,
        id,
        &format!(
            "[[sync.release_keys]]\nkid = \"release-1\"\npublic_key = \"{}\"",
            keys.join("release-1.pub.pem").display()
        ),
    );
    for (i, (file, name)) in models.iter().enumerate() {
        agent.add_model(file, name, i == 0);
    }
    agent
}

/// The device's audit records of `action`, as `audit query --json` prints them.
fn device_audit(agent: &Agent, action: &str) -> Vec<Value> {
    agent
        .d
        .run(&["audit", "query", "--action", action, "--json"])
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn rollouts_activate_healthy_models_and_a_failing_one_keeps_the_old_and_halts_the_batch() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    let Some(smollm2) = crate::support::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let keys = fleet.dir.path().join("release");
    Agent::new("")
        .d
        .run(&[
            "keys",
            "generate",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            "release-1",
        ])
        .ok();
    // The model before the rollouts, a healthy release (the real SmolLM2) and a bad one
    // (weights full of NaN: it loads, and its health check fails).
    let tiny = fleet.dir.path().join("tiny.gguf");
    std::fs::write(&tiny, GgufBuilder::tiny_llama().build()).unwrap();
    let bad = fleet.dir.path().join("bad.gguf");
    std::fs::write(&bad, GgufBuilder::tiny_llama().poison_with_nan().build()).unwrap();
    // Here the releases are on the devices already (imported by hand under the manifest's
    // name and version, so with the same bytes): no download, activation only. The download
    // is covered by `a_rollout_of_smollm2_to_three_agents_downloads_installs_and_activates_on_each`.
    let models = [
        (tiny.as_path(), "tiny"),
        (&smollm2, "smollm2"),
        (&bad, "bad"),
    ];
    let mut one = lab_agent(&fleet, "edge-1", &keys, &models);
    let mut two = lab_agent(&fleet, "edge-2", &keys, &models);
    fleet.start_broker();
    fleet.start_hub();
    let key = keys.join("release-1.key.pem");
    for (file, name) in [(&smollm2, "smollm2"), (&bad, "bad")] {
        fleet
            .hub_cli(&[
                "models",
                "publish",
                file.to_str().unwrap(),
                "--name",
                name,
                "--version",
                "1",
                "--key",
                key.to_str().unwrap(),
                "--kid",
                "release-1",
            ])
            .json();
    }
    let start = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "rollout",
            "start",
            "--model",
            model,
            "--target",
            "group:lab",
            "--activate",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ];
        args.extend_from_slice(extra);
        fleet.hub_cli(&args).json()["rollout"].as_u64().unwrap()
    };
    let status = |id: u64| -> Value {
        fleet
            .hub_cli(&["rollout", "status", &id.to_string(), "--json"])
            .json()["rollouts"][0]
            .clone()
    };
    let wait = |what: &str, limit: u64, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(limit);
        while !done() {
            assert!(Instant::now() < deadline, "{what}\n{}", fleet.logs());
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    one.start();
    two.start();
    let default_model = |a: &Agent| -> String {
        a.d.run(&["models", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .iter()
            .find(|m| {
                m["aliases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "default")
            })
            .map(|m| {
                format!(
                    "{}:{}",
                    m["name"].as_str().unwrap(),
                    m["version"].as_str().unwrap()
                )
            })
            .unwrap_or_default()
    };

    // 1. The healthy release to the whole group: each device loads it, checks it, switches.
    let first = start("smollm2:1", &[]);
    wait("both devices active in rollout 1", 120, &|| {
        status(first)["state"] == "done"
    });
    let s = status(first);
    for d in s["devices"].as_array().unwrap() {
        assert_eq!(d["state"], "active", "{s}");
        assert_eq!(d["progress"], 1.0, "{s}");
        assert_eq!(d["reason"], "'default' points at smollm2:1", "{s}");
    }
    for a in [&one, &two] {
        assert_eq!(default_model(a), "smollm2:1");
        let activated = device_audit(a, "models:activate");
        let outcome = activated
            .iter()
            .find(|r| r["outcome"] == "success" && r["actor"] == "outpost-sync")
            .unwrap_or_else(|| panic!("no activation by sync: {activated:?}"));
        assert_eq!(outcome["details"]["rollout"], first);
        assert!(
            outcome["reason"].as_str().unwrap().starts_with(
                "activated: 'default' now points at smollm2:1 (health check passed in"
            ),
            "{outcome}"
        );
    }

    // 2. The bad release, phased: one device per batch, no failure allowed.
    let second = start("bad:1", &["--batch", "50"]);
    wait(
        "rollout 2 halted after its first device failed",
        60,
        &|| status(second)["state"] == "halted",
    );
    let s = status(second);
    let (d1, d2) = (&s["devices"][0], &s["devices"][1]);
    assert_eq!(
        (d1["id"].as_str(), d1["state"].as_str()),
        (Some("edge-1"), Some("failed")),
        "{s}"
    );
    let reason = d1["reason"].as_str().unwrap();
    assert!(
        reason.contains("bad:1 failed its health check")
            && reason.ends_with("the previous model keeps serving"),
        "{reason}"
    );
    assert_eq!(
        (d2["id"].as_str(), d2["state"].as_str(), &d2["released"]),
        (Some("edge-2"), Some("pending"), &Value::Bool(false)),
        "{s}"
    );
    // The failing device still serves the model it had, and says so.
    assert_eq!(default_model(&one), "smollm2:1");
    let t = one.token("olivia", "operator", &[]);
    let r = one.request(
        "POST",
        "/v1/chat/completions",
        Some(&t),
        Some(
            &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "temperature": 0}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "smollm2:1");
    let failures: Vec<Value> = device_audit(&one, "models:activate")
        .into_iter()
        .filter(|r| r["outcome"] == "failure" && r["actor"] == "outpost-sync")
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["details"]["rollout"], second);
    // The second batch never went out: edge-2 did not even see the document.
    assert!(
        device_audit(&two, "sync:desired")
            .iter()
            .all(|r| r["details"]["rollout"] != second),
        "edge-2 received rollout {second}"
    );
    assert_eq!(default_model(&two), "smollm2:1");

    // A restart does not try the failed model again.
    one.signal("TERM");
    assert_eq!(one.wait(Duration::from_secs(30)), Some(0), "{}", one.log());
    one.start();
    wait("edge-1 back online", 30, &|| {
        sync_status(&one)["connected"] == true
    });
    std::thread::sleep(Duration::from_secs(6));
    let attempts = device_audit(&one, "models:activate")
        .iter()
        .filter(|r| r["outcome"] == "allowed" && r["details"]["rollout"] == second)
        .count();
    assert_eq!(attempts, 1, "tried again after a restart:\n{}", one.log());
    assert_eq!(status(second)["devices"][0]["state"], "failed");
}

// ---------------------------------------------------------------------------------------------
// Model rollouts: chunked download, resume, install (sync part 2)

/// A download as the device's `outbox.db` records it: (chunks done, chunks, state,
/// chunks rejected).
fn transfer_row(agent: &Agent) -> Option<(u64, u64, String, u64)> {
    let path = agent.d.data.join("outbox.db");
    let c = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(
        "SELECT bitmap, chunks, state, chunks_rejected FROM transfers",
        [],
        |r| {
            let bitmap: Vec<u8> = r.get(0)?;
            let done = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
            Ok((
                done,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
                r.get::<_, i64>(3)? as u64,
            ))
        },
    )
    .ok()
}

/// Chunks the device has verified and recorded.
fn done(agent: &Agent) -> u64 {
    transfer_row(agent).map_or(0, |r| r.0)
}

/// Chunk requests the hub received from the device (all blobs), as `hub.db` counts them.
fn hub_chunk_requests(fleet: &Fleet) -> u64 {
    let path = fleet.hub_data().join("hub.db");
    let Ok(c) = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(
        "SELECT coalesce(sum(chunks_requested), 0) FROM blob_requests WHERE device_id = ?1",
        [DEVICE],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |n| n as u64)
}

/// The `sync:transfer` steps in the agent's audit log, in order.
fn transfer_steps(agent: &Agent) -> Vec<String> {
    let records = agent
        .d
        .run(&["audit", "query", "--action", "sync:transfer", "--json"])
        .json();
    records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["details"]["step"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// A fleet with one agent in group `lab` pinning `release-1`, the hub serving chunks as fast
/// as asked (`hub_extra` adds `[hub]` lines), `model` published in chunks of `chunk_size` as
/// `name:1` and rolled out to the group. Returns the fleet, the agent (not started), the
/// manifest.
fn rollout_fleet(
    model: &Path,
    name: &str,
    chunk_size: u64,
    sync_extra: &str,
    hub_extra: &str,
    before_rollout: &dyn Fn(&Fleet),
) -> Option<(Fleet, Agent, Value)> {
    let agent = Agent::new("");
    rollout_fleet_on(
        agent,
        model,
        name,
        chunk_size,
        sync_extra,
        hub_extra,
        before_rollout,
    )
}

/// [`rollout_fleet`] with a given agent (e.g. one whose data directory is a small mount).
fn rollout_fleet_on(
    agent: Agent,
    model: &Path,
    name: &str,
    chunk_size: u64,
    sync_extra: &str,
    hub_extra: &str,
    before_rollout: &dyn Fn(&Fleet),
) -> Option<(Fleet, Agent, Value)> {
    let mut fleet = Fleet::new()?;
    let mut hub_conf = std::fs::read_to_string(fleet.hub_config()).unwrap();
    hub_conf.push_str(&format!(
        "chunk_rate = 100000\nchunk_burst = 1000\n{hub_extra}\n"
    ));
    std::fs::write(fleet.hub_config(), hub_conf).unwrap();
    let keys = fleet.dir.path().join("release");
    agent
        .d
        .run(&[
            "keys",
            "generate",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            "release-1",
        ])
        .ok();
    let config = std::fs::read_to_string(&agent.d.config).unwrap();
    std::fs::write(
        &agent.d.config,
        config.replace("id = \"edge-1\"\n", "id = \"edge-1\"\ngroups = [\"lab\"]\n"),
    )
    .unwrap();
    fleet.enroll(
        &agent,
        &format!(
            "{sync_extra}\n[[sync.release_keys]]\nkid = \"release-1\"\npublic_key = \"{}\"",
            keys.join("release-1.pub.pem").display()
        ),
    );
    fleet.start_broker();
    fleet.start_hub();
    let key = keys.join("release-1.key.pem");
    let manifest = fleet
        .hub_cli(&[
            "models",
            "publish",
            model.to_str().unwrap(),
            "--name",
            name,
            "--version",
            "1",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
            "--chunk-size",
            &chunk_size.to_string(),
        ])
        .json();
    before_rollout(&fleet);
    let started = fleet
        .hub_cli(&[
            "rollout",
            "start",
            "--model",
            &format!("{name}:1"),
            "--target",
            "group:lab",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .json();
    assert_eq!(started["rollout"], 1, "{started}");
    Some((fleet, agent, manifest))
}

fn wait_until(fleet: &Fleet, agent: &Agent, what: &str, limit: Duration, done: &dyn Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n--- agent\n{}\n{}",
            tail(&agent.log(), 40),
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rollout_of_smollm2_downloads_in_chunks_resumes_after_a_broker_outage_and_a_kill_and_installs()
{
    let Some(model) = crate::support::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    // One request in flight: the download is slow enough to interrupt at a known point,
    // and each interruption can cost at most one chunk asked for again.
    const WINDOW: u64 = 1;
    let Some((mut fleet, mut agent, manifest)) = rollout_fleet(
        &model,
        "smollm2",
        64 * 1024,
        &format!("transfer_window = {WINDOW}\ntransfer_chunk_timeout_secs = 2"),
        "",
        &|_| {},
    ) else {
        return;
    };
    let chunks = manifest["chunk_sha256"].as_array().unwrap().len() as u64;
    assert!(chunks > 1000, "{chunks} chunks");
    agent.start();

    // A broker outage a fifth of the way: nothing moves while it is down.
    wait_until(
        &fleet,
        &agent,
        "a fifth downloaded",
        Duration::from_secs(120),
        &|| done(&agent) >= chunks / 5,
    );
    fleet.kill_broker();
    std::thread::sleep(Duration::from_millis(500));
    let during = done(&agent);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(done(&agent), during, "progress without a broker");
    assert!(during < chunks, "finished before the outage");
    fleet.start_broker();

    // The agent SIGKILLed half way, then started again: it resumes from its bitmap.
    wait_until(
        &fleet,
        &agent,
        "half downloaded",
        Duration::from_secs(120),
        &|| done(&agent) >= chunks / 2,
    );
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(5));
    let at_kill = done(&agent);
    assert!(at_kill < chunks, "finished before the kill");
    agent.start();

    let sha = manifest["sha256"].as_str().unwrap().to_string();
    wait_until(
        &fleet,
        &agent,
        "verified",
        Duration::from_secs(180),
        &|| transfer_row(&agent).is_some_and(|r| r.2 != "downloading"),
    );
    wait_until(
        &fleet,
        &agent,
        "installed",
        Duration::from_secs(30),
        &|| {
            agent
                .d
                .models()
                .iter()
                .any(|(label, _)| label == "smollm2:1")
        },
    );
    // In the registry under its digest, the bytes the administrator published.
    let blob = agent.d.data.join("blobs/sha256").join(&sha);
    assert_eq!(crate::support::sha256_file(&blob), sha);
    assert_eq!(sha, crate::support::sha256_file(&model));
    let row = transfer_row(&agent).unwrap();
    assert_eq!((row.0, row.1, row.2.as_str()), (chunks, chunks, "staged"));
    // No partial file left behind.
    let downloads: Vec<_> = std::fs::read_dir(agent.d.data.join("downloads"))
        .unwrap()
        .collect();
    assert!(downloads.is_empty(), "{downloads:?}");

    // Every chunk requested once, plus at most the window again per interruption (a
    // request in flight when the broker went, and one when the agent was killed).
    wait_until(
        &fleet,
        &agent,
        "the hub's counts stored",
        Duration::from_secs(10),
        &|| hub_chunk_requests(&fleet) >= chunks,
    );
    std::thread::sleep(Duration::from_secs(1));
    let requested = hub_chunk_requests(&fleet);
    assert!(
        (chunks..=chunks + 2 * WINDOW).contains(&requested),
        "{requested} requests for {chunks} chunks"
    );
    let status = || fleet.hub_cli(&["rollout", "status", "--json"]).json();
    wait_until(
        &fleet,
        &agent,
        "the hub sees it staged",
        Duration::from_secs(20),
        &|| status()["rollouts"][0]["devices"][0]["state"] == "staged",
    );
    let status = status();
    let dev = &status["rollouts"][0]["devices"][0];
    assert_eq!(dev["chunks_requested"], requested, "{status}");
    assert_eq!(dev["progress"], 1.0, "{status}");

    // Audited: started, resumed after the kill, verified, installed.
    let steps = transfer_steps(&agent);
    for step in ["started", "resumed", "verified", "installed"] {
        assert!(steps.iter().any(|s| s == step), "no {step} in {steps:?}");
    }
    assert!(!steps.iter().any(|s| s == "chunk_rejected"), "{steps:?}");
    // The model is installed, not activated (that is the health-gated next step).
    let listed = agent.d.run(&["models", "list", "--json"]).json();
    assert_eq!(listed[0]["name"], "smollm2", "{listed}");
}

/// A device whose disk cannot hold the download refuses it before writing a byte: the
/// refusal is audited with the sizes, the hub shows the device `failed` with the reason, and
/// the registry and active model are unchanged.
#[test]
fn a_download_that_does_not_fit_on_the_disk_is_refused_before_it_starts() {
    let Some(model) = crate::support::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    // 48 MiB: room for the agent's databases and a tiny model, not for SmolLM2's 98 MB.
    let Some(fs) = Tmpfs::mount(48 << 20) else {
        return;
    };
    let agent = Agent::on(Device::with_data(fs.path().join("data")), "");
    let Some((fleet, mut agent, manifest)) =
        rollout_fleet_on(agent, &model, "smollm2", 128 << 10, "", "", &|_| {})
    else {
        return;
    };
    agent.add_tiny("before");
    let before = agent.d.models();
    let free_before = crate::support::free_bytes(fs.path());
    agent.start();
    let status = || fleet.hub_cli(&["rollout", "status", "--json"]).json();
    wait_until(
        &fleet,
        &agent,
        "the hub sees the device failed",
        Duration::from_secs(60),
        &|| status()["rollouts"][0]["devices"][0]["state"] == "failed",
    );
    let status = status();
    let reason = status["rollouts"][0]["devices"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let size = manifest["size"].as_u64().unwrap();
    assert!(
        reason.contains(&format!(
            "not enough disk space: {} bytes needed",
            size + (16 << 20)
        )),
        "{status}"
    );
    // Audited: the refusal with what was needed and what was free, then the failure.
    let steps = transfer_steps(&agent);
    assert!(!steps.iter().any(|s| s == "started"), "{steps:?}");
    let refused = device_audit(&agent, "sync:transfer")
        .into_iter()
        .find(|r| r["details"]["step"] == "refused_disk_space")
        .unwrap_or_else(|| panic!("no refusal in {steps:?}"));
    assert_eq!(refused["outcome"], "denied", "{refused}");
    let need = refused["details"]["need_bytes"].as_u64().unwrap();
    assert_eq!(need, size + (16 << 20), "{refused}");
    assert!(
        refused["details"]["free_bytes"].as_u64().unwrap() < need,
        "{refused}"
    );
    assert!(steps.iter().any(|s| s == "failed"), "{steps:?}");
    // Nothing written: no partial file, the space still free, the registry as it was.
    let partials = std::fs::read_dir(agent.d.data.join("downloads"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(partials, 0);
    assert!(
        crate::support::free_bytes(fs.path()) + (4 << 20) > free_before,
        "space used by a refused download"
    );
    assert_eq!(agent.d.models(), before);
    let r = agent.d.run(&["models", "list", "--json"]).json();
    assert_eq!(r.as_array().map(Vec::len), Some(1), "{r}");
}

#[test]
fn a_corrupted_blob_at_the_hub_is_refused_chunk_by_chunk_and_nothing_is_installed() {
    let model = std::env::temp_dir().join(format!("outpost-tiny-{}.gguf", std::process::id()));
    let tiny = GgufBuilder::tiny_llama().build();
    std::fs::write(&model, &tiny).unwrap();
    let Some((fleet, mut agent, manifest)) = rollout_fleet(&model, "tiny", 256, "", "", &|_| {})
    else {
        return;
    };
    std::fs::remove_file(&model).unwrap();
    // The hub's copy is damaged after publishing: one byte of the third chunk.
    let sha = manifest["sha256"].as_str().unwrap();
    let blob = fleet.hub_data().join("blobs/sha256").join(sha);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[2 * 256 + 10] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    agent.add_tiny("before");
    let before = agent.d.models();
    agent.start();
    wait_until(
        &fleet,
        &agent,
        "the download failed",
        Duration::from_secs(60),
        &|| transfer_row(&agent).is_some_and(|r| r.2 == "failed"),
    );
    let row = transfer_row(&agent).unwrap();
    // The bad chunk was asked for again until the limit; the others were fine.
    assert_eq!(row.3, 3, "{row:?}");
    let steps = transfer_steps(&agent);
    assert_eq!(
        steps.iter().filter(|s| *s == "chunk_rejected").count(),
        3,
        "{steps:?}"
    );
    assert!(steps.iter().any(|s| s == "failed"), "{steps:?}");
    assert!(!steps.iter().any(|s| s == "installed"), "{steps:?}");
    // Registry and active model unchanged; no partial file kept.
    assert_eq!(agent.d.models(), before);
    assert_eq!(
        std::fs::read_dir(agent.d.data.join("downloads"))
            .unwrap()
            .count(),
        0
    );
    let status = || fleet.hub_cli(&["rollout", "status", "--json"]).json();
    wait_until(
        &fleet,
        &agent,
        "the hub sees it failed",
        Duration::from_secs(20),
        &|| status()["rollouts"][0]["devices"][0]["state"] == "failed",
    );
    let status = status();
    let dev = &status["rollouts"][0]["devices"][0];
    assert!(
        dev["reason"]
            .as_str()
            .unwrap()
            .contains("chunk 2 failed its check 3 times"),
        "{status}"
    );
}

#[test]
fn a_blob_whose_whole_hash_does_not_match_its_manifest_is_refused_after_three_downloads() {
    let model = std::env::temp_dir().join(format!("outpost-tiny-w-{}.gguf", std::process::id()));
    std::fs::write(&model, GgufBuilder::tiny_llama().build()).unwrap();
    let wrong = "f".repeat(64);
    // An administrator's mistake (or a forged blob name) the chunk hashes cannot catch: a
    // manifest, properly signed, whose whole SHA-256 is not its bytes'. Made at the hub
    // between publish and rollout: re-signed with the release key, the blob under that name.
    let tamper = |fleet: &Fleet| {
        let db = Connection::open(fleet.hub_data().join("hub.db")).unwrap();
        let (sha, manifest): (String, String) = db
            .query_row("SELECT sha256, manifest_json FROM models", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let mut m: Value = serde_json::from_str(&manifest).unwrap();
        m["sha256"] = Value::from(wrong.clone());
        m.as_object_mut().unwrap().remove("signatures");
        let signed = format!(
            "outpost/v1 manifest\n{}",
            outpost_policy::jcs::to_string(&m).unwrap()
        );
        let key = outpost_policy::signing::KeyPair::load(
            &fleet.dir.path().join("release/release-1.key.pem"),
        )
        .unwrap();
        m["signatures"] =
            serde_json::json!([{"kid": "release-1", "sig": key.sign_hex(signed.as_bytes())}]);
        db.execute(
            "UPDATE models SET sha256 = ?1, manifest_json = ?2",
            rusqlite::params![wrong, m.to_string()],
        )
        .unwrap();
        let blobs = fleet.hub_data().join("blobs/sha256");
        std::fs::copy(blobs.join(&sha), blobs.join(&wrong)).unwrap();
    };
    let Some((fleet, mut agent, manifest)) = rollout_fleet(&model, "tiny", 1024, "", "", &tamper)
    else {
        return;
    };
    std::fs::remove_file(&model).unwrap();
    let chunks = manifest["chunk_sha256"].as_array().unwrap().len() as u64;
    agent.start();
    wait_until(
        &fleet,
        &agent,
        "the download failed",
        Duration::from_secs(60),
        &|| transfer_row(&agent).is_some_and(|r| r.2 == "failed"),
    );
    let steps = transfer_steps(&agent);
    assert_eq!(
        steps.iter().filter(|s| *s == "hash_mismatch").count(),
        3,
        "{steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| *s == "started").count(),
        3,
        "{steps:?}"
    );
    assert!(
        !steps.iter().any(|s| s == "verified" || s == "installed"),
        "{steps:?}"
    );
    // Nothing installed, nothing left behind; every chunk was fetched once per attempt.
    assert!(agent.d.models().is_empty(), "{:?}", agent.d.models());
    assert_eq!(
        std::fs::read_dir(agent.d.data.join("downloads"))
            .unwrap()
            .count(),
        0
    );
    wait_until(
        &fleet,
        &agent,
        "the hub's counts",
        Duration::from_secs(10),
        &|| hub_chunk_requests(&fleet) >= 3 * chunks,
    );
    assert_eq!(hub_chunk_requests(&fleet), 3 * chunks);
    let status = || fleet.hub_cli(&["rollout", "status", "--json"]).json();
    wait_until(
        &fleet,
        &agent,
        "the hub sees it failed",
        Duration::from_secs(20),
        &|| status()["rollouts"][0]["devices"][0]["state"] == "failed",
    );
    let status = status();
    assert!(
        status["rollouts"][0]["devices"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("the whole SHA-256 did not match after 3 downloads"),
        "{status}"
    );
}

#[test]
fn a_rollout_of_smollm2_to_three_agents_downloads_installs_and_activates_on_each() {
    let Some(smollm2) = crate::support::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    let mut hub_conf = std::fs::read_to_string(fleet.hub_config()).unwrap();
    hub_conf.push_str("chunk_rate = 100000\nchunk_burst = 1000\n");
    std::fs::write(fleet.hub_config(), hub_conf).unwrap();
    let keys = fleet.dir.path().join("release");
    Agent::new("")
        .d
        .run(&[
            "keys",
            "generate",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            "release-1",
        ])
        .ok();
    // Each device serves a tiny model before the rollout; SmolLM2 is on none of them.
    let tiny = fleet.dir.path().join("tiny.gguf");
    std::fs::write(&tiny, GgufBuilder::tiny_llama().build()).unwrap();
    let ids = ["edge-1", "edge-2", "edge-3"];
    let mut agents: Vec<Agent> = ids
        .iter()
        .map(|id| lab_agent(&fleet, id, &keys, &[(tiny.as_path(), "tiny")]))
        .collect();
    fleet.start_broker();
    fleet.start_hub();
    let key = keys.join("release-1.key.pem");
    let manifest = fleet
        .hub_cli(&[
            "models",
            "publish",
            smollm2.to_str().unwrap(),
            "--name",
            "smollm2",
            "--version",
            "1",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .json();
    let chunks = manifest["chunk_sha256"].as_array().unwrap().len() as u64;
    assert!(chunks > 100, "{chunks} chunks");
    let sha = manifest["sha256"].as_str().unwrap().to_string();
    for a in &mut agents {
        a.start();
    }
    let started = fleet
        .hub_cli(&[
            "rollout",
            "start",
            "--model",
            "smollm2:1",
            "--target",
            "group:lab",
            "--activate",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .json();
    let id = started["rollout"].as_u64().unwrap();
    let status = || {
        fleet
            .hub_cli(&["rollout", "status", &id.to_string(), "--json"])
            .json()["rollouts"][0]
            .clone()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while status()["state"] != "done" {
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish: {}\n{}",
            status(),
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = status();
    let devices = s["devices"].as_array().unwrap();
    let seen: Vec<&str> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(seen, ids, "{s}");
    for d in devices {
        assert_eq!(d["state"], "active", "{s}");
        assert_eq!(d["progress"], 1.0, "{s}");
        // Each device fetched every chunk itself (more only if a request timed out).
        let requested = d["chunks_requested"].as_u64().unwrap();
        assert!(requested >= chunks, "{requested} of {chunks} chunks: {s}");
    }
    for a in &agents {
        // Installed by the rollout (its provenance), the published bytes, and serving.
        let listed = a.d.run(&["models", "list", "--json"]).json();
        let model = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "smollm2")
            .unwrap_or_else(|| panic!("smollm2 not installed: {listed}"))
            .clone();
        assert_eq!(model["source"], format!("rollout:{id}"), "{model}");
        assert!(
            model["aliases"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "default"),
            "{model}"
        );
        let blob = a.d.data.join("blobs/sha256").join(&sha);
        assert_eq!(crate::support::sha256_file(&blob), sha);
        let steps = transfer_steps(a);
        for step in ["started", "verified", "installed"] {
            assert!(steps.iter().any(|s| s == step), "no {step} in {steps:?}");
        }
        let activated = device_audit(a, "models:activate");
        assert!(
            activated.iter().any(|r| r["outcome"] == "success"
                && r["actor"] == "outpost-sync"
                && r["details"]["rollout"] == id),
            "{activated:?}"
        );
        let t = a.token("olivia", "operator", &[]);
        let r = a.request(
            "POST",
            "/v1/chat/completions",
            Some(&t),
            Some(
                &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4, "temperature": 0}),
            ),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["model"], "smollm2:1");
        // No partial file left behind.
        assert_eq!(
            std::fs::read_dir(a.d.data.join("downloads"))
                .unwrap()
                .count(),
            0
        );
    }
}
