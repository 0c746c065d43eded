//! The hub's ingest into its two stores, side by side in one run: `hub.db` (SQLite) and a
//! fresh PostgreSQL database (dropped afterwards), each fed the same real device chains
//! (`AuditLog`, checkpoints every 100) packed by `BatchBuilder` and applied with
//! `ingest::apply` as `serve`'s ingest thread does (no broker). Prints records/s for one
//! batch per transaction and eight per transaction, and PostgreSQL with two "hubs"
//! (threads, each with its own store and devices) at once.
//!
//! `cargo run --release -p outpost-sync --example hub_store_bench -- [RECORDS] [BATCH]`
//! (defaults 20000 and 50; PostgreSQL from `OUTPOST_TEST_PG` or the local server).

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use outpost_policy::audit::{AuditLog, AuditReader, AuditSettings, Entry, Outcome, Query};
use outpost_policy::signing::KeyPair;
use outpost_sync::hub::ingest::{Prepared, apply, prepare};
use outpost_sync::hub::store::pg::testing::TestDb;
use outpost_sync::hub::store::{DeviceRecord, Store, StoreConfig};
use outpost_sync::protocol::{BatchBuilder, BatchLimits, DeviceId, DeviceTopic, device_topic};

/// One device's chain as prepared audit messages, and its enrollment.
fn device(
    dir: &std::path::Path,
    id: &str,
    records: usize,
    batch: usize,
) -> (DeviceRecord, Vec<Prepared>) {
    let key = KeyPair::generate().unwrap();
    let path = dir.join(format!("{id}.db"));
    let mut settings = AuditSettings::new(id);
    settings.checkpoint_every = 100;
    let log = AuditLog::open(
        &path,
        KeyPair::from_pem(&key.private_pem(), &path).unwrap(),
        settings,
    )
    .unwrap();
    let pending: Vec<_> = (0..records)
        .map(|i| {
            log.submit(Entry::new(
                "local:bench",
                "inference:run",
                Outcome::Allowed,
                &format!("request {i}"),
            ))
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    drop(log);
    let reader = AuditReader::open(&path).unwrap();
    let all = reader.query(&Query::default()).unwrap();
    let cps = reader.checkpoints().unwrap();
    let did = DeviceId::new(id).unwrap();
    let topic = device_topic(&did, DeviceTopic::Audit);
    let limits = BatchLimits {
        max_records: batch,
        max_bytes: 1 << 20,
    };
    let prepared = all
        .chunks(batch)
        .map(|chunk| {
            let last = chunk[chunk.len() - 1].seq;
            let cp = cps.iter().rev().find(|c| c.seq <= last);
            let mut b = BatchBuilder::new(&did, cp, limits).unwrap();
            for r in chunk {
                b.push(r).unwrap();
            }
            prepare(&topic, &b.finish().unwrap().payload)
        })
        .collect();
    let record = DeviceRecord {
        enrolled_at: "2026-01-01T00:00:00.000Z".into(),
        ..DeviceRecord::enrolled(did, vec![], key.public_hex(), "local:bench")
    };
    (record, prepared)
}

/// Applies `batches` in groups of `per_tx`; records/s.
fn ingest(store: &mut dyn Store, batches: &[Prepared], per_tx: usize, records: usize) -> f64 {
    let started = Instant::now();
    for group in batches.chunks(per_tx) {
        let mut tx = store.begin_ingest().unwrap();
        for p in group {
            apply(tx.as_mut(), p, "2026-12-01T12:00:00.000Z").unwrap();
        }
        tx.commit().unwrap();
    }
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let records: usize = args.next().map_or(20_000, |a| a.parse().unwrap());
    let batch: usize = args.next().map_or(50, |a| a.parse().unwrap());
    let dir = tempfile::TempDir::new().unwrap();
    let Some(db) = TestDb::create() else {
        eprintln!("no PostgreSQL: nothing to compare");
        return;
    };
    let stores = [
        ("sqlite", StoreConfig::Sqlite(dir.path().join("hub"))),
        ("postgres", StoreConfig::Postgres(db.url().into())),
    ];
    let mut n = 0;
    println!("{records} records per run, {batch} per batch");
    for per_tx in [1, 8] {
        for (name, config) in &stores {
            n += 1;
            let (dev, batches) = device(dir.path(), &format!("dev-{n}"), records, batch);
            let mut store = config.open().unwrap();
            store.enroll(&dev).unwrap();
            let rate = ingest(store.as_mut(), &batches, per_tx, records);
            println!("{name:>8}, {per_tx} batch(es)/transaction: {rate:>8.0} records/s");
        }
    }
    // Two hubs on PostgreSQL at once, each with its own device.
    let work: Vec<_> = (0..2)
        .map(|i| device(dir.path(), &format!("dev-two-{i}"), records, batch))
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = work
        .into_iter()
        .map(|(dev, batches)| {
            let config = stores[1].1.clone();
            std::thread::spawn(move || {
                let mut store = config.open().unwrap();
                store.enroll(&dev).unwrap();
                ingest(store.as_mut(), &batches, 8, records)
            })
        })
        .collect();
    let each: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let total = (2 * records) as f64 / started.elapsed().as_secs_f64();
    println!(
        "postgres, two hubs at once (8/transaction): {total:>8.0} records/s in all ({:.0} + {:.0})",
        each[0], each[1]
    );
}
