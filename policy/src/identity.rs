//! JWT identities: the only module that knows `jsonwebtoken`.
//!
//! Rules (each has a test with a hostile token built in code):
//! - Keys are pinned by `kid` in our own map; `jku`, `jwk`, `x5u` and `x5c` in a header are
//!   never used. Each key is pinned to one algorithm (EdDSA, or ES256) and one issuer; a token
//!   whose `alg` differs (HS256, RS256, …) is refused before any signature check, and
//!   `alg: none` does not even parse.
//! - `sub`, `iss`, `aud` and `exp` are required; `aud` must name this device or one of its
//!   groups; `exp`, `nbf` and `iat` must be integers (a string is refused, not ignored).
//! - Time is the [`TrustedClock`]'s: max(system clock, persisted floor). A verified token's
//!   `iat` is evidence of the real time, so it raises the floor; `exp` and `nbf` are then
//!   checked with the configured leeway. A clock set back cannot revive an expired token.
//! - Revoked `jti`s and subjects are refused; a token holding `auditor` together with
//!   `admin` or `operator` is refused (separation of duties).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::revocation::RevocationList;
use crate::time::TrustedClock;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// An algorithm a key may be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum KeyAlgorithm {
    EdDSA,
    ES256,
}

impl KeyAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            KeyAlgorithm::EdDSA => Algorithm::EdDSA,
            KeyAlgorithm::ES256 => Algorithm::ES256,
        }
    }
}

/// Why a token was refused. The messages are what operators read in the audit log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("token is {0} bytes, longer than the limit of {MAX_TOKEN_LEN}")]
    TooLong(usize),
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token header has no kid")]
    MissingKid,
    #[error("kid {0:?} has characters or a length that no configured key uses")]
    BadKid(String),
    #[error("unknown kid '{0}'")]
    UnknownKid(String),
    #[error("algorithm {alg} is not the one pinned for kid '{kid}' ({pinned:?})")]
    AlgorithmMismatch {
        alg: String,
        kid: String,
        pinned: KeyAlgorithm,
    },
    #[error("bad signature")]
    BadSignature,
    #[error("missing required claim '{0}'")]
    MissingClaim(String),
    #[error("claims of the wrong type: {0}")]
    WrongType(String),
    #[error("issuer is not the one configured for this key")]
    BadIssuer,
    #[error("audience does not name this device or its groups")]
    BadAudience,
    #[error("expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired { exp: i64, now: i64, leeway: i64 },
    #[error("not valid before {nbf} (now {now}, leeway {leeway}s)")]
    NotYetValid { nbf: i64, now: i64, leeway: i64 },
    #[error("issued after it expires (iat {iat} > exp {exp})")]
    IatAfterExp { iat: i64, exp: i64 },
    #[error("revoked ({0})")]
    Revoked(String),
    #[error("separation of duties: role auditor cannot be held with {0}")]
    SeparationOfDuties(String),
}

/// Why a configured issuer key cannot be used. Each message is one complete line that
/// includes its cause's; the cause is kept in the variant (not as `source()`, which would
/// print it twice in an error chain).
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("kid {0:?} must be 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadKid(String),
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {len} bytes is too large for a public key", path.display())]
    TooLarge { path: PathBuf, len: usize },
    #[error("{}: not a {algorithm:?} public key: {error}", path.display())]
    NotAKey {
        path: PathBuf,
        algorithm: KeyAlgorithm,
        error: jsonwebtoken::errors::Error,
    },
}

/// Why `outpost token issue` could not sign. The cause is in the message (see
/// [`KeyLoadError`]) and kept in the variant.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("not an Ed25519 private key in PKCS#8 PEM: {0}")]
    Key(jsonwebtoken::errors::Error),
    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub sub: String,
    pub iss: String,
    pub roles: Vec<String>,
    /// The `models` claim: glob patterns of models an `app` may use.
    pub models: Option<Vec<String>>,
    pub jti: Option<String>,
    pub exp: i64,
}

/// A key as configured: `[[auth.issuers]]`.
#[derive(Clone)]
pub struct PinnedKey {
    pub iss: String,
    pub kid: String,
    pub algorithm: KeyAlgorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for PinnedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedKey({} {} {:?})",
            self.iss, self.kid, self.algorithm
        )
    }
}

impl PinnedKey {
    /// Reads a PEM public key (SPKI) for `algorithm`.
    pub fn load(
        iss: &str,
        kid: &str,
        algorithm: KeyAlgorithm,
        path: &Path,
    ) -> Result<Self, KeyLoadError> {
        if !valid_kid(kid) {
            return Err(KeyLoadError::BadKid(kid.into()));
        }
        let pem = std::fs::read(path).map_err(|error| KeyLoadError::Read {
            path: path.into(),
            error,
        })?;
        if pem.len() > 16 * 1024 {
            return Err(KeyLoadError::TooLarge {
                path: path.into(),
                len: pem.len(),
            });
        }
        let key = match algorithm {
            KeyAlgorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            KeyAlgorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        }
        .map_err(|error| KeyLoadError::NotAKey {
            path: path.into(),
            algorithm,
            error,
        })?;
        Ok(Self {
            iss: iss.to_string(),
            kid: kid.to_string(),
            algorithm,
            key,
        })
    }
}

fn valid_kid(kid: &str) -> bool {
    (1..=64).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The claims as they arrive: every field optional so that "missing" and "wrong type" are
/// told apart; integers are `i64`, so `"exp": "tomorrow"` fails to parse.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    iss: Option<String>,
    #[allow(dead_code)]
    aud: Option<Audience>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    jti: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    models: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Verifies tokens against the pinned keys, this device's audiences and the trusted clock.
#[derive(Debug)]
pub struct Verifier {
    keys: HashMap<String, PinnedKey>,
    audiences: Vec<String>,
    leeway: i64,
    pub revoked: RevocationList,
}

impl Verifier {
    /// `audiences`: the device id and its groups.
    pub fn new(keys: Vec<PinnedKey>, audiences: Vec<String>, leeway_secs: u64) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.kid.clone(), k)).collect(),
            audiences,
            leeway: i64::try_from(leeway_secs).unwrap_or(i64::MAX / 2),
            revoked: RevocationList::default(),
        }
    }

    /// Verifies `token`; on success the clock's floor may have advanced.
    pub fn verify(&self, token: &str, clock: &mut TrustedClock) -> Result<Identity, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
        let kid = header.kid.ok_or(TokenError::MissingKid)?;
        if !valid_kid(&kid) {
            return Err(TokenError::BadKid(kid.chars().take(80).collect()));
        }
        let pinned = self
            .keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?;
        if header.alg != pinned.algorithm.jwt() {
            return Err(TokenError::AlgorithmMismatch {
                alg: format!("{:?}", header.alg),
                kid,
                pinned: pinned.algorithm,
            });
        }
        let mut v = Validation::new(pinned.algorithm.jwt());
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_issuer(&[&pinned.iss]);
        v.set_audience(&self.audiences);
        let data =
            jsonwebtoken::decode::<RawClaims>(token, &pinned.key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => TokenError::BadSignature,
                    ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                    ErrorKind::InvalidIssuer => TokenError::BadIssuer,
                    ErrorKind::InvalidAudience => TokenError::BadAudience,
                    ErrorKind::Json(j) => TokenError::WrongType(j.to_string()),
                    ErrorKind::InvalidAlgorithm => TokenError::AlgorithmMismatch {
                        alg: format!("{:?}", header.alg),
                        kid: kid.clone(),
                        pinned: pinned.algorithm,
                    },
                    other => TokenError::Malformed(format!("{other:?}")),
                }
            })?;
        let c = data.claims;
        let (Some(sub), Some(iss), Some(exp)) = (c.sub, c.iss, c.exp) else {
            return Err(TokenError::MissingClaim("sub, iss or exp".into()));
        };
        if let Some(iat) = c.iat {
            if iat > exp {
                return Err(TokenError::IatAfterExp { iat, exp });
            }
            // A verified token proves the real time is at least its iat.
            clock.observe(iat);
        }
        let now = clock.now();
        if exp + self.leeway < now {
            return Err(TokenError::Expired {
                exp,
                now,
                leeway: self.leeway,
            });
        }
        if let Some(nbf) = c.nbf
            && nbf - self.leeway > now
        {
            return Err(TokenError::NotYetValid {
                nbf,
                now,
                leeway: self.leeway,
            });
        }
        if let Some(why) = self.revoked.check(c.jti.as_deref(), &sub) {
            return Err(TokenError::Revoked(why));
        }
        if c.roles.iter().any(|r| r == "auditor") {
            let conflicting: Vec<&str> = c
                .roles
                .iter()
                .map(String::as_str)
                .filter(|r| matches!(*r, "admin" | "operator"))
                .collect();
            if !conflicting.is_empty() {
                return Err(TokenError::SeparationOfDuties(conflicting.join(", ")));
            }
        }
        Ok(Identity {
            sub,
            iss,
            roles: c.roles,
            models: c.models,
            jti: c.jti,
            exp,
        })
    }
}

/// What `outpost token issue` puts in a token.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub sub: String,
    pub iss: String,
    pub aud: Vec<String>,
    pub roles: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// Signs `claims` with the Ed25519 private key `key_pem` under `kid`. The key is PKCS#8 PEM,
/// version 1 (RFC 8410, what `outpost keys generate` and OpenSSL write) or version 2.
pub fn issue(key_pem: &[u8], kid: &str, claims: &NewToken) -> Result<String, IssueError> {
    let key = EncodingKey::from_ed_pem(key_pem).map_err(IssueError::Key)?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &key).map_err(IssueError::Sign)
}

#[cfg(test)]
mod tests;
