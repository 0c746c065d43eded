//! The administrators' release commands: `models publish`, `rollout start|status|halt|resume`.
//!
//! The hub holds no release key: these run in the administrator's command-line process,
//! which signs with the key file it is given; the hub's store and `serve` only keep and
//! distribute what was signed. Each action is recorded in the hub's own audit chain
//! (`<data_dir>/audit.db`, as `devices enroll` is): the intent durably first, then the
//! action, then its outcome.
//!
//! Blob store: `<data_dir>/blobs/sha256/<hex>`, named by content: a file is copied to a
//! temporary file in that folder while its SHA-256 and each chunk's are computed, fsynced,
//! then renamed (an identical blob already there is kept).
//!
//! Distribution: `rollout start` stores the signed documents in `hub.db`; `outpost-hub serve`
//! publishes the newest released document of each target retained on its desired-state
//! topic (after every connect, and within [`super::serve::DESIRED_POLL`] of a change), and
//! clears it while the rollout is halted.
//!
//! Phased rollouts (`--batch P` on a group): `rollout start` signs one device document for
//! every enrolled member up front, in batches of ⌈P % of the members⌉ by device id, and
//! stores them all; only batch 0 is released. `serve` ([`advance`], every
//! [`super::serve::DESIRED_POLL`]) looks at each running rollout's devices as they report:
//! more failed or rolled-back devices than `--max-failures` (0 when not given for a phased
//! rollout; no automatic halt otherwise) halts it (its topics are cleared); when every
//! device of the released batches has settled (active, or failed within the allowance) the
//! next batch is released. Each advance and halt is recorded in the hub's audit chain
//! (actor `outpost-hub`, `rollout:advance`, `rollout:halt`). The hub chooses only when a
//! document the administrator signed goes out, never what it says (see ARCHITECTURE.md).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use outpost_policy::audit::{Entry, Outcome, now_rfc3339};
use outpost_policy::signing::KeyPair;
use outpost_policy::time::system_now;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::enroll::audited_action as audited;
use super::gguf_keys;
use super::store::releases::{RolloutRow, StoredModel};
use super::store::{Store, StoreConfig};
use super::{HubError, Result, make_dir};
use crate::protocol::chunk::MAX_CHUNK_BYTES;
use crate::protocol::{DeviceId, ReportedState, RolloutState, V1};
use crate::release::{DesiredState, Manifest, Target};

/// Default chunk size: 128 KiB (AWS IoT Core's payload limit is 128 KB; see ARCHITECTURE.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 128 * 1024;
/// Actions in the hub's audit chain.
pub const ACTION_PUBLISH: &str = "models:publish";
pub const ACTION_ROLLOUT: &str = "rollout:start";
pub const ACTION_HALT: &str = "rollout:halt";
pub const ACTION_RESUME: &str = "rollout:resume";
pub const ACTION_ADVANCE: &str = "rollout:advance";
/// The actor of what `serve` decides on its own.
pub const HUB_ACTOR: &str = "outpost-hub";

fn bad(msg: impl Into<String>) -> HubError {
    HubError::Release(msg.into())
}

/// A model name, version or key id: 1 to 128 of `A-Z a-z 0-9 . _ + -` (no `:`, which
/// separates name and version).
pub fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} {:?} must be 1 to 128 of A-Z a-z 0-9 . _ + -",
            s.chars().take(80).collect::<String>()
        )))
    }
}

/// What `models publish` was asked.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    pub key: PathBuf,
    pub kid: String,
    pub expires_in_secs: u64,
    pub chunk_size: u64,
    pub actor: String,
}

/// Stores the blob, signs its manifest, records it; returns the manifest.
pub fn publish(data_dir: &Path, store: &StoreConfig, req: &PublishRequest) -> Result<Manifest> {
    check_name("model name", &req.name)?;
    check_name("model version", &req.version)?;
    check_name("key id", &req.kid)?;
    if req.chunk_size == 0 || req.chunk_size > MAX_CHUNK_BYTES as u64 {
        return Err(bad(format!(
            "the chunk size must be 1 to {MAX_CHUNK_BYTES} bytes (a chunk travels in one MQTT packet)"
        )));
    }
    if req.expires_in_secs == 0 {
        return Err(bad("--expires must be above 0"));
    }
    let key = KeyPair::load(&req.key)?;
    let header = gguf_keys::read(&req.file).map_err(|e| HubError::BadFile {
        what: "GGUF model",
        path: req.file.clone(),
        reason: e,
    })?;
    let data_dir = make_dir(data_dir)?;
    let mut store = store.open()?;
    if store.model(&req.name, &req.version)?.is_some() {
        return Err(HubError::AlreadyPublished(format!(
            "{}:{}",
            req.name, req.version
        )));
    }
    let mut intent = Entry::new(
        &req.actor,
        ACTION_PUBLISH,
        Outcome::Allowed,
        "local command line",
    );
    intent.resource = Some(format!("{}:{}", req.name, req.version));
    intent.details = serde_json::json!({
        "file": req.file.display().to_string(), "kid": req.kid,
        "public_key": key.public_hex(),
    });
    audited(
        &data_dir,
        intent,
        || {
            let stored = store_blob(&data_dir, &req.file, req.chunk_size)?;
            let now = system_now();
            let mut manifest = Manifest {
                name: req.name.clone(),
                version: req.version.clone(),
                release: store.next_release(&req.name)?,
                sha256: stored.sha256,
                size: stored.size,
                chunk_size: req.chunk_size,
                chunk_sha256: stored.chunks,
                architecture: header.architecture,
                quantization: header.quantization,
                expires: now.saturating_add(i64::try_from(req.expires_in_secs).unwrap_or(i64::MAX)),
                signatures: Vec::new(),
            };
            manifest
                .sign(&key, &req.kid)
                .map_err(|e| bad(format!("signing the manifest: {e}")))?;
            let json = serde_json::to_string(&manifest)
                .map_err(|e| bad(format!("encoding the manifest: {e}")))?;
            store.add_model(&StoredModel {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                release: manifest.release,
                sha256: manifest.sha256.clone(),
                size: manifest.size,
                manifest_json: json,
                published_at: now_rfc3339(),
                published_by: req.actor.clone(),
            })?;
            Ok(manifest)
        },
        |m| format!("published sha256:{} release {}", m.sha256, m.release),
    )
}

/// A blob as stored.
struct StoredBlob {
    sha256: String,
    size: u64,
    chunks: Vec<String>,
}

/// `<data_dir>/blobs/sha256`.
pub fn blob_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blobs").join("sha256")
}

/// Copies `file` into the blob store, hashing it whole and per chunk as it streams.
fn store_blob(data_dir: &Path, file: &Path, chunk_size: u64) -> Result<StoredBlob> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| HubError::Io { what, path, source }
    };
    let dir = make_dir(&blob_dir(data_dir))?;
    let mut src = std::fs::File::open(file).map_err(io("reading", file))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".publish-")
        .tempfile_in(&dir)
        .map_err(io("creating a file in", &dir))?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; usize::try_from(chunk_size).unwrap_or(1 << 20)];
    loop {
        // Fill one chunk (reads may return less).
        let mut filled = 0;
        while filled < buf.len() {
            let n = src.read(&mut buf[filled..]).map_err(io("reading", file))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let chunk = &buf[..filled];
        whole.update(chunk);
        chunks.push(hex::encode(Sha256::digest(chunk)));
        tmp.write_all(chunk).map_err(io("writing", tmp.path()))?;
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    tmp.as_file()
        .sync_all()
        .map_err(io("writing", tmp.path()))?;
    let sha256 = hex::encode(whole.finalize());
    let dest = dir.join(&sha256);
    if dest.exists() {
        // The same bytes are stored already (named by content); the copy goes.
        drop(tmp);
    } else {
        tmp.persist(&dest).map_err(|e| HubError::Io {
            what: "renaming into",
            path: dest.clone(),
            source: e.error,
        })?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &dir))?;
    }
    Ok(StoredBlob {
        sha256,
        size,
        chunks,
    })
}

/// What `rollout start` was asked.
#[derive(Debug, Clone)]
pub struct RolloutRequest {
    /// `name:version`.
    pub model: String,
    pub target: Target,
    pub key: PathBuf,
    pub kid: String,
    pub alias: String,
    pub activate: bool,
    /// Percent of a group's devices in the first batch (100: the whole group at once).
    pub batch_percent: u8,
    pub max_failures: Option<u64>,
    /// Validity of the desired state (capped at the manifest's expiry).
    pub expires_in_secs: u64,
    pub actor: String,
}

/// Signs and stores the rollout's desired states; returns the rollout id.
pub fn start(data_dir: &Path, store: &StoreConfig, req: &RolloutRequest) -> Result<u64> {
    let (name, version) = req
        .model
        .split_once(':')
        .ok_or_else(|| bad(format!("--model {:?} is not NAME:VERSION", req.model)))?;
    check_name("key id", &req.kid)?;
    check_name("alias", &req.alias)?;
    if !(1..=100).contains(&req.batch_percent) {
        return Err(bad("--batch must be 1 to 100 (percent)"));
    }
    let key = KeyPair::load(&req.key)?;
    let mut store = store.open()?;
    let model = store
        .model(name, version)?
        .ok_or_else(|| bad(format!("model {} is not published on this hub", req.model)))?;
    let manifest: Manifest = serde_json::from_str(&model.manifest_json)
        .map_err(|e| bad(format!("the stored manifest of {}: {e}", req.model)))?;
    let now = system_now();
    if manifest.expires <= now {
        return Err(bad(format!(
            "the manifest of {} expired at {}; publish it again under a new version",
            req.model, manifest.expires
        )));
    }
    let targets = batch_targets(store.as_ref(), &req.target, req.batch_percent)?;
    let expires = now
        .saturating_add(i64::try_from(req.expires_in_secs).unwrap_or(i64::MAX))
        .min(manifest.expires);
    let row = RolloutRow {
        id: 0,
        model: req.model.clone(),
        target: req.target.clone(),
        alias: req.alias.clone(),
        activate: req.activate,
        batch_percent: req.batch_percent,
        max_failures: req.max_failures,
        state: "running".into(),
        created_at: now_rfc3339(),
        created_by: req.actor.clone(),
    };
    let mut intent = Entry::new(
        &req.actor,
        ACTION_ROLLOUT,
        Outcome::Allowed,
        "local command line",
    );
    intent.resource = Some(req.target.to_string());
    intent.details = serde_json::json!({
        "model": req.model, "sha256": manifest.sha256, "alias": req.alias,
        "activate": req.activate, "batch_percent": req.batch_percent,
        "max_failures": req.max_failures, "kid": req.kid, "public_key": key.public_hex(),
        "targets": targets.iter().map(|(t, _)| t.to_string()).collect::<Vec<_>>(),
        "batches": targets.iter().map(|(_, b)| b + 1).max().unwrap_or(1),
    });
    audited(
        data_dir,
        intent,
        || {
            let mut sign = |rollout: u64, target: &Target, version: u64| -> Result<String> {
                let mut doc = DesiredState {
                    v: V1,
                    rollout,
                    version,
                    target: target.clone(),
                    model: req.model.clone(),
                    manifest: manifest.clone(),
                    alias: req.alias.clone(),
                    activate: req.activate,
                    issued_at: now,
                    expires,
                    signatures: Vec::new(),
                };
                doc.sign(&key, &req.kid)
                    .map_err(|e| bad(format!("signing the desired state: {e}")))?;
                let payload = doc.encode().map_err(|e| {
                    bad(format!(
                        "{e}: the manifest lists {} chunks; publish with a larger --chunk-size",
                        manifest.chunk_sha256.len()
                    ))
                })?;
                String::from_utf8(payload).map_err(|e| bad(e.to_string()))
            };
            store.add_rollout(&row, &targets, &mut sign)
        },
        |id| format!("rollout {id}"),
    )
}

/// The documents to sign, with their batch: the target itself (batch 0), or for a group and
/// a batch under 100 %, every member as a device target, in batches of that share of the
/// members (rounded up, by id).
fn batch_targets(store: &dyn Store, target: &Target, percent: u8) -> Result<Vec<(Target, u32)>> {
    match target {
        Target::Device(d) => {
            if store.device(d)?.is_none() {
                return Err(HubError::NotEnrolled(d.to_string()));
            }
            Ok(vec![(target.clone(), 0)])
        }
        Target::Group(g) => {
            let members = store.group_members(g.as_str())?;
            if members.is_empty() {
                return Err(bad(format!("group {g} has no enrolled device")));
            }
            if percent >= 100 {
                return Ok(vec![(target.clone(), 0)]);
            }
            Ok(batches(members, percent)
                .into_iter()
                .map(|(d, b)| (Target::Device(d), b))
                .collect())
        }
    }
}

/// `members` (sorted) in batches of ⌈`percent` % of them⌉ (at least one each).
fn batches(members: Vec<DeviceId>, percent: u8) -> Vec<(DeviceId, u32)> {
    let n = (members.len() * usize::from(percent)).div_ceil(100).max(1);
    members
        .into_iter()
        .enumerate()
        .map(|(i, d)| (d, u32::try_from(i / n).unwrap_or(u32::MAX)))
        .collect()
}

/// `rollout status`'s JSON: `{"rollouts": [...]}`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub rollouts: Vec<RolloutStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutStatus {
    pub id: u64,
    pub model: String,
    pub target: String,
    /// `running`, `halted` or `done` (every device active).
    pub state: String,
    /// Batches of a phased rollout (1 otherwise), and how many are released.
    pub batches: u32,
    pub released_batches: u32,
    pub max_failures: Option<u64>,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub id: String,
    /// `pending|downloading|staged|active|failed|rolled_back`.
    pub state: String,
    /// 0.0 to 1.0.
    pub progress: f64,
    pub reason: Option<String>,
    pub chunks_requested: u64,
    /// Its batch (0 unless phased) and whether that batch is released.
    pub batch: u32,
    pub released: bool,
}

/// Every rollout (or one), with its devices as they last reported (read-only).
pub fn status(store: &dyn Store, id: Option<u64>) -> Result<StatusReport> {
    let rows = store.rollouts(id)?;
    if let Some(id) = id
        && rows.is_empty()
    {
        return Err(bad(format!("no rollout {id} on this hub")));
    }
    let mut rollouts = Vec::new();
    for r in rows {
        // The rollout's blob: its model's (for the chunk requests counted per device).
        let sha = match r.model.split_once(':') {
            Some((n, v)) => store.model(n, v)?.map(|m| m.sha256),
            None => None,
        };
        // Device → (batch, released); a device in several documents keeps its first.
        let mut ids: std::collections::BTreeMap<DeviceId, (u32, bool)> = Default::default();
        let mut batches = 0;
        let mut released_batches = 0;
        for doc in store.rollout_docs(r.id)? {
            batches = batches.max(doc.batch + 1);
            if doc.released {
                released_batches = released_batches.max(doc.batch + 1);
            }
            let at = (doc.batch, doc.released);
            match doc.target {
                Target::Device(d) => {
                    ids.entry(d).or_insert(at);
                }
                Target::Group(g) => {
                    for d in store.group_members(g.as_str())? {
                        ids.entry(d).or_insert(at);
                    }
                }
            }
        }
        let mut devices = Vec::new();
        for (d, (batch, released)) in ids {
            let reported = store
                .reported_json(&d)?
                .and_then(|j| serde_json::from_str::<ReportedState>(&j).ok());
            let mut status = device_status(&r, &d, reported.as_ref());
            status.batch = batch;
            status.released = released;
            if !released {
                status.reason = Some(format!(
                    "in batch {batch}, released when the batches before it succeed"
                ));
            }
            if let Some(sha) = &sha {
                status.chunks_requested = store.chunks_requested(&d, sha)?;
            }
            devices.push(status);
        }
        let done = !devices.is_empty() && devices.iter().all(|d| d.state == "active");
        let state = if r.state == "halted" {
            "halted"
        } else if done {
            "done"
        } else {
            "running"
        };
        rollouts.push(RolloutStatus {
            id: r.id,
            model: r.model,
            target: r.target.to_string(),
            state: state.into(),
            batches,
            released_batches,
            max_failures: r.max_failures,
            devices,
        });
    }
    Ok(StatusReport { rollouts })
}

/// One device's state in a rollout, from its reported state: what the device says of this
/// rollout (`rollout` in its state) first, else what its aliases and followed document
/// show.
fn device_status(r: &RolloutRow, id: &DeviceId, reported: Option<&ReportedState>) -> DeviceStatus {
    let own = reported
        .and_then(|s| s.rollout.as_ref())
        .filter(|x| x.rollout == r.id);
    if let Some(x) = own {
        return DeviceStatus {
            id: id.to_string(),
            state: x.state.as_str().into(),
            progress: f64::from(x.progress.min(100)) / 100.0,
            reason: x.reason.clone(),
            chunks_requested: 0,
            batch: 0,
            released: true,
        };
    }
    let (state, progress, reason) = match reported {
        None => (
            "pending",
            0.0,
            "the device has not reported its state".to_string(),
        ),
        Some(s) if s.aliases.get(&r.alias) == Some(&r.model) => {
            ("active", 1.0, format!("{} points at {}", r.alias, r.model))
        }
        Some(s) => match (&s.desired, &s.transfer) {
            (Some(f), Some(t)) if f.rollout == r.id && t.rollout == r.id => {
                let progress = if t.chunks_total == 0 {
                    1.0
                } else {
                    t.chunks_done as f64 / t.chunks_total as f64
                };
                let reason = format!(
                    "desired state {} version {} accepted; {}",
                    f.target,
                    f.version,
                    t.reason.clone().unwrap_or_else(|| format!(
                        "{} of {} chunks verified",
                        t.chunks_done, t.chunks_total
                    ))
                );
                let state = match t.state.as_str() {
                    "staged" => "staged",
                    "failed" => "failed",
                    _ => "downloading",
                };
                (state, progress, reason)
            }
            (Some(f), _) if f.rollout == r.id => (
                "pending",
                0.0,
                format!(
                    "desired state {} version {} accepted; not downloaded yet",
                    f.target, f.version
                ),
            ),
            (Some(f), _) => (
                "pending",
                0.0,
                format!("the device follows rollout {} ({})", f.rollout, f.target),
            ),
            (None, _) => (
                "pending",
                0.0,
                "the device has not accepted a desired state".to_string(),
            ),
        },
    };
    DeviceStatus {
        id: id.to_string(),
        state: state.into(),
        progress,
        reason: Some(reason),
        chunks_requested: 0,
        batch: 0,
        released: true,
    }
}

/// What a running rollout's devices call for (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing now.
    Wait,
    /// Release this batch.
    Release(u32),
    /// Halt: this many devices failed, more than allowed.
    Halt { failures: u64, allowed: u64 },
}

/// The failures a rollout tolerates before `serve` halts it: `--max-failures`, or 0 for a
/// phased rollout without one; `None`: never halted automatically.
pub fn allowed_failures(r: &RolloutRow) -> Option<u64> {
    r.max_failures
        .or((r.batch_percent < 100 && matches!(r.target, Target::Group(_))).then_some(0))
}

/// The next step for a running rollout whose devices are `(batch, released, state)`.
pub fn decide(allowed: Option<u64>, devices: &[(u32, bool, RolloutState)]) -> Step {
    let released = || devices.iter().filter(|(_, r, _)| *r);
    let failures = released().filter(|(_, _, s)| s.is_failure()).count() as u64;
    if let Some(k) = allowed
        && failures > k
    {
        return Step::Halt {
            failures,
            allowed: k,
        };
    }
    let settled = released().all(|(_, _, s)| s.is_final());
    match devices
        .iter()
        .filter(|(_, r, _)| !*r)
        .map(|(b, _, _)| *b)
        .min()
    {
        Some(next) if settled => Step::Release(next),
        _ => Step::Wait,
    }
}

/// What [`advance`] did to one rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    pub rollout: u64,
    pub step: Step,
}

/// `serve`'s look at every running rollout: halts the ones with too many failures and
/// releases the next batch of the ones whose released devices settled, each recorded in the
/// hub's audit chain under `data_dir`.
pub fn advance(data_dir: &Path, store: &mut dyn Store) -> Result<Vec<Advanced>> {
    let mut out = Vec::new();
    let rows = store.rollouts(None)?;
    for r in rows.into_iter().filter(|r| r.state == "running") {
        let allowed = allowed_failures(&r);
        if allowed.is_none() && r.batch_percent >= 100 {
            // Nothing to release and no failures to count.
            continue;
        }
        let report = status(store, Some(r.id))?;
        let Some(st) = report.rollouts.first() else {
            continue;
        };
        let devices: Vec<(u32, bool, RolloutState)> = st
            .devices
            .iter()
            .map(|d| {
                let s = RolloutState::parse(&d.state).unwrap_or(RolloutState::Pending);
                (d.batch, d.released, s)
            })
            .collect();
        let step = decide(allowed, &devices);
        let (action, reason, details) = match &step {
            Step::Wait => continue,
            Step::Release(b) => (
                ACTION_ADVANCE,
                format!("batch {} settled", b.saturating_sub(1)),
                serde_json::json!({"batch": b, "devices": st.devices.iter()
                    .filter(|d| d.batch == *b).map(|d| d.id.clone()).collect::<Vec<_>>()}),
            ),
            Step::Halt { failures, allowed } => (
                ACTION_HALT,
                format!("{failures} devices failed, more than --max-failures {allowed}"),
                serde_json::json!({"failures": failures, "max_failures": allowed,
                    "failed": st.devices.iter().filter(|d| RolloutState::parse(&d.state)
                        .is_some_and(RolloutState::is_failure)).map(|d| d.id.clone())
                        .collect::<Vec<_>>()}),
            ),
        };
        let mut intent = Entry::new(HUB_ACTOR, action, Outcome::Allowed, &reason);
        intent.resource = Some(format!("rollout {}", r.id));
        intent.details = details;
        audited(
            data_dir,
            intent,
            || match &step {
                Step::Release(b) => store
                    .release_batch(r.id, *b)
                    .map(|n| format!("batch {b} released ({n} devices)")),
                _ => store
                    .set_rollout_state(r.id, "halted")
                    .map(|_| format!("rollout {} halted", r.id)),
            },
            String::clone,
        )?;
        out.push(Advanced {
            rollout: r.id,
            step,
        });
    }
    Ok(out)
}

/// `rollout halt|resume ID`: sets the state, recorded in the hub's audit chain.
pub fn set_state(
    data_dir: &Path,
    store: &StoreConfig,
    id: u64,
    halt: bool,
    actor: &str,
) -> Result<()> {
    let mut store = store.open()?;
    let row = store
        .rollouts(Some(id))?
        .into_iter()
        .next()
        .ok_or_else(|| bad(format!("no rollout {id} on this hub")))?;
    let (action, state) = if halt {
        (ACTION_HALT, "halted")
    } else {
        (ACTION_RESUME, "running")
    };
    let mut intent = Entry::new(actor, action, Outcome::Allowed, "local command line");
    intent.resource = Some(format!("rollout {id}"));
    intent.details = serde_json::json!({"model": row.model, "target": row.target.to_string(),
        "from": row.state});
    audited(
        data_dir,
        intent,
        || {
            store.set_rollout_state(id, state)?;
            Ok(())
        },
        |()| format!("rollout {id} {state}"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// `devices` is one word per device, `B:S` with B its batch, `*` after it when released,
    /// and S its state's first letters (`p`ending, `d`ownloading, `s`taged, `a`ctive,
    /// `f`ailed, `r`olled back).
    fn check(allowed: Option<u64>, devices: &str, expect: Step) {
        let parsed: Vec<(u32, bool, RolloutState)> = devices
            .split_whitespace()
            .map(|w| {
                let (b, s) = w.split_once(':').unwrap();
                let released = b.ends_with('*');
                let batch = b.trim_end_matches('*').parse().unwrap();
                let state = match s {
                    "p" => RolloutState::Pending,
                    "d" => RolloutState::Downloading,
                    "s" => RolloutState::Staged,
                    "a" => RolloutState::Active,
                    "f" => RolloutState::Failed,
                    "r" => RolloutState::RolledBack,
                    other => panic!("state {other}"),
                };
                (batch, released, state)
            })
            .collect();
        assert_eq!(decide(allowed, &parsed), expect, "{devices}");
    }

    #[test]
    fn a_batch_is_released_when_every_released_device_settled() {
        check(Some(0), "0*:a 0*:d 1:p 1:p 2:p", Step::Wait);
        check(Some(0), "0*:a 0*:s 1:p", Step::Wait);
        check(Some(0), "0*:a 0*:a 1:p 1:p 2:p", Step::Release(1));
        check(Some(0), "0*:a 0*:a 1*:a 1*:a 2:p", Step::Release(2));
        // The last batch released: nothing more to do (status says done when all active).
        check(Some(0), "0*:a 1*:a 2*:a", Step::Wait);
        // A failure within the allowance counts as settled.
        check(Some(1), "0*:a 0*:f 1:p", Step::Release(1));
        check(Some(1), "0*:r 0*:a 1*:d 2:p", Step::Wait);
    }

    #[test]
    fn failures_above_the_allowance_halt_and_only_released_devices_count() {
        check(
            Some(0),
            "0*:f 0*:a 1:p",
            Step::Halt {
                failures: 1,
                allowed: 0,
            },
        );
        check(
            Some(1),
            "0*:f 0*:r 1:p",
            Step::Halt {
                failures: 2,
                allowed: 1,
            },
        );
        // No allowance (a rollout that is not phased, without --max-failures): never halts.
        check(None, "0*:f 0*:f 0*:r", Step::Wait);
        // Unreleased devices cannot have failed this rollout: their state is not counted.
        check(Some(0), "0*:a 1:f", Step::Release(1));
    }

    #[test]
    fn members_go_into_batches_of_the_share_rounded_up() {
        let ids = |n: usize| -> Vec<DeviceId> {
            (1..=n)
                .map(|i| DeviceId::new(&format!("d{i:02}")).unwrap())
                .collect()
        };
        let shape = |n, p| {
            batches(ids(n), p)
                .into_iter()
                .map(|(_, b)| b.to_string())
                .collect::<String>()
        };
        assert_eq!(shape(3, 50), "001");
        assert_eq!(shape(4, 25), "0123");
        assert_eq!(shape(5, 30), "00112");
        assert_eq!(shape(2, 1), "01");
        assert_eq!(shape(3, 99), "000");
    }
}
