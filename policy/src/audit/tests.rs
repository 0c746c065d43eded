//! The audit log on real SQLite files: appends, checkpoints, and every kind of tampering.

use super::record::hash_hex;
use super::*;
use crate::jcs;
use crate::signing::KeyPair;
use rusqlite::Connection;
use serde_json::json;

struct Fixture {
    dir: tempfile::TempDir,
    key: KeyPair,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            key: KeyPair::generate().unwrap(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("audit.db")
    }

    fn key(&self) -> KeyPair {
        KeyPair::from_pem(&self.key.private_pem(), Path::new("k")).unwrap()
    }

    fn log(&self, every: u64) -> AuditLog {
        let mut s = AuditSettings::new("edge-1");
        s.checkpoint_every = every;
        AuditLog::open(&self.path(), self.key(), s).unwrap()
    }

    /// Appends `n` records and closes the log (a checkpoint at the end).
    fn write(&self, n: u64, every: u64) {
        let log = self.log(every);
        let pending: Vec<_> = (0..n).map(|i| log.submit(entry(i))).collect();
        for p in pending {
            p.wait().unwrap();
        }
        log.close().unwrap();
    }

    /// Runs SQL against the file as an attacker would: triggers dropped first.
    fn tamper(&self, sql: &str) {
        let c = Connection::open(self.path()).unwrap();
        c.execute_batch(
            "DROP TRIGGER records_no_update; DROP TRIGGER records_no_delete;
             DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;",
        )
        .unwrap();
        c.execute_batch(sql).unwrap();
    }

    /// The one helper: verify with the pinned key; `None` = ok, else (bad seq, reason part).
    fn check(&self, expect: Option<(u64, &str)>) {
        let reader = AuditReader::open(&self.path()).unwrap();
        let report = verify_log(&reader, Some(&self.key.public())).unwrap();
        match expect {
            None => assert!(report.ok, "{report:?}"),
            Some((seq, why)) => {
                assert!(!report.ok, "tampering went unnoticed: {report:?}");
                assert_eq!(report.bad_seq, Some(seq), "{report:?}");
                let reason = report.reason.unwrap();
                assert!(reason.contains(why), "expected {why:?} in {reason:?}");
            }
        }
    }
}

fn entry(i: u64) -> Entry {
    let mut e = Entry::new(
        "alice",
        "inference:run",
        Outcome::Allowed,
        "role operator grants it",
    );
    e.roles = vec!["operator".into()];
    e.resource = Some(format!("model-{i}"));
    e.request_id = Some(format!("req-{i}"));
    e.policy_version = Some(3);
    e.details = json!({"prompt_sha256": "ab".repeat(32), "prompt_tokens": i, "note": "é\n\"q\""});
    e
}

#[test]
fn the_hand_written_canonical_form_is_rfc_8785() {
    let mut r = Record {
        seq: 7,
        ts: "2026-11-26T10:00:00.000Z".into(),
        device_id: "edge-1".into(),
        actor: "local:root \u{1}\"\\".into(),
        roles: vec!["a".into(), "b\u{2028}".into()],
        action: "models:write".into(),
        resource: None,
        outcome: Outcome::Failure,
        reason: "disk full 💾".into(),
        request_id: None,
        policy_version: None,
        details: json!({"z": 1, "a": [1.5, null, true], "é": {"x": -0.0}}),
        prev_hash: GENESIS.into(),
        hash: String::new(),
    };
    let mut generic = serde_json::to_value(&r).unwrap();
    generic.as_object_mut().unwrap().remove("hash");
    let expect = hash_hex(&jcs::to_string(&generic).unwrap());
    assert_eq!(r.compute_hash(), expect);
    r.resource = Some("m".into());
    r.request_id = Some("id".into());
    r.policy_version = Some(12);
    let mut generic = serde_json::to_value(&r).unwrap();
    generic.as_object_mut().unwrap().remove("hash");
    assert_eq!(
        r.compute_hash(),
        hash_hex(&jcs::to_string(&generic).unwrap())
    );
}

#[test]
fn appends_form_a_chain_that_verifies() {
    let f = Fixture::new();
    let log = f.log(1000);
    let a = log.append(entry(0)).unwrap();
    let b = log.append(entry(1)).unwrap();
    assert_eq!((a.seq, b.seq), (1, 2));
    assert_eq!(a.prev_hash, GENESIS);
    assert_eq!(b.prev_hash, a.hash);
    assert_eq!(a.hash, a.compute_hash());
    assert_eq!(a.device_id, "edge-1");
    assert!(a.ts.ends_with('Z') && a.ts.len() == 24);
    drop(log);
    let reader = AuditReader::open(&f.path()).unwrap();
    assert_eq!(reader.query(&Query::default()).unwrap(), vec![a, b]);
    f.check(None);
}

#[test]
fn many_waiting_appends_share_commits_and_stay_contiguous() {
    let f = Fixture::new();
    f.write(5000, 1000);
    let reader = AuditReader::open(&f.path()).unwrap();
    let all = reader.query(&Query::default()).unwrap();
    assert_eq!(all.len(), 5000);
    assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
    let cps = reader.checkpoints().unwrap();
    assert_eq!(
        cps.iter().map(|c| c.seq).next_back(),
        Some(5000),
        "close signs the tail"
    );
    assert!(cps.len() >= 2, "every 1000 records: {cps:?}");
    f.check(None);
}

#[test]
fn two_writers_on_one_file_never_fork_the_chain() {
    let f = Fixture::new();
    let (a, b) = (f.log(100), f.log(100));
    std::thread::scope(|s| {
        s.spawn(|| (0..300).for_each(|i| drop(a.append(entry(i)).unwrap())));
        s.spawn(|| (0..300).for_each(|i| drop(b.append(entry(i)).unwrap())));
    });
    drop((a, b));
    f.check(None);
    let reader = AuditReader::open(&f.path()).unwrap();
    assert_eq!(reader.query(&Query::default()).unwrap().len(), 600);
}

#[test]
fn updates_and_deletes_are_refused_by_the_database() {
    let f = Fixture::new();
    f.write(3, 1000);
    let c = Connection::open(f.path()).unwrap();
    for sql in [
        "UPDATE records SET actor = 'mallory' WHERE seq = 1",
        "DELETE FROM records WHERE seq = 3",
        "DELETE FROM checkpoints",
    ] {
        let e = c.execute_batch(sql).unwrap_err().to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    f.check(None);
}

#[test]
fn an_edited_field_is_caught_at_its_seq() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("UPDATE records SET outcome = 'denied' WHERE seq = 4");
    f.check(Some((4, "record 4 does not match its hash (edited)")));
}

#[test]
fn a_flipped_byte_is_caught() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("UPDATE records SET reason = 'role operator grants iT' WHERE seq = 6");
    f.check(Some((6, "(edited)")));
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("UPDATE records SET details = replace(details, '\"prompt_tokens\":8', '\"prompt_tokens\":9') WHERE seq = 9");
    f.check(Some((9, "(edited)")));
}

#[test]
fn a_deleted_row_is_caught() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("DELETE FROM records WHERE seq = 5");
    f.check(Some((5, "record 5 is missing (deleted)")));
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("DELETE FROM records WHERE seq = 1");
    f.check(Some((1, "record 1 is missing")));
}

#[test]
fn two_reordered_rows_are_caught() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper(
        "UPDATE records SET seq = -1 WHERE seq = 3; UPDATE records SET seq = 3 WHERE seq = 4;
         UPDATE records SET seq = 4 WHERE seq = -1;",
    );
    f.check(Some((3, "record 3 does not link to record 2")));
}

#[test]
fn a_rewritten_and_rehashed_history_is_caught_by_the_checkpoint() {
    let f = Fixture::new();
    f.write(10, 1000);
    // Rewrite record 10 and recompute its hash: the chain alone looks fine.
    let reader = AuditReader::open(&f.path()).unwrap();
    let mut r = reader.query(&Query::default()).unwrap().pop().unwrap();
    drop(reader);
    r.actor = "mallory".into();
    let h = r.compute_hash();
    f.tamper(&format!(
        "UPDATE records SET actor = 'mallory', hash = '{h}' WHERE seq = 10"
    ));
    f.check(Some((10, "record 10 differs from its signed checkpoint")));
}

#[test]
fn a_tail_truncated_before_a_checkpoint_is_caught() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper("DELETE FROM records WHERE seq > 7");
    f.check(Some((
        8,
        "records end at seq 7, but checkpoint 10 was signed over more (truncated)",
    )));
}

#[test]
fn a_forged_checkpoint_is_caught() {
    let f = Fixture::new();
    f.write(10, 1000);
    f.tamper(
        "UPDATE checkpoints SET signature = replace(signature, substr(signature, 1, 2), 'ff')",
    );
    f.check(Some((10, "bad signature (forged)")));
    // Re-signed with the attacker's own key: the pinned key catches it.
    let f = Fixture::new();
    f.write(10, 1000);
    let attacker = KeyPair::generate().unwrap();
    let reader = AuditReader::open(&f.path()).unwrap();
    let mut cp = reader.checkpoints().unwrap().pop().unwrap();
    drop(reader);
    cp.public_key = attacker.public_hex();
    cp.signature = attacker.sign_hex(cp.signed_message().as_bytes());
    f.tamper(&format!(
        "UPDATE checkpoints SET public_key = '{}', signature = '{}'",
        cp.public_key, cp.signature
    ));
    f.check(Some((10, "signed by another key")));
}

#[test]
fn oversized_details_are_replaced_by_their_digest() {
    let f = Fixture::new();
    let log = f.log(1000);
    let mut e = entry(0);
    e.details = json!({"blob": "x".repeat(MAX_DETAILS * 2)});
    let r = log.append(e).unwrap();
    assert_eq!(r.details["truncated"], true);
    drop(log);
    f.check(None);
}

#[test]
fn queries_filter_and_page() {
    let f = Fixture::new();
    let log = f.log(1000);
    for i in 0..6 {
        let mut e = entry(i);
        if i % 2 == 1 {
            e.actor = "bob".into();
            e.outcome = Outcome::Denied;
        }
        log.append(e).unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&f.path()).unwrap();
    let seqs = |q: Query| -> Vec<u64> { reader.query(&q).unwrap().iter().map(|r| r.seq).collect() };
    assert_eq!(
        seqs(Query {
            actor: Some("bob".into()),
            ..Default::default()
        }),
        [2, 4, 6]
    );
    assert_eq!(
        seqs(Query {
            outcome: Some(Outcome::Allowed),
            ..Default::default()
        }),
        [1, 3, 5]
    );
    assert_eq!(
        seqs(Query {
            after_seq: Some(2),
            limit: Some(2),
            ..Default::default()
        }),
        [3, 4]
    );
    assert_eq!(
        seqs(Query {
            limit: Some(2),
            newest: true,
            ..Default::default()
        }),
        [5, 6]
    );
    assert_eq!(
        seqs(Query {
            since: Some("2999-01-01T00:00:00.000Z".into()),
            ..Default::default()
        }),
        [] as [u64; 0]
    );
}

#[test]
fn exports_verify_and_tampered_exports_do_not() {
    let f = Fixture::new();
    f.write(20, 5);
    let reader = AuditReader::open(&f.path()).unwrap();
    let mut out = Vec::new();
    let n = export(
        &reader,
        &Query::default(),
        Format::Jsonl,
        "edge-1",
        Some(&f.key.public()),
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 20);
    let text = String::from_utf8(out).unwrap();
    let report = verify_export(text.as_bytes(), Some(&f.key.public())).unwrap();
    assert!(
        report.ok && report.records == 20 && report.checkpoints == 4,
        "{report:?}"
    );
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[3] = lines[3].replace("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"");
    let edited = lines.join("\n");
    let report = verify_export(edited.as_bytes(), None).unwrap();
    assert_eq!(report.bad_seq, Some(3), "{report:?}");
    let filtered = export(
        &reader,
        &Query {
            actor: Some("x".into()),
            ..Default::default()
        },
        Format::Jsonl,
        "edge-1",
        None,
        &mut Vec::new(),
    );
    assert!(filtered.is_err());
}

#[test]
fn csv_cells_cannot_inject_formulas() {
    for (v, want) in [
        ("plain", "plain"),
        ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("a,b", "\"a,b\""),
        ("line\nbreak", "\"line\nbreak\""),
    ] {
        assert_eq!(export::csv_cell(v), want, "{v}");
    }
}

/// `audit.db` as Outpost 0.1 wrote it, before schema versions (`user_version` 0). Frozen
/// here: whatever the migrations become, such a file must still be adopted.
const SCHEMA_0_1: &str = "
CREATE TABLE records (
    seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, device_id TEXT NOT NULL, actor TEXT NOT NULL,
    roles TEXT NOT NULL, action TEXT NOT NULL, resource TEXT, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, request_id TEXT, policy_version INTEGER, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE INDEX records_ts ON records (ts);
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, ts TEXT NOT NULL, device_id TEXT NOT NULL,
    public_key TEXT NOT NULL, signature TEXT NOT NULL
);
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
";

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

fn record_count(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_log_from_before_schema_versions_is_migrated_in_place() {
    let f = Fixture::new();
    // Real records and a checkpoint, copied into a file made with the 0.1 schema.
    let reference = Fixture {
        dir: tempfile::tempdir().unwrap(),
        key: f.key(),
    };
    reference.write(5, 1000);
    let c = Connection::open(f.path()).unwrap();
    c.execute_batch(SCHEMA_0_1).unwrap();
    c.execute("ATTACH ?1 AS old", [reference.path().to_str().unwrap()])
        .unwrap();
    c.execute_batch(
        "INSERT INTO records SELECT * FROM old.records;
         INSERT INTO checkpoints SELECT * FROM old.checkpoints; DETACH old;",
    )
    .unwrap();
    drop(c);
    assert_eq!(user_version(&f.path()), 0);

    // Reading takes it as it is and changes nothing.
    let reader = AuditReader::open(&f.path()).unwrap();
    assert_eq!(reader.query(&Query::default()).unwrap().len(), 5);
    drop(reader);
    f.check(None);
    assert_eq!(user_version(&f.path()), 0);

    // The writer adopts it: the current version, the same chain going on.
    let log = f.log(1000);
    assert_eq!(log.append(entry(5)).unwrap().seq, 6);
    log.close().unwrap();
    assert_eq!(user_version(&f.path()), schema::CURRENT);
    assert_eq!(schema::CURRENT, 1);
    f.check(None);
    let e = Connection::open(f.path())
        .unwrap()
        .execute_batch("DELETE FROM records WHERE seq = 1")
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
}

#[test]
fn a_log_from_a_newer_outpost_is_refused_and_left_as_it_is() {
    let f = Fixture::new();
    f.write(3, 1000);
    assert_eq!(user_version(&f.path()), schema::CURRENT);
    let newer = schema::CURRENT + 1;
    Connection::open(f.path())
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let expect = format!("has schema version {newer}, which this outpost does not know");
    let mut s = AuditSettings::new("edge-1");
    s.checkpoint_every = 1;
    let e = AuditLog::open(&f.path(), f.key(), s)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&expect) && e.contains("nothing was changed"),
        "{e}"
    );
    let e = AuditReader::open(&f.path()).unwrap_err().to_string();
    assert!(e.contains(&expect), "{e}");
    assert_eq!(user_version(&f.path()), newer);
    assert_eq!(record_count(&f.path()), 3);
}

#[test]
fn try_submit_never_waits_and_gives_back_what_it_could_not_queue() {
    let f = Fixture::new();
    let log = f.log(1000);
    let (mut queued, mut refused) = (Vec::new(), 0u64);
    for i in 0..20_000 {
        match log.try_submit(entry(i)) {
            Ok(p) => queued.push(p),
            Err(crate::audit::Unqueued::Full(e)) => {
                assert_eq!(e.action, entry(i).action);
                refused += 1;
            }
            Err(e) => panic!("the writer is running: {e}"),
        }
    }
    let n = queued.len() as u64;
    for p in queued {
        p.wait().unwrap();
    }
    assert_eq!(n + refused, 20_000);
    log.close().unwrap();
    let reader = AuditReader::open(&f.path()).unwrap();
    let all = reader.query(&Query::default()).unwrap();
    assert_eq!(
        all.len() as u64,
        n,
        "every queued entry is recorded, nothing else"
    );
    f.check(None);
}

#[test]
fn records_from_another_store_verify_by_the_same_rules() {
    let f = Fixture::new();
    f.write(12, 5);
    let reader = AuditReader::open(&f.path()).unwrap();
    let records = reader.query(&Query::default()).unwrap();
    let run = |records: &[Record], checkpoints: Vec<Checkpoint>| {
        let mut v = ChainVerifier::new(true, checkpoints);
        for r in records {
            v.feed_record(r, None);
        }
        v.finish(Some(&f.key.public()), false)
    };
    // The same report as the log's own verification.
    let from_records = run(&records, reader.checkpoints().unwrap());
    assert_eq!(
        from_records,
        verify_log(&reader, Some(&f.key.public())).unwrap()
    );
    assert!(from_records.ok && from_records.signed_through == Some(12));

    // An edited record, a gap, a checkpoint by another key: the first bad seq, as for the log.
    let mut edited = records.clone();
    edited[3].reason = "nothing".into();
    let r = run(&edited, reader.checkpoints().unwrap());
    assert_eq!(r.bad_seq, Some(4), "{r:?}");
    let mut gap = records.clone();
    gap.remove(7);
    let r = run(&gap, reader.checkpoints().unwrap());
    assert_eq!(
        (r.bad_seq, r.reason.as_deref()),
        (Some(8), Some("record 8 is missing (deleted)"))
    );
    let mut cps = reader.checkpoints().unwrap();
    let other = KeyPair::generate().unwrap();
    cps[1].public_key = other.public_hex();
    cps[1].signature = other.sign_hex(cps[1].signed_message().as_bytes());
    let r = run(&records, cps);
    assert_eq!(r.bad_seq, Some(10), "{r:?}");

    // A record the source could not read, and one it found wrong: malformed, in place.
    let mut v = ChainVerifier::new(true, reader.checkpoints().unwrap());
    v.feed_record(&records[0], None);
    v.feed_unreadable(2, "not JSON");
    let r = v.finish(Some(&f.key.public()), false);
    assert_eq!(
        (r.bad_seq, r.reason.as_deref()),
        (Some(2), Some("record 2 is malformed: not JSON"))
    );
    let mut v = ChainVerifier::new(true, Vec::new());
    v.feed_record(&records[0], Some("its ts column disagrees".into()));
    let r = v.finish(None, false);
    assert_eq!(r.bad_seq, Some(1), "{r:?}");

    // The line people read.
    assert!(from_records.summary().starts_with(
        "Audit log OK: 12 records (seq 1 to 12), 3 checkpoint signatures checked against the \
         pinned device key"
    ));
    assert_eq!(
        run(&gap, reader.checkpoints().unwrap()).summary(),
        "Audit log FAILED at seq 8: record 8 is missing (deleted)"
    );
}

#[test]
fn records_streamed_as_json_read_back_as_the_records_and_their_hashes() {
    let f = Fixture::new();
    f.write(30, 10);
    {
        // A record with nulls, escapes and numbers next to the fully populated ones.
        let log = f.log(10);
        let mut e = Entry::new("tab\tactor", "x:y", Outcome::Denied, "back\\slash \u{1} 💡");
        e.details = json!({"n": 1.5, "big": 1e21, "list": [null, true], "u": "\u{2028}"});
        log.submit(e).wait().unwrap();
        log.close().unwrap();
    }
    let reader = AuditReader::open(&f.path()).unwrap();
    let expected = reader.query(&Query::default()).unwrap();
    let mut streamed = Vec::new();
    reader
        .for_each_json_after(0, 1000, |seq, json| {
            let r: Record = serde_json::from_str(json).unwrap();
            assert_eq!(r.seq, seq);
            assert_eq!(r.compute_hash(), r.hash, "{json}");
            streamed.push(r);
            true
        })
        .unwrap();
    assert_eq!(streamed, expected);

    // After a seq, at most `limit`, and the callback stops it early.
    let mut seqs = Vec::new();
    reader
        .for_each_json_after(25, 3, |seq, _| {
            seqs.push(seq);
            true
        })
        .unwrap();
    assert_eq!(seqs, [26, 27, 28]);
    seqs.clear();
    reader
        .for_each_json_after(0, 100, |seq, _| {
            seqs.push(seq);
            seq < 2
        })
        .unwrap();
    assert_eq!(seqs, [1, 2]);

    // Only the newest checkpoint at or below a seq, and those above it.
    let from: Vec<u64> = reader
        .checkpoints_from(25)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(from, [20, 30, 31]);
    let first: Vec<u64> = reader
        .checkpoints_from(5)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(first, [10, 20, 30, 31]);
}

#[test]
fn a_row_that_is_not_a_record_is_an_error_when_streamed_not_a_bad_payload() {
    let f = Fixture::new();
    f.write(3, 10);
    f.tamper("UPDATE records SET details = '{\"cut' WHERE seq = 2");
    let reader = AuditReader::open(&f.path()).unwrap();
    let mut seen = Vec::new();
    let e = reader
        .for_each_json_after(0, 10, |seq, _| {
            seen.push(seq);
            true
        })
        .unwrap_err();
    assert_eq!(seen, [1]);
    assert!(
        e.to_string()
            .contains("record 2: details are not a JSON object"),
        "{e}"
    );
}
