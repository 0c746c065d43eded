//! Hostile tokens, built in code, each refused for the right reason.

use super::*;
use crate::signing::KeyPair;
use base64::Engine;
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;

struct Fixture {
    key: KeyPair,
    dir: tempfile::TempDir,
    verifier: Verifier,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let pub_path = dir.path().join("admin-1.pub.pem");
        key.public().write(&pub_path).unwrap();
        let pinned = PinnedKey::load(
            "https://admin.example",
            "admin-1",
            KeyAlgorithm::EdDSA,
            &pub_path,
        )
        .unwrap();
        let verifier = Verifier::new(vec![pinned], vec!["edge-1".into(), "lab".into()], 60);
        Self { key, dir, verifier }
    }

    fn claims() -> Value {
        json!({"sub": "alice", "iss": "https://admin.example", "aud": "edge-1",
               "exp": NOW + 3600, "iat": NOW - 10, "roles": ["operator"], "jti": "t-1"})
    }

    /// A token with any header and claims, signed by `key`.
    fn forge(header: &Value, claims: &Value, key: &KeyPair) -> String {
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let msg = format!("{}.{}", b64(header), b64(claims));
        let sig = hex::decode(key.sign_hex(msg.as_bytes())).unwrap();
        format!(
            "{msg}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
        )
    }

    fn token(&self, claims: &Value) -> String {
        Self::forge(
            &json!({"alg": "EdDSA", "typ": "JWT", "kid": "admin-1"}),
            claims,
            &self.key,
        )
    }

    /// The one helper: verify at system time `NOW` with no floor; compare the outcome.
    fn check(&self, token: &str, expect: Result<&str, TokenError>) {
        let mut clock = TrustedClock::fixed(NOW, 0);
        let got = self.verifier.verify(token, &mut clock);
        match (got, expect) {
            (Ok(id), Ok(sub)) => assert_eq!(id.sub, sub),
            (Err(e), Err(want)) => assert_eq!(e, want),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

#[test]
fn a_good_token_verifies() {
    let f = Fixture::new();
    f.check(&f.token(&Fixture::claims()), Ok("alice"));
    f.check(
        &f.token(&with(Fixture::claims(), "aud", json!(["other", "lab"]))),
        Ok("alice"),
    );
    let issued = issue(
        f.key.private_pem().as_bytes(),
        "admin-1",
        &NewToken {
            sub: "bob".into(),
            iss: "https://admin.example".into(),
            aud: vec!["edge-1".into()],
            roles: vec!["app".into()],
            models: Some(vec!["smol*".into()]),
            iat: NOW,
            nbf: NOW,
            exp: NOW + 60,
            jti: "x".into(),
        },
    )
    .unwrap();
    let mut clock = TrustedClock::fixed(NOW, 0);
    let id = f.verifier.verify(&issued, &mut clock).unwrap();
    assert_eq!(
        (id.roles, id.models),
        (vec!["app".to_string()], Some(vec!["smol*".to_string()]))
    );
}

#[test]
fn no_token_or_garbage_is_refused() {
    let f = Fixture::new();
    f.check("", Err(TokenError::Missing));
    f.check(
        &"a".repeat(MAX_TOKEN_LEN + 1),
        Err(TokenError::TooLong(MAX_TOKEN_LEN + 1)),
    );
    assert!(matches!(
        f.verifier
            .verify("not.a.jwt", &mut TrustedClock::fixed(NOW, 0)),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn alg_none_is_refused() {
    let f = Fixture::new();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "admin-1"})),
        b64(&Fixture::claims())
    );
    assert!(matches!(
        f.verifier.verify(&token, &mut TrustedClock::fixed(NOW, 0)),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn hs256_with_the_public_key_as_secret_is_refused() {
    let f = Fixture::new();
    let public_pem = std::fs::read(f.dir.path().join("admin-1.pub.pem")).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("admin-1".into());
    let token = jsonwebtoken::encode(
        &header,
        &Fixture::claims(),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    f.check(
        &token,
        Err(TokenError::AlgorithmMismatch {
            alg: "HS256".into(),
            kid: "admin-1".into(),
            pinned: KeyAlgorithm::EdDSA,
        }),
    );
}

#[test]
fn kids_are_looked_up_only_in_our_map() {
    let f = Fixture::new();
    let claims = Fixture::claims();
    let h = |kid: Value| json!({"alg": "EdDSA", "kid": kid});
    f.check(
        &Fixture::forge(&json!({"alg": "EdDSA"}), &claims, &f.key),
        Err(TokenError::MissingKid),
    );
    f.check(
        &Fixture::forge(&h(json!("admin-2")), &claims, &f.key),
        Err(TokenError::UnknownKid("admin-2".into())),
    );
    for bad in ["../../etc/passwd", "admin-1' OR '1'='1", "admin-1\0", ""] {
        f.check(
            &Fixture::forge(&h(json!(bad)), &claims, &f.key),
            Err(TokenError::BadKid(bad.into())),
        );
    }
    // A key offered in the header (jku/jwk/x5u) is never used: the attacker's own key fails.
    let attacker = KeyPair::generate().unwrap();
    let header = json!({"alg": "EdDSA", "kid": "admin-1", "jku": "https://evil.example/jwks",
                        "jwk": {"kty": "OKP", "crv": "Ed25519", "x": attacker.public_hex()},
                        "x5u": "https://evil.example/cert"});
    f.check(
        &Fixture::forge(&header, &claims, &attacker),
        Err(TokenError::BadSignature),
    );
}

#[test]
fn a_tampered_payload_fails_the_signature() {
    let f = Fixture::new();
    let token = f.token(&Fixture::claims());
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    parts[1] = b64.encode(with(Fixture::claims(), "roles", json!(["admin"])).to_string());
    f.check(&parts.join("."), Err(TokenError::BadSignature));
}

#[test]
fn required_claims_must_be_present() {
    let f = Fixture::new();
    for claim in ["aud", "iss", "exp", "sub"] {
        f.check(
            &f.token(&without(Fixture::claims(), claim)),
            Err(TokenError::MissingClaim(claim.into())),
        );
    }
}

#[test]
fn claims_of_the_wrong_type_are_refused() {
    let f = Fixture::new();
    for (claim, value) in [
        ("exp", json!("1900000000")),
        ("nbf", json!("0")),
        ("iat", json!(true)),
        ("exp", json!(1.9e9)),
        ("roles", json!("admin")),
        ("sub", json!(42)),
    ] {
        let got = f.verifier.verify(
            &f.token(&with(Fixture::claims(), claim, value)),
            &mut TrustedClock::fixed(NOW, 0),
        );
        assert!(
            matches!(got, Err(TokenError::WrongType(_))),
            "{claim}: {got:?}"
        );
    }
}

#[test]
fn issuer_and_audience_must_match() {
    let f = Fixture::new();
    f.check(
        &f.token(&with(
            Fixture::claims(),
            "iss",
            json!("https://evil.example"),
        )),
        Err(TokenError::BadIssuer),
    );
    f.check(
        &f.token(&with(Fixture::claims(), "aud", json!("edge-2"))),
        Err(TokenError::BadAudience),
    );
    f.check(
        &f.token(&with(Fixture::claims(), "aud", json!([]))),
        Err(TokenError::BadAudience),
    );
}

#[test]
fn time_claims_hold_with_a_bounded_leeway() {
    let f = Fixture::new();
    let c = Fixture::claims();
    let old = with(c.clone(), "iat", json!(NOW - 7200));
    f.check(&f.token(&with(old, "exp", json!(NOW - 30))), Ok("alice"));
    f.check(
        &f.token(&with(
            with(c.clone(), "exp", json!(NOW - 61)),
            "iat",
            json!(NOW - 100),
        )),
        Err(TokenError::Expired {
            exp: NOW - 61,
            now: NOW,
            leeway: 60,
        }),
    );
    f.check(
        &f.token(&with(c.clone(), "nbf", json!(NOW + 30))),
        Ok("alice"),
    );
    f.check(
        &f.token(&with(c.clone(), "nbf", json!(NOW + 61))),
        Err(TokenError::NotYetValid {
            nbf: NOW + 61,
            now: NOW,
            leeway: 60,
        }),
    );
    f.check(
        &f.token(&with(c, "iat", json!(NOW + 7200))),
        Err(TokenError::IatAfterExp {
            iat: NOW + 7200,
            exp: NOW + 3600,
        }),
    );
}

#[test]
fn a_clock_set_back_cannot_revive_an_expired_token() {
    let f = Fixture::new();
    let old = with(Fixture::claims(), "iat", json!(NOW - 7200));
    let token = f.token(&with(old, "exp", json!(NOW - 3600)));
    // The system clock says it is a day earlier, but the floor remembers NOW.
    let mut clock = TrustedClock::fixed(NOW - 86_400, NOW);
    assert!(matches!(
        f.verifier.verify(&token, &mut clock),
        Err(TokenError::Expired { .. })
    ));
    // A verified token's iat raises the floor, so a clock stuck in the past learns the time.
    let mut clock = TrustedClock::fixed(0, 0);
    f.verifier
        .verify(&f.token(&Fixture::claims()), &mut clock)
        .unwrap();
    assert_eq!(clock.floor(), NOW - 10);
}

#[test]
fn revoked_tokens_and_subjects_are_refused() {
    let mut f = Fixture::new();
    let p = f.dir.path().join("revoked.json");
    std::fs::write(&p, r#"{"jti": ["t-1"], "sub": ["mallory"]}"#).unwrap();
    f.verifier.revoked = RevocationList::load(&p).unwrap();
    f.check(
        &f.token(&Fixture::claims()),
        Err(TokenError::Revoked("jti t-1".into())),
    );
    let m = with(
        with(Fixture::claims(), "sub", json!("mallory")),
        "jti",
        json!("t-2"),
    );
    f.check(
        &f.token(&m),
        Err(TokenError::Revoked("subject mallory".into())),
    );
    std::fs::write(&p, r#"{"tokens": []}"#).unwrap();
    assert!(
        RevocationList::load(&p)
            .unwrap_err()
            .to_string()
            .contains("unknown field")
    );
}

#[test]
fn auditor_with_admin_or_operator_is_refused() {
    let f = Fixture::new();
    f.check(
        &f.token(&with(
            Fixture::claims(),
            "roles",
            json!(["auditor", "admin"]),
        )),
        Err(TokenError::SeparationOfDuties("admin".into())),
    );
    f.check(
        &f.token(&with(
            Fixture::claims(),
            "roles",
            json!(["operator", "auditor"]),
        )),
        Err(TokenError::SeparationOfDuties("operator".into())),
    );
    f.check(
        &f.token(&with(Fixture::claims(), "roles", json!(["auditor"]))),
        Ok("alice"),
    );
}
