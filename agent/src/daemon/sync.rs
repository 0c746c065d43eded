//! The daemon's side of sync: what the device reports about itself (models with where each
//! came from, aliases, the policy version, a metrics snapshot) for
//! `outpost_sync::device::SyncLoop`, which does the rest on its own thread, and the
//! health-gated activation a rollout asks for (`activation::change_alias` with the daemon as
//! `Serving`, one model change at a time with the API's, each recorded in the audit log as
//! `models:activate` by actor `outpost-sync`, intent then outcome).
//!
//! Where a rollout's outcome is kept: in `outbox.db` by the sync loop (`sync::apply`), so a
//! restart neither activates a model again nor retries one that failed; the agent keeps
//! nothing of its own about rollouts (the registry's `models.source` says which rollout
//! installed a model, the audit log says what happened).

use std::sync::Arc;
use std::time::Instant;

use outpost_engine::registry::ModelRef;
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::rbac::Action;
use outpost_sync::apply::{ActivateError, ActivateRequest};
use outpost_sync::conn::LinkConfig;
use outpost_sync::device::{
    DesiredDecision, DeviceSource, Reported, Settings, SyncLoop, SyncStats,
};
use outpost_sync::protocol::{BatchLimits, GroupId, ReportedModel, RolloutReport, RolloutState};
use outpost_sync::release::PinnedKeys;
use outpost_sync::transfer::{InstallOutcome, InstallRequest};

use super::State;
use super::metrics::rss_bytes;
use crate::activation::{self, ActivationError, Change};
use crate::config::SyncConfig;
use crate::context::{AuditedError, audited};

/// The loop for `[sync]` over `link` (checked by `Context::sync_link`).
pub fn sync_loop(
    state: &Arc<State>,
    config: &SyncConfig,
    link: LinkConfig,
    release_keys: PinnedKeys,
    groups: &[String],
    stats: Arc<SyncStats>,
) -> SyncLoop {
    let data = &state.data_dir;
    let mut settings = Settings::new(link, data.audit_db(), data.outbox_db(), crate::VERSION);
    settings.batch = BatchLimits {
        max_records: config.batch_max_records,
        max_bytes: config.batch_max_bytes,
    };
    settings.telemetry_interval = std::time::Duration::from_secs(config.telemetry_interval_secs);
    settings.telemetry_quota_bytes = config.telemetry_quota_bytes;
    settings.release_keys = release_keys;
    settings.transfer.dir = data.downloads();
    settings.transfer.window = config.transfer_window;
    settings.transfer.chunk_timeout =
        std::time::Duration::from_secs(config.transfer_chunk_timeout_secs);
    // `config::load` validated every group name.
    settings.groups = groups.iter().filter_map(|g| GroupId::new(g).ok()).collect();
    let source = AgentSource {
        state: state.clone(),
        started: Instant::now(),
    };
    SyncLoop::new(settings, Arc::new(source), stats)
}

struct AgentSource {
    state: Arc<State>,
    started: Instant,
}

impl DeviceSource for AgentSource {
    fn reported(&self) -> Result<Reported, String> {
        let models = self
            .state
            .registry
            .lock()
            .map_err(|_| "the registry lock is poisoned".to_string())?
            .list()
            .map_err(|e| e.to_string())?;
        let mut out = Reported {
            policy_version: Some(self.state.policy.version),
            ..Reported::default()
        };
        for m in models {
            for alias in &m.aliases {
                out.aliases.insert(alias.clone(), m.label());
            }
            out.models.push(ReportedModel {
                name: m.name,
                version: m.version,
                sha256: m.sha256,
                source: Some(m.source),
            });
        }
        Ok(out)
    }

    fn refused(&self, topic: &str, reason: &str, unreported: u64) {
        let mut entry = Entry::new("outpost-sync", "sync:receive", Outcome::Denied, reason);
        entry.resource = Some(topic.to_string());
        entry.details = serde_json::json!({ "refused_since_last_record": unreported });
        self.state.note(entry);
    }

    /// `sync:desired`, allowed (accepted) or denied (refused, with the reason).
    fn desired(&self, d: &DesiredDecision) {
        self.state.note(d.audit_entry());
    }

    fn trusted_now(&self) -> i64 {
        self.state
            .clock
            .lock()
            .map_or_else(|_| outpost_policy::time::system_now(), |c| c.now())
    }

    fn observe_time(&self, t: i64) {
        if let Ok(mut c) = self.state.clock.lock() {
            c.observe(t);
        }
    }

    /// Through the daemon's runtime (its one-change-at-a-time lock is async), waiting here on
    /// the sync thread for the outcome.
    fn activate(&self, req: &ActivateRequest) -> Result<(), ActivateError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| ActivateError::NotNow(format!("no runtime to activate on: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let state = self.state.clone();
        let req = req.clone();
        runtime.spawn(async move {
            let _one_at_a_time = state.swap.lock().await;
            let s = state.clone();
            let done = tokio::task::spawn_blocking(move || activate_now(&s, &req)).await;
            let _ = tx.send(done.unwrap_or_else(|e| {
                Err(ActivateError::NotNow(format!(
                    "the activation task failed: {e}"
                )))
            }));
        });
        rx.recv()
            .unwrap_or_else(|_| Err(ActivateError::NotNow("the daemon is stopping".into())))
    }

    /// `sync:rollout`, failure, with the reason.
    fn rollout_noted(&self, r: &RolloutReport) {
        let outcome = if r.state.is_failure() {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        let reason = r.reason.clone().unwrap_or_else(|| r.state.as_str().into());
        let mut entry = Entry::new("outpost-sync", "sync:rollout", outcome, &reason);
        entry.resource = Some(r.model.clone());
        entry.details = serde_json::json!({"rollout": r.rollout, "state": r.state.as_str()});
        self.state.note(entry);
    }

    /// The registry's install by rename (`Registry::install_file`: GGUF checked, digest
    /// checked again, file moved, row inserted with provenance `rollout:ID`). Activation is
    /// the loop's next step (`sync::apply`), not the installer's.
    fn install(&self, req: &InstallRequest) -> Result<InstallOutcome, String> {
        let mut registry = self
            .state
            .registry
            .lock()
            .map_err(|_| "the registry lock is poisoned".to_string())?;
        let out = registry
            .install_file(
                &req.path,
                &req.sha256,
                &req.name,
                &req.version,
                outpost_engine::registry::ModelSource::Rollout(req.rollout),
            )
            .map_err(|e| e.to_string())?;
        Ok(InstallOutcome {
            model: out.record().label(),
            created: matches!(out, outpost_engine::registry::ImportOutcome::Imported(_)),
        })
    }

    /// Download steps (`sync:transfer`), recorded as the loop built them.
    fn record(&self, entry: Entry) {
        self.state.note(entry);
    }

    /// The memory that read and packed the backlog goes back to the system.
    fn drained(&self) {
        crate::sys::release_free_memory();
    }

    fn telemetry(&self) -> serde_json::Map<String, serde_json::Value> {
        let model = self.state.current_model();
        let mut m = serde_json::Map::new();
        m.insert(
            "uptime_secs".into(),
            self.started.elapsed().as_secs().into(),
        );
        m.insert("rss_bytes".into(), rss_bytes().unwrap_or(0).into());
        m.insert(
            "model".into(),
            model.as_ref().map(|w| w.record.label()).into(),
        );
        m.insert(
            "queue_depth".into(),
            model.as_ref().map_or(0, |w| w.depth()).into(),
        );
        m
    }
}

/// The activation itself, on a blocking thread, holding the daemon's change lock.
fn activate_now(state: &Arc<State>, req: &ActivateRequest) -> Result<(), ActivateError> {
    if state
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(ActivateError::NotNow("the daemon is stopping".into()));
    }
    let model = req.model();
    let reference: ModelRef = model
        .parse()
        .map_err(|e| failed(format!("{model} is not a model reference: {e}")))?;
    // The bytes the manifest signed, not whatever else carries the name.
    let record = state
        .registry
        .lock()
        .map_err(|_| ActivateError::NotNow("the registry lock is poisoned".into()))?
        .resolve(&reference)
        .map_err(|e| failed(e.to_string()))?;
    if record.sha256 != req.sha256 {
        return Err(failed(format!(
            "{model} is sha256:{}, the manifest says sha256:{}; nothing was changed",
            record.sha256, req.sha256
        )));
    }
    let mut intent = Entry::new(
        "outpost-sync",
        Action::ModelsActivate.as_str(),
        Outcome::Allowed,
        &format!("rollout {}", req.rollout),
    );
    intent.resource = Some(model.clone());
    intent.details = serde_json::json!({"alias": req.alias, "rollout": req.rollout,
        "sha256": req.sha256});
    let result = audited(
        &state.audit,
        intent,
        || {
            activation::change_alias(
                &state.registry,
                state.as_ref(),
                &req.alias,
                &Change::Activate(reference),
                &state.load_options,
                &state.health_check,
            )
        },
        |a| {
            let health = a.health.as_ref().map_or(String::new(), |h| {
                format!(" (health check passed in {} ms)", h.elapsed_ms)
            });
            format!(
                "activated: '{}' now points at {}{health}",
                a.activation.alias,
                a.activation.model.label()
            )
        },
    );
    state.metrics.audit_record();
    match result {
        Ok(_) => Ok(()),
        Err(AuditedError::Unrecorded(e)) => Err(ActivateError::NotNow(format!(
            "refusing to activate without an audit record: {e}"
        ))),
        Err(AuditedError::Failed(e)) => Err(match e {
            ActivationError::Poisoned => ActivateError::NotNow(e.to_string()),
            e => failed(format!("{e}; the previous model keeps serving")),
        }),
    }
}

fn failed(reason: String) -> ActivateError {
    ActivateError::Outcome {
        state: RolloutState::Failed,
        reason,
    }
}
