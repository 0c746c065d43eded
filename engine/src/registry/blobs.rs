//! The content-addressed blob store: `<data>/blobs/sha256/<hex>`.
//!
//! On-disk rules (crash recovery depends on them):
//! - A blob is written to `.import-<random>` in the same folder while its SHA-256 is computed,
//!   fsynced, then renamed to its hex digest and the folder fsynced. A name that is a digest
//!   therefore always holds complete bytes with that digest.
//! - The writer holds an exclusive `flock` on its temp file for its whole life. A temp file
//!   whose lock can be taken belongs to a dead process and is garbage.
//! - Whoever uses a blob (the engine, while a model is loaded) holds a shared `flock` on it.
//!   A blob is deleted only after an exclusive lock on it was taken, so a blob in use is
//!   never deleted; it stays until a later `gc`.
//! - The registry database is written only after the blob is in place, so every row names a
//!   blob that exists; a crash in between leaves an unreferenced blob for `gc`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::RegistryError;

const TEMP_PREFIX: &str = ".import-";
const COPY_BUF: usize = 1 << 20;

/// Files under one `blobs/sha256` folder.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

/// A blob being written: deleted on drop unless [`BlobStore::commit`] moved it into place.
#[derive(Debug)]
pub struct PendingBlob {
    temp: tempfile::NamedTempFile,
    pub sha256: String,
    pub size: u64,
}

impl PendingBlob {
    pub fn path(&self) -> &Path {
        self.temp.path()
    }
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub blobs_removed: Vec<String>,
    pub blobs_in_use: Vec<String>,
    pub temp_files_removed: usize,
    pub bytes_freed: u64,
}

pub(crate) fn io_err(
    path: &Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> RegistryError {
    let path = path.to_path_buf();
    move |source| RegistryError::Io { what, path, source }
}

pub fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl BlobStore {
    /// Opens (creating if needed) the store under `dir`.
    pub fn open(dir: PathBuf) -> Result<Self, RegistryError> {
        fs::create_dir_all(&dir).map_err(io_err(&dir, "creating the blob folder"))?;
        Ok(Self { dir })
    }

    /// The store under `dir`, without touching the disk (for read-only use).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub fn contains(&self, sha256: &str) -> bool {
        self.path_of(sha256).is_file()
    }

    /// Streams `source` into a locked temp file, hashing as it goes, and fsyncs it.
    /// `progress` is called with the bytes copied so far.
    pub fn ingest(
        &self,
        source: &mut dyn Read,
        source_path: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<PendingBlob, RegistryError> {
        let temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(io_err(&self.dir, "creating a temp file in"))?;
        let temp_path = temp.path().to_path_buf();
        temp.as_file()
            .lock()
            .map_err(io_err(&temp_path, "locking"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; COPY_BUF];
        let mut size = 0u64;
        let mut out = temp.as_file();
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(source_path, "reading")(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err(&self.dir, "writing to"))?;
            size += n as u64;
            progress(size);
        }
        out.sync_all().map_err(io_err(&self.dir, "flushing to"))?;
        Ok(PendingBlob {
            temp,
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }

    /// Moves a pending blob to its digest name (unless an identical blob is already there)
    /// and makes the rename durable. Returns whether a new blob was created.
    pub fn commit(&self, pending: PendingBlob) -> Result<bool, RegistryError> {
        let dest = self.path_of(&pending.sha256);
        if dest.is_file() {
            return Ok(false);
        }
        pending
            .temp
            .persist(&dest)
            .map_err(|e| io_err(&dest, "moving the blob into place at")(e.error))?;
        self.sync_dir()?;
        Ok(true)
    }

    /// Takes a file already on this store's filesystem (a verified download) as the blob
    /// `expected`: hashes it (the store's own check: a digest name only ever holds bytes
    /// with that digest), then RENAMES it into place, no copy, and fsyncs the folder. Returns
    /// whether a new blob was created; when the store already had it, `source` is left where
    /// it is. A digest other than `expected` is [`RegistryError::DigestMismatch`] and
    /// nothing moves.
    pub fn adopt(&self, source: &Path, expected: &str) -> Result<bool, RegistryError> {
        let mut input = File::open(source).map_err(io_err(source, "opening"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(source, "reading")(e)),
            };
            hasher.update(&buf[..n]);
        }
        let found = hex::encode(hasher.finalize());
        if found != expected {
            return Err(RegistryError::DigestMismatch {
                path: source.to_path_buf(),
                expected: expected.to_string(),
                found,
            });
        }
        let dest = self.path_of(expected);
        if dest.is_file() {
            return Ok(false);
        }
        input.sync_all().map_err(io_err(source, "flushing"))?;
        fs::rename(source, &dest).map_err(io_err(&dest, "moving the blob into place at"))?;
        self.sync_dir()?;
        Ok(true)
    }

    fn sync_dir(&self) -> Result<(), RegistryError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir, "syncing"))
    }

    /// Deletes a blob unless someone holds a lock on it. Returns `Ok(false)` when in use.
    pub fn delete(&self, sha256: &str) -> Result<bool, RegistryError> {
        let path = self.path_of(sha256);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io_err(&path, "opening")(e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, "locking")(e)),
        }
        fs::remove_file(&path).map_err(io_err(&path, "deleting"))?;
        self.sync_dir()?;
        Ok(true)
    }

    /// Opens a blob for reading and holds a shared lock on it for as long as the returned
    /// file lives, so that neither `remove` nor `gc` deletes it meanwhile.
    pub fn open_shared(&self, sha256: &str) -> Result<File, RegistryError> {
        let path = self.path_of(sha256);
        let file = File::open(&path).map_err(io_err(&path, "opening"))?;
        file.lock_shared().map_err(io_err(&path, "locking"))?;
        Ok(file)
    }

    /// Removes blobs for which `referenced` is false and temp files of dead writers.
    pub fn gc(&self, referenced: &dyn Fn(&str) -> bool) -> Result<GcReport, RegistryError> {
        let mut report = GcReport::default();
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir, "listing"))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir, "listing"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if is_digest(&name) {
                if referenced(&name) {
                    continue;
                }
                if self.delete(&name)? {
                    report.bytes_freed += size;
                    report.blobs_removed.push(name);
                } else {
                    report.blobs_in_use.push(name);
                }
            } else if name.starts_with(TEMP_PREFIX) {
                let path = entry.path();
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                if file.try_lock().is_ok() {
                    fs::remove_file(&path).map_err(io_err(&path, "deleting"))?;
                    report.temp_files_removed += 1;
                    report.bytes_freed += size;
                }
            }
        }
        report.blobs_removed.sort();
        Ok(report)
    }
}
