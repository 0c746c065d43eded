//! `outpost models …`: the registry from the command line.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use outpost_engine::registry::{ImportOutcome, ModelRecord, ModelRef, Registry};

use outpost_policy::rbac::Action;

use super::print_json;
use crate::cli::ModelsCommand;
use crate::context::{Context, audited_local as audited};

pub fn run(ctx: &Context, cmd: ModelsCommand) -> anyhow::Result<ExitCode> {
    let data_dir = ctx.data_dir();
    let open_err = || format!("cannot open the registry in {}", data_dir.display());
    if let ModelsCommand::List | ModelsCommand::Show { .. } = cmd {
        let reg = Registry::open_read_only(data_dir.root()).with_context(open_err)?;
        read(ctx, &reg, cmd)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Every change is recorded before it happens; no record, no change.
    let audit = ctx.open_audit()?;
    let mut reg = Registry::open(data_dir.root()).with_context(open_err)?;
    match cmd {
        ModelsCommand::Import(args) => {
            let details = serde_json::json!({"file": args.file, "version": args.version});
            let outcome = audited(
                &audit,
                Action::ModelsWrite,
                Some(&args.name),
                details,
                || {
                    let total = std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0);
                    let bar = progress_bar(ctx, total);
                    let outcome = reg
                        .import(&args.file, &args.name, args.version.as_deref(), &mut |n| {
                            if let Some(b) = &bar {
                                b.set_position(n);
                            }
                        })
                        .with_context(|| format!("cannot import {}", args.file.display()));
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    outcome
                },
            )?;
            if ctx.json {
                print_json(outcome.record())?;
            } else {
                let m = outcome.record();
                match outcome {
                    ImportOutcome::Imported(_) => println!(
                        "Imported {} ({}, {}, {} parameters, {}) sha256:{}",
                        m.label(),
                        m.architecture,
                        m.quantization,
                        human_count(m.parameters),
                        human_bytes(m.size_bytes),
                        m.sha256
                    ),
                    ImportOutcome::AlreadyPresent(_) => println!(
                        "Already imported as {} (sha256:{}); nothing changed.",
                        m.label(),
                        m.sha256
                    ),
                }
            }
        }
        ModelsCommand::Activate { reference, alias } => {
            let r = parse_ref(&reference)?;
            let details = serde_json::json!({"alias": alias});
            let a = audited(
                &audit,
                Action::ModelsActivate,
                Some(&reference),
                details,
                || Ok(reg.activate(&r, &alias)?),
            )?;
            if ctx.json {
                print_json(&a)?;
            } else {
                match &a.previous {
                    Some(p) if p.label() == a.model.label() => {
                        println!("{} is already active as '{alias}'.", a.model.label());
                    }
                    Some(p) => println!(
                        "Activated {} as '{alias}' (was {}).",
                        a.model.label(),
                        p.label()
                    ),
                    None => println!("Activated {} as '{alias}'.", a.model.label()),
                }
            }
        }
        ModelsCommand::Rollback { alias } => {
            let details = serde_json::json!({"alias": alias});
            let a = audited(&audit, Action::ModelsActivate, None, details, || {
                Ok(reg.rollback(&alias)?)
            })?;
            if ctx.json {
                print_json(&a)?;
            } else {
                let was = a
                    .previous
                    .as_ref()
                    .map_or("unset".into(), ModelRecord::label);
                println!("Rolled '{alias}' back to {} (was {was}).", a.model.label());
            }
        }
        ModelsCommand::Remove { reference, force } => {
            let r = parse_ref(&reference)?;
            let details = serde_json::json!({"force": force});
            let removed = audited(
                &audit,
                Action::ModelsWrite,
                Some(&reference),
                details,
                || Ok(reg.remove(&r, force)?),
            )?;
            if ctx.json {
                print_json(&removed)?;
            } else if removed.blob_deleted {
                println!(
                    "Removed {} and its blob ({} freed).",
                    removed.model.label(),
                    human_bytes(removed.model.size_bytes)
                );
            } else {
                println!(
                    "Removed {}; its blob stays (shared with another entry or in use).",
                    removed.model.label()
                );
            }
        }
        ModelsCommand::Gc => {
            let g = audited(
                &audit,
                Action::ModelsWrite,
                None,
                serde_json::json!({"gc": true}),
                || Ok(reg.gc()?),
            )?;
            if ctx.json {
                print_json(&g)?;
            } else {
                println!(
                    "Removed {} unreferenced blob(s) and {} leftover temp file(s), {} freed.",
                    g.blobs_removed.len(),
                    g.temp_files_removed,
                    human_bytes(g.bytes_freed)
                );
                for b in &g.blobs_in_use {
                    println!("Kept {b}: in use by a running engine.");
                }
            }
        }
        ModelsCommand::Quantize {
            reference,
            to,
            name,
        } => {
            let source = reg.resolve(&parse_ref(&reference)?)?;
            let name = name.unwrap_or_else(|| format!("{}-{to}", source.name));
            let details = serde_json::json!({"from": source.label(), "to": to});
            let (report, m) = audited(&audit, Action::ModelsWrite, Some(&name), details, || {
                let _held = reg.blobs().open_shared(&source.sha256)?;
                let tmp = tempfile::Builder::new()
                    .prefix(".quantize-")
                    .tempfile_in(data_dir.root())
                    .with_context(|| format!("cannot write in {}", data_dir.display()))?;
                let report =
                    outpost_engine::quantize::quantize(&reg.model_path(&source), tmp.path(), &to)?;
                let m = reg.import(tmp.path(), &name, None, &mut |_| {})?;
                Ok((report, m.record().clone()))
            })?;
            if report.requantized {
                eprintln!(
                    "warning: {} was already quantized ({}); requantizing compounds the error",
                    source.label(),
                    source.quantization
                );
            }
            if ctx.json {
                print_json(&serde_json::json!({"model": m, "report": report,
                    "size_before": source.size_bytes, "size_after": m.size_bytes}))?;
            } else {
                println!(
                    "Wrote {} ({}): {} -> {} ({} matrices quantized, {} fell back, {} kept).",
                    m.label(),
                    m.quantization,
                    human_bytes(source.size_bytes),
                    human_bytes(m.size_bytes),
                    report.tensors_quantized,
                    report.fallbacks.len(),
                    report.kept
                );
            }
        }
        // Reads returned above, without opening the audit log.
        ModelsCommand::List | ModelsCommand::Show { .. } => {}
    }
    audit.close()?;
    Ok(ExitCode::SUCCESS)
}

fn read(ctx: &Context, reg: &Registry, cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List => {
            let models = reg.list()?;
            if ctx.json {
                print_json(&models)?;
            } else {
                print_table(&models, &ctx.data_dir());
            }
        }
        ModelsCommand::Show { reference } => {
            let m = reg.resolve(&parse_ref(&reference)?)?;
            if ctx.json {
                print_json(&m)?;
            } else {
                print_details(reg, &m);
            }
        }
        _ => {}
    }
    Ok(())
}

fn parse_ref(s: &str) -> anyhow::Result<ModelRef> {
    Ok(s.parse::<ModelRef>()?)
}

/// A progress bar on stderr, only when a person is watching.
fn progress_bar(ctx: &Context, total: u64) -> Option<indicatif::ProgressBar> {
    if ctx.json || !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn print_table(models: &[ModelRecord], data_dir: &crate::context::DataDir) {
    if models.is_empty() {
        println!(
            "No models in {}. Import one with: outpost models import FILE --name NAME\n\
             (another data directory: --data-dir DIR, or export OUTPOST_DATA_DIR=DIR)",
            data_dir.display()
        );
        return;
    }
    let rows: Vec<[String; 9]> = models
        .iter()
        .map(|m| {
            [
                m.label(),
                m.architecture.clone(),
                m.quantization.clone(),
                human_count(m.parameters),
                m.class.as_str().to_string(),
                human_bytes(m.size_bytes),
                m.sha256[..12].to_string(),
                m.aliases.join(","),
                m.source.clone(),
            ]
        })
        .collect();
    let header = [
        "MODEL", "ARCH", "QUANT", "PARAMS", "CLASS", "SIZE", "SHA256", "ALIASES", "SOURCE",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_details(reg: &Registry, m: &ModelRecord) {
    let ctx = m
        .context_length
        .map_or("unknown".to_string(), |c| c.to_string());
    let aliases = if m.aliases.is_empty() {
        "none".to_string()
    } else {
        m.aliases.join(", ")
    };
    for (k, v) in [
        ("model", m.label()),
        ("architecture", m.architecture.clone()),
        ("quantization", m.quantization.clone()),
        (
            "parameters",
            format!("{} ({})", m.parameters, human_count(m.parameters)),
        ),
        ("class", m.class.as_str().to_string()),
        ("context", ctx),
        (
            "size",
            format!("{} ({} bytes)", human_bytes(m.size_bytes), m.size_bytes),
        ),
        ("sha256", m.sha256.clone()),
        ("aliases", aliases),
        ("imported", m.imported_at.clone()),
        ("source", m.source.clone()),
        ("file", reg.model_path(m).display().to_string()),
    ] {
        println!("{k:<13} {v}");
    }
}

fn human_count(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.0}M", n as f64 / 1e6),
        _ => format!("{:.1}B", n as f64 / 1e9),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_naturally() {
        assert_eq!(human_bytes(98_362_432), "93.8 MiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_count(134_515_008), "135M");
        assert_eq!(human_count(1_500_000_000), "1.5B");
        assert_eq!(human_count(5_000), "5.0K");
    }
}
