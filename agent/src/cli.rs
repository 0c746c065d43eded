//! The command line: every subcommand, flag and environment variable of `outpost`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Outpost: an offline-first edge agent that keeps, runs and governs local language models.
#[derive(Debug, Parser)]
#[command(name = "outpost", version = crate::VERSION)]
pub struct Cli {
    /// Data directory (registry, blobs, audit log); default: the config's, else /var/lib/outpost.
    #[arg(long, global = true, env = "OUTPOST_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Configuration file; `config.d/*.toml` beside it is read too.
    #[arg(long, global = true, env = "OUTPOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the local model registry.
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration files; exit 78 naming the bad key and file.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Copy a GGUF file into the registry (verified, content-addressed).
    Import(ImportArgs),
    /// List the models in the registry.
    List,
    /// Show one model.
    Show {
        /// NAME (latest version), NAME:VERSION or sha256:<12+ hex digits>.
        reference: String,
    },
    /// Point an alias at a model.
    Activate {
        reference: String,
        #[arg(long, default_value = "default")]
        alias: String,
    },
    /// Point an alias back at the model that was active before.
    Rollback {
        #[arg(long, default_value = "default")]
        alias: String,
    },
    /// Remove a model; its blob goes once nothing references it.
    Remove {
        reference: String,
        /// Remove it even if an alias points to it (the alias is unset).
        #[arg(long)]
        force: bool,
    },
    /// Delete unreferenced blobs and leftovers of interrupted imports.
    Gc,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Name in the registry.
    #[arg(long)]
    pub name: String,
    /// Version; default: one more than the highest numeric version of NAME.
    #[arg(long)]
    pub version: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
