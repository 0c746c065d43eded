//! Faults a device meets unattended: a full disk, a read-only disk, power cut mid-import.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::{Device, Tmpfs, sha256_file};
use outpost_engine::testing::GgufBuilder;

/// A valid model of roughly `mib` MiB (one big f32 tensor), different per `salt`.
fn big_model(mib: u64, salt: u8) -> Vec<u8> {
    let mut b = GgufBuilder::llama_like();
    b.tensor("blk.1.big.weight", &[1024, mib * 256], 0);
    b.salt = salt;
    b.build()
}

#[test]
fn a_full_disk_fails_the_import_cleanly() {
    let Some(fs) = Tmpfs::mount(3 << 20) else {
        return;
    };
    let d = Device::with_data(fs.path().join("data"));
    let small = d.file("small.gguf", &GgufBuilder::llama_like().build());
    d.import(&small, "small", &[]).ok();
    let blobs = d.blob_files();
    let big = d.file("big.gguf", &big_model(8, 1));
    let out = d.import(&big, "big", &[]);
    out.fails(1, "No space left on device");
    assert_eq!(d.models().len(), 1);
    assert_eq!(
        d.blob_files(),
        blobs,
        "no temp file is left on the full disk"
    );
    // The space is free again: a small import still works.
    let other = {
        let mut b = GgufBuilder::llama_like();
        b.salt = 9;
        d.file("other.gguf", &b.build())
    };
    d.import(&other, "other", &[]).ok();
}

#[test]
fn a_read_only_data_dir_refuses_changes_and_still_lists() {
    let Some(fs) = Tmpfs::mount(8 << 20) else {
        return;
    };
    let d = Device::with_data(fs.path().join("data"));
    let m = d.file("m.gguf", &GgufBuilder::llama_like().build());
    d.import(&m, "m", &[]).ok();
    fs.remount_read_only();
    let before = d.blob_files();
    let out = d.import(&m, "n", &[]);
    out.fails(1, "Read-only file system");
    d.run(&["models", "activate", "m"])
        .fails(1, "Read-only file system");
    assert_eq!(d.blob_files(), before);
    assert_eq!(d.models(), vec![("m:1".to_string(), vec![])]);
}

/// `kill -9` at random instants of an import, many times: the registry always opens, lists
/// only models whose blobs are complete, lists every import that reported success, and `gc`
/// leaves no debris. The kills must really land mid-import, or the test proves nothing.
#[test]
fn kill_9_at_any_moment_of_an_import_leaves_a_consistent_registry() {
    let d = Device::new();
    let seed: u64 = std::env::var("OUTPOST_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill -9 test seed: {seed} (set OUTPOST_TEST_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let files: Vec<_> = (0..3u8)
        .map(|i| d.file(&format!("big{i}.gguf"), &big_model(24, i)))
        .collect();

    // How long an import takes here, to spread the kills over all of it.
    let start = Instant::now();
    d.import(&files[0], "warmup", &[]).ok();
    let full = start.elapsed();

    let iterations = 30;
    let mut reported_success = Vec::new();
    let mut killed_mid_copy = 0;
    for i in 0..iterations {
        let file = &files[i % files.len()];
        let temps_before = temp_files(&d);
        let version = format!("v{i}");
        let mut child = d
            .command()
            .args(["models", "import", file.to_str().unwrap(), "--name", "big"])
            .args(["--version", &version])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(rng.random_range(0.0..1.3));
        std::thread::sleep(delay.min(Duration::from_secs(10)));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            reported_success.push(format!("big:{version}"));
        } else if temp_files(&d) > temps_before {
            // Its temp file outlived it: the kill landed while the blob was being written.
            killed_mid_copy += 1;
        }
        assert_consistent(&d);
        let listed: Vec<String> = d.models().into_iter().map(|(l, _)| l).collect();
        for label in &reported_success {
            assert!(
                listed.contains(label),
                "{label} reported success but is not listed: {listed:?}"
            );
        }
    }
    eprintln!(
        "{} of {iterations} imports finished before the kill, {killed_mid_copy} were killed \
         while copying",
        reported_success.len()
    );
    assert!(
        killed_mid_copy > 0,
        "no kill landed while a blob was being written: the test proved nothing (seed {seed})"
    );
    assert!(
        reported_success.len() < iterations,
        "every import finished before its kill (seed {seed})"
    );
    d.run(&["models", "gc"]).ok();
    assert!(
        d.blob_files().iter().all(|f| !f.starts_with('.')),
        "gc removes every temp file: {:?}",
        d.blob_files()
    );
    assert_consistent(&d);
}

/// How many `.import-*` temp files the blob folder holds.
fn temp_files(d: &Device) -> usize {
    d.blob_files()
        .iter()
        .filter(|f| f.starts_with(".import-"))
        .count()
}

fn assert_consistent(d: &Device) {
    let list = d.run(&["models", "list", "--json"]).json();
    for m in list.as_array().unwrap() {
        let sha = m["sha256"].as_str().unwrap();
        let blob = d.data.join("blobs/sha256").join(sha);
        assert!(blob.is_file(), "{m} is listed but its blob is missing");
        assert_eq!(
            sha256_file(&blob),
            sha,
            "{m} is listed but its blob is incomplete"
        );
        assert_eq!(
            std::fs::metadata(&blob).unwrap().len(),
            m["size_bytes"].as_u64().unwrap()
        );
    }
    let conn = rusqlite::Connection::open(d.data.join("registry.db")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
