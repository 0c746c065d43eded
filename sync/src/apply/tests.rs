#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use super::*;
use crate::device::DesiredDecision;
use crate::protocol::{ReportedModel, V1};
use crate::release::{Manifest, Target};

const SHA: &str = "abababababababababababababababababababababababababababababababab";

/// The agent's side as the trait sees it: a registry (models, aliases) and an activation
/// whose result the test sets.
#[derive(Default)]
struct FakeAgent {
    reported: Mutex<Reported>,
    result: Mutex<Option<Result<(), ActivateError>>>,
    calls: Mutex<Vec<String>>,
}

impl FakeAgent {
    fn install(&self, name: &str, version: &str, sha: &str) {
        self.reported.lock().unwrap().models.push(ReportedModel {
            name: name.into(),
            version: version.into(),
            sha256: sha.into(),
            source: Some("import".into()),
        });
    }
}

impl DeviceSource for FakeAgent {
    fn reported(&self) -> Result<Reported, String> {
        Ok(self.reported.lock().unwrap().clone())
    }
    fn telemetry(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    fn refused(&self, _: &str, _: &str, _: u64) {}
    fn desired(&self, _: &DesiredDecision) {}
    fn activate(&self, req: &ActivateRequest) -> Result<(), ActivateError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("activate {} for {}", req.model(), req.alias));
        let result = self.result.lock().unwrap().clone().unwrap_or(Ok(()));
        if result.is_ok() {
            self.reported
                .lock()
                .unwrap()
                .aliases
                .insert(req.alias.clone(), req.model());
        }
        result
    }
    fn rollout_noted(&self, r: &RolloutReport) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("noted {}", r.state.as_str()));
    }
    /// `apply` never installs (the loop does, before it steps the rollout).
    fn install(
        &self,
        req: &crate::transfer::InstallRequest,
    ) -> Result<crate::transfer::InstallOutcome, String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("install {}:{}", req.name, req.version));
        Err("not expected".into())
    }
    fn record(&self, _: outpost_policy::audit::Entry) {}
}

fn doc(rollout: u64, activate: bool) -> DesiredState {
    DesiredState {
        v: V1,
        rollout,
        version: rollout,
        target: Target::parse("group:lab").unwrap(),
        model: "m:2".into(),
        manifest: Manifest {
            name: "m".into(),
            version: "2".into(),
            release: 1,
            sha256: SHA.into(),
            size: 10,
            chunk_size: 10,
            chunk_sha256: vec![SHA.into()],
            architecture: "llama".into(),
            quantization: "q8_0".into(),
            expires: i64::MAX,
            signatures: Vec::new(),
        },
        alias: "default".into(),
        activate,
        issued_at: 0,
        expires: i64::MAX,
        signatures: Vec::new(),
    }
}

/// Steps `doc` once per entry of `steps` (each first doing what it names to the agent:
/// `-` nothing, `downloading` (the transfer reports progress), `install`, `install-other`
/// (other bytes), `fail`, `roll-back`, `not-now`,
/// `reopen` (a new process: the outbox opened again)), and returns one line per step:
/// the report, then the agent's calls.
fn check(doc: &DesiredState, steps: &[&str], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut outbox = Outbox::open(&path).unwrap();
    let agent = FakeAgent::default();
    let mut lines = Vec::new();
    for s in steps {
        match *s {
            "-" | "downloading" => {}
            "install" => agent.install("m", "2", SHA),
            "install-other" => agent.install("m", "2", &"cd".repeat(32)),
            "fail" | "roll-back" => {
                *agent.result.lock().unwrap() = Some(Err(ActivateError::Outcome {
                    state: if *s == "fail" {
                        RolloutState::Failed
                    } else {
                        RolloutState::RolledBack
                    },
                    reason: "logits are NaN".into(),
                }))
            }
            "not-now" => {
                *agent.result.lock().unwrap() =
                    Some(Err(ActivateError::NotNow("audit log full".into())))
            }
            "ok" => *agent.result.lock().unwrap() = None,
            "reopen" => {
                drop(outbox);
                outbox = Outbox::open(&path).unwrap();
            }
            "crash-mid-activation" => {
                // What a process killed during its activation left behind.
                outbox
                    .set_rollout_outcome(&RolloutOutcome {
                        rollout: doc.rollout,
                        model: "m:2".into(),
                        state: "activating".into(),
                        reason: None,
                    })
                    .unwrap();
                drop(outbox);
                outbox = Outbox::open(&path).unwrap();
            }
            other => panic!("unknown step {other}"),
        }
        let download = (*s == "downloading").then_some(Download {
            state: RolloutState::Downloading,
            progress: 42,
            reason: Some("21 of 50 chunks".into()),
        });
        let r = step(
            &mut outbox,
            &agent,
            doc,
            &agent.reported().unwrap(),
            download.as_ref(),
        )
        .unwrap();
        let calls = std::mem::take(&mut *agent.calls.lock().unwrap());
        lines.push(format!(
            "{} {} {}%{}{}",
            r.rollout,
            r.state.as_str(),
            r.progress,
            r.reason.map(|x| format!(" ({x})")).unwrap_or_default(),
            calls.iter().map(|c| format!("; {c}")).collect::<String>()
        ));
    }
    assert_eq!(lines.join("\n"), expect);
}

#[test]
fn an_installed_model_is_activated_once_and_then_reported_active() {
    check(
        &doc(4, true),
        &["-", "downloading", "install", "-", "reopen"],
        "4 pending 0% (desired state group:lab version 4 accepted; the model is not on the device yet)\n\
         4 downloading 42% (21 of 50 chunks)\n\
         4 active 100% ('default' points at m:2); activate m:2 for default\n\
         4 active 100% ('default' points at m:2)\n\
         4 active 100% ('default' points at m:2)",
    );
}

#[test]
fn a_failed_health_check_is_final_for_the_rollout_even_after_a_restart() {
    check(
        &doc(4, true),
        &["fail", "install", "ok", "reopen"],
        "4 pending 0% (desired state group:lab version 4 accepted; the model is not on the device yet)\n\
         4 failed 100% (logits are NaN); activate m:2 for default\n\
         4 failed 100% (logits are NaN)\n\
         4 failed 100% (logits are NaN)",
    );
    check(
        &doc(5, true),
        &["roll-back", "install", "reopen"],
        "5 pending 0% (desired state group:lab version 5 accepted; the model is not on the device yet)\n\
         5 rolled_back 100% (logits are NaN); activate m:2 for default\n\
         5 rolled_back 100% (logits are NaN)",
    );
}

#[test]
fn an_activation_cut_short_by_a_crash_is_failed_not_retried() {
    check(
        &doc(6, true),
        &["install", "-"],
        "6 active 100% ('default' points at m:2); activate m:2 for default\n\
         6 active 100% ('default' points at m:2)",
    );
    let stopped = STOPPED_DURING_ACTIVATION;
    check(
        &doc(6, true),
        &["crash-mid-activation", "install", "reopen"],
        &format!(
            "6 failed 100% ({stopped}); noted failed\n\
             6 failed 100% ({stopped})\n\
             6 failed 100% ({stopped})"
        ),
    );
}

#[test]
fn other_bytes_under_the_same_name_are_refused_without_activating() {
    check(
        &doc(7, true),
        &["install-other", "-"],
        &format!(
            "7 failed 100% (m:2 on the device is sha256:{}, the manifest says sha256:{SHA}; \
             nothing was changed); noted failed\n\
             7 failed 100% (m:2 on the device is sha256:{}, the manifest says sha256:{SHA}; \
             nothing was changed)",
            "cd".repeat(32),
            "cd".repeat(32)
        ),
    );
}

#[test]
fn without_activate_the_model_stays_staged_and_an_unrecorded_activation_is_tried_again() {
    check(
        &doc(8, false),
        &["install", "-"],
        "8 staged 100% (installed; the desired state does not ask to activate it)\n\
         8 staged 100% (installed; the desired state does not ask to activate it)",
    );
    check(
        &doc(9, true),
        &["not-now", "install", "ok"],
        "9 pending 0% (desired state group:lab version 9 accepted; the model is not on the device yet)\n\
         9 staged 100% (audit log full); activate m:2 for default\n\
         9 active 100% ('default' points at m:2); activate m:2 for default",
    );
}
