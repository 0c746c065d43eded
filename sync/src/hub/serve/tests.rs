//! The ingest thread on a real `hub.db` with records from a real device audit log: grouping,
//! parking of `ahead` batches, counters and acks. Its link is built but never connected, so
//! every ack is refused and counted as unsent; the broker side is in `sync/tests/serve.rs`.

use outpost_policy::audit::{AuditLog, AuditReader, AuditSettings, Entry, Query};
use outpost_policy::signing::KeyPair;
use tempfile::TempDir;

use super::*;
use crate::hub::store::DeviceRecord;
use crate::protocol::{BatchBuilder, BatchLimits, Pushed};

const DEVICE: &str = "edge-01";

struct Fixture {
    _dir: TempDir,
    worker: Worker,
    /// The payloads of batches 1..=10, 11..=20, … with their newest checkpoint.
    batches: Vec<Vec<u8>>,
}

fn fixture() -> Fixture {
    let dir = TempDir::new().unwrap();
    let key = KeyPair::generate().unwrap();
    let hex = key.public_hex();
    let path = dir.path().join("device-audit.db");
    let mut settings = AuditSettings::new(DEVICE);
    settings.checkpoint_every = 10;
    let log = AuditLog::open(&path, key, settings).unwrap();
    for i in 0..50 {
        log.append(Entry::new(
            "local:test",
            "models:activate",
            outpost_policy::audit::Outcome::Success,
            &format!("entry {i}"),
        ))
        .unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&path).unwrap();
    let records = reader.query(&Query::default()).unwrap();
    let checkpoints = reader.checkpoints().unwrap();
    let id = DeviceId::new(DEVICE).unwrap();
    let limits = BatchLimits {
        max_records: 10,
        max_bytes: 1 << 20,
    };
    let batches = records
        .chunks(10)
        .map(|chunk| {
            let last = chunk[chunk.len() - 1].seq;
            let cp = checkpoints.iter().rev().find(|c| c.seq <= last);
            let mut b = BatchBuilder::new(&id, cp, limits).unwrap();
            for r in chunk {
                assert_eq!(b.push(r).unwrap(), Pushed::Added);
            }
            b.finish().unwrap().payload
        })
        .collect();

    let mut store = SqliteStore::open(dir.path()).unwrap();
    store
        .enroll(&DeviceRecord {
            id: id.clone(),
            groups: vec![],
            audit_key: hex,
            enrolled_at: "t".into(),
            enrolled_by: "t".into(),
            online: None,
            last_seen: None,
            agent_version: None,
            active_model: None,
            acked_seq: None,
            audit_lag: None,
        })
        .unwrap();
    let mut link = LinkConfig::new(
        "mqtt://127.0.0.1:9",
        DeviceId::new("outpost-hub.t").unwrap(),
    );
    link.allow_plaintext = true;
    let session = Session {
        will: Will {
            topic: "outpost/v1/hubs/outpost-hub/status".into(),
            payload: b"{}".to_vec(),
        },
        subscriptions: vec![],
    };
    let (_link, handle, _events) = Link::new(&link, session).unwrap();
    Fixture {
        _dir: dir,
        worker: Worker::new(store, handle, Arc::default()),
        batches,
    }
}

impl Fixture {
    /// Batch `n` (from 1) as the prepare thread hands it over.
    fn item(&self, n: usize) -> Item {
        let payload = &self.batches[n - 1];
        Item {
            prepared: ingest::prepare(
                &device_topic(&DeviceId::new(DEVICE).unwrap(), DeviceTopic::Audit),
                payload,
            ),
            bytes: payload.len(),
        }
    }

    /// The counters that matter here, and the stored head.
    fn state(&self) -> String {
        let m = self.worker.metrics.snapshot();
        let head = self
            .worker
            .store
            .device(&DeviceId::new(DEVICE).unwrap())
            .unwrap()
            .unwrap()
            .acked_seq;
        format!(
            "head {head:?} stored {} records {} ahead {} parked {}/{} acks {}",
            m.batches_stored,
            m.records_stored,
            m.batches_ahead,
            m.batches_parked,
            self.worker.parked.len(),
            m.acks_unsent,
        )
    }
}

#[test]
fn ahead_batches_wait_for_the_head_then_are_stored_in_order() {
    let mut fx = fixture();
    let (b2, b3, b1) = (fx.item(2), fx.item(3), fx.item(1));
    // 11..=20 and 21..=30 overtook 1..=10: parked, not acked.
    assert!(!fx.worker.handle(vec![b2]));
    assert!(!fx.worker.handle(vec![b3]));
    fx.worker.retry_parked();
    assert_eq!(
        fx.state(),
        "head None stored 0 records 0 ahead 0 parked 2/2 acks 0"
    );
    // The same batch again replaces the parked one.
    let again = fx.item(3);
    fx.worker.handle(vec![again]);
    assert_eq!(
        fx.state(),
        "head None stored 0 records 0 ahead 0 parked 3/2 acks 0"
    );
    // 1..=10 arrives: stored and acked; the retry then stores both parked batches in seq
    // order, with one ack.
    assert!(fx.worker.handle(vec![b1]));
    assert_eq!(
        fx.state(),
        "head Some(10) stored 1 records 10 ahead 0 parked 3/2 acks 1"
    );
    fx.worker.retry_parked();
    assert_eq!(
        fx.state(),
        "head Some(30) stored 3 records 30 ahead 0 parked 3/0 acks 2"
    );
}

#[test]
fn a_parked_batch_that_times_out_is_acked_as_ahead() {
    let mut fx = fixture();
    fx.worker.park_for = Duration::ZERO;
    let b1 = fx.item(1);
    fx.worker.handle(vec![b1]);
    let b5 = fx.item(5);
    fx.worker.handle(vec![b5]);
    assert_eq!(
        fx.state(),
        "head Some(10) stored 1 records 10 ahead 0 parked 1/1 acks 1"
    );
    fx.worker.retry_parked();
    assert_eq!(
        fx.state(),
        "head Some(10) stored 1 records 10 ahead 1 parked 1/0 acks 2"
    );
    assert_eq!(fx.worker.parked_bytes, 0);
}

#[test]
fn the_thread_groups_what_is_queued_and_stops_when_the_queue_closes() {
    let fx = fixture();
    let items: Vec<Item> = [4, 2, 3, 1].into_iter().map(|n| fx.item(n)).collect();
    let metrics = fx.worker.metrics.clone();
    let (tx, rx) = mpsc::channel(16);
    // Queued before the thread starts: one group, in order; 4, 2 and 3 park, 1 is stored,
    // and the retry after it stores the rest.
    for item in items {
        tx.blocking_send(Work::Item(item)).unwrap();
    }
    tx.blocking_send(Work::Tick).unwrap();
    drop(tx);
    let worker = fx.worker;
    std::thread::spawn(move || worker.run(rx)).join().unwrap();
    let m = metrics.snapshot();
    assert_eq!(
        (
            m.batches_stored,
            m.records_stored,
            m.batches_parked,
            m.batches_ahead,
            m.checkpoints_stored,
            m.acks_unsent
        ),
        (4, 40, 3, 0, 4, 2)
    );
}

#[test]
fn a_message_the_store_cannot_take_does_not_hold_up_its_group() {
    let mut fx = fixture();
    // A device whose enrolled key is unusable (a hub-side inconsistency: enrollment checks
    // keys, this row was written around it): its checkpoint cannot be verified.
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("b.db");
    let mut settings = AuditSettings::new("edge-02");
    settings.checkpoint_every = 2;
    let log = AuditLog::open(&path, KeyPair::generate().unwrap(), settings).unwrap();
    for _ in 0..2 {
        log.append(Entry::new(
            "local:test",
            "x",
            outpost_policy::audit::Outcome::Success,
            "",
        ))
        .unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&path).unwrap();
    let records = reader.query(&Query::default()).unwrap();
    let mut cp = reader.checkpoints().unwrap().pop();
    // The checkpoint carries the enrolled (unusable) key, so the hub gets as far as using it.
    let unusable = "z".repeat(64);
    if let Some(cp) = &mut cp {
        cp.public_key = unusable.clone();
    }
    let id = DeviceId::new("edge-02").unwrap();
    let mut b = BatchBuilder::new(
        &id,
        cp.as_ref(),
        BatchLimits {
            max_records: 10,
            max_bytes: 1 << 20,
        },
    )
    .unwrap();
    for r in &records {
        b.push(r).unwrap();
    }
    let payload = b.finish().unwrap().payload;
    fx.worker
        .store
        .enroll(&DeviceRecord {
            id: id.clone(),
            groups: vec![],
            audit_key: unusable,
            enrolled_at: "t".into(),
            enrolled_by: "t".into(),
            online: None,
            last_seen: None,
            agent_version: None,
            active_model: None,
            acked_seq: None,
            audit_lag: None,
        })
        .unwrap();
    let bad = Item {
        prepared: ingest::prepare(&device_topic(&id, DeviceTopic::Audit), &payload),
        bytes: payload.len(),
    };
    // Rejected as a group, then one by one: edge-01's batches are stored around it.
    let group = vec![fx.item(1), bad, fx.item(2)];
    assert!(fx.worker.handle(group));
    assert_eq!(
        fx.state(),
        "head Some(20) stored 2 records 20 ahead 0 parked 0/0 acks 2"
    );
    assert_eq!(fx.worker.metrics.snapshot().store_errors, 1);
    let b = fx.worker.store.device(&id).unwrap().unwrap();
    assert_eq!(b.acked_seq, None);
}
