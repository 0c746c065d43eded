//! The revocation list: token ids (`jti`) and subjects that are refused.
//!
//! File format (JSON, at most 1 MiB): `{"jti": ["…"], "sub": ["…"]}`; both keys optional,
//! unknown keys refused. Comes from a file now and from sync later.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

const MAX_FILE: u64 = 1 << 20;

/// Why a revocation list cannot be used. Each message is one complete line that includes its
/// cause's; the cause is kept in the variant (not as `source()`, which would print it twice
/// in an error chain).
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {len} bytes is larger than the limit of {MAX_FILE} bytes", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{}: {error}", path.display())]
    Invalid {
        path: PathBuf,
        error: serde_json::Error,
    },
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    #[serde(default)]
    jti: HashSet<String>,
    #[serde(default)]
    sub: HashSet<String>,
}

impl RevocationList {
    pub fn load(path: &Path) -> Result<Self, RevocationError> {
        let read = |error| RevocationError::Read {
            path: path.into(),
            error,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_FILE {
            return Err(RevocationError::TooLarge {
                path: path.into(),
                len,
            });
        }
        let text = std::fs::read(path).map_err(read)?;
        serde_json::from_slice(&text).map_err(|error| RevocationError::Invalid {
            path: path.into(),
            error,
        })
    }

    /// Why a token with this `jti` and subject is revoked, if it is.
    pub fn check(&self, jti: Option<&str>, sub: &str) -> Option<String> {
        if let Some(j) = jti
            && self.jti.contains(j)
        {
            return Some(format!("jti {j}"));
        }
        self.sub.contains(sub).then(|| format!("subject {sub}"))
    }
}
