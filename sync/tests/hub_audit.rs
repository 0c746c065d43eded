//! `outpost-hub audit query|export|verify --device ID` as a real process, on a `hub.db` that
//! holds a real device chain: written by the policy crate's `AuditLog` on a "device", the
//! device enrolled with `outpost-hub devices enroll` and its real public key, then its rows
//! put into `hub.db` the way ingest stores them (`record_json` = serde's `Record`, index
//! columns copied; `checkpoint_json` = serde's `Checkpoint`). Every answer is held against
//! the device's own log read through the policy crate (same filters, same export bytes), the
//! export against `docs/verify_audit.py`, and `hub.db` must be byte-identical afterwards.

// A test binary: its helpers panic on what they cannot set up.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_policy::audit::{
    AuditLog, AuditReader, AuditSettings, Checkpoint, Entry, Format, Outcome, Query, Record,
    export, verify_export,
};
use outpost_policy::signing::{KeyPair, PublicKey};
use outpost_sync::hub::store::pg::testing::TestDb;
use rusqlite::{Connection, params};
use tempfile::TempDir;

const HUB: &str = env!("CARGO_BIN_EXE_outpost-hub");
const DEVICE: &str = "edge-01";
/// Records in the device's chain; checkpoints every 5, and one at close.
const RECORDS: u64 = 23;

fn hub(dir: &Path, args: &[&str]) -> Output {
    Command::new(HUB)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exit code, stdout and stderr of a run that must fail.
fn failed(out: &Output) -> (i32, String, String) {
    assert!(!out.status.success(), "succeeded: {out:?}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// A device's chain and its key, written by the real audit log.
struct DeviceLog {
    path: PathBuf,
    key: KeyPair,
    pem: PathBuf,
}

impl DeviceLog {
    fn write(dir: &Path, id: &str, n: u64) -> DeviceLog {
        let key = KeyPair::generate().unwrap();
        let pem = dir.join(format!("{id}.pub.pem"));
        key.public().write(&pem).unwrap();
        std::fs::create_dir_all(dir.join(id)).unwrap();
        let path = dir.join(id).join("audit.db");
        let mut settings = AuditSettings::new(id);
        settings.checkpoint_every = 5;
        let log = AuditLog::open(&path, same_key(&key), settings).unwrap();
        for i in 0..n {
            let (actor, action, outcome) = match i % 4 {
                0 => ("alice", "inference:run", Outcome::Allowed),
                1 => ("bob", "models:activate", Outcome::Denied),
                2 => ("alice", "models:activate", Outcome::Success),
                _ => ("local:root", "models:remove", Outcome::Failure),
            };
            // A reason a spreadsheet would run as a formula, on every fourth record.
            let reason = if i % 4 == 3 {
                format!("=1+1 step {i}")
            } else {
                format!("step {i}")
            };
            let mut e = Entry::new(actor, action, outcome, &reason);
            e.resource = Some(format!("model-{}", i % 3));
            e.roles = vec!["operator".into()];
            e.details = serde_json::json!({"i": i});
            log.append(e).unwrap();
            if i == n / 2 {
                // Records on both sides of a later time, for --since/--until.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        log.close().unwrap();
        DeviceLog { path, key, pem }
    }

    fn reader(&self) -> AuditReader {
        AuditReader::open(&self.path).unwrap()
    }

    fn records(&self, q: &Query) -> Vec<Record> {
        self.reader().query(q).unwrap()
    }

    /// The device's own export, as `outpost audit export` writes it.
    fn export(&self, q: &Query, format: Format, id: &str) -> String {
        let mut out = Vec::new();
        export(
            &self.reader(),
            q,
            format,
            id,
            Some(&self.key.public()),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }
}

/// A second handle on the same key (the log takes one).
fn same_key(key: &KeyPair) -> KeyPair {
    KeyPair::from_pem(&key.private_pem(), Path::new("device.key")).unwrap()
}

/// Puts `log`'s records and checkpoints into `hub.db` as ingest stores them.
fn store_chain(hub_db: &Path, id: &str, log: &DeviceLog) {
    let mut c = Connection::open(hub_db).unwrap();
    let tx = c.transaction().unwrap();
    for r in log.records(&Query::default()) {
        tx.execute(
            "INSERT INTO audit_records (device_id, seq, record_json, hash, received_at, ts, \
             actor, action, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                r.seq as i64,
                serde_json::to_string(&r).unwrap(),
                r.hash,
                "2026-01-01T00:00:00.000Z",
                r.ts,
                r.actor,
                r.action,
                r.outcome.as_str()
            ],
        )
        .unwrap();
    }
    for cp in log.reader().checkpoints().unwrap() {
        tx.execute(
            "INSERT INTO audit_checkpoints (device_id, seq, checkpoint_json, received_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![
                id,
                cp.seq as i64,
                serde_json::to_string(&cp).unwrap(),
                "2026-01-01T00:00:00.000Z"
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn sql(hub_db: &Path, sql: &str) {
    Connection::open(hub_db)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// A hub with two enrolled devices whose chains it holds, and an alert about the first.
struct Fleet {
    tmp: TempDir,
    device: DeviceLog,
    other: DeviceLog,
    /// When set, the audit commands read this PostgreSQL copy (made by `outpost-hub
    /// migrate` from `hub.db`) through `hub-pg.toml`.
    pg: Option<TestDb>,
}

impl Fleet {
    /// [`Fleet::new`], then `hub.db` moved into a PostgreSQL database with `outpost-hub
    /// migrate`, which the audit commands read; `None` without PostgreSQL.
    fn on_postgres() -> Option<Fleet> {
        let db = TestDb::create()?;
        let mut f = Fleet::new();
        let out = ok(&hub(
            f.dir(),
            &["migrate", "--from", "sqlite:data", "--to", db.url()],
        ));
        assert!(out.contains("copied 27 rows of audit_records"), "{out}");
        assert!(out.contains("2 devices, every chain verifies"), "{out}");
        std::fs::write(
            f.dir().join("hub-pg.toml"),
            format!("[hub]\ndata_dir = \"data-pg\"\nstore = \"{}\"\n", db.url()),
        )
        .unwrap();
        f.pg = Some(db);
        // `devices list` says the same of both.
        let list = |base: &[&str]| {
            ok(&hub(
                f.dir(),
                &[base, &["devices", "list", "--json"]].concat(),
            ))
        };
        let sqlite = list(&["--data-dir", "data"]);
        assert_eq!(list(&["--config", "hub-pg.toml"]), sqlite);
        assert!(sqlite.contains("\"edge-02\""), "{sqlite}");
        Some(f)
    }

    fn new() -> Fleet {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path();
        ok(&hub(dir, &["pki", "init", "--out", "pki"]));
        let device = DeviceLog::write(dir, DEVICE, RECORDS);
        let other = DeviceLog::write(dir, "edge-02", 4);
        for (id, log) in [(DEVICE, &device), ("edge-02", &other)] {
            ok(&hub(
                dir,
                &[
                    "--data-dir",
                    "data",
                    "devices",
                    "enroll",
                    "--id",
                    id,
                    "--audit-key",
                    log.pem.to_str().unwrap(),
                    "--pki",
                    "pki",
                    "--out",
                    "out",
                ],
            ));
        }
        let fleet = Fleet {
            tmp,
            device,
            other,
            pg: None,
        };
        store_chain(&fleet.hub_db(), DEVICE, &fleet.device);
        store_chain(&fleet.hub_db(), "edge-02", &fleet.other);
        sql(
            &fleet.hub_db(),
            "INSERT INTO audit_alerts (device_id, at, kind, seq, detail) VALUES
             ('edge-01', '2026-01-02T00:00:00.000Z', 'fork', 12,
              'batch 12..14 does not link to record 11')",
        );
        fleet
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn hub_db(&self) -> PathBuf {
        self.dir().join("data/hub.db")
    }

    /// `outpost-hub --data-dir data audit ARGS` (`--config hub-pg.toml` on PostgreSQL).
    fn audit(&self, args: &[&str]) -> Output {
        let mut all = match self.pg {
            None => vec!["--data-dir", "data", "audit"],
            Some(_) => vec!["--config", "hub-pg.toml", "audit"],
        };
        all.extend_from_slice(args);
        hub(self.dir(), &all)
    }

    fn query_seqs(&self, args: &[&str]) -> Vec<u64> {
        let mut all = vec!["query", "--device", DEVICE, "--json"];
        all.extend_from_slice(args);
        let records: Vec<Record> = serde_json::from_str(&ok(&self.audit(&all))).unwrap();
        assert!(records.iter().all(|r| r.device_id == DEVICE), "{records:?}");
        records.iter().map(|r| r.seq).collect()
    }
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

/// An export without its header's `exported_at` (the one value that differs between runs).
fn without_export_time(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(d) = v.get_mut("device") {
                d.as_object_mut().unwrap().remove("exported_at").unwrap();
            }
            v
        })
        .collect()
}

fn python_verify(export: &Path, pem: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/verify_audit.py");
    Command::new("python3")
        .arg(&script)
        .arg(export)
        .arg("--public-key")
        .arg(pem)
        .output()
        .expect("python3 runs")
}

#[test]
fn query_export_and_verify_read_the_hubs_copy_like_the_device_reads_its_own() {
    query_export_and_verify(Fleet::new());
}

#[test]
fn query_export_and_verify_read_a_postgres_copy_alike() {
    if let Some(f) = Fleet::on_postgres() {
        query_export_and_verify(f);
    }
}

fn query_export_and_verify(f: Fleet) {
    let before = std::fs::read(f.hub_db()).unwrap();
    let all = f.device.records(&Query::default());
    assert_eq!(seqs(&all), (1..=RECORDS).collect::<Vec<_>>());

    // Query, text: the device's lines, for this device only.
    let text = ok(&f.audit(&["query", "--device", DEVICE]));
    let want: Vec<String> = all.iter().map(Record::summary_line).collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), want);
    // --json: the records themselves.
    let json: Vec<Record> =
        serde_json::from_str(&ok(&f.audit(&["query", "--device", DEVICE, "--json"]))).unwrap();
    assert_eq!(json, all);
    let other: Vec<Record> =
        serde_json::from_str(&ok(&f.audit(&["query", "--device", "edge-02", "--json"]))).unwrap();
    assert_eq!(other, f.other.records(&Query::default()));

    // Each filter selects what the device's own reader selects.
    let late_ts = all[(RECORDS / 2 + 1) as usize].ts.clone();
    let cases: Vec<(Vec<&str>, Query)> = vec![
        (
            vec!["--actor", "alice"],
            Query {
                actor: Some("alice".into()),
                ..Query::default()
            },
        ),
        (
            vec!["--action", "models:activate"],
            Query {
                action: Some("models:activate".into()),
                ..Query::default()
            },
        ),
        (
            vec!["--outcome", "denied"],
            Query {
                outcome: Some(Outcome::Denied),
                ..Query::default()
            },
        ),
        (
            vec!["--actor", "alice", "--outcome", "success", "--limit", "3"],
            Query {
                actor: Some("alice".into()),
                outcome: Some(Outcome::Success),
                limit: Some(3),
                ..Query::default()
            },
        ),
        (
            vec!["--limit", "4"],
            Query {
                limit: Some(4),
                ..Query::default()
            },
        ),
        (
            vec!["--since", &late_ts],
            Query {
                since: Some(late_ts.clone()),
                ..Query::default()
            },
        ),
        (
            vec!["--until", &late_ts],
            Query {
                until: Some(late_ts.clone()),
                ..Query::default()
            },
        ),
        (
            vec!["--since", "1h"],
            Query {
                since: Some("2000-01-01T00:00:00.000Z".into()),
                ..Query::default()
            },
        ),
        (
            vec!["--until", "1h"],
            Query {
                until: Some("2000-01-01T00:00:00.000Z".into()),
                ..Query::default()
            },
        ),
    ];
    for (args, q) in cases {
        let want = seqs(&f.device.records(&q));
        assert_eq!(f.query_seqs(&args), want, "{args:?}");
    }
    // The time filter really splits the chain (so the cases above can fail).
    let since = f.query_seqs(&["--since", &late_ts]);
    assert!(
        !since.is_empty() && since.len() < RECORDS as usize,
        "{since:?}"
    );
    assert_eq!(f.query_seqs(&["--until", "1h"]), [] as [u64; 0]);

    // Export, JSONL: the device's own export, byte for byte but the export time; verified by
    // the auditor's script and by the Rust verifier, both pinned to the device key.
    let out = f.audit(&[
        "export",
        "--device",
        DEVICE,
        "--format",
        "jsonl",
        "-o",
        "edge-01.jsonl",
    ]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("Exported {RECORDS} records to edge-01.jsonl.")),
        "{out:?}"
    );
    let exported = std::fs::read_to_string(f.dir().join("edge-01.jsonl")).unwrap();
    assert_eq!(
        without_export_time(&exported),
        without_export_time(&f.device.export(&Query::default(), Format::Jsonl, DEVICE))
    );
    let py = python_verify(&f.dir().join("edge-01.jsonl"), &f.device.pem);
    assert!(py.status.success(), "{py:?}");
    assert!(
        String::from_utf8_lossy(&py.stdout).starts_with(&format!("OK: {RECORDS} records")),
        "{py:?}"
    );
    let report = verify_export(exported.as_bytes(), Some(&f.device.key.public())).unwrap();
    assert!(
        report.ok && report.records == RECORDS && report.signed_through == Some(RECORDS),
        "{report:?}"
    );
    // Against another device's key, both refuse it.
    let py = python_verify(&f.dir().join("edge-01.jsonl"), &f.other.pem);
    assert_eq!(py.status.code(), Some(1), "{py:?}");
    let report = verify_export(exported.as_bytes(), Some(&f.other.key.public())).unwrap();
    assert!(!report.ok, "{report:?}");
    // A time range, to stdout (`--out` is an alias of `-o`).
    let ranged = ok(&f.audit(&["export", "--device", DEVICE, "--since", &late_ts]));
    let q = Query {
        since: Some(late_ts.clone()),
        ..Query::default()
    };
    assert_eq!(
        without_export_time(&ranged),
        without_export_time(&f.device.export(&q, Format::Jsonl, DEVICE))
    );
    assert!(verify_export(ranged.as_bytes(), None).unwrap().ok);
    ok(&f.audit(&["export", "--device", DEVICE, "--out", "again.jsonl"]));
    assert!(f.dir().join("again.jsonl").exists());
    // CSV: the device's CSV, exactly (formula triggers defused the same way).
    let csv = ok(&f.audit(&["export", "--device", DEVICE, "--format", "csv"]));
    assert_eq!(csv, f.device.export(&Query::default(), Format::Csv, DEVICE));
    assert!(csv.contains(",'=1+1 step 3,"), "{csv}");

    // Verify: OK against the enrolled key, the alert shown and counted.
    let text = ok(&f.audit(&["verify", "--device", DEVICE]));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "Audit log OK: {RECORDS} records (seq 1 to {RECORDS}), 5 checkpoint signatures \
                 checked against the pinned device key."
            )
            .as_str()
        ),
        "{text}"
    );
    assert!(
        text.contains("1 alert(s) recorded for device edge-01")
            && text.contains("2026-01-02T00:00:00.000Z fork seq 12: batch 12..14"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&f.audit(&["verify", "--device", DEVICE, "--json"]))).unwrap();
    assert_eq!(
        (
            v["ok"].as_bool(),
            v["device"].as_str(),
            v["records"].as_u64(),
            v["checkpoints"].as_u64(),
            v["signed_through"].as_u64(),
            v["key"].as_str(),
            v["alerts"].as_u64(),
            v["latest_alerts"][0]["kind"].as_str(),
        ),
        (
            Some(true),
            Some(DEVICE),
            Some(RECORDS),
            Some(5),
            Some(RECORDS),
            Some("pinned"),
            Some(1),
            Some("fork")
        ),
        "{v}"
    );
    assert!(v["bad_seq"].is_null() && v["reason"].is_null(), "{v}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&f.audit(&["verify", "--device", "edge-02", "--json"]))).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["alerts"].as_u64()),
        (Some(true), Some(0))
    );
    assert!(
        !ok(&f.audit(&["verify", "--device", "edge-02"])).contains("alert"),
        "edge-02 has no alerts"
    );

    // Refusals: clear errors, exit 1 (2 for usage), nothing created.
    for (args, code, msg) in [
        (
            vec!["query", "--device", "edge-09"],
            1,
            "device edge-09 is not enrolled on this hub",
        ),
        (
            vec!["verify", "--device", "edge-09"],
            1,
            "device edge-09 is not enrolled on this hub",
        ),
        (
            vec!["export", "--device", "edge-09"],
            1,
            "device edge-09 is not enrolled on this hub",
        ),
        (vec!["query", "--device", "a/b"], 1, "is not a valid id"),
        (
            vec!["query", "--device", DEVICE, "--outcome", "maybe"],
            1,
            "--outcome must be allowed, denied, success or failure",
        ),
        (
            vec!["query", "--device", DEVICE, "--since", "yesterday"],
            1,
            "'yesterday' is neither an RFC 3339 time nor an age",
        ),
        (vec!["verify"], 2, "--device"),
        (
            vec!["export", "--device", DEVICE, "--format", "xml"],
            2,
            "xml",
        ),
    ] {
        let (got, _, err) = failed(&f.audit(&args));
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    let (code, _, err) = failed(&hub(
        f.dir(),
        &[
            "--data-dir",
            "nowhere",
            "audit",
            "verify",
            "--device",
            DEVICE,
        ],
    ));
    assert_eq!(code, 1);
    assert!(err.contains("no hub store here"), "{err}");
    assert!(!f.dir().join("nowhere").exists());

    // An auditor changed nothing.
    assert!(
        std::fs::read(f.hub_db()).unwrap() == before,
        "hub.db changed under the read-only commands"
    );
}

/// A checkpoint over `cp`'s record signed by `key`; `claim`: the public key it names.
fn resigned(cp: &Checkpoint, key: &KeyPair, claim: &PublicKey) -> Checkpoint {
    let mut forged = cp.clone();
    forged.public_key = claim.to_hex();
    forged.signature = key.sign_hex(forged.signed_message().as_bytes());
    forged
}

#[test]
fn verify_names_the_first_tampered_seq_of_the_hubs_copy() {
    let f = Fleet::new();
    let pristine = std::fs::read(f.hub_db()).unwrap();
    let checkpoints = f.device.reader().checkpoints().unwrap();
    let cp10 = checkpoints.iter().find(|c| c.seq == 10).unwrap();
    let attacker = KeyPair::generate().unwrap();
    let own_key = f.device.key.public();
    let checkpoint_sql = |cp: &Checkpoint| {
        format!(
            "UPDATE audit_checkpoints SET checkpoint_json = '{}' WHERE device_id = 'edge-01' \
             AND seq = {}",
            serde_json::to_string(cp).unwrap(),
            cp.seq
        )
    };
    let edited = {
        let mut r = f.device.records(&Query::default())[6].clone();
        r.reason = "nothing happened".into();
        serde_json::to_string(&r).unwrap()
    };
    let cases: Vec<(String, u64, &str)> = vec![
        // A record's contents edited, its hash kept.
        (
            format!(
                "UPDATE audit_records SET record_json = '{edited}' WHERE device_id = 'edge-01' \
                 AND seq = 7"
            ),
            7,
            "record 7 does not match its hash (edited)",
        ),
        // A row deleted.
        (
            "DELETE FROM audit_records WHERE device_id = 'edge-01' AND seq = 9".into(),
            9,
            "record 9 is missing (deleted)",
        ),
        // A checkpoint swapped for one signed by another key, naming that key.
        (
            checkpoint_sql(&resigned(cp10, &attacker, &attacker.public())),
            10,
            "checkpoint 10 is signed by another key",
        ),
        // ... or naming the enrolled key, which it is not signed with.
        (
            checkpoint_sql(&resigned(cp10, &attacker, &own_key)),
            10,
            "checkpoint 10 has a bad signature (forged)",
        ),
        // The tail cut, with the checkpoints over it kept.
        (
            "DELETE FROM audit_records WHERE device_id = 'edge-01' AND seq > 20".into(),
            21,
            "(truncated)",
        ),
        // An index column changed, so a query by actor would hide the record.
        (
            "UPDATE audit_records SET actor = 'carol' WHERE device_id = 'edge-01' AND seq = 5"
                .into(),
            5,
            "its actor column says \"carol\"",
        ),
        // A row that is not a record at all.
        (
            "UPDATE audit_records SET record_json = '{\"seq\": 3}' WHERE device_id = 'edge-01' \
             AND seq = 3"
                .into(),
            3,
            "record 3 is malformed: not a record",
        ),
        // Rows renumbered.
        (
            "UPDATE audit_records SET seq = seq + 100 WHERE device_id = 'edge-01' AND seq >= 15"
                .into(),
            15,
            "records 15 to 114 are missing (deleted)",
        ),
    ];
    for (tamper, seq, why) in cases {
        std::fs::write(f.hub_db(), &pristine).unwrap();
        sql(&f.hub_db(), &tamper);
        let (code, stdout, _) = failed(&f.audit(&["verify", "--device", DEVICE]));
        assert_eq!(code, 1, "{tamper}: {stdout}");
        assert!(
            stdout.starts_with(&format!("Audit log FAILED at seq {seq}: ")) && stdout.contains(why),
            "{tamper}: {stdout}"
        );
        let (code, stdout, _) = failed(&f.audit(&["verify", "--device", DEVICE, "--json"]));
        assert_eq!(code, 1);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["bad_seq"].as_u64(), v["key"].as_str()),
            (Some(false), Some(seq), Some("pinned")),
            "{tamper}: {v}"
        );
        // The other device's chain is untouched by all this.
        ok(&f.audit(&["verify", "--device", "edge-02"]));
    }

    // An edited record also fails the exported copy, in both verifiers.
    std::fs::write(f.hub_db(), &pristine).unwrap();
    sql(
        &f.hub_db(),
        &format!(
            "UPDATE audit_records SET record_json = '{edited}' WHERE device_id = 'edge-01' AND \
             seq = 7"
        ),
    );
    ok(&f.audit(&["export", "--device", DEVICE, "-o", "tampered.jsonl"]));
    let py = python_verify(&f.dir().join("tampered.jsonl"), &f.device.pem);
    assert_eq!(py.status.code(), Some(1), "{py:?}");
    let text = std::fs::read_to_string(f.dir().join("tampered.jsonl")).unwrap();
    let report = verify_export(text.as_bytes(), Some(&own_key)).unwrap();
    assert_eq!(report.bad_seq, Some(7), "{report:?}");

    // A checkpoint row that is not a checkpoint: an error naming it, exit 1.
    std::fs::write(f.hub_db(), &pristine).unwrap();
    sql(
        &f.hub_db(),
        "UPDATE audit_checkpoints SET checkpoint_json = 'x' WHERE device_id = 'edge-01' AND \
         seq = 5",
    );
    let (code, _, err) = failed(&f.audit(&["verify", "--device", DEVICE]));
    assert_eq!(code, 1);
    assert!(
        err.contains("checkpoint 5 of device edge-01 is not a checkpoint"),
        "{err}"
    );
}

/// A tmpfs on a temp folder, unmounted on drop; `None` (a skip) where mounting is not
/// allowed, except under `CI=true`.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = TempDir::new().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            other => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "cannot mount a tmpfs under CI=true: {other:?}"
                );
                eprintln!("skipped: cannot mount a tmpfs (needs root): {other:?}");
                None
            }
        }
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.0.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount read-only failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn an_auditor_reads_a_hub_db_on_a_read_only_disk() {
    let f = Fleet::new();
    let Some(fs) = Tmpfs::mount() else {
        return;
    };
    // A copy of the store alone (no WAL index beside it), on a disk nobody can write.
    std::fs::copy(f.hub_db(), fs.0.path().join("hub.db")).unwrap();
    fs.remount_read_only();
    let data = fs.0.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["--data-dir", data, "audit"];
        all.extend_from_slice(args);
        hub(f.dir(), &all)
    };
    let v: serde_json::Value =
        serde_json::from_str(&ok(&run(&["verify", "--device", DEVICE, "--json"]))).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["records"].as_u64()),
        (Some(true), Some(RECORDS)),
        "{v}"
    );
    let records: Vec<Record> = serde_json::from_str(&ok(&run(&[
        "query", "--device", DEVICE, "--json", "--limit", "2",
    ])))
    .unwrap();
    assert_eq!(seqs(&records), [1, 2]);
    let listing: Vec<String> = std::fs::read_dir(fs.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listing, ["hub.db"]);
}
