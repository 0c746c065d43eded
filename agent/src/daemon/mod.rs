//! `outpost daemon`: the long-running agent and its local HTTP API.
//!
//! `main` validates the configuration ([`check_config`]: exit 78 before anything is bound or
//! opened), binds the listener, owns the signals and calls [`run`] with a
//! `CancellationToken` it cancels on SIGTERM or SIGINT. `run` opens the audit log (a start
//! record), the registry and the model behind `default` (if any), then spawns its long-lived
//! tasks through one `TaskTracker`: the HTTP server, the systemd watchdog, the registry
//! follower and, with `[sync]`, the sync loop (`outpost_sync::device`), each
//! `run(self, shutdown)`. On shutdown they are cancelled,
//! not aborted: the server stops accepting and in-flight requests get
//! `[api] shutdown_grace_secs`, after which running generations are cancelled; then the
//! stop record, a checkpoint, and `run` returns.

mod audit_api;
mod auth;
mod engine;
mod http;
mod manage;
mod metrics;
mod notify;
mod openai;
mod server;
mod sync;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use outpost_engine::LoadOptions;
use outpost_engine::generate::HealthCheck;
use outpost_engine::registry::Registry;
use outpost_policy::audit::{AuditLog, Entry, Outcome, Unqueued};
use outpost_policy::identity::Verifier;
use outpost_policy::rbac::Policy;
use outpost_policy::time::TrustedClock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activation::{self, ActivationError, Candidate, Serving};
use crate::config::{ApiConfig, ConfigError, Listen};
use crate::context::{Context, DataDir};
use engine::ModelWorker;
use metrics::{Metrics, SyncMetrics};
use notify::Notifier;
use outpost_sync::device::SyncStats;
pub use server::Listener;

/// Everything the handlers share.
pub struct State {
    pub device_id: String,
    pub data_dir: DataDir,
    pub verifier: Verifier,
    pub policy: Policy,
    pub clock: Mutex<TrustedClock>,
    pub audit: Arc<AuditLog>,
    pub registry: Mutex<Registry>,
    /// The model behind `default`; swapped whole, so running requests keep the old one.
    pub model: RwLock<Option<Arc<ModelWorker>>>,
    /// One model change at a time.
    pub swap: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    /// The sync loop's figures and their gauges, when `[sync]` is configured.
    pub sync: Option<(Arc<SyncStats>, SyncMetrics)>,
    pub api: ApiConfig,
    pub load_options: LoadOptions,
    pub health_check: HealthCheck,
    pub shutting_down: AtomicBool,
}

impl State {
    pub fn current_model(&self) -> Option<Arc<ModelWorker>> {
        self.model.read().ok().and_then(|m| m.clone())
    }

    /// Appends to the audit log without waiting (reads, denials, outcomes); never blocks an
    /// async worker. A record the writer cannot take now (its queue is full under a flood,
    /// or it stopped) is counted in `/metrics` and logged with what it said.
    pub fn note(&self, entry: Entry) {
        match self.audit.try_submit(entry) {
            Ok(_pending) => self.metrics.audit_record(),
            Err(e) => {
                self.metrics.audit_unqueued();
                let (Unqueued::Full(entry) | Unqueued::Closed(entry)) = &e;
                tracing::error!(
                    error = %e,
                    actor = %entry.actor,
                    action = %entry.action,
                    outcome = entry.outcome.as_str(),
                    reason = %entry.reason,
                    request_id = entry.request_id.as_deref().unwrap_or("-"),
                    "An audit record could not be queued."
                );
            }
        }
    }

    /// Appends and waits until the record is durable: the rule before any action.
    pub async fn record(&self, entry: Entry) -> Result<(), String> {
        let audit = self.audit.clone();
        let result = tokio::task::spawn_blocking(move || audit.append(entry))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if result.is_ok() {
            self.metrics.audit_record();
        }
        result.map(|_| ())
    }

    /// Makes `worker` the model behind `default`; the old one retires once its requests end.
    pub fn install(&self, worker: Option<Arc<ModelWorker>>) {
        if let Ok(mut slot) = self.model.write() {
            *slot = worker;
        }
    }

    fn agent_entry(&self, action: &str, reason: &str, details: serde_json::Value) -> Entry {
        let mut e = Entry::new("outpost-daemon", action, Outcome::Success, reason);
        e.details = details;
        e
    }

    /// Records a model that could not be served (not waiting: the daemon goes on).
    fn note_load_failure(&self, label: String, error: &ActivationError) {
        let mut entry = self.agent_entry("models:load", &error.to_string(), serde_json::json!({}));
        entry.outcome = Outcome::Failure;
        entry.resource = Some(label);
        self.note(entry);
    }
}

/// The daemon serves the model behind `default`: a candidate for it gets its engine
/// thread, and is installed once the registry has changed.
impl Serving for State {
    type Staged = Arc<ModelWorker>;

    fn serving(&self, alias: &str) -> Option<String> {
        (alias == "default")
            .then(|| self.current_model().map(|m| m.record.sha256.clone()))
            .flatten()
    }

    fn serves(&self, alias: &str) -> bool {
        alias == "default"
    }

    fn stage(&self, c: Candidate) -> Result<Arc<ModelWorker>, ActivationError> {
        let label = c.lease.record.label();
        self.metrics
            .model_loaded(Duration::from_millis(c.lease.model.load_ms));
        let worker = ModelWorker::start(c.lease, self.api.queue_length, self.metrics.clone())
            .map_err(|source| ActivationError::Start {
                model: label,
                source,
            })?;
        crate::sys::release_free_memory();
        Ok(worker)
    }

    fn install(&self, staged: Arc<ModelWorker>) {
        State::install(self, Some(staged));
    }
}

/// Everything about the configuration that can be wrong, found before anything is bound
/// or opened: the key files, the revocation list, the policy document, `[api] listen`.
pub fn check_config(ctx: &Context) -> Result<Listen, ConfigError> {
    ctx.auth()?;
    ctx.sync_link()?;
    ctx.loaded
        .config
        .api
        .listen_on()
        .map_err(|message| ConfigError {
            file: ctx.loaded.files.last().cloned(),
            line: None,
            message: format!("key `api.listen`: {message}"),
        })
}

/// Runs the daemon on `listener` until `shutdown` is cancelled.
pub async fn run(
    ctx: Context,
    listener: Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (verifier, policy) = ctx.auth()?;
    let api = ctx.loaded.config.api.clone();
    let notifier = Notifier::from_env();
    let address = listener.address();
    let (audit, registry, ctx) = tokio::task::spawn_blocking(move || {
        let audit = ctx.open_audit()?;
        let data_dir = ctx.data_dir();
        let registry = Registry::open(data_dir.root())
            .with_context(|| format!("cannot open the registry in {}", data_dir.display()))?;
        anyhow::Ok((Arc::new(audit), registry, ctx))
    })
    .await??;
    let engine_cfg = &ctx.loaded.config.engine;
    let metrics = Arc::new(Metrics::default());
    let sync_link = ctx.sync_link()?;
    let sync = sync_link
        .as_ref()
        .map(|_| (Arc::new(SyncStats::default()), metrics.register_sync()));
    let state = Arc::new(State {
        device_id: ctx.device_id(),
        data_dir: ctx.data_dir(),
        verifier,
        policy,
        clock: Mutex::new(ctx.clock()),
        audit: audit.clone(),
        registry: Mutex::new(registry),
        model: RwLock::new(None),
        swap: tokio::sync::Mutex::new(()),
        metrics,
        sync,
        api: api.clone(),
        load_options: LoadOptions {
            context_length: engine_cfg.context_length.map(|c| c as usize),
            memory_budget: engine_cfg.memory_budget.map(|b| b.0),
        },
        health_check: HealthCheck::default(),
        shutting_down: AtomicBool::new(false),
    });
    let start = state.agent_entry(
        "agent:start",
        "daemon started",
        serde_json::json!({"version": crate::VERSION, "listen": api.listen,
            "pid": std::process::id()}),
    );
    state
        .record(start)
        .await
        .map_err(|e| anyhow::anyhow!("refusing to start without an audit record: {e}"))?;

    {
        let s = state.clone();
        tokio::task::spawn_blocking(move || load_default(&s)).await?;
    }

    let tasks = TaskTracker::new();
    tasks.spawn(
        server::Server {
            listener,
            app: http::router(state.clone()),
            max_connections: api.max_connections,
        }
        .run(shutdown.clone()),
    );
    tracing::info!(address = %address, "Listening.");
    notifier.notify("READY=1\nSTATUS=serving");
    if let Some(every) = notify::watchdog_interval().filter(|_| notifier.enabled()) {
        tasks.spawn(notify::Watchdog { every }.run(shutdown.clone()));
    }
    tasks.spawn(
        RegistryFollower {
            state: state.clone(),
        }
        .run(shutdown.clone()),
    );
    if let (Some(link), Some(config), Some((stats, _))) =
        (sync_link, &ctx.loaded.config.sync, &state.sync)
    {
        let keys = ctx.release_keys()?;
        tasks.spawn(
            sync::sync_loop(
                &state,
                config,
                link,
                keys,
                &ctx.loaded.config.device.groups,
                stats.clone(),
            )
            .run(shutdown.clone()),
        );
    }
    tasks.close();

    shutdown.cancelled().await;
    tracing::info!(
        grace_secs = state.api.shutdown_grace_secs,
        "Stopping: no new connections; requests in flight may finish."
    );
    notifier.notify("STOPPING=1\nSTATUS=stopping");
    state.shutting_down.store(true, Ordering::SeqCst);
    let grace = Duration::from_secs(state.api.shutdown_grace_secs);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("Grace period over: cancelling the generations still running.");
        if let Some(m) = state.current_model() {
            m.cancel_all();
        }
        // Cancelled generations end at the next token; their streams then close.
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Some connections did not close; stopping anyway.");
        }
    }
    // Handlers are gone; the engine threads finish what they hold, then exit.
    state.install(None);
    let mut stop = state.agent_entry("agent:stop", "daemon stopped", serde_json::json!({}));
    stop.outcome = Outcome::Success;
    drop(state);
    let closed = tokio::task::spawn_blocking(move || {
        audit
            .append(stop)
            .map_err(anyhow::Error::from)
            .and_then(|_| match Arc::try_unwrap(audit) {
                Ok(log) => log.close().map(|_| ()).map_err(Into::into),
                Err(shared) => shared.checkpoint().map(|_| ()).map_err(Into::into),
            })
    })
    .await;
    match closed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "The stop record could not be written.")
        }
        Err(e) => tracing::warn!(error = %e, "The stop record could not be written."),
    }
    tracing::info!("Daemon stopped.");
    Ok(())
}

/// Loads the model behind `default`, if there is one, and checks its health. A model that
/// fails leaves the daemon up (not ready) so that an administrator can activate another.
fn load_default(state: &State) {
    let record = match state.registry.lock().map(|r| r.alias("default")) {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            tracing::info!(
                "No model is active as 'default': serving without one until one is activated."
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Cannot read the registry.");
            return;
        }
        Err(_) => return,
    };
    let label = record.label();
    let loaded = activation::load_checked(
        &state.registry,
        record,
        &state.load_options,
        &state.health_check,
    )
    .and_then(|c| state.stage(c));
    match loaded {
        Ok(w) => {
            tracing::info!(model = %label, load_ms = w.load_ms, "Serving the default model.");
            state.install(Some(w));
        }
        Err(e) => {
            tracing::warn!(model = %label, error = %e,
                "Serving without a model until one is activated.");
            state.note_load_failure(label, &e);
        }
    }
}

/// How often the registry is checked for a `default` changed by another process.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// Follows `default` as other processes (the CLI, later sync) change it: a new model is
/// loaded, checked and swapped in, an unset alias stops serving. A model that fails is
/// reported once, not retried every tick.
struct RegistryFollower {
    state: Arc<State>,
}

impl RegistryFollower {
    async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        let mut failed: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _one_at_a_time = self.state.swap.lock().await;
            let s = self.state.clone();
            let known_bad = failed.clone();
            let outcome = tokio::task::spawn_blocking(move || follow_once(&s, known_bad)).await;
            failed = outcome.unwrap_or(None);
        }
    }
}

/// One look at the registry; returns the digest of a model that failed to load, if any.
fn follow_once(s: &State, known_bad: Option<String>) -> Option<String> {
    let wanted = s.registry.lock().ok()?.alias("default").ok()?;
    let current = s.current_model().map(|m| m.record.sha256.clone());
    match wanted {
        None if current.is_some() => {
            tracing::info!("'default' was unset: no model is served until one is activated.");
            s.install(None);
            None
        }
        Some(r)
            if current.as_deref() != Some(r.sha256.as_str())
                && known_bad.as_deref() != Some(r.sha256.as_str()) =>
        {
            let label = r.label();
            let sha = r.sha256.clone();
            let loaded = activation::load_checked(&s.registry, r, &s.load_options, &s.health_check)
                .and_then(|c| s.stage(c));
            match loaded {
                Ok(w) => {
                    tracing::info!(model = %label, load_ms = w.load_ms,
                        "'default' changed: now serving it.");
                    s.install(Some(w));
                    None
                }
                Err(e) => {
                    tracing::warn!(model = %label, error = %e, "Cannot serve the new 'default'.");
                    s.note_load_failure(label, &e);
                    Some(sha)
                }
            }
        }
        _ => known_bad,
    }
}
