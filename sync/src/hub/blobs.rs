//! `serve`'s blob server: answers devices' chunk requests (`devices/{id}/blobs/get`) from the
//! hub's blob store (`<data_dir>/blobs/sha256/<hex>`) with chunk frames on
//! `devices/{id}/blobs`, on a thread of its own ([`BLOB_THREAD`]), so chunks never wait
//! behind the audit ingest's fsyncs.
//!
//! Rules, in the order a request meets them:
//! 1. Who asks is the topic's device (the broker's ACL lets only that certificate write
//!    there), never anything in the payload.
//! 2. Rate limit per device: a token bucket of `rate` requests per second holding up to
//!    `burst`. A request without a token is counted as refused, logged (at most once per
//!    [`REFUSAL_LOG_EVERY`] per device) and NOT answered: the device asks again after its
//!    timeout, so a device asking too fast slows itself down.
//! 3. The request decodes (size cap first), its `sha256` is a published blob (`hub.db`'s
//!    `models`), `offset` is a chunk boundary of that manifest inside the blob and `length`
//!    is exactly that chunk's length (at most [`MAX_CHUNK_BYTES`]). Anything else is answered
//!    with a refusal frame naming why, and counted as refused.
//! 4. The chunk is read from the blob file (`pread`, at the offset) and published QoS 1. A
//!    link that cannot take it (disconnected, queue full) drops it; the device asks again.
//!
//! Every request (answered or not) is counted per device and blob and added to `hub.db`'s
//! `blob_requests` every [`COUNT_FLUSH`] (and when the thread stops): the `chunks_requested`
//! of `rollout status`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::rollout::blob_dir;
use super::store::Store;
use super::store::releases::ChunkCount;
use crate::conn::LinkHandle;
use crate::protocol::chunk::{MAX_CHUNK_BYTES, MAX_CHUNK_REQUEST_BYTES, digest_bytes};
use crate::protocol::{self, ChunkFrame, ChunkRequest, DeviceId, DeviceTopic, FrameBody};
use crate::release::Manifest;

/// The blob server thread's name.
pub const BLOB_THREAD: &str = "hub-blobs";
/// How often request counts are written to `hub.db`.
pub const COUNT_FLUSH: Duration = Duration::from_millis(500);
/// How often, at most, refusals of one device are logged.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// Requests waiting for the thread, at most; more are dropped (the devices ask again).
pub const QUEUE_LEN: usize = 4096;
/// Default rate: chunk requests per second per device.
pub const DEFAULT_RATE: f64 = 1000.0;
/// Default burst: requests a device may make at once.
pub const DEFAULT_BURST: f64 = 128.0;

/// The per-device rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second.
    pub rate: f64,
    /// Most tokens held.
    pub burst: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// One device's token bucket.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(limit: RateLimit, now: Instant) -> Self {
        Self {
            tokens: limit.burst,
            at: now,
        }
    }

    /// Takes a token if there is one (after refilling for the time passed).
    pub fn take(&mut self, limit: RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The blob server's counters.
#[derive(Debug, Default)]
pub struct BlobMetrics {
    pub requests: AtomicU64,
    pub served: AtomicU64,
    pub served_bytes: AtomicU64,
    pub rate_limited: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
}

/// A request from the link: the device (from the topic) and the payload.
#[derive(Debug)]
pub struct BlobRequest {
    pub device: DeviceId,
    pub payload: Vec<u8>,
}

/// A published blob, as served.
struct Served {
    size: u64,
    chunk_size: u64,
    file: Option<File>,
}

/// What the server decided about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer with the chunk at `offset`, `length` bytes of blob `sha256`.
    Serve {
        id: u64,
        sha256: String,
        offset: u64,
        length: u64,
    },
    /// Answer with a refusal frame.
    Refuse {
        id: u64,
        sha256: [u8; 32],
        offset: u64,
        reason: String,
    },
    /// Not answered (rate limit, unreadable payload).
    Drop { reason: String },
}

/// Checks a decoded request against a blob's size and chunk size (rule 3's range part).
pub fn check_range(r: &ChunkRequest, size: u64, chunk_size: u64) -> Result<(), String> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_BYTES as u64 {
        return Err(format!(
            "the blob's chunk size {chunk_size} cannot be served (at most {MAX_CHUNK_BYTES})"
        ));
    }
    if r.offset >= size || !r.offset.is_multiple_of(chunk_size) {
        return Err(format!(
            "offset {} is not a chunk boundary inside the blob ({size} bytes, chunks of {chunk_size})",
            r.offset
        ));
    }
    let want = chunk_size.min(size - r.offset);
    if r.length != want {
        return Err(format!(
            "length {} is not the chunk's ({want} bytes at offset {})",
            r.length, r.offset
        ));
    }
    Ok(())
}

/// The checks, the counts and the reads, without the link.
pub struct Gate {
    store: Box<dyn Store>,
    dir: PathBuf,
    limit: RateLimit,
    buckets: HashMap<DeviceId, Bucket>,
    blobs: HashMap<String, Served>,
    counts: HashMap<(DeviceId, String), (u64, u64)>,
    last_flush: Instant,
}

/// The blob server (see the module header).
pub struct BlobServer {
    gate: Gate,
    link: LinkHandle,
    refusals_logged: HashMap<DeviceId, Instant>,
    metrics: Arc<BlobMetrics>,
}

impl BlobServer {
    pub fn new(gate: Gate, link: LinkHandle, metrics: Arc<BlobMetrics>) -> Self {
        Self {
            gate,
            link,
            refusals_logged: HashMap::new(),
            metrics,
        }
    }

    /// Serves until the queue closes, then writes the counts.
    pub fn run(mut self, queue: mpsc::Receiver<BlobRequest>) {
        loop {
            match queue.recv_timeout(COUNT_FLUSH) {
                Ok(r) => self.handle(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.gate.last_flush.elapsed() >= COUNT_FLUSH {
                self.gate.flush();
            }
        }
        self.gate.flush();
        debug!("Blob server done.");
    }
}

impl Gate {
    /// Over `store` (its own connection to the hub's store: `hub.db` or PostgreSQL) and the
    /// blob store of `data_dir`.
    pub fn new(store: Box<dyn Store>, data_dir: &std::path::Path, limit: RateLimit) -> Self {
        Self {
            store,
            dir: blob_dir(data_dir),
            limit,
            buckets: HashMap::new(),
            blobs: HashMap::new(),
            counts: HashMap::new(),
            last_flush: Instant::now(),
        }
    }

    fn count(&mut self, device: &DeviceId, sha256: &str, refused: bool) {
        let c = self
            .counts
            .entry((device.clone(), sha256.to_string()))
            .or_insert((0, 0));
        c.0 += 1;
        c.1 += u64::from(refused);
    }

    /// Writes the counts gathered since the last flush (kept for the next one on failure).
    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.counts.is_empty() {
            return;
        }
        let counts: Vec<ChunkCount> = self
            .counts
            .iter()
            .map(|((device, sha256), (requested, refused))| ChunkCount {
                device: device.clone(),
                sha256: sha256.clone(),
                requested: *requested,
                refused: *refused,
            })
            .collect();
        match self.store.add_chunk_counts(&counts) {
            Ok(()) => self.counts.clear(),
            Err(e) => warn!(error = %e, "Chunk request counts not stored; tried again."),
        }
    }

    /// Decides what to do with a request (rules 2 and 3).
    pub fn decide(&mut self, device: &DeviceId, payload: &[u8], now: Instant) -> Decision {
        let r = match protocol::decode::<ChunkRequest>(payload, MAX_CHUNK_REQUEST_BYTES) {
            Ok(r) => r,
            Err(e) => {
                return Decision::Drop {
                    reason: e.to_string(),
                };
            }
        };
        let limit = self.limit;
        let bucket = self
            .buckets
            .entry(device.clone())
            .or_insert_with(|| Bucket::full(limit, now));
        let allowed = bucket.take(limit, now);
        let Some(raw) = digest_bytes(&r.sha256) else {
            return Decision::Drop {
                reason: "the sha256 is not 64 lowercase hex digits".into(),
            };
        };
        self.count(device, &r.sha256, !allowed);
        if !allowed {
            return Decision::Drop {
                reason: "over the rate limit".into(),
            };
        }
        let refuse = |reason: String| Decision::Refuse {
            id: r.id,
            sha256: raw,
            offset: r.offset,
            reason,
        };
        let Some((size, chunk_size)) = self.blob(&r.sha256) else {
            self.count_refusal(device, &r.sha256);
            return refuse(format!("no published blob {}", r.sha256));
        };
        if let Err(why) = check_range(&r, size, chunk_size) {
            self.count_refusal(device, &r.sha256);
            return refuse(why);
        }
        Decision::Serve {
            id: r.id,
            sha256: r.sha256,
            offset: r.offset,
            length: r.length,
        }
    }

    fn count_refusal(&mut self, device: &DeviceId, sha256: &str) {
        if let Some(c) = self.counts.get_mut(&(device.clone(), sha256.to_string())) {
            c.1 += 1;
        }
    }

    /// Size and chunk size of a published blob (looked up once, then cached).
    fn blob(&mut self, sha256: &str) -> Option<(u64, u64)> {
        if let Some(s) = self.blobs.get(sha256) {
            return Some((s.size, s.chunk_size));
        }
        let model = match self.store.model_by_sha(sha256) {
            Ok(m) => m?,
            Err(e) => {
                warn!(error = %e, "The published models cannot be read.");
                return None;
            }
        };
        let manifest: Manifest = serde_json::from_str(&model.manifest_json).ok()?;
        self.blobs.insert(
            sha256.to_string(),
            Served {
                size: manifest.size,
                chunk_size: manifest.chunk_size,
                file: None,
            },
        );
        Some((manifest.size, manifest.chunk_size))
    }

    /// Reads a chunk from the blob file (opened once).
    pub fn read(&mut self, sha256: &str, offset: u64, length: u64) -> Result<Vec<u8>, String> {
        let path = self.dir.join(sha256);
        let served = self
            .blobs
            .get_mut(sha256)
            .ok_or_else(|| "not a published blob".to_string())?;
        if served.file.is_none() {
            served.file = Some(File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?);
        }
        let file = served.file.as_ref().ok_or("no file")?;
        let mut buf = vec![0u8; length as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(buf)
    }
}

impl BlobServer {
    fn handle(&mut self, req: BlobRequest) {
        crate::hub::serve::inc(&self.metrics.requests, 1);
        let topic = protocol::device_topic(&req.device, DeviceTopic::Blobs);
        let frame = match self.gate.decide(&req.device, &req.payload, Instant::now()) {
            Decision::Drop { reason } => {
                let counter = if reason == "over the rate limit" {
                    &self.metrics.rate_limited
                } else {
                    &self.metrics.refused
                };
                crate::hub::serve::inc(counter, 1);
                self.log_refusal(&req.device, &reason);
                return;
            }
            Decision::Refuse {
                id,
                sha256,
                offset,
                reason,
            } => {
                crate::hub::serve::inc(&self.metrics.refused, 1);
                self.log_refusal(&req.device, &reason);
                ChunkFrame {
                    request_id: id,
                    sha256,
                    offset,
                    body: FrameBody::Refused(&reason),
                }
                .encode()
            }
            Decision::Serve {
                id,
                sha256,
                offset,
                length,
            } => {
                let raw = digest_bytes(&sha256).unwrap_or([0; 32]);
                match self.gate.read(&sha256, offset, length) {
                    Ok(bytes) => {
                        crate::hub::serve::inc(&self.metrics.served, 1);
                        crate::hub::serve::inc(&self.metrics.served_bytes, length);
                        ChunkFrame {
                            request_id: id,
                            sha256: raw,
                            offset,
                            body: FrameBody::Chunk(&bytes),
                        }
                        .encode()
                    }
                    Err(e) => {
                        warn!(error = %e, sha256 = %sha256, "A published blob cannot be read.");
                        let reason = "the hub cannot read this blob".to_string();
                        ChunkFrame {
                            request_id: id,
                            sha256: raw,
                            offset,
                            body: FrameBody::Refused(&reason),
                        }
                        .encode()
                    }
                }
            }
        };
        match frame {
            Ok(bytes) => {
                if let Err(e) = self.link.try_publish(&topic, bytes, false) {
                    crate::hub::serve::inc(&self.metrics.dropped, 1);
                    debug!(error = %e, device_id = %req.device, "Chunk not sent; the device asks again.");
                }
            }
            Err(e) => warn!(error = %e, "A chunk frame cannot be encoded."),
        }
    }

    fn log_refusal(&mut self, device: &DeviceId, reason: &str) {
        let now = Instant::now();
        if self
            .refusals_logged
            .get(device)
            .is_some_and(|t| now.duration_since(*t) < REFUSAL_LOG_EVERY)
        {
            debug!(device_id = %device, reason, "Chunk request refused.");
            return;
        }
        self.refusals_logged.insert(device.clone(), now);
        info!(device_id = %device, reason, "Chunk request refused (further ones logged at debug for a while).");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::protocol::V1;

    fn req(offset: u64, length: u64) -> ChunkRequest {
        ChunkRequest {
            v: V1,
            id: 1,
            sha256: "a".repeat(64),
            offset,
            length,
        }
    }

    /// `offset length` against a 250-byte blob of 100-byte chunks.
    fn check(input: &str, expect: &str) {
        let mut it = input.split(' ').map(|n| n.parse::<u64>().unwrap());
        let (o, l) = (it.next().unwrap(), it.next().unwrap());
        let got = match check_range(&req(o, l), 250, 100) {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        };
        assert_eq!(got, expect, "{input}");
    }

    #[test]
    fn only_whole_chunks_inside_the_blob_are_served() {
        check("0 100", "ok");
        check("100 100", "ok");
        check("200 50", "ok");
        check(
            "200 100",
            "length 100 is not the chunk's (50 bytes at offset 200)",
        );
        check(
            "0 99",
            "length 99 is not the chunk's (100 bytes at offset 0)",
        );
        check(
            "50 100",
            "offset 50 is not a chunk boundary inside the blob (250 bytes, chunks of 100)",
        );
        check(
            "300 100",
            "offset 300 is not a chunk boundary inside the blob (250 bytes, chunks of 100)",
        );
        check(
            "18446744073709551600 100",
            "offset 18446744073709551600 is not a chunk boundary inside the blob (250 bytes, chunks of 100)",
        );
        assert!(
            check_range(&req(0, 1 << 20), 1 << 30, 1 << 20)
                .unwrap_err()
                .contains("cannot be served")
        );
    }

    #[test]
    fn requests_are_checked_against_published_blobs_limited_and_counted() {
        use crate::hub::store::SqliteStore;
        use crate::hub::store::releases::{ReleaseStore, StoredModel};
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let sha = "b".repeat(64);
        let manifest = serde_json::json!({
            "name": "m", "version": "1", "release": 1, "sha256": sha, "size": 250,
            "chunk_size": 100, "chunk_sha256": ["x", "y", "z"], "architecture": "llama",
            "quantization": "q4_1", "expires": 0, "signatures": [],
        });
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store
            .add_model(&StoredModel {
                name: "m".into(),
                version: "1".into(),
                release: 1,
                sha256: sha.clone(),
                size: 250,
                manifest_json: manifest.to_string(),
                published_at: "2026-12-01T00:00:00Z".into(),
                published_by: "t".into(),
            })
            .unwrap();
        std::fs::create_dir_all(blob_dir(dir.path())).unwrap();
        std::fs::write(blob_dir(dir.path()).join(&sha), &bytes).unwrap();
        let limit = RateLimit {
            rate: 1.0,
            burst: 6.0,
        };
        let mut gate = Gate::new(
            Box::new(SqliteStore::open(dir.path()).unwrap()),
            dir.path(),
            limit,
        );
        let dev = DeviceId::new("edge-01").unwrap();
        let t0 = Instant::now();
        let mut ask = |sha: &str, offset: u64, length: u64| {
            let r =
                format!(r#"{{"v":1,"id":9,"sha256":"{sha}","offset":{offset},"length":{length}}}"#);
            match gate.decide(&dev, r.as_bytes(), t0) {
                Decision::Serve { offset, length, .. } => format!("serve {offset}+{length}"),
                Decision::Refuse { reason, .. } => format!("refuse: {reason}"),
                Decision::Drop { reason } => format!("drop: {reason}"),
            }
        };
        assert_eq!(ask(&sha, 200, 50), "serve 200+50");
        assert_eq!(
            ask(&"c".repeat(64), 0, 100),
            format!("refuse: no published blob {}", "c".repeat(64))
        );
        assert_eq!(
            ask(&sha, 0, 250),
            "refuse: length 250 is not the chunk's (100 bytes at offset 0)"
        );
        assert_eq!(
            ask("../../etc/passwd", 0, 100),
            "drop: the sha256 is not 64 lowercase hex digits"
        );
        assert_eq!(ask(&sha, 0, 100), "serve 0+100");
        assert_eq!(ask(&sha, 100, 100), "serve 100+100");
        // The burst of 6 is spent (the bad sha took a token too): dropped, unanswered.
        assert_eq!(ask(&sha, 0, 100), "drop: over the rate limit");
        let junk = gate.decide(&dev, b"{\"v\":1", t0);
        assert!(matches!(junk, Decision::Drop { .. }), "{junk:?}");
        assert_eq!(gate.read(&sha, 100, 100).unwrap(), &bytes[100..200]);
        gate.flush();
        let store = SqliteStore::open(dir.path()).unwrap();
        // Every request naming a well-formed sha is counted, refused or not.
        assert_eq!(store.chunks_requested(&dev, &sha).unwrap(), 5);
        assert_eq!(store.chunks_requested(&dev, &"c".repeat(64)).unwrap(), 1);
        gate.flush();
        assert_eq!(store.chunks_requested(&dev, &sha).unwrap(), 5);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limit = RateLimit {
            rate: 10.0,
            burst: 5.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(limit, t0);
        let burst = (0..8).filter(|_| b.take(limit, t0)).count();
        assert_eq!(burst, 5);
        // 10 per second: 100 ms gives one more, 50 ms none.
        assert!(!b.take(limit, t0 + Duration::from_millis(50)));
        assert!(b.take(limit, t0 + Duration::from_millis(100)));
        assert!(!b.take(limit, t0 + Duration::from_millis(100)));
        // A long pause refills to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.take(limit, later)).count(), 5);
    }
}
