//! The daemon's side of sync: what the device reports about itself (models, aliases, the
//! policy version, a metrics snapshot) for `outpost_sync::device::SyncLoop`, which does the
//! rest on its own thread.

use std::sync::Arc;
use std::time::Instant;

use outpost_policy::audit::{Entry, Outcome};
use outpost_sync::conn::LinkConfig;
use outpost_sync::device::{
    DesiredDecision, DeviceSource, Reported, Settings, SyncLoop, SyncStats,
};
use outpost_sync::protocol::{BatchLimits, GroupId, ReportedModel};
use outpost_sync::release::PinnedKeys;

use super::State;
use super::metrics::rss_bytes;
use crate::config::SyncConfig;

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
