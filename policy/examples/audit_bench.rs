//! Audit log throughput: durable appends and verification, beside raw SQLite doing the same
//! I/O without the chain (the reference, measured in the same run).
//!
//! Usage: cargo run --release -p outpost-policy --example audit_bench -- [RECORDS]
//! (default 1,000,000). Prints a Markdown table; `bench/audit.sh` runs it.

use std::time::Instant;

use outpost_policy::audit::{
    AuditLog, AuditReader, AuditSettings, Entry, Outcome, Pending, verify_log,
};
use outpost_policy::signing::KeyPair;

fn entry(i: u64) -> Entry {
    let mut e = Entry::new(
        "app-7",
        "inference:run",
        Outcome::Allowed,
        "role app grants inference:run on smollm2",
    );
    e.roles = vec!["app".into()];
    e.resource = Some("smollm2".into());
    e.request_id = Some(format!("req-{i:012}"));
    e.policy_version = Some(3);
    e.details = serde_json::json!({
        "prompt_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "prompt_tokens": 41, "completion_tokens": 128,
    });
    e
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |s| s.parse())?;
    let dir = tempfile::tempdir()?;

    // Reference: the same rows into the same schema (and index), batched 1000 per commit like
    // the log's checkpoint boundary, synchronous=FULL, without the chain.
    let raw_path = dir.path().join("raw.db");
    let raw = rusqlite::Connection::open(&raw_path)?;
    raw.pragma_update(None, "journal_mode", "WAL")?;
    raw.pragma_update(None, "synchronous", "FULL")?;
    raw.execute_batch(
        "CREATE TABLE r (seq INTEGER PRIMARY KEY, ts TEXT, device_id TEXT, actor TEXT, roles TEXT,
         action TEXT, resource TEXT, outcome TEXT, reason TEXT, request_id TEXT,
         policy_version INTEGER, details TEXT, prev_hash TEXT, hash TEXT);
         CREATE INDEX r_ts ON r (ts);",
    )?;
    let t = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let tx = raw.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO r VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for _ in 0..1000.min(n - seq) {
                seq += 1;
                let e = entry(seq);
                stmt.execute(rusqlite::params![
                    seq as i64,
                    "2026-11-26T10:00:00.000Z",
                    "edge-1",
                    e.actor,
                    "[\"app\"]",
                    e.action,
                    e.resource,
                    "allowed",
                    e.reason,
                    e.request_id,
                    3,
                    e.details.to_string(),
                    "0".repeat(64),
                    "0".repeat(64)
                ])?;
            }
        }
        tx.commit()?;
    }
    let raw_append = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut rows = 0u64;
    {
        let mut stmt = raw.prepare("SELECT * FROM r ORDER BY seq")?;
        let mut q = stmt.query([])?;
        while let Some(row) = q.next()? {
            let _: String = row.get(13)?;
            rows += 1;
        }
    }
    let raw_scan = rows as f64 / t.elapsed().as_secs_f64();

    // The audit log: appends pipelined through the writer thread (group commit).
    let path = dir.path().join("audit.db");
    let log = AuditLog::open(&path, KeyPair::generate()?, AuditSettings::new("edge-1"))?;
    let t = Instant::now();
    let mut pending: std::collections::VecDeque<Pending> = Default::default();
    for i in 0..n {
        pending.push_back(log.submit(entry(i)));
        if pending.len() >= 16_384
            && let Some(p) = pending.pop_front()
        {
            p.wait()?;
        }
    }
    for p in pending {
        p.wait()?;
    }
    let append = n as f64 / t.elapsed().as_secs_f64();
    // One caller waiting for each record: bounded by fsync latency.
    let t = Instant::now();
    let single = 500u64;
    for i in 0..single {
        log.append(entry(i))?;
    }
    let one_by_one = single as f64 / t.elapsed().as_secs_f64();
    log.close()?;

    let reader = AuditReader::open(&path)?;
    let t = Instant::now();
    let report = verify_log(&reader, None)?;
    let verify = report.records as f64 / t.elapsed().as_secs_f64();
    assert!(report.ok, "{report:?}");

    println!("| measure ({n} records) | records/s | reference (raw SQLite, same run) | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| append, durable, pipelined (group commit) | {append:.0} | {raw_append:.0} (batched INSERT, no chain) | {:.2} |",
        append / raw_append
    );
    println!("| append, durable, one caller waiting on each | {one_by_one:.0} | | |");
    println!(
        "| verify (chain + {} checkpoint signatures) | {verify:.0} | {raw_scan:.0} (SELECT every row) | {:.2} |",
        report.checkpoints,
        verify / raw_scan
    );
    Ok(())
}
