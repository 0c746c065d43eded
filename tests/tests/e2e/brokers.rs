//! Sync on a second broker: RabbitMQ's MQTT plugin (3.10 on this machine), a node of the
//! test's own configured by `outpost-hub broker-config --broker rabbitmq` (TLS, certificate
//! logins, the fleet's ACL as topic permissions), with the hub on plain subscriptions (the
//! plugin has no shared ones; `docs/brokers.md`). What the protocol needs from a broker:
//! QoS 1 both ways, a last will, retained messages on exact topics, and an ACL by
//! certificate identity.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_engine::testing::GgufBuilder;
use serde_json::Value;

use crate::daemon::Agent;
use crate::fleet::{DEVICE, Fleet, append_records, assert_drained, sync_status, writer};

const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";

/// Waits up to `limit` for `done`, else fails with `what` and the fleet's logs.
fn wait(fleet: &Fleet, limit: Duration, what: &str, done: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}\n{}", fleet.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `mosquitto_pub` with the enrolled device's certificate: whether the broker took it.
fn publish_as_device(fleet: &Fleet, topic: &str) -> bool {
    let certs = fleet.dir.path().join("devices");
    let port = fleet.port().to_string();
    let out = Command::new(MOSQUITTO_PUB)
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-i", "acl-probe"])
        .arg("--cafile")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{DEVICE}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{DEVICE}.key")))
        .args(["-t", topic, "-m", "{}"])
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn rabbitmq_carries_uploads_acks_wills_and_desired_state_and_enforces_the_acl() {
    let Some(mut fleet) = Fleet::rabbitmq() else {
        return;
    };
    let mut agent = Agent::new("");
    let keys = fleet.dir.path().join("release");
    agent
        .d
        .run(&[
            "keys",
            "generate",
            "--out",
            keys.to_str().unwrap(),
            "--name",
            "release-1",
        ])
        .ok();
    let config = std::fs::read_to_string(&agent.d.config).unwrap();
    std::fs::write(
        &agent.d.config,
        config.replace("id = \"edge-1\"\n", "id = \"edge-1\"\ngroups = [\"lab\"]\n"),
    )
    .unwrap();
    fleet.enroll(
        &agent,
        &format!(
            "[[sync.release_keys]]\nkid = \"release-1\"\npublic_key = \"{}\"",
            keys.join("release-1.pub.pem").display()
        ),
    );
    // The definitions list each enrolled device: the node starts after the enrollment.
    fleet.start_broker();
    fleet.start_hub();
    agent.start();
    append_records(&agent, 2000);

    // QoS 1 up, acks down, through a broker killed and restarted while records are written.
    let w = writer(&agent);
    std::thread::sleep(Duration::from_millis(1500));
    fleet.kill_broker();
    std::thread::sleep(Duration::from_millis(500));
    fleet.start_broker();
    std::thread::sleep(Duration::from_millis(1500));
    w.signal("KILL");
    drop(w);
    assert_drained(&fleet, &agent, Duration::from_secs(120));

    // The last will: the agent killed, the broker says so for it, the hub records it.
    let online = |fleet: &Fleet| -> Value {
        fleet.hub_cli(&["devices", "list", "--json"]).json()[0]["online"].clone()
    };
    wait(
        &fleet,
        Duration::from_secs(30),
        "device online",
        &mut || online(&fleet) == true,
    );
    agent.signal("KILL");
    let _ = agent.wait(Duration::from_secs(5));
    wait(
        &fleet,
        Duration::from_secs(30),
        "the last will marks the device offline",
        &mut || online(&fleet) == false,
    );

    // A rollout started while the device is away reaches it as a retained message on its
    // group's topic (an exact topic: the plugin keeps retained messages for those).
    let model = fleet.dir.path().join("tiny.gguf");
    std::fs::write(&model, GgufBuilder::tiny_llama().build()).unwrap();
    let key = keys.join("release-1.key.pem");
    fleet
        .hub_cli(&[
            "models",
            "publish",
            model.to_str().unwrap(),
            "--name",
            "tiny",
            "--version",
            "1",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .ok();
    let started = fleet
        .hub_cli(&[
            "rollout",
            "start",
            "--model",
            "tiny:1",
            "--target",
            "group:lab",
            "--key",
            key.to_str().unwrap(),
            "--kid",
            "release-1",
        ])
        .json();
    assert_eq!(started["rollout"], 1, "{started}");
    // The hub publishes it within a second of the start; the agent comes back after that.
    std::thread::sleep(Duration::from_secs(3));
    agent.start();
    wait(
        &fleet,
        Duration::from_secs(60),
        "the device accepts the retained desired state",
        &mut || sync_status(&agent)["desired"]["rollout"] == 1,
    );
    wait(
        &fleet,
        Duration::from_secs(30),
        "device online",
        &mut || online(&fleet) == true,
    );

    // The ACL, from the device's own certificate: its own topics only.
    if std::path::Path::new(MOSQUITTO_PUB).exists() {
        assert!(
            publish_as_device(&fleet, "outpost/v1/devices/edge-1/telemetry"),
            "the device may publish its own telemetry\n{}",
            fleet.logs()
        );
        for topic in [
            "outpost/v1/devices/edge-2/audit",
            "outpost/v1/groups/lab/state/desired",
            "outpost/v1/devices/edge-1/audit/ack",
        ] {
            assert!(
                !publish_as_device(&fleet, topic),
                "the broker let {DEVICE} publish on {topic}"
            );
        }
    }
}
