//! Chunked, resumable download of a model blob on the device, and the seam to the installer.
//!
//! The sync loop ([`crate::device`]) drives one [`Download`] at a time: the blob of the model
//! its followed desired state names, when the registry does not have it. This module owns
//! the partial files and the per-chunk bookkeeping; `outbox.db` (`transfers`, see
//! [`crate::outbox`]) holds the durable part.
//!
//! On disk: `<data>/downloads/<sha256>.partial`, one per download, on the same filesystem as
//! the registry's blob store, so installing is a rename, never a copy (a device with room for
//! one model and its download never needs room for two copies). The folder belongs to this
//! module; the registry's `gc` never looks in it, so a partial file is left alone while its
//! transfer is recorded. A `.partial` without a `downloading` row is garbage
//! ([`remove_stale_partials`], run when the loop starts).
//!
//! Rules (crash recovery depends on them):
//! - Before a download starts: the free space of the folder's filesystem (statvfs, blocks
//!   available to unprivileged users) must hold the blob plus [`SPACE_MARGIN`]; else it is
//!   refused before anything is written, audited and reported `failed` with the reason.
//! - The row (`downloading`, empty bitmap) is written first, then the partial file is created
//!   and preallocated to the blob's size (`posix_fallocate`, so running out of space later
//!   cannot happen mid-write), fsynced, and the folder fsynced.
//! - A chunk's bytes are checked against the manifest's SHA-256 of that chunk, written at
//!   its offset, and only after the partial file is fsynced (`fdatasync`) is its bit set in
//!   the bitmap (one `outbox.db` transaction per burst of chunks). A crash therefore loses at
//!   most chunks whose bits were not yet stored, which are requested again; a set bit always
//!   means verified bytes on disk.
//! - A chunk that fails its hash is counted (`chunks_rejected`), audited, and requested
//!   again; after [`MAX_CHUNK_REJECTS`] rejections of one chunk the download fails (the
//!   hub's copy is bad: nothing will fix it by asking again).
//! - When every bit is set, the whole file is hashed. A mismatch discards the partial file
//!   (audited) and starts over (a new attempt) up to [`MAX_ATTEMPTS`] attempts, then the
//!   download is `failed`. A match is audited `verified`, the row becomes `staged`, and the
//!   file is handed to [`crate::device::DeviceSource::install`], which MOVES it into the
//!   registry (an import that takes the expected digest). A crash between `staged` and the
//!   install finds the row `staged` with the file present and installs it on restart.
//! - A failure is terminal for that rollout: a new rollout (another desired state) of the
//!   same blob starts over.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use outpost_policy::audit::{Entry, Outcome};
use sha2::{Digest, Sha256};
use tokio::time::{Duration, Instant};

use crate::outbox::TransferRow;
use crate::protocol::{ChunkRequest, TransferReport, V1};
use crate::release::DesiredState;

/// Free space required beyond the blob's size before a download starts.
pub const SPACE_MARGIN: u64 = 16 << 20;
/// Whole downloads begun for one blob before it is given up (a whole-hash mismatch starts
/// another).
pub const MAX_ATTEMPTS: u64 = 3;
/// Rejections of one chunk after which the download fails.
pub const MAX_CHUNK_REJECTS: u32 = 3;
/// The audit action of every transfer record.
pub const ACTION_TRANSFER: &str = "sync:transfer";
/// The partial files' suffix.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// How downloads run.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    /// `<data>/downloads`: must be on the registry's filesystem.
    pub dir: PathBuf,
    /// Chunk requests in flight at once.
    pub window: usize,
    /// A request unanswered for this long is sent again.
    pub chunk_timeout: Duration,
}

impl TransferSettings {
    /// Defaults: 16 requests in flight, 10 s before one is asked again.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            window: 16,
            chunk_timeout: Duration::from_secs(10),
        }
    }
}

/// What the installer is given: a verified file to move into the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRequest {
    /// The verified partial file; the installer MOVES it (rename, same filesystem).
    pub path: PathBuf,
    /// Its SHA-256, verified by the caller; the installer may check it again.
    pub sha256: String,
    pub size: u64,
    pub name: String,
    pub version: String,
    pub rollout: u64,
    /// The alias the desired state names and whether to activate it: activation is the
    /// caller's next step (health-gated), not the installer's.
    pub alias: String,
    pub activate: bool,
}

/// What the installer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// `name:version` in the registry.
    pub model: String,
    /// False when the registry already had it (the file was not needed).
    pub created: bool,
}

/// A step of a download, for the audit log (action [`ACTION_TRANSFER`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    Started,
    Resumed { chunks_done: u64 },
    ChunkRejected { chunk: u64, reason: String },
    Verified,
    WholeHashMismatch { attempt: u64, found: String },
    Installed { model: String, created: bool },
    Failed { reason: String },
    RefusedDiskSpace { need: u64, free: u64 },
}

impl TransferEvent {
    /// Its audit record for the download of `sha256` (`model`, `rollout`).
    pub fn audit_entry(&self, model: &str, sha256: &str, rollout: u64) -> Entry {
        let (step, outcome, reason, extra) = match self {
            Self::Started => (
                "started",
                Outcome::Success,
                "download started".to_string(),
                serde_json::json!({}),
            ),
            Self::Resumed { chunks_done } => (
                "resumed",
                Outcome::Success,
                format!("download resumed with {chunks_done} chunks verified"),
                serde_json::json!({ "chunks_done": chunks_done }),
            ),
            Self::ChunkRejected { chunk, reason } => (
                "chunk_rejected",
                Outcome::Failure,
                format!("chunk {chunk} rejected: {reason}"),
                serde_json::json!({ "chunk": chunk }),
            ),
            Self::Verified => (
                "verified",
                Outcome::Success,
                "whole SHA-256 verified".to_string(),
                serde_json::json!({}),
            ),
            Self::WholeHashMismatch { attempt, found } => (
                "hash_mismatch",
                Outcome::Failure,
                format!("the whole file hashes to {found}, not the manifest's; discarded"),
                serde_json::json!({ "attempt": attempt, "found": found }),
            ),
            Self::Installed { model, created } => (
                "installed",
                Outcome::Success,
                format!("installed as {model}"),
                serde_json::json!({ "created": created }),
            ),
            Self::Failed { reason } => (
                "failed",
                Outcome::Failure,
                reason.clone(),
                serde_json::json!({}),
            ),
            Self::RefusedDiskSpace { need, free } => (
                "refused_disk_space",
                Outcome::Denied,
                format!("not enough disk space: {need} bytes needed, {free} free"),
                serde_json::json!({ "need_bytes": need, "free_bytes": free }),
            ),
        };
        let mut entry = Entry::new("outpost-sync", ACTION_TRANSFER, outcome, &reason);
        entry.resource = Some(model.to_string());
        let mut details = serde_json::json!({
            "step": step, "sha256": sha256, "rollout": rollout,
        });
        if let (Some(d), Some(e)) = (details.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        entry.details = details;
        entry
    }
}

/// The partial file of `sha256` in `dir`.
pub fn partial_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join(format!("{sha256}{PARTIAL_SUFFIX}"))
}

/// Bytes available to unprivileged users on `dir`'s filesystem.
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Deletes partial files in `dir` whose blob is not in `keep` (no `downloading` or `staged`
/// row); returns how many.
pub fn remove_stale_partials(dir: &Path, keep: &dyn Fn(&str) -> bool) -> std::io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(sha) = name.strip_suffix(PARTIAL_SUFFIX)
            && !keep(sha)
        {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Creates (truncating) and preallocates the partial file, fsyncs it and the folder.
fn create_partial(path: &Path, size: u64) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    if size > 0 {
        let len = i64::try_from(size).map_err(|_| std::io::Error::other("size too large"))?;
        match nix::fcntl::posix_fallocate(&file, 0, len) {
            Ok(()) => {}
            // A filesystem without it: the length at least (sparse).
            Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(size)?,
            Err(e) => return Err(e.into()),
        }
    }
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// Hashes a file whole.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// What a received chunk did.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Verified and written (not yet durable: see [`Download::take_unsaved`]).
    Written,
    /// An answer to no request of ours (late, duplicate, another download): ignored.
    Stray,
    /// Failed its hash or length; asked again unless it failed too often.
    Rejected { chunk: u64, reason: String },
    /// Rejected too often: the download has failed.
    GaveUp { chunk: u64, reason: String },
}

/// What is left of a download once its file is closed.
#[derive(Debug)]
pub struct Parts {
    pub row: TransferRow,
    pub doc: DesiredState,
    pub path: PathBuf,
}

/// One download in progress.
#[derive(Debug)]
pub struct Download {
    pub row: TransferRow,
    pub doc: DesiredState,
    pub path: PathBuf,
    file: File,
    /// Chunks still to request, in order.
    todo: VecDeque<u64>,
    /// Request id → (chunk, when sent).
    inflight: HashMap<u64, (u64, Instant)>,
    /// Chunks written since the last save (their bits are set in `row`, not yet stored).
    unsaved: u64,
    rejects: HashMap<u64, u32>,
}

impl Download {
    /// A new download (its row is `row`, already stored): creates the partial file.
    pub fn create(row: TransferRow, doc: DesiredState, dir: &Path) -> std::io::Result<Self> {
        let path = partial_path(dir, &row.sha256);
        let file = create_partial(&path, row.size)?;
        Ok(Self::with_file(row, doc, path, file))
    }

    /// Resumes a recorded download: its partial file must exist with the blob's size.
    pub fn resume(row: TransferRow, doc: DesiredState, dir: &Path) -> std::io::Result<Self> {
        let path = partial_path(dir, &row.sha256);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let len = file.metadata()?.len();
        if len != row.size {
            return Err(std::io::Error::other(format!(
                "the partial file has {len} bytes, not {}",
                row.size
            )));
        }
        Ok(Self::with_file(row, doc, path, file))
    }

    fn with_file(row: TransferRow, doc: DesiredState, path: PathBuf, file: File) -> Self {
        let todo = (0..row.chunks).filter(|&i| !row.has(i)).collect();
        Self {
            row,
            doc,
            path,
            file,
            todo,
            inflight: HashMap::new(),
            unsaved: 0,
            rejects: HashMap::new(),
        }
    }

    pub fn sha256(&self) -> &str {
        &self.row.sha256
    }

    /// Every chunk verified (and saved, once `unsaved` is 0).
    pub fn complete(&self) -> bool {
        self.row.done() == self.row.chunks
    }

    /// Offset and length of chunk `i`.
    fn range(&self, i: u64) -> (u64, u64) {
        let off = i * self.row.chunk_size;
        (off, self.row.chunk_size.min(self.row.size - off))
    }

    /// The requests to send now (up to the window), each with the chunk it asks for;
    /// `next_id` numbers them. Call [`Download::unsent`] for one the link did not take.
    pub fn next_requests(
        &mut self,
        window: usize,
        next_id: &mut u64,
        now: Instant,
    ) -> Vec<ChunkRequest> {
        let mut out = Vec::new();
        while self.inflight.len() < window {
            let Some(chunk) = self.todo.pop_front() else {
                break;
            };
            let (offset, length) = self.range(chunk);
            *next_id = next_id.wrapping_add(1);
            self.inflight.insert(*next_id, (chunk, now));
            out.push(ChunkRequest {
                v: V1,
                id: *next_id,
                sha256: self.row.sha256.clone(),
                offset,
                length,
            });
        }
        out
    }

    /// The link did not take request `id`: its chunk goes back to the front.
    pub fn unsent(&mut self, id: u64) {
        if let Some((chunk, _)) = self.inflight.remove(&id) {
            self.todo.push_front(chunk);
        }
    }

    /// Forgets every request in flight (the link went down): their chunks go back to the
    /// front, in order.
    pub fn forget_inflight(&mut self) {
        let mut chunks: Vec<u64> = self.inflight.drain().map(|(_, (c, _))| c).collect();
        chunks.sort_unstable();
        for c in chunks.into_iter().rev() {
            self.todo.push_front(c);
        }
    }

    /// Requests older than `timeout`: forgotten, their chunks to be asked again; how many.
    pub fn expire(&mut self, timeout: Duration, now: Instant) -> usize {
        let old: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            self.unsent(*id);
        }
        old.len()
    }

    /// A chunk frame's contents arrived for request `id`.
    pub fn on_chunk(
        &mut self,
        id: u64,
        sha256: &[u8; 32],
        offset: u64,
        bytes: &[u8],
    ) -> ChunkOutcome {
        let Some(&(chunk, _)) = self.inflight.get(&id) else {
            return ChunkOutcome::Stray;
        };
        let (want_off, want_len) = self.range(chunk);
        if hex::encode(sha256) != self.row.sha256 || offset != want_off {
            return ChunkOutcome::Stray;
        }
        self.inflight.remove(&id);
        let reason = if bytes.len() as u64 != want_len {
            Some(format!("{} bytes, expected {want_len}", bytes.len()))
        } else {
            let got = hex::encode(Sha256::digest(bytes));
            let want = self.doc.manifest.chunk_sha256.get(chunk as usize);
            (want != Some(&got)).then(|| format!("SHA-256 {got} is not the manifest's"))
        };
        if let Some(reason) = reason {
            self.row.chunks_rejected += 1;
            let n = self.rejects.entry(chunk).or_insert(0);
            *n += 1;
            if *n >= MAX_CHUNK_REJECTS {
                return ChunkOutcome::GaveUp {
                    chunk,
                    reason: format!(
                        "chunk {chunk} failed its check {n} times (last: {reason}); the hub's copy of the blob is bad"
                    ),
                };
            }
            self.todo.push_front(chunk);
            return ChunkOutcome::Rejected { chunk, reason };
        }
        if self.row.has(chunk) {
            return ChunkOutcome::Stray;
        }
        if let Err(e) = self.file.write_all_at(bytes, offset) {
            self.todo.push_front(chunk);
            return ChunkOutcome::Rejected {
                chunk,
                reason: format!("writing it: {e}"),
            };
        }
        self.row.set(chunk);
        self.unsaved += 1;
        ChunkOutcome::Written
    }

    /// Chunks written since the last save; when any, fsyncs the partial file first (their
    /// bits may then be stored). Zero when there is nothing to save.
    pub fn take_unsaved(&mut self) -> std::io::Result<u64> {
        if self.unsaved == 0 {
            return Ok(0);
        }
        self.file.sync_data()?;
        Ok(std::mem::take(&mut self.unsaved))
    }

    /// Whether request `id` is one of this download's in flight.
    pub fn owns(&self, id: u64) -> bool {
        self.inflight.contains_key(&id)
    }

    /// Its row, document and partial file's path (the file is closed).
    pub fn into_parts(self) -> Parts {
        Parts {
            row: self.row,
            doc: self.doc,
            path: self.path,
        }
    }

    /// The report for `state/reported`.
    pub fn report(&self) -> TransferReport {
        report_of(&self.row)
    }
}

/// The report for `state/reported` of a recorded download.
pub fn report_of(row: &TransferRow) -> TransferReport {
    TransferReport {
        rollout: row.rollout,
        model: row.model.clone(),
        sha256: row.sha256.clone(),
        state: row.state.clone(),
        chunks_done: row.done(),
        chunks_total: row.chunks,
        reason: row.reason.clone(),
    }
}

#[cfg(test)]
mod tests;
