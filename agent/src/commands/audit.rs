//! `outpost audit …`: query, tail, export and verify the audit log. Nothing here writes:
//! the log is opened read-only and no key is generated.

use std::io::{BufReader, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use outpost_policy::audit::{
    self, AuditReader, Format, Outcome, Query, Record, VerifyReport, verify_export, verify_log,
};
use outpost_policy::signing::{KeyPair, PublicKey};

use super::print_json;
use crate::cli::{AuditCommand, ExportFormat, TimeRange};
use crate::context::{Context, parse_time};

pub fn run(ctx: &Context, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Query {
            range,
            actor,
            action,
            outcome,
            limit,
        } => {
            let outcome = outcome
                .map(|o| {
                    Outcome::parse(&o).ok_or_else(|| {
                        anyhow::anyhow!("--outcome must be allowed, denied, success or failure")
                    })
                })
                .transpose()?;
            let q = Query {
                actor,
                action,
                outcome,
                limit,
                ..time_range(&range)?
            };
            let records = reader(ctx)?.query(&q)?;
            if ctx.json {
                print_json(&records)?;
            } else {
                records.iter().for_each(print_record);
            }
        }
        AuditCommand::Tail { lines, follow } => {
            let r = reader(ctx)?;
            let mut last = 0;
            let q = Query {
                limit: Some(lines),
                newest: true,
                ..Query::default()
            };
            for rec in r.query(&q)? {
                last = rec.seq;
                emit(ctx, &rec)?;
            }
            if follow {
                // Until interrupted (Ctrl-C): nothing here writes, so stopping is always safe.
                loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let q = Query {
                        after_seq: Some(last),
                        ..Query::default()
                    };
                    for rec in r.query(&q)? {
                        last = rec.seq;
                        emit(ctx, &rec)?;
                    }
                }
            }
        }
        AuditCommand::Export {
            range,
            format,
            output,
        } => {
            let r = reader(ctx)?;
            let format = match format {
                ExportFormat::Jsonl => Format::Jsonl,
                ExportFormat::Csv => Format::Csv,
            };
            let key = device_public_key(ctx, &r)?;
            let q = time_range(&range)?;
            let n = match &output {
                Some(path) => {
                    audit::export_to_file(&r, &q, format, &ctx.device_id(), key.as_ref(), path)?
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    audit::export(&r, &q, format, &ctx.device_id(), key.as_ref(), &mut w)?
                }
            };
            if let Some(path) = output {
                eprintln!("Exported {n} records to {}.", path.display());
            }
        }
        AuditCommand::Verify { export, public_key } => {
            let pinned = match &public_key {
                Some(p) => Some(PublicKey::load(p)?),
                None => None,
            };
            let report = match &export {
                Some(path) => {
                    let f = std::fs::File::open(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    verify_export(BufReader::new(f), pinned.as_ref())?
                }
                None => {
                    let r = reader(ctx)?;
                    let pinned = match pinned {
                        Some(k) => Some(k),
                        None => own_key(ctx)?,
                    };
                    verify_log(&r, pinned.as_ref())?
                }
            };
            print_report(ctx, &report)?;
            return Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn reader(ctx: &Context) -> anyhow::Result<AuditReader> {
    Ok(AuditReader::open(&ctx.data_dir().audit_db())?)
}

/// This device's public key, when its key file exists (never generated here).
fn own_key(ctx: &Context) -> anyhow::Result<Option<PublicKey>> {
    let path = ctx.device_key_path();
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(KeyPair::load(&path)?.public()))
}

/// The key exports carry: the device's own, else the one its checkpoints name.
fn device_public_key(ctx: &Context, r: &AuditReader) -> anyhow::Result<Option<PublicKey>> {
    if let Some(k) = own_key(ctx)? {
        return Ok(Some(k));
    }
    Ok(r.checkpoints()?
        .last()
        .and_then(|c| PublicKey::from_hex(&c.public_key)))
}

fn time_range(r: &TimeRange) -> anyhow::Result<Query> {
    Ok(Query {
        since: r.since.as_deref().map(parse_time).transpose()?,
        until: r.until.as_deref().map(parse_time).transpose()?,
        ..Query::default()
    })
}

fn emit(ctx: &Context, r: &Record) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        print_record(r);
    }
    std::io::stdout().flush()?;
    Ok(())
}

fn print_record(r: &Record) {
    println!("{}", r.summary_line());
}

fn print_report(ctx: &Context, r: &VerifyReport) -> anyhow::Result<()> {
    if ctx.json {
        return print_json(r);
    }
    println!("{}", r.summary());
    Ok(())
}
