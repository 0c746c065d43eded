//! `broker-config --broker rabbitmq`: the fleet's broker as a RabbitMQ node with the MQTT
//! plugin (3.10 or newer), what `docs/brokers.md` measured it can and cannot do.
//!
//! Files written to `OUT/` (derived, replaced on every run):
//! - `rabbitmq.conf`: one MQTT listener over TLS (no plaintext MQTT or AMQP listener), client
//!   certificates required and verified against the fleet CA, the username taken from the
//!   certificate's CN (`mqtt.ssl_cert_login`, `ssl_cert_login_from = common_name`), no
//!   anonymous logins, Nagle off (`nodelay`, as for Mosquitto), and `load_definitions`
//!   pointing at the definitions file.
//! - `definitions.json`: the users, one per enrolled device plus [`HUB_IDENTITY`], without a
//!   password (an empty hash: only a certificate logs them in), and their permissions. The
//!   MQTT plugin maps topics onto routing keys of `amq.topic` (`/` and `.` swapped), so the
//!   ACL is RabbitMQ's topic authorization: per user, a regular expression for the routing
//!   keys it may publish (write) and subscribe to (read), the same topics as Mosquitto's ACL
//!   (`protocol::acl`). Queue permissions confine each client to its own session queues
//!   (`mqtt-subscription-<client id>…`).
//! - `enabled_plugins`: `[rabbitmq_mqtt].`, for a node started with
//!   `RABBITMQ_ENABLED_PLUGINS_FILE` (else `rabbitmq-plugins enable rabbitmq_mqtt`).
//!
//! The definitions load when the node starts; after enrolling a device, run `broker-config`
//! again and `rabbitmqctl import_definitions OUT/definitions.json` (users and permissions are
//! added or replaced, nothing else is touched; a removed device's user must be deleted by
//! hand). The hub must run with `[hub] shared_subscriptions = false` on this broker, and only
//! one hub may serve (the plugin has no shared subscriptions).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use super::broker::BrokerSettings;
use super::pki::PkiPaths;
use super::store::DeviceRecord;
use super::{HUB_IDENTITY, HubError, Result, make_dir};
use crate::protocol::{
    DeviceId, DeviceTopic, acl, device_topic, group_desired_topic, hub_status_topic,
};

/// The routing-key regular expression matching exactly these MQTT topic filters, as the MQTT
/// plugin turns them into `amq.topic` routing keys: levels joined by `.`, a `.` inside a
/// level becomes `/`, `+` becomes `*` (a subscription's binding key, which the plugin checks
/// against the read expression). `+` matches any one level, including that `*`.
pub fn routing_key_regex(filters: &[String]) -> String {
    let mut out = String::from("^(");
    for (i, filter) in filters.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        for (j, level) in filter.split('/').enumerate() {
            if j > 0 {
                out.push_str("\\.");
            }
            if level == "+" {
                out.push_str("[^.]+");
                continue;
            }
            for c in level.chars() {
                match c {
                    '.' => out.push('/'),
                    c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => out.push(c),
                    c => {
                        let _ = write!(out, "\\{c}");
                    }
                }
            }
        }
    }
    out.push_str(")$");
    out
}

/// A user without a password (only its certificate logs it in) and its permissions: session
/// queues of the client ids `client_ids` (a regular expression) only, publishing and
/// subscribing through `amq.topic` within the topics given.
fn user(name: &str, client_ids: &str, write: &[String], read: &[String]) -> [Value; 3] {
    let queues = format!("mqtt-subscription-{client_ids}qos[01]");
    let own = format!("^{queues}$");
    let topic = format!("^(amq\\.topic|{queues})$");
    [
        json!({"name": name, "password_hash": "", "tags": [],
               "hashing_algorithm": "rabbit_password_hashing_sha256"}),
        json!({"user": name, "vhost": "/", "configure": own, "write": topic, "read": topic}),
        json!({"user": name, "vhost": "/", "exchange": "amq.topic",
               "write": routing_key_regex(write), "read": routing_key_regex(read)}),
    ]
}

/// Escapes a client id for a regular expression (ids are `[A-Za-z0-9._-]`).
fn literal(id: &str) -> String {
    id.replace('.', "\\.")
}

/// `definitions.json`'s value for these devices.
pub fn definitions(devices: &[DeviceRecord]) -> Result<Value> {
    let hub = DeviceId::new(HUB_IDENTITY)?;
    let (mut hub_write, mut hub_read) = (Vec::new(), Vec::new());
    for kind in DeviceTopic::ALL {
        let side = if kind.is_upward() {
            &mut hub_read
        } else {
            &mut hub_write
        };
        side.push(acl::every_device(kind));
    }
    hub_write.push(acl::every_group_desired());
    hub_write.push(hub_status_topic(&hub));
    // The hub connects as `outpost-hub.<instance>` (or a random suffix).
    let mut entries = vec![user(
        HUB_IDENTITY,
        &format!("{}\\.[A-Za-z0-9._-]+", literal(HUB_IDENTITY)),
        &hub_write,
        &hub_read,
    )];
    for d in devices {
        let (mut write, mut read) = (Vec::new(), Vec::new());
        for kind in DeviceTopic::ALL {
            let side = if kind.is_upward() {
                &mut write
            } else {
                &mut read
            };
            side.push(device_topic(&d.id, kind));
        }
        read.extend(d.groups.iter().map(group_desired_topic));
        // A device's client id is its id: `<id>qos0`, `<id>qos1` are its queues.
        entries.push(user(d.id.as_str(), &literal(d.id.as_str()), &write, &read));
    }
    let (mut users, mut permissions, mut topic_permissions) = (vec![], vec![], vec![]);
    for [u, p, t] in entries {
        users.push(u);
        permissions.push(p);
        topic_permissions.push(t);
    }
    Ok(json!({
        "vhosts": [{"name": "/"}],
        "users": users,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }))
}

/// `rabbitmq.conf`'s text; every path is absolute.
pub fn conf_text(pki: &PkiPaths, definitions: &Path, settings: &BrokerSettings) -> String {
    let addr = settings.bind.as_deref().unwrap_or("0.0.0.0");
    format!(
        "# Written by outpost-hub broker-config --broker rabbitmq (RabbitMQ 3.10+, rabbitmq_mqtt).\n\
         # No plaintext listener: MQTT over TLS only, client certificates required.\n\
         listeners.tcp = none\n\
         mqtt.listeners.tcp = none\n\
         mqtt.listeners.ssl.default = {addr}:{port}\n\
         mqtt.allow_anonymous = false\n\
         mqtt.vhost = /\n\
         mqtt.exchange = amq.topic\n\
         # The username is the client certificate's CN: the device id, or {HUB_IDENTITY}.\n\
         mqtt.ssl_cert_login = true\n\
         ssl_cert_login_from = common_name\n\
         ssl_options.cacertfile = {ca}\n\
         ssl_options.certfile = {cert}\n\
         ssl_options.keyfile = {key}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n\
         ssl_options.versions.1 = tlsv1.3\n\
         ssl_options.versions.2 = tlsv1.2\n\
         # Small packets (acks) go out at once, as with Mosquitto's set_tcp_nodelay.\n\
         mqtt.tcp_listen_options.nodelay = true\n\
         # Users (one per device, no password) and their topic permissions (the ACL).\n\
         load_definitions = {defs}\n",
        port = settings.port,
        ca = pki.ca_cert().display(),
        cert = pki.broker_cert().display(),
        key = pki.broker_key().display(),
        defs = definitions.display(),
    )
}

/// Writes `OUT/rabbitmq.conf`, `OUT/definitions.json` and `OUT/enabled_plugins` (replacing
/// earlier ones: they are derived).
pub fn write(
    pki_dir: &Path,
    out: &Path,
    settings: &BrokerSettings,
    devices: &[DeviceRecord],
) -> Result<()> {
    let pki = super::broker::checked_pki(pki_dir, settings)?;
    let out = make_dir(out)?;
    for p in [
        pki.ca_cert(),
        pki.broker_cert(),
        pki.broker_key(),
        out.clone(),
    ] {
        // cuttlefish reads a value to the end of its line: no spaces or line breaks.
        if p.to_str()
            .is_none_or(|s| s.chars().any(|c| c.is_whitespace() || c == '#'))
        {
            return Err(HubError::BadFile {
                what: "path for rabbitmq.conf",
                path: p,
                reason: "holds a space, a line break or '#', which rabbitmq.conf cannot".into(),
            });
        }
    }
    let defs_path = out.join("definitions.json");
    let defs = serde_json::to_string_pretty(&definitions(devices)?)
        .map_err(|e| HubError::Pki(format!("definitions: {e}")))?;
    super::broker::replace(&defs_path, &(defs + "\n"))?;
    super::broker::replace(&out.join("enabled_plugins"), "[rabbitmq_mqtt].\n")?;
    super::broker::replace(
        &out.join("rabbitmq.conf"),
        &conf_text(&pki, &defs_path, settings),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::device;

    /// Whether `regex` (as this module writes them: `^(a|b)$` over literal levels and
    /// `[^.]+`) matches `key`: a tiny matcher for exactly that shape.
    fn matches(regex: &str, key: &str) -> bool {
        let body = regex
            .strip_prefix("^(")
            .and_then(|r| r.strip_suffix(")$"))
            .unwrap();
        body.split('|').any(|alt| {
            let levels: Vec<&str> = alt.split("\\.").collect();
            let keys: Vec<&str> = key.split('.').collect();
            levels.len() == keys.len()
                && levels.iter().zip(&keys).all(|(l, k)| {
                    if *l == "[^.]+" {
                        !k.is_empty()
                    } else {
                        l.replace('\\', "") == *k
                    }
                })
        })
    }

    #[test]
    fn topics_become_routing_key_expressions() {
        let re = routing_key_regex(&[
            "outpost/v1/devices/edge.1/state/reported".into(),
            "outpost/v1/devices/+/audit".into(),
        ]);
        assert_eq!(
            re,
            "^(outpost\\.v1\\.devices\\.edge/1\\.state\\.reported|outpost\\.v1\\.devices\\.[^.]+\\.audit)$"
        );
        assert!(matches(&re, "outpost.v1.devices.edge/1.state.reported"));
        assert!(matches(&re, "outpost.v1.devices.*.audit"));
        assert!(!matches(&re, "outpost.v1.devices.edge/1.audit.ack"));
    }

    #[test]
    fn each_device_may_use_only_its_own_topics_and_its_groups_desired_state() {
        let defs = definitions(&[device("edge-1", &["lab"]), device("edge-2", &[])]).unwrap();
        let users: Vec<&str> = defs["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap())
            .collect();
        assert_eq!(users, ["outpost-hub", "edge-1", "edge-2"]);
        assert!(
            defs["users"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u["password_hash"] == "")
        );
        let topic = |user: &str, side: &str| {
            defs["topic_permissions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["user"] == user)
                .unwrap()[side]
                .as_str()
                .unwrap()
                .to_string()
        };
        let (w1, r1) = (topic("edge-1", "write"), topic("edge-1", "read"));
        assert!(matches(&w1, "outpost.v1.devices.edge-1.audit"));
        assert!(matches(&w1, "outpost.v1.devices.edge-1.state.reported"));
        assert!(!matches(&w1, "outpost.v1.devices.edge-2.audit"));
        assert!(!matches(&w1, "outpost.v1.devices.edge-1.audit.ack"));
        assert!(!matches(&w1, "outpost.v1.devices.*.audit"));
        // Chunk requests go on the device's own topic; chunks come back on its own too.
        assert!(matches(&w1, "outpost.v1.devices.edge-1.blobs.get"));
        assert!(!matches(&w1, "outpost.v1.devices.edge-2.blobs.get"));
        assert!(!matches(&w1, "outpost.v1.blobs.get"));
        assert!(matches(&r1, "outpost.v1.devices.edge-1.blobs"));
        assert!(!matches(&r1, "outpost.v1.devices.edge-2.blobs"));
        assert!(matches(&r1, "outpost.v1.devices.edge-1.audit.ack"));
        assert!(matches(&r1, "outpost.v1.groups.lab.state.desired"));
        assert!(!matches(&r1, "outpost.v1.groups.other.state.desired"));
        assert!(!matches(&r1, "outpost.v1.devices.edge-2.audit.ack"));
        assert!(!matches(&r1, "outpost.v1.devices.*.audit.ack"));
        assert!(!matches(
            &topic("edge-2", "read"),
            "outpost.v1.groups.lab.state.desired"
        ));
        // The hub reads every device's upward topics (by wildcard) and writes the downward.
        let (hw, hr) = (topic("outpost-hub", "write"), topic("outpost-hub", "read"));
        assert!(matches(&hr, "outpost.v1.devices.*.audit"));
        assert!(matches(&hr, "outpost.v1.devices.*.blobs.get"));
        assert!(matches(&hw, "outpost.v1.devices.edge-2.blobs"));
        assert!(matches(&hw, "outpost.v1.devices.edge-2.audit.ack"));
        assert!(matches(&hw, "outpost.v1.groups.lab.state.desired"));
        assert!(!matches(&hw, "outpost.v1.devices.edge-2.audit"));
        // Queues: a device's own session queues only.
        let perms = defs["permissions"].as_array().unwrap();
        assert_eq!(perms[1]["configure"], "^mqtt-subscription-edge-1qos[01]$");
        assert_eq!(
            perms[1]["write"],
            "^(amq\\.topic|mqtt-subscription-edge-1qos[01])$"
        );
        assert_eq!(
            perms[0]["configure"],
            "^mqtt-subscription-outpost-hub\\.[A-Za-z0-9._-]+qos[01]$"
        );
    }
}
