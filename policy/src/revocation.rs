//! The revocation list: token ids (`jti`) and subjects that are refused.
//!
//! File format (JSON, at most 1 MiB): `{"jti": ["…"], "sub": ["…"]}`; both keys optional,
//! unknown keys refused. Comes from a file now and from sync later.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    #[serde(default)]
    jti: HashSet<String>,
    #[serde(default)]
    sub: HashSet<String>,
}

impl RevocationList {
    pub fn load(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > MAX_FILE {
            return Err(format!("{}: larger than {MAX_FILE} bytes", path.display()));
        }
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
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
