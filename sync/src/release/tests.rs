#![allow(clippy::unwrap_used)]

use super::*;

const NOW: i64 = 1_800_000_000;

/// A change made to a document.
type Edit<T> = Box<dyn Fn(&mut T)>;

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn grp(s: &str) -> GroupId {
    GroupId::new(s).unwrap()
}

fn manifest(key: &KeyPair, kid: &str) -> Manifest {
    let mut m = Manifest {
        name: "smollm2".into(),
        version: "1.0".into(),
        release: 1,
        sha256: "ab".repeat(32),
        size: 250,
        chunk_size: 100,
        chunk_sha256: vec!["01".repeat(32), "02".repeat(32), "03".repeat(32)],
        architecture: "llama".into(),
        quantization: "q8_0".into(),
        expires: NOW + 3600,
        signatures: Vec::new(),
    };
    m.sign(key, kid).unwrap();
    m
}

fn desired(key: &KeyPair, kid: &str, target: &str, version: u64) -> DesiredState {
    let mut d = DesiredState {
        v: V1,
        rollout: 1,
        version,
        target: Target::parse(target).unwrap(),
        model: "smollm2:1.0".into(),
        manifest: manifest(key, kid),
        alias: "default".into(),
        activate: true,
        issued_at: NOW - 10,
        expires: NOW + 600,
        signatures: Vec::new(),
    };
    d.sign(key, kid).unwrap();
    d
}

struct Fixture {
    key: KeyPair,
    keys: PinnedKeys,
}

fn fixture() -> Fixture {
    let key = KeyPair::generate().unwrap();
    let mut keys = PinnedKeys::new();
    assert!(keys.insert("release-1", key.public()));
    Fixture { key, keys }
}

impl Fixture {
    fn check(&self, doc: &DesiredState, last: Option<u64>) -> Result<(), Refusal> {
        verify_desired(
            doc,
            &self.keys,
            &dev("edge-01"),
            &[grp("lab"), grp("eu")],
            last,
            NOW,
        )
    }
}

/// Re-signs a tampered document's manifest and itself with `key` (as an attacker with
/// another key would).
fn resign(d: &mut DesiredState, key: &KeyPair, kid: &str) {
    d.manifest.sign(key, kid).unwrap();
    d.sign(key, kid).unwrap();
}

#[test]
fn a_signed_targeted_document_is_accepted_and_survives_the_wire() {
    let f = fixture();
    let d = desired(&f.key, "release-1", "group:lab", 3);
    assert_eq!(f.check(&d, None), Ok(()));
    assert_eq!(f.check(&d, Some(2)), Ok(()));
    let again = DesiredState::decode(&d.encode().unwrap()).unwrap();
    assert_eq!(again, d);
    assert_eq!(again.digest(), d.digest());
    assert_eq!(f.check(&again, Some(2)), Ok(()));
    // The canonical form does not depend on the order fields arrive in.
    let mut v = serde_json::to_value(&d).unwrap();
    let obj = v.as_object_mut().unwrap();
    let mut reversed = serde_json::Map::new();
    for (k, val) in obj.iter().rev() {
        reversed.insert(k.clone(), val.clone());
    }
    let shuffled: DesiredState =
        serde_json::from_slice(&serde_json::to_vec(&reversed).unwrap()).unwrap();
    assert_eq!(f.check(&shuffled, None), Ok(()));
}

#[test]
fn every_tampered_field_breaks_the_signature() {
    let f = fixture();
    let good = desired(&f.key, "release-1", "group:lab", 3);
    let tampers: Vec<(&str, Edit<DesiredState>)> = vec![
        ("rollout", Box::new(|d| d.rollout = 2)),
        ("version", Box::new(|d| d.version = 99)),
        (
            "target",
            Box::new(|d| d.target = Target::parse("group:eu").unwrap()),
        ),
        ("alias", Box::new(|d| d.alias = "chat".into())),
        ("activate", Box::new(|d| d.activate = false)),
        ("expires", Box::new(|d| d.expires += 1)),
        ("issued_at", Box::new(|d| d.issued_at += 1)),
        ("model", Box::new(|d| d.model = "smollm2:2.0".into())),
    ];
    for (field, tamper) in &tampers {
        let mut d = good.clone();
        tamper(&mut d);
        assert_eq!(
            f.check(&d, None),
            Err(Refusal::BadSignature {
                what: "desired state",
                kid: "release-1".into()
            }),
            "{field}"
        );
    }
    // Inside the manifest: the desired state's signature covers it, and so does the
    // manifest's own.
    let manifest_tampers: Vec<(&str, Edit<Manifest>)> = vec![
        ("sha256", Box::new(|m| m.sha256 = "cd".repeat(32))),
        ("size", Box::new(|m| m.size += 1)),
        ("chunk", Box::new(|m| m.chunk_sha256[1] = "ff".repeat(32))),
        ("release", Box::new(|m| m.release = 0)),
        ("expires", Box::new(|m| m.expires += 1)),
    ];
    for (field, tamper) in &manifest_tampers {
        let mut d = good.clone();
        tamper(&mut d.manifest);
        assert!(
            matches!(f.check(&d, None), Err(Refusal::BadSignature { .. })),
            "{field}"
        );
        // Re-signing only the outer document does not help: the manifest's own fails.
        d.sign(&f.key, "release-1").unwrap();
        assert_eq!(
            f.check(&d, None),
            Err(Refusal::BadSignature {
                what: "manifest",
                kid: "release-1".into()
            }),
            "{field}"
        );
    }
}

#[test]
fn wrong_keys_unknown_kids_and_missing_signatures_are_refused() {
    let f = fixture();
    let attacker = KeyPair::generate().unwrap();
    // Another key under the pinned kid.
    let forged = desired(&attacker, "release-1", "group:lab", 3);
    assert_eq!(
        f.check(&forged, None),
        Err(Refusal::BadSignature {
            what: "desired state",
            kid: "release-1".into()
        })
    );
    // A kid the device does not pin.
    let unknown = desired(&attacker, "release-9", "group:lab", 3);
    assert_eq!(
        f.check(&unknown, None),
        Err(Refusal::UnknownKid {
            what: "desired state",
            kids: "release-9".into()
        })
    );
    // No signature at all.
    let mut bare = desired(&f.key, "release-1", "group:lab", 3);
    bare.signatures.clear();
    assert_eq!(
        f.check(&bare, None),
        Err(Refusal::Unsigned {
            what: "desired state"
        })
    );
    // A good signature does not excuse a bad one by a pinned key beside it.
    let mut mixed = desired(&f.key, "release-1", "group:lab", 3);
    let mut other = PinnedKeys::new();
    other.insert("release-1", f.key.public());
    other.insert("release-2", KeyPair::generate().unwrap().public());
    mixed.sign(&attacker, "release-2").unwrap();
    assert!(matches!(
        verify_desired(&mixed, &other, &dev("edge-01"), &[grp("lab")], None, NOW),
        Err(Refusal::BadSignature { kid, .. }) if kid == "release-2"
    ));
    // An extra signature by an unknown kid beside the pinned one is fine.
    let mut extra = desired(&f.key, "release-1", "group:lab", 3);
    extra.sign(&attacker, "someone-else").unwrap();
    assert_eq!(f.check(&extra, None), Ok(()));
    // A manifest signed by an unknown key inside an outer document signed by the pinned one.
    let mut inner = desired(&f.key, "release-1", "group:lab", 3);
    inner.manifest.signatures.clear();
    inner.manifest.sign(&attacker, "release-9").unwrap();
    inner.sign(&f.key, "release-1").unwrap();
    assert_eq!(
        f.check(&inner, None),
        Err(Refusal::UnknownKid {
            what: "manifest",
            kids: "release-9".into()
        })
    );
    // Garbage signatures.
    let mut junk = desired(&f.key, "release-1", "group:lab", 3);
    junk.signatures[0].sig = "zz".into();
    assert!(matches!(
        f.check(&junk, None),
        Err(Refusal::BadSignature { .. })
    ));
}

#[test]
fn expired_documents_and_manifests_are_refused_against_trusted_time() {
    let f = fixture();
    let mut d = desired(&f.key, "release-1", "device:edge-01", 1);
    d.expires = NOW;
    resign(&mut d, &f.key, "release-1");
    assert_eq!(
        f.check(&d, None),
        Err(Refusal::Expired {
            what: "desired state",
            expires: NOW,
            now: NOW
        })
    );
    let mut d = desired(&f.key, "release-1", "device:edge-01", 1);
    d.manifest.expires = NOW - 1;
    resign(&mut d, &f.key, "release-1");
    assert_eq!(
        f.check(&d, None),
        Err(Refusal::Expired {
            what: "manifest",
            expires: NOW - 1,
            now: NOW
        })
    );
}

#[test]
fn older_or_equal_versions_are_replays() {
    let f = fixture();
    let d = desired(&f.key, "release-1", "group:lab", 5);
    for last in [5, 6, 100] {
        assert_eq!(
            f.check(&d, Some(last)),
            Err(Refusal::Replay {
                target: "group:lab".into(),
                version: 5,
                last
            })
        );
    }
    assert_eq!(f.check(&d, Some(4)), Ok(()));
}

#[test]
fn documents_for_other_devices_and_groups_are_not_targeted() {
    let f = fixture();
    for target in ["device:edge-02", "group:other"] {
        let d = desired(&f.key, "release-1", target, 1);
        assert_eq!(
            f.check(&d, None),
            Err(Refusal::NotTargeted {
                target: target.into(),
                device: "edge-01".into()
            })
        );
    }
    for target in ["device:edge-01", "group:lab", "group:eu"] {
        assert_eq!(
            f.check(&desired(&f.key, "release-1", target, 1), None),
            Ok(())
        );
    }
}

#[test]
fn inconsistent_documents_are_refused_even_when_signed() {
    let f = fixture();
    let cases: Vec<(Edit<DesiredState>, &str)> = vec![
        (
            Box::new(|d| d.model = "other:1.0".into()),
            "names model other:1.0 but its manifest is smollm2:1.0",
        ),
        (
            Box::new(|d| {
                d.manifest.chunk_sha256.pop();
            }),
            "the manifest lists 2 chunk hashes for 250 bytes in chunks of 100 (3 chunks)",
        ),
        (
            Box::new(|d| d.manifest.chunk_size = 0),
            "the manifest's chunk_size is 0",
        ),
        (
            Box::new(|d| d.manifest.sha256 = "AB".repeat(32)),
            "the manifest's sha256 is not 64 lowercase hex digits",
        ),
    ];
    for (tamper, reason) in cases {
        let mut d = desired(&f.key, "release-1", "group:lab", 1);
        tamper(&mut d);
        resign(&mut d, &f.key, "release-1");
        assert_eq!(f.check(&d, None), Err(Refusal::Inconsistent(reason.into())));
    }
}

#[test]
fn a_signature_over_a_manifest_is_not_one_over_a_desired_state() {
    let key = KeyPair::generate().unwrap();
    let m = manifest(&key, "k");
    let as_manifest = signed_bytes(MANIFEST_CONTEXT, &m).unwrap();
    let as_desired = signed_bytes(DESIRED_CONTEXT, &m).unwrap();
    assert!(key.public().verify_hex(&as_manifest, &m.signatures[0].sig));
    assert!(!key.public().verify_hex(&as_desired, &m.signatures[0].sig));
    // The signed bytes are the context and the JCS form without the signatures.
    let text = String::from_utf8(as_manifest).unwrap();
    assert!(text.starts_with("outpost/v1 manifest\n{\"architecture\":\"llama\","));
    assert!(!text.contains("signatures"));
}

#[test]
fn hostile_payloads_are_refused_by_the_decoder() {
    let f = fixture();
    let d = desired(&f.key, "release-1", "group:lab", 1);
    let mut v = serde_json::to_value(&d).unwrap();
    v["extra"] = 1.into();
    let err = DesiredState::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    let mut v = serde_json::to_value(&d).unwrap();
    v["target"] = "everyone".into();
    let err = DesiredState::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("neither group:G nor device:ID"),
        "{err}"
    );
    let mut v = serde_json::to_value(&d).unwrap();
    v["v"] = 2.into();
    assert_eq!(
        DesiredState::decode(&serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .to_string(),
        "desired state message has schema version 2; this outpost knows version 1"
    );
    let big = vec![b' '; MAX_DESIRED_BYTES + 1];
    assert!(matches!(
        DesiredState::decode(&big),
        Err(ProtocolError::TooLarge { .. })
    ));
}

#[test]
fn the_device_own_document_wins_then_groups_in_configured_order() {
    let f = fixture();
    let me = dev("edge-01");
    let mut accepted = BTreeMap::new();
    let put = |acc: &mut BTreeMap<Target, DesiredState>, t: &str, rollout: u64| {
        let mut d = desired(&f.key, "release-1", t, 1);
        d.rollout = rollout;
        acc.insert(d.target.clone(), d);
    };
    assert!(pick_desired(&accepted, &me, &[grp("lab")]).is_none());
    put(&mut accepted, "group:eu", 11);
    put(&mut accepted, "group:lab", 12);
    let pick = |acc: &BTreeMap<_, _>, groups: &[GroupId]| {
        pick_desired(acc, &me, groups).map(|d| d.rollout)
    };
    assert_eq!(pick(&accepted, &[grp("lab"), grp("eu")]), Some(12));
    assert_eq!(pick(&accepted, &[grp("eu"), grp("lab")]), Some(11));
    assert_eq!(pick(&accepted, &[grp("x"), grp("eu")]), Some(11));
    // A group the device has left no longer counts.
    assert_eq!(pick(&accepted, &[grp("x")]), None);
    put(&mut accepted, "device:edge-01", 13);
    assert_eq!(pick(&accepted, &[grp("lab"), grp("eu")]), Some(13));
    // Another device's document is never picked.
    let mut others = BTreeMap::new();
    put(&mut others, "device:edge-02", 14);
    assert_eq!(pick(&others, &[]), None);
}

#[test]
fn targets_parse_print_and_name_their_topics() {
    let g = Target::parse("group:lab").unwrap();
    assert_eq!(g.to_string(), "group:lab");
    assert_eq!(g.desired_topic(), "outpost/v1/groups/lab/state/desired");
    assert_eq!(Target::of_topic(&g.desired_topic()), Some(g));
    let d = Target::parse("device:edge-01").unwrap();
    assert_eq!(
        d.desired_topic(),
        "outpost/v1/devices/edge-01/state/desired"
    );
    assert_eq!(Target::of_topic(&d.desired_topic()), Some(d));
    assert_eq!(
        Target::of_topic("outpost/v1/devices/edge-01/audit/ack"),
        None
    );
    for bad in ["lab", "group:", "device:a/b", "host:x", ""] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
}
