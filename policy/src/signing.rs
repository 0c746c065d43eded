//! Ed25519 keys and signatures: the only module that knows `ed25519-dalek`.
//!
//! Keys on disk are PEM: private keys PKCS#8 (`*.key.pem`, mode 0600), public keys SPKI
//! (`*.pub.pem`). Signatures and public keys travel as lowercase hex.
//!
//! Private keys are written in the form of RFC 8410 section 7: PKCS#8 version 1
//! (`OneAsymmetricKey` without the optional public key), `-----BEGIN PRIVATE KEY-----`. That
//! is what `openssl genpkey -algorithm ed25519` writes and what OpenSSL 3.0 and Python's
//! `cryptography` (hence PyJWT) read; both refuse the version 2 form with the public key
//! embedded, which earlier versions of Outpost wrote. Both forms are read (a version 2 key
//! whose embedded public key does not belong to its secret is refused).

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Why a key cannot be read, written or made. Each message is one complete line with its
/// cause's; the cause is kept in the variant, not returned by `source()` (an error chain
/// printed with `{:#}` would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: not an Ed25519 {kind} key in PEM ({detail})", path.display())]
    Format {
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    #[error("{} already exists; refusing to overwrite a key", path.display())]
    Exists { path: PathBuf },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// A private signing key.
pub struct KeyPair {
    key: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair(public {})", self.public_hex())
    }
}

/// A public verifying key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

fn read_capped(path: &Path) -> Result<String, KeyError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |error| KeyError::Io { what, path, error }
    };
    let meta = std::fs::metadata(path).map_err(io("reading"))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyError::Format {
            path: path.into(),
            kind: "key",
            detail: format!("{} bytes is too large for a key file", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io("reading"))
}

impl KeyPair {
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| KeyError::Format {
                path: path.into(),
                kind: "private",
                detail: e.to_string(),
            })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Self::from_pem(&read_capped(path)?, path)
    }

    /// Loads the key at `path`, or generates one there (mode 0600) if there is none.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                key.write_private(path)?;
                Ok(key)
            }
            other => other,
        }
    }

    /// The private key as RFC 8410 PEM (PKCS#8 v1, no public key: see the module docs).
    pub fn private_pem(&self) -> String {
        let v1 = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        v1.to_pkcs8_pem(LineEnding::LF)
            .map(|p| p.to_string())
            .unwrap_or_default()
    }

    /// Writes the private key, mode 0600, refusing to overwrite; fsynced before the rename.
    pub fn write_private(&self, path: &Path) -> Result<(), KeyError> {
        write_new(path, self.private_pem().as_bytes(), 0o600)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    pub fn public_hex(&self) -> String {
        self.public().to_hex()
    }

    /// Hex signature of `message`.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }
}

impl PublicKey {
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, KeyError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| KeyError::Format {
                path: path.into(),
                kind: "public",
                detail: e.to_string(),
            })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Self::from_pem(&read_capped(path)?, path)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes: [u8; 32] = hex::decode(s).ok()?.try_into().ok()?;
        VerifyingKey::from_bytes(&bytes)
            .ok()
            .map(|key| Self { key })
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        write_new(path, self.to_pem().as_bytes(), 0o644)
    }

    /// Whether `signature_hex` is this key's signature of `message` (strict verification:
    /// no malleable or small-order signatures).
    pub fn verify_hex(&self, message: &[u8], signature_hex: &str) -> bool {
        let Some(bytes) = hex::decode(signature_hex)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        let sig = Signature::from_bytes(&bytes);
        self.key.verify_strict(message, &sig).is_ok() && self.key.verify(message, &sig).is_ok()
    }
}

/// Creates `path` with `contents` and `mode`, never replacing an existing file.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what| {
        let path = path.to_path_buf();
        move |error| KeyError::Io { what, path, error }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.into() }
            } else {
                io("creating")(e)
            }
        })?;
    f.write_all(contents).map_err(io("writing"))?;
    f.sync_all().map_err(io("writing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let k = KeyPair::generate().unwrap();
        let (priv_path, pub_path) = (dir.path().join("k.key.pem"), dir.path().join("k.pub.pem"));
        k.write_private(&priv_path).unwrap();
        k.public().write(&pub_path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&priv_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&priv_path)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(
            std::fs::read_to_string(&pub_path)
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        let again = KeyPair::load(&priv_path).unwrap();
        let public = PublicKey::load(&pub_path).unwrap();
        let sig = again.sign_hex(b"hello");
        assert!(public.verify_hex(b"hello", &sig));
        assert!(!public.verify_hex(b"hellO", &sig));
        assert!(!public.verify_hex(b"hello", "00"));
        assert_eq!(PublicKey::from_hex(&public.to_hex()), Some(public));
        assert!(matches!(
            k.write_private(&priv_path),
            Err(KeyError::Exists { .. })
        ));
    }

    /// Written keys are RFC 8410's PKCS#8 v1 without a public key (what OpenSSL 3.0 and
    /// Python's `cryptography` read); v2 keys, which earlier versions wrote, still load.
    #[test]
    fn private_keys_are_written_as_pkcs8_v1_and_both_versions_load() {
        use ed25519_dalek::pkcs8::{PrivateKeyInfo, PublicKeyBytes, SecretDocument};
        let k = KeyPair::generate().unwrap();
        let pem = k.private_pem();
        let (label, der) = SecretDocument::from_pem(&pem).unwrap();
        assert_eq!(label, "PRIVATE KEY");
        let info = PrivateKeyInfo::try_from(der.as_bytes()).unwrap();
        // SEQUENCE { INTEGER 0 (v1), AlgorithmIdentifier, OCTET STRING }: 48 bytes in all.
        assert_eq!(&der.as_bytes()[2..5], &[0x02, 0x01, 0x00], "version 1");
        assert_eq!(der.as_bytes().len(), 48);
        assert!(info.public_key.is_none(), "no embedded public key");
        let path = Path::new("k.key.pem");
        assert_eq!(KeyPair::from_pem(&pem, path).unwrap().public(), k.public());

        // The v2 form (public key embedded), as ed25519-dalek writes it by default.
        let v2 = k.key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let (_, der) = SecretDocument::from_pem(&v2).unwrap();
        assert_eq!(&der.as_bytes()[2..5], &[0x02, 0x01, 0x01], "version 2");
        assert_eq!(KeyPair::from_pem(&v2, path).unwrap().public(), k.public());
        // A v2 key whose public half belongs to another secret is not a key.
        let other = KeyPair::generate().unwrap();
        let mismatched = KeypairBytes {
            secret_key: k.key.to_bytes(),
            public_key: Some(PublicKeyBytes(other.public().key.to_bytes())),
        }
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap();
        assert!(KeyPair::from_pem(&mismatched, path).is_err());
    }

    #[test]
    fn garbage_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pem");
        std::fs::write(
            &p,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        assert!(
            PublicKey::load(&p)
                .unwrap_err()
                .to_string()
                .contains("not an Ed25519 public key")
        );
        std::fs::write(&p, vec![b'a'; 20_000]).unwrap();
        assert!(
            KeyPair::load(&p)
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }
}
