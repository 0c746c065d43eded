//! `[sync]` in the configuration and `outpost sync status`, without a broker: what
//! `config check` accepts and refuses (exit 78, one line naming the file and the key), and
//! the status a fresh device reports (read-only: no `outbox.db` is created).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::support::Device;

const ID: &str = "edge-01";

/// A CA and the device's certificate and key, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Pki {
    /// A CA, and a device certificate `<id>.pem` (CN = `id`) with its key `<id>.key`.
    fn new(dir: &Path, id: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Outpost test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let mut pki = Pki {
            ca,
            cert: PathBuf::new(),
            key: PathBuf::new(),
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
        };
        (pki.cert, pki.key) = pki.leaf(id, id);
        pki
    }

    /// A client certificate for `cn`, written as `<name>.pem` and `<name>.key`.
    fn leaf(&self, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// The config text: `[device] id` and a `[sync]` with these files and extra lines.
fn config(id: &str, broker: &str, ca: &Path, cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[device]\nid = \"{id}\"\n\n[sync]\nbroker = \"{broker}\"\nca = \"{}\"\ncert = \"{}\"\n\
         key = \"{}\"\n{extra}",
        ca.display(),
        cert.display(),
        key.display()
    )
}

#[test]
fn config_check_accepts_a_valid_sync_section_and_names_the_key_of_each_problem() {
    let d = Device::new();
    let pki = Pki::new(&d.root.path().join("pki"), ID);
    let broker = "mqtts://hub.example:8883";
    let write = |text: &str| std::fs::write(&d.config, text).unwrap();
    let config_file = d.config.display().to_string();

    write(&config(ID, broker, &pki.ca, &pki.cert, &pki.key, ""));
    let v = d.run(&["config", "check", "--json"]).json();
    assert_eq!(v["config"]["sync"]["broker"], broker);
    assert_eq!(v["config"]["sync"]["batch_max_records"], 500);
    assert_eq!(v["config"]["sync"]["telemetry_quota_bytes"], 8_388_608);
    d.run(&["config", "check"]).ok();

    let fails = |text: String, expect: &str| {
        write(&text);
        let r = d.run(&["config", "check"]);
        r.fails(78, expect);
        assert!(r.stderr.contains(&config_file), "{r:#?}");
    };
    // Plaintext without allow_plaintext.
    fails(
        config(
            ID,
            "mqtt://hub.example:1883",
            &pki.ca,
            &pki.cert,
            &pki.key,
            "",
        ),
        "key `sync.broker`: 'mqtt://hub.example:1883' is plaintext MQTT",
    );
    // A certificate file that is not there.
    let missing = pki.dir.join("missing.pem");
    fails(
        config(ID, broker, &pki.ca, &missing, &pki.key, ""),
        &format!("key `sync.cert`: reading cert {}", missing.display()),
    );
    // The key of another certificate.
    let (_, other_key) = pki.leaf("other", ID);
    fails(
        config(ID, broker, &pki.ca, &pki.cert, &other_key, ""),
        &format!(
            "key `sync.key`: key {} does not belong to certificate {}",
            other_key.display(),
            pki.cert.display()
        ),
    );
    // A certificate whose CN is not the device id.
    fails(
        config("edge-02", broker, &pki.ca, &pki.cert, &pki.key, ""),
        "key `sync.cert`: certificate",
    );
    write(&config("edge-02", broker, &pki.ca, &pki.cert, &pki.key, ""));
    let r = d.run(&["config", "check"]);
    assert!(
        r.stderr
            .contains("its CN is Some(\"edge-01\"), the device id is \"edge-02\""),
        "{r:#?}"
    );
    // An unknown key in [sync], with its line.
    fails(
        config(ID, broker, &pki.ca, &pki.cert, &pki.key, "retries = 3\n"),
        ":9: key `sync.retries`: unknown field `retries`",
    );
    // The daemon refuses the same before binding anything.
    write(&config(ID, broker, &pki.ca, &missing, &pki.key, ""));
    d.run(&["daemon"]).fails(78, "key `sync.cert`");
}

#[test]
fn sync_status_on_a_fresh_device_reads_the_audit_log_and_creates_nothing() {
    let d = Device::new();
    let pki = Pki::new(&d.root.path().join("pki"), ID);
    let text = config(
        ID,
        "mqtts://hub.example:8883",
        &pki.ca,
        &pki.cert,
        &pki.key,
        "",
    );
    std::fs::write(&d.config, text).unwrap();
    let outbox = d.data.join("outbox.db");

    // Nothing at all yet: no data directory.
    let v = d.run(&["sync", "status", "--json"]).json();
    assert_eq!(v["configured"], true, "{v}");
    assert_eq!(v["connected"], false);
    assert_eq!(v["last_acked_seq"], 0);
    assert_eq!(v["pending_records"], 0);
    assert_eq!(v["telemetry_queued_bytes"], 0);
    assert_eq!(v["telemetry_dropped"], 0);
    assert_eq!(v["last_error"], serde_json::Value::Null);
    assert!(!d.data.exists(), "sync status created the data directory");

    // A few audited actions: each token check is recorded (here, as refused).
    for _ in 0..3 {
        let r = d.run(&[
            "auth",
            "check",
            "--token",
            "not-a-token",
            "--action",
            "device:read",
        ]);
        assert_eq!(r.code, Some(1), "{r:#?}");
    }
    let records = d.run(&["audit", "query", "--json"]).json();
    let count = records.as_array().map(Vec::len).unwrap_or(0) as u64;
    assert!(count >= 3, "the token checks were not audited: {records}");

    let v = d.run(&["sync", "status", "--json"]).json();
    assert_eq!(v["configured"], true);
    assert_eq!(v["connected"], false);
    assert_eq!(v["last_acked_seq"], 0);
    assert_eq!(v["pending_records"], count, "{v}");
    assert!(!outbox.exists(), "sync status created {}", outbox.display());

    let text = d.run(&["sync", "status"]).ok().to_string();
    assert!(text.contains("not connected"), "{text}");
    assert!(
        text.contains(&format!("{count} of {count} records pending")),
        "{text}"
    );
    assert!(!outbox.exists());
}

#[test]
fn sync_status_without_a_sync_section_says_so() {
    let d = Device::new();
    let v = d.run(&["sync", "status", "--json"]).json();
    assert_eq!(v, serde_json::json!({ "configured": false }));
    let text = d.run(&["sync", "status"]).ok().to_string();
    assert!(text.contains("Sync is not configured"), "{text}");
    assert!(!d.data.join("outbox.db").exists());
}

#[test]
fn the_example_configs_sync_block_is_valid_with_real_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join("deploy/config/outpost.toml")).unwrap();
    let d = Device::new();
    let pki = Pki::new(&d.root.path().join("pki"), "edge-0042");
    // The `## [sync]` block, uncommented, after the example's `[device] id`.
    let block: Vec<&str> = example
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .filter(|l| l.contains(" = ") || *l == "[sync]" || *l == "[[sync.release_keys]]")
        .collect();
    outpost_policy::signing::KeyPair::generate()
        .unwrap()
        .public()
        .write(&pki.dir.join("release-1.pub.pem"))
        .unwrap();
    assert!(block.len() >= 10, "{block:?}");
    let text = format!("[device]\nid = \"edge-0042\"\n{}\n", block.join("\n"))
        .replace("/etc/outpost/pki", pki.dir.to_str().unwrap());
    std::fs::write(&d.config, &text).unwrap();
    let v = d.run(&["config", "check", "--json"]).json();
    assert_eq!(
        v["config"]["sync"]["broker"], "mqtts://hub.example:8883",
        "{text}"
    );
    assert_eq!(v["config"]["sync"]["batch_max_bytes"], 131_072);
    assert_eq!(v["config"]["sync"]["release_keys"][0]["kid"], "release-1");
    assert!(pki.ca.exists());
}

#[test]
fn config_check_reads_every_release_key_and_refuses_bad_ones() {
    let d = Device::new();
    let pki = Pki::new(&d.root.path().join("pki"), ID);
    let broker = "mqtts://hub.example:8883";
    let good = pki.dir.join("release-1.pub.pem");
    outpost_policy::signing::KeyPair::generate()
        .unwrap()
        .public()
        .write(&good)
        .unwrap();
    let not_a_key = pki.dir.join("garbage.pub.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let keys = |entries: &[(&str, &Path)]| {
        entries
            .iter()
            .map(|(kid, p)| {
                format!(
                    "[[sync.release_keys]]\nkid = \"{kid}\"\npublic_key = \"{}\"\n",
                    p.display()
                )
            })
            .collect::<String>()
    };
    let write = |extra: String| {
        std::fs::write(
            &d.config,
            config(ID, broker, &pki.ca, &pki.cert, &pki.key, &extra),
        )
        .unwrap()
    };
    write(keys(&[("release-1", &good), ("release-2", &good)]));
    let v = d.run(&["config", "check", "--json"]).json();
    assert_eq!(v["config"]["sync"]["release_keys"][1]["kid"], "release-2");
    let missing = pki.dir.join("missing.pub.pem");
    for (extra, expect) in [
        (
            keys(&[("release-1", &good), ("release-1", &good)]),
            "key `sync.release_keys`: kid 'release-1' is listed twice",
        ),
        (
            keys(&[("release-1", &missing)]),
            "key `sync.release_keys`: kid 'release-1': reading",
        ),
        (
            keys(&[("release-1", &not_a_key)]),
            "not an Ed25519 public key",
        ),
        (keys(&[("bad kid", &good)]), "kid 'bad kid' must be"),
    ] {
        write(extra);
        d.run(&["config", "check"]).fails(78, expect);
        d.run(&["daemon"]).fails(78, "sync.release_keys");
    }
}
