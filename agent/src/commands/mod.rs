//! Dispatch of the subcommands, and the output conventions they share.

pub(crate) mod audit;
mod auth;
mod bench;
mod generate;
mod models;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use outpost_policy::audit::{AuditLog, AuditSettings, Entry, Outcome};
use outpost_policy::identity::{PinnedKey, Verifier};
use outpost_policy::rbac::Policy;
use outpost_policy::revocation::RevocationList;
use outpost_policy::signing::KeyPair;
use outpost_policy::time::TrustedClock;

use crate::cli::{Cli, Command, ConfigCommand};
use crate::config::{self, ConfigError, Loaded};

/// What every command gets: the validated configuration and the global flags.
pub struct Context {
    pub loaded: Loaded,
    pub json: bool,
    data_dir_flag: Option<PathBuf>,
    config_flag: Option<PathBuf>,
}

impl Context {
    /// Flag or `OUTPOST_DATA_DIR`, else `[device] data_dir`, else the default.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_flag
            .clone()
            .or_else(|| self.loaded.config.device.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR))
    }

    /// The `--config` given, for child processes.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_flag.as_deref()
    }

    /// `[device] id`, else the host name (made a valid id), else `unknown-device`.
    pub fn device_id(&self) -> String {
        if let Some(id) = &self.loaded.config.device.id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let id: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if id.is_empty() {
            "unknown-device".into()
        } else {
            id
        }
    }

    /// The audiences a token must name one of: the device id and its groups.
    pub fn audiences(&self) -> Vec<String> {
        let mut v = vec![self.device_id()];
        v.extend(self.loaded.config.device.groups.iter().cloned());
        v
    }

    /// Where the device key lives: `[device] key`, else `<data>/device.key`.
    pub fn device_key_path(&self) -> PathBuf {
        self.loaded
            .config
            .device
            .key
            .clone()
            .unwrap_or_else(|| self.data_dir().join("device.key"))
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data_dir().join("audit.db")
    }

    /// The audit log, for appending (creates the data dir, the log and the device key).
    /// Fails early, and clearly, when the data directory cannot take a write: every
    /// privileged action needs its record, so none happens then.
    pub fn open_audit(&self) -> anyhow::Result<AuditLog> {
        let data = self.data_dir();
        std::fs::create_dir_all(&data)
            .with_context(|| format!("cannot create the data directory {}", data.display()))?;
        probe_writable(&data).with_context(|| {
            format!(
                "refusing to act: the data directory {} cannot take a write",
                data.display()
            )
        })?;
        let key_path = self.device_key_path();
        let key = KeyPair::load_or_generate(&key_path)?;
        let mut settings = AuditSettings::new(&self.device_id());
        let audit = &self.loaded.config.audit;
        if let Some(n) = audit.checkpoint_every {
            settings.checkpoint_every = n;
        }
        if let Some(s) = audit.checkpoint_interval_secs {
            settings.checkpoint_interval = Duration::from_secs(s);
        }
        Ok(AuditLog::open(&self.audit_path(), key, settings)?)
    }

    /// The token verifier and the policy, from `[auth]`. Problems are configuration errors.
    pub fn auth(&self) -> Result<(Verifier, Policy), ConfigError> {
        let auth = &self.loaded.config.auth;
        let bad = |message: String| ConfigError {
            file: self.loaded.files.last().cloned(),
            line: None,
            message,
        };
        let mut keys = Vec::new();
        for i in &auth.issuers {
            keys.push(
                PinnedKey::load(&i.iss, &i.kid, i.algorithm, &i.public_key)
                    .map_err(|e| bad(format!("key `auth.issuers` (kid {}): {e}", i.kid)))?,
            );
        }
        let mut verifier = Verifier::new(keys, self.audiences(), auth.leeway_secs);
        if let Some(p) = &auth.revoked {
            verifier.revoked =
                RevocationList::load(p).map_err(|e| bad(format!("key `auth.revoked`: {e}")))?;
        }
        let policy = match &auth.policy {
            Some(p) => Policy::load(p).map_err(|e| bad(format!("key `auth.policy`: {e}")))?,
            None => Policy::builtin(),
        };
        Ok((verifier, policy))
    }

    /// The trusted clock, its floor kept in `<data>/trusted-time`.
    pub fn clock(&self) -> TrustedClock {
        TrustedClock::open(&self.data_dir().join("trusted-time"))
    }
}

/// Writes (and removes) 64 KiB in `dir`: a read-only or full disk shows here, with its own
/// error, instead of as a SQLite I/O error halfway through an action.
pub(crate) fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = tempfile::tempfile_in(dir)?;
    f.write_all(&[0u8; 64 * 1024])?;
    f.flush()
}

/// `local:<user>` for whoever runs the CLI.
pub fn local_actor() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
        })
    });
    format!("local:{}", name.unwrap_or(format!("uid-{uid}")))
}

/// Runs a privileged local action under the audit log: the intent is recorded durably
/// before anything changes (no record, no action), and the outcome after.
pub fn audited<T>(
    audit: &AuditLog,
    action: &str,
    resource: Option<&str>,
    details: serde_json::Value,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let actor = local_actor();
    let mut intent = Entry::new(&actor, action, Outcome::Allowed, "local command line");
    intent.resource = resource.map(str::to_string);
    intent.details = details;
    audit
        .append(intent.clone())
        .context("refusing to act without an audit record")?;
    let result = f();
    let mut outcome = intent;
    match &result {
        Ok(_) => {
            outcome.outcome = Outcome::Success;
            outcome.reason = "done".into();
        }
        Err(e) => {
            outcome.outcome = Outcome::Failure;
            outcome.reason = format!("{e:#}");
        }
    }
    if let Err(e) = audit.append(outcome) {
        eprintln!("warning: the outcome could not be recorded in the audit log: {e}");
    }
    result
}

pub fn run(cli: Cli, loaded: Loaded) -> anyhow::Result<ExitCode> {
    let ctx = Context {
        loaded,
        json: cli.json,
        data_dir_flag: cli.data_dir,
        config_flag: cli.config,
    };
    match cli.command {
        Command::Config(ConfigCommand::Check) => config_check(&ctx),
        Command::Models(cmd) => models::run(&ctx, cmd),
        Command::Generate(args) => generate::run(&ctx, args),
        Command::Bench(args) => bench::run(&ctx, args),
        Command::Keys(cmd) => auth::keys(&ctx, cmd),
        Command::Token(cmd) => auth::token(&ctx, cmd),
        Command::Auth(cmd) => auth::check(&ctx, cmd),
        Command::Audit(cmd) => audit::run(&ctx, cmd),
        Command::Daemon => crate::daemon::run(&ctx),
    }
}

fn config_check(ctx: &Context) -> anyhow::Result<ExitCode> {
    // Key files, the revocation list and the policy document must load too.
    ctx.auth()?;
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

/// Seconds in `90s`, `30m`, `2h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not a duration like 90s, 30m, 2h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("'{s}' is not a duration like 90s, 30m, 2h or 7d"),
    };
    n.checked_mul(mult)
        .filter(|&v| v <= 100 * 365 * 86_400)
        .ok_or_else(|| anyhow::anyhow!("'{s}' is too long"))
}
