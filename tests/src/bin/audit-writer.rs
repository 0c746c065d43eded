//! Test helper for crash and sync tests: appends audit records to `<DATA>/audit.db` as fast
//! as it can and prints each acknowledged (durable) seq on stdout, until it is killed or, with
//! COUNT, until it has appended COUNT records (then it prints nothing but the last seq).
//!
//! Usage: audit-writer DATA DEVICE_ID [COUNT]

use std::io::Write;
use std::path::PathBuf;

use outpost_policy::audit::{AuditLog, AuditSettings, Entry, Outcome};
use outpost_policy::signing::KeyPair;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(data), Some(device)) = (args.next(), args.next()) else {
        return Err("usage: audit-writer DATA DEVICE_ID [COUNT]".into());
    };
    let count: Option<u64> = args.next().map(|c| c.parse()).transpose()?;
    let data = PathBuf::from(data);
    std::fs::create_dir_all(&data)?;
    let key = KeyPair::load_or_generate(&data.join("device.key"))?;
    let mut settings = AuditSettings::new(&device);
    settings.checkpoint_every = 100;
    let log = AuditLog::open(&data.join("audit.db"), key, settings)?;
    let stdout = std::io::stdout();
    // Bounded runs append in large waves (one commit each); unbounded ones in small ones, so
    // a kill lands between acknowledged records often.
    let wave = if count.is_some() { 2000 } else { 20 };
    let mut written = 0u64;
    for batch in 0u64.. {
        let n = count.map_or(wave, |c| wave.min(c - written));
        if n == 0 {
            break;
        }
        let pending: Vec<_> = (0..n)
            .map(|i| {
                let mut e = Entry::new("crash-test", "test:append", Outcome::Success, "load");
                e.details = serde_json::json!({"batch": batch, "i": i});
                log.submit(e)
            })
            .collect();
        for p in pending {
            let r = p.wait()?;
            written += 1;
            if count.is_none() || Some(written) == count {
                let mut out = stdout.lock();
                writeln!(out, "{}", r.seq)?;
                out.flush()?;
            }
        }
    }
    log.close()?;
    Ok(())
}
