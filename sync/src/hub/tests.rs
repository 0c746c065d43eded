//! Unit tests of the hub: the store (migrations, enrollment, refusals), the ACL text and the
//! configuration. The commands as processes, with a real broker, are in `sync/tests/hub.rs`.

use tempfile::TempDir;

use super::broker::acl_text;
use super::config::Config;
use super::store::{DeviceRecord, HubStore, SqliteStore};
use super::*;
use crate::protocol::{DeviceId, GroupId};

pub(super) fn device(id: &str, groups: &[&str]) -> DeviceRecord {
    DeviceRecord {
        enrolled_at: "2026-01-01T00:00:00Z".into(),
        ..DeviceRecord::enrolled(
            DeviceId::new(id).unwrap(),
            groups.iter().map(|g| GroupId::new(g).unwrap()).collect(),
            "ab".repeat(32),
            "local:test",
        )
    }
}

/// Runs `input` against the module and compares what it shows with `expect`.
fn check(input: &str, expect: &str) {
    let got = match input.split_once(' ').unwrap_or((input, "")) {
        ("config", toml) => {
            let dir = TempDir::new().unwrap();
            let path = dir.path().join("hub.toml");
            std::fs::write(&path, toml).unwrap();
            match Config::load(Some(&path)) {
                Ok(c) => format!("ok: {:?}", c.data_dir(None)),
                Err(e) => format!(
                    "err: {}",
                    e.to_string()
                        .replace(&path.display().to_string(), "FILE")
                        .lines()
                        .next()
                        .unwrap_or_default()
                ),
            }
        }
        (other, _) => panic!("unknown input {other}"),
    };
    assert_eq!(got, expect, "input: {input}");
}

#[test]
fn the_store_migrates_enrolls_and_refuses_a_second_enrollment() {
    let dir = TempDir::new().unwrap();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    assert!(store.devices().unwrap().is_empty());
    store.enroll(&device("edge-02", &["lab", "field"])).unwrap();
    store.enroll(&device("edge-01", &[])).unwrap();
    let err = store.enroll(&device("edge-01", &["x"])).unwrap_err();
    assert!(matches!(err, HubError::AlreadyEnrolled(_)), "{err}");
    drop(store);

    // Reopened: same rows, groups sorted, nothing of the refused enrollment.
    let store = SqliteStore::open(dir.path()).unwrap();
    let ids: Vec<String> = store
        .devices()
        .unwrap()
        .iter()
        .map(|d| format!("{}:{:?}", d.id, d.groups))
        .collect();
    assert_eq!(
        ids,
        [
            "edge-01:[]",
            "edge-02:[GroupId(\"field\"), GroupId(\"lab\")]"
        ]
    );
    let one = store.device(&DeviceId::new("edge-02").unwrap()).unwrap();
    assert_eq!(one, Some(device("edge-02", &["field", "lab"])));
    drop(store);

    // A newer schema is refused untouched.
    let conn = rusqlite::Connection::open(dir.path().join(SqliteStore::FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, HubError::Schema { found: 99, .. }), "{err}");
}

#[test]
fn the_acl_confines_devices_and_gives_the_hub_its_role() {
    let acl = acl_text(&[device("edge-01", &["lab"]), device("edge-02", &[])]).unwrap();
    let lines: Vec<&str> = acl
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines,
        [
            "user outpost-hub",
            "topic read outpost/v1/devices/+/status",
            "topic read outpost/v1/devices/+/audit",
            "topic write outpost/v1/devices/+/audit/ack",
            "topic read outpost/v1/devices/+/telemetry",
            "topic read outpost/v1/devices/+/state/reported",
            "topic write outpost/v1/devices/+/state/desired",
            "topic write outpost/v1/devices/+/blobs",
            "topic read outpost/v1/devices/+/blobs/get",
            "topic write outpost/v1/groups/+/state/desired",
            "topic write outpost/v1/hubs/outpost-hub/status",
            "user edge-01",
            "topic read outpost/v1/groups/lab/state/desired",
            "user edge-02",
            "pattern write outpost/v1/devices/%u/status",
            "pattern write outpost/v1/devices/%u/audit",
            "pattern read outpost/v1/devices/%u/audit/ack",
            "pattern write outpost/v1/devices/%u/telemetry",
            "pattern write outpost/v1/devices/%u/state/reported",
            "pattern read outpost/v1/devices/%u/state/desired",
            "pattern read outpost/v1/devices/%u/blobs",
            "pattern write outpost/v1/devices/%u/blobs/get",
        ]
    );
}

#[test]
fn config_is_strict_and_names_the_key() {
    check("config ", "ok: \"/var/lib/outpost-hub\"");
    check("config [hub]\ndata_dir = \"/srv/hub\"", "ok: \"/srv/hub\"");
    check(
        "config [hub]\ndata_dri = \"/srv/hub\"",
        "err: config FILE: TOML parse error at line 2, column 1",
    );
    check(
        "config [hubs]\n",
        "err: config FILE: TOML parse error at line 1, column 2",
    );
    check(
        "config [hub]\nbroker = \"mqtt://h\"",
        "err: config FILE: [hub] allow_plaintext: broker \"mqtt://h\" is plaintext MQTT; set allow_plaintext = true to allow it",
    );
    check(
        "config [hub]\nbroker = \"mqtts://h\"",
        "err: config FILE: [hub] ca: broker \"mqtts://h\" uses TLS and needs `ca` (a PEM file)",
    );
    check(
        "config [hub]\nca = \"/x\"",
        "err: config FILE: [hub] broker: is missing while ca, cert, key or allow_plaintext is set",
    );
    check(
        "config [hub]\nbroker = \"mqtt://h\"\nallow_plaintext = true",
        "ok: \"/var/lib/outpost-hub\"",
    );
    check(
        "config [hub]\ninstance = \"a/b\"",
        "err: config FILE: [hub] instance: \"a/b\" is not 1 to 52 of A-Z, a-z, 0-9, '.', '_', '-'",
    );
    check(
        &format!("config [hub]\ninstance = \"{}\"", "a".repeat(53)),
        &format!(
            "err: config FILE: [hub] instance: \"{}\" is not 1 to 52 of A-Z, a-z, 0-9, '.', '_', '-'",
            "a".repeat(53)
        ),
    );
    check(
        &format!("config [hub]\ninstance = \"{}\"", "a".repeat(52)),
        "ok: \"/var/lib/outpost-hub\"",
    );
    check(
        "config [hub]\nstore = \"postgres://hub@db.example/outpost\"",
        "ok: \"/var/lib/outpost-hub\"",
    );
    check(
        "config [hub]\nstore = \"/srv/hub.db\"",
        "err: config FILE: [hub] store: must be a postgres://user@host/database URL",
    );
    check(
        "config [hub]\nstore = \"postgres://hub@db.example\"",
        "err: config FILE: [hub] store: names no database (postgres://user@host/DATABASE)",
    );
    check(
        "config [hub]\nstore = \"postgres://hub@db.example:notaport/x\"",
        "err: config FILE: [hub] store: invalid connection string",
    );
    check(
        "config [hub]\nlisten = \"localhost\"",
        "err: config FILE: [hub] listen: \"localhost\" is not an address and port (127.0.0.1:9102): invalid socket address syntax",
    );
    check(
        "config [hub]\nlisten = \"[::1]:9102\"",
        "ok: \"/var/lib/outpost-hub\"",
    );
}

#[test]
fn serve_needs_a_broker_and_gets_a_client_id_of_its_own() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("hub.toml");
    let settings = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path))
            .unwrap()
            .serve_settings(None)
            .map(|s| s.link.client_id.to_string())
            .map_err(|e| e.to_string().replace(&path.display().to_string(), "FILE"))
    };
    assert_eq!(
        settings("[hub]\n"),
        Err("config FILE: [hub] broker: is required by serve".into())
    );
    assert_eq!(
        Config::default()
            .serve_settings(None)
            .unwrap_err()
            .to_string(),
        "config (none): serve needs --config FILE with [hub] broker (and ca, cert, key)"
    );
    let plain = "[hub]\nbroker = \"mqtt://127.0.0.1:1883\"\nallow_plaintext = true\n";
    assert_eq!(
        settings(&format!("{plain}instance = \"hub-a\"\n")),
        Ok("outpost-hub.hub-a".into())
    );
    // Without an instance, a random id each time: two hubs never share one.
    let (a, b) = (settings(plain).unwrap(), settings(plain).unwrap());
    assert_ne!(a, b);
    for id in [a, b] {
        let hex = id.strip_prefix("outpost-hub.").unwrap();
        assert_eq!(hex.len(), 16, "{id}");
        assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
}

#[test]
fn the_broker_takes_no_packet_the_links_would_refuse() {
    let link = crate::conn::LinkConfig::new("mqtts://h", DeviceId::new("x").unwrap());
    assert_eq!(super::broker::MAX_PACKET_SIZE, link.max_packet_size);
    assert!(crate::protocol::MAX_AUDIT_BATCH_BYTES <= link.max_packet_size);
}

/// Seqs of `edge-01`'s stored records that `q` selects, through the read-only store.
fn audit_seqs(dir: &std::path::Path, q: outpost_policy::audit::Query) -> Vec<i64> {
    let store = SqliteStore::open_read_only(dir).unwrap();
    let mut seqs = Vec::new();
    store
        .for_each_audit_record(&DeviceId::new("edge-01").unwrap(), &q, &mut |r| {
            seqs.push(r.seq);
            Ok(())
        })
        .unwrap();
    seqs
}

#[test]
fn audit_reads_filter_page_and_never_write() {
    use outpost_policy::audit::{Outcome, Query};
    let dir = TempDir::new().unwrap();
    // Read-only: nothing there is an error, and nothing is created.
    let err = SqliteStore::open_read_only(dir.path()).unwrap_err();
    assert!(err.to_string().contains("no hub store here"), "{err}");
    assert!(!dir.path().join(SqliteStore::FILE).exists());

    let mut store = SqliteStore::open(dir.path()).unwrap();
    store.enroll(&device("edge-01", &[])).unwrap();
    store.enroll(&device("edge-02", &[])).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join(SqliteStore::FILE)).unwrap();
    for (device, seq) in (1..=10).map(|s| ("edge-01", s)).chain([("edge-02", 3)]) {
        let outcome = if seq % 2 == 0 { "denied" } else { "allowed" };
        conn.execute(
            "INSERT INTO audit_records VALUES (?1, ?2, '{}', 'h', 'now', ?3, ?4, 'x:y', ?5)",
            rusqlite::params![
                device,
                seq,
                format!("2026-01-01T00:00:{seq:02}.000Z"),
                if seq <= 5 { "alice" } else { "bob" },
                outcome
            ],
        )
        .unwrap();
    }
    drop(conn);

    let q = Query::default;
    assert_eq!(audit_seqs(dir.path(), q()), (1..=10).collect::<Vec<_>>());
    for (query, want) in [
        (
            Query {
                limit: Some(3),
                ..q()
            },
            vec![1, 2, 3],
        ),
        (
            Query {
                limit: Some(3),
                newest: true,
                ..q()
            },
            vec![8, 9, 10],
        ),
        (
            Query {
                newest: true,
                ..q()
            },
            (1..=10).collect(),
        ),
        (
            Query {
                after_seq: Some(7),
                ..q()
            },
            vec![8, 9, 10],
        ),
        (
            Query {
                after_seq: Some(2),
                limit: Some(2),
                ..q()
            },
            vec![3, 4],
        ),
        (
            Query {
                since: Some("2026-01-01T00:00:04.000Z".into()),
                until: Some("2026-01-01T00:00:07.000Z".into()),
                ..q()
            },
            vec![4, 5, 6],
        ),
        (
            Query {
                actor: Some("bob".into()),
                outcome: Some(Outcome::Denied),
                ..q()
            },
            vec![6, 8, 10],
        ),
        (
            Query {
                action: Some("x:y' OR '1'='1".into()),
                ..q()
            },
            vec![],
        ),
    ] {
        assert_eq!(audit_seqs(dir.path(), query.clone()), want, "{query:?}");
    }

    // The read-only store refuses to write, and refuses a schema it does not know exactly.
    let mut ro = SqliteStore::open_read_only(dir.path()).unwrap();
    let err = ro.enroll(&device("edge-03", &[])).unwrap_err();
    assert!(err.to_string().contains("readonly"), "{err}");
    drop(ro);
    for (version, says) in [
        (1, "older than this hub's"),
        (99, "newer than this hub knows"),
    ] {
        let conn = rusqlite::Connection::open(dir.path().join(SqliteStore::FILE)).unwrap();
        conn.pragma_update(None, "user_version", version).unwrap();
        drop(conn);
        let err = SqliteStore::open_read_only(dir.path()).unwrap_err();
        assert!(err.to_string().contains(says), "{version}: {err}");
    }
}

#[test]
fn processes_opening_a_fresh_hub_db_at_once_migrate_it_once() {
    // `serve` and `devices enroll` started together on a new data directory: before the
    // version was read inside the migrating transaction, both applied migration 2 and one
    // failed with "duplicate column name".
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
        let opened: Vec<_> = (0..6)
            .map(|_| {
                let (path, barrier) = (dir.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    SqliteStore::open(&path)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for t in opened {
            assert_eq!(t.join().unwrap(), Ok(()));
        }
    }
}
