//! `outpost-hub models publish` and `rollout start|status|halt|resume` as a user runs them:
//! the real binary on a real `hub.db`, blob store and audit chain (no broker: distribution
//! is `serve`'s, tested in `desired.rs`). The rollout commands run on PostgreSQL too
//! (`[hub] store` in `hub.toml`), with the same answers.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use outpost_policy::audit::{AuditReader, Outcome, Query};
use outpost_sync::hub::SqliteStore;
use outpost_sync::hub::config::Config;
use outpost_sync::hub::rollout::{self, Step};
use outpost_sync::hub::store::Store;
use outpost_sync::hub::store::pg::testing::TestDb;
use outpost_sync::hub::store::releases::ReleaseStore;
use outpost_sync::protocol::{DeviceId, GroupId, ReportedState, RolloutReport, RolloutState, V1};
use outpost_sync::release::{DesiredState, Manifest, PinnedKeys, verify_desired};
use sha2::{Digest, Sha256};
use support::*;
use tempfile::TempDir;

/// `outpost-hub ARGS` in `dir`, with `--config hub.toml` when the test wrote one (its
/// store on PostgreSQL).
fn hub(dir: &Path, args: &[&str]) -> std::process::Output {
    if dir.join("hub.toml").exists() {
        support::hub(dir, &[&["--config", "hub.toml"], args].concat())
    } else {
        support::hub(dir, args)
    }
}

/// The store the commands in `dir` use, read-only.
fn store(dir: &Path) -> Box<dyn Store> {
    let config = dir.join("hub.toml");
    let config = Config::load(config.exists().then_some(config.as_path())).unwrap();
    config
        .store(Some(&dir.join("data")))
        .open_read_only()
        .unwrap()
}

/// A hub data directory with three devices in group `lab` (edge-01..03) and one in `eu`.
fn hub_with_devices() -> TempDir {
    hub_with_devices_on(None)
}

/// [`hub_with_devices`], its store in `pg` when given.
fn hub_with_devices_on(pg: Option<&TestDb>) -> TempDir {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    if let Some(db) = pg {
        std::fs::write(
            dir.join("hub.toml"),
            format!("[hub]\nstore = \"{}\"\n", db.url()),
        )
        .unwrap();
    }
    ok(&hub(dir, &["pki", "init", "--out", "pki"]));
    for (id, group) in [
        ("edge-01", "lab"),
        ("edge-02", "lab"),
        ("edge-03", "lab"),
        ("edge-09", "eu"),
    ] {
        let key = audit_key(dir, id);
        let base: &[&str] = match pg {
            Some(_) => &["--config", "hub.toml", "--data-dir", "data"],
            None => &["--data-dir", "data"],
        };
        enroll(dir, base, id, &[group], &key);
    }
    tmp
}

fn publish(dir: &Path, file: &str, version: &str, kid: &str) -> std::process::Output {
    hub(
        dir,
        &[
            "--data-dir",
            "data",
            "models",
            "publish",
            file,
            "--name",
            "smollm2",
            "--version",
            version,
            "--key",
            "release-1.key.pem",
            "--kid",
            kid,
            "--chunk-size",
            "1000",
            "--expires",
            "2d",
        ],
    )
}

fn rollout(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--data-dir",
        "data",
        "rollout",
        "start",
        "--key",
        "release-1.key.pem",
        "--kid",
        "release-1",
    ];
    args.extend_from_slice(extra);
    hub(dir, &args)
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&hub(
        dir,
        &["--data-dir", "data", "rollout", "status", "--json"],
    )))
    .unwrap()
}

#[test]
fn publish_stores_the_blob_and_prints_a_manifest_that_verifies() {
    let tmp = hub_with_devices();
    let dir = tmp.path();
    let (key, _, _) = release_key(dir, "release-1");
    tiny_gguf(&dir.join("model.gguf"), "llama", 2400);
    let out = ok(&publish(dir, "model.gguf", "1.0", "release-1"));
    let manifest: Manifest = serde_json::from_str(&out).unwrap();

    // What the file is, computed here independently.
    let bytes = std::fs::read(dir.join("model.gguf")).unwrap();
    let hex = |b: &[u8]| hex::encode(Sha256::digest(b));
    assert_eq!(manifest.sha256, hex(&bytes));
    assert_eq!(manifest.size, bytes.len() as u64);
    assert_eq!(manifest.chunk_size, 1000);
    let chunks: Vec<String> = bytes.chunks(1000).map(hex).collect();
    assert_eq!(chunks.len(), 3);
    assert_eq!(manifest.chunk_sha256, chunks);
    assert_eq!(
        (manifest.name.as_str(), manifest.version.as_str()),
        ("smollm2", "1.0")
    );
    assert_eq!(manifest.architecture, "llama");
    assert_eq!(manifest.quantization, "q8_0");
    assert_eq!(manifest.release, 1);
    let now = outpost_policy::time::system_now();
    assert!((now + 2 * 86_400 - 5..=now + 2 * 86_400 + 5).contains(&manifest.expires));
    assert_eq!(manifest.signatures.len(), 1);
    assert_eq!(manifest.signatures[0].kid, "release-1");
    // The printed JSON has the issue's fields and nothing else.
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "architecture",
            "chunk_sha256",
            "chunk_size",
            "expires",
            "name",
            "quantization",
            "release",
            "sha256",
            "signatures",
            "size",
            "version"
        ]
    );
    // The blob is in the store under its digest, byte for byte.
    let blob = dir.join("data/blobs/sha256").join(&manifest.sha256);
    assert_eq!(std::fs::read(&blob).unwrap(), bytes);

    // A second version: the next release, same blob kept once.
    let second: Manifest =
        serde_json::from_str(&ok(&publish(dir, "model.gguf", "1.1", "release-1"))).unwrap();
    assert_eq!(second.release, 2);
    let files: Vec<_> = std::fs::read_dir(dir.join("data/blobs/sha256"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // The manifest signature is the key's: a rollout of it verifies on a device.
    let mut keys = PinnedKeys::new();
    keys.insert("release-1", key.public());
    assert_eq!(
        ok(&rollout(
            dir,
            &["--model", "smollm2:1.0", "--target", "group:lab"]
        ))
        .trim(),
        r#"{"rollout":1}"#
    );
    let store = store(dir);
    let docs = store.rollout_docs(1).unwrap();
    let doc = DesiredState::decode(docs[0].doc_json.as_bytes()).unwrap();
    assert_eq!(doc.manifest, manifest);
    let me = DeviceId::new("edge-01").unwrap();
    let lab = GroupId::new("lab").unwrap();
    assert_eq!(verify_desired(&doc, &keys, &me, &[lab], None, now), Ok(()));
}

#[test]
fn publish_refuses_bad_input_and_changes_nothing() {
    let tmp = hub_with_devices();
    let dir = tmp.path();
    release_key(dir, "release-1");
    tiny_gguf(&dir.join("model.gguf"), "llama", 100);
    std::fs::write(dir.join("notes.txt"), "not a model").unwrap();
    let (code, err) = failed(&publish(dir, "notes.txt", "1.0", "release-1"));
    assert_eq!(code, 1);
    assert!(err.contains("not a GGUF file"), "{err}");
    let (code, err) = failed(&publish(dir, "model.gguf", "1:0", "release-1"));
    assert_eq!(code, 1);
    assert!(err.contains("model version \"1:0\" must be"), "{err}");
    std::fs::write(dir.join("bad.key.pem"), "garbage").unwrap();
    let out = hub(
        dir,
        &[
            "--data-dir",
            "data",
            "models",
            "publish",
            "model.gguf",
            "--name",
            "m",
            "--version",
            "1",
            "--key",
            "bad.key.pem",
            "--kid",
            "k",
        ],
    );
    let (code, err) = failed(&out);
    assert_eq!(code, 1);
    assert!(err.contains("not an Ed25519 private key"), "{err}");
    assert!(!dir.join("data/blobs").exists(), "nothing stored");
    ok(&publish(dir, "model.gguf", "1.0", "release-1"));
    let (code, err) = failed(&publish(dir, "model.gguf", "1.0", "release-1"));
    assert_eq!(code, 1);
    assert!(err.contains("smollm2:1.0 is already published"), "{err}");
}

#[test]
fn rollouts_sign_monotonic_versions_per_target_and_are_audited() {
    rollouts_sign_monotonic_versions(&hub_with_devices());
}

#[test]
fn rollouts_on_postgres_sign_monotonic_versions_per_target_and_are_audited() {
    let Some(db) = TestDb::create() else { return };
    rollouts_sign_monotonic_versions(&hub_with_devices_on(Some(&db)));
}

fn rollouts_sign_monotonic_versions(tmp: &TempDir) {
    let dir = tmp.path();
    let (key, _, _) = release_key(dir, "release-1");
    tiny_gguf(&dir.join("model.gguf"), "qwen2", 1500);
    ok(&publish(dir, "model.gguf", "1.0", "release-1"));

    // Refusals first: nothing is stored for them.
    for (args, expect) in [
        (
            vec!["--model", "smollm2:9.9", "--target", "group:lab"],
            "model smollm2:9.9 is not published on this hub",
        ),
        (
            vec!["--model", "smollm2", "--target", "group:lab"],
            "is not NAME:VERSION",
        ),
        (
            vec!["--model", "smollm2:1.0", "--target", "device:nobody"],
            "device nobody is not enrolled",
        ),
        (
            vec!["--model", "smollm2:1.0", "--target", "group:empty"],
            "group empty has no enrolled device",
        ),
        (
            vec!["--model", "smollm2:1.0", "--target", "lab"],
            "neither group:G nor device:ID",
        ),
        (
            vec![
                "--model",
                "smollm2:1.0",
                "--target",
                "group:lab",
                "--batch",
                "0",
            ],
            "--batch must be 1 to 100",
        ),
    ] {
        let (code, err) = failed(&rollout(dir, &args));
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(status(dir)["rollouts"], serde_json::json!([]));

    let id = |out: String| -> u64 {
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout"]
            .as_u64()
            .unwrap()
    };
    let group = ["--model", "smollm2:1.0", "--target", "group:lab"];
    assert_eq!(id(ok(&rollout(dir, &group))), 1);
    assert_eq!(id(ok(&rollout(dir, &group))), 2);
    let device = ["--model", "smollm2:1.0", "--target", "device:edge-09"];
    assert_eq!(id(ok(&rollout(dir, &device))), 3);
    // A phased rollout: each of lab's three devices gets a document of its own, in batches of
    // half of them (rounded up); only the first batch is released.
    let phased = [
        "--model",
        "smollm2:1.0",
        "--target",
        "group:lab",
        "--batch",
        "50",
        "--max-failures",
        "1",
        "--activate",
        "--alias",
        "chat",
    ];
    assert_eq!(id(ok(&rollout(dir, &phased))), 4);

    let store = store(dir);
    let mut keys = PinnedKeys::new();
    keys.insert("release-1", key.public());
    let now = outpost_policy::time::system_now();
    let docs = |id| {
        store
            .rollout_docs(id)
            .unwrap()
            .into_iter()
            .map(|d| DesiredState::decode(d.doc_json.as_bytes()).unwrap())
            .collect::<Vec<_>>()
    };
    let (first, second) = (docs(1), docs(2));
    assert_eq!((first[0].version, second[0].version), (1, 2));
    let lab = [GroupId::new("lab").unwrap()];
    let edge01 = DeviceId::new("edge-01").unwrap();
    // The second supersedes the first; the first is then a replay.
    assert_eq!(
        verify_desired(&second[0], &keys, &edge01, &lab, Some(1), now),
        Ok(())
    );
    assert!(verify_desired(&first[0], &keys, &edge01, &lab, Some(2), now).is_err());
    let third = docs(3);
    assert_eq!(third[0].target.to_string(), "device:edge-09");
    assert_eq!(third[0].version, 1, "versions are counted per target");
    let fourth = docs(4);
    let targets: Vec<String> = fourth.iter().map(|d| d.target.to_string()).collect();
    assert_eq!(
        targets,
        ["device:edge-01", "device:edge-02", "device:edge-03"]
    );
    let phases: Vec<(u32, bool)> = store
        .rollout_docs(4)
        .unwrap()
        .iter()
        .map(|d| (d.batch, d.released))
        .collect();
    assert_eq!(phases, [(0, true), (0, true), (1, false)]);
    let published: Vec<String> = store
        .current_desired()
        .unwrap()
        .iter()
        .map(|d| format!("{}@{}", d.target, d.rollout_id))
        .collect();
    assert_eq!(
        published,
        [
            "device:edge-01@4",
            "device:edge-02@4",
            "device:edge-09@3",
            "group:lab@2"
        ],
        "a batch not released yet is not published"
    );
    assert!(
        fourth
            .iter()
            .all(|d| d.activate && d.alias == "chat" && d.rollout == 4)
    );

    // Status: the issue's shape; devices that have not reported are pending.
    let s = status(dir);
    let r4 = &s["rollouts"][3];
    assert_eq!(r4["id"], 4);
    assert_eq!(r4["model"], "smollm2:1.0");
    assert_eq!(r4["target"], "group:lab");
    assert_eq!(r4["state"], "running");
    assert_eq!(
        (r4["batches"].as_u64(), r4["released_batches"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(r4["max_failures"], 1);
    let devices = r4["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3);
    assert_eq!(
        devices[0],
        serde_json::json!({"id": "edge-01", "state": "pending", "progress": 0.0,
            "reason": "the device has not reported its state", "chunks_requested": 0,
            "batch": 0, "released": true})
    );
    assert_eq!(
        devices[2]["reason"],
        "in batch 1, released when the batches before it succeed"
    );
    assert_eq!(s["rollouts"][0]["devices"].as_array().unwrap().len(), 3);

    // Halt and resume.
    assert_eq!(
        ok(&hub(dir, &["--data-dir", "data", "rollout", "halt", "4"])).trim(),
        "rollout 4 halted"
    );
    assert_eq!(status(dir)["rollouts"][3]["state"], "halted");
    ok(&hub(dir, &["--data-dir", "data", "rollout", "resume", "4"]));
    assert_eq!(status(dir)["rollouts"][3]["state"], "running");
    let (code, err) = failed(&hub(dir, &["--data-dir", "data", "rollout", "halt", "99"]));
    assert_eq!(code, 1);
    assert!(err.contains("no rollout 99"), "{err}");
    let text = ok(&hub(dir, &["--data-dir", "data", "rollout", "status", "3"]));
    assert!(
        text.starts_with("rollout 3 smollm2:1.0 -> device:edge-09: running\n  edge-09"),
        "{text}"
    );

    // The hub's own audit chain says who did each.
    let log = AuditReader::open(&dir.join("data/audit.db")).unwrap();
    let records = log.query(&Query::default()).unwrap();
    let done = |action: &str| {
        records
            .iter()
            .filter(|r| r.action == action && r.outcome == Outcome::Success)
            .count()
    };
    assert_eq!(done("models:publish"), 1);
    assert_eq!(done("rollout:start"), 4);
    assert_eq!(done("rollout:halt"), 1);
    assert_eq!(done("rollout:resume"), 1);
    // Refused before anything was asked of the store: no record (like enroll's checks).
    assert_eq!(
        records
            .iter()
            .filter(|r| r.action == "rollout:start" && r.outcome == Outcome::Failure)
            .count(),
        0
    );
    let start = records
        .iter()
        .find(|r| r.action == "rollout:start" && r.outcome == Outcome::Allowed)
        .unwrap();
    assert!(start.actor.starts_with("local:"), "{}", start.actor);
    assert_eq!(start.resource.as_deref(), Some("group:lab"));
}

/// Stores `device`'s reported state saying it is `state` in rollout `rollout`.
fn report(store: &mut SqliteStore, device: &str, rollout: u64, state: RolloutState) {
    use outpost_sync::hub::HubStore;
    let reported = ReportedState {
        v: V1,
        models: Vec::new(),
        aliases: Default::default(),
        policy_version: None,
        last_acked_seq: 0,
        desired: None,
        rollout: Some(RolloutReport {
            rollout,
            model: "smollm2:1.0".into(),
            state,
            progress: 100,
            reason: Some(format!("{} here", state.as_str())),
        }),
        transfer: None,
    };
    let json = serde_json::to_string(&reported).unwrap();
    let mut tx = store.begin_ingest().unwrap();
    tx.set_reported_state(&DeviceId::new(device).unwrap(), &json, None, "now")
        .unwrap();
    tx.commit().unwrap();
}

const NOTHING: [Step; 0] = [];

#[test]
fn a_phased_rollout_advances_as_devices_succeed_and_halts_above_max_failures() {
    let tmp = hub_with_devices();
    let dir = tmp.path();
    release_key(dir, "release-1");
    tiny_gguf(&dir.join("model.gguf"), "llama", 1500);
    ok(&publish(dir, "model.gguf", "1.0", "release-1"));
    // A third of lab per batch: three batches of one device.
    let args = [
        "--model",
        "smollm2:1.0",
        "--target",
        "group:lab",
        "--batch",
        "33",
        "--activate",
    ];
    ok(&rollout(dir, &args));
    let data = dir.join("data");
    let mut store = SqliteStore::open(&data).unwrap();
    let published = |store: &SqliteStore| -> Vec<String> {
        store
            .current_desired()
            .unwrap()
            .iter()
            .map(|d| d.target.to_string())
            .collect()
    };
    let advance = |store: &mut SqliteStore| -> Vec<Step> {
        rollout::advance(&data, store)
            .unwrap()
            .into_iter()
            .map(|a| a.step)
            .collect()
    };
    assert_eq!(published(&store), ["device:edge-01"]);
    assert_eq!(advance(&mut store), NOTHING);
    report(&mut store, "edge-01", 1, RolloutState::Downloading);
    assert_eq!(advance(&mut store), NOTHING, "batch 0 has not settled");
    report(&mut store, "edge-01", 1, RolloutState::Active);
    assert_eq!(advance(&mut store), [Step::Release(1)]);
    assert_eq!(published(&store), ["device:edge-01", "device:edge-02"]);
    assert_eq!(advance(&mut store), NOTHING, "released once");
    // A report about another rollout says nothing about this one.
    report(&mut store, "edge-02", 7, RolloutState::Failed);
    assert_eq!(advance(&mut store), NOTHING);
    // Without --max-failures a phased rollout tolerates none: one failure halts it.
    report(&mut store, "edge-02", 1, RolloutState::RolledBack);
    assert_eq!(
        advance(&mut store),
        [Step::Halt {
            failures: 1,
            allowed: 0
        }]
    );
    assert_eq!(
        advance(&mut store),
        NOTHING,
        "a halted rollout is left alone"
    );
    let s = status(dir);
    let r = &s["rollouts"][0];
    assert_eq!(r["state"], "halted");
    assert_eq!(r["released_batches"], 2);
    let states: Vec<&str> = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["active", "rolled_back", "pending"]);
    assert_eq!(r["devices"][1]["reason"], "rolled_back here");
    // Halted: serve clears the topics it published (and never publishes edge-03's).
    assert!(store.current_desired().unwrap().iter().all(|d| d.halted));
    assert_eq!(published(&store), ["device:edge-01", "device:edge-02"]);

    // The hub's audit chain holds both decisions, by the hub itself.
    let log = AuditReader::open(&data.join("audit.db")).unwrap();
    let records = log.query(&Query::default()).unwrap();
    let by_hub: Vec<(String, Outcome, String)> = records
        .iter()
        .filter(|r| r.actor == "outpost-hub")
        .map(|r| (r.action.clone(), r.outcome, r.reason.clone()))
        .collect();
    assert_eq!(
        by_hub,
        [
            (
                "rollout:advance".into(),
                Outcome::Allowed,
                "batch 0 settled".into()
            ),
            (
                "rollout:advance".into(),
                Outcome::Success,
                "batch 1 released (1 devices)".into()
            ),
            (
                "rollout:halt".into(),
                Outcome::Allowed,
                "1 devices failed, more than --max-failures 0".into()
            ),
            (
                "rollout:halt".into(),
                Outcome::Success,
                "rollout 1 halted".into()
            ),
        ]
    );
}
