//! The harness the broker tests share (`mod support;` in each test binary): a real Mosquitto
//! (`/usr/sbin/mosquitto`) run from the configuration `outpost-hub broker-config` writes,
//! on a free port, killed by PID on drop; `outpost-hub` runs; `sync::conn::Link` clients.
//! Without Mosquitto, broker tests skip with a printed reason, except under `CI=true`.

// Test helpers panic on what they cannot set up; each test binary uses a part of them.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use outpost_policy::signing::KeyPair;
use outpost_sync::conn::{Backoff, Link, LinkConfig, LinkEvent, LinkHandle, Session, Will};
use outpost_sync::protocol::{DeviceId, DeviceTopic, device_topic};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
pub const HUB: &str = env!("CARGO_BIN_EXE_outpost-hub");

pub fn mosquitto() -> Option<&'static Path> {
    let path = Path::new(MOSQUITTO);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{MOSQUITTO} is missing and CI=true: broker tests must run"
    );
    eprintln!("skipped: {MOSQUITTO} is not installed");
    None
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs `outpost-hub` with `args` in `dir`.
pub fn hub(dir: &Path, args: &[&str]) -> Output {
    Command::new(HUB)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exit code and the one `error:` line of a failed run.
pub fn failed(out: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

/// A device's audit public key, as `outpost keys device` prints it.
pub fn audit_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.pub.pem"));
    KeyPair::generate().unwrap().public().write(&path).unwrap();
    path
}

/// A Mosquitto process, killed on drop.
pub struct Mosquitto(pub Child);

impl Mosquitto {
    pub fn start(conf: &Path, port: u16, log: &Path) -> Mosquitto {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut broker = Mosquitto(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return broker;
            }
            if let Ok(Some(status)) = broker.0.try_wait() {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("mosquitto exited with {status}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("mosquitto did not listen on port {port} within 5 s");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn link_config(port: u16, id: &str, ca: &Path, cert: &Path, key: &Path) -> LinkConfig {
    let mut config = LinkConfig::new(
        format!("mqtts://127.0.0.1:{port}"),
        DeviceId::new(id).unwrap(),
    );
    config.ca = Some(ca.to_path_buf());
    config.cert = Some(cert.to_path_buf());
    config.key = Some(key.to_path_buf());
    config.backoff = Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(500),
    };
    config
}

pub fn topic(id: &str, kind: DeviceTopic) -> String {
    device_topic(&DeviceId::new(id).unwrap(), kind)
}

pub fn session(will_topic: String, subscriptions: Vec<String>) -> Session {
    Session {
        will: Will {
            topic: will_topic,
            payload: br#"{"v":1,"state":"offline","agent_version":"test"}"#.to_vec(),
        },
        subscriptions,
    }
}

pub struct Client {
    pub handle: LinkHandle,
    pub events: mpsc::Receiver<LinkEvent>,
}

pub async fn connect(config: &LinkConfig, session: Session, stop: &CancellationToken) -> Client {
    let (handle, mut events, _task) = Link::spawn(config, session, stop.clone()).unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(LinkEvent::Connected)) => break,
            Ok(Some(LinkEvent::ConnectFailed { reason, .. })) => {
                panic!("{} could not connect: {reason}", config.client_id)
            }
            Ok(Some(_)) => {}
            _ => panic!("{} did not connect within 10 s", config.client_id),
        }
    }
    // The subscriptions are queued before Connected; give the broker a moment to grant them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Client { handle, events }
}

/// Publishes and waits for the broker's PubAck (Mosquitto acks a publish its ACL drops).
pub async fn publish(client: &mut Client, topic: &str, body: &[u8]) {
    let id = client
        .handle
        .try_publish(topic, body.to_vec(), false)
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.events.recv()).await {
            Ok(Some(LinkEvent::PubAck(got))) if got == id => return,
            Ok(Some(_)) => {}
            _ => panic!("no PubAck for {topic}"),
        }
    }
}

/// Messages received within `ms` milliseconds, or until one with `until` as payload.
pub async fn received(
    client: &mut Client,
    ms: u64,
    until: Option<&[u8]>,
) -> Vec<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let mut out = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.events.recv()).await {
        if let LinkEvent::Message { topic, payload } = event {
            let done = until == Some(payload.as_slice());
            out.push((topic, payload));
            if done {
                break;
            }
        }
    }
    out
}

/// A small GGUF file (header only, then `body` filler bytes): version 3, no tensors,
/// `general.architecture` = `arch`, `general.file_type` = 7 (q8_0).
pub fn tiny_gguf(path: &Path, arch: &str, body: usize) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    let key = |out: &mut Vec<u8>, k: &str| {
        out.extend((k.len() as u64).to_le_bytes());
        out.extend(k.as_bytes());
    };
    key(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    out.extend((arch.len() as u64).to_le_bytes());
    out.extend(arch.as_bytes());
    key(&mut out, "general.file_type");
    out.extend(4u32.to_le_bytes());
    out.extend(7u32.to_le_bytes());
    out.extend((0..body).map(|i| (i % 251) as u8));
    std::fs::write(path, out).unwrap();
}

/// A release key pair as `outpost keys generate` writes it: `DIR/NAME.key.pem` (private)
/// and `DIR/NAME.pub.pem`.
pub fn release_key(dir: &Path, name: &str) -> (KeyPair, PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    key.write_private(&private).unwrap();
    key.public().write(&public).unwrap();
    (key, private, public)
}

/// `outpost-hub BASE… devices enroll --id ID --group G… --audit-key KEY --pki pki --out out`
/// in `dir`, which must succeed.
pub fn enroll(dir: &Path, base: &[&str], id: &str, groups: &[&str], audit_key: &Path) {
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["devices", "enroll", "--id", id]);
    for g in groups {
        args.extend(["--group", g]);
    }
    let key = audit_key.to_str().unwrap();
    args.extend(["--audit-key", key, "--pki", "pki", "--out", "out"]);
    ok(&hub(dir, &args));
}

/// `broker-config` for the hub data in `dir/data` (listening on 127.0.0.1:`port`), then
/// Mosquitto started from it (its log in `dir/mosquitto.log`).
pub fn start_broker(dir: &Path, port: u16) -> Mosquitto {
    let port_arg = port.to_string();
    // A hub.toml written first may name another store (PostgreSQL): the ACL comes from it.
    let config: &[&str] = if dir.join("hub.toml").exists() {
        &["--config", "hub.toml"]
    } else {
        &[]
    };
    ok(&hub(
        dir,
        &[
            config,
            &[
                "--data-dir",
                "data",
                "broker-config",
                "--pki",
                "pki",
                "--port",
                &port_arg,
                "--bind",
                "127.0.0.1",
                "--out",
                "broker",
            ],
        ]
        .concat(),
    ));
    Mosquitto::start(
        &dir.join("broker/mosquitto.conf"),
        port,
        &dir.join("mosquitto.log"),
    )
}

/// `dir/hub.toml` for `serve`: data in `dir/data`, the broker on 127.0.0.1:`port`, the
/// hub's certificate from `dir/pki`.
pub fn write_hub_toml(dir: &Path, port: u16) {
    write_hub_toml_with_store(dir, port, None);
}

/// [`write_hub_toml`] with `[hub] store` set to `store` (a PostgreSQL URL) when given.
pub fn write_hub_toml_with_store(dir: &Path, port: u16, store: Option<&str>) {
    let d = dir.display();
    let store = store.map_or(String::new(), |url| format!("store = \"{url}\"\n"));
    std::fs::write(
        dir.join("hub.toml"),
        format!(
            "[hub]\ndata_dir = \"{d}/data\"\nbroker = \"mqtts://127.0.0.1:{port}\"\n\
             ca = \"{d}/pki/ca.pem\"\ncert = \"{d}/pki/hub.pem\"\nkey = \"{d}/pki/hub.key\"\n\
             {store}"
        ),
    )
    .unwrap();
}
