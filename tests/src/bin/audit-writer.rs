//! Test helper for crash tests: appends audit records to `<DATA>/audit.db` as fast as it can
//! and prints each acknowledged (durable) seq on stdout, until it is killed.
//!
//! Usage: audit-writer DATA DEVICE_ID

use std::io::Write;
use std::path::PathBuf;

use outpost_policy::audit::{AuditLog, AuditSettings, Entry, Outcome};
use outpost_policy::signing::KeyPair;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(data), Some(device)) = (args.next(), args.next()) else {
        return Err("usage: audit-writer DATA DEVICE_ID".into());
    };
    let data = PathBuf::from(data);
    std::fs::create_dir_all(&data)?;
    let key = KeyPair::load_or_generate(&data.join("device.key"))?;
    let mut settings = AuditSettings::new(&device);
    settings.checkpoint_every = 100;
    let log = AuditLog::open(&data.join("audit.db"), key, settings)?;
    let stdout = std::io::stdout();
    for batch in 0u64.. {
        let pending: Vec<_> = (0..20)
            .map(|i| {
                let mut e = Entry::new("crash-test", "test:append", Outcome::Success, "load");
                e.details = serde_json::json!({"batch": batch, "i": i});
                log.submit(e)
            })
            .collect();
        for p in pending {
            let r = p.wait()?;
            let mut out = stdout.lock();
            writeln!(out, "{}", r.seq)?;
            out.flush()?;
        }
    }
    Ok(())
}
