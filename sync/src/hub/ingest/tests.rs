//! Ingest against a real `hub.db` (a [`SqliteStore`] in a temp folder), fed records and
//! checkpoints written by a real device audit log (`outpost_policy::audit::AuditLog`, read
//! back with `AuditReader`), packed by the protocol's `BatchBuilder`. Every case goes
//! through [`Fixture::check`]: what became of the message, then what the store holds, and
//! after each step the store must hold exactly a prefix of the device's log.

use std::path::Path;

use outpost_policy::audit::{
    AuditLog, AuditReader, AuditSettings, Checkpoint, Entry, Outcome as AuditOutcome, Query, Record,
};
use outpost_policy::signing::KeyPair;
use tempfile::TempDir;

use super::*;
use crate::hub::store::{DeviceRecord, HubStore, SqliteStore};
use crate::protocol::{BatchBuilder, BatchLimits, V1, device_topic};

const DEVICE: &str = "edge-01";

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// A device's audit log in `dir`: `n` records, a checkpoint every 5; its records and
/// checkpoints as read back.
struct DeviceLog {
    records: Vec<Record>,
    checkpoints: Vec<Checkpoint>,
}

fn write_log(dir: &Path, device: &str, key: &KeyPair, n: usize) -> DeviceLog {
    let path = dir.join(format!("{device}-{}.db", rand::random::<u32>()));
    let copy = KeyPair::from_pem(&key.private_pem(), &path).unwrap();
    let mut settings = AuditSettings::new(device);
    settings.checkpoint_every = 5;
    let log = AuditLog::open(&path, copy, settings).unwrap();
    for i in 0..n {
        let mut e = Entry::new(
            "local:test",
            "models:activate",
            AuditOutcome::Success,
            &format!("entry {i}"),
        );
        e.resource = Some("smollm2".into());
        log.append(e).unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&path).unwrap();
    DeviceLog {
        records: reader.query(&Query::default()).unwrap(),
        checkpoints: reader.checkpoints().unwrap(),
    }
}

struct Fixture {
    _dir: TempDir,
    store: SqliteStore,
    key: KeyPair,
    log: DeviceLog,
}

impl Fixture {
    /// `edge-01` enrolled with a fresh key and 20 records in its log (checkpoints at 5, 10,
    /// 15, 20).
    fn new() -> Fixture {
        let dir = TempDir::new().unwrap();
        let key = KeyPair::generate().unwrap();
        let log = write_log(dir.path(), DEVICE, &key, 20);
        assert_eq!(
            log.checkpoints.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [5, 10, 15, 20]
        );
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.enroll(&enrolled(DEVICE, &key)).unwrap();
        Fixture {
            _dir: dir,
            store,
            key,
            log,
        }
    }

    fn records(&self, seqs: std::ops::RangeInclusive<u64>) -> Vec<Record> {
        seqs.map(|s| self.log.records[(s - 1) as usize].clone())
            .collect()
    }

    /// The log's checkpoint at `seq`.
    fn cp(&self, seq: u64) -> Checkpoint {
        self.log
            .checkpoints
            .iter()
            .find(|c| c.seq == seq)
            .unwrap()
            .clone()
    }

    /// Handles `payload` on `device`'s `kind` topic in one committed transaction.
    fn send(&mut self, device: &str, kind: DeviceTopic, payload: &[u8]) -> Handled {
        let prepared = prepare(&device_topic(&dev(device), kind), payload);
        let mut tx = self.store.begin_ingest().unwrap();
        let handled = apply(tx.as_mut(), &prepared, "2026-12-01T12:00:00.000Z").unwrap();
        tx.commit().unwrap();
        handled
    }

    /// Sends an audit batch and compares what became of it and what the store then holds;
    /// the store must always hold a faithful prefix of the device's log.
    fn check(&mut self, payload: &[u8], expect: &str, expect_store: &str) {
        self.check_on(DEVICE, payload, expect, expect_store);
    }

    fn check_on(&mut self, device: &str, payload: &[u8], expect: &str, expect_store: &str) {
        let handled = self.send(device, DeviceTopic::Audit, payload);
        assert_eq!(handled.kind, Kind::Audit);
        assert_eq!(describe(&handled.outcome), expect);
        assert_eq!(self.store_state(), expect_store, "after: {expect}");
        self.assert_faithful();
    }

    /// `records 1..=N cps [..] acked N alerts [kind@seq ..]`.
    fn store_state(&self) -> String {
        let conn = rusqlite::Connection::open(self._dir.path().join(SqliteStore::FILE)).unwrap();
        let q = |sql: &str| -> Vec<String> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| r.get::<_, String>(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        let seqs = q("SELECT CAST(seq AS TEXT) FROM audit_records ORDER BY seq");
        let records = match (seqs.first(), seqs.last()) {
            (Some(a), Some(b)) => format!("{a}..={b}"),
            _ => "none".into(),
        };
        let cps = q("SELECT CAST(seq AS TEXT) FROM audit_checkpoints ORDER BY seq").join(",");
        let acked =
            q("SELECT COALESCE(CAST(acked_seq AS TEXT), '-') FROM devices WHERE id = 'edge-01'")
                .join("");
        let alerts = q("SELECT kind || '@' || seq FROM audit_alerts ORDER BY rowid").join(" ");
        format!("records {records} cps [{cps}] acked {acked} alerts [{alerts}]")
    }

    /// Every stored row is the device's own record or checkpoint, as it wrote it; the
    /// records are 1..=acked_seq without a gap.
    fn assert_faithful(&self) {
        let conn = rusqlite::Connection::open(self._dir.path().join(SqliteStore::FILE)).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT seq, record_json, hash, ts, actor, action, outcome FROM audit_records \
                 WHERE device_id = 'edge-01' ORDER BY seq",
            )
            .unwrap();
        let rows: Vec<(i64, String, String, String, String, String, String)> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for (i, (seq, json, hash, ts, actor, action, outcome)) in rows.iter().enumerate() {
            assert_eq!(*seq, i as i64 + 1, "a gap in the stored records");
            let original = &self.log.records[i];
            assert_eq!(json, &serde_json::to_string(original).unwrap());
            let parsed: Record = serde_json::from_str(json).unwrap();
            assert_eq!(&parsed, original);
            assert_eq!(hash, &original.hash);
            assert_eq!(
                (ts, actor, action, outcome.as_str()),
                (
                    &original.ts,
                    &original.actor,
                    &original.action,
                    original.outcome.as_str()
                )
            );
        }
        let acked: Option<i64> = conn
            .query_row(
                "SELECT acked_seq FROM devices WHERE id = 'edge-01'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if !rows.is_empty() {
            assert_eq!(acked, Some(rows.len() as i64));
        }
        let mut stmt = conn
            .prepare("SELECT checkpoint_json FROM audit_checkpoints ORDER BY seq")
            .unwrap();
        let cps: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for json in cps {
            let cp: Checkpoint = serde_json::from_str(&json).unwrap();
            assert_eq!(cp, self.cp(cp.seq), "a checkpoint the device did not sign");
            assert_eq!(json, serde_json::to_string(&cp).unwrap());
            assert!(cp.seq <= rows.len() as u64, "a checkpoint beyond the head");
        }
    }
}

fn enrolled(id: &str, key: &KeyPair) -> DeviceRecord {
    DeviceRecord {
        enrolled_at: "2026-01-01T00:00:00.000Z".into(),
        ..DeviceRecord::enrolled(dev(id), vec![], key.public_hex(), "local:test")
    }
}

/// The wire payload of `records` (in seq order) with `cp`, as a device packs it.
fn packed(device: &str, records: &[Record], cp: Option<&Checkpoint>) -> Vec<u8> {
    let limits = BatchLimits {
        max_records: 10_000,
        max_bytes: 1 << 30,
    };
    let mut b = BatchBuilder::new(&dev(device), cp, limits).unwrap();
    for r in records {
        assert_eq!(b.push(r).unwrap(), crate::protocol::Pushed::Added);
    }
    b.finish().unwrap().payload
}

/// A payload serialized from the struct, for batches a builder would refuse.
fn raw(batch: &AuditBatch) -> Vec<u8> {
    serde_json::to_vec(batch).unwrap()
}

fn batch_of(device: &str, records: Vec<Record>, cp: Option<Checkpoint>) -> AuditBatch {
    AuditBatch {
        v: V1,
        device_id: dev(device),
        first_seq: records.first().map_or(0, |r| r.seq),
        last_seq: records.last().map_or(0, |r| r.seq),
        records,
        checkpoint: cp,
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Stored {
            first_seq,
            last_seq,
            records,
            head,
            checkpoint,
        } => format!(
            "stored {first_seq}..={last_seq} +{records} head {head} cp {}",
            checkpoint.map_or("-".into(), |c| c.to_string())
        ),
        Outcome::Duplicate { head } => format!("duplicate head {head}"),
        Outcome::Ahead { first_seq, head } => format!("ahead {first_seq} head {head}"),
        Outcome::Alerted { alert, new } => format!(
            "alert {}@{}{}: {}",
            alert.kind.as_str(),
            alert.seq,
            if *new { "" } else { " (again)" },
            alert.detail
        ),
        Outcome::Updated => "updated".into(),
        Outcome::Ignored => "ignored".into(),
        Outcome::Refused { reason, detail } => format!("refused {}: {detail}", reason.as_str()),
    }
}

/// Re-hashes a record after an edit, as a forger with the format in hand would.
fn rehash(mut r: Record) -> Record {
    r.hash = r.compute_hash();
    r
}

#[test]
fn batches_are_stored_once_in_order_and_acked_with_the_head() {
    let mut fx = Fixture::new();
    let empty = "records none cps [] acked - alerts []";
    assert_eq!(fx.store_state(), empty);

    // A fresh device: 1..=4 (no checkpoint yet), then 5..=7 with the checkpoint at 5.
    let b = packed(DEVICE, &fx.records(1..=4), None);
    fx.check(
        &b,
        "stored 1..=4 +4 head 4 cp -",
        "records 1..=4 cps [] acked 4 alerts []",
    );
    let b = packed(DEVICE, &fx.records(5..=7), Some(&fx.cp(5)));
    fx.check(
        &b,
        "stored 5..=7 +3 head 7 cp 5",
        "records 1..=7 cps [5] acked 7 alerts []",
    );
    // Redelivered: a duplicate, acked with the head.
    let b = packed(DEVICE, &fx.records(1..=4), None);
    fx.check(
        &b,
        "duplicate head 7",
        "records 1..=7 cps [5] acked 7 alerts []",
    );
    // Overlapping the head (a resend from an older cursor): only the new records count.
    let b = packed(DEVICE, &fx.records(3..=9), Some(&fx.cp(5)));
    fx.check(
        &b,
        "stored 3..=9 +2 head 9 cp -",
        "records 1..=9 cps [5] acked 9 alerts []",
    );
    // Ahead of the head (another hub has 10 in flight): nothing stored, the head acked; its
    // checkpoint is beyond the head, so it waits for a later batch.
    let b = packed(DEVICE, &fx.records(11..=12), Some(&fx.cp(10)));
    let handled = fx.send(DEVICE, DeviceTopic::Audit, &b);
    assert_eq!(handled.outcome.acked_seq(), Some(9));
    fx.check(
        &b,
        "ahead 11 head 9",
        "records 1..=9 cps [5] acked 9 alerts []",
    );
    // Then the batch it overtook, and the resend.
    let b = packed(DEVICE, &fx.records(10..=10), Some(&fx.cp(10)));
    fx.check(
        &b,
        "stored 10..=10 +1 head 10 cp 10",
        "records 1..=10 cps [5,10] acked 10 alerts []",
    );
    let b = packed(DEVICE, &fx.records(11..=20), Some(&fx.cp(20)));
    fx.check(
        &b,
        "stored 11..=20 +10 head 20 cp 20",
        "records 1..=20 cps [5,10,20] acked 20 alerts []",
    );
    // A duplicate may bring an older checkpoint the hub missed.
    let b = packed(DEVICE, &fx.records(15..=16), Some(&fx.cp(15)));
    fx.check(
        &b,
        "duplicate head 20",
        "records 1..=20 cps [5,10,15,20] acked 20 alerts []",
    );
    let handled = fx.send(DEVICE, DeviceTopic::Audit, &b);
    assert_eq!(handled.outcome.acked_seq(), Some(20));
}

#[test]
fn a_broken_chain_inside_a_batch_is_alerted_and_nothing_is_stored() {
    let mut fx = Fixture::new();
    let b = packed(DEVICE, &fx.records(1..=5), Some(&fx.cp(5)));
    fx.check(
        &b,
        "stored 1..=5 +5 head 5 cp 5",
        "records 1..=5 cps [5] acked 5 alerts []",
    );
    let h = |fx: &Fixture, seq: u64| fx.log.records[(seq - 1) as usize].hash.clone();

    // Edited, not re-hashed.
    let mut recs = fx.records(6..=8);
    recs[1].reason = "nothing happened".into();
    let edited = rehash(recs[1].clone()).hash;
    fx.check(
        &packed(DEVICE, &recs, None),
        &format!(
            "alert break@7: record 7 says hash {:?}, its contents give {edited:?}",
            h(&fx, 7)
        ),
        "records 1..=5 cps [5] acked 5 alerts [break@7]",
    );
    // Edited and re-hashed: the next record no longer links.
    recs[1] = rehash(recs[1].clone());
    fx.check(
        &packed(DEVICE, &recs, None),
        &format!(
            "alert break@8: record 8 has prev_hash {:?}, record 7 has hash {edited:?}",
            h(&fx, 7)
        ),
        "records 1..=5 cps [5] acked 5 alerts [break@7 break@8]",
    );
    // Reordered with the seqs renumbered to pass the seq check: the contents no longer
    // give the hashes.
    let mut recs = fx.records(6..=8);
    recs.swap(0, 1);
    recs[0].seq = 6;
    recs[1].seq = 7;
    let got = describe(
        &fx.send(
            DEVICE,
            DeviceTopic::Audit,
            &raw(&batch_of(DEVICE, recs, None)),
        )
        .outcome,
    );
    assert!(got.starts_with("alert break@6"), "{got}");
    // Reordered as they are: the seqs give it away first.
    let mut recs = fx.records(6..=8);
    recs.swap(0, 1);
    fx.check(
        &raw(&batch_of(DEVICE, recs, None)),
        "refused bad_seqs: audit batch for edge-01: record 1 has seq 6, expected 8",
        "records 1..=5 cps [5] acked 5 alerts [break@7 break@8 break@6]",
    );
    // A whole batch re-chained from an edited record below the head: a fork.
    let mut recs = fx.records(3..=7);
    recs[1].actor = "local:mallory".into();
    for i in 1..recs.len() {
        if i > 1 {
            recs[i].prev_hash = recs[i - 1].hash.clone();
        }
        recs[i] = rehash(recs[i].clone());
    }
    let forged4 = recs[1].hash.clone();
    fx.check(
        &packed(DEVICE, &recs, None),
        &format!(
            "alert fork@4: record 4 has hash {forged4:?}, the hub stored {:?}",
            h(&fx, 4)
        ),
        "records 1..=5 cps [5] acked 5 alerts [break@7 break@8 break@6 fork@4]",
    );
    // The same again: refused, the alert kept once.
    fx.check(
        &packed(DEVICE, &recs, None),
        &format!(
            "alert fork@4 (again): record 4 has hash {forged4:?}, the hub stored {:?}",
            h(&fx, 4)
        ),
        "records 1..=5 cps [5] acked 5 alerts [break@7 break@8 break@6 fork@4]",
    );
    // The genuine continuation is still taken.
    let b = packed(DEVICE, &fx.records(6..=10), Some(&fx.cp(10)));
    fx.check(
        &b,
        "stored 6..=10 +5 head 10 cp 10",
        "records 1..=10 cps [5,10] acked 10 alerts [break@7 break@8 break@6 fork@4]",
    );
}

#[test]
fn a_chain_that_no_longer_continues_the_stored_one_is_a_truncation() {
    let mut fx = Fixture::new();
    let b = packed(DEVICE, &fx.records(1..=5), Some(&fx.cp(5)));
    fx.check(
        &b,
        "stored 1..=5 +5 head 5 cp 5",
        "records 1..=5 cps [5] acked 5 alerts []",
    );
    // The device's log was rolled back and written again (same key, same device): its
    // seq 6 links to another seq 5.
    let dir = TempDir::new().unwrap();
    let other = write_log(dir.path(), DEVICE, &fx.key, 8);
    let recs: Vec<Record> = other.records[5..8].to_vec();
    fx.check(
        &packed(DEVICE, &recs, None),
        &format!(
            "alert truncation@6: record 6 has prev_hash {:?}, the hub's record 5 has hash {:?}",
            other.records[4].hash, fx.log.records[4].hash
        ),
        "records 1..=5 cps [5] acked 5 alerts [truncation@6]",
    );
    // Its history from seq 1 is a fork.
    let recs: Vec<Record> = other.records[0..3].to_vec();
    let got = describe(
        &fx.send(DEVICE, DeviceTopic::Audit, &packed(DEVICE, &recs, None))
            .outcome,
    );
    assert!(got.starts_with("alert fork@1: "), "{got}");
    // On a fresh device, seq 1 must start from the genesis hash.
    let mut fx = Fixture::new();
    let mut first = fx.records(1..=1);
    first[0].prev_hash = "ab".repeat(32);
    first[0] = rehash(first[0].clone());
    fx.check(
        &packed(DEVICE, &first, None),
        &format!(
            "alert truncation@1: record 1 has prev_hash {:?}, the hub's record 0 has hash {:?}",
            "ab".repeat(32),
            outpost_policy::audit::GENESIS
        ),
        "records none cps [] acked - alerts [truncation@1]",
    );
}

#[test]
fn a_forged_checkpoint_refuses_the_whole_batch() {
    let mut fx = Fixture::new();
    let b = packed(DEVICE, &fx.records(1..=3), None);
    fx.check(
        &b,
        "stored 1..=3 +3 head 3 cp -",
        "records 1..=3 cps [] acked 3 alerts []",
    );
    let recs = fx.records(4..=7);
    // Every forgery below names seq 5: the first is recorded, the rest are the same alert.
    let expect = |fx: &mut Fixture, cp: Checkpoint, again: bool, detail: &str| {
        fx.check(
            &packed(DEVICE, &recs, Some(&cp)),
            &format!(
                "alert forged_checkpoint@5{}: {detail}",
                if again { " (again)" } else { "" }
            ),
            "records 1..=3 cps [] acked 3 alerts [forged_checkpoint@5]",
        );
    };

    // Signed by another key (another device's log with the same id).
    let dir = TempDir::new().unwrap();
    let mallory = KeyPair::generate().unwrap();
    let other = write_log(dir.path(), DEVICE, &mallory, 5);
    let foreign = other.checkpoints[0].clone();
    let enrolled_hex = fx.key.public_hex();
    let record5 = fx.log.records[4].hash.clone();
    expect(
        &mut fx,
        foreign.clone(),
        false,
        &format!(
            "checkpoint 5 carries key {:?}, the enrolled key is {}",
            mallory.public_hex(),
            enrolled_hex
        ),
    );
    // The same, claiming the enrolled key.
    let mut claimed = foreign;
    claimed.public_key = fx.key.public_hex();
    expect(
        &mut fx,
        claimed,
        true,
        "checkpoint 5: the signature does not verify with the enrolled key",
    );
    // The genuine checkpoint with one bit of its signature flipped.
    let mut flipped = fx.cp(5);
    let last = flipped.signature.pop().unwrap();
    flipped.signature.push(if last == '0' { '1' } else { '0' });
    expect(
        &mut fx,
        flipped,
        true,
        "checkpoint 5: the signature does not verify with the enrolled key",
    );
    // Signed with the device's own key over another hash (a device rewriting history).
    let mut wrong = fx.cp(5);
    wrong.hash = "ab".repeat(32);
    wrong.signature = fx.key.sign_hex(wrong.signed_message().as_bytes());
    expect(
        &mut fx,
        wrong,
        true,
        &format!(
            "checkpoint 5 signs hash {:?}, record 5 has hash {record5:?}",
            "ab".repeat(32),
        ),
    );
    // Naming another device (the one it names is signed too) with the enrolled key
    // claimed but the signature over the original message: it does not verify.
    let mut renamed = fx.cp(5);
    renamed.device_id = "edge-02".into();
    expect(
        &mut fx,
        renamed,
        true,
        "checkpoint 5: the signature does not verify with the enrolled key",
    );

    // A well-signed checkpoint beyond the new head is not judged (nor stored) yet...
    let mut later = fx.cp(10);
    later.hash = "cd".repeat(32);
    later.signature = fx.key.sign_hex(later.signed_message().as_bytes());
    fx.check(
        &packed(DEVICE, &recs, Some(&later)),
        "stored 4..=7 +4 head 7 cp -",
        "records 1..=7 cps [] acked 7 alerts [forged_checkpoint@5]",
    );
    // ...and refused once the head reaches it, against the record of the batch.
    fx.check(
        &packed(DEVICE, &fx.records(8..=10), Some(&later)),
        &format!(
            "alert forged_checkpoint@10: checkpoint 10 signs hash {:?}, record 10 has hash {:?}",
            "cd".repeat(32),
            fx.log.records[9].hash
        ),
        "records 1..=7 cps [] acked 7 alerts [forged_checkpoint@5 forged_checkpoint@10]",
    );
    // A checkpoint below the batch is judged against the stored record.
    let mut old = fx.cp(5);
    old.hash = "ef".repeat(32);
    old.signature = fx.key.sign_hex(old.signed_message().as_bytes());
    let got = describe(
        &fx.send(
            DEVICE,
            DeviceTopic::Audit,
            &packed(DEVICE, &fx.records(8..=9), Some(&old)),
        )
        .outcome,
    );
    assert_eq!(
        got,
        format!(
            "alert forged_checkpoint@5 (again): checkpoint 5 signs hash {:?}, record 5 has hash {:?}",
            "ef".repeat(32),
            fx.log.records[4].hash
        )
    );
    // The genuine one is stored.
    fx.check(
        &packed(DEVICE, &fx.records(8..=10), Some(&fx.cp(10))),
        "stored 8..=10 +3 head 10 cp 10",
        "records 1..=10 cps [10] acked 10 alerts [forged_checkpoint@5 forged_checkpoint@10]",
    );
}

#[test]
fn hostile_payloads_are_refused_without_a_trace() {
    let mut fx = Fixture::new();
    let none = "records none cps [] acked - alerts []";
    let good = packed(DEVICE, &fx.records(1..=3), None);

    // Another device in the envelope (the device_id inside records is the log's own: see
    // `records_may_name_the_host_the_key_is_the_identity`).
    let mut other = batch_of(DEVICE, fx.records(1..=3), None);
    other.device_id = dev("edge-02");
    fx.check(
        &raw(&other),
        "refused wrong_device: audit batch for edge-01: names device edge-02 in its payload",
        none,
    );
    let dir = TempDir::new().unwrap();
    let b_log = write_log(dir.path(), "edge-02", &fx.key, 3);
    // A device that is not enrolled, even with a broken chain: no alert for it.
    let mut broken = b_log.records.clone();
    broken[1].reason = "edited".into();
    fx.check_on(
        "edge-02",
        &packed("edge-02", &broken, None),
        "refused unknown_device: device edge-02 is not enrolled",
        none,
    );
    // Versions, shape, size, seqs.
    let v2 = String::from_utf8(good.clone())
        .unwrap()
        .replacen("{\"v\":1", "{\"v\":2", 1);
    fx.check(
        v2.as_bytes(),
        "refused unknown_version: audit batch message has schema version 2; this outpost knows version 1",
        none,
    );
    fx.check(
        b"{\"v\":1,\"device_id\":\"edge-01\",",
        "refused malformed: audit batch message is malformed: EOF while parsing a value at line 1 column 29",
        none,
    );
    fx.check(
        b"\xff\xfe",
        "refused malformed: audit batch message is malformed: expected value at line 1 column 1",
        none,
    );
    let mut padded = good.clone();
    padded.extend(std::iter::repeat_n(
        b' ',
        MAX_AUDIT_BATCH_BYTES + 1 - good.len(),
    ));
    fx.check(
        &padded,
        &format!(
            "refused too_large: audit batch message of {} bytes is over the limit of {MAX_AUDIT_BATCH_BYTES} bytes",
            MAX_AUDIT_BATCH_BYTES + 1
        ),
        none,
    );
    // One byte less is read (and stored).
    padded.pop();
    fx.check(
        &padded,
        "stored 1..=3 +3 head 3 cp -",
        "records 1..=3 cps [] acked 3 alerts []",
    );
    let mut gap = batch_of(DEVICE, fx.records(4..=6), None);
    gap.records.remove(1);
    fx.check(
        &raw(&gap),
        "refused bad_seqs: audit batch for edge-01: record 1 has seq 6, expected 5",
        "records 1..=3 cps [] acked 3 alerts []",
    );
    let mut huge = batch_of(DEVICE, fx.records(4..=4), None);
    huge.records[0].seq = u64::MAX;
    huge.first_seq = u64::MAX;
    huge.last_seq = u64::MAX;
    fx.check(
        &raw(&huge),
        &format!(
            "refused bad_seqs: seq {} is beyond what the store holds",
            u64::MAX
        ),
        "records 1..=3 cps [] acked 3 alerts []",
    );
    let empty = batch_of(DEVICE, vec![], None);
    fx.check(
        &raw(&empty),
        "refused bad_seqs: audit batch for edge-01: has no records",
        "records 1..=3 cps [] acked 3 alerts []",
    );
}

#[test]
fn status_state_and_telemetry_update_the_device_row() {
    let mut fx = Fixture::new();
    let device = |fx: &Fixture| {
        let d = fx.store.device(&dev(DEVICE)).unwrap().unwrap();
        format!(
            "online {:?} version {:?} model {:?} acked {:?} lag {:?} seen {}",
            d.online,
            d.agent_version,
            d.active_model,
            d.acked_seq,
            d.audit_lag,
            d.last_seen.is_some()
        )
    };
    assert_eq!(
        device(&fx),
        "online None version None model None acked None lag None seen false"
    );
    let send = |fx: &mut Fixture, kind, payload: &str| {
        describe(&fx.send(DEVICE, kind, payload.as_bytes()).outcome)
    };

    assert_eq!(
        send(
            &mut fx,
            DeviceTopic::Status,
            r#"{"v":1,"state":"online","agent_version":"0.2.0"}"#
        ),
        "updated"
    );
    assert_eq!(
        send(
            &mut fx,
            DeviceTopic::StateReported,
            r#"{"v":1,"models":[{"name":"m","version":"1","sha256":"ab"}],"aliases":{"default":"m:1","chat":"n:2"},"policy_version":3,"last_acked_seq":0}"#
        ),
        "updated"
    );
    assert_eq!(
        send(
            &mut fx,
            DeviceTopic::Telemetry,
            r#"{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{"audit_last_seq":12,"rss":1}}"#
        ),
        "updated"
    );
    assert_eq!(
        device(&fx),
        "online Some(true) version Some(\"0.2.0\") model Some(\"m:1\") acked None lag Some(12) seen true"
    );
    let b = packed(DEVICE, &fx.records(1..=5), Some(&fx.cp(5)));
    fx.send(DEVICE, DeviceTopic::Audit, &b);
    assert_eq!(
        device(&fx),
        "online Some(true) version Some(\"0.2.0\") model Some(\"m:1\") acked Some(5) lag Some(7) seen true"
    );
    // Telemetry without the metric keeps the last one; the will sets offline.
    send(
        &mut fx,
        DeviceTopic::Telemetry,
        r#"{"v":1,"ts":"t","metrics":{"audit_last_seq":"x"}}"#,
    );
    send(
        &mut fx,
        DeviceTopic::Status,
        r#"{"v":1,"state":"offline","agent_version":"0.2.0"}"#,
    );
    send(
        &mut fx,
        DeviceTopic::StateReported,
        r#"{"v":1,"models":[],"aliases":{},"policy_version":null,"last_acked_seq":5}"#,
    );
    assert_eq!(
        device(&fx),
        "online Some(false) version Some(\"0.2.0\") model None acked Some(5) lag Some(7) seen true"
    );
    let conn = rusqlite::Connection::open(fx._dir.path().join(SqliteStore::FILE)).unwrap();
    let (reported, telemetry): (String, String) = conn
        .query_row(
            "SELECT reported_json, telemetry_json FROM devices WHERE id = 'edge-01'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        reported,
        r#"{"v":1,"models":[],"aliases":{},"policy_version":null,"last_acked_seq":5}"#
    );
    assert_eq!(
        telemetry,
        r#"{"v":1,"ts":"t","metrics":{"audit_last_seq":"x"}}"#
    );

    // Refusals change nothing.
    let before = device(&fx);
    let refusals = [
        (
            DeviceTopic::Status,
            "{\"v\":1,\"state\":\"online\"".to_string(),
            "refused malformed: status message is malformed: EOF while parsing an object at line 1 column 23",
        ),
        (
            DeviceTopic::Status,
            r#"{"v":7,"state":"online","agent_version":"9"}"#.into(),
            "refused unknown_version: status message has schema version 7; this outpost knows version 1",
        ),
        (
            DeviceTopic::Status,
            format!(
                r#"{{"v":1,"state":"online","agent_version":"{}"}}"#,
                "x".repeat(201)
            ),
            "refused malformed: agent_version is over 200 bytes",
        ),
        (
            DeviceTopic::StateReported,
            format!(
                r#"{{"v":1,"models":[],"aliases":{{"default":"{}"}},"policy_version":null,"last_acked_seq":5}}"#,
                "m".repeat(401)
            ),
            "refused malformed: the default alias is over 400 bytes",
        ),
        (
            DeviceTopic::Telemetry,
            format!(
                r#"{{"v":1,"ts":"t","metrics":{{"pad":"{}"}}}}"#,
                "x".repeat(MAX_TELEMETRY_BYTES)
            ),
            "refused too_large: telemetry message of 65573 bytes is over the limit of 65536 bytes",
        ),
    ];
    for (kind, payload, expect) in refusals {
        assert_eq!(send(&mut fx, kind, &payload), expect);
    }
    assert_eq!(device(&fx), before);
    // A device that is not enrolled is ignored.
    let h = fx.send(
        "edge-09",
        DeviceTopic::Status,
        br#"{"v":1,"state":"online","agent_version":"1"}"#,
    );
    assert_eq!(
        describe(&h.outcome),
        "refused unknown_device: device edge-09 is not enrolled"
    );
    assert_eq!(h.device, Some(dev("edge-09")));
    assert_eq!(fx.store.devices().unwrap().len(), 1);
}

/// A broker that keeps no retained messages for wildcard subscriptions (RabbitMQ) loses a
/// device's `online` status published before the hub subscribed: its first traffic says it
/// is connected. A known `offline` (its will) is changed only by a status message, since a
/// batch can reach one hub after another hub stored the will.
#[test]
fn traffic_from_a_device_of_unknown_status_marks_it_online_but_never_overrides_a_will() {
    let mut fx = Fixture::new();
    let online = |fx: &Fixture| fx.store.device(&dev(DEVICE)).unwrap().unwrap().online;
    assert_eq!(online(&fx), None);
    let b = packed(DEVICE, &fx.records(1..=5), Some(&fx.cp(5)));
    fx.send(DEVICE, DeviceTopic::Audit, &b);
    assert_eq!(online(&fx), Some(true));

    fx.send(
        DEVICE,
        DeviceTopic::Status,
        br#"{"v":1,"state":"offline","agent_version":"0.2.0"}"#,
    );
    let b = packed(DEVICE, &fx.records(6..=10), Some(&fx.cp(10)));
    fx.send(DEVICE, DeviceTopic::Audit, &b);
    fx.send(
        DEVICE,
        DeviceTopic::Telemetry,
        br#"{"v":1,"ts":"t","metrics":{"audit_last_seq":10}}"#,
    );
    assert_eq!(online(&fx), Some(false));
}

#[test]
fn topics_the_hub_does_not_read_are_refused_and_blob_requests_ignored() {
    let mut fx = Fixture::new();
    let mut run = |topic: &str| {
        let prepared = prepare(topic, b"{}");
        let kind = prepared.kind();
        let mut tx = fx.store.begin_ingest().unwrap();
        let h = apply(tx.as_mut(), &prepared, "t").unwrap();
        tx.commit().unwrap();
        format!("{} {}", kind.as_str(), describe(&h.outcome))
    };
    assert_eq!(
        run("outpost/v1/devices/edge-01/blobs/get"),
        "blobs_get ignored"
    );
    assert_eq!(
        run("outpost/v1/blobs/get"),
        "other refused unknown_topic: topic \"outpost/v1/blobs/get\": unknown topic"
    );
    assert_eq!(
        run("outpost/v1/devices/edge-01/audit/ack"),
        "other refused unknown_topic: topic \"outpost/v1/devices/edge-01/audit/ack\""
    );
    assert_eq!(
        run("outpost/v1/devices/a+b/audit"),
        "other refused unknown_topic: topic \"outpost/v1/devices/a+b/audit\": invalid device id"
    );
    assert_eq!(
        run("elsewhere"),
        "other refused unknown_topic: topic \"elsewhere\": not under outpost/v1/"
    );
}

#[test]
fn the_head_is_read_under_the_write_lock() {
    // Two hub processes on one hub.db: the second transaction waits for the first, then
    // sees its head, so it can never ack what is not stored nor store a gap.
    let mut fx = Fixture::new();
    let dir = fx._dir.path().to_path_buf();
    let first = packed(DEVICE, &fx.records(1..=5), None);
    let second = packed(DEVICE, &fx.records(6..=8), None);
    let mut tx = fx.store.begin_ingest().unwrap();
    let handled = apply(
        tx.as_mut(),
        &prepare(&device_topic(&dev(DEVICE), DeviceTopic::Audit), &first),
        "t",
    )
    .unwrap();
    assert_eq!(handled.outcome.acked_seq(), Some(5));
    let other = std::thread::spawn(move || {
        let mut store = SqliteStore::open(&dir).unwrap();
        let started = std::time::Instant::now();
        let mut tx = store.begin_ingest().unwrap();
        let waited = started.elapsed();
        let h = apply(
            tx.as_mut(),
            &prepare(&device_topic(&dev(DEVICE), DeviceTopic::Audit), &second),
            "t",
        )
        .unwrap();
        tx.commit().unwrap();
        (waited, describe(&h.outcome))
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    tx.commit().unwrap();
    let (waited, got) = other.join().unwrap();
    assert!(
        waited >= std::time::Duration::from_millis(250),
        "{waited:?}"
    );
    assert_eq!(got, "stored 6..=8 +3 head 8 cp -");
    assert_eq!(fx.store_state(), "records 1..=8 cps [] acked 8 alerts []");
    fx.assert_faithful();
    // A dropped transaction leaves nothing behind.
    let more = packed(DEVICE, &fx.records(9..=10), Some(&fx.cp(10)));
    let mut tx = fx.store.begin_ingest().unwrap();
    let h = apply(
        tx.as_mut(),
        &prepare(&device_topic(&dev(DEVICE), DeviceTopic::Audit), &more),
        "t",
    )
    .unwrap();
    assert_eq!(describe(&h.outcome), "stored 9..=10 +2 head 10 cp 10");
    drop(tx);
    assert_eq!(fx.store_state(), "records 1..=8 cps [] acked 8 alerts []");
}

#[test]
fn records_may_name_the_host_the_key_is_the_identity() {
    // A log begun before `[device] id` was set names the host; once set, the same log goes
    // on under the id. Both halves are the enrolled device's: its key signed them.
    let dir = TempDir::new().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = dir.path().join("audit.db");
    for (name, n) in [("raspberrypi", 7), (DEVICE, 6)] {
        let copy = KeyPair::from_pem(&key.private_pem(), &path).unwrap();
        let mut settings = AuditSettings::new(name);
        settings.checkpoint_every = 5;
        let log = AuditLog::open(&path, copy, settings).unwrap();
        for i in 0..n {
            log.append(Entry::new(
                "local:test",
                "models:activate",
                AuditOutcome::Success,
                &format!("{name} {i}"),
            ))
            .unwrap();
        }
    }
    let reader = AuditReader::open(&path).unwrap();
    let records = reader.query(&Query::default()).unwrap();
    let checkpoints = reader.checkpoints().unwrap();
    let named = |seq: u64| records[(seq - 1) as usize].device_id.clone();
    assert_eq!((named(7), named(8)), ("raspberrypi".into(), DEVICE.into()));
    // The newest checkpoint at or below `seq` (the log also writes one when it closes).
    let cp = |seq: u64| {
        checkpoints
            .iter()
            .rev()
            .find(|c| c.seq <= seq)
            .unwrap()
            .clone()
    };
    assert_eq!((cp(7).seq, cp(7).device_id.as_str()), (7, "raspberrypi"));
    assert_eq!((cp(13).seq, cp(13).device_id.as_str()), (13, DEVICE));

    let mut store = SqliteStore::open(dir.path()).unwrap();
    store.enroll(&enrolled(DEVICE, &key)).unwrap();
    let mut send = |payload: &[u8]| {
        let prepared = prepare(&device_topic(&dev(DEVICE), DeviceTopic::Audit), payload);
        let mut tx = store.begin_ingest().unwrap();
        let h = apply(tx.as_mut(), &prepared, "2026-12-01T12:00:00.000Z").unwrap();
        tx.commit().unwrap();
        describe(&h.outcome)
    };
    assert_eq!(
        send(&packed(DEVICE, &records[0..7], Some(&cp(7)))),
        "stored 1..=7 +7 head 7 cp 7"
    );
    assert_eq!(
        send(&packed(DEVICE, &records[7..13], Some(&cp(13)))),
        "stored 8..=13 +6 head 13 cp 13"
    );
    // The envelope still has to be the topic's.
    assert_eq!(
        send(&packed("raspberrypi", &records[0..7], None)),
        "refused wrong_device: audit batch for edge-01: names device raspberrypi in its payload"
    );
    // A checkpoint naming the host, signed by another key: refused for the key.
    let mallory = KeyPair::generate().unwrap();
    let mut foreign = cp(13);
    foreign.public_key = mallory.public_hex();
    foreign.signature = mallory.sign_hex(foreign.signed_message().as_bytes());
    assert!(
        send(&packed(DEVICE, &records[7..13], Some(&foreign)))
            .starts_with("alert forged_checkpoint@13: checkpoint 13 carries key")
    );

    // The hub's copy verifies against the enrolled key, both checkpoints included.
    let chain = crate::hub::audit::DeviceChain::open(&store, &dev(DEVICE)).unwrap();
    let report = chain.verify().unwrap();
    assert!(report.chain.ok, "{}", report.chain.summary());
    assert_eq!((report.chain.records, report.chain.checkpoints), (13, 2));
}

#[test]
fn a_device_reporting_more_acked_than_the_hub_holds_is_alerted_once_as_behind() {
    let mut fx = Fixture::new();
    fx.check(
        &packed(DEVICE, &fx.records(1..=10), Some(&fx.cp(10))),
        "stored 1..=10 +10 head 10 cp 10",
        "records 1..=10 cps [10] acked 10 alerts []",
    );
    let behind = |fx: &mut Fixture, head: u64| {
        let mut tx = fx.store.begin_ingest().unwrap();
        let got = note_behind(tx.as_mut(), &dev(DEVICE), head, "2026-12-01T12:00:01.000Z")
            .unwrap()
            .map(|o| describe(&o));
        tx.commit().unwrap();
        got
    };
    // Nothing reported yet, or nothing above the head.
    assert_eq!(behind(&mut fx, 10), None);
    let state = |acked: u64| {
        format!(
            r#"{{"v":1,"models":[],"aliases":{{}},"policy_version":null,"last_acked_seq":{acked}}}"#
        )
    };
    fx.send(DEVICE, DeviceTopic::StateReported, state(10).as_bytes());
    assert_eq!(behind(&mut fx, 10), None);
    // The device had 25 acked: this hub lost 11..=25 (an older backup).
    fx.send(DEVICE, DeviceTopic::StateReported, state(25).as_bytes());
    let detail = "the device reports records acked up to seq 25, the hub holds up to seq 10: \
                  the hub's store is behind the device (restored from an older backup?)";
    assert_eq!(
        behind(&mut fx, 10).as_deref(),
        Some(format!("alert behind@10: {detail}").as_str())
    );
    assert_eq!(
        behind(&mut fx, 10).as_deref(),
        Some(format!("alert behind@10 (again): {detail}").as_str())
    );
    assert_eq!(
        fx.store_state(),
        "records 1..=10 cps [10] acked 10 alerts [behind@10]"
    );
}
