//! Downloads on real files: chunk checks, re-requests, resume from a stored bitmap.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::protocol::GroupId;
use crate::release::{Manifest, Target};

const CHUNK: u64 = 100;

/// A blob of `len` bytes and the desired state naming it (unsigned: nothing here checks).
fn blob(len: usize) -> (Vec<u8>, DesiredState) {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let manifest = Manifest {
        name: "m".into(),
        version: "1".into(),
        release: 1,
        sha256: hex::encode(Sha256::digest(&bytes)),
        size: len as u64,
        chunk_size: CHUNK,
        chunk_sha256: bytes
            .chunks(CHUNK as usize)
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect(),
        architecture: "llama".into(),
        quantization: "q4_1".into(),
        expires: i64::MAX,
        signatures: vec![],
    };
    let doc = DesiredState {
        v: V1,
        rollout: 3,
        version: 1,
        target: Target::Group(GroupId::new("lab").unwrap()),
        model: "m:1".into(),
        manifest,
        alias: "default".into(),
        activate: false,
        issued_at: 0,
        expires: i64::MAX,
        signatures: vec![],
    };
    (bytes, doc)
}

fn row_of(doc: &DesiredState) -> TransferRow {
    let chunks = doc.manifest.chunk_sha256.len() as u64;
    TransferRow {
        sha256: doc.manifest.sha256.clone(),
        rollout: doc.rollout,
        model: doc.model.clone(),
        size: doc.manifest.size,
        chunk_size: CHUNK,
        chunks,
        bitmap: TransferRow::empty_bitmap(chunks),
        state: "downloading".into(),
        reason: None,
        attempts: 1,
        chunks_rejected: 0,
    }
}

/// Answers every request in `reqs` from `bytes` (with `tamper` applied to chunk bytes).
fn answer(
    d: &mut Download,
    bytes: &[u8],
    reqs: &[ChunkRequest],
    tamper: &dyn Fn(u64, &mut Vec<u8>),
) -> Vec<ChunkOutcome> {
    let sha: [u8; 32] = hex::decode(d.sha256()).unwrap().try_into().unwrap();
    reqs.iter()
        .map(|r| {
            let mut b = bytes[r.offset as usize..(r.offset + r.length) as usize].to_vec();
            tamper(r.offset / CHUNK, &mut b);
            d.on_chunk(r.id, &sha, r.offset, &b)
        })
        .collect()
}

#[test]
fn a_download_verifies_each_chunk_and_asks_again_for_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, doc) = blob(1050);
    let mut d = Download::create(row_of(&doc), doc, dir.path()).unwrap();
    assert_eq!(std::fs::metadata(&d.path).unwrap().len(), 1050);
    let mut id = 0;
    let t0 = Instant::now();
    let reqs = d.next_requests(4, &mut id, t0);
    assert_eq!(
        reqs.iter()
            .map(|r| (r.offset, r.length))
            .collect::<Vec<_>>(),
        [(0, 100), (100, 100), (200, 100), (300, 100)]
    );
    // The window is full: nothing more until answers come.
    assert!(d.next_requests(4, &mut id, t0).is_empty());
    // Chunk 2 comes back corrupted: rejected and asked for again first.
    let out = answer(&mut d, &bytes, &reqs, &|c, b| {
        if c == 2 {
            b[0] ^= 1;
        }
    });
    assert_eq!(out[0], ChunkOutcome::Written);
    assert!(
        matches!(&out[2], ChunkOutcome::Rejected { chunk: 2, reason } if reason.contains("not the manifest's")),
        "{out:?}"
    );
    assert_eq!(d.row.chunks_rejected, 1);
    // A duplicate answer, one for another blob, one for an unknown id: strays.
    let sha: [u8; 32] = hex::decode(d.sha256()).unwrap().try_into().unwrap();
    assert_eq!(
        d.on_chunk(reqs[0].id, &sha, 0, &bytes[..100]),
        ChunkOutcome::Stray
    );
    assert_eq!(d.on_chunk(999, &sha, 0, &bytes[..100]), ChunkOutcome::Stray);
    assert_eq!(d.take_unsaved().unwrap(), 3);
    assert_eq!(d.take_unsaved().unwrap(), 0);
    let next = d.next_requests(4, &mut id, t0);
    assert_eq!(next[0].offset, 200, "the rejected chunk first");
    // A short answer (the last chunk is 50 bytes; here 100 are asked of chunk 4..).
    let out = answer(&mut d, &bytes, &next, &|_, b| {
        b.pop();
    });
    assert!(
        out.iter()
            .all(|o| matches!(o, ChunkOutcome::Rejected { .. }))
    );
    // Timeouts: requests unanswered are asked again.
    let later = d.next_requests(4, &mut id, t0);
    assert_eq!(
        d.expire(Duration::from_secs(10), t0 + Duration::from_secs(9)),
        0
    );
    assert_eq!(
        d.expire(Duration::from_secs(10), t0 + Duration::from_secs(10)),
        later.len()
    );
    // Everything answered right: complete, and the file is the blob.
    loop {
        let reqs = d.next_requests(4, &mut id, t0);
        if reqs.is_empty() {
            break;
        }
        answer(&mut d, &bytes, &reqs, &|_, _| {});
    }
    d.take_unsaved().unwrap();
    assert!(d.complete());
    assert_eq!(hash_file(&d.path).unwrap(), d.row.sha256);
}

#[test]
fn a_chunk_bad_every_time_fails_the_download() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, doc) = blob(300);
    let mut d = Download::create(row_of(&doc), doc, dir.path()).unwrap();
    let mut id = 0;
    let mut outcomes = Vec::new();
    for _ in 0..MAX_CHUNK_REJECTS {
        let reqs = d.next_requests(1, &mut id, Instant::now());
        outcomes.extend(answer(&mut d, &bytes, &reqs, &|_, b| b[5] = !b[5]));
    }
    assert!(matches!(
        outcomes[0],
        ChunkOutcome::Rejected { chunk: 0, .. }
    ));
    assert!(
        matches!(&outcomes[2], ChunkOutcome::GaveUp { chunk: 0, reason } if reason.contains("chunk 0 failed its check 3 times")),
        "{outcomes:?}"
    );
}

#[test]
fn a_resumed_download_asks_only_for_chunks_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, doc) = blob(1000);
    let mut d = Download::create(row_of(&doc), doc.clone(), dir.path()).unwrap();
    let mut id = 0;
    let reqs = d.next_requests(6, &mut id, Instant::now());
    answer(&mut d, &bytes, &reqs[..5], &|_, _| {});
    d.take_unsaved().unwrap();
    let saved = d.row.clone();
    // One more chunk written but never recorded (a crash before its bit was stored).
    answer(&mut d, &bytes, &reqs[5..], &|_, _| {});
    drop(d);
    let mut again = Download::resume(saved, doc.clone(), dir.path()).unwrap();
    let reqs = again.next_requests(100, &mut id, Instant::now());
    assert_eq!(
        reqs.iter().map(|r| r.offset / CHUNK).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9]
    );
    answer(&mut again, &bytes, &reqs, &|_, _| {});
    again.take_unsaved().unwrap();
    assert!(again.complete());
    assert_eq!(hash_file(&again.path).unwrap(), doc.manifest.sha256);
    // A partial file of the wrong length is not resumed.
    std::fs::write(&again.path, b"short").unwrap();
    assert!(Download::resume(row_of(&doc), doc, dir.path()).is_err());
}

#[test]
fn stale_partials_are_removed_and_recorded_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.partial", "b.partial", "notes.txt"] {
        std::fs::write(dir.path().join(name), b"x").unwrap();
    }
    let n = remove_stale_partials(dir.path(), &|sha| sha == "a").unwrap();
    assert_eq!(n, 1);
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["a.partial", "notes.txt"]);
    assert_eq!(
        remove_stale_partials(&dir.path().join("none"), &|_| false).unwrap(),
        0
    );
    assert!(free_space(dir.path()).unwrap() > 0);
}

#[test]
fn every_step_has_an_audit_record() {
    let events = [
        (TransferEvent::Started, "started", "success"),
        (
            TransferEvent::Resumed { chunks_done: 4 },
            "resumed",
            "success",
        ),
        (
            TransferEvent::ChunkRejected {
                chunk: 2,
                reason: "bad".into(),
            },
            "chunk_rejected",
            "failure",
        ),
        (TransferEvent::Verified, "verified", "success"),
        (
            TransferEvent::WholeHashMismatch {
                attempt: 1,
                found: "ff".into(),
            },
            "hash_mismatch",
            "failure",
        ),
        (
            TransferEvent::Installed {
                model: "m:1".into(),
                created: true,
            },
            "installed",
            "success",
        ),
        (
            TransferEvent::RefusedDiskSpace { need: 10, free: 5 },
            "refused_disk_space",
            "denied",
        ),
        (
            TransferEvent::Failed { reason: "x".into() },
            "failed",
            "failure",
        ),
    ];
    for (e, step, outcome) in events {
        let entry = e.audit_entry("m:1", "ab", 3);
        assert_eq!(entry.action, ACTION_TRANSFER);
        assert_eq!(entry.outcome.as_str(), outcome, "{e:?}");
        assert_eq!(entry.details["step"], step);
        assert_eq!(entry.details["rollout"], 3);
        assert_eq!(entry.resource.as_deref(), Some("m:1"));
    }
}
