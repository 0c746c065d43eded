//! `outpost`: parse arguments, load and validate the configuration, run the command, exit.
//!
//! Exit codes: 0 success, 1 failure (the message says why), 2 bad usage, 78 bad configuration
//! (EX_CONFIG; the systemd unit does not restart on it).

mod cli;
mod commands;
mod config;
mod daemon;
mod sys;

use std::process::ExitCode;

use clap::Parser;

/// `0.1.0 (commit)`, as `outpost --version` prints it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("OUTPOST_GIT_COMMIT"),
    ")"
);

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let loaded = match config::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Before any thread exists: the compute pool reads its size once, from the environment.
    let wanted = match &cli.command {
        cli::Command::Generate(g) => g.threads.or(loaded.config.engine.threads),
        _ => loaded.config.engine.threads,
    };
    if let Some(n) = wanted {
        sys::set_compute_threads(n);
    }
    match commands::run(cli, loaded) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<config::ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
