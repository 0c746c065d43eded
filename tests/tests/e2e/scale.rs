//! The fleet simulator (`fleet-sim`, `bench/scale.py`) run briefly as the scale bench runs
//! it: devices enrolled from the fleet's PKI into the hub's store, a real Mosquitto with TLS
//! from `broker-config`, `outpost-hub serve`, and simulated devices (reconnecting, one
//! writing fast, one replaying old batches, half-open TLS connections beside them) uploading
//! over the real link. At the end the store holds every record each device wrote exactly
//! once and every chain verifies against the enrolled key, all of it signed. The fast writer
//! stays under the hub's default per-device limit here: the limit itself is tested in
//! `sync/tests/serve.rs` (`a_flooding_device_is_limited_and_counted_while_the_others_flow`).

use std::process::Command;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::fleet::Fleet;
use crate::support::workspace_bin;

fn sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(workspace_bin("fleet-sim"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn simulated_devices_upload_every_record_once_and_their_chains_verify() {
    let Some(mut fleet) = Fleet::new() else {
        return;
    };
    let dir = fleet.dir.path().to_path_buf();
    let (data, devices) = (fleet.hub_data(), dir.join("devices"));
    let (ok, text) = sim(&[
        "enroll",
        "--data-dir",
        data.to_str().unwrap(),
        "--pki",
        fleet.pki().to_str().unwrap(),
        "--out",
        devices.to_str().unwrap(),
        "--devices",
        "20",
    ]);
    assert!(ok, "{text}");
    fleet.start_broker();
    fleet.start_hub();
    let report = dir.join("run.json");
    let broker = format!("mqtts://127.0.0.1:{}", fleet.port());
    let (ok, text) = sim(&[
        "run",
        "--dir",
        devices.to_str().unwrap(),
        "--broker",
        &broker,
        "--devices",
        "20",
        "--interval",
        "0.2",
        "--duration",
        "5",
        "--drain",
        "60",
        "--ack-timeout",
        "3",
        "--checkpoint-every",
        "7",
        "--reconnect-every",
        "2",
        "--flooders",
        "1",
        "--flood-rate",
        "100",
        "--replayers",
        "1",
        "--replay-every",
        "0.5",
        "--half-open",
        "20",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{text}\n{}", fleet.logs());
    let run: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let written = run["written"].as_u64().unwrap();
    assert!(written >= 20 * 20, "{text}");
    assert_eq!(run["acked"].as_u64(), Some(written), "{text}");
    assert!(run["replays"].as_u64().unwrap() > 0, "{text}");
    assert!(
        run["connects"].as_u64().unwrap() > 20,
        "no reconnect: {text}"
    );

    // Every chain verifies in the hub's store, all signed, with what each device wrote.
    let (ok, text) = sim(&[
        "verify",
        "--data-dir",
        data.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("20 whole"), "{text}");
    // And the rows say the same: seqs 1..=written per device, each once.
    let db =
        Connection::open_with_flags(data.join("hub.db"), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    for d in run["per_device"].as_array().unwrap() {
        let id = d["id"].as_str().unwrap();
        let (count, distinct, max): (u64, u64, u64) = db
            .query_row(
                "SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0)
                 FROM audit_records WHERE device_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let w = d["written"].as_u64().unwrap();
        assert_eq!((count, distinct, max), (w, w, w), "{id}");
    }
    // The hub's own command agrees for one of them.
    let out = fleet.hub_cli(&["audit", "verify", "--device", "sim-00000"]);
    assert!(out.stdout.contains("Audit log OK"), "{out:?}");
}
