//! Identities, permissions and the audit log through the real binary: decisions by role,
//! keys that OpenSSL and PyJWT read, tampering with the log and with exports caught by both
//! `outpost audit verify` and the auditor's own Python script, crash safety of the writer,
//! and privileged actions failing closed on a full disk.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::{Device, Run, Tmpfs, skip, venv_python, workspace_bin};
use outpost_engine::testing::GgufBuilder;
use outpost_policy::audit::{Checkpoint, Record};
use outpost_policy::signing::KeyPair;

const ISS: &str = "https://admin.example";

/// A device with one configured issuer key (`admin-1`) whose private key the test holds.
struct Secured {
    d: Device,
    issuer_key: PathBuf,
}

impl Secured {
    fn new() -> Self {
        Self::with_data(None)
    }

    fn with_data(data: Option<PathBuf>) -> Self {
        let d = data.map_or_else(Device::new, Device::with_data);
        let keys = d.issuer_keys("admin-1");
        std::fs::write(
            &d.config,
            format!(
                "[device]\nid = \"edge-1\"\ngroups = [\"lab\"]\n\
                 [auth]\nrevoked = \"{revoked}\"\n\
                 [[auth.issuers]]\niss = \"{ISS}\"\nkid = \"admin-1\"\nalgorithm = \"EdDSA\"\n\
                 public_key = \"{public}\"\n",
                revoked = d.root.path().join("revoked.json").display(),
                public = keys.join("admin-1.pub.pem").display(),
            ),
        )
        .unwrap();
        std::fs::write(
            d.root.path().join("revoked.json"),
            r#"{"sub": ["mallory"]}"#,
        )
        .unwrap();
        Self {
            issuer_key: keys.join("admin-1.key.pem"),
            d,
        }
    }

    fn token(&self, sub: &str, roles: &str, extra: &[&str]) -> String {
        let key = self.issuer_key.to_str().unwrap();
        let mut args = vec!["token", "issue", "--key", key, "--iss", ISS];
        if !extra.contains(&"--kid") {
            args.extend(["--kid", "admin-1"]);
        }
        args.extend(["--sub", sub, "--role", roles]);
        args.extend_from_slice(extra);
        self.d.run(&args).ok().trim().to_string()
    }

    fn check(&self, token: &str, action: &str, resource: Option<&str>) -> Run {
        let mut args = vec![
            "auth", "check", "--token", token, "--action", action, "--json",
        ];
        // `--resource=VALUE`: a value may start with '-'.
        let resource = resource.map(|r| format!("--resource={r}"));
        args.extend(resource.as_deref());
        self.d.run(&args)
    }

    fn export(&self, name: &str) -> PathBuf {
        let path = self.d.root.path().join(name);
        self.d
            .run(&["audit", "export", "-o", path.to_str().unwrap()])
            .ok();
        path
    }
}

/// (allowed, reason) of an `auth check --json`, with the exit code matching.
fn decision(run: &Run) -> (bool, String) {
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let allowed = v["allowed"].as_bool().unwrap();
    assert_eq!(run.code, Some(if allowed { 0 } else { 1 }), "{run:?}");
    (allowed, v["reason"].as_str().unwrap().to_string())
}

#[test]
fn each_role_gets_what_the_policy_says_and_every_decision_is_audited() {
    let s = Secured::new();
    let operator = s.token("olivia", "operator", &[]);
    let auditor = s.token("aude", "auditor", &[]);
    let app = s.token("svc", "app", &["--models", "smollm2*"]);
    let admin = s.token("root-admin", "admin", &["--aud", "lab"]);
    let cases = [
        (&operator, "inference:run", Some("smollm2"), true),
        (&operator, "models:write", Some("smollm2"), false),
        (&auditor, "audit:export", None, true),
        (&auditor, "models:activate", Some("smollm2"), false),
        (&app, "inference:run", Some("smollm2:2"), true),
        (&app, "inference:run", Some("gemma3"), false),
        (&admin, "policy:write", None, true),
    ];
    for (token, action, resource, allowed) in cases {
        let (got, reason) = decision(&s.check(token, action, resource));
        assert_eq!(got, allowed, "{action} {resource:?}: {reason}");
    }
    let refused = [
        (s.token("x", "auditor,admin", &[]), "separation of duties"),
        (
            s.token("mallory", "admin", &[]),
            "revoked (subject mallory)",
        ),
        (
            s.token("y", "admin", &["--aud", "edge-2"]),
            "audience does not name this device",
        ),
        (
            s.token("z", "admin", &["--kid", "admin-9"]),
            "unknown kid 'admin-9'",
        ),
        ("not-a-token".to_string(), "malformed token"),
    ];
    for (token, why) in &refused {
        let (allowed, reason) = decision(&s.check(token, "device:read", None));
        assert!(!allowed && reason.contains(why), "{why}: {reason}");
    }

    let records = s.d.run(&["audit", "query", "--json"]).json();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), cases.len() + refused.len());
    assert_eq!(records[0]["actor"], "olivia");
    assert_eq!(records[0]["outcome"], "allowed");
    assert_eq!(records[1]["outcome"], "denied");
    assert_eq!(records.last().unwrap()["actor"], "unauthenticated");
    let denied =
        s.d.run(&["audit", "query", "--outcome", "denied", "--json"])
            .json();
    assert_eq!(denied.as_array().unwrap().len(), 3 + refused.len());
    s.d.run(&["audit", "verify"]).ok();
}

#[test]
fn a_bad_issuer_key_is_a_configuration_error() {
    let s = Secured::new();
    std::fs::write(s.d.root.path().join("keys/admin-1.pub.pem"), "not a key").unwrap();
    s.d.run(&["config", "check"])
        .fails(78, "key `auth.issuers` (kid admin-1)");
    let t = "x.y.z";
    s.d.run(&["auth", "check", "--token", t, "--action", "device:read"])
        .fails(78, "not a EdDSA public key");
}

/// Edits `audit.db` as an attacker with the file would: triggers dropped, then `sql`.
fn tamper(data: &Path, sql: &str) {
    let c = rusqlite::Connection::open(data.join("audit.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_no_update; DROP TRIGGER records_no_delete;
         DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
}

fn seeded_device() -> Secured {
    let s = Secured::new();
    let t = s.token("olivia", "operator", &[]);
    for i in 0..12 {
        let resource = format!("m{i}");
        s.check(&t, "inference:run", Some(&resource));
    }
    s
}

#[test]
fn audit_verify_names_the_first_tampered_seq() {
    let cases = [
        (
            "UPDATE records SET actor = 'mallory' WHERE seq = 5",
            5,
            "(edited)",
        ),
        ("DELETE FROM records WHERE seq = 7", 7, "(deleted)"),
        (
            "UPDATE records SET seq = -1 WHERE seq = 3; UPDATE records SET seq = 3 WHERE seq = 4;
             UPDATE records SET seq = 4 WHERE seq = -1;",
            3,
            "does not link",
        ),
        ("DELETE FROM records WHERE seq > 9", 10, "(truncated)"),
        (
            "UPDATE checkpoints SET signature = '00' || substr(signature, 3) WHERE seq = 12",
            12,
            "(forged)",
        ),
    ];
    for (sql, seq, why) in cases {
        let s = seeded_device();
        s.d.run(&["audit", "verify"]).ok();
        tamper(&s.d.data, sql);
        let out = s.d.run(&["audit", "verify"]);
        assert_eq!(out.code, Some(1), "{sql}: {out:?}");
        assert!(
            out.stdout.contains(&format!("FAILED at seq {seq}")),
            "{sql}: {out:?}"
        );
        assert!(out.stdout.contains(why), "{sql}: {out:?}");
        let v: serde_json::Value =
            serde_json::from_str(&s.d.run(&["audit", "verify", "--json"]).stdout).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["bad_seq"].as_u64()),
            (Some(false), Some(seq))
        );
    }
}

#[test]
fn an_auditor_verifies_an_export_with_their_own_script() {
    let s = seeded_device();
    let pem = s.d.root.path().join("device.pub.pem");
    std::fs::write(&pem, s.d.run(&["keys", "device"]).ok()).unwrap();
    let export = s.export("audit.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/verify_audit.py");
    let py = |file: &Path| {
        Command::new("python3")
            .arg(&script)
            .arg(file)
            .arg("--public-key")
            .arg(&pem)
            .output()
            .expect("python3 runs")
    };
    let ok = py(&export);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).starts_with("OK: 12 records"),
        "{ok:?}"
    );
    // The same export through the Rust verifier, pinned to the same key.
    s.d.run(&[
        "audit",
        "verify",
        "--export",
        export.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
    ])
    .ok();

    let text = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[6] = lines[6].replace("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"");
    let tampered = s.d.root.path().join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let bad = py(&tampered);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad.stdout).trim(),
        "FAILED at seq 6: record 6 does not match its hash (edited)"
    );
    let out =
        s.d.run(&["audit", "verify", "--export", tampered.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.contains("FAILED at seq 6"), "{out:?}");
}

#[test]
fn reading_the_audit_log_changes_nothing() {
    let s = seeded_device();
    let db = s.d.data.join("audit.db");
    let before = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
        .unwrap();
    s.d.run(&["audit", "query"]).ok();
    s.d.run(&["audit", "tail", "-n", "3"]).ok();
    s.d.run(&["audit", "verify"]).ok();
    s.export("again.jsonl");
    let csv = s.d.run(&["audit", "export", "--format", "csv"]);
    assert!(csv.ok().starts_with("seq,ts,device_id,actor"), "{csv:?}");
    let after = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM records", [], |r| r.get::<_, i64>(0))
        .unwrap();
    assert_eq!(before, after);
}

/// The writer killed mid-stream, again and again: every acknowledged record is there and
/// the chain verifies after each crash.
#[test]
fn kill_9_of_the_audit_writer_loses_nothing_acknowledged() {
    let d = Device::new();
    std::fs::write(&d.config, "[device]\nid = \"edge-1\"\n").unwrap();
    let seed: u64 = rand::random();
    eprintln!("audit crash test seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acknowledged = 0u64;
    for _ in 0..6 {
        let mut child = Command::new(workspace_bin("audit-writer"))
            .arg(&d.data)
            .arg("edge-1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in BufReader::new(stdout).lines() {
                match line.ok().and_then(|l| l.trim().parse().ok()) {
                    Some(seq) => last = seq,
                    None => break,
                }
            }
            last
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        child.kill().unwrap();
        child.wait().unwrap();
        let last = reader.join().unwrap();
        assert!(
            last >= acknowledged,
            "seqs only grow: {last} after {acknowledged}"
        );
        acknowledged = last;
        let v: serde_json::Value =
            serde_json::from_str(&d.run(&["audit", "verify", "--json"]).stdout).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert!(
            v["last_seq"].as_u64().unwrap() >= acknowledged,
            "{v} < {acknowledged}"
        );
    }
    assert!(acknowledged > 0, "the writer acknowledged nothing");
}

#[test]
fn privileged_actions_fail_closed_on_a_full_disk() {
    let Some(fs) = Tmpfs::mount(2 << 20) else {
        return;
    };
    let s = Secured::with_data(Some(fs.path().join("data")));
    let model = s.d.file("m.gguf", &GgufBuilder::llama_like().build());
    s.d.import(&model, "m", &[]).ok();
    // Fill the disk to the last byte.
    let filler = fs.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let _ = std::io::Write::write_all(&mut f, &[0u8; 512]);
    let _ = f.sync_all();
    let out = s.d.run(&["models", "activate", "m"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    out.fails(1, "No space left on device");
    // Reading still works, and nothing changed.
    assert_eq!(s.d.models(), vec![("m:1".to_string(), vec![])]);
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    s.d.run(&["models", "activate", "m"]).ok();
    s.d.run(&["audit", "verify"]).ok();
}

/// A key `outpost keys generate` wrote is read by the administrator's own tools: OpenSSL 3
/// (`openssl pkey`) and PyJWT (through Python's `cryptography`), whose token the agent accepts.
#[test]
fn generated_keys_work_in_openssl_and_pyjwt() {
    let s = Secured::new();
    let pem = std::fs::read_to_string(&s.issuer_key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    match Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&s.issuer_key)
        .output()
    {
        Ok(o) => assert!(o.status.success(), "openssl pkey refused the key: {o:?}"),
        Err(e) => {
            skip::<()>(&format!("cannot run openssl: {e}"));
            return;
        }
    }
    let Some(python) = venv_python("jwt") else {
        return;
    };
    let sign = r#"
import sys, time, jwt
key = open(sys.argv[1]).read()
now = int(time.time())
claims = {"sub": "pyjwt-admin", "iss": sys.argv[2], "aud": "edge-1", "roles": ["admin"],
          "iat": now, "nbf": now, "exp": now + 300, "jti": "from-pyjwt"}
print(jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "admin-1"}))
"#;
    let out = Command::new(python)
        .args(["-c", sign])
        .arg(&s.issuer_key)
        .arg(ISS)
        .output()
        .unwrap();
    assert!(out.status.success(), "PyJWT could not sign: {out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let run = s.check(&token, "device:read", None);
    let (allowed, reason) = decision(&run);
    assert!(allowed, "{reason}");
    assert_eq!(reason, "role admin grants device:read");
    assert_eq!(run.json()["subject"], "pyjwt-admin");
}

/// An export's lines, to tamper with as an attacker holding the file would.
struct ExportLines(Vec<serde_json::Value>);

impl ExportLines {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        Self(
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }

    fn write(&self, path: &Path) {
        let text: Vec<String> = self.0.iter().map(|v| v.to_string()).collect();
        std::fs::write(path, text.join("\n") + "\n").unwrap();
    }

    fn seqs(&self, kind: &str) -> Vec<u64> {
        self.0
            .iter()
            .filter_map(|v| v.get(kind).map(|x| x["seq"].as_u64().unwrap()))
            .collect()
    }

    fn checkpoint(&mut self, seq: u64) -> &mut serde_json::Value {
        self.0
            .iter_mut()
            .filter_map(|v| v.get_mut("checkpoint"))
            .find(|c| c["seq"] == seq)
            .unwrap()
    }

    /// Drops the lines of `kind` whose seq `cut` selects.
    fn drop_where(&mut self, kind: &str, cut: impl Fn(u64) -> bool) {
        self.0
            .retain(|v| v.get(kind).is_none_or(|x| !cut(x["seq"].as_u64().unwrap())));
    }

    /// Record `seq` edited by `edit`, then it and every later record re-hashed and re-linked:
    /// a chain that holds on its own.
    fn rewrite_from(&mut self, seq: u64, edit: impl Fn(&mut Record)) {
        let mut prev: Option<String> = None;
        for v in self.0.iter_mut().filter(|v| v.get("record").is_some()) {
            let mut r: Record = serde_json::from_value(v["record"].clone()).unwrap();
            if r.seq < seq {
                continue;
            }
            if r.seq == seq {
                edit(&mut r);
            }
            if let Some(p) = prev {
                r.prev_hash = p;
            }
            r.hash = r.compute_hash();
            prev = Some(r.hash.clone());
            v["record"] = serde_json::to_value(&r).unwrap();
        }
    }
}

/// Both verifiers on `export`, pinned to `pem`: (exit code, stdout) of `outpost audit verify
/// --export` and of `docs/verify_audit.py`.
fn verify_both(d: &Device, export: &Path, pem: &Path) -> [(&'static str, Option<i32>, String); 2] {
    let rust = d.run(&[
        "audit",
        "verify",
        "--export",
        export.to_str().unwrap(),
        "--public-key",
        pem.to_str().unwrap(),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/verify_audit.py");
    let py = Command::new("python3")
        .arg(&script)
        .arg(export)
        .arg("--public-key")
        .arg(pem)
        .output()
        .expect("python3 runs");
    [
        ("outpost audit verify", rust.code, rust.stdout),
        (
            "verify_audit.py",
            py.status.code(),
            String::from_utf8_lossy(&py.stdout).into_owned(),
        ),
    ]
}

#[test]
fn both_verifiers_refuse_every_tampered_export() {
    // Single-record commands (a checkpoint after each) and imports (two records, one
    // checkpoint): some records are signed directly, others only through the next checkpoint.
    let s = seeded_device();
    let model = s.d.file("m.gguf", &GgufBuilder::llama_like().build());
    for name in ["m1", "m2"] {
        s.d.import(&model, name, &[]).ok();
    }
    let pem = s.d.root.path().join("device.pub.pem");
    std::fs::write(&pem, s.d.run(&["keys", "device"]).ok()).unwrap();
    let keys = s.d.issuer_keys("attacker");
    let attacker = KeyPair::load(&keys.join("attacker.key.pem")).unwrap();
    let attacker_pem = keys.join("attacker.pub.pem");
    let export = s.export("audit.jsonl");
    let clean = ExportLines::read(&export);
    let records = clean.seqs("record");
    let checkpoints = clean.seqs("checkpoint");
    let last = *records.last().unwrap();
    assert_eq!(records, (1..=last).collect::<Vec<_>>());
    // A record signed only through a later checkpoint (an import's intent record).
    let unsigned = *records
        .iter()
        .find(|r| !checkpoints.contains(r))
        .expect("an import leaves a record between checkpoints");
    let next_cp = *checkpoints.iter().find(|c| **c > unsigned).unwrap();
    assert!(
        checkpoints.len() >= 3 && next_cp > unsigned,
        "{checkpoints:?}"
    );
    let last_cp = *checkpoints.last().unwrap();

    for (name, code, stdout) in verify_both(&s.d, &export, &pem) {
        assert_eq!(
            code,
            Some(0),
            "{name} refused the untouched export: {stdout}"
        );
        assert!(
            stdout.contains(&format!("{last} records")),
            "{name}: {stdout}"
        );
    }

    type Tamper = Box<dyn Fn(&mut ExportLines)>;
    let cases: Vec<(&str, Tamper, bool, u64, String)> = vec![
        (
            "a checkpoint re-signed by another key",
            Box::new(move |e: &mut ExportLines| {
                let cp = e.checkpoint(last_cp);
                let mut c: Checkpoint = serde_json::from_value(cp.clone()).unwrap();
                c.public_key = attacker.public_hex();
                c.signature = attacker.sign_hex(c.signed_message().as_bytes());
                *cp = serde_json::to_value(&c).unwrap();
            }),
            false,
            last_cp,
            format!("checkpoint {last_cp} is signed by another key"),
        ),
        (
            "a wrong pinned key",
            Box::new(|_: &mut ExportLines| {}),
            true,
            checkpoints[0],
            format!("checkpoint {} is signed by another key", checkpoints[0]),
        ),
        (
            "a flipped signature bit",
            Box::new(move |e: &mut ExportLines| {
                let cp = e.checkpoint(next_cp);
                let sig = cp["signature"].as_str().unwrap();
                let mut bytes = hex::decode(sig).unwrap();
                bytes[17] ^= 0x04;
                cp["signature"] = hex::encode(bytes).into();
            }),
            false,
            next_cp,
            format!("checkpoint {next_cp} has a bad signature (forged)"),
        ),
        (
            "a deleted record",
            Box::new(|e: &mut ExportLines| e.drop_where("record", |s| s == 5)),
            false,
            5,
            "record 5 is missing (deleted)".into(),
        ),
        (
            "the first record deleted",
            Box::new(|e: &mut ExportLines| e.drop_where("record", |s| s == 1)),
            false,
            1,
            "record 1 is missing (deleted)".into(),
        ),
        (
            "the tail truncated below a signed checkpoint",
            Box::new(move |e: &mut ExportLines| e.drop_where("record", |s| s > unsigned)),
            false,
            unsigned + 1,
            format!(
                "records end at seq {unsigned}, but checkpoint {next_cp} was signed over more (truncated)"
            ),
        ),
        (
            "history rewritten and re-hashed after a signed checkpoint",
            Box::new(move |e: &mut ExportLines| {
                e.rewrite_from(unsigned, |r| r.actor = "mallory".into())
            }),
            false,
            next_cp,
            format!("record {next_cp} differs from its signed checkpoint (rewritten)"),
        ),
        (
            "history rewritten and every checkpoint removed",
            Box::new(|e: &mut ExportLines| {
                e.rewrite_from(3, |r| r.outcome = outpost_policy::audit::Outcome::Denied);
                e.drop_where("checkpoint", |_| true);
            }),
            false,
            1,
            "no checkpoint covers these records".into(),
        ),
    ];
    let tampered = s.d.root.path().join("tampered.jsonl");
    for (what, tamper, wrong_key, seq, why) in cases {
        let mut lines = ExportLines::read(&export);
        tamper(&mut lines);
        lines.write(&tampered);
        let key = if wrong_key { &attacker_pem } else { &pem };
        for (name, code, stdout) in verify_both(&s.d, &tampered, key) {
            assert_eq!(code, Some(1), "{name} accepted {what}: {stdout}");
            assert!(
                stdout.contains(&format!("FAILED at seq {seq}: ")) && stdout.contains(&why),
                "{name} on {what}: expected seq {seq} and {why:?}, got {stdout:?}"
            );
        }
    }
}

/// A key error is one line that names its cause once (not again as the error's source).
#[test]
fn an_unreadable_device_key_is_reported_once() {
    let d = Device::new();
    std::fs::create_dir_all(d.data.join("device.key")).unwrap();
    let out = d.run(&["keys", "device"]);
    out.fails(1, "device.key: Is a directory");
    assert_eq!(out.stderr.matches("Is a directory").count(), 1, "{out:?}");
}

/// The records' seqs of `audit query --json ARGS`.
const NONE: [u64; 0] = [];

fn seqs(s: &Secured, args: &[&str]) -> Vec<u64> {
    let mut all = vec!["audit", "query", "--json"];
    all.extend_from_slice(args);
    s.d.run(&all)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect()
}

#[test]
fn audit_query_takes_rfc3339_times_and_ages() {
    let s = seeded_device();
    let all = seqs(&s, &[]);
    assert_eq!(all, (1..=12).collect::<Vec<_>>());
    let records = s.d.run(&["audit", "query", "--json"]).json();
    let ts = |seq: usize| records[seq - 1]["ts"].as_str().unwrap().to_string();
    // RFC 3339, in the log's own form: --since includes its instant, --until excludes it.
    let t5 = ts(5);
    assert!(ts(4) < t5, "distinct instants: {records}");
    assert_eq!(seqs(&s, &["--since", &t5]), (5..=12).collect::<Vec<_>>());
    assert_eq!(seqs(&s, &["--until", &t5]), (1..=4).collect::<Vec<_>>());
    assert_eq!(
        seqs(&s, &["--since", &ts(3), "--until", &ts(9)]),
        (3..=8).collect::<Vec<_>>()
    );
    // With other offsets.
    assert_eq!(seqs(&s, &["--since", "2000-01-01T02:00:00+02:00"]), all);
    assert_eq!(seqs(&s, &["--until", "2000-01-01T02:00:00+02:00"]), NONE);
    assert_eq!(seqs(&s, &["--until", "2999-01-01T00:00:00-05:00"]), all);
    // Ages: everything was written in the last minutes, nothing before.
    for age in ["30m", "7d", "2h", "600s"] {
        assert_eq!(seqs(&s, &["--since", age]), all, "--since {age}");
        assert_eq!(seqs(&s, &["--until", age]), NONE, "--until {age}");
    }
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        seqs(&s, &["--since", "1s"]),
        NONE,
        "nothing in the last second"
    );
    s.d.run(&["audit", "query", "--since", "yesterday"])
        .fails(1, "'yesterday' is neither an RFC 3339 time nor an age");
    // Exports take the same range.
    let out =
        s.d.run(&["audit", "export", "--format", "csv", "--since", &t5]);
    assert_eq!(out.ok().lines().count(), 1 + 8, "{out:?}");
}

#[test]
fn audit_tail_follow_prints_records_as_they_are_appended() {
    let s = seeded_device();
    let mut child =
        s.d.command()
            .args(["audit", "tail", "-f", "-n", "2", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a record within 20 s");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    assert_eq!(next()["seq"], 11);
    assert_eq!(next()["seq"], 12);
    // Records appended by another process appear, in order, while it runs.
    let t = s.token("olivia", "operator", &[]);
    s.check(&t, "inference:run", Some("followed-1"));
    s.check(&t, "inference:run", Some("followed-2"));
    let (a, b) = (next(), next());
    assert_eq!((a["seq"].as_u64(), b["seq"].as_u64()), (Some(13), Some(14)));
    assert_eq!(
        (a["resource"].as_str(), b["resource"].as_str()),
        (Some("followed-1"), Some("followed-2"))
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "-f keeps following until stopped"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The claims of a JWT, decoded without checking anything.
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&base64url(payload)).unwrap()
}

fn base64url(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => panic!("not base64url: {s}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn token_issue_ttl_sets_the_lifetime() {
    let s = Secured::new();
    for (ttl, secs) in [
        (None, 3600),
        (Some("90s"), 90),
        (Some("30m"), 1800),
        (Some("2h"), 7200),
        (Some("7d"), 7 * 86400),
    ] {
        let extra: Vec<&str> = ttl.map(|t| vec!["--ttl", t]).unwrap_or_default();
        let c = claims(&s.token("olivia", "operator", &extra));
        let lifetime = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
        assert_eq!(lifetime, secs, "--ttl {ttl:?}: {c}");
    }
    let key = s.issuer_key.to_str().unwrap();
    s.d.run(&[
        "token", "issue", "--key", key, "--iss", ISS, "--kid", "admin-1", "--sub", "x", "--role",
        "admin", "--ttl", "forever",
    ])
    .fails(1, "forever");
}

/// Parses RFC 4180 CSV: quoted cells may hold commas, quotes, CR and LF.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, c) => cell.push(c),
        }
    }
    if !cell.is_empty() || !row.is_empty() {
        row.push(cell);
        rows.push(row);
    }
    rows
}

#[test]
fn csv_exports_defuse_every_formula_trigger() {
    let s = Secured::new();
    let t = s.token("olivia", "operator", &[]);
    // Values a spreadsheet would run (=, +, -, @), or that some treat as such (tab, CR, a
    // pipe for DDE, a percent sign for encoded input), and one plain value.
    let hostile = [
        "=HYPERLINK(\"http://x\")",
        "+1+1",
        "-2+3",
        "@SUM(A1)",
        "\tTAB",
        "\rCR",
        "|calc",
        "%0A",
        "plain",
    ];
    for value in hostile {
        s.check(&t, "inference:run", Some(value));
    }
    let csv = s.d.run(&["audit", "export", "--format", "csv"]);
    let rows = parse_csv(csv.ok());
    let header = &rows[0];
    let col = header.iter().position(|h| h == "resource").unwrap();
    assert_eq!(rows.len(), 1 + hostile.len(), "{rows:?}");
    for (row, value) in rows[1..].iter().zip(hostile) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        let want = if value == "plain" {
            value.to_string()
        } else {
            format!("'{value}")
        };
        assert_eq!(row[col], want, "{value:?} in {row:?}");
    }
}
