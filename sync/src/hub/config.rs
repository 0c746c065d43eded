//! The hub's configuration file: one `[hub]` table, unknown keys refused.
//!
//! ```toml
//! [hub]
//! data_dir = "/var/lib/outpost-hub"
//! broker = "mqtts://broker.example:8883"  # mqtt:// only with allow_plaintext = true
//! ca = "/etc/outpost-hub/pki/ca.pem"
//! cert = "/etc/outpost-hub/pki/hub.pem"    # CN outpost-hub
//! key = "/etc/outpost-hub/pki/hub.key"
//! allow_plaintext = false
//! instance = "hub-a"                       # optional: MQTT client id outpost-hub.hub-a
//! shared_subscriptions = true              # false on a broker without `$share/` (RabbitMQ)
//! store = "postgres://outpost@db.example/outpost_hub"  # optional: else <data_dir>/hub.db
//! listen = "127.0.0.1:9102"                # optional: serve's /metrics
//! chunk_rate = 1000                        # chunk requests per second per device
//! chunk_burst = 128                        # requests a device may make at once
//! ingest_rate = 1000                       # upward messages per second per device
//! ingest_burst = 2000                      # messages a device may send at once
//! ```
//!
//! Every key is optional for the offline commands; `serve` needs `broker` (and, for
//! `mqtts://`, `ca`, `cert`, `key`), else exit 78. `broker`, when set, is checked as the
//! device's `[sync]` is (the URL, the files, the key against the certificate) by every
//! command. `instance` names this hub process in its MQTT client id
//! (`outpost-hub.<instance>`); each process connected at once needs its own, and without
//! one a random id is drawn at each start. `shared_subscriptions` (default true) subscribes
//! through `$share/hub/…` so hubs side by side split the load; a broker that does not know
//! shared subscriptions (RabbitMQ's MQTT plugin, `docs/brokers.md`) delivers nothing to
//! them, so there it must be false and only one hub may serve. `store`, when set, is a PostgreSQL URL (checked
//! for its form here; the connection is made by the command) shared by every hub of the
//! fleet; the data directory still holds the hub's own audit chain and the blobs. The data
//! directory is `--data-dir`, else `[hub] data_dir`, else [`DEFAULT_DATA_DIR`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::HUB_IDENTITY;
use super::blobs::{DEFAULT_BURST, DEFAULT_RATE, RateLimit};
use super::serve::{
    DEFAULT_INGEST_BURST, DEFAULT_INGEST_RATE, DEVICE_MAX_BYTES, DEVICE_MAX_MESSAGES,
    QUEUE_MAX_BYTES, ServeSettings, client_id,
};
use super::store::StoreConfig;
use crate::conn::LinkConfig;

/// The hub's MQTT keep-alive (a device's is 30 s). A hub that hangs (its process stopped, its
/// machine gone without closing the connection) is dropped by the broker after 1.5 × this,
/// and only then does the broker hand its share of the shared subscriptions to the other
/// hubs; what it had been handed comes again with the devices' resends. A busy hub is not
/// dropped: its serve loop never waits (`serve`'s module header).
pub const HUB_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(10);
use crate::protocol::DeviceId;

/// Where the hub keeps its data when neither flag nor file says.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost-hub";
/// How often `serve` logs its counters.
pub const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A configuration problem, naming the file (and the key): `outpost-hub` exits 78.
#[derive(Debug, thiserror::Error)]
#[error("config {}: {message}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub hub: HubConfig,
    /// The file it was read from.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// `[hub]`; the same meanings as the device's `[sync]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub data_dir: Option<PathBuf>,
    pub broker: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Names this hub process in its MQTT client id, `outpost-hub.<instance>`.
    pub instance: Option<String>,
    /// Subscribe through `$share/hub/…` (default); false for one hub on a broker without
    /// shared subscriptions.
    pub shared_subscriptions: Option<bool>,
    /// The store: a `postgres://user@host/db` URL; absent, `<data_dir>/hub.db`.
    pub store: Option<String>,
    /// `serve`'s `/metrics` address (`127.0.0.1:9102`); absent, none.
    pub listen: Option<String>,
    /// Chunk requests per second per device (`serve`'s rate limit).
    pub chunk_rate: Option<f64>,
    /// Chunk requests a device may make at once (the token bucket's size).
    pub chunk_burst: Option<f64>,
    /// Upward messages per second per device (`serve`'s ingest rate limit).
    pub ingest_rate: Option<f64>,
    /// Messages a device may send at once (that bucket's size).
    pub ingest_burst: Option<f64>,
}

impl Config {
    /// Reads and validates `path`; without a path, the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let fail = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "{} bytes is over the limit of {MAX_CONFIG_BYTES}",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let mut config: Config = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        config.path = Some(path.to_path_buf());
        config
            .validate()
            .map_err(|(key, m)| fail(format!("[hub] {key}: {m}")))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let h = &self.hub;
        if h.data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(("data_dir", "is empty".into()));
        }
        if let Some(l) = &h.listen {
            l.parse::<std::net::SocketAddr>().map_err(|e| {
                (
                    "listen",
                    format!("{l:?} is not an address and port (127.0.0.1:9102): {e}"),
                )
            })?;
        }
        if let Some(url) = &h.store {
            StoreConfig::new(Some(url), Path::new("")).map_err(|e| ("store", e))?;
        }
        for (key, v) in [
            ("chunk_rate", h.chunk_rate),
            ("chunk_burst", h.chunk_burst),
            ("ingest_rate", h.ingest_rate),
            ("ingest_burst", h.ingest_burst),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v < 1.0) {
                return Err((key, "must be a number of at least 1".into()));
            }
        }
        if let Some(i) = &h.instance {
            client_id(Some(i)).map_err(|_| {
                (
                    "instance",
                    format!(
                        "{:?} is not 1 to {} of A-Z, a-z, 0-9, '.', '_', '-'",
                        i.chars().take(80).collect::<String>(),
                        crate::protocol::MAX_ID_LEN - HUB_IDENTITY.len() - 1
                    ),
                )
            })?;
        }
        if let Some(link) = self.link_config() {
            link.validate().map_err(|e| {
                let key = match &e {
                    crate::ConnError::MissingFile { what, .. }
                    | crate::ConnError::Read { what, .. }
                    | crate::ConnError::Pem { what, .. } => what,
                    crate::ConnError::KeyMismatch { .. } => &"key",
                    crate::ConnError::PlaintextRefused { .. } => &"allow_plaintext",
                    _ => &"broker",
                };
                (*key, e.to_string())
            })?;
        } else if h.ca.is_some() || h.cert.is_some() || h.key.is_some() || h.allow_plaintext {
            return Err((
                "broker",
                "is missing while ca, cert, key or allow_plaintext is set".into(),
            ));
        }
        Ok(())
    }

    /// The hub's broker link settings (client id [`HUB_IDENTITY`], keep-alive
    /// [`HUB_KEEP_ALIVE`]), when a broker is set.
    pub fn link_config(&self) -> Option<LinkConfig> {
        let h = &self.hub;
        let broker = h.broker.as_ref()?;
        let id = DeviceId::new(HUB_IDENTITY).ok()?;
        let mut link = LinkConfig::new(broker.clone(), id);
        link.ca = h.ca.clone();
        link.cert = h.cert.clone();
        link.key = h.key.clone();
        link.allow_plaintext = h.allow_plaintext;
        link.keep_alive = HUB_KEEP_ALIVE;
        Some(link)
    }

    /// What `serve` runs with: the link (with this process's client id, see
    /// [`super::serve::client_id`]), the data directory and the summary interval; an error
    /// names the file and key (`outpost-hub` exits 78).
    pub fn serve_settings(&self, flag: Option<&Path>) -> Result<ServeSettings, ConfigError> {
        let fail = |message: &str| ConfigError {
            path: self.path.clone().unwrap_or_else(|| PathBuf::from("(none)")),
            message: message.into(),
        };
        if self.path.is_none() {
            return Err(fail(
                "serve needs --config FILE with [hub] broker (and ca, cert, key)",
            ));
        }
        let mut link = self
            .link_config()
            .ok_or_else(|| fail("[hub] broker: is required by serve"))?;
        link.client_id = client_id(self.hub.instance.as_deref())
            .map_err(|e| fail(&format!("[hub] instance: {e}")))?;
        Ok(ServeSettings {
            link,
            data_dir: self.data_dir(flag),
            store: self.store(flag),
            summary_every: SUMMARY_EVERY,
            queue_max_bytes: QUEUE_MAX_BYTES,
            device_max_bytes: DEVICE_MAX_BYTES,
            device_max_messages: DEVICE_MAX_MESSAGES,
            shared_subscriptions: self.hub.shared_subscriptions.unwrap_or(true),
            listen: self.hub.listen.as_deref().and_then(|l| l.parse().ok()),
            chunk_rate: RateLimit {
                rate: self.hub.chunk_rate.unwrap_or(DEFAULT_RATE),
                burst: self.hub.chunk_burst.unwrap_or(DEFAULT_BURST),
            },
            ingest_rate: RateLimit {
                rate: self.hub.ingest_rate.unwrap_or(DEFAULT_INGEST_RATE),
                burst: self.hub.ingest_burst.unwrap_or(DEFAULT_INGEST_BURST),
            },
        })
    }

    /// Where the store is: `[hub] store`, else `hub.db` in [`Config::data_dir`].
    pub fn store(&self, flag: Option<&Path>) -> StoreConfig {
        match &self.hub.store {
            Some(url) => StoreConfig::Postgres(url.clone()),
            None => StoreConfig::Sqlite(self.data_dir(flag)),
        }
    }

    /// `--data-dir`, else `[hub] data_dir`, else [`DEFAULT_DATA_DIR`].
    pub fn data_dir(&self, flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf)
            .or_else(|| self.hub.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }
}
