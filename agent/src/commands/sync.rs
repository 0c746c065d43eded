//! `outpost sync status`: what the link to the hub has done, read from `outbox.db` and the
//! audit log, both read-only. Nothing here creates a file: a missing `outbox.db` means
//! nothing has been synced yet, a missing audit log that nothing has been recorded. Works
//! while the daemon writes both.

use std::process::ExitCode;

use anyhow::Context as _;
use outpost_policy::audit::{AuditReader, Query};
use outpost_sync::Outbox;
use outpost_sync::device::load_accepted;
use outpost_sync::protocol::{DeviceId, Following, GroupId};
use outpost_sync::release::following;
use serde::Serialize;

use super::print_json;
use crate::cli::SyncCommand;
use crate::context::Context;

pub fn run(ctx: &Context, cmd: SyncCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncCommand::Status => status(ctx),
    }
}

/// What `sync status --json` prints when `[sync]` is configured.
#[derive(Debug, Serialize)]
struct Status {
    configured: bool,
    broker: String,
    connected: bool,
    /// Whether a daemon holds the outbox (runs sync).
    daemon_running: bool,
    last_acked_seq: u64,
    last_ack_at: Option<String>,
    /// The audit log's last seq.
    audit_last_seq: u64,
    pending_records: u64,
    telemetry_queued_bytes: u64,
    telemetry_dropped: u64,
    last_error: Option<String>,
    last_error_at: Option<String>,
    /// The desired state the device follows (accepted, by the precedence rule), if any.
    desired: Option<Following>,
}

fn status(ctx: &Context) -> anyhow::Result<ExitCode> {
    let Some(sync) = &ctx.loaded.config.sync else {
        if ctx.json {
            print_json(&serde_json::json!({ "configured": false }))?;
        } else {
            println!("Sync is not configured (no [sync] section); the device works offline.");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let data = ctx.data_dir();
    let outbox = Outbox::open_read_only(&data.outbox_db())?;
    let s = outbox.status()?;
    let audit_last_seq = audit_last_seq(ctx)?;
    // `config::load` validated the id and the groups of a configuration with `[sync]`.
    let device = &ctx.loaded.config.device;
    let id = DeviceId::new(device.id.as_deref().unwrap_or_default())?;
    let groups: Vec<GroupId> = device
        .groups
        .iter()
        .filter_map(|g| GroupId::new(g).ok())
        .collect();
    let desired = following(&load_accepted(&outbox), &id, &groups);
    let status = Status {
        configured: true,
        broker: sync.broker.clone(),
        connected: s.connected,
        daemon_running: s.writer_running,
        last_acked_seq: s.last_acked_seq,
        last_ack_at: s.last_ack_at.clone(),
        audit_last_seq,
        pending_records: s.pending_records(audit_last_seq),
        telemetry_queued_bytes: s.telemetry_queued_bytes,
        telemetry_dropped: s.telemetry_dropped,
        last_error: s.last_error.clone(),
        last_error_at: s.last_error_at.clone(),
        desired,
    };
    if ctx.json {
        print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    let link = match (status.connected, status.daemon_running) {
        (true, _) => "connected",
        (false, true) => "not connected (the daemon is trying)",
        (false, false) => "not connected (no daemon is running sync)",
    };
    println!("Broker {}: {link}.", status.broker);
    let acked = status
        .last_ack_at
        .as_deref()
        .map(|t| format!(" (last ack {t})"))
        .unwrap_or_default();
    println!(
        "Audit: acked through seq {}{acked}; {} of {} records pending.",
        status.last_acked_seq, status.pending_records, status.audit_last_seq
    );
    println!(
        "Telemetry: {} bytes queued, {} snapshots dropped.",
        status.telemetry_queued_bytes, status.telemetry_dropped
    );
    match &status.desired {
        Some(d) => println!(
            "Desired state: rollout {} ({} version {}): {}.",
            d.rollout, d.target, d.version, d.model
        ),
        None => println!("Desired state: none accepted."),
    }
    if let Some(e) = &status.last_error {
        let at = status.last_error_at.as_deref().unwrap_or("unknown time");
        println!("Last error ({at}): {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The audit log's last seq, read-only; 0 when there is no log yet.
fn audit_last_seq(ctx: &Context) -> anyhow::Result<u64> {
    let path = ctx.data_dir().audit_db();
    if !path.exists() {
        return Ok(0);
    }
    let reader = AuditReader::open(&path)?;
    let newest = reader
        .query(&Query {
            limit: Some(1),
            newest: true,
            ..Query::default()
        })
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    Ok(newest.last().map_or(0, |r| r.seq))
}
