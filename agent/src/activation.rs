//! Activation, the one path that changes which model an alias names: the HTTP API calls it,
//! the daemon's registry follower uses its load-and-check half, and sync's installer will.
//!
//! Order, so that a model that cannot serve changes nothing: resolve the target; load it
//! within the memory budget (holding its blob's shared lock); run the health check (a few
//! greedy tokens within a time limit, every logit finite); only then change the registry;
//! then hand the model to whatever serves it. A failure at any step before the registry
//! changes leaves the registry and the served model as they were, and says why.

use std::sync::Mutex;

use outpost_engine::generate::{HealthCheck, HealthError, HealthReport};
use outpost_engine::registry::{Activation, ModelRecord, ModelRef, Registry, RegistryError};
use outpost_engine::{EngineError, LoadOptions, ModelLease};
use serde::Serialize;

/// What an activation asks for.
#[derive(Debug, Clone)]
pub enum Change {
    /// Point the alias at this model.
    Activate(ModelRef),
    /// Point the alias back at the model it named before.
    Rollback,
}

/// Why an activation changed nothing (or, for `Start`, why the new model is not served).
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot load {model}: {source}; nothing was changed")]
    Load {
        model: String,
        #[source]
        source: Box<EngineError>,
    },
    #[error("{model} failed its {source}; nothing was changed")]
    Unhealthy {
        model: String,
        #[source]
        source: Box<HealthError>,
    },
    #[error("cannot start serving {model}: {source}")]
    Start {
        model: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the registry is unusable (a thread panicked while holding it)")]
    Poisoned,
}

/// A model that loaded and passed its health check; its lease holds the blob, so `remove`
/// and `gc` leave it alone while the candidate lives.
#[derive(Debug)]
pub struct Candidate {
    pub lease: ModelLease,
    pub health: HealthReport,
}

/// Loads `record` within `options` (memory budget included) and checks its health.
pub fn load_checked(
    registry: &Mutex<Registry>,
    record: ModelRecord,
    options: &LoadOptions,
    check: &HealthCheck,
) -> Result<Candidate, ActivationError> {
    let label = record.label();
    // The registry's lock is not held while the model loads.
    let blobs = registry
        .lock()
        .map_err(|_| ActivationError::Poisoned)?
        .blobs()
        .clone();
    let mut lease =
        ModelLease::load(&blobs, record, options).map_err(|source| ActivationError::Load {
            model: label.clone(),
            source: Box::new(source),
        })?;
    let health = lease
        .model
        .health_check(check)
        .map_err(|source| ActivationError::Unhealthy {
            model: label.clone(),
            source: Box::new(source),
        })?;
    tracing::info!(model = %label, load_ms = lease.model.load_ms, check_ms = health.elapsed_ms,
        "Model loaded and passed its health check.");
    Ok(Candidate { lease, health })
}

/// Whatever serves models: told of a healthy candidate before the registry changes (it may
/// refuse), and to serve it after.
pub trait Serving {
    /// A candidate made ready to serve (e.g. its engine thread started).
    type Staged;
    /// The SHA-256 of the model served for `alias` now, if any.
    fn serving(&self, alias: &str) -> Option<String>;
    /// Whether a change of `alias` changes what is served (only then is a model loaded
    /// into memory beside the current one).
    fn serves(&self, alias: &str) -> bool;
    fn stage(&self, candidate: Candidate) -> Result<Self::Staged, ActivationError>;
    fn install(&self, staged: Self::Staged);
}

/// What an activation did.
#[derive(Debug, Serialize)]
pub struct Activated {
    #[serde(flatten)]
    pub activation: Activation,
    /// The health check's report, when the model was loaded for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
}

/// Changes `alias` as `change` says, through the order in this module's header. A model
/// already served for `alias` is not loaded again.
pub fn change_alias<S: Serving>(
    registry: &Mutex<Registry>,
    serving: &S,
    alias: &str,
    change: &Change,
    options: &LoadOptions,
    check: &HealthCheck,
) -> Result<Activated, ActivationError> {
    let target = {
        let reg = registry.lock().map_err(|_| ActivationError::Poisoned)?;
        match change {
            Change::Activate(r) => reg.resolve(r)?,
            Change::Rollback => reg.rollback_target(alias)?,
        }
    };
    let already = serving.serving(alias).as_deref() == Some(target.sha256.as_str());
    let staged = if serving.serves(alias) && !already {
        let candidate = load_checked(registry, target, options, check)?;
        let health = candidate.health.clone();
        Some((serving.stage(candidate)?, health))
    } else {
        None
    };
    let activation = {
        let mut reg = registry.lock().map_err(|_| ActivationError::Poisoned)?;
        match change {
            Change::Activate(r) => reg.activate(r, alias)?,
            Change::Rollback => reg.rollback(alias)?,
        }
    };
    let health = staged.map(|(s, health)| {
        serving.install(s);
        health
    });
    tracing::info!(alias, model = %activation.model.label(), "Alias changed.");
    Ok(Activated { activation, health })
}
