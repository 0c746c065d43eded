//! Desired state end to end over a real Mosquitto (TLS, from `broker-config`): a rollout
//! started with the real `outpost-hub` CLI is published retained by a real `outpost-hub
//! serve` and reaches a real device sync loop (`device::SyncLoop`, with an audit log of its
//! own), which accepts it, keeps it in `outbox.db` and reports it; documents forged,
//! replayed, expired or meant for others (published with the hub's certificate, as a
//! compromised hub or broker could) are refused, audited, and change nothing.
//!
//! Without Mosquitto these tests skip with a printed reason, except under `CI=true`.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_policy::audit::{AuditLog, AuditReader, AuditSettings, Entry, Outcome, Query};
use outpost_policy::signing::KeyPair;
use outpost_sync::device::{
    DesiredDecision, DeviceSource, Reported, Settings, SyncLoop, SyncStats,
};
use outpost_sync::outbox::Outbox;
use outpost_sync::protocol::GroupId;
use outpost_sync::release::{DesiredState, PinnedKeys, Target};
use outpost_sync::transfer::{InstallOutcome, InstallRequest};
use support::*;
use tokio_util::sync::CancellationToken;

/// The agent's side, as the daemon does it: decisions go to the device's audit log.
struct Source {
    log: AuditLog,
    decisions: Mutex<Vec<DesiredDecision>>,
    transfers: Mutex<Vec<Entry>>,
}

impl DeviceSource for Source {
    fn reported(&self) -> Result<Reported, String> {
        Ok(Reported::default())
    }
    fn telemetry(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    fn refused(&self, _topic: &str, _reason: &str, _unreported: u64) {}
    fn desired(&self, d: &DesiredDecision) {
        self.log.append(d.audit_entry()).unwrap();
        self.decisions.lock().unwrap().push(d.clone());
    }
    /// A stand-in for the registry: the verified file is moved into `installed/`.
    fn install(&self, req: &InstallRequest) -> Result<InstallOutcome, String> {
        let dir = req.path.parent().unwrap().join("../installed");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::rename(&req.path, dir.join(&req.sha256)).map_err(|e| e.to_string())?;
        Ok(InstallOutcome {
            model: format!("{}:{}", req.name, req.version),
            created: true,
        })
    }
    fn record(&self, entry: Entry) {
        self.transfers.lock().unwrap().push(entry);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within 20 s");
}

fn rollout_status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&hub(
        dir,
        &["--config", "hub.toml", "rollout", "status", "--json"],
    )))
    .unwrap()
}

/// `--config hub.toml rollout start` of smollm2:1.0 to group:lab, signed with release-1.
fn rollout_start<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--config",
        "hub.toml",
        "rollout",
        "start",
        "--model",
        "smollm2:1.0",
        "--target",
        "group:lab",
        "--key",
        "release-1.key.pem",
        "--kid",
        "release-1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts the device's sync loop on `runtime`; cancel the token to stop it.
fn start_loop(
    runtime: &tokio::runtime::Runtime,
    settings: &Settings,
    source: &Arc<Source>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let source: Arc<dyn DeviceSource> = source.clone();
    let sync = SyncLoop::new(settings.clone(), source, Arc::new(SyncStats::default()));
    (stop.clone(), runtime.spawn(sync.run(stop)))
}

/// A document signed by `key` as `kid`, from `base` with `edit` applied.
fn resigned(
    base: &DesiredState,
    key: &KeyPair,
    kid: &str,
    edit: impl FnOnce(&mut DesiredState),
) -> Vec<u8> {
    let mut d = base.clone();
    edit(&mut d);
    d.signatures.clear();
    d.manifest.signatures.clear();
    d.manifest.sign(key, kid).unwrap();
    d.sign(key, kid).unwrap();
    d.encode().unwrap()
}

#[test]
fn a_rollout_reaches_the_device_and_forgeries_are_refused_and_audited() {
    if mosquitto().is_none() {
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path();
    // The fleet: PKI, one device in group lab, a broker, the hub serving.
    ok(&hub(dir, &["pki", "init", "--out", "pki"]));
    let device_key = KeyPair::generate().unwrap();
    device_key
        .public()
        .write(&dir.join("edge.pub.pem"))
        .unwrap();
    let port = free_port();
    write_hub_toml(dir, port);
    enroll(
        dir,
        &["--config", "hub.toml"],
        "edge-01",
        &["lab"],
        &dir.join("edge.pub.pem"),
    );
    let _broker = start_broker(dir, port);
    let log = std::fs::File::create(dir.join("hub.log")).unwrap();
    let _serve = Killed(
        Command::new(HUB)
            .args(["--config", "hub.toml", "serve"])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // The administrator publishes and rolls out.
    let (release, _, _) = release_key(dir, "release-1");
    tiny_gguf(&dir.join("model.gguf"), "llama", 3000);
    ok(&hub(
        dir,
        &[
            "--config",
            "hub.toml",
            "models",
            "publish",
            "model.gguf",
            "--name",
            "smollm2",
            "--version",
            "1.0",
            "--key",
            "release-1.key.pem",
            "--kid",
            "release-1",
        ],
    ));
    let started = ok(&hub(dir, &rollout_start(&["--activate"])));
    assert_eq!(started.trim(), r#"{"rollout":1}"#);

    // The device's sync loop, pinning the release key.
    let dev_dir = dir.join("device");
    std::fs::create_dir_all(&dev_dir).unwrap();
    let source = Arc::new(Source {
        log: AuditLog::open(
            &dev_dir.join("audit.db"),
            device_key,
            AuditSettings::new("edge-01"),
        )
        .unwrap(),
        decisions: Mutex::new(Vec::new()),
        transfers: Mutex::new(Vec::new()),
    });
    let link = link_config(
        port,
        "edge-01",
        &dir.join("out/ca.pem"),
        &dir.join("out/edge-01.pem"),
        &dir.join("out/edge-01.key"),
    );
    let mut settings = Settings::new(
        link,
        dev_dir.join("audit.db"),
        dev_dir.join("outbox.db"),
        "test",
    );
    settings.groups = vec![GroupId::new("lab").unwrap()];
    settings.state_interval = Duration::from_millis(200);
    let mut keys = PinnedKeys::new();
    keys.insert("release-1", release.public());
    settings.release_keys = keys;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop, task) = start_loop(&runtime, &settings, &source);

    let decisions = || source.decisions.lock().unwrap().clone();
    wait_for("the rollout accepted", || !decisions().is_empty());
    let first = &decisions()[0];
    assert_eq!(first.outcome, Ok(()), "{first:?}");
    assert_eq!(
        (first.rollout, first.version, first.target.as_deref()),
        (Some(1), Some(1), Some("group:lab"))
    );
    // The hub sees which document the device follows.
    wait_for("the hub's status shows the device accepted it", || {
        let s = rollout_status(dir);
        s["rollouts"][0]["devices"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("group:lab version 1 accepted"))
    });

    // A second rollout supersedes it (version 2 of the group's document).
    ok(&hub(dir, &rollout_start(&[])));
    wait_for("rollout 2 accepted", || decisions().len() >= 2);
    assert_eq!(decisions()[1].outcome, Ok(()));
    assert_eq!(decisions()[1].version, Some(2));
    let accepted = DesiredState::decode(
        Outbox::open_read_only(&dev_dir.join("outbox.db"))
            .unwrap()
            .accepted_desired()
            .unwrap()[0]
            .doc_json
            .as_bytes(),
    )
    .unwrap();

    // Forgeries, published with the hub's own certificate (what a compromised hub could do).
    let forger_runtime = tokio::runtime::Runtime::new().unwrap();
    let forger_stop = CancellationToken::new();
    let forger_link = link_config(
        port,
        "outpost-hub.forger",
        &dir.join("pki/ca.pem"),
        &dir.join("pki/hub.pem"),
        &dir.join("pki/hub.key"),
    );
    let mut forger = forger_runtime.block_on(connect(
        &forger_link,
        session("outpost/v1/hubs/outpost-hub/status".into(), Vec::new()),
        &forger_stop,
    ));
    let attacker = KeyPair::generate().unwrap();
    let group_topic = Target::parse("group:lab").unwrap().desired_topic();
    let own_topic = Target::parse("device:edge-01").unwrap().desired_topic();
    let past = outpost_policy::time::system_now() - 60;
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "bad_signature",
            own_topic.clone(),
            resigned(&accepted, &attacker, "release-1", |d| {
                d.target = Target::parse("device:edge-01").unwrap();
                d.version = 7;
            }),
        ),
        (
            "unknown_kid",
            own_topic.clone(),
            resigned(&accepted, &attacker, "release-9", |d| {
                d.target = Target::parse("device:edge-01").unwrap();
            }),
        ),
        (
            "replay",
            group_topic.clone(),
            resigned(&accepted, &release, "release-1", |d| d.version = 1),
        ),
        (
            "expired",
            group_topic.clone(),
            resigned(&accepted, &release, "release-1", |d| {
                d.version = 9;
                d.expires = past;
            }),
        ),
        (
            "not_targeted",
            own_topic.clone(),
            resigned(&accepted, &release, "release-1", |d| {
                d.target = Target::parse("device:edge-02").unwrap();
            }),
        ),
        (
            "not_targeted",
            group_topic.clone(),
            resigned(&accepted, &release, "release-1", |d| {
                d.target = Target::parse("group:other").unwrap();
                d.version = 10;
            }),
        ),
        (
            "malformed",
            own_topic.clone(),
            b"{\"v\":1,\"rollout\":\"x\"}".to_vec(),
        ),
    ];
    for (i, (label, topic, payload)) in cases.iter().enumerate() {
        forger_runtime.block_on(publish(&mut forger, topic, payload));
        wait_for(label, || decisions().len() > 2 + i);
        let d = decisions()[2 + i].clone();
        let refusal = d.outcome.expect_err(label);
        assert_eq!(refusal.label(), *label, "{refusal}");
    }
    // Nothing changed: the device still follows version 2 of the group's document, and has
    // accepted nothing else.
    let rows = Outbox::open_read_only(&dev_dir.join("outbox.db"))
        .unwrap()
        .accepted_desired()
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].target.as_str(), rows[0].version), ("group:lab", 2));

    // The same accepted document coming again (a reconnect) is not decided twice.
    let before = decisions().len();
    forger_runtime.block_on(publish(
        &mut forger,
        &group_topic,
        &accepted.encode().unwrap(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(decisions().len(), before);

    stop.cancel();
    runtime.block_on(task).unwrap();
    forger_stop.cancel();

    // Restarted, the loop knows from outbox.db what it accepted: the retained document that
    // comes again on connect is not decided (nor audited) again.
    let (stop, task) = start_loop(&runtime, &settings, &source);
    std::thread::sleep(Duration::from_secs(2));
    stop.cancel();
    runtime.block_on(task).unwrap();
    assert_eq!(decisions().len(), before);

    // Halting a rollout clears its retained document; resuming publishes it again.
    ok(&hub(dir, &["--config", "hub.toml", "rollout", "halt", "2"]));
    std::thread::sleep(Duration::from_millis(2500));
    let watcher_stop = CancellationToken::new();
    let mut watcher = runtime.block_on(connect(
        &settings.link,
        session(
            "outpost/v1/devices/edge-01/status".into(),
            vec![group_topic.clone()],
        ),
        &watcher_stop,
    ));
    let seen = runtime.block_on(received(&mut watcher, 1000, None));
    assert!(
        seen.is_empty(),
        "a halted rollout's document is still retained"
    );
    ok(&hub(
        dir,
        &["--config", "hub.toml", "rollout", "resume", "2"],
    ));
    let current = accepted.encode().unwrap();
    let seen = runtime.block_on(received(&mut watcher, 5000, Some(&current)));
    assert_eq!(
        seen.last().map(|(t, p)| (t.as_str(), p.as_slice())),
        Some((group_topic.as_str(), current.as_slice()))
    );
    watcher_stop.cancel();

    // Audited on the device: two accepted, seven refused, with the reasons.
    let reader = AuditReader::open(&dev_dir.join("audit.db")).unwrap();
    let records: Vec<_> = reader
        .query(&Query::default())
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "sync:desired")
        .collect();
    let allowed = records
        .iter()
        .filter(|r| r.outcome == Outcome::Allowed)
        .count();
    let denied: Vec<&str> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Denied)
        .map(|r| r.reason.as_str())
        .collect();
    assert_eq!(allowed, 2);
    assert_eq!(denied.len(), 7, "{denied:?}");
    assert!(
        denied[0].contains("the signature of key release-1 does not verify"),
        "{denied:?}"
    );
    assert!(
        denied[2].contains("version 1 is not above version 2"),
        "{denied:?}"
    );
    assert!(denied[3].contains("expired"), "{denied:?}");
    assert!(denied[4].contains("targets device:edge-02"), "{denied:?}");
}
