//! The link to the broker: the only module that knows `rumqttc` and `rustls`.
//!
//! [`LinkConfig`] is checked before any socket exists ([`LinkConfig::validate`]): the broker
//! is `mqtts://host[:port]` (8883), or `mqtt://host[:port]` (1883) only with
//! `allow_plaintext`; for TLS the CA, certificate and key are read and parsed here (errors
//! name the file), the key must match the certificate, and the `rustls::ClientConfig` is
//! built by hand: its root store holds the configured CA and nothing else (no platform or
//! bundled roots), with the certificate chain and key for client authentication, on the
//! `ring` provider. [`check_identity`] adds what `outpost config check` asks: the
//! certificate's CN is the device id.
//!
//! [`Link::run`] is the one task that owns and polls rumqttc's `EventLoop`. It never awaits a
//! publish: [`LinkHandle::try_publish`] checks the size of the whole PUBLISH packet against
//! `max_packet_size` (an oversized packet handed to rumqttc makes it reconnect forever) and
//! hands it to rumqttc's bounded request queue without waiting. Every publish is QoS 1 and
//! gets a [`PublishId`]; the link maps rumqttc's packet ids back to it and reports
//! [`LinkEvent::PubAck`] so the sync loop can mark its outbox rows done.
//!
//! Rules:
//! - Sessions are clean. A publish not acked when the connection drops is forgotten here
//!   (rumqttc's queue included); the caller resends from `outbox.db` after the next
//!   [`LinkEvent::Connected`], and the hub de-duplicates. While disconnected, `try_publish`
//!   refuses with [`ConnError::NotConnected`].
//! - Every failed attempt, the first connect after start included, waits a capped
//!   exponential backoff with full jitter ([`Backoff`]: uniform in `[0, min(cap, base·2ⁿ)]`);
//!   the attempt count resets once a connection has stayed up for [`STABLE_AFTER`].
//!   What rumqttc had read from a connection that then failed (its `state.events`: messages,
//!   PubAcks) is reported before [`LinkEvent::Disconnected`] and nothing of it survives
//!   into the next connection (its packet ids would shift the PubAck mapping); its
//!   packet-id collision state is cleared too (it would hold back every later publish).
//! - Subscriptions are issued after every ConnAck, in one SUBSCRIBE; filters the broker
//!   refuses (SubAck failure, e.g. its ACL) are reported as
//!   [`LinkEvent::SubscribeRefused`]. [`LinkHandle::stop_receiving`] unsubscribes from all
//!   of them, for good (no SUBSCRIBE after a reconnect): a stopping consumer on a shared
//!   subscription hands what it has not read to the others without closing its connection.
//!   The last will is the session's retained offline status (QoS 1); since a broker drops
//!   the will on a clean DISCONNECT, a graceful stop publishes that same message itself,
//!   after what is queued, then disconnects.
//! - Time is `tokio::time` only.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS,
    SubscribeFilter, TlsConfiguration, Transport,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::protocol::DeviceId;

/// Requests rumqttc holds before the link task takes them (publishes, subscriptions,
/// disconnect); a publish beyond it is refused with [`ConnError::QueueFull`].
pub const REQUEST_QUEUE: usize = 256;
/// Events waiting for the caller; when full, the link waits for the caller.
pub const EVENT_QUEUE: usize = 1024;
/// A connection that stayed up this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a graceful stop waits for queued publishes to be acked and the broker to close.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Largest `max_packet_size` MQTT 3.1.1 can carry (remaining length of 268,435,455 bytes).
pub const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// What went wrong, with the file, URL or topic it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("broker {url:?}: {reason}")]
    BrokerUrl { url: String, reason: &'static str },
    #[error("broker {url:?} is plaintext MQTT; set allow_plaintext = true to allow it")]
    PlaintextRefused { url: String },
    #[error("broker {url:?} uses TLS and needs `{what}` (a PEM file)")]
    MissingFile { url: String, what: &'static str },
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {}: its CN is {found:?}, the device id is {expected:?}", path.display())]
    CommonName {
        path: PathBuf,
        found: Option<String>,
        expected: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("{what} is {value}: {reason}")]
    Setting {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "publish to {topic:?} would be a packet of {len} bytes, over max_packet_size ({max} bytes)"
    )]
    TooLarge {
        topic: String,
        len: usize,
        max: usize,
    },
    #[error("not connected to the broker; publish again after the next Connected event")]
    NotConnected,
    #[error("the link's request queue is full ({REQUEST_QUEUE} requests)")]
    QueueFull,
    #[error("the link has stopped")]
    Closed,
    #[error("publish to {topic:?} refused by the MQTT client: {reason}")]
    Refused { topic: String, reason: String },
}

type Result<T, E = ConnError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Configuration

/// The link's settings, as `[sync]` gives them (the client id is `[device] id`).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `mqtts://host[:port]` or, with `allow_plaintext`, `mqtt://host[:port]`.
    pub broker: String,
    /// The MQTT client id, which is the device id and the certificate's CN.
    pub client_id: DeviceId,
    /// The CA that signed the broker's certificate (the only trusted root).
    pub ca: Option<PathBuf>,
    /// The device's certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// The device's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    pub allow_plaintext: bool,
    /// Largest MQTT packet either way, header and topic included.
    pub max_packet_size: usize,
    /// MQTT keep-alive; zero or at least a second.
    pub keep_alive: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
}

impl LinkConfig {
    /// A configuration with the defaults: 256 KiB packets, 30 s keep-alive, backoff 500 ms
    /// doubling up to 60 s.
    pub fn new(broker: impl Into<String>, client_id: DeviceId) -> Self {
        Self {
            broker: broker.into(),
            client_id,
            ca: None,
            cert: None,
            key: None,
            allow_plaintext: false,
            max_packet_size: 256 * 1024,
            keep_alive: Duration::from_secs(30),
            backoff: Backoff::default(),
        }
    }

    /// Everything the link needs, checked: the broker address, the numbers, and for TLS the
    /// files, the key against the certificate, and the client configuration built from them.
    pub fn validate(&self) -> Result<Validated> {
        let broker = Broker::parse(&self.broker)?;
        if !broker.tls && !self.allow_plaintext {
            return Err(ConnError::PlaintextRefused {
                url: self.broker.clone(),
            });
        }
        if self.max_packet_size < 1024 || self.max_packet_size > MQTT_MAX_PACKET {
            return Err(ConnError::Setting {
                what: "max_packet_size",
                value: self.max_packet_size.to_string(),
                reason: "must be between 1024 and 268435460 bytes",
            });
        }
        if !self.keep_alive.is_zero() && self.keep_alive < Duration::from_secs(1) {
            return Err(ConnError::Setting {
                what: "keep_alive",
                value: format!("{:?}", self.keep_alive),
                reason: "must be zero (off) or at least one second",
            });
        }
        self.backoff.validate()?;
        let tls = if broker.tls {
            Some(Arc::new(self.client_tls()?))
        } else {
            None
        };
        Ok(Validated {
            config: self.clone(),
            broker,
            tls,
        })
    }

    fn required(&self, what: &'static str, path: &Option<PathBuf>) -> Result<PathBuf> {
        path.clone().ok_or_else(|| ConnError::MissingFile {
            url: self.broker.clone(),
            what,
        })
    }

    /// The TLS client configuration: the configured CA as the only root, the device's
    /// certificate and key for client authentication.
    fn client_tls(&self) -> Result<ClientConfig> {
        let ca = self.required("ca", &self.ca)?;
        let cert = self.required("cert", &self.cert)?;
        let key = self.required("key", &self.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut roots = RootCertStore::empty();
        for der in read_certs("ca", &ca)? {
            roots.add(der).map_err(|e| ConnError::Pem {
                what: "ca",
                path: ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let chain = read_certs("cert", &cert)?;
        let private = read_key(&key)?;
        check_key_matches(&chain, &private, &provider, &cert, &key)?;

        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| ConnError::Tls(e.to_string()))
    }
}

/// A configuration that passed [`LinkConfig::validate`].
#[derive(Clone)]
pub struct Validated {
    config: LinkConfig,
    broker: Broker,
    tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Validated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("broker", &self.broker)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Validated {
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

/// What `outpost config check` asks of the link's files: everything [`LinkConfig::validate`]
/// checks, and that the certificate's subject CN is the device id.
pub fn check_identity(config: &LinkConfig, device_id: &DeviceId) -> Result<()> {
    let validated = config.validate()?;
    if !validated.broker.tls && config.cert.is_none() {
        return Ok(());
    }
    let cert = config.required("cert", &config.cert)?;
    let chain = read_certs("cert", &cert)?;
    let found = chain.first().and_then(|c| common_name(c.as_ref()));
    if found.as_deref() != Some(device_id.as_str()) {
        return Err(ConnError::CommonName {
            path: cert,
            found,
            expected: device_id.to_string(),
        });
    }
    Ok(())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ConnError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnError::Pem {
            what,
            path: path.to_path_buf(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(ConnError::Pem {
            what,
            path: path.to_path_buf(),
            reason: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| ConnError::Pem {
        what: "key",
        path: path.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<()> {
    match CertifiedKey::from_der(chain.to_vec(), key.clone_key(), provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(ConnError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(e) => Err(ConnError::Pem {
            what: "key",
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

// A small DER walk to the subject's CN: Certificate → TBSCertificate → (version), serial,
// signature, issuer, validity, subject → RDNs → (OID 2.5.4.3, string). Bounds are checked at
// every step; anything unexpected reads as "no CN".

/// One DER element: its tag, its contents, and what follows it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = der_next(input)?;
    (t == tag).then_some((content, rest))
}

/// The first subject CN of a DER certificate.
fn common_name(cert: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (cert, _) = der_expect(cert, SEQ)?;
    let (tbs, _) = der_expect(cert, SEQ)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_next(rest)?.2; // version
    }
    rest = der_expect(rest, 0x02)?.1; // serial
    rest = der_expect(rest, SEQ)?.1; // signature algorithm
    rest = der_expect(rest, SEQ)?.1; // issuer
    rest = der_expect(rest, SEQ)?.1; // validity
    let (mut rdns, _) = der_expect(rest, SEQ)?; // subject
    while !rdns.is_empty() {
        let (mut set, next) = der_expect(rdns, 0x31)?;
        rdns = next;
        while !set.is_empty() {
            let (atv, next) = der_expect(set, SEQ)?;
            set = next;
            let (oid, value) = der_expect(atv, 0x06)?;
            let (tag, text, _) = der_next(value)?;
            // UTF8String, PrintableString, IA5String.
            if oid == CN_OID && matches!(tag, 0x0c | 0x13 | 0x16) {
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl Broker {
    /// `mqtts://host[:port]` or `mqtt://host[:port]`; an IPv6 host goes in brackets.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |reason| ConnError::BrokerUrl {
            url: url.chars().take(200).collect(),
            reason,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(bad("must start with mqtts:// (or mqtt://)"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(bad("must be scheme://host[:port], without path or user"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(bad("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad("an IPv6 host goes in brackets")),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or(bad("port must be 1 to 65535"))?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(Self {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Backoff

/// Capped exponential backoff with full jitter: attempt `n` (from 0) waits a uniform random
/// time in `[0, min(cap, base·2ⁿ)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    fn validate(&self) -> Result<()> {
        if self.base.is_zero() || self.cap < self.base {
            return Err(ConnError::Setting {
                what: "backoff",
                value: format!("{:?}..{:?}", self.base, self.cap),
                reason: "base must be above zero and cap at least base",
            });
        }
        Ok(())
    }

    /// The most attempt `attempt` may wait.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before attempt `attempt + 1`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=ceiling))
    }
}

// ---------------------------------------------------------------------------------------------
// The link

/// The size of a QoS 1 PUBLISH packet: fixed header, remaining length, topic, packet id,
/// payload.
pub fn publish_packet_len(topic: &str, payload_len: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + payload_len;
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + remaining
}

/// The retained status published as the last will (and by a graceful stop).
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What one session asks of the broker besides publishing.
#[derive(Debug, Clone)]
pub struct Session {
    pub will: Will,
    /// Topic filters, subscribed at QoS 1 after every ConnAck.
    pub subscriptions: Vec<String>,
}

/// Names one publish, so its PubAck can be matched (rumqttc's packet ids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishId(pub u64);

/// What the link tells its caller, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The broker accepted the connection (ConnAck); subscriptions are on their way.
    Connected,
    /// A connection attempt failed; the next one follows after `retry_in`.
    ConnectFailed { reason: String, retry_in: Duration },
    /// An established connection was lost; every publish not acked is forgotten. What the
    /// link had read from it (messages, PubAcks) was reported before this.
    Disconnected { reason: String, retry_in: Duration },
    /// A message on a subscribed topic.
    Message { topic: String, payload: Vec<u8> },
    /// The broker has this publish (QoS 1 PubAck).
    PubAck(PublishId),
    /// The broker refused these session filters (SubAck failure: its ACL, a bad filter);
    /// no message arrives on them on this connection. The link carries on.
    SubscribeRefused { filters: Vec<String> },
}

/// What the handle and the link task share; taken only for short, non-async sections.
#[derive(Default)]
struct Shared {
    connected: bool,
    stopped: bool,
    next_id: u64,
    /// Publishes handed to rumqttc, not yet written (rumqttc writes them in this order).
    unwritten: VecDeque<PublishId>,
    /// [`LinkHandle::stop_receiving`] was called: no SUBSCRIBE after a ConnAck any more.
    unsubscribing: bool,
    /// UNSUBSCRIBEs queued on this connection whose UNSUBACK has not come yet.
    unsubacks_due: usize,
    /// Every filter's UNSUBSCRIBE is queued on this connection.
    unsubscribes_queued: bool,
}

impl Shared {
    /// Whether the broker holds none of the session's subscriptions for us any more: every
    /// UNSUBSCRIBE confirmed, or the connection they were on is gone (sessions are clean).
    fn unsubscribed(&self) -> bool {
        self.unsubscribing
            && (!self.connected || (self.unsubscribes_queued && self.unsubacks_due == 0))
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding this lock cannot leave it half-changed (every section is a
    // few assignments); keep going with what is there.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes to the broker through the link; cheap to clone, never waits (but for
/// [`LinkHandle::stop_receiving`]).
#[derive(Clone)]
pub struct LinkHandle {
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    max_packet_size: usize,
    /// The session's filters, for [`LinkHandle::stop_receiving`].
    subscriptions: Arc<[String]>,
    /// Set once [`Shared::unsubscribed`] holds.
    unsubscribed: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkHandle")
            .field("max_packet_size", &self.max_packet_size)
            .finish()
    }
}

impl LinkHandle {
    /// Queues a QoS 1 publish without waiting. The packet's size is checked first; the
    /// publish is refused while disconnected, once the link has stopped, or when rumqttc's
    /// queue is full. `Ok` means queued: [`LinkEvent::PubAck`] with the id means stored.
    pub fn try_publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<PublishId> {
        let len = publish_packet_len(topic, payload.len());
        if len > self.max_packet_size {
            return Err(ConnError::TooLarge {
                topic: topic.chars().take(200).collect(),
                len,
                max: self.max_packet_size,
            });
        }
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(ConnError::Refused {
                topic: topic.chars().take(200).collect(),
                reason: "must be non-empty, without wildcards or NUL".into(),
            });
        }
        let mut shared = lock(&self.shared);
        if shared.stopped {
            return Err(ConnError::Closed);
        }
        if !shared.connected {
            return Err(ConnError::NotConnected);
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                shared.next_id += 1;
                let id = PublishId(shared.next_id);
                shared.unwritten.push_back(id);
                Ok(id)
            }
            // rumqttc reports a full queue and a closed one alike; the topic was checked
            // above, and the queue closes only with the link task, after `stopped` is set.
            Err(_) => Err(ConnError::QueueFull),
        }
    }

    /// Whether the link is connected now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared).connected
    }

    /// Stops the broker sending messages, for good, without closing the connection (the
    /// caller can still publish, e.g. its last acks): UNSUBSCRIBE from every session filter
    /// now, and no SUBSCRIBE after a reconnect. Returns once the broker has confirmed every
    /// UNSUBSCRIBE (UNSUBACK: each message it sent before is already among the events), or
    /// there is no connection (a clean session holds no subscription); the caller bounds
    /// the wait. A broker may still deliver a message it had queued for this client before
    /// the UNSUBSCRIBE; the caller decides what to do with one that comes later.
    pub async fn stop_receiving(&self) {
        let mut done = self.unsubscribed.subscribe();
        let mut left: VecDeque<String> = self.subscriptions.iter().cloned().collect();
        {
            let mut shared = lock(&self.shared);
            shared.unsubscribing = true;
            shared.unsubscribes_queued = false;
        }
        loop {
            {
                let mut shared = lock(&self.shared);
                let already = *self.unsubscribed.borrow();
                if already || shared.stopped || !shared.connected {
                    // A reconnect since: nothing was subscribed on it.
                    self.unsubscribed.send_replace(true);
                    break;
                }
                while let Some(filter) = left.front() {
                    if self.client.try_unsubscribe(filter.clone()).is_err() {
                        break; // rumqttc's queue is full: again in a moment.
                    }
                    shared.unsubacks_due += 1;
                    left.pop_front();
                }
                if left.is_empty() {
                    shared.unsubscribes_queued = true;
                    if shared.unsubscribed() {
                        self.unsubscribed.send_replace(true);
                    }
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = done.wait_for(|d| *d).await;
    }

    /// The largest packet the link accepts.
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }
}

/// The task that owns rumqttc's event loop.
pub struct Link {
    config: Validated,
    session: Session,
    client: AsyncClient,
    eventloop: EventLoop,
    shared: Arc<Mutex<Shared>>,
    events: mpsc::Sender<LinkEvent>,
    /// rumqttc packet id → our id, for publishes written and not yet acked.
    inflight: HashMap<u16, PublishId>,
    /// Set once [`Shared::unsubscribed`] holds (shared with the handles).
    unsubscribed: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("broker", &self.config.broker)
            .finish()
    }
}

impl Link {
    /// Validates the configuration and builds the link (no socket yet): the task to run, a
    /// handle to publish with, and the receiver of its events.
    pub fn new(
        config: &LinkConfig,
        session: Session,
    ) -> Result<(Link, LinkHandle, mpsc::Receiver<LinkEvent>)> {
        let config = config.validate()?;
        let c = &config.config;
        let will_len = publish_packet_len(&session.will.topic, session.will.payload.len());
        if will_len > c.max_packet_size {
            return Err(ConnError::TooLarge {
                topic: session.will.topic.clone(),
                len: will_len,
                max: c.max_packet_size,
            });
        }
        let mut options = MqttOptions::new(
            c.client_id.as_str(),
            config.broker.host.clone(),
            config.broker.port,
        );
        options
            .set_keep_alive(c.keep_alive)
            .set_max_packet_size(c.max_packet_size, c.max_packet_size)
            .set_clean_session(true)
            .set_last_will(LastWill::new(
                session.will.topic.clone(),
                session.will.payload.clone(),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(tls) = &config.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        // Acks and PUBACKs are small packets that must not wait for the peer's delayed ACK
        // (Nagle's algorithm; ~40 ms a round trip, which capped a backlog's drain).
        eventloop.network_options.set_tcp_nodelay(true);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let unsubscribed = Arc::new(watch::Sender::new(false));
        let handle = LinkHandle {
            client: client.clone(),
            shared: shared.clone(),
            max_packet_size: c.max_packet_size,
            subscriptions: session.subscriptions.clone().into(),
            unsubscribed: unsubscribed.clone(),
        };
        let link = Link {
            config,
            session,
            client,
            eventloop,
            shared,
            events,
            inflight: HashMap::new(),
            unsubscribed,
        };
        Ok((link, handle, events_rx))
    }

    /// [`Link::new`], then [`Link::run`] on a task of its own.
    pub fn spawn(
        config: &LinkConfig,
        session: Session,
        shutdown: CancellationToken,
    ) -> Result<(LinkHandle, mpsc::Receiver<LinkEvent>, JoinHandle<()>)> {
        let (link, handle, events) = Link::new(config, session)?;
        let task = tokio::spawn(link.run(shutdown));
        Ok((handle, events, task))
    }

    /// Connects, reconnects with backoff, and reports events until `shutdown`; then stops
    /// gracefully (queued publishes, the offline status, DISCONNECT) within [`STOP_GRACE`].
    /// It never fails: every error after validation is retried. Its events carry the span
    /// `link` with the broker and client id.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!(
            "link",
            broker = %self.config.broker,
            client_id = %self.config.config.client_id,
        );
        self.run_in_span(shutdown).instrument(span).await;
    }

    async fn run_in_span(mut self, shutdown: CancellationToken) {
        let broker = self.config.broker.to_string();
        let backoff = self.config.config.backoff;
        let mut attempt: u32 = 0;
        loop {
            let mut connected_at: Option<Instant> = None;
            let error = loop {
                let polled = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        if connected_at.is_some() {
                            self.stop(&broker).await;
                        }
                        self.mark_stopped();
                        info!(broker = %broker, "Link stopped.");
                        return;
                    }
                    polled = self.eventloop.poll() => polled,
                };
                match polled {
                    Ok(event) => {
                        if self.on_event(event, &broker).await {
                            connected_at = Some(Instant::now());
                        }
                    }
                    Err(e) => break e,
                }
            };
            self.forget_in_flight(&broker).await;
            if connected_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                attempt = 0;
            }
            let retry_in = backoff.delay(attempt, &mut rand::rng());
            attempt = attempt.saturating_add(1);
            let reason = describe(&error);
            let event = if connected_at.is_some() {
                warn!(broker = %broker, error = %reason, retry_in_ms = retry_in.as_millis() as u64, "Connection lost.");
                LinkEvent::Disconnected { reason, retry_in }
            } else {
                warn!(broker = %broker, error = %reason, attempt, retry_in_ms = retry_in.as_millis() as u64, "Connection failed.");
                LinkEvent::ConnectFailed { reason, retry_in }
            };
            emit(&self.events, event).await;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.mark_stopped();
                    info!(broker = %broker, "Link stopped.");
                    return;
                }
                _ = tokio::time::sleep(retry_in) => {}
            }
        }
    }

    /// Handles one event from rumqttc; true on ConnAck.
    async fn on_event(&mut self, event: Event, broker: &str) -> bool {
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => {
                {
                    // Subscriptions are queued before any publish can be (handles wait for
                    // `connected`), so the broker sees them first. One SUBSCRIBE: its
                    // SubAck's codes are in the session's order.
                    let mut shared = lock(&self.shared);
                    let filters = &self.session.subscriptions;
                    if !shared.unsubscribing && !filters.is_empty() {
                        let many = filters
                            .iter()
                            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        if let Err(e) = self.client.try_subscribe_many(many) {
                            warn!(broker, error = %e, "Subscribe not queued.");
                        }
                    }
                    shared.connected = true;
                    shared.unwritten.clear();
                    shared.unsubacks_due = 0;
                    shared.unsubscribes_queued = shared.unsubscribing;
                    if shared.unsubscribed() {
                        self.unsubscribed.send_replace(true);
                    }
                }
                info!(broker, "Connected.");
                emit(&self.events, LinkEvent::Connected).await;
                return true;
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let id = lock(&self.shared).unwritten.pop_front();
                match id {
                    Some(id) => {
                        self.inflight.insert(pkid, id);
                    }
                    // The stop's own status message.
                    None => debug!(broker, pkid, "Publish without a handle id written."),
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                if let Some(id) = self.inflight.remove(&ack.pkid) {
                    emit(&self.events, LinkEvent::PubAck(id)).await;
                }
            }
            Event::Incoming(Incoming::Publish(p)) => {
                emit(
                    &self.events,
                    LinkEvent::Message {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    },
                )
                .await;
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                // The only SUBSCRIBE is the session's, its filters in order.
                let filters: Vec<String> = ack
                    .return_codes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .map(|(i, _)| {
                        self.session
                            .subscriptions
                            .get(i)
                            .cloned()
                            .unwrap_or_else(|| format!("(filter {i})"))
                    })
                    .collect();
                if !filters.is_empty() {
                    warn!(broker, filters = ?filters, "The broker refused subscriptions.");
                    emit(&self.events, LinkEvent::SubscribeRefused { filters }).await;
                }
            }
            Event::Incoming(Incoming::UnsubAck(_)) => self.on_unsuback(),
            _ => {}
        }
        false
    }

    /// The task ends: handles refuse from now on, and nothing is subscribed any more.
    fn mark_stopped(&self) {
        lock(&self.shared).stopped = true;
        self.unsubscribed.send_replace(true);
    }

    /// One UNSUBSCRIBE confirmed.
    fn on_unsuback(&self) {
        let mut shared = lock(&self.shared);
        shared.unsubacks_due = shared.unsubacks_due.saturating_sub(1);
        if shared.unsubscribed() {
            self.unsubscribed.send_replace(true);
        }
    }

    /// After an error: nothing handed to rumqttc survives (the session is clean). What
    /// rumqttc had already read from the connection and not yet returned (messages,
    /// PubAcks, in `state.events`) is reported first; then its queues, its buffered events
    /// and its collision state are cleared with ours, under the lock, before handles can
    /// publish again. (rumqttc's own `clean` keeps the events and the collision: the events
    /// would come out after the next ConnAck, an old `Outgoing::Publish` among them taking
    /// a new publish's id; a collision left set holds back every publish and fails the
    /// connection two keep-alives later, again and again.)
    async fn forget_in_flight(&mut self, broker: &str) {
        {
            let mut shared = lock(&self.shared);
            shared.connected = false;
            if shared.unsubscribed() {
                self.unsubscribed.send_replace(true);
            }
        }
        while let Some(event) = self.eventloop.state.events.pop_front() {
            match event {
                // For a connection that is gone.
                Event::Incoming(Incoming::SubAck(_) | Incoming::UnsubAck(_)) => {}
                event => {
                    self.on_event(event, broker).await;
                }
            }
        }
        let mut shared = lock(&self.shared);
        self.eventloop.clean();
        self.eventloop.pending.clear();
        self.eventloop.state.events.clear();
        self.eventloop.state.collision = None;
        self.eventloop.state.collision_ping_count = 0;
        shared.unwritten.clear();
        shared.unsubacks_due = 0;
        self.inflight.clear();
    }

    /// The graceful stop, within [`STOP_GRACE`]: no new publishes; the offline status is
    /// queued after what rumqttc holds; once all of them are acked, DISCONNECT; then the
    /// link reads until the broker closes the connection. (Returning right after writing
    /// DISCONNECT lost publishes written just before it, with Mosquitto 2.0.11 here: most
    /// likely the reset a socket closed with PubAcks unread sends, which makes the broker
    /// drop what it had not read yet.) PubAcks that
    /// arrive meanwhile reach the caller if there is room; the rest are resent after the
    /// next start.
    async fn stop(&mut self, broker: &str) {
        let will = self.session.will.clone();
        let will_id = {
            let mut shared = lock(&self.shared);
            shared.stopped = true;
            match self
                .client
                .try_publish(will.topic, QoS::AtLeastOnce, true, will.payload)
            {
                Ok(()) => {
                    shared.next_id += 1;
                    let id = PublishId(shared.next_id);
                    shared.unwritten.push_back(id);
                    Some(id)
                }
                Err(e) => {
                    warn!(broker, error = %e, "Offline status not queued.");
                    None
                }
            }
        };
        let deadline = Instant::now() + STOP_GRACE;
        let mut disconnecting = false;
        loop {
            let done = lock(&self.shared).unwritten.is_empty() && self.inflight.is_empty();
            if done && !disconnecting {
                if let Err(e) = self.client.try_disconnect() {
                    warn!(broker, error = %e, "Disconnect not queued.");
                    break;
                }
                disconnecting = true;
            }
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Err(_) => {
                    warn!(
                        broker,
                        disconnecting, "Stop grace period over; closing anyway."
                    );
                    break;
                }
                // After DISCONNECT the broker closes the connection: the clean end.
                Ok(Err(_)) if disconnecting => {
                    info!(broker, "Disconnected.");
                    break;
                }
                Ok(Err(e)) => {
                    warn!(broker, error = %describe(&e), "Connection lost while stopping.");
                    break;
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                    if let Some(id) = self.inflight.remove(&ack.pkid)
                        && Some(id) != will_id
                    {
                        let _ = self.events.try_send(LinkEvent::PubAck(id));
                    }
                }
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(id) = lock(&self.shared).unwritten.pop_front() {
                        self.inflight.insert(pkid, id);
                    }
                }
                Ok(Ok(Event::Incoming(Incoming::UnsubAck(_)))) => self.on_unsuback(),
                Ok(Ok(_)) => {}
            }
        }
        let mut shared = lock(&self.shared);
        shared.connected = false;
        if shared.unsubscribing {
            self.unsubscribed.send_replace(true);
        }
    }
}

/// Hands an event to the caller, waiting for room. A caller that dropped its receiver no
/// longer listens; the link keeps working.
async fn emit(events: &mpsc::Sender<LinkEvent>, event: LinkEvent) {
    let _ = events.send(event).await;
}

/// One line for an error of rumqttc's, with its sources.
fn describe(e: &ConnectionError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
