//! Diagnostic logs: `tracing` events on stderr, configured by `[log]` (level, `text` or
//! `json`). `RUST_LOG` overrides the level. Text lines carry no timestamp when stderr is
//! the systemd journal (it stamps every line itself); JSON lines are one object each, with
//! the event's fields and the spans it happened in (e.g. the HTTP request's `request_id`).
//!
//! What commands print for people (results, tables, `--json` documents, one-line errors) is
//! output, not a log, and stays on stdout/stderr as `println!`/`eprintln!`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `[log] level` value: a level, or comma-separated `level` and `target=level`
/// directives (`info,outpost_agent=debug`).
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    let level = level.trim();
    let directive_ok = |d: &str| {
        let d = d.trim();
        let (target, lvl) = d.split_once('=').unwrap_or(("", d));
        LEVELS.contains(&lvl.to_ascii_lowercase().as_str())
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && (target.is_empty() != d.contains('='))
    };
    if level.is_empty() || !level.split(',').all(directive_ok) {
        return Err(format!(
            "'{level}' is not a level (error, warn, info, debug, trace, off) or a filter \
             like info,outpost_agent=debug"
        ));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(level)
        .map_err(|e| format!("'{level}' is not a level or a log filter: {e}"))
}

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names its device:inode).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// Installs the subscriber. `default_level` applies when the configuration does not say
/// (commands log warnings only; the daemon logs `[log] level`).
pub fn init(cfg: &LogConfig, daemon: bool) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).ok(),
        _ => None,
    };
    let filter = filter.unwrap_or_else(|| {
        let level = if daemon { cfg.level.as_str() } else { "warn" };
        parse_filter(level).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let result = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text if stderr_is_journal() => {
            builder.without_time().with_ansi(false).try_init()
        }
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    // Only fails when a subscriber is already installed (never in `main`).
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(level: &str, ok: bool) {
        assert_eq!(parse_filter(level).is_ok(), ok, "{level}");
    }

    #[test]
    fn levels_and_filters() {
        check("info", true);
        check("debug", true);
        check("warn,outpost_agent=trace", true);
        check("", false);
        check("loud", false);
        check("info,=", false);
    }
}
