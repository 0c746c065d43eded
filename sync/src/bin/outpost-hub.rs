//! `outpost-hub`: the cloud side's command line. Parse arguments, load and validate the
//! configuration, run the command, exit. The work is in `outpost_sync::hub`.
//!
//! Exit codes: 0 success (for `serve`, stopped by SIGTERM or SIGINT), 1 failure (the
//! message says why), 2 bad usage, 78 bad configuration (EX_CONFIG).
//!
//! Logs are `tracing` events on stderr (`RUST_LOG` sets the filter; default `info` for
//! `serve`, `warn` for the other commands, whose output is what they print).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand};
use outpost_policy::audit::{Format, Outcome, Query};
use outpost_policy::time::{parse_duration, parse_time};
use outpost_sync::hub::audit::DeviceChain;
use outpost_sync::hub::config::Config;
use outpost_sync::hub::enroll::{EnrollRequest, enroll};
use outpost_sync::hub::serve::{ServeSettings, Server};
use outpost_sync::hub::store::{Store, StoreConfig};
use outpost_sync::hub::{HubError, broker, pki, rabbitmq, rollout};
use outpost_sync::protocol::{DeviceId, GroupId};
use outpost_sync::release::Target;

/// Exit status for a configuration error (sysexits.h EX_CONFIG).
const EX_CONFIG: u8 = 78;

/// The Outpost hub: the fleet's PKI, enrollment, broker configuration, `serve` (which
/// stores and acks what devices send) and the auditors' reads of each device's audit chain.
#[derive(Debug, Parser)]
#[command(name = "outpost-hub", version)]
struct Cli {
    /// Configuration file (a `[hub]` table).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Data directory (hub.db, audit.db); default: the config's, else /var/lib/outpost-hub.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The fleet's certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Write a Mosquitto configuration and ACL for the fleet.
    BrokerConfig(BrokerConfigArgs),
    /// Connect to the broker and ingest what devices send (audit, status, state,
    /// telemetry) until SIGTERM or SIGINT; needs --config with [hub] broker, ca, cert, key.
    Serve,
    /// Read, export and verify a device's audit chain as the hub holds it (changes nothing).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Published models: the blob store and signed manifests.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Signed desired states pushed to groups or devices (`serve` publishes them).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Copy a hub's store from hub.db into an empty PostgreSQL database, then verify every
    /// device's chain there (exit 1 if one fails).
    Migrate {
        /// The source: sqlite:PATH (the data directory, or its hub.db).
        #[arg(long, value_name = "sqlite:PATH")]
        from: String,
        /// The target: postgres://USER@HOST/DATABASE, empty.
        #[arg(long, value_name = "URL")]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages and shell completions into DIR (scripts/package runs it).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Store a GGUF file in the hub's blob store and print its signed manifest (JSON).
    Publish {
        /// The GGUF model file.
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// The release private key (PKCS#8 PEM, from `outpost keys generate`).
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        /// The key id devices pin it under (`[[sync.release_keys]] kid`).
        #[arg(long)]
        kid: String,
        /// How long devices accept the manifest: 90s, 30m, 2h, 30d.
        #[arg(long, default_value = "30d")]
        expires: String,
        /// Bytes per chunk (each chunk's SHA-256 is in the manifest).
        #[arg(long, default_value_t = rollout::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Sign a desired state for a group or device and store it; prints {"rollout": ID}.
    Start {
        /// The published model, NAME:VERSION.
        #[arg(long, value_name = "N:V")]
        model: String,
        /// group:G or device:ID.
        #[arg(long)]
        target: String,
        /// The release private key (PKCS#8 PEM).
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        /// The alias to point at the model.
        #[arg(long, default_value = "default")]
        alias: String,
        /// Switch the alias once the model passes its health check.
        #[arg(long)]
        activate: bool,
        /// Percent of a group's devices in the first batch.
        #[arg(long, value_name = "PERCENT", default_value_t = 100)]
        batch: u8,
        /// Halt the rollout when more devices than this fail.
        #[arg(long, value_name = "K")]
        max_failures: Option<u64>,
        /// How long devices accept the desired state (at most the manifest's expiry).
        #[arg(long, default_value = "30d")]
        expires: String,
    },
    /// Rollouts and their devices' states (from what devices reported).
    Status {
        id: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop distributing a rollout (its retained desired states are cleared).
    Halt { id: u64 },
    /// Distribute a halted rollout again.
    Resume { id: u64 },
}

/// `outpost audit …` of the device, on the hub's copy: same filters, formats and exit codes.
#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Records matching filters, oldest first.
    Query {
        #[command(flatten)]
        device: DeviceArg,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write records with the checkpoints and the device's enrolled public key.
    Export {
        #[command(flatten)]
        device: DeviceArg,
        #[command(flatten)]
        range: TimeRange,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Write here instead of stdout.
        #[arg(short, long, visible_alias = "out", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check the hub's copy from seq 1: the chain and every checkpoint signature against the
    /// enrolled key; exit 1 naming the first bad seq. Alerts recorded for the device are
    /// shown too.
    Verify {
        #[command(flatten)]
        device: DeviceArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct DeviceArg {
    /// The enrolled device whose chain to read.
    #[arg(long = "device", value_name = "ID")]
    id: String,
}

#[derive(Debug, Args)]
struct TimeRange {
    /// From this time: RFC 3339 or an age like 30m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Before this time (same forms).
    #[arg(long)]
    until: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a CA, the hub's client certificate and the broker's server certificate.
    Init {
        /// Folder for ca.pem/.key, hub.pem/.key, broker.pem/.key.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// An extra name or address of the broker (localhost and 127.0.0.1 are always in).
        #[arg(long = "broker-host", value_name = "NAME")]
        broker_hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Issue a device's certificate and register it with its groups and audit key.
    Enroll(EnrollArgs),
    /// List enrolled devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The device id (its certificate's CN and MQTT client id).
    #[arg(long)]
    id: String,
    /// A group the device belongs to (repeatable).
    #[arg(long = "group", value_name = "G")]
    groups: Vec<String>,
    /// The device's audit public key (the PEM `outpost keys device` prints).
    #[arg(long, value_name = "PEM")]
    audit_key: PathBuf,
    /// The PKI folder made by `pki init`.
    #[arg(long, value_name = "DIR")]
    pki: PathBuf,
    /// Folder for ID.pem, ID.key and ca.pem.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BrokerKind {
    Mosquitto,
    Rabbitmq,
}

#[derive(Debug, Args)]
struct BrokerConfigArgs {
    /// The PKI folder made by `pki init`.
    #[arg(long, value_name = "DIR")]
    pki: PathBuf,
    /// The TLS listener's port.
    #[arg(long)]
    port: u16,
    /// The address to listen on (default: every interface).
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// The broker: mosquitto (mosquitto.conf and acl) or rabbitmq (rabbitmq.conf,
    /// definitions.json and enabled_plugins, for RabbitMQ's MQTT plugin; see docs/brokers.md).
    #[arg(long, value_enum, default_value_t = BrokerKind::Mosquitto)]
    broker: BrokerKind,
    /// The user Mosquitto runs as when started as root (default: root if broker.key
    /// belongs to root, else none).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Folder for the broker's files.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Packaging runs this on the build machine, whatever /etc/outpost-hub holds.
    if let Command::GenerateDocs { out } = &cli.command {
        return match generate_docs(out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the docs into {}: {e}", out.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_logging(matches!(cli.command, Command::Serve));
    if let Command::Serve = cli.command {
        let settings = match config.serve_settings(cli.data_dir.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        return match serve(settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let data_dir = config.data_dir(cli.data_dir.as_deref());
    let store = config.store(cli.data_dir.as_deref());
    match run(cli.command, &data_dir, &store) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `outpost-hub generate-docs --out DIR`: DIR/man/*.1 (one page per command) and
/// DIR/completions/ (`outpost-hub.bash`, `_outpost-hub`, `outpost-hub.fish`).
fn generate_docs(out: &Path) -> std::io::Result<()> {
    let (man, completions) = (out.join("man"), out.join("completions"));
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // clap_complete would offer hidden commands too: complete a copy without them.
    let mut shown = clap::Command::new("outpost-hub")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    use clap_complete::Shell::{Bash, Fish, Zsh};
    for shell in [Bash, Zsh, Fish] {
        clap_complete::generate_to(shell, &mut shown, "outpost-hub", &completions)?;
    }
    Ok(())
}

/// `tracing` events on stderr: `RUST_LOG`, else `info` when serving and `warn` otherwise.
fn init_logging(serving: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(if serving { "info" } else { "warn" }));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// `serve`: the runtime, the signals, the server.
fn serve(settings: ServeSettings) -> anyhow::Result<()> {
    let server = Server::open(settings.clone())
        .with_context(|| format!("starting to serve from {}", settings.data_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "Shutting down."),
                _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "Shutting down."),
            }
            stop.cancel();
        });
        server.run(shutdown).await?;
        Ok(())
    })
}

fn run(command: Command, data_dir: &Path, store: &StoreConfig) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => anyhow::bail!("serve is run by main"),
        Command::GenerateDocs { .. } => anyhow::bail!("generate-docs is run by main"),
        Command::Audit(cmd) => return audit_command(cmd, store),
        Command::Models(cmd) => models_command(cmd, data_dir, store)?,
        Command::Rollout(cmd) => return rollout_command(cmd, data_dir, store),
        Command::Migrate { from, to, json } => return migrate(&from, &to, json),
        Command::Pki(PkiCommand::Init { out, broker_hosts }) => {
            let paths = pki::init(&out, &broker_hosts)?;
            println!(
                "CA, hub and broker certificates written to {}",
                paths.dir.display()
            );
        }
        Command::Devices(DevicesCommand::Enroll(a)) => {
            let id = DeviceId::new(&a.id)?;
            let groups = a
                .groups
                .iter()
                .map(|g| GroupId::new(g))
                .collect::<Result<Vec<_>, _>>()?;
            let req = EnrollRequest {
                id,
                groups,
                audit_key: a.audit_key,
                pki: a.pki,
                out: a.out,
                actor: local_actor(),
            };
            let record = enroll(data_dir, store, &req)
                .with_context(|| format!("enrolling device {}", req.id))?;
            println!(
                "enrolled {} (groups: {}); certificate in {}",
                record.id,
                record
                    .groups
                    .iter()
                    .map(GroupId::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                req.out.display()
            );
        }
        Command::Devices(DevicesCommand::List { json }) => {
            let devices = if store.may_exist() {
                store.open()?.devices()?
            } else {
                Vec::new()
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                println!(
                    "{:<24} {:<8} {:>10} {:>8} GROUPS",
                    "ID", "ONLINE", "ACKED", "LAG"
                );
                let num = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
                for d in &devices {
                    let online = match d.online {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "-",
                    };
                    let groups: Vec<&str> = d.groups.iter().map(GroupId::as_str).collect();
                    println!(
                        "{:<24} {:<8} {:>10} {:>8} {}",
                        d.id,
                        online,
                        num(d.acked_seq),
                        num(d.audit_lag),
                        groups.join(",")
                    );
                }
            }
        }
        Command::BrokerConfig(a) => {
            let devices = if store.may_exist() {
                store.open()?.devices()?
            } else {
                Vec::new()
            };
            let settings = broker::BrokerSettings {
                port: a.port,
                bind: a.bind,
                user: a.user,
            };
            match a.broker {
                BrokerKind::Mosquitto => {
                    broker::write(&a.pki, &a.out, &settings, &devices)?;
                    println!(
                        "wrote {0}/mosquitto.conf and {0}/acl ({1} devices)",
                        a.out.display(),
                        devices.len()
                    );
                }
                BrokerKind::Rabbitmq => {
                    if settings.user.is_some() {
                        anyhow::bail!("--user is Mosquitto's; RabbitMQ runs as its own user");
                    }
                    rabbitmq::write(&a.pki, &a.out, &settings, &devices)?;
                    println!(
                        "wrote {0}/rabbitmq.conf, {0}/definitions.json and {0}/enabled_plugins \
                         ({1} devices); on a running node: rabbitmqctl import_definitions \
                         {0}/definitions.json. Hubs on RabbitMQ need [hub] \
                         shared_subscriptions = false, and only one may serve.",
                        a.out.display(),
                        devices.len()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost-hub audit …`: reads `hub.db` read-only; output as the device's `outpost audit`.
fn audit_command(cmd: AuditCommand, store: &StoreConfig) -> anyhow::Result<ExitCode> {
    let open = |device: &DeviceArg| -> anyhow::Result<(Box<dyn Store>, DeviceId)> {
        let id = DeviceId::new(&device.id)?;
        Ok((store.open_read_only()?, id))
    };
    match cmd {
        AuditCommand::Query {
            device,
            range,
            actor,
            action,
            outcome,
            limit,
            json,
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
            let (store, id) = open(&device)?;
            let chain = DeviceChain::open(store.as_ref(), &id)?;
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            if json {
                // The device's one pretty JSON array, streamed element by element.
                use serde::ser::{SerializeSeq, Serializer as _};
                let mut ser = serde_json::Serializer::pretty(&mut w);
                let mut seq = ser.serialize_seq(None)?;
                chain.for_each(&q, |r| {
                    seq.serialize_element(&r).map_err(|e| stdout_err(e.into()))
                })?;
                seq.end()?;
                writeln!(w)?;
            } else {
                chain.for_each(&q, |r| {
                    writeln!(w, "{}", r.summary_line()).map_err(stdout_err)
                })?;
            }
            w.flush()?;
        }
        AuditCommand::Export {
            device,
            range,
            format,
            output,
        } => {
            let format = match format {
                ExportFormat::Jsonl => Format::Jsonl,
                ExportFormat::Csv => Format::Csv,
            };
            let q = time_range(&range)?;
            let (store, id) = open(&device)?;
            let chain = DeviceChain::open(store.as_ref(), &id)?;
            match &output {
                Some(path) => {
                    let n = chain.export_to_file(&q, format, path)?;
                    eprintln!("Exported {n} records to {}.", path.display());
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    chain.export(&q, format, &mut w)?;
                }
            }
        }
        AuditCommand::Verify { device, json } => {
            let (store, id) = open(&device)?;
            let report = DeviceChain::open(store.as_ref(), &id)?.verify()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.summary());
            }
            return Ok(if report.chain.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost-hub migrate`: SQLite to PostgreSQL, then every chain verified there.
fn migrate(from: &str, to: &str, json: bool) -> anyhow::Result<ExitCode> {
    let from = StoreConfig::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let to = StoreConfig::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let (StoreConfig::Sqlite(dir), StoreConfig::Postgres(url)) = (&from, &to) else {
        anyhow::bail!("migrate copies from sqlite:PATH to postgres://… only");
    };
    let report = outpost_sync::hub::store::pg::migrate::sqlite_to_postgres(dir, url)
        .with_context(|| format!("migrating {} to {}", from.describe(), to.describe()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (table, rows) in &report.tables {
            println!("copied {rows} rows of {table}");
        }
        for d in &report.devices {
            println!("{}: {}", d.device, d.chain.summary());
        }
        println!(
            "{}: {} devices, every chain {}",
            to.describe(),
            report.devices.len(),
            if report.ok() {
                "verifies"
            } else {
                "NOT verifying"
            }
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `outpost-hub models publish`.
fn models_command(cmd: ModelsCommand, data_dir: &Path, store: &StoreConfig) -> anyhow::Result<()> {
    let ModelsCommand::Publish {
        file,
        name,
        version,
        key,
        kid,
        expires,
        chunk_size,
    } = cmd;
    let req = rollout::PublishRequest {
        file,
        name,
        version,
        key,
        kid,
        expires_in_secs: parse_duration(&expires).context("--expires")?,
        chunk_size,
        actor: local_actor(),
    };
    let manifest = rollout::publish(data_dir, store, &req)
        .with_context(|| format!("publishing {}:{}", req.name, req.version))?;
    println!("{}", serde_json::to_string_pretty(&manifest)?);
    Ok(())
}

/// `outpost-hub rollout start|status|halt|resume`.
fn rollout_command(
    cmd: RolloutCommand,
    data_dir: &Path,
    store: &StoreConfig,
) -> anyhow::Result<ExitCode> {
    match cmd {
        RolloutCommand::Start {
            model,
            target,
            key,
            kid,
            alias,
            activate,
            batch,
            max_failures,
            expires,
        } => {
            let req = rollout::RolloutRequest {
                model,
                target: Target::parse(&target).context("--target")?,
                key,
                kid,
                alias,
                activate,
                batch_percent: batch,
                max_failures,
                expires_in_secs: parse_duration(&expires).context("--expires")?,
                actor: local_actor(),
            };
            let id = rollout::start(data_dir, store, &req)
                .with_context(|| format!("starting the rollout of {}", req.model))?;
            println!("{}", serde_json::json!({ "rollout": id }));
        }
        RolloutCommand::Status { id, json } => {
            let report = if store.may_exist() {
                rollout::status(store.open_read_only()?.as_ref(), id)?
            } else if let Some(id) = id {
                anyhow::bail!("no rollout {id} on this hub (no hub store here)");
            } else {
                rollout::StatusReport {
                    rollouts: Vec::new(),
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.rollouts.is_empty() {
                println!("no rollouts");
            } else {
                for r in &report.rollouts {
                    let phased = if r.batches > 1 {
                        format!(" (batch {} of {} released)", r.released_batches, r.batches)
                    } else {
                        String::new()
                    };
                    println!(
                        "rollout {} {} -> {}: {}{phased}",
                        r.id, r.model, r.target, r.state
                    );
                    for d in &r.devices {
                        println!(
                            "  {:<24} {:<12} {:>4.0}%  chunks {:<6} {}",
                            d.id,
                            d.state,
                            d.progress * 100.0,
                            d.chunks_requested,
                            d.reason.as_deref().unwrap_or("")
                        );
                    }
                }
            }
        }
        RolloutCommand::Halt { id } => {
            rollout::set_state(data_dir, store, id, true, &local_actor())?;
            println!("rollout {id} halted");
        }
        RolloutCommand::Resume { id } => {
            rollout::set_state(data_dir, store, id, false, &local_actor())?;
            println!("rollout {id} running");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stdout_err(source: std::io::Error) -> HubError {
    HubError::Io {
        what: "writing",
        path: "standard output".into(),
        source,
    }
}

fn time_range(r: &TimeRange) -> anyhow::Result<Query> {
    Ok(Query {
        since: r.since.as_deref().map(parse_time).transpose()?,
        until: r.until.as_deref().map(parse_time).transpose()?,
        ..Query::default()
    })
}

/// `local:<user>` for whoever runs the command: `$USER`, else the uid.
fn local_actor() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::env::var("USER") {
        Ok(u) if !u.is_empty() && u.len() <= 64 => format!("local:{u}"),
        _ => match std::fs::metadata("/proc/self") {
            Ok(m) => format!("local:uid-{}", m.uid()),
            Err(_) => "local:unknown".into(),
        },
    }
}
