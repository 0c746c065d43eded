//! The command line: every subcommand, flag and environment variable of `outpost`.

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand};

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
    /// Generate text with a local model, offline.
    Generate(GenerateArgs),
    /// Measure prefill and decode speed (llama-bench style).
    Bench(BenchArgs),
    /// Manage the local model registry.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Ed25519 key pairs for token issuers and devices.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Issue tokens (for administrators and tests).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check what a token may do.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Read, export and verify the audit log (changes nothing).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The link to the fleet hub (read-only).
    #[command(subcommand)]
    Sync(SyncCommand),
    /// Run the agent: the local HTTP API (OpenAI-compatible inference, management, audit)
    /// until SIGTERM or SIGINT.
    Daemon,
    /// Write the man pages and shell completions into DIR (scripts/package runs it).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `outpost generate-docs --out DIR`: DIR/man/*.1 (one page per command, such as
/// `outpost-models-import.1`) and DIR/completions/ (`outpost.bash`, `_outpost`,
/// `outpost.fish`), generated from these definitions. Hidden commands are left out.
pub fn generate_docs(out: &Path) -> std::io::Result<()> {
    let (man, completions) = (out.join("man"), out.join("completions"));
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // clap_complete would offer hidden commands too: complete a copy without them.
    let mut shown = clap::Command::new("outpost")
        .version(crate::VERSION)
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    use clap_complete::Shell::{Bash, Fish, Zsh};
    for shell in [Bash, Zsh, Fish] {
        clap_complete::generate_to(shell, &mut shown, "outpost", &completions)?;
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub struct GenerateArgs {
    /// Model REF or alias; default the alias `default`.
    #[arg(long)]
    pub model: Option<String>,
    /// A raw prompt: special tokens such as <|im_start|> are recognized, as llama.cpp does.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, through the model's chat template (special tokens in it stay text).
    #[arg(long)]
    pub chat: Option<String>,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    /// 1.0 is off.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Makes sampling reproducible.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Compute threads; default `[engine] threads`, else the number of cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Report the N most likely tokens at each step (with --json).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Context window; default `[engine] context_length`, else the model's (at most 8192).
    #[arg(long)]
    pub context: Option<usize>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model REF or alias; default the alias `default`.
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt lengths to prefill, comma-separated.
    #[arg(
        short = 'p',
        long = "prompt",
        value_delimiter = ',',
        default_value = "128,512"
    )]
    pub prompt: Vec<usize>,
    /// Tokens to decode.
    #[arg(short = 'n', long = "gen", default_value_t = 128)]
    pub generate: usize,
    /// Thread counts, comma-separated; default the number of cores.
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Option<Vec<usize>>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "reps", default_value_t = 5)]
    pub reps: usize,
    /// Internal: run one thread count in this process.
    #[arg(long, hide = true)]
    pub worker: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write DIR/NAME.key.pem (PKCS#8, mode 0600) and DIR/NAME.pub.pem (SPKI).
    Generate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = "outpost")]
        name: String,
    },
    /// Print this device's public key (PEM), which signs its audit checkpoints; the key
    /// pair is created on first use.
    Device,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a signed EdDSA token.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The issuer's private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[arg(long)]
    pub kid: String,
    #[arg(long)]
    pub iss: String,
    #[arg(long)]
    pub sub: String,
    /// Roles, comma-separated (admin, operator, auditor, app, or custom).
    #[arg(long = "role", value_delimiter = ',', required = true)]
    pub roles: Vec<String>,
    /// Audience: a device id or group; default this device's id.
    #[arg(long)]
    pub aud: Option<String>,
    /// Lifetime: 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Models an `app` may run (glob patterns), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Decide whether a token may do an action; exit 0 allowed, 1 refused or denied.
    Check {
        #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long)]
        action: String,
        /// The model the action concerns.
        #[arg(long)]
        resource: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct TimeRange {
    /// From this time: RFC 3339 (2026-11-26T10:00:00Z) or an age (90s, 30m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time (same forms).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Records matching filters, oldest first.
    Query {
        #[command(flatten)]
        range: TimeRange,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// allowed, denied, success or failure.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        limit: Option<u64>,
    },
    /// The newest records; with -f, keep printing new ones.
    Tail {
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u64,
        #[arg(short, long)]
        follow: bool,
    },
    /// Write records with the checkpoints and the device public key.
    Export {
        #[command(flatten)]
        range: TimeRange,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Write here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check the chain and every checkpoint signature; exit 1 naming the first bad seq.
    Verify {
        /// Verify this JSONL export instead of the local log.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// The device public key to trust (PEM); default this device's own key.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Show the link's state, the audit upload cursor and the telemetry queue (reads
    /// `outbox.db` and the audit log read-only; works while the daemon runs).
    Status,
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
    /// Write a model in another quantization into the registry.
    Quantize {
        reference: String,
        /// q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k or q6_k.
        #[arg(long)]
        to: String,
        /// Name in the registry; default NAME-TYPE.
        #[arg(long)]
        name: Option<String>,
    },
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
