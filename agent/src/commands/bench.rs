//! `outpost bench`: prefill and decode tokens/s per thread count, like llama-bench.
//!
//! The compute pool's size is fixed per process, so each thread count runs in a child
//! process (this binary with `--worker`, `RAYON_NUM_THREADS` set) and the parent merges.

use std::process::{Command, ExitCode};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::generate::load;
use super::print_json;
use crate::cli::BenchArgs;
use crate::context::Context;

#[derive(Debug, Serialize, Deserialize)]
struct BenchResult {
    test: String,
    threads: usize,
    tokens_per_s: f64,
    sd: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkerReport {
    model: String,
    quantization: String,
    load_ms: u64,
    peak_rss_bytes: u64,
    results: Vec<BenchResult>,
}

pub fn run(ctx: &Context, a: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.reps >= 1 && a.reps <= 1000, "-r must be 1 to 1000");
    anyhow::ensure!(
        a.prompt.iter().all(|&p| p <= 1 << 16),
        "-p values must be at most 65536"
    );
    anyhow::ensure!(a.generate <= 1 << 16, "-n must be at most 65536");
    if a.worker {
        let report = worker(ctx, &a)?;
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads.clone().unwrap_or_else(|| vec![cores]);
    anyhow::ensure!(
        threads.iter().all(|&t| (1..=1024).contains(&t)),
        "-t values must be 1 to 1024"
    );
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut merged: Option<WorkerReport> = None;
    for &t in &threads {
        let mut cmd = Command::new(&exe);
        if let Some(c) = ctx.config_path() {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("--data-dir")
            .arg(ctx.data_dir().root())
            .arg("bench")
            .arg("--worker");
        if let Some(m) = &a.model {
            cmd.args(["--model", m]);
        }
        let prompts: Vec<String> = a.prompt.iter().map(|p| p.to_string()).collect();
        cmd.args(["-p", &prompts.join(","), "-n", &a.generate.to_string()])
            .args(["-r", &a.reps.to_string()])
            .env("RAYON_NUM_THREADS", t.to_string());
        let out = cmd.output().context("cannot run the benchmark worker")?;
        if !out.status.success() {
            anyhow::bail!(
                "{}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .trim_start_matches("error: ")
            );
        }
        let mut r: WorkerReport =
            serde_json::from_slice(&out.stdout).context("the benchmark worker's report")?;
        for x in &mut r.results {
            x.threads = t;
        }
        match &mut merged {
            None => merged = Some(r),
            Some(m) => {
                m.peak_rss_bytes = m.peak_rss_bytes.max(r.peak_rss_bytes);
                m.results.extend(r.results);
            }
        }
    }
    let Some(report) = merged else {
        anyhow::bail!("no thread count to run");
    };
    if ctx.json {
        print_json(&report)?;
    } else {
        println!(
            "model {} ({}), load {} ms, peak RSS {:.1} MiB",
            report.model,
            report.quantization,
            report.load_ms,
            report.peak_rss_bytes as f64 / (1 << 20) as f64
        );
        // Columns padded by characters, so `±` (two bytes) does not shift them.
        let rows: Vec<[String; 3]> = report
            .results
            .iter()
            .map(|r| {
                [
                    r.test.clone(),
                    r.threads.to_string(),
                    format!("{:.2} ± {:.2}", r.tokens_per_s, r.sd),
                ]
            })
            .collect();
        let width = |i: usize, title: &str| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([title.len()])
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0, "test"), width(1, "threads"), width(2, "t/s"));
        println!("| {:<w0$} | {:>w1$} | {:>w2$} |", "test", "threads", "t/s");
        println!(
            "|{}|{}:|{}:|",
            "-".repeat(w0 + 2),
            "-".repeat(w1 + 1),
            "-".repeat(w2 + 1)
        );
        for [test, threads, tps] in &rows {
            println!("| {test:<w0$} | {threads:>w1$} | {tps:>w2$} |");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn worker(ctx: &Context, a: &BenchArgs) -> anyhow::Result<WorkerReport> {
    let longest = a
        .prompt
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(a.generate + 1);
    let mut lease = load(ctx, a.model.as_deref(), Some(longest + 16))?;
    let (model, record) = (&mut lease.model, &lease.record);
    let vocab = model.vocab_size().max(2) as u64;
    let mut results = Vec::new();
    for &p in &a.prompt {
        // Deterministic, varied ids (what llama-bench does with random ones).
        let prompt: Vec<u32> = (0..p as u64)
            .map(|i| ((i * 7919 + 13) % vocab) as u32)
            .collect();
        model.timed_run(&prompt, 0)?; // warm-up
        let rates: Vec<f64> = (0..a.reps)
            .map(|_| model.timed_run(&prompt, 0).map(|(s, _)| p as f64 / s))
            .collect::<Result<_, _>>()?;
        results.push(stats(format!("pp{p}"), &rates));
    }
    if a.generate > 0 {
        model.timed_run(&[], 4)?;
        let rates: Vec<f64> = (0..a.reps)
            .map(|_| {
                model
                    .timed_run(&[], a.generate)
                    .map(|(_, s)| a.generate as f64 / s)
            })
            .collect::<Result<_, _>>()?;
        results.push(stats(format!("tg{}", a.generate), &rates));
    }
    Ok(WorkerReport {
        model: record.label(),
        quantization: record.quantization.clone(),
        load_ms: model.load_ms,
        peak_rss_bytes: peak_rss(),
        results,
    })
}

fn stats(test: String, rates: &[f64]) -> BenchResult {
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    BenchResult {
        test,
        threads: 0,
        tokens_per_s: mean,
        sd: var.sqrt(),
    }
}

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
