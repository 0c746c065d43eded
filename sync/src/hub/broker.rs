//! `broker-config`: a Mosquitto (2.0) configuration and ACL file for the fleet.
//!
//! `OUT/mosquitto.conf`: one TLS listener (no plaintext one) with `require_certificate` and
//! `use_identity_as_username` (the username is the client certificate's CN: the device id,
//! or [`HUB_IDENTITY`]), `allow_anonymous false`, the ACL file, absolute paths throughout
//! so `mosquitto -c OUT/mosquitto.conf` runs from anywhere. Mosquitto started as root
//! drops to the `user` setting (default `mosquitto`) *before* it reads the TLS key, so the
//! file says whom to run as: `--user NAME` when given, else `root` when `broker.key` (0600)
//! belongs to root, else nothing (a broker started as another user keeps its user).
//! `max_packet_size` is the links' own ([`MAX_PACKET_SIZE`]): Mosquitto disconnects a client
//! that sends a larger packet, so a device cannot hand the hub a packet its link would
//! refuse (rumqttc drops the connection on one, and with it what was in flight).
//! `set_tcp_nodelay true`: an audit ack is a small packet after others; with Nagle's
//! algorithm it waits for the peer's delayed ACK (~40 ms), which capped the drain of a backlog
//! at about 50,000 records/s whatever the window.
//! `max_queued_messages 100000`: Mosquitto holds at most this many QoS 1 messages per client
//! beyond the 20 in flight, and drops the rest with "Outgoing messages are being dropped for
//! client …". Its default, 1,000, is what the hub's client overran when 1,000 devices
//! connected within 2 s (each sends its status, reported state and a batch): the dropped
//! batches came again only after the devices' 15 s ack timeout (`docs/scale.md`). Sessions
//! are clean, so only connected clients hold a queue, and a device's own queue holds little
//! (acks, desired state). `max_queued_bytes` (256 MiB) bounds the same queue in bytes: a
//! connected hub that stops reading (stalled, or stopped until its keep-alive runs out) would
//! otherwise let 100,000 messages of up to 256 KiB each, 25 GiB, pile up in the broker;
//! whichever limit is reached first drops, and the devices send their batches again.
//! Choice: `persistence false`
//! (when run as root Mosquitto drops to its own user, which could not write beside the
//! PKI); retained messages survive a broker restart only if the operator turns it on.
//!
//! `OUT/acl` (topics from `protocol::acl`; an ACL is deny by default):
//! - every client, by `pattern` on `%u`: write its own upward topics (`status`, `audit`,
//!   `telemetry`, `state/reported`, `blobs/get`: so a chunk request's topic proves who
//!   asks), read its own downward ones (`audit/ack`, `state/desired`, `blobs`);
//! - each enrolled device, a `user` block from the hub store: read its groups' desired
//!   state (so run `broker-config` again after an enrollment);
//! - the hub (`user outpost-hub`): read every device's upward topics (chunk requests too); write
//!   acks, desired state (devices' and groups'), blob chunks, and its own status.

use std::fmt::Write as _;
use std::path::Path;

use super::pki::PkiPaths;
use super::store::DeviceRecord;
use super::{HUB_IDENTITY, HubError, Result, make_dir};
use crate::protocol::{DeviceId, DeviceTopic, acl, hub_status_topic};

/// Largest MQTT packet the broker takes: the links' `max_packet_size`
/// (`conn::LinkConfig::new`'s default, held equal by a test).
pub const MAX_PACKET_SIZE: usize = 256 * 1024;

/// QoS 1 messages Mosquitto queues per client beyond those in flight (see the header).
pub const MAX_QUEUED_MESSAGES: usize = 100_000;

/// Bytes of such messages Mosquitto queues per client (see the header).
pub const MAX_QUEUED_BYTES: usize = 256 << 20;

/// What `broker-config` writes.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub port: u16,
    pub bind: Option<String>,
    /// Mosquitto's `user` (whom to run as when started as root).
    pub user: Option<String>,
}

/// The ACL file's text for these devices.
pub fn acl_text(devices: &[DeviceRecord]) -> Result<String> {
    let mut s = String::from(
        "# Written by outpost-hub broker-config. Usernames are certificate CNs.\n\n\
         # The hub.\n",
    );
    let _ = writeln!(s, "user {HUB_IDENTITY}");
    for kind in DeviceTopic::ALL {
        let access = if kind.is_upward() { "read" } else { "write" };
        let _ = writeln!(s, "topic {access} {}", acl::every_device(kind));
    }
    let _ = writeln!(s, "topic write {}", acl::every_group_desired());
    let hub = DeviceId::new(HUB_IDENTITY)?;
    let _ = writeln!(s, "topic write {}", hub_status_topic(&hub));
    s.push_str("\n# Each enrolled device: its groups' desired state.\n");
    for d in devices {
        let _ = writeln!(s, "user {}", d.id);
        for g in &d.groups {
            let _ = writeln!(s, "topic read {}", acl::group_desired(g));
        }
    }
    s.push_str("\n# Every client: its own device topics (%u is its certificate's CN).\n");
    for kind in DeviceTopic::ALL {
        let access = if kind.is_upward() { "write" } else { "read" };
        let _ = writeln!(s, "pattern {access} {}", acl::own_device(kind));
    }
    Ok(s)
}

/// The configuration file's text; every path is absolute.
pub fn conf_text(
    pki: &PkiPaths,
    acl_path: &Path,
    settings: &BrokerSettings,
    user: Option<&str>,
) -> String {
    let listener = match &settings.bind {
        Some(addr) => format!("listener {} {addr}", settings.port),
        None => format!("listener {}", settings.port),
    };
    let user = user.map_or(String::new(), |u| format!("user {u}\n"));
    format!(
        "# Written by outpost-hub broker-config (Mosquitto 2.0).\n\
         {user}\
         per_listener_settings false\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         persistence false\n\
         log_dest stderr\n\
         max_packet_size {MAX_PACKET_SIZE}\n\
         # The hubs' clients take every device's messages: a connect storm must queue, not\n\
         # drop (the default is 1000).\n\
         max_queued_messages {MAX_QUEUED_MESSAGES}\n\
         max_queued_bytes {MAX_QUEUED_BYTES}\n\
         # Small packets (acks) go out at once: with Nagle's algorithm they wait for the\n\
         # peer's delayed ACK, about 40 ms per round trip.\n\
         set_tcp_nodelay true\n\
         \n\
         # TLS only, client certificates required; the username is the certificate's CN.\n\
         {listener}\n\
         protocol mqtt\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         tls_version tlsv1.2\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        acl = acl_path.display(),
        ca = pki.ca_cert().display(),
        cert = pki.broker_cert().display(),
        key = pki.broker_key().display(),
    )
}

/// Writes `OUT/mosquitto.conf` and `OUT/acl` (replacing earlier ones: they are derived).
pub fn write(
    pki_dir: &Path,
    out: &Path,
    settings: &BrokerSettings,
    devices: &[DeviceRecord],
) -> Result<()> {
    let pki = checked_pki(pki_dir, settings)?;
    let out = make_dir(out)?;
    let acl_path = out.join("acl");
    let conf_path = out.join("mosquitto.conf");
    replace(&acl_path, &acl_text(devices)?)?;
    let user = match &settings.user {
        Some(u) => Some(checked("--user", u)?.to_string()),
        None => {
            use std::os::unix::fs::MetadataExt;
            let key = pki.broker_key();
            let meta = std::fs::metadata(&key).map_err(|source| HubError::Io {
                what: "reading",
                path: key,
                source,
            })?;
            (meta.uid() == 0).then(|| "root".to_string())
        }
    };
    replace(
        &conf_path,
        &conf_text(&pki, &acl_path, settings, user.as_deref()),
    )
}

/// The PKI folder's broker files (the folder made absolute), and the listener settings,
/// checked: what every broker's configuration names.
pub(super) fn checked_pki(pki_dir: &Path, settings: &BrokerSettings) -> Result<PkiPaths> {
    let pki_dir = std::fs::canonicalize(pki_dir).map_err(|source| HubError::Io {
        what: "reading PKI folder",
        path: pki_dir.to_path_buf(),
        source,
    })?;
    let pki = PkiPaths::new(&pki_dir);
    for p in [pki.ca_cert(), pki.broker_cert(), pki.broker_key()] {
        if !p.is_file() {
            return Err(HubError::BadFile {
                what: "PKI file",
                path: p,
                reason: "missing (run `outpost-hub pki init` first)".into(),
            });
        }
    }
    if let Some(bind) = &settings.bind {
        checked("--bind", bind)?;
    }
    if settings.port == 0 {
        return Err(HubError::Pki("--port must be between 1 and 65535".into()));
    }
    Ok(pki)
}

pub(super) fn replace(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| HubError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

/// A value written into the configuration: one word of `[A-Za-z0-9._:-]`, so it cannot add
/// a line or a setting.
fn checked<'a>(flag: &str, value: &'a str) -> Result<&'a str> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(value)
    } else {
        Err(HubError::Pki(format!(
            "{flag} {:?} is not a plain name or address",
            value.chars().take(80).collect::<String>()
        )))
    }
}
