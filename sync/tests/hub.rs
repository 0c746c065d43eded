//! `outpost-hub` as a real process: PKI, enrollment and the broker configuration it writes,
//! run by a real Mosquitto (`/usr/sbin/mosquitto`), with `sync::conn::Link` clients over
//! mTLS (harness in `support/`). Without Mosquitto the broker test skips with a printed
//! reason, except under `CI=true`. `serve` is tested in `serve.rs`.

// A test binary: its helpers panic on what they cannot set up.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use outpost_policy::audit::{AuditReader, Outcome, Query, verify_log};
use outpost_policy::signing::KeyPair;
use outpost_sync::conn::{Link, LinkEvent};
use outpost_sync::protocol::{DeviceId, DeviceTopic, hub_status_topic};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair as RcKey};
use support::*;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

#[test]
fn hostile_input_is_refused_with_clear_errors() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    ok(&hub(dir, &["pki", "init", "--out", "pki"]));
    let key = audit_key(dir, "dev");
    let key = key.to_str().unwrap();

    let (code, err) = failed(&hub(dir, &["pki", "init", "--out", "pki"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("ca.pem already exists; refusing to overwrite"),
        "{err}"
    );

    let enroll = |id: &str, key: &str| {
        hub(
            dir,
            &[
                "--data-dir",
                "data",
                "devices",
                "enroll",
                "--id",
                id,
                "--audit-key",
                key,
                "--pki",
                "pki",
                "--out",
                "out",
            ],
        )
    };
    for bad in ["bad/id", "", "a b", &"x".repeat(65), "é"] {
        let (code, err) = failed(&enroll(bad, key));
        assert_eq!(code, 1, "{bad:?}");
        assert!(err.contains("is not a valid id"), "{bad:?}: {err}");
    }
    let (code, err) = failed(&enroll("edge-01", "missing.pem"));
    assert_eq!(code, 1);
    assert!(
        err.contains("missing.pem") && err.contains("No such file"),
        "{err}"
    );
    let (code, err) = failed(&enroll("edge-01", "pki/ca.pem"));
    assert_eq!(code, 1);
    assert!(err.contains("not an Ed25519 public key"), "{err}");
    // Nothing of a refused enrollment exists.
    assert!(!dir.join("out/edge-01.pem").exists());

    ok(&enroll("edge-01", key));
    let (code, err) = failed(&enroll("edge-01", key));
    assert_eq!(code, 1);
    assert!(err.contains("device edge-01 is already enrolled"), "{err}");

    // A bad group, a configuration with an unknown key (exit 78, naming file and key).
    let (code, err) = failed(&hub(
        dir,
        &[
            "--data-dir",
            "data",
            "devices",
            "enroll",
            "--id",
            "edge-02",
            "--group",
            "x/y",
            "--audit-key",
            key,
            "--pki",
            "pki",
            "--out",
            "out",
        ],
    ));
    assert_eq!(code, 1);
    assert!(err.contains("group id \"x/y\" is not a valid id"), "{err}");
    std::fs::write(dir.join("hub.toml"), "[hub]\ndata_dri = \"x\"\n").unwrap();
    let (code, err) = failed(&hub(dir, &["--config", "hub.toml", "devices", "list"]));
    assert_eq!(code, 78);
    assert!(
        err.contains("hub.toml") && err.contains("data_dri"),
        "{err}"
    );
    std::fs::write(dir.join("hub.toml"), "[hub]\nbroker = \"mqtt://h:1883\"\n").unwrap();
    let (code, err) = failed(&hub(dir, &["--config", "hub.toml", "devices", "list"]));
    assert_eq!(code, 78);
    assert!(err.contains("allow_plaintext"), "{err}");
    // A rate limit that would drop everything (or nothing: NaN) is refused by name.
    for bad in ["ingest_rate = 0", "ingest_burst = -5", "ingest_rate = nan"] {
        std::fs::write(dir.join("hub.toml"), format!("[hub]\n{bad}\n")).unwrap();
        let (code, err) = failed(&hub(dir, &["--config", "hub.toml", "devices", "list"]));
        assert_eq!(code, 78, "{bad}: {err}");
        let key = bad.split(' ').next().unwrap();
        assert!(
            err.contains(key) && err.contains("at least 1"),
            "{bad}: {err}"
        );
    }
    let (code, _) = failed(&hub(dir, &["devices", "enroll", "--id", "x"]));
    assert_eq!(code, 2);

    // devices list.
    let list = ok(&hub(
        dir,
        &["--data-dir", "data", "devices", "list", "--json"],
    ));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{"id": "edge-01", "groups": [], "online": null, "last_seen": null,
            "agent_version": null, "active_model": null, "acked_seq": null, "audit_lag": null}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_config_confines_each_device() {
    if mosquitto().is_none() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    ok(&hub(
        dir,
        &["pki", "init", "--out", "pki", "--broker-host", "hub.test"],
    ));
    for (id, group) in [("dev-A", "lab"), ("dev-B", "field")] {
        let key = audit_key(dir, id);
        ok(&hub(
            dir,
            &[
                "--data-dir",
                "data",
                "devices",
                "enroll",
                "--id",
                id,
                "--group",
                group,
                "--audit-key",
                key.to_str().unwrap(),
                "--pki",
                "pki",
                "--out",
                "out",
            ],
        ));
    }
    let port = free_port();
    let port_s = port.to_string();
    ok(&hub(
        dir,
        &[
            "--data-dir",
            "data",
            "broker-config",
            "--pki",
            "pki",
            "--port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--out",
            "broker",
        ],
    ));
    let conf = std::fs::read_to_string(dir.join("broker/mosquitto.conf")).unwrap();
    for line in [
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
    ] {
        assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
    }
    assert_eq!(conf.matches("listener ").count(), 1, "{conf}");
    // Run from elsewhere: every path in the file is absolute.
    let _broker = Mosquitto::start(
        &dir.join("broker/mosquitto.conf"),
        port,
        &dir.join("mosquitto.log"),
    );

    // Certificates: CN = id, signed by the CA.
    for id in ["dev-A", "dev-B"] {
        let pem = dir.join(format!("out/{id}.pem"));
        let subject = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(&pem)
            .output()
            .unwrap();
        let subject = String::from_utf8_lossy(&subject.stdout);
        assert!(subject.contains(&format!("CN = {id}")), "{subject}");
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(dir.join("out/ca.pem"))
            .arg(&pem)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(format!("out/{id}.key")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let stop = CancellationToken::new();
    let ca = dir.join("pki/ca.pem");
    let hub_id = DeviceId::new("outpost-hub").unwrap();
    let mut watcher = connect(
        &link_config(
            port,
            "outpost-hub",
            &ca,
            &dir.join("pki/hub.pem"),
            &dir.join("pki/hub.key"),
        ),
        session(
            hub_status_topic(&hub_id),
            vec!["outpost/v1/devices/+/audit".into()],
        ),
        &stop,
    )
    .await;
    let device = |id: &str, extra: Vec<String>| {
        let mut subs = vec![topic(id, DeviceTopic::AuditAck)];
        subs.extend(extra);
        (
            link_config(
                port,
                id,
                &dir.join("out/ca.pem"),
                &dir.join(format!("out/{id}.pem")),
                &dir.join(format!("out/{id}.key")),
            ),
            session(topic(id, DeviceTopic::Status), subs),
        )
    };
    // A also subscribes to B's topics, both ways: the broker must deliver none of them.
    let (config_a, session_a) = device(
        "dev-A",
        vec![
            topic("dev-B", DeviceTopic::AuditAck),
            topic("dev-B", DeviceTopic::Audit),
            "outpost/v1/devices/+/audit".into(),
        ],
    );
    let mut a = connect(&config_a, session_a, &stop).await;
    let (config_b, session_b) = device("dev-B", vec![]);
    let mut b = connect(&config_b, session_b, &stop).await;

    // A writes to B's audit topic (dropped), then to its own (delivered): the hub sees only
    // the second, and since a client's messages arrive in order, the first was not sent on.
    publish(&mut a, &topic("dev-B", DeviceTopic::Audit), b"forged").await;
    publish(&mut a, &topic("dev-A", DeviceTopic::Audit), b"genuine").await;
    let seen = received(&mut watcher, 5000, Some(b"genuine")).await;
    assert_eq!(
        seen,
        [(topic("dev-A", DeviceTopic::Audit), b"genuine".to_vec())]
    );
    // B's own topic works.
    publish(&mut b, &topic("dev-B", DeviceTopic::Audit), b"from B").await;
    let seen = received(&mut watcher, 5000, Some(b"from B")).await;
    assert_eq!(
        seen,
        [(topic("dev-B", DeviceTopic::Audit), b"from B".to_vec())]
    );

    // The hub acks both; A gets its own ack and never B's, though it subscribed to it, nor
    // B's audit batch above (A's messages arrive in order, so "from B" would come first).
    publish(
        &mut watcher,
        &topic("dev-B", DeviceTopic::AuditAck),
        b"ack B",
    )
    .await;
    publish(
        &mut watcher,
        &topic("dev-A", DeviceTopic::AuditAck),
        b"ack A",
    )
    .await;
    let seen_b = received(&mut b, 5000, Some(b"ack B")).await;
    assert_eq!(
        seen_b,
        [(topic("dev-B", DeviceTopic::AuditAck), b"ack B".to_vec())]
    );
    let seen_a = received(&mut a, 5000, Some(b"ack A")).await;
    assert_eq!(
        seen_a,
        [(topic("dev-A", DeviceTopic::AuditAck), b"ack A".to_vec())]
    );
    let late = received(&mut a, 500, None).await;
    assert!(late.is_empty(), "A received {late:?}");

    // A certificate from another CA, even with an enrolled device's CN, cannot connect.
    let other_key = RcKey::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "Outpost fleet CA");
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&other_key).unwrap();
    let other = Issuer::new(params, other_key);
    let leaf_key = RcKey::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "dev-A");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&leaf_key, &other).unwrap();
    std::fs::write(dir.join("foreign.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("foreign.key"), leaf_key.serialize_pem()).unwrap();
    let foreign = link_config(
        port,
        "dev-A",
        &ca,
        &dir.join("foreign.pem"),
        &dir.join("foreign.key"),
    );
    let (_h, mut events, _t) = Link::spawn(
        &foreign,
        session(topic("dev-A", DeviceTopic::Status), vec![]),
        stop.clone(),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut failures = 0;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        match event {
            LinkEvent::Connected => panic!("a certificate from another CA connected"),
            LinkEvent::ConnectFailed { .. } => failures += 1,
            _ => {}
        }
    }
    assert!(failures > 0, "no ConnectFailed within 3 s");
    stop.cancel();

    // Both enrollments are in the hub's own chain, intent then outcome, and it verifies
    // against the hub's key.
    let reader = AuditReader::open(&dir.join("data/audit.db")).unwrap();
    let records = reader
        .query(&Query {
            action: Some("devices:enroll".into()),
            ..Query::default()
        })
        .unwrap();
    let seen: Vec<(Option<String>, Outcome)> = records
        .iter()
        .map(|r| (r.resource.clone(), r.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("dev-A".into()), Outcome::Allowed),
            (Some("dev-A".into()), Outcome::Success),
            (Some("dev-B".into()), Outcome::Allowed),
            (Some("dev-B".into()), Outcome::Success),
        ]
    );
    assert!(records.iter().all(|r| r.device_id == "outpost-hub"));
    let hub_key = KeyPair::load(&dir.join("data/hub-audit.key")).unwrap();
    let report = verify_log(&reader, Some(&hub_key.public())).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.signed_through, Some(4), "{report:?}");
}
