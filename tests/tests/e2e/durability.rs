//! What reaches the disk, and in which order, read from the process's own system calls.
//!
//! `kill -9` keeps the page cache, so a crash test passes even with every `fsync` removed;
//! a power cut does not. These tests trace a real import and a real audit append with
//! `strace -f -y` and check the order a power cut needs: a file's data synced before the
//! rename that publishes it, the folder synced after it, and an audit record synced before
//! anything acts on it or reports it.

use crate::support::{Device, Syscall, strace};
use outpost_engine::testing::GgufBuilder;

const CALLS: &str =
    "fsync,fdatasync,rename,renameat,renameat2,openat,write,pwrite64,writev,pwritev";

/// Index of the first call after `from` (exclusive) matching `f`.
fn first_after(
    calls: &[Syscall],
    from: Option<usize>,
    f: impl Fn(&Syscall) -> bool,
) -> Option<usize> {
    let start = from.map_or(0, |i| i + 1);
    calls[start..]
        .iter()
        .position(|c| c.ok() && f(c))
        .map(|i| i + start)
}

fn last_before(calls: &[Syscall], before: usize, f: impl Fn(&Syscall) -> bool) -> Option<usize> {
    calls[..before].iter().rposition(|c| c.ok() && f(c))
}

/// What the trace shows, for failure messages: the calls that touched `needle`.
fn shown(calls: &[Syscall], needle: &str) -> String {
    calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.args.contains(needle) || c.result.contains(needle))
        .map(|(i, c)| format!("{i} [{}]: {}({}) = {}", c.pid, c.name, c.args, c.result))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that every write to a file named `wal` before `until` is followed, still before
/// `until`, by a sync of that file: what was written is on the disk by then.
fn assert_wal_synced_before(calls: &[Syscall], wal: &str, until: usize, what: &str) {
    let is_wal = |c: &Syscall| c.fd_path() == Some(wal);
    let last_write = last_before(calls, until, |c| c.is_write() && is_wal(c))
        .unwrap_or_else(|| panic!("no write to {wal} before {what}:\n{}", shown(calls, wal)));
    let synced = first_after(calls, Some(last_write), |c| c.is_sync() && is_wal(c));
    assert!(
        synced.is_some_and(|s| s < until),
        "{wal} written at call {last_write} but not synced before {what} (call {until}):\n{}",
        shown(calls, wal)
    );
}

#[test]
fn an_import_syncs_the_blob_before_renaming_it_and_the_folder_after() {
    let Some(strace) = strace() else {
        return;
    };
    let d = Device::new();
    // A first import creates the data directory, the registry and the audit log.
    let first = d.file("first.gguf", &GgufBuilder::llama_like().build());
    d.import(&first, "first", &[]).ok();
    let data = std::fs::canonicalize(&d.data).unwrap();
    let blobs = data.join("blobs/sha256");
    let blobs = blobs.to_str().unwrap();
    let wal = data.join("audit.db-wal");
    let wal = wal.to_str().unwrap();

    let mut b = GgufBuilder::llama_like();
    b.salt = 7;
    let model = d.file("second.gguf", &b.build());
    let (run, calls) = d.traced(
        &strace,
        CALLS,
        &[
            "models",
            "import",
            model.to_str().unwrap(),
            "--name",
            "second",
            "--json",
        ],
    );
    let sha = run.json()["sha256"].as_str().unwrap().to_string();
    let blob = format!("{blobs}/{sha}");

    // The temp file: created in the blob folder, written, synced, then renamed.
    let temp_prefix = format!("{blobs}/.import-");
    let created = first_after(&calls, None, |c| {
        c.name == "openat" && c.result_path().is_some_and(|p| p.starts_with(&temp_prefix))
    })
    .unwrap_or_else(|| panic!("no temp file was created:\n{}", shown(&calls, blobs)));
    let temp = calls[created].result_path().unwrap().to_string();
    let renamed = first_after(&calls, Some(created), |c| {
        c.is_rename() && c.strings() == [temp.clone(), blob.clone()]
    })
    .unwrap_or_else(|| {
        panic!(
            "{temp} was not renamed to {blob}:\n{}",
            shown(&calls, blobs)
        )
    });
    let last_write = last_before(&calls, renamed, |c| {
        c.is_write() && c.fd_path() == Some(temp.as_str())
    })
    .unwrap_or_else(|| panic!("nothing was written to {temp}:\n{}", shown(&calls, blobs)));
    let synced = first_after(&calls, Some(last_write), |c| {
        c.is_sync() && c.fd_path() == Some(temp.as_str())
    });
    assert!(
        synced.is_some_and(|s| s < renamed),
        "the blob's data must be synced before the rename publishes it:\n{}",
        shown(&calls, blobs)
    );
    // The folder: synced after the rename, so the new name survives a power cut.
    let dir_synced = first_after(&calls, Some(renamed), |c| {
        c.is_sync() && c.fd_path() == Some(blobs)
    })
    .unwrap_or_else(|| {
        panic!(
            "the blob folder must be synced after the rename:\n{}",
            shown(&calls, blobs)
        )
    });
    // The registry names the blob only once the blob is durable.
    let registry = data.join("registry.db");
    let registry = registry.to_str().unwrap();
    let registry_written = first_after(&calls, Some(created), |c| {
        c.is_write() && c.fd_path().is_some_and(|p| p.starts_with(registry))
    })
    .unwrap_or_else(|| panic!("the registry was not written:\n{}", shown(&calls, registry)));
    assert!(
        registry_written > dir_synced,
        "the registry was written before the blob was durable:\n{}",
        shown(&calls, "data/")
    );

    // No record, no action: the intent is on the disk before the temp file exists.
    assert_wal_synced_before(&calls, wal, created, "the import began");
    // Success is reported only once the registry row and the outcome record are on the disk.
    let reported = first_after(&calls, None, |c| c.is_write() && c.fd() == Some(1))
        .unwrap_or_else(|| panic!("nothing was printed: {run:?}"));
    assert!(
        reported > registry_written,
        "success reported before the registry changed:\n{}",
        shown(&calls, "data/")
    );
    assert_wal_synced_before(
        &calls,
        &format!("{registry}-wal"),
        reported,
        "success was reported",
    );
    assert_wal_synced_before(&calls, wal, reported, "success was reported");
}

#[test]
fn an_audit_record_is_synced_before_it_is_acknowledged() {
    let Some(strace) = strace() else {
        return;
    };
    let d = Device::new();
    let keys = d.issuer_keys("k1");
    std::fs::write(
        &d.config,
        format!(
            "[device]\nid = \"edge-1\"\n[[auth.issuers]]\niss = \"i\"\nkid = \"k1\"\n\
             algorithm = \"EdDSA\"\npublic_key = \"{}\"\n",
            keys.join("k1.pub.pem").display()
        ),
    )
    .unwrap();
    let token = d
        .run(&[
            "token",
            "issue",
            "--key",
            keys.join("k1.key.pem").to_str().unwrap(),
            "--iss",
            "i",
            "--kid",
            "k1",
            "--sub",
            "olivia",
            "--role",
            "operator",
        ])
        .ok()
        .trim()
        .to_string();
    let check = [
        "auth",
        "check",
        "--token",
        &token,
        "--action",
        "device:read",
        "--json",
    ];
    // The first run creates the log; the traced one appends to it.
    d.run(&check).ok();
    let (run, calls) = d.traced(&strace, CALLS, &check);
    assert_eq!(run.json()["allowed"], true, "{run:?}");
    let data = std::fs::canonicalize(&d.data).unwrap();
    let wal = data.join("audit.db-wal");
    let wal = wal.to_str().unwrap();
    let answered = first_after(&calls, None, |c| c.is_write() && c.fd() == Some(1))
        .unwrap_or_else(|| panic!("nothing was printed: {run:?}"));
    assert_wal_synced_before(&calls, wal, answered, "the decision was printed");
    // Whatever is written to the log after the answer (the closing checkpoint) is synced too.
    if let Some(last) = last_before(&calls, calls.len(), |c| {
        c.is_write() && c.fd_path() == Some(wal)
    }) {
        assert!(
            first_after(&calls, Some(last), |c| c.is_sync()
                && c.fd_path() == Some(wal))
            .is_some(),
            "the log's last write is never synced:\n{}",
            shown(&calls, "audit.db")
        );
    }
    let records = d.run(&["audit", "query", "--json"]).json();
    assert_eq!(records.as_array().unwrap().len(), 2, "{records}");
}
