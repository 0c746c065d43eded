//! The device's side of a rollout: given the desired state it follows, what state it is in
//! and what to do next (activate through the agent, or wait), recorded durably in
//! `outbox.db` (`rollout_outcomes`, see [`crate::outbox`]).
//!
//! [`step`] is called by the sync loop (its own thread; it may block for the length of a
//! health check) when a document is accepted, at start-up, and every state interval:
//! - an outcome already final for (rollout, `name:version`) (`active`, `failed`,
//!   `rolled_back`) is reported as it is and never acted on again: a model that failed its
//!   health check is not tried again for that rollout (a new rollout may try it again);
//! - a row still `activating` was left by a process that stopped during the activation
//!   (killed, out of memory): recorded as `failed`, not tried again;
//! - the model is installed when the registry holds `name:version` with the manifest's
//!   SHA-256 (a model imported by hand under that name with other bytes is refused:
//!   `failed`); not installed: what the blob transfer says of its download ([`Download`]:
//!   `downloading` with its progress, or `failed`), else `pending`;
//! - installed and the alias already names it: `active`; the document does not ask to
//!   activate: `staged`; else `activating` is written first, then
//!   [`DeviceSource::activate`] runs the agent's health-gated activation, and its result
//!   is recorded (`active`, or `failed`/`rolled_back` with the reason). An activation that
//!   could not start (the audit log refused its intent) goes back to `staged` and is tried
//!   at the next step.

use crate::device::{DeviceSource, Reported};
use crate::outbox::{Outbox, OutboxError, RolloutOutcome};
use crate::protocol::{RolloutReport, RolloutState};
use crate::release::DesiredState;

/// How the download of the followed document's model stands (the blob transfer's report),
/// while the model is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// `Downloading` or `Failed` (anything else is taken as `Downloading`).
    pub state: RolloutState,
    /// Percent of the chunks verified.
    pub progress: u8,
    pub reason: Option<String>,
}

/// What the loop asks the agent to activate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivateRequest {
    pub rollout: u64,
    pub name: String,
    pub version: String,
    /// The manifest's SHA-256 (the model installed under `name:version` has it).
    pub sha256: String,
    pub alias: String,
}

impl ActivateRequest {
    /// `name:version`.
    pub fn model(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

/// Why an activation did not make the model active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivateError {
    /// Final for this rollout: `failed` (nothing was switched, the previous model serves)
    /// or `rolled_back` (the alias was switched back), with the reason.
    Outcome { state: RolloutState, reason: String },
    /// Nothing was tried (e.g. its audit record could not be written): try again later.
    NotNow(String),
}

/// The reason recorded when the agent stopped during an activation.
pub const STOPPED_DURING_ACTIVATION: &str = "the agent stopped during the activation (killed, or out of memory?); \
     not tried again for this rollout";

/// Does the next step for `doc` (see the module header) and returns what to report.
pub fn step(
    outbox: &mut Outbox,
    source: &dyn DeviceSource,
    doc: &DesiredState,
    reported: &Reported,
    download: Option<&Download>,
) -> Result<RolloutReport, OutboxError> {
    let manifest = &doc.manifest;
    let model = format!("{}:{}", manifest.name, manifest.version);
    let report = |state: RolloutState, reason: Option<String>| RolloutReport {
        rollout: doc.rollout,
        model: model.clone(),
        state,
        progress: if state == RolloutState::Pending {
            0
        } else {
            100
        },
        reason,
    };
    let record = |outbox: &mut Outbox, state: &str, reason: Option<String>| {
        outbox.set_rollout_outcome(&RolloutOutcome {
            rollout: doc.rollout,
            model: model.clone(),
            state: state.to_string(),
            reason,
        })
    };
    let known = outbox.rollout_outcome(doc.rollout, &model)?;
    if let Some(o) = &known {
        if let Some(s) = RolloutState::parse(&o.state).filter(|s| s.is_final()) {
            return Ok(report(s, o.reason.clone()));
        }
        if o.state == "activating" {
            let reason = STOPPED_DURING_ACTIVATION.to_string();
            record(outbox, RolloutState::Failed.as_str(), Some(reason.clone()))?;
            let r = report(RolloutState::Failed, Some(reason));
            source.rollout_noted(&r);
            return Ok(r);
        }
    }
    let same_name = reported
        .models
        .iter()
        .find(|m| m.name == manifest.name && m.version == manifest.version);
    let Some(installed) = same_name else {
        return Ok(match download {
            Some(d) => RolloutReport {
                state: if d.state == RolloutState::Failed {
                    RolloutState::Failed
                } else {
                    RolloutState::Downloading
                },
                progress: d.progress.min(100),
                reason: d.reason.clone(),
                ..report(RolloutState::Downloading, None)
            },
            None => report(
                RolloutState::Pending,
                Some(format!(
                    "desired state {} version {} accepted; the model is not on the device yet",
                    doc.target, doc.version
                )),
            ),
        });
    };
    if installed.sha256 != manifest.sha256 {
        let reason = format!(
            "{model} on the device is sha256:{}, the manifest says sha256:{}; nothing was changed",
            installed.sha256, manifest.sha256
        );
        record(outbox, RolloutState::Failed.as_str(), Some(reason.clone()))?;
        let r = report(RolloutState::Failed, Some(reason));
        source.rollout_noted(&r);
        return Ok(r);
    }
    if reported.aliases.get(&doc.alias) == Some(&model) {
        let reason = format!("'{}' points at {model}", doc.alias);
        record(outbox, RolloutState::Active.as_str(), Some(reason.clone()))?;
        return Ok(report(RolloutState::Active, Some(reason)));
    }
    if !doc.activate {
        let reason = Some("installed; the desired state does not ask to activate it".into());
        if known.is_none() {
            record(outbox, RolloutState::Staged.as_str(), reason.clone())?;
        }
        return Ok(report(RolloutState::Staged, reason));
    }
    record(outbox, "activating", None)?;
    let req = ActivateRequest {
        rollout: doc.rollout,
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.sha256.clone(),
        alias: doc.alias.clone(),
    };
    let (state, reason) = match source.activate(&req) {
        Ok(()) => (
            RolloutState::Active,
            format!("'{}' points at {model}", doc.alias),
        ),
        Err(ActivateError::Outcome { state, reason }) => (state, reason),
        Err(ActivateError::NotNow(reason)) => {
            record(outbox, RolloutState::Staged.as_str(), Some(reason.clone()))?;
            return Ok(report(RolloutState::Staged, Some(reason)));
        }
    };
    record(outbox, state.as_str(), Some(reason.clone()))?;
    Ok(report(state, Some(reason)))
}

#[cfg(test)]
mod tests;
