//! Dispatch of the subcommands, and the output conventions they share.

mod models;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{Cli, Command, ConfigCommand};
use crate::config::{self, Loaded};

/// What every command gets: the validated configuration and the global flags.
pub struct Context {
    pub loaded: Loaded,
    pub json: bool,
    data_dir_flag: Option<PathBuf>,
}

impl Context {
    /// Flag or `OUTPOST_DATA_DIR`, else `[device] data_dir`, else the default.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_flag
            .clone()
            .or_else(|| self.loaded.config.device.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR))
    }
}

pub fn run(cli: Cli, loaded: Loaded) -> anyhow::Result<ExitCode> {
    let ctx = Context {
        loaded,
        json: cli.json,
        data_dir_flag: cli.data_dir,
    };
    match cli.command {
        Command::Config(ConfigCommand::Check) => config_check(&ctx),
        Command::Models(cmd) => models::run(&ctx, cmd),
    }
}

fn config_check(ctx: &Context) -> anyhow::Result<ExitCode> {
    if ctx.json {
        print_json(&serde_json::json!({
            "ok": true,
            "files": ctx.loaded.files,
            "data_dir": ctx.data_dir(),
            "config": ctx.loaded.config,
        }))?;
    } else {
        if ctx.loaded.files.is_empty() {
            println!("No configuration files found; using the defaults.");
        }
        for f in &ctx.loaded.files {
            println!("read {}", f.display());
        }
        println!(
            "Configuration OK (device id: {}, data dir: {}).",
            ctx.loaded.config.device.id.as_deref().unwrap_or("unset"),
            ctx.data_dir().display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
