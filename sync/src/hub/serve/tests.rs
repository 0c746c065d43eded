//! The ingest thread on a real `hub.db` with records from a real device audit log: grouping,
//! parking of `ahead` batches, counters and acks. Its link is built but never connected, so
//! every ack is refused and counted as unsent; the broker side is in `sync/tests/serve.rs`.

use outpost_policy::audit::{AuditLog, AuditReader, AuditSettings, Entry, Query};
use outpost_policy::signing::KeyPair;
use tempfile::TempDir;
use tokio::sync::mpsc;

use super::*;
use crate::hub::store::{DeviceRecord, HubStore, SqliteStore};
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
            enrolled_at: "t".into(),
            ..DeviceRecord::enrolled(id.clone(), vec![], hex, "t")
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
    let data_dir = dir.path().to_path_buf();
    Fixture {
        _dir: dir,
        worker: Worker::new(Box::new(store), handle, Arc::default(), data_dir),
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
            may_park: true,
            _held: None,
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
fn an_ahead_batch_after_a_message_dropped_here_is_acked_at_once_not_parked() {
    let mut fx = fixture();
    let b1 = fx.item(1);
    fx.worker.handle(vec![b1]);
    // Batch 2 was dropped by the intake (over its device's limit): 3 and 4 come ahead, and
    // only the device's resend fills the gap, so waiting for it is no use.
    for n in [3, 4] {
        let mut b = fx.item(n);
        b.may_park = false;
        fx.worker.handle(vec![b]);
    }
    assert_eq!(
        fx.state(),
        "head Some(10) stored 1 records 10 ahead 2 parked 0/0 acks 3"
    );
    assert_eq!(fx.worker.parked_bytes, 0);
    // The resend: 2, 3 and 4 are stored in turn.
    for n in [2, 3, 4] {
        let b = fx.item(n);
        assert!(fx.worker.handle(vec![b]));
    }
    assert_eq!(
        fx.state(),
        "head Some(40) stored 4 records 40 ahead 2 parked 0/0 acks 6"
    );
}

#[test]
fn the_backlog_serves_devices_in_turn_not_in_arrival_order() {
    let state = br#"{"v":1,"models":[],"aliases":{},"policy_version":null,"last_acked_seq":0}"#;
    let item = |device: &str, n: usize| {
        let id = DeviceId::new(device).unwrap();
        let mut payload = state.to_vec();
        payload.extend(std::iter::repeat_n(b' ', n));
        Item {
            prepared: ingest::prepare(&device_topic(&id, DeviceTopic::StateReported), &payload),
            bytes: payload.len(),
            may_park: true,
            _held: None,
        }
    };
    let mut backlog = Backlog::default();
    // A flooder's 300 messages came first, then one of edge-02, then 2 of edge-03.
    for n in 0..300 {
        backlog.push(item("flooder", n));
    }
    backlog.push(item("edge-02", 0));
    backlog.push(item("edge-03", 0));
    backlog.push(item("edge-03", 1));
    let seen = |group: &[Item]| -> Vec<(String, usize)> {
        group
            .iter()
            .map(|i| {
                (
                    i.prepared.device().unwrap().to_string(),
                    i.bytes - state.len(),
                )
            })
            .collect()
    };
    let first = seen(&backlog.group(5));
    assert_eq!(
        first,
        [
            ("flooder".to_string(), 0),
            ("edge-02".to_string(), 0),
            ("edge-03".to_string(), 0),
            ("flooder".to_string(), 1),
            ("edge-03".to_string(), 1),
        ]
    );
    // Then the flooder alone, its messages in their order, until none is left.
    let rest = seen(&backlog.group(1000));
    assert_eq!(rest.len(), 298);
    assert!(
        rest.iter()
            .zip(2..)
            .all(|((d, n), want)| d == "flooder" && *n == want)
    );
    assert!(backlog.is_empty() && backlog.group(10).is_empty());
}

#[test]
fn the_thread_groups_what_is_queued_and_stops_when_the_queue_closes() {
    let fx = fixture();
    let items: Vec<Item> = [4, 2, 3, 1].into_iter().map(|n| fx.item(n)).collect();
    let metrics = fx.worker.metrics.clone();
    let (tx, rx) = queue::channel();
    // Queued before the thread starts: one group, in order; 4, 2 and 3 park, 1 is stored,
    // and the retry after it stores the rest.
    for item in items {
        tx.send(Work::Item(Box::new(item))).unwrap();
    }
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
            enrolled_at: "t".into(),
            ..DeviceRecord::enrolled(id.clone(), vec![], unusable, "t")
        })
        .unwrap();
    let bad = Item {
        prepared: ingest::prepare(&device_topic(&id, DeviceTopic::Audit), &payload),
        bytes: payload.len(),
        may_park: true,
        _held: None,
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

#[test]
fn a_parked_batch_is_verified_once_and_retried_without_the_write_lock() {
    let mut fx = fixture();
    let b2 = fx.item(2);
    assert!(!fx.worker.handle(vec![b2]));
    let key = fx
        .worker
        .store
        .device(&DeviceId::new(DEVICE).unwrap())
        .unwrap()
        .unwrap()
        .audit_key;
    // Its checkpoint (seq 20) was verified when it came, and that is remembered.
    assert_eq!(
        fx.worker.parked[0].item.prepared.checkpoint_verified_with(),
        Some(key.as_str())
    );
    // Another hub holds the write lock: a retry that cannot move anything does not wait
    // for it (it reads the head without the lock), nor fail.
    let other = rusqlite::Connection::open(fx._dir.path().join(SqliteStore::FILE)).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    fx.worker.last_retry = Instant::now() - PARK_RETRY;
    fx.worker.retry_parked();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fx.worker.metrics.snapshot().store_errors, 0);
    assert_eq!(fx.worker.parked.len(), 1);
    other.execute_batch("COMMIT").unwrap();
    // The head reaches it: then the retry takes the lock and stores it.
    let b1 = fx.item(1);
    assert!(fx.worker.handle(vec![b1]));
    fx.worker.retry_parked();
    assert_eq!(
        fx.state(),
        "head Some(20) stored 2 records 20 ahead 0 parked 1/0 acks 2"
    );
}

#[test]
fn the_ingest_thread_sleeps_unless_a_parked_batch_or_an_ack_needs_it() {
    let mut fx = fixture();
    assert_eq!(fx.worker.wake_at(), None);
    // An unsent ack alone: the link is down, `Connected` will wake the thread.
    let b1 = fx.item(1);
    fx.worker.handle(vec![b1]);
    assert_eq!(fx.worker.unsent.len(), 1);
    assert_eq!(fx.worker.wake_at(), None);
    // A parked batch: woken every PARK_RETRY until it is gone.
    let b3 = fx.item(3);
    fx.worker.handle(vec![b3]);
    let wake = fx.worker.wake_at().unwrap();
    assert!(wake <= Instant::now() + PARK_RETRY);
    fx.worker.park_for = Duration::ZERO;
    fx.worker.retry_parked();
    assert_eq!(fx.worker.wake_at(), None);
}

#[test]
fn an_ahead_batch_timing_out_on_a_hub_behind_its_device_is_alerted_once() {
    let mut fx = fixture();
    fx.worker.park_for = Duration::ZERO;
    let b1 = fx.item(1);
    fx.worker.handle(vec![b1]);
    // The device says it had 40 acked (this hub.db is an older backup).
    let state = br#"{"v":1,"models":[],"aliases":{},"policy_version":null,"last_acked_seq":40}"#;
    let topic = device_topic(&DeviceId::new(DEVICE).unwrap(), DeviceTopic::StateReported);
    let reported = Item {
        prepared: ingest::prepare(&topic, state),
        bytes: state.len(),
        may_park: true,
        _held: None,
    };
    fx.worker.handle(vec![reported]);
    for n in [5, 4] {
        let b = fx.item(n);
        fx.worker.handle(vec![b]);
        fx.worker.retry_parked();
    }
    assert_eq!(
        fx.state(),
        "head Some(10) stored 1 records 10 ahead 2 parked 2/0 acks 3"
    );
    let alerts: Vec<String> = {
        let db = rusqlite::Connection::open(fx._dir.path().join(SqliteStore::FILE)).unwrap();
        let mut stmt = db
            .prepare("SELECT kind || '@' || seq || ' ' || detail FROM audit_alerts")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    assert_eq!(
        alerts,
        [
            "behind@10 the device reports records acked up to seq 40, the hub holds up to seq 10: \
          the hub's store is behind the device (restored from an older backup?)"
        ]
    );
    // Seen twice (one per timed-out batch), recorded once.
    assert_eq!(fx.worker.metrics.snapshot().alerts, [("behind", 2)]);
}

#[test]
fn the_byte_budget_sheds_what_does_not_fit_and_takes_again_once_freed() {
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = queue::channel();
    let mut intake = Intake::new(1000, tx, metrics.clone());
    let topic = || "outpost/v1/devices/edge-01/telemetry".to_string();
    let each = cost(&topic(), &[0; 300]);
    assert_eq!(each, 300 + topic().len() + MESSAGE_OVERHEAD);
    assert!(intake.take(topic(), vec![0; 300]));
    assert_eq!(intake.held(), each);
    // A second one does not fit: shed, never queued.
    assert!(intake.take(topic(), vec![1; 300]));
    let m = metrics.snapshot();
    assert_eq!((m.received, m.shed), (2, 1));
    let first = rx.try_recv().unwrap();
    assert_eq!(first.payload, vec![0; 300]);
    assert!(rx.try_recv().is_err());
    // Done with the first (its permit goes with it): room again.
    drop(first);
    assert_eq!(intake.held(), 0);
    assert!(intake.take(topic(), vec![2; 300]));
    assert_eq!(rx.try_recv().unwrap().payload, vec![2; 300]);
    // Closed at shutdown: shed.
    intake.close();
    assert!(intake.take(topic(), vec![3; 10]));
    assert_eq!(metrics.snapshot().shed, 2);
    // The threads gone: false.
    let (tx, rx) = queue::channel();
    drop(rx);
    let mut intake = Intake::new(1000, tx, metrics);
    assert!(!intake.take(topic(), vec![4; 10]));
}

#[test]
fn a_device_over_its_share_of_the_budget_is_dropped_while_the_others_are_taken() {
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = queue::channel();
    let mut intake = Intake::new(10_000, tx, metrics.clone());
    // The intake reads topics, not payloads: these stand for audit batches.
    let flooder = || "outpost/v1/devices/edge-01/audit".to_string();
    let quiet = || "outpost/v1/devices/edge-02/audit".to_string();
    let each = cost(&flooder(), &[0; 300]);
    // edge-01 floods: four messages fit its share (in bytes), the rest are dropped as
    // limited although the budget has room for 16.
    intake.device_max = 4 * each + 100;
    for i in 0..10 {
        assert!(intake.take(flooder(), vec![i; 300]));
    }
    let m = metrics.snapshot();
    assert_eq!((m.received, m.limited, m.shed), (10, 6, 0), "{m:?}");
    assert_eq!(intake.held(), 4 * each);
    assert_eq!(
        metrics.limited_devices(),
        [(DeviceId::new("edge-01").unwrap(), 6)]
    );
    // edge-02 is taken, and may be parked; edge-01's next batch (once there is room) may
    // not, since it follows one dropped here.
    assert!(intake.take(quiet(), vec![9; 300]));
    let mut taken: Vec<Message> = rx.try_iter().collect();
    assert_eq!(taken.len(), 5);
    let last = taken.pop().unwrap();
    assert_eq!(
        (last.topic.as_str(), last.may_park),
        (quiet().as_str(), true)
    );
    assert!(taken.iter().all(|m| m.may_park));
    // Done with edge-01's first message: room in its share again.
    drop(taken.remove(0));
    assert!(intake.take(flooder(), vec![7; 300]));
    let next = rx.try_recv().unwrap();
    assert_eq!((next.payload[0], next.may_park), (7, false));
    assert_eq!(metrics.snapshot().limited, 6);
    // Pruned later: a device that holds nothing is forgotten, one still holding is kept.
    drop(last);
    let later = Instant::now() + intake.idle() + LAG_POLL;
    intake.prune(later);
    let kept: Vec<&str> = intake.devices.keys().map(DeviceId::as_str).collect();
    assert_eq!(kept, ["edge-01"]);
    drop((taken, next));
    assert_eq!(intake.held(), 0);
    intake.prune(later + LAG_POLL);
    assert!(intake.devices.is_empty());
}

#[test]
fn a_device_holding_its_most_messages_is_limited_until_the_hub_is_done_with_one() {
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = queue::channel();
    let mut intake = Intake::new(1 << 20, tx, metrics.clone());
    intake.device_max = 1 << 20;
    intake.device_max_messages = 3;
    let topic = |d: &str| format!("outpost/v1/devices/{d}/state/reported");
    // Small messages, far within the bytes: the count holds edge-01 to 3.
    for _ in 0..5 {
        assert!(intake.take(topic("edge-01"), vec![0; 10]));
    }
    assert!(intake.take(topic("edge-02"), vec![0; 10]));
    let m = metrics.snapshot();
    assert_eq!((m.received, m.limited, m.shed), (6, 2, 0), "{m:?}");
    let mut taken: Vec<Message> = rx.try_iter().collect();
    assert_eq!(taken.len(), 4);
    // State is not audit: dropping it leaves no gap, so edge-01 may still be parked.
    drop(taken.remove(0));
    assert!(intake.take(topic("edge-01"), vec![1; 10]));
    let next = rx.try_recv().unwrap();
    assert_eq!((next.payload[0], next.may_park), (1, true));
    assert_eq!(metrics.snapshot().limited, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_the_link_did_not_take_are_sent_after_connected() {
    use crate::conn::tests::{Mosquitto, free_port, mosquitto};
    if mosquitto().is_none() {
        return;
    }
    let mut fx = fixture();
    let port = free_port();
    let plain = |id: &str| {
        let mut c = LinkConfig::new(
            format!("mqtt://127.0.0.1:{port}"),
            DeviceId::new(id).unwrap(),
        );
        c.allow_plaintext = true;
        c.backoff = crate::conn::Backoff {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
        };
        c
    };
    let session = |subscriptions: Vec<String>| Session {
        will: Will {
            topic: "outpost/v1/hubs/outpost-hub/status".into(),
            payload: b"{}".to_vec(),
        },
        subscriptions,
    };
    let stop = CancellationToken::new();
    // The hub's link, with no broker yet: both acks are refused and kept, the newest.
    let (hub_link, _hub_events, hub_task) =
        Link::spawn(&plain("outpost-hub.t"), session(vec![]), stop.clone()).unwrap();
    fx.worker.link = hub_link.clone();
    let (b1, b2) = (fx.item(1), fx.item(2));
    fx.worker.handle(vec![b1]);
    fx.worker.handle(vec![b2]);
    let id = DeviceId::new(DEVICE).unwrap();
    assert_eq!(fx.worker.unsent.get(&id), Some(&20));
    assert_eq!(fx.worker.metrics.snapshot().acks_unsent, 2);

    // The broker comes up; the device listens on its ack topic.
    let dir = TempDir::new().unwrap();
    let _broker = Mosquitto::start(dir.path(), port, None);
    let ack_topic = device_topic(&id, DeviceTopic::AuditAck);
    let (dev, mut dev_events, dev_task) = Link::spawn(
        &plain(DEVICE),
        session(vec![ack_topic.clone()]),
        stop.clone(),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while next_event(&mut dev_events, deadline).await != LinkEvent::Connected {}
    // Subscribed once its own message comes back.
    let probe = br#"{"v":1,"device_id":"edge-01","acked_seq":0}"#.to_vec();
    dev.try_publish(&ack_topic, probe.clone(), false).unwrap();
    loop {
        if let LinkEvent::Message { payload, .. } = next_event(&mut dev_events, deadline).await {
            assert_eq!(payload, probe);
            break;
        }
    }
    while !hub_link.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `Connected` reaches the thread: the kept ack goes, once.
    let (tx, rx) = queue::channel();
    let metrics = fx.worker.metrics.clone();
    let worker = fx.worker;
    let thread = std::thread::spawn(move || worker.run(rx));
    tx.send(Work::Connected).unwrap();
    loop {
        if let LinkEvent::Message { payload, .. } = next_event(&mut dev_events, deadline).await {
            let ack: AuditAck = protocol::decode(&payload, MAX_ACK_BYTES).unwrap();
            assert_eq!(ack.acked_seq, 20);
            break;
        }
    }
    drop(tx);
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    assert_eq!(metrics.snapshot().acks_sent, 1);
    stop.cancel();
    hub_task.await.unwrap();
    dev_task.await.unwrap();
}

async fn next_event(
    events: &mut mpsc::Receiver<LinkEvent>,
    deadline: tokio::time::Instant,
) -> LinkEvent {
    tokio::time::timeout_at(deadline, events.recv())
        .await
        .expect("nothing within 10 s")
        .expect("the link ended")
}
