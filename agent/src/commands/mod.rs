//! Dispatch of the subcommands, and the output conventions they share.

pub(crate) mod audit;
mod auth;
mod bench;
mod generate;
mod models;
mod sync;

use std::process::ExitCode;

use crate::cli::{Cli, Command, ConfigCommand, KeysCommand};
use crate::config::Loaded;
use crate::context::Context;

pub fn run(cli: Cli, loaded: Loaded) -> anyhow::Result<ExitCode> {
    let ctx = Context::new(loaded, cli.json, cli.data_dir, cli.config);
    // Commands that read or write the data directory run as its owner.
    let leaves_data_alone = matches!(
        cli.command,
        Command::Config(ConfigCommand::Check)
            | Command::Token(_)
            | Command::Keys(KeysCommand::Generate { .. })
    );
    if !leaves_data_alone {
        ctx.check_data_dir_owner()?;
    }
    match cli.command {
        Command::Config(ConfigCommand::Check) => config_check(&ctx),
        Command::Models(cmd) => models::run(&ctx, cmd),
        Command::Generate(args) => generate::run(&ctx, args),
        Command::Bench(args) => bench::run(&ctx, args),
        Command::Keys(cmd) => auth::keys(&ctx, cmd),
        Command::Token(cmd) => auth::token(&ctx, cmd),
        Command::Auth(cmd) => auth::check(&ctx, cmd),
        Command::Audit(cmd) => audit::run(&ctx, cmd),
        Command::Sync(cmd) => sync::run(&ctx, cmd),
        // `main` runs the daemon itself: it owns the runtime and the signals.
        Command::Daemon => anyhow::bail!("the daemon is started by main"),
        Command::GenerateDocs { .. } => anyhow::bail!("generate-docs is run by main"),
    }
}

fn config_check(ctx: &Context) -> anyhow::Result<ExitCode> {
    // Key files, the revocation list and the policy document must load too.
    ctx.auth()?;
    ctx.sync_link()?;
    if ctx.json {
        let mut data_files = ctx.data_dir().files();
        data_files.insert("device_key", ctx.device_key_path());
        print_json(&serde_json::json!({
            "ok": true,
            "files": ctx.loaded.files,
            "data_dir": ctx.data_dir().root(),
            "data_files": data_files,
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
