//! `outpost daemon`: the long-running agent and its local HTTP API.
//!
//! Start-up order: the whole configuration is validated (exit 78 on a problem) before
//! anything is opened; then the audit log (a start record), the registry, the model behind
//! `default` (if any), and only then the listener. SIGTERM or SIGINT stops accepting, lets
//! in-flight requests finish within `[api] shutdown_grace_secs`, cancels what is left, writes
//! the stop record, signs a checkpoint and exits 0.

mod engine;
mod http;
mod metrics;
mod notify;
mod openai;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outpost_engine::registry::{ModelRecord, Registry};
use outpost_engine::{LoadOptions, ModelLease};
use outpost_policy::audit::{AuditLog, Entry, Outcome};
use outpost_policy::identity::Verifier;
use outpost_policy::rbac::Policy;
use outpost_policy::time::TrustedClock;
use tokio_util::sync::CancellationToken;

use crate::commands::Context;
use crate::config::{ApiConfig, ConfigError, Listen};
use engine::ModelWorker;
use metrics::Metrics;
use notify::Notifier;

/// Everything the handlers share.
pub struct State {
    pub device_id: String,
    pub data_dir: std::path::PathBuf,
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
    pub api: ApiConfig,
    pub load_options: LoadOptions,
    pub shutting_down: AtomicBool,
}

impl State {
    pub fn current_model(&self) -> Option<Arc<ModelWorker>> {
        self.model.read().ok().and_then(|m| m.clone())
    }

    /// Appends to the audit log without waiting (reads, denials, outcomes).
    pub fn note(&self, entry: Entry) {
        let _pending = self.audit.submit(entry);
        self.metrics.audit_record();
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

    /// Loads `record` and starts its engine thread (blocking: call from a blocking task).
    pub fn load_worker(&self, record: ModelRecord) -> anyhow::Result<Arc<ModelWorker>> {
        let blobs = self
            .registry
            .lock()
            .map_err(|_| anyhow::anyhow!("registry lock poisoned"))?
            .blobs()
            .clone();
        let started = Instant::now();
        let label = record.label();
        let lease = ModelLease::load(&blobs, record, &self.load_options)
            .with_context(|| format!("cannot load {label}"))?;
        self.metrics.model_loaded(started.elapsed());
        crate::sys::release_free_memory();
        Ok(ModelWorker::start(
            lease,
            self.api.queue_length,
            self.metrics.clone(),
        )?)
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
}

pub fn run(ctx: &Context) -> anyhow::Result<ExitCode> {
    // Everything that can be wrong with the configuration is found before anything opens.
    let (verifier, policy) = ctx.auth()?;
    let api = ctx.loaded.config.api.clone();
    let listen = api.listen_on().map_err(|message| ConfigError {
        file: ctx.loaded.files.last().cloned(),
        line: None,
        message: format!("key `api.listen`: {message}"),
    })?;
    let notifier = Notifier::from_env();
    let audit = Arc::new(ctx.open_audit()?);
    let data_dir = ctx.data_dir();
    let registry = Registry::open(&data_dir)
        .with_context(|| format!("cannot open the registry in {}", data_dir.display()))?;
    let engine_cfg = &ctx.loaded.config.engine;
    let state = Arc::new(State {
        device_id: ctx.device_id(),
        data_dir,
        verifier,
        policy,
        clock: Mutex::new(ctx.clock()),
        audit: audit.clone(),
        registry: Mutex::new(registry),
        model: RwLock::new(None),
        swap: tokio::sync::Mutex::new(()),
        metrics: Arc::new(Metrics::default()),
        api: api.clone(),
        load_options: LoadOptions {
            context_length: engine_cfg.context_length.map(|c| c as usize),
            memory_budget: engine_cfg.memory_budget.map(|b| b.0),
        },
        shutting_down: AtomicBool::new(false),
    });
    audit
        .append(state.agent_entry(
            "agent:start",
            "daemon started",
            serde_json::json!({"version": crate::VERSION, "listen": api.listen,
                "pid": std::process::id()}),
        ))
        .context("refusing to start without an audit record")?;
    state.metrics.audit_record();

    load_default(&state);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("outpost-api")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(state.clone(), listen, &notifier));
    // Handlers are gone; the engine threads finish what they hold, then exit.
    state.install(None);
    runtime.shutdown_timeout(Duration::from_secs(5));
    let (reason, outcome) = match &result {
        Ok(()) => ("daemon stopped".to_string(), Outcome::Success),
        Err(e) => (format!("daemon failed: {e:#}"), Outcome::Failure),
    };
    let mut stop = state.agent_entry("agent:stop", &reason, serde_json::json!({}));
    stop.outcome = outcome;
    drop(state);
    let closed =
        audit
            .append(stop)
            .map_err(anyhow::Error::from)
            .and_then(|_| match Arc::try_unwrap(audit) {
                Ok(log) => log.close().map(|_| ()).map_err(Into::into),
                Err(shared) => shared.checkpoint().map(|_| ()).map_err(Into::into),
            });
    if let Err(e) = closed {
        eprintln!("warning: the stop record could not be written: {e:#}");
    }
    result?;
    eprintln!("outpost daemon stopped");
    Ok(ExitCode::SUCCESS)
}

/// Loads the model behind `default`, if there is one. A model that fails to load leaves
/// the daemon up (not ready) so that an administrator can activate another over the API.
fn load_default(state: &State) {
    let record = match state.registry.lock().map(|r| r.alias("default")) {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            eprintln!("no model is active as 'default': serving without one until activated");
            return;
        }
        Ok(Err(e)) => {
            eprintln!("warning: cannot read the registry: {e}");
            return;
        }
        Err(_) => return,
    };
    let label = record.label();
    match state.load_worker(record) {
        Ok(w) => {
            eprintln!("loaded {label} in {} ms", w.load_ms);
            state.install(Some(w));
        }
        Err(e) => {
            eprintln!("warning: {e:#}; serving without a model until one is activated");
            let mut entry =
                state.agent_entry("models:load", &format!("{e:#}"), serde_json::json!({}));
            entry.outcome = Outcome::Failure;
            entry.resource = Some(label);
            state.note(entry);
        }
    }
}

async fn serve(state: Arc<State>, listen: Listen, notifier: &Notifier) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let app = http::router(state.clone());
    let stopped = {
        let shutdown = shutdown.clone();
        async move { shutdown.cancelled().await }
    };
    let server = match &listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("listening on http://{}", listener.local_addr()?);
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            eprintln!("listening on unix:{}", path.display());
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
    };
    notifier.notify("READY=1\nSTATUS=serving");
    let watchdog = notify::watchdog_interval().filter(|_| notifier.enabled());
    let pinger = watchdog.map(|every| {
        let token = shutdown.clone();
        let n = Notifier::from_env();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => n.notify("WATCHDOG=1"),
                }
            }
        })
    });

    let follower = tokio::spawn(follow_registry(state.clone(), shutdown.clone()));

    wait_for_signal().await?;
    eprintln!(
        "stopping: no new connections; in-flight requests have {} s",
        state.api.shutdown_grace_secs
    );
    notifier.notify("STOPPING=1\nSTATUS=stopping");
    state.shutting_down.store(true, Ordering::SeqCst);
    shutdown.cancel();
    if let Some(p) = pinger {
        p.abort();
    }
    follower.abort();
    let grace = Duration::from_secs(state.api.shutdown_grace_secs);
    let mut server = server;
    let finished = tokio::time::timeout(grace, &mut server).await;
    if finished.is_err() {
        eprintln!("grace period over: cancelling the generations still running");
        if let Some(m) = state.current_model() {
            m.cancel_all();
        }
        // Cancelled generations end at the next token; their streams then close.
        if tokio::time::timeout(Duration::from_secs(10), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
    if let Listen::Unix(path) = &listen {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// How often the registry is checked for a `default` changed by another process.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// Follows `default` as other processes (the CLI, later sync) change it: a new model is
/// loaded and swapped in, an unset alias stops serving. A model that fails to load is
/// reported once, not retried every tick.
async fn follow_registry(state: Arc<State>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    let mut failed: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _one_at_a_time = state.swap.lock().await;
        let s = state.clone();
        let known_bad = failed.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Option<String> {
            let wanted = s.registry.lock().ok()?.alias("default").ok()?;
            let current = s.current_model().map(|m| m.record.sha256.clone());
            match wanted {
                None if current.is_some() => {
                    eprintln!("'default' was unset: no model is served until one is activated");
                    s.install(None);
                    None
                }
                Some(r)
                    if current.as_deref() != Some(r.sha256.as_str())
                        && known_bad.as_deref() != Some(r.sha256.as_str()) =>
                {
                    let label = r.label();
                    let sha = r.sha256.clone();
                    match s.load_worker(r) {
                        Ok(w) => {
                            eprintln!(
                                "'default' now points at {label}: loaded in {} ms",
                                w.load_ms
                            );
                            s.install(Some(w));
                            None
                        }
                        Err(e) => {
                            eprintln!("warning: cannot serve {label}: {e:#}");
                            let mut entry = s.agent_entry(
                                "models:load",
                                &format!("{e:#}"),
                                serde_json::json!({}),
                            );
                            entry.outcome = Outcome::Failure;
                            entry.resource = Some(label);
                            s.note(entry);
                            Some(sha)
                        }
                    }
                }
                _ => known_bad,
            }
        })
        .await;
        failed = outcome.unwrap_or(None);
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A socket file left by a previous run is removed; any other file there is an error.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}
