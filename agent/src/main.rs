//! `outpost`: parse arguments, load and validate the configuration, run the command, exit.
//! For `outpost daemon`, `main` also owns the async runtime and the signals: it binds the
//! listener after the configuration is known good, and cancels the daemon's shutdown token
//! on SIGTERM or SIGINT.
//!
//! Exit codes: 0 success, 1 failure (the message says why), 2 bad usage, 78 bad configuration
//! (EX_CONFIG; the systemd unit does not restart on it).

mod activation;
mod cli;
mod commands;
mod config;
mod context;
mod daemon;
mod logging;
mod sys;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

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
    // Packaging runs this on the build machine, whatever /etc/outpost holds.
    if let cli::Command::GenerateDocs { out } = &cli.command {
        return match cli::generate_docs(out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the docs into {}: {e}", out.display());
                ExitCode::FAILURE
            }
        };
    }
    let loaded = match config::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let is_daemon = matches!(cli.command, cli::Command::Daemon);
    logging::init(&loaded.config.log, is_daemon);
    abort_on_panic();
    // Before any thread exists: the compute pool reads its size once, from the environment.
    let wanted = match &cli.command {
        cli::Command::Generate(g) => g.threads.or(loaded.config.engine.threads),
        _ => loaded.config.engine.threads,
    };
    if let Some(n) = wanted {
        sys::set_compute_threads(n);
    }
    let result = if is_daemon {
        let ctx = context::Context::new(loaded, cli.json, cli.data_dir, cli.config);
        run_daemon(ctx)
    } else {
        commands::run(cli, loaded)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<config::ConfigError>().is_some() {
                eprintln!("error: {e:#}");
                ExitCode::from(EX_CONFIG)
            } else {
                if is_daemon {
                    tracing::error!(error = %format!("{e:#}"), "The daemon failed.");
                }
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// A panic ends the process in every build, as the release profile's `panic = "abort"`
/// does: a half-dead daemon (an engine thread gone, a task lost) is worse than a restart by
/// systemd, and tests of debug builds then see what the field sees.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!(panic = %info, "Aborting on a panic.");
        std::process::abort();
    }));
}

/// `outpost daemon`: configuration checked (exit 78) before the listener is bound; then
/// the daemon runs until SIGTERM or SIGINT.
fn run_daemon(ctx: context::Context) -> anyhow::Result<ExitCode> {
    ctx.check_data_dir_owner()?;
    let listen = daemon::check_config(&ctx)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("outpost-api")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = daemon::Listener::bind(&listen).await?;
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = daemon::run(ctx, listener, shutdown).await;
        signals.abort();
        result
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    result.map(|()| ExitCode::SUCCESS)
}

/// Cancels `shutdown` at the first SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot watch SIGTERM and SIGINT; stop the daemon with SIGKILL.");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "Shutdown requested.");
    shutdown.cancel();
}
