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
//! publishes the newest document of each target retained on its desired-state topic (after
//! every connect, and within [`super::serve::DESIRED_POLL`] of a change), and clears it
//! while the rollout is halted.

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
use crate::protocol::{DeviceId, ReportedState, V1};
use crate::release::{DesiredState, Manifest, Target};

/// Default chunk size: 128 KiB (AWS IoT Core's payload limit is 128 KB; see ARCHITECTURE.md).
pub const DEFAULT_CHUNK_SIZE: u64 = 128 * 1024;
/// Actions in the hub's audit chain.
pub const ACTION_PUBLISH: &str = "models:publish";
pub const ACTION_ROLLOUT: &str = "rollout:start";
pub const ACTION_HALT: &str = "rollout:halt";
pub const ACTION_RESUME: &str = "rollout:resume";

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
    if req.chunk_size == 0 || req.chunk_size > 1 << 24 {
        return Err(bad("the chunk size must be 1 byte to 16 MiB"));
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
        "targets": targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
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

/// The targets of the first batch: the target itself, or for a group and a batch under 100 %,
/// that share of its devices (rounded up, by id) as device targets.
fn batch_targets(store: &dyn Store, target: &Target, percent: u8) -> Result<Vec<Target>> {
    match target {
        Target::Device(d) => {
            if store.device(d)?.is_none() {
                return Err(HubError::NotEnrolled(d.to_string()));
            }
            Ok(vec![target.clone()])
        }
        Target::Group(g) => {
            let members = store.group_members(g.as_str())?;
            if members.is_empty() {
                return Err(bad(format!("group {g} has no enrolled device")));
            }
            if percent >= 100 {
                return Ok(vec![target.clone()]);
            }
            let n = (members.len() * usize::from(percent)).div_ceil(100).max(1);
            Ok(members.into_iter().take(n).map(Target::Device).collect())
        }
    }
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
        let mut ids: Vec<DeviceId> = Vec::new();
        for doc in store.rollout_docs(r.id)? {
            match doc.target {
                Target::Device(d) => ids.push(d),
                Target::Group(g) => ids.extend(store.group_members(g.as_str())?),
            }
        }
        ids.sort();
        ids.dedup();
        let mut devices = Vec::new();
        for d in ids {
            let reported = store
                .reported_json(&d)?
                .and_then(|j| serde_json::from_str::<ReportedState>(&j).ok());
            devices.push(device_status(&r, &d, reported.as_ref()));
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
            devices,
        });
    }
    Ok(StatusReport { rollouts })
}

/// One device's state in a rollout, from its reported state.
fn device_status(r: &RolloutRow, id: &DeviceId, reported: Option<&ReportedState>) -> DeviceStatus {
    let (state, progress, reason) = match reported {
        None => (
            "pending",
            0.0,
            "the device has not reported its state".to_string(),
        ),
        Some(s) if s.aliases.get(&r.alias) == Some(&r.model) => {
            ("active", 1.0, format!("{} points at {}", r.alias, r.model))
        }
        Some(s) => match &s.desired {
            Some(f) if f.rollout == r.id => (
                "pending",
                0.0,
                format!(
                    "desired state {} version {} accepted; not downloaded yet",
                    f.target, f.version
                ),
            ),
            Some(f) => (
                "pending",
                0.0,
                format!("the device follows rollout {} ({})", f.rollout, f.target),
            ),
            None => (
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
    }
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
