//! Configuration: `/etc/outpost/outpost.toml` plus `config.d/*.toml` beside it.
//!
//! Files are read in order (the main file, then `config.d/` sorted by name); a later file
//! overrides the keys it sets, table by table. Each file is first checked on its own against
//! the same types, so an unknown key or a wrong type is reported with the file and line that
//! hold it; the merged result is then validated (device id syntax, …), naming the file that
//! set the offending key. The daemon and `outpost config check` share these types.
//! Flags and environment (`--data-dir`, `OUTPOST_DATA_DIR`) override the files, in `main`.

use std::fmt;
use std::path::{Path, PathBuf};

use outpost_sync::ConnError;
use outpost_sync::conn::{Broker, LinkConfig, publish_packet_len};
use outpost_sync::protocol::{DeviceId, DeviceTopic, device_topic};
use serde::{Deserialize, Serialize};

/// Where the configuration lives when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/outpost/outpost.toml";
/// Where the data lives when neither flag, environment nor config says.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost";
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[sync]`: the link to the fleet hub; without it the agent works offline only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncConfig>,
}

/// `[sync]`: the broker link and what goes over it. Values are checked by [`load`]; the
/// files (readable, key matching certificate, CN equal to `[device] id`) by
/// `Context::sync_link`, which `config check` and the daemon run before acting.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// `mqtts://host[:port]`, or `mqtt://host[:port]` only with `allow_plaintext`.
    /// Required; a default here only lets a drop-in set other `[sync]` keys on its own.
    #[serde(default)]
    pub broker: String,
    /// The CA that signed the broker's certificate (the only trusted root), PEM.
    pub ca: Option<PathBuf>,
    /// The device's certificate (CN = `[device] id`), PEM.
    pub cert: Option<PathBuf>,
    /// The device's private key, PEM.
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Most audit records in one batch.
    #[serde(default = "default_batch_records")]
    pub batch_max_records: usize,
    /// Largest audit batch payload, in bytes.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    /// Seconds between telemetry snapshots.
    #[serde(default = "default_telemetry_interval")]
    pub telemetry_interval_secs: u64,
    /// Bytes of telemetry queued while offline; the oldest snapshots go first.
    #[serde(default = "default_telemetry_quota")]
    pub telemetry_quota_bytes: u64,
    /// Model downloads: chunk requests in flight at once.
    #[serde(default = "default_transfer_window")]
    pub transfer_window: usize,
    /// Model downloads: seconds before an unanswered chunk request is sent again.
    #[serde(default = "default_transfer_timeout")]
    pub transfer_chunk_timeout_secs: u64,
    /// `[[sync.release_keys]]`: the administrators' keys that desired states and model
    /// manifests must be signed with (none: every desired state is refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_keys: Vec<ReleaseKey>,
}

/// One `[[sync.release_keys]]` entry: a key id and its Ed25519 public key (SPKI PEM, as
/// `outpost keys generate` writes `NAME.pub.pem`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseKey {
    pub kid: String,
    pub public_key: PathBuf,
}

fn default_batch_records() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    131_072
}
fn default_telemetry_interval() -> u64 {
    60
}
fn default_telemetry_quota() -> u64 {
    8 << 20
}
fn default_transfer_window() -> usize {
    16
}
fn default_transfer_timeout() -> u64 {
    10
}

impl SyncConfig {
    /// The link's settings, unchecked (the client id is `[device] id`).
    pub fn link(&self, client_id: DeviceId) -> LinkConfig {
        let mut link = LinkConfig::new(self.broker.clone(), client_id);
        link.ca = self.ca.clone();
        link.cert = self.cert.clone();
        link.key = self.key.clone();
        link.allow_plaintext = self.allow_plaintext;
        link
    }
}

/// The `[sync]` key a link error concerns.
pub fn sync_key(e: &ConnError) -> &'static str {
    match e {
        ConnError::BrokerUrl { .. } | ConnError::PlaintextRefused { .. } => "broker",
        ConnError::MissingFile { what, .. }
        | ConnError::Read { what, .. }
        | ConnError::Pem { what, .. } => match *what {
            "ca" => "ca",
            "key" => "key",
            _ => "cert",
        },
        ConnError::KeyMismatch { .. } => "key",
        _ => "cert",
    }
}

/// `[log]`: the daemon's and the commands' diagnostic logs (`tracing` events on stderr).
/// What commands print for people (results, tables, `--json`) is not a log.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a filter such as
    /// `info,outpost_agent=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` (one line per event; no timestamps under journald, which adds its own) or
    /// `json` (one object per line).
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

/// `[api]`: the daemon's local HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port`, or a Unix socket: an absolute path or `unix:<path>`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Inference requests that may wait for the engine; more get 503 with Retry-After.
    #[serde(default = "default_queue")]
    pub queue_length: usize,
    /// Largest request body accepted.
    #[serde(default = "default_body")]
    pub max_body: ByteSize,
    /// How long in-flight requests may run on after SIGTERM before they are cancelled.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Serve `/metrics` without a token (for a local scraper).
    #[serde(default)]
    pub metrics_public: bool,
    /// Connections served at once; more wait until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    64
}

fn default_listen() -> String {
    "127.0.0.1:8480".into()
}
fn default_queue() -> usize {
    4
}
fn default_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_grace() -> u64 {
    30
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            queue_length: default_queue(),
            max_body: default_body(),
            shutdown_grace_secs: default_grace(),
            metrics_public: false,
            max_connections: default_max_connections(),
        }
    }
}

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl ApiConfig {
    pub fn listen_on(&self) -> Result<Listen, String> {
        let l = self.listen.trim();
        if let Some(p) = l.strip_prefix("unix:") {
            return if p.starts_with('/') {
                Ok(Listen::Unix(p.into()))
            } else {
                Err(format!("'{l}': a Unix socket needs an absolute path"))
            };
        }
        if l.starts_with('/') {
            return Ok(Listen::Unix(l.into()));
        }
        l.parse().map(Listen::Tcp).map_err(|_| {
            format!("'{l}' is not host:port (e.g. 127.0.0.1:8480) or a Unix socket path")
        })
    }
}

/// `[device]`: who this device is and where its data lives.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device's identity in the fleet: `[A-Za-z0-9._-]{1,64}`.
    pub id: Option<String>,
    /// Fleet groups this device belongs to (same syntax as the id).
    #[serde(default)]
    pub groups: Vec<String>,
    /// The data directory (registry, blobs, audit log, outbox).
    pub data_dir: Option<PathBuf>,
    /// The device's Ed25519 key (PKCS#8 PEM) that signs audit checkpoints; default
    /// `<data>/device.key`, generated on first use with mode 0600.
    pub key: Option<PathBuf>,
}

/// `[auth]`: who may call this device.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (at most 3600).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Revoked token ids and subjects: `{"jti": [...], "sub": [...]}`.
    pub revoked: Option<PathBuf>,
    /// Custom roles (a versioned TOML policy document).
    pub policy: Option<PathBuf>,
    /// The keys tokens may be signed with, each pinned to one issuer and algorithm.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
}

fn default_leeway() -> u64 {
    60
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            leeway_secs: default_leeway(),
            revoked: None,
            policy: None,
            issuers: Vec::new(),
        }
    }
}

/// `[[auth.issuers]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub iss: String,
    pub kid: String,
    pub algorithm: outpost_policy::identity::KeyAlgorithm,
    /// PEM public key (SPKI).
    pub public_key: PathBuf,
}

/// `[audit]`: when checkpoints are signed.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Sign a checkpoint every this many records (default 1000).
    pub checkpoint_every: Option<u64>,
    /// …and at least this often while records arrive, in seconds (default 300).
    pub checkpoint_interval_secs: Option<u64>,
}

/// `[engine]`: how models run.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Threads per generation; default: the number of cores.
    pub threads: Option<usize>,
    /// Refuse models whose estimated footprint exceeds this (`"1.5GiB"`, `"800MB"`, or bytes).
    pub memory_budget: Option<ByteSize>,
    /// Context window to allocate; default: the model's own.
    pub context_length: Option<u32>,
}

/// A byte count written as an integer or with a unit (`KB`, `MiB`, `GiB`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u64")]
pub struct ByteSize(pub u64);

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size like 512MiB or 2GB"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown unit '{u}' in '{s}' (use B, KB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!("'{s}' is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(0) => Err(serde::de::Error::custom("a size must be above 0")),
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A configuration error: which file, where, what. Exits 78 (EX_CONFIG).
#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(p), Some(l)) => write!(f, "config {}:{l}: {}", p.display(), self.message),
            (Some(p), None) => write!(f, "config {}: {}", p.display(), self.message),
            (None, _) => write!(f, "config: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A validated configuration and the files it came from.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub config: Config,
    pub files: Vec<PathBuf>,
    /// Each file's own table, to name the file that set a key checked later.
    sources: Vec<Source>,
}

impl Loaded {
    /// A configuration error about `section.key`, naming the last file that set it.
    pub fn error(&self, section: &str, key: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: origin(&self.sources, section, key).or_else(|| self.files.last().cloned()),
            line: None,
            message: format!("key `{section}.{key}`: {message}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    table: toml::Table,
}

/// Reads and validates the configuration. `explicit` is the `--config` path; when it is
/// `None`, a missing default file simply means "all defaults".
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let main = explicit.map_or_else(|| PathBuf::from(DEFAULT_CONFIG), Path::to_path_buf);
    let mut paths = Vec::new();
    match std::fs::metadata(&main) {
        Ok(_) => paths.push(main.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
        Err(e) => {
            return Err(ConfigError {
                file: Some(main),
                line: None,
                message: format!("cannot read: {e}"),
            });
        }
    }
    let dropins = main
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d");
    if let Ok(entries) = std::fs::read_dir(&dropins) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        found.sort();
        paths.extend(found);
    }

    let mut sources = Vec::new();
    for path in paths {
        sources.push(read_source(path)?);
    }
    let mut merged = toml::Table::new();
    for s in &sources {
        merge(&mut merged, s.table.clone());
    }
    let config: Config = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError {
            file: None,
            line: None,
            message: e.message().to_string(),
        })?;
    validate(&config, &sources)?;
    Ok(Loaded {
        config,
        files: sources.iter().map(|s| s.path.clone()).collect(),
        sources,
    })
}

fn read_source(path: PathBuf) -> Result<Source, ConfigError> {
    let err = |line, message| ConfigError {
        file: Some(path.clone()),
        line,
        message,
    };
    let meta = std::fs::metadata(&path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(err(
            None,
            format!(
                "file is {} bytes, above the limit of {MAX_CONFIG_BYTES}",
                meta.len()
            ),
        ));
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    let located = |e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let key = e
            .span()
            .and_then(|s| key_at(&text, s.start))
            .map(|k| format!("key `{k}`: "))
            .unwrap_or_default();
        err(line, format!("{key}{}", e.message().trim()))
    };
    let table: toml::Table = text.parse().map_err(located)?;
    // Check this file alone against the types, so errors point into it.
    toml::from_str::<Config>(&text).map_err(located)?;
    Ok(Source { path, table })
}

/// The dotted key of the line holding byte `at`: the nearest `[section]` above plus the
/// name left of `=` on that line.
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') && line.ends_with(']') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let section = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let name = line.split_once('=').map(|(k, _)| k.trim().to_string());
    match (section, name) {
        (Some(s), Some(n)) => Some(format!("{s}.{n}")),
        (None, Some(n)) => Some(n),
        (Some(s), None) => Some(s),
        (None, None) => None,
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The last file that sets `section.key`.
fn origin(sources: &[Source], section: &str, key: &str) -> Option<PathBuf> {
    sources
        .iter()
        .rev()
        .find(|s| {
            s.table
                .get(section)
                .and_then(toml::Value::as_table)
                .is_some_and(|t| t.contains_key(key))
        })
        .map(|s| s.path.clone())
}

/// Whether `s` is a valid device id or group name: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn validate(c: &Config, sources: &[Source]) -> Result<(), ConfigError> {
    let fail = |section: &str, key: &str, message: String| ConfigError {
        file: origin(sources, section, key),
        line: None,
        message: format!("key `{section}.{key}`: {message}"),
    };
    if let Some(id) = &c.device.id
        && !valid_id(id)
    {
        return Err(fail(
            "device",
            "id",
            format!("'{id}' is not a valid device id (1 to 64 of A-Z a-z 0-9 . _ -)"),
        ));
    }
    for g in &c.device.groups {
        if !valid_id(g) {
            return Err(fail(
                "device",
                "groups",
                format!("'{g}' is not a valid group name (1 to 64 of A-Z a-z 0-9 . _ -)"),
            ));
        }
    }
    if let Some(d) = &c.device.data_dir
        && !d.is_absolute()
    {
        return Err(fail(
            "device",
            "data_dir",
            format!("'{}' must be an absolute path", d.display()),
        ));
    }
    if c.engine.threads == Some(0) || c.engine.threads.is_some_and(|t| t > 1024) {
        return Err(fail(
            "engine",
            "threads",
            "must be between 1 and 1024".into(),
        ));
    }
    if c.engine.context_length == Some(0) {
        return Err(fail("engine", "context_length", "must be above 0".into()));
    }
    if let Err(e) = crate::logging::parse_filter(&c.log.level) {
        return Err(fail("log", "level", e));
    }
    if c.auth.leeway_secs > 3600 {
        return Err(fail("auth", "leeway_secs", "must be at most 3600".into()));
    }
    let mut kids = std::collections::HashSet::new();
    for i in &c.auth.issuers {
        if !valid_id(&i.kid) {
            return Err(fail(
                "auth",
                "issuers",
                format!("kid '{}' must be 1 to 64 of A-Z a-z 0-9 . _ -", i.kid),
            ));
        }
        if i.iss.is_empty() || i.iss.len() > 256 {
            return Err(fail(
                "auth",
                "issuers",
                format!("kid '{}': iss must be 1 to 256 characters", i.kid),
            ));
        }
        if !kids.insert(&i.kid) {
            return Err(fail(
                "auth",
                "issuers",
                format!("kid '{}' is configured twice", i.kid),
            ));
        }
    }
    if let Err(m) = c.api.listen_on() {
        return Err(fail("api", "listen", m));
    }
    if !(1..=1024).contains(&c.api.queue_length) {
        return Err(fail(
            "api",
            "queue_length",
            "must be between 1 and 1024".into(),
        ));
    }
    if c.api.max_body.0 < 1024 || c.api.max_body.0 > 64 << 20 {
        return Err(fail(
            "api",
            "max_body",
            "must be between 1KiB and 64MiB".into(),
        ));
    }
    if !(1..=65_536).contains(&c.api.max_connections) {
        return Err(fail(
            "api",
            "max_connections",
            "must be between 1 and 65536".into(),
        ));
    }
    if c.api.shutdown_grace_secs > 3600 {
        return Err(fail(
            "api",
            "shutdown_grace_secs",
            "must be at most 3600".into(),
        ));
    }
    if c.audit.checkpoint_every == Some(0) {
        return Err(fail("audit", "checkpoint_every", "must be above 0".into()));
    }
    if c.audit.checkpoint_interval_secs == Some(0) {
        return Err(fail(
            "audit",
            "checkpoint_interval_secs",
            "must be above 0".into(),
        ));
    }
    if let Some(s) = &c.sync {
        validate_sync(s, c.device.id.as_deref(), sources)?;
    }
    Ok(())
}

/// The last file with a `[sync]` section.
fn sync_origin(sources: &[Source]) -> Option<PathBuf> {
    sources
        .iter()
        .rev()
        .find(|s| s.table.contains_key("sync"))
        .map(|s| s.path.clone())
}

/// `[sync]`'s values (its files are checked by `Context::sync_link`).
fn validate_sync(
    s: &SyncConfig,
    device_id: Option<&str>,
    sources: &[Source],
) -> Result<(), ConfigError> {
    let fail = |section: &str, key: &str, message: String| ConfigError {
        file: origin(sources, section, key),
        line: None,
        message: format!("key `{section}.{key}`: {message}"),
    };
    let Some(id) = device_id.and_then(|id| DeviceId::new(id).ok()) else {
        return Err(ConfigError {
            file: sync_origin(sources),
            line: None,
            message: "key `device.id`: a [sync] section needs it (the MQTT client id, and \
                      the certificate's CN)"
                .into(),
        });
    };
    if s.broker.is_empty() {
        return Err(ConfigError {
            file: origin(sources, "sync", "broker").or_else(|| sync_origin(sources)),
            line: None,
            message: "key `sync.broker`: must be set (mqtts://host[:port])".into(),
        });
    }
    let broker = Broker::parse(&s.broker).map_err(|e| fail("sync", "broker", e.to_string()))?;
    if !broker.tls && !s.allow_plaintext {
        return Err(fail(
            "sync",
            "broker",
            format!(
                "'{}' is plaintext MQTT; use mqtts:// or set allow_plaintext = true",
                s.broker
            ),
        ));
    }
    if broker.tls {
        for (key, path) in [("ca", &s.ca), ("cert", &s.cert), ("key", &s.key)] {
            if path.is_none() {
                return Err(fail(
                    "sync",
                    key,
                    format!("a TLS broker ({}) needs it (a PEM file)", s.broker),
                ));
            }
        }
    }
    if !(1..=100_000).contains(&s.batch_max_records) {
        return Err(fail(
            "sync",
            "batch_max_records",
            "must be between 1 and 100000".into(),
        ));
    }
    let max_packet = s.link(id.clone()).max_packet_size;
    let topic = device_topic(&id, DeviceTopic::Audit);
    if s.batch_max_bytes < 1024 || publish_packet_len(&topic, s.batch_max_bytes) > max_packet {
        return Err(fail(
            "sync",
            "batch_max_bytes",
            format!(
                "must be at least 1024 and fit the link's packets of {max_packet} bytes \
                 (at most {} here)",
                max_packet - (publish_packet_len(&topic, max_packet) - max_packet)
            ),
        ));
    }
    if !(1..=86_400).contains(&s.telemetry_interval_secs) {
        return Err(fail(
            "sync",
            "telemetry_interval_secs",
            "must be between 1 and 86400".into(),
        ));
    }
    if !(1024..=1 << 30).contains(&s.telemetry_quota_bytes) {
        return Err(fail(
            "sync",
            "telemetry_quota_bytes",
            "must be between 1024 and 1073741824".into(),
        ));
    }
    if !(1..=256).contains(&s.transfer_window) {
        return Err(fail(
            "sync",
            "transfer_window",
            "must be between 1 and 256".into(),
        ));
    }
    if !(1..=600).contains(&s.transfer_chunk_timeout_secs) {
        return Err(fail(
            "sync",
            "transfer_chunk_timeout_secs",
            "must be between 1 and 600".into(),
        ));
    }
    let mut kids = std::collections::BTreeSet::new();
    for k in &s.release_keys {
        if !valid_id(&k.kid) {
            return Err(fail(
                "sync",
                "release_keys",
                format!("kid '{}' must be 1 to 64 of A-Z a-z 0-9 . _ -", k.kid),
            ));
        }
        if !kids.insert(k.kid.as_str()) {
            return Err(fail(
                "sync",
                "release_keys",
                format!("kid '{}' is listed twice", k.kid),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one helper: write `files` (name, text) into a temp dir, load `outpost.toml` from it
    /// and compare `Ok(debug of the config)` or the error text with `expect` (substring).
    fn check(files: &[(&str, &str)], expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let main = dir.path().join("outpost.toml");
        let got = match load(Some(&main)) {
            Ok(l) => format!("{:?}", l.config),
            Err(e) => e
                .to_string()
                .replace(&dir.path().display().to_string(), "DIR"),
        };
        assert!(got.contains(expect), "expected {expect:?} in {got:?}");
    }

    #[test]
    fn a_full_config_loads() {
        check(
            &[(
                "outpost.toml",
                "[device]\nid = \"edge-7\"\ngroups = [\"lab\", \"eu-west\"]\n\
                 data_dir = \"/srv/outpost\"\n[engine]\nthreads = 2\nmemory_budget = \"1.5GiB\"\n",
            )],
            "id: Some(\"edge-7\"), groups: [\"lab\", \"eu-west\"], data_dir: Some(\"/srv/outpost\")",
        );
        check(
            &[("outpost.toml", "[engine]\nmemory_budget = \"1.5GiB\"\n")],
            "memory_budget: Some(ByteSize(1610612736))",
        );
        check(&[("outpost.toml", "")], "id: None");
    }

    #[test]
    fn dropins_override_in_name_order() {
        check(
            &[
                ("outpost.toml", "[device]\nid = \"a\"\ngroups = [\"g\"]\n"),
                ("config.d/20-id.toml", "[device]\nid = \"c\"\n"),
                ("config.d/10-id.toml", "[device]\nid = \"b\"\n"),
                ("config.d/ignored.txt", "this is not toml"),
            ],
            "id: Some(\"c\"), groups: [\"g\"]",
        );
    }

    #[test]
    fn unknown_keys_name_the_key_the_file_and_the_line() {
        check(
            &[("outpost.toml", "[device]\nid = \"a\"\nidd = \"b\"\n")],
            "config DIR/outpost.toml:3: key `device.idd`: unknown field `idd`",
        );
        check(
            &[
                ("outpost.toml", "[device]\nid = \"a\"\n"),
                ("config.d/x.toml", "[telemetry]\non = true\n"),
            ],
            "config DIR/config.d/x.toml:1: key `telemetry`: unknown field `telemetry`",
        );
    }

    #[test]
    fn wrong_types_and_syntax_are_located() {
        check(
            &[("outpost.toml", "[device]\ngroups = \"lab\"\n")],
            "outpost.toml:2: key `device.groups`: invalid type: string \"lab\", expected a sequence",
        );
        check(&[("outpost.toml", "[device\n")], "outpost.toml:1:");
        check(
            &[("outpost.toml", "[engine]\nmemory_budget = \"lots\"\n")],
            "key `engine.memory_budget`: 'lots' is not a size",
        );
    }

    #[test]
    fn invalid_values_name_the_file_that_set_them() {
        check(
            &[
                ("outpost.toml", "[device]\nid = \"ok\"\n"),
                ("config.d/50.toml", "[device]\nid = \"no spaces\"\n"),
            ],
            "config DIR/config.d/50.toml: key `device.id`: 'no spaces' is not a valid device id",
        );
        check(
            &[(
                "outpost.toml",
                &format!("[device]\nid = \"{}\"\n", "x".repeat(65)),
            )],
            "is not a valid device id",
        );
        check(
            &[("outpost.toml", "[device]\ngroups = [\"a/b\"]\n")],
            "key `device.groups`: 'a/b' is not a valid group name",
        );
        check(
            &[("outpost.toml", "[device]\ndata_dir = \"relative\"\n")],
            "must be an absolute path",
        );
        check(
            &[("outpost.toml", "[engine]\nthreads = 0\n")],
            "key `engine.threads`",
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../../deploy/config/outpost.toml");
        let uncommented: String = example
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = ") || r.starts_with("[["))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        check(&[("outpost.toml", example)], "id: None");
        check(&[("outpost.toml", &uncommented)], "id: Some(\"edge-0042\")");
        check(&[("outpost.toml", &uncommented)], "kid: \"admin-1\"");
    }

    #[test]
    fn auth_issuers_are_checked() {
        let issuer = |kid: &str, alg: &str| {
            format!(
                "[[auth.issuers]]\niss = \"https://admin.example\"\nkid = \"{kid}\"\n\
                 algorithm = \"{alg}\"\npublic_key = \"/etc/outpost/keys/{kid}.pub.pem\"\n"
            )
        };
        check(
            &[("outpost.toml", &issuer("admin-1", "EdDSA"))],
            "algorithm: EdDSA",
        );
        check(
            &[("outpost.toml", &issuer("admin-1", "HS256"))],
            "unknown variant `HS256`, expected `EdDSA` or `ES256`",
        );
        check(
            &[("outpost.toml", &issuer("a/b", "EdDSA"))],
            "kid 'a/b' must be",
        );
        let twice = format!("{}{}", issuer("k", "EdDSA"), issuer("k", "ES256"));
        check(&[("outpost.toml", &twice)], "kid 'k' is configured twice");
        check(
            &[("outpost.toml", "[auth]\nleeway_secs = 86400\n")],
            "key `auth.leeway_secs`",
        );
    }

    #[test]
    fn sync_values_are_checked() {
        let sync = |extra: &str| {
            format!(
                "[device]\nid = \"edge-01\"\n[sync]\nbroker = \"mqtts://hub.example:8883\"\n\
                 ca = \"/pki/ca.pem\"\ncert = \"/pki/edge-01.pem\"\nkey = \"/pki/edge-01.key\"\n{extra}"
            )
        };
        check(
            &[("outpost.toml", &sync(""))],
            "allow_plaintext: false, batch_max_records: 500, batch_max_bytes: 131072, \
             telemetry_interval_secs: 60, telemetry_quota_bytes: 8388608, transfer_window: 16, \
             transfer_chunk_timeout_secs: 10",
        );
        check(&[("outpost.toml", "")], "sync: None");
        check(
            &[(
                "outpost.toml",
                "[device]\nid = \"e\"\n[sync]\nbroker = \"mqtt://hub:1883\"\n",
            )],
            "config DIR/outpost.toml: key `sync.broker`: 'mqtt://hub:1883' is plaintext MQTT",
        );
        check(
            &[(
                "outpost.toml",
                "[device]\nid = \"e\"\n[sync]\nbroker = \"mqtt://hub\"\nallow_plaintext = true\n",
            )],
            "broker: \"mqtt://hub\"",
        );
        check(
            &[("outpost.toml", "[sync]\nbroker = \"mqtts://hub\"\n")],
            "config DIR/outpost.toml: key `device.id`: a [sync] section needs it",
        );
        check(
            &[(
                "outpost.toml",
                "[device]\nid = \"e\"\n[sync]\nca = \"/ca.pem\"\n",
            )],
            "config DIR/outpost.toml: key `sync.broker`: must be set",
        );
        check(
            &[(
                "outpost.toml",
                "[device]\nid = \"e\"\n[sync]\nbroker = \"mqtts://hub\"\n",
            )],
            "key `sync.ca`: a TLS broker",
        );
        check(
            &[(
                "outpost.toml",
                &sync("broker = \"https://hub\"\n").replacen(
                    "broker = \"mqtts://hub.example:8883\"\n",
                    "",
                    1,
                ),
            )],
            "key `sync.broker`: broker \"https://hub\": must start with mqtts://",
        );
        check(
            &[("outpost.toml", &sync("brokers = \"x\"\n"))],
            "outpost.toml:8: key `sync.brokers`: unknown field `brokers`",
        );
        for (key, value) in [
            ("batch_max_records", "0"),
            ("batch_max_records", "1000000"),
            ("batch_max_bytes", "0"),
            ("batch_max_bytes", "262144"),
            ("telemetry_interval_secs", "0"),
            ("telemetry_quota_bytes", "0"),
            ("telemetry_quota_bytes", "100000000000"),
            ("transfer_window", "0"),
            ("transfer_chunk_timeout_secs", "0"),
        ] {
            check(
                &[
                    ("outpost.toml", &sync("")),
                    (
                        "config.d/50-sync.toml",
                        &format!("[sync]\n{key} = {value}\n"),
                    ),
                ],
                &format!("config DIR/config.d/50-sync.toml: key `sync.{key}`: must be"),
            );
        }
        // 256 KiB packets less 40 bytes of header, topic `outpost/v1/devices/edge-01/audit`
        // and packet id.
        check(
            &[("outpost.toml", &sync("batch_max_bytes = 262104\n"))],
            "batch_max_bytes: 262104",
        );
        check(
            &[("outpost.toml", &sync("batch_max_bytes = 262105\n"))],
            "key `sync.batch_max_bytes`: must be at least 1024 and fit the link's packets of \
             262144 bytes (at most 262104 here)",
        );
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        check(&[], "config DIR/outpost.toml: cannot read: No such file");
    }

    #[test]
    fn sizes_parse_with_units() {
        for (s, n) in [
            ("512", 512),
            ("1KB", 1000),
            ("2 MiB", 2 << 20),
            ("1.5GiB", 3 << 29),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        for s in ["", "GB", "-1", "12XB", "1e999"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s}");
        }
    }
}
