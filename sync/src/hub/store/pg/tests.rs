//! The PostgreSQL store held against the SQLite one, on a real server (a database per test,
//! dropped afterwards; see [`super::testing`]): the same messages through ingest give the
//! same outcomes and the same reads on both; schema versions; two "hubs" (stores) ingesting
//! one stream at once; releases; `migrate`. Device chains come from a real `AuditLog`,
//! packed by the protocol's `BatchBuilder`.

use std::sync::{Arc, Barrier};

use outpost_policy::audit::{
    AuditLog, AuditReader, AuditSettings, Checkpoint, Entry, Outcome as AuditOutcome, Query, Record,
};
use outpost_policy::signing::KeyPair;
use tempfile::TempDir;

use super::testing::TestDb;
use super::*;
use crate::hub::audit::DeviceChain;
use crate::hub::ingest::{Handled, apply, prepare};
use crate::hub::store::releases::{ChunkCount, RolloutRow, StoredModel};
use crate::hub::store::{SqliteStore, Store, StoreConfig};
use crate::protocol::{BatchBuilder, BatchLimits, DeviceTopic, Pushed, device_topic};
use crate::release::Target;

const NOW: &str = "2026-12-01T12:00:00.000Z";

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// `n` records of a device's log signed by `key`, checkpoints every 5.
fn device_log(
    dir: &std::path::Path,
    device: &str,
    key: &KeyPair,
    n: usize,
) -> (Vec<Record>, Vec<Checkpoint>) {
    let path = dir.join(format!("{device}-{:08x}.db", rand::random::<u32>()));
    let copy = KeyPair::from_pem(&key.private_pem(), &path).unwrap();
    let mut settings = AuditSettings::new(device);
    settings.checkpoint_every = 5;
    let log = AuditLog::open(&path, copy, settings).unwrap();
    for i in 0..n {
        let outcome = if i % 3 == 0 {
            AuditOutcome::Denied
        } else {
            AuditOutcome::Success
        };
        let actor = if i % 2 == 0 {
            "local:alice"
        } else {
            "local:bob"
        };
        log.append(Entry::new(
            actor,
            "models:activate",
            outcome,
            &format!("entry {i}"),
        ))
        .unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&path).unwrap();
    (
        reader.query(&Query::default()).unwrap(),
        reader.checkpoints().unwrap(),
    )
}

/// The wire payload of `records` with the newest checkpoint at or below the last.
fn batch(device: &str, records: &[Record], cps: &[Checkpoint]) -> Vec<u8> {
    let last = records[records.len() - 1].seq;
    let cp = cps.iter().rev().find(|c| c.seq <= last);
    let limits = BatchLimits {
        max_records: 10_000,
        max_bytes: 1 << 30,
    };
    let mut b = BatchBuilder::new(&dev(device), cp, limits).unwrap();
    for r in records {
        assert_eq!(b.push(r).unwrap(), Pushed::Added);
    }
    b.finish().unwrap().payload
}

fn enrolled(id: &str, key: &KeyPair, groups: &[&str]) -> DeviceRecord {
    DeviceRecord {
        enrolled_at: "2026-01-01T00:00:00.000Z".into(),
        ..DeviceRecord::enrolled(
            dev(id),
            groups.iter().map(|g| GroupId::new(g).unwrap()).collect(),
            key.public_hex(),
            "local:test",
        )
    }
}

/// Applies one message in its own transaction.
fn send(store: &mut dyn Store, device: &str, kind: DeviceTopic, payload: &[u8]) -> Handled {
    let prepared = prepare(&device_topic(&dev(device), kind), payload);
    let mut tx = store.begin_ingest().unwrap();
    let handled = apply(tx.as_mut(), &prepared, NOW).unwrap();
    tx.commit().unwrap();
    handled
}

/// Everything the auditors' reads say about `device`, as text to compare.
fn reads(store: &dyn Store, device: &str) -> String {
    let id = dev(device);
    let mut out = format!("{:?}\n", store.devices().unwrap());
    let queries = [
        Query::default(),
        Query {
            limit: Some(3),
            newest: true,
            ..Query::default()
        },
        Query {
            after_seq: Some(7),
            limit: Some(4),
            ..Query::default()
        },
        Query {
            actor: Some("local:bob".into()),
            outcome: Some(AuditOutcome::Denied),
            ..Query::default()
        },
    ];
    for q in &queries {
        store
            .for_each_audit_record(&id, q, &mut |r| {
                out.push_str(&format!("{r:?}\n"));
                Ok(())
            })
            .unwrap();
        out.push_str("--\n");
    }
    out.push_str(&format!("{:?}\n", store.audit_checkpoints(&id).unwrap()));
    let (n, alerts) = store.audit_alerts(&id, 20).unwrap();
    out.push_str(&format!("{n} {alerts:?}\n"));
    let report = DeviceChain::open(store, &id).unwrap().verify().unwrap();
    out.push_str(&report.chain.summary());
    out
}

/// A SQLite store and a PostgreSQL one, both empty; `None` when PostgreSQL is not there
/// (and CI is not set).
struct Both {
    dir: TempDir,
    db: TestDb,
    sqlite: Box<dyn Store>,
    pg: Box<dyn Store>,
}

fn both() -> Option<Both> {
    let db = TestDb::create()?;
    let dir = TempDir::new().unwrap();
    let sqlite = StoreConfig::Sqlite(dir.path().to_path_buf())
        .open()
        .unwrap();
    let pg = StoreConfig::new(Some(db.url()), dir.path())
        .unwrap()
        .open()
        .unwrap();
    Some(Both {
        dir,
        db,
        sqlite,
        pg,
    })
}

/// The messages of a device's session: status, duplicates, a batch ahead, a batch from
/// another log (an alert), reported state and telemetry.
fn session(dir: &std::path::Path, key: &KeyPair) -> Vec<(DeviceTopic, Vec<u8>)> {
    let (records, cps) = device_log(dir, "edge-01", key, 20);
    let (other, _) = device_log(dir, "edge-01", &KeyPair::generate().unwrap(), 20);
    let b = |a: usize, z: usize| batch("edge-01", &records[a - 1..z], &cps);
    vec![
        (
            DeviceTopic::Status,
            br#"{"v":1,"state":"online","agent_version":"0.1.0"}"#.to_vec(),
        ),
        (DeviceTopic::Audit, b(1, 5)),
        (DeviceTopic::Audit, b(1, 5)),
        (DeviceTopic::Audit, b(11, 15)),
        (DeviceTopic::Audit, b(6, 10)),
        (DeviceTopic::Audit, batch("edge-01", &other[10..15], &[])),
        (DeviceTopic::Audit, b(11, 20)),
        (DeviceTopic::Audit, b(3, 12)),
        (
            DeviceTopic::Telemetry,
            br#"{"v":1,"ts":"2026-12-01T12:00:00.000Z","metrics":{"audit_last_seq":25}}"#.to_vec(),
        ),
        (DeviceTopic::Audit, b(16, 20)),
    ]
}

#[test]
fn both_stores_take_the_same_messages_the_same_way_and_read_back_alike() {
    let Some(mut s) = both() else { return };
    let key = KeyPair::generate().unwrap();
    for store in [&mut s.sqlite, &mut s.pg] {
        store.enroll(&enrolled("edge-01", &key, &["lab"])).unwrap();
        assert!(matches!(
            store.enroll(&enrolled("edge-01", &key, &[])),
            Err(HubError::AlreadyEnrolled(_))
        ));
    }
    for (kind, payload) in session(s.dir.path(), &key) {
        let a = send(s.sqlite.as_mut(), "edge-01", kind, &payload);
        let b = send(s.pg.as_mut(), "edge-01", kind, &payload);
        assert_eq!(a, b, "{kind:?}");
    }
    let (sqlite, pg) = (
        reads(s.sqlite.as_ref(), "edge-01"),
        reads(s.pg.as_ref(), "edge-01"),
    );
    assert_eq!(sqlite, pg);
    // The session did store, alert and verify (the comparison is not of two empty stores).
    assert!(pg.contains("acked_seq: Some(20)"), "{pg}");
    assert!(pg.contains("audit_lag: Some(5)"), "{pg}");
    assert!(pg.contains("OK: 20 records"), "{pg}");
    let (alerts, _) = s.pg.audit_alerts(&dev("edge-01"), 20).unwrap();
    assert_eq!(alerts, 1);
    // Read-only, the same answers; a write is refused by the server.
    let ro = StoreConfig::Postgres(s.db.url().into())
        .open_read_only()
        .unwrap();
    assert_eq!(reads(ro.as_ref(), "edge-01"), pg);
    let mut ro = ro;
    let refused = ro.enroll(&enrolled("edge-02", &key, &[])).unwrap_err();
    assert!(refused.to_string().contains("read-only"), "{refused}");
}

#[test]
fn schema_is_migrated_once_by_hubs_starting_together_and_a_newer_one_is_left_alone() {
    let Some(db) = TestDb::create() else { return };
    // Read-only on an empty database: refused, and nothing created.
    let err = PgStore::open_read_only(db.url()).unwrap_err();
    assert!(err.to_string().contains("no hub store"), "{err}");
    let tables = |db: &TestDb| -> i64 {
        db.client()
            .query_one(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(tables(&db), 0);
    // Four hubs at once.
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (url, start) = (db.url().to_string(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                PgStore::open(&url).map(|_| ())
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let version: i32 = db
        .client()
        .query_one("SELECT version FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(i64::from(version), MIGRATIONS.len() as i64);
    // hub.db's tables, and schema_version.
    let dir = TempDir::new().unwrap();
    let sqlite_tables: i64 = SqliteStore::open(dir.path())
        .unwrap()
        .conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables(&db), sqlite_tables + 1);
    // A newer schema: refused by both openings, and untouched.
    db.client()
        .batch_execute("UPDATE schema_version SET version = 99")
        .unwrap();
    for err in [
        PgStore::open(db.url()).unwrap_err(),
        PgStore::open_read_only(db.url()).unwrap_err(),
    ] {
        assert!(matches!(err, HubError::Schema { found: 99, .. }), "{err}");
    }
    let version: i32 = db
        .client()
        .query_one("SELECT version FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 99);
}

#[test]
fn a_hub_hung_inside_a_transaction_holds_its_devices_locks_no_longer_than_the_timeout() {
    let Some(db) = TestDb::create() else { return };
    let mut hung = PgStore::open(db.url()).unwrap();
    let key = KeyPair::generate().unwrap();
    hung.enroll(&enrolled("edge-a", &key, &[])).unwrap();
    let id = dev("edge-a");
    // Hub 1 takes edge-a's lock and then hangs (it sends nothing more). The clock starts
    // before the lock is asked for: PostgreSQL's idle timer starts when it answers, which a
    // slow client (qemu-user) read 1 ms later, so a clock started after the answer saw
    // 9.9992 s of a 10 s timeout.
    let mut tx = hung.begin_ingest().unwrap();
    let started = std::time::Instant::now();
    tx.lock_devices(&[&id]).unwrap();
    // Hub 2 takes the same device: it waits, and gets it once PostgreSQL has ended hub 1's
    // idle transaction (without the timeout it would wait until hub 1 came back).
    let url = db.url().to_string();
    let other = std::thread::spawn(move || {
        let mut store = PgStore::open(&url).unwrap();
        let mut tx = store.begin_ingest().unwrap();
        tx.lock_devices(&[&dev("edge-a")]).unwrap();
        tx.commit().unwrap();
        started.elapsed()
    });
    let deadline = IDLE_IN_TRANSACTION * 3;
    while !other.is_finished() {
        assert!(
            started.elapsed() < deadline,
            "the other hub still waits for the device's lock after {:?}",
            started.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let waited = other.join().unwrap();
    assert!(waited >= IDLE_IN_TRANSACTION, "{waited:?}");
    // Hub 1, back: its transaction is gone, so nothing of it commits (nor is acked).
    assert!(tx.commit().is_err());
}

#[test]
fn two_hubs_ingesting_the_same_streams_store_each_record_once_and_never_ack_ahead() {
    let Some(db) = TestDb::create() else { return };
    let dir = TempDir::new().unwrap();
    let devices = ["edge-a", "edge-b"];
    let mut store = PgStore::open(db.url()).unwrap();
    let mut streams = Vec::new();
    for d in devices {
        let key = KeyPair::generate().unwrap();
        store.enroll(&enrolled(d, &key, &[])).unwrap();
        let (records, cps) = device_log(dir.path(), d, &key, 200);
        let batches: Vec<Vec<u8>> = records.chunks(5).map(|c| batch(d, c, &cps)).collect();
        streams.push((d, batches));
    }
    let streams = Arc::new(streams);
    let start = Arc::new(Barrier::new(2));
    let hubs: Vec<_> = (0..2)
        .map(|hub| {
            let (url, streams, start) = (db.url().to_string(), streams.clone(), start.clone());
            std::thread::spawn(move || {
                let mut store = PgStore::open(&url).unwrap();
                let mut check = postgres::Client::connect(&url, NoTls).unwrap();
                start.wait();
                let mut acks = 0;
                // Each hub takes both devices' batches in turns, the two hubs in opposite
                // device orders within a transaction (a deadlock without lock_devices),
                // over and over until both heads are at 200: what one stores, the other
                // finds duplicate; what is ahead, it finds ahead.
                for _round in 0..200 {
                    let mut all_done = true;
                    for i in 0..40 {
                        let order: Vec<usize> = if hub == 0 { vec![0, 1] } else { vec![1, 0] };
                        let prepared: Vec<_> = order
                            .iter()
                            .map(|&d| {
                                let (id, batches) = &streams[d];
                                prepare(&device_topic(&dev(id), DeviceTopic::Audit), &batches[i])
                            })
                            .collect();
                        let ids: Vec<DeviceId> = order.iter().map(|&d| dev(streams[d].0)).collect();
                        let mut tx = store.begin_ingest().unwrap();
                        tx.lock_devices(&ids.iter().collect::<Vec<_>>()).unwrap();
                        let handled: Vec<Handled> = prepared
                            .iter()
                            .map(|p| apply(tx.as_mut(), p, NOW).unwrap())
                            .collect();
                        tx.commit().unwrap();
                        // The ack each outcome gives, held against what another session
                        // reads as committed right after.
                        for h in handled {
                            let Some(acked) = h.outcome.acked_seq() else {
                                continue;
                            };
                            let device = h.device.unwrap();
                            let row = check
                                .query_one(
                                    "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM audit_records \
                                     WHERE device_id = $1",
                                    &[&device.as_str()],
                                )
                                .unwrap();
                            let (count, max): (i64, i64) = (row.get(0), row.get(1));
                            assert_eq!(count, max, "a gap in {device}'s records");
                            assert!(acked <= max as u64, "acked {acked} with {max} stored");
                            acks += 1;
                            all_done &= acked == 200;
                        }
                    }
                    if all_done {
                        break;
                    }
                }
                acks
            })
        })
        .collect();
    for h in hubs {
        assert!(h.join().unwrap() > 0);
    }
    for d in devices {
        let report = DeviceChain::open(&store, &dev(d))
            .unwrap()
            .verify()
            .unwrap();
        assert!(report.chain.ok, "{}", report.chain.summary());
        assert_eq!(report.chain.records, 200);
        assert_eq!(store.device(&dev(d)).unwrap().unwrap().acked_seq, Some(200));
    }
    drop(store);
}

fn model(name: &str, version: &str, release: u64) -> StoredModel {
    StoredModel {
        name: name.into(),
        version: version.into(),
        release,
        sha256: "ab".repeat(32),
        size: 1234,
        manifest_json: format!("{{\"name\":\"{name}\"}}"),
        published_at: NOW.into(),
        published_by: "local:test".into(),
    }
}

/// Publishes, rolls out, halts; everything the release reads say, as text.
fn releases(store: &mut dyn Store) -> String {
    let mut out = String::new();
    out.push_str(&format!("{}\n", store.next_release("smol").unwrap()));
    store.add_model(&model("smol", "1.0", 1)).unwrap();
    assert!(matches!(
        store.add_model(&model("smol", "1.0", 2)),
        Err(HubError::AlreadyPublished(_))
    ));
    out.push_str(&format!("{}\n", store.next_release("smol").unwrap()));
    out.push_str(&format!("{:?}\n", store.model("smol", "1.0").unwrap()));
    out.push_str(&format!("{:?}\n", store.model("smol", "2.0").unwrap()));
    let row = |target: &str| RolloutRow {
        id: 0,
        model: "smol:1.0".into(),
        target: Target::parse(target).unwrap(),
        alias: "default".into(),
        activate: true,
        batch_percent: 50,
        max_failures: Some(2),
        state: "running".into(),
        created_at: NOW.into(),
        created_by: "local:test".into(),
    };
    for _ in 0..2 {
        let targets = [
            (Target::parse("device:edge-01").unwrap(), 0),
            (Target::parse("group:lab").unwrap(), 1),
        ];
        let id = store
            .add_rollout(&row("group:lab"), &targets, &mut |id, t, v| {
                Ok(format!("doc {id} {t} {v}"))
            })
            .unwrap();
        out.push_str(&format!("rollout {id}\n"));
    }
    assert!(store.set_rollout_state(2, "halted").unwrap());
    assert!(!store.set_rollout_state(9, "halted").unwrap());
    out.push_str(&format!("{:?}\n", store.rollouts(None).unwrap()));
    out.push_str(&format!("{:?}\n", store.rollouts(Some(1)).unwrap()));
    out.push_str(&format!("{:?}\n", store.rollout_docs(2).unwrap()));
    out.push_str(&format!("{:?}\n", store.current_desired().unwrap()));
    out.push_str(&format!(
        "released {}\n",
        store.release_batch(2, 1).unwrap()
    ));
    out.push_str(&format!("{:?}\n", store.current_desired().unwrap()));
    out.push_str(&format!("{:?}\n", store.group_members("lab").unwrap()));
    out.push_str(&format!(
        "{:?}\n",
        store.reported_json(&dev("edge-01")).unwrap()
    ));
    // Chunk requests add up per (device, blob), across writes; the blob names its model.
    let sha = "ab".repeat(32);
    let count = |device: &str, sha256: &str, requested, refused| ChunkCount {
        device: dev(device),
        sha256: sha256.into(),
        requested,
        refused,
    };
    store
        .add_chunk_counts(&[count("edge-01", &sha, 5, 1), count("edge-02", &sha, 2, 0)])
        .unwrap();
    store
        .add_chunk_counts(&[count("edge-01", &sha, 3, 0), count("edge-01", "cd", 1, 1)])
        .unwrap();
    store.add_chunk_counts(&[]).unwrap();
    for (device, sha256) in [
        ("edge-01", sha.as_str()),
        ("edge-02", &sha),
        ("edge-01", "cd"),
    ] {
        out.push_str(&format!(
            "chunks {device} {sha256}: {}\n",
            store.chunks_requested(&dev(device), sha256).unwrap()
        ));
    }
    out.push_str(&format!(
        "chunks none: {}\n",
        store.chunks_requested(&dev("edge-03"), &sha).unwrap()
    ));
    out.push_str(&format!(
        "by sha: {:?} {:?}\n",
        store.model_by_sha(&sha).unwrap().map(|m| m.version),
        store.model_by_sha("cd").unwrap()
    ));
    out
}

#[test]
fn both_stores_keep_releases_alike() {
    let Some(mut s) = both() else { return };
    let key = KeyPair::generate().unwrap();
    for store in [&mut s.sqlite, &mut s.pg] {
        store.enroll(&enrolled("edge-01", &key, &["lab"])).unwrap();
        send(
            store.as_mut(),
            "edge-01",
            DeviceTopic::StateReported,
            br#"{"v":1,"models":[],"aliases":{},"policy_version":0,"last_acked_seq":0}"#,
        );
    }
    let sqlite = releases(s.sqlite.as_mut());
    let pg = releases(s.pg.as_mut());
    assert_eq!(sqlite, pg);
    assert!(pg.contains("doc 2 group:lab 2"), "{pg}");
    assert!(pg.contains("halted: true"), "{pg}");
    assert!(
        pg.contains(&format!("chunks edge-01 {}: 8\n", "ab".repeat(32))),
        "{pg}"
    );
    assert!(pg.contains("by sha: Some(\"1.0\") None"), "{pg}");
}

#[test]
fn migrate_moves_everything_verifies_it_and_refuses_a_database_that_has_rows() {
    let Some(db) = TestDb::create() else { return };
    let dir = TempDir::new().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut sqlite: Box<dyn Store> = Box::new(SqliteStore::open(dir.path()).unwrap());
    sqlite.enroll(&enrolled("edge-01", &key, &["lab"])).unwrap();
    sqlite.enroll(&enrolled("edge-02", &key, &[])).unwrap();
    for (kind, payload) in session(dir.path(), &key) {
        send(sqlite.as_mut(), "edge-01", kind, &payload);
    }
    let before = format!(
        "{}{}",
        reads(sqlite.as_ref(), "edge-01"),
        releases(sqlite.as_mut())
    );
    let report = migrate::sqlite_to_postgres(dir.path(), db.url()).unwrap();
    assert!(report.ok());
    assert_eq!(report.devices.len(), 2);
    assert_eq!(report.devices[0].chain.records, 20);
    let rows: Vec<String> = report
        .tables
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    assert_eq!(
        rows,
        [
            "devices 2",
            "device_groups 1",
            "audit_records 20",
            "audit_checkpoints 3",
            "audit_alerts 1",
            "models 1",
            "rollouts 2",
            "desired_docs 4",
            "blob_requests 3"
        ]
    );
    // The same reads there (releases() adds to what it reads, so only the audit side is
    // read again, and the release rows compared by their reads).
    let mut pg: Box<dyn Store> = Box::new(PgStore::open_read_only(db.url()).unwrap());
    assert_eq!(
        reads(pg.as_ref(), "edge-01"),
        reads(sqlite.as_ref(), "edge-01")
    );
    assert_eq!(
        format!("{:?}", pg.rollouts(None).unwrap()),
        format!("{:?}", sqlite.rollouts(None).unwrap())
    );
    assert_eq!(
        format!("{:?}", pg.current_desired().unwrap()),
        format!("{:?}", sqlite.current_desired().unwrap())
    );
    assert!(before.contains("OK: 20 records"));
    let _ = pg.as_mut();
    // Again: the target has rows now.
    let err = migrate::sqlite_to_postgres(dir.path(), db.url()).unwrap_err();
    assert!(err.to_string().contains("holds rows"), "{err}");
    let count: i64 = db
        .client()
        .query_one("SELECT COUNT(*) FROM audit_records", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 20);
}
