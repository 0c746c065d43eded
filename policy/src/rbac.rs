//! Roles and permissions: deny by default.
//!
//! Built-in roles:
//! - `admin`: every action (nobody can delete audit records: there is no such action);
//! - `operator`: inference:run, models:read, models:activate, device:read;
//! - `auditor`: audit:read, audit:export, models:read, policy:read, device:read (changes nothing);
//! - `app`: inference:run on the models its token's `models` claim allows, models:read.
//!
//! Custom roles come from a policy document (TOML, at most 64 KiB):
//! ```toml
//! version = 3
//! [roles.lab-runner]
//! actions = ["inference:run", "models:read"]
//! models = ["smollm2*"]   # optional: model actions only on these models
//! ```
//! A custom role cannot redefine a built-in one. Unknown roles in a token grant nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

const MAX_POLICY_FILE: u64 = 64 * 1024;

/// A name that is not an [`Action`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action '{name}' (known: {})", known_actions())]
pub struct UnknownAction {
    pub name: String,
}

fn known_actions() -> String {
    let known: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
    known.join(", ")
}

/// Why a policy document cannot be used. Each message is one complete line that includes its
/// cause's; the cause is kept in the variant (not as `source()`, which would print it twice
/// in an error chain).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {len} bytes is larger than the limit of {MAX_POLICY_FILE} bytes", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{}: {error}", path.display())]
    Invalid { path: PathBuf, error: DocumentError },
}

/// What is wrong inside a policy document.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Not TOML, or not the shape above (unknown keys, an unknown action, no `version`):
    /// the parser's message, without its multi-line excerpt.
    #[error("{}", .0.message())]
    Toml(toml::de::Error),
    #[error("role '{0}' is built in and cannot be redefined")]
    BuiltinRole(String),
    #[error("role name {0:?} must be 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadRoleName(String),
}

/// Everything a caller can ask to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    InferenceRun,
    ModelsRead,
    ModelsWrite,
    ModelsActivate,
    AuditRead,
    AuditExport,
    PolicyRead,
    PolicyWrite,
    DeviceRead,
}

impl Action {
    pub const ALL: [Action; 9] = [
        Action::InferenceRun,
        Action::ModelsRead,
        Action::ModelsWrite,
        Action::ModelsActivate,
        Action::AuditRead,
        Action::AuditExport,
        Action::PolicyRead,
        Action::PolicyWrite,
        Action::DeviceRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::InferenceRun => "inference:run",
            Action::ModelsRead => "models:read",
            Action::ModelsWrite => "models:write",
            Action::ModelsActivate => "models:activate",
            Action::AuditRead => "audit:read",
            Action::AuditExport => "audit:export",
            Action::PolicyRead => "policy:read",
            Action::PolicyWrite => "policy:write",
            Action::DeviceRead => "device:read",
        }
    }

    /// Whether the action concerns a model (its resource is a model name).
    pub fn is_model_action(self) -> bool {
        matches!(
            self,
            Action::InferenceRun
                | Action::ModelsRead
                | Action::ModelsWrite
                | Action::ModelsActivate
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, UnknownAction> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAction { name: s.into() })
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which models a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    AnyModel,
    Patterns(Vec<String>),
    /// The token's own `models` claim (the `app` role).
    TokenModels,
}

#[derive(Debug, Clone)]
struct Role {
    grants: BTreeMap<Action, Scope>,
}

/// The outcome of an authorization, with the reason the audit log records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u64,
    #[serde(default)]
    roles: BTreeMap<String, RoleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    actions: Vec<Action>,
    models: Option<Vec<String>>,
}

/// The roles in force and the version of the document they came from (0: built-ins only).
#[derive(Debug, Clone)]
pub struct Policy {
    pub version: u64,
    roles: BTreeMap<String, Role>,
}

pub const BUILTIN_ROLES: [&str; 4] = ["admin", "operator", "auditor", "app"];

impl Default for Policy {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Policy {
    pub fn builtin() -> Self {
        let role = |actions: &[Action], scope: Scope| {
            let mut grants: BTreeMap<Action, Scope> = BTreeMap::new();
            for &a in actions {
                grants.insert(a, scope.clone());
            }
            Role { grants }
        };
        let mut roles = BTreeMap::new();
        roles.insert("admin".into(), role(&Action::ALL, Scope::AnyModel));
        roles.insert(
            "operator".into(),
            role(
                &[
                    Action::InferenceRun,
                    Action::ModelsRead,
                    Action::ModelsActivate,
                    Action::DeviceRead,
                ],
                Scope::AnyModel,
            ),
        );
        roles.insert(
            "auditor".into(),
            role(
                &[
                    Action::AuditRead,
                    Action::AuditExport,
                    Action::ModelsRead,
                    Action::PolicyRead,
                    Action::DeviceRead,
                ],
                Scope::AnyModel,
            ),
        );
        let mut app = role(&[Action::ModelsRead], Scope::AnyModel);
        app.grants.insert(Action::InferenceRun, Scope::TokenModels);
        roles.insert("app".into(), app);
        Self { version: 0, roles }
    }

    /// The built-in roles plus the custom roles of the policy document at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let read = |error| PolicyError::Read {
            path: path.into(),
            error,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_POLICY_FILE {
            return Err(PolicyError::TooLarge {
                path: path.into(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text).map_err(|error| PolicyError::Invalid {
            path: path.into(),
            error,
        })
    }

    pub fn parse(text: &str) -> Result<Self, DocumentError> {
        let file: PolicyFile = toml::from_str(text).map_err(DocumentError::Toml)?;
        let mut policy = Self::builtin();
        policy.version = file.version;
        for (name, r) in file.roles {
            if BUILTIN_ROLES.contains(&name.as_str()) {
                return Err(DocumentError::BuiltinRole(name));
            }
            if !(1..=64).contains(&name.len())
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(DocumentError::BadRoleName(name));
            }
            let scope = r.models.map_or(Scope::AnyModel, Scope::Patterns);
            let grants = r.actions.into_iter().map(|a| (a, scope.clone())).collect();
            policy.roles.insert(name, Role { grants });
        }
        Ok(policy)
    }

    /// May `who` do `action` (on model `resource`)? Deny unless some role says yes.
    pub fn authorize(&self, who: &Identity, action: Action, resource: Option<&str>) -> Decision {
        let mut why_not = Vec::new();
        for name in &who.roles {
            let Some(role) = self.roles.get(name) else {
                why_not.push(format!("role '{name}' is not defined"));
                continue;
            };
            let Some(scope) = role.grants.get(&action) else {
                continue;
            };
            let patterns: &[String] = match scope {
                Scope::AnyModel => {
                    return allow(format!("role {name} grants {action}"));
                }
                Scope::Patterns(p) => p,
                Scope::TokenModels => who.models.as_deref().unwrap_or(&[]),
            };
            if !action.is_model_action() {
                return allow(format!("role {name} grants {action}"));
            }
            match resource {
                Some(model) if patterns.iter().any(|p| glob_match(p, model)) => {
                    return allow(format!("role {name} grants {action} on {model}"));
                }
                Some(model) => why_not.push(format!(
                    "role {name} grants {action} only on models matching [{}], not {model}",
                    patterns.join(", ")
                )),
                None => why_not.push(format!(
                    "role {name} grants {action} only on some models, and none was named"
                )),
            }
        }
        let reason = if why_not.is_empty() {
            format!(
                "no role grants {action} (roles: {})",
                if who.roles.is_empty() {
                    "none".to_string()
                } else {
                    who.roles.join(", ")
                }
            )
        } else {
            why_not.join("; ")
        };
        Decision {
            allowed: false,
            reason,
        }
    }
}

fn allow(reason: String) -> Decision {
    Decision {
        allowed: true,
        reason,
    }
}

/// `*` matches any run of characters, `?` one character; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(roles: &[&str], models: Option<&[&str]>) -> Identity {
        Identity {
            sub: "s".into(),
            iss: "i".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
            jti: None,
            exp: 0,
        }
    }

    /// The one helper: the decision for `roles` (and token models) on `action`/`resource`,
    /// as "allow: reason" or "deny: reason".
    fn check(
        p: &Policy,
        roles: &[&str],
        models: Option<&[&str]>,
        action: &str,
        res: Option<&str>,
        expect: &str,
    ) {
        let d = p.authorize(&who(roles, models), action.parse().unwrap(), res);
        let got = format!("{}: {}", if d.allowed { "allow" } else { "deny" }, d.reason);
        assert_eq!(got, expect);
    }

    #[test]
    fn builtin_roles_grant_what_the_table_says() {
        let p = Policy::builtin();
        let table: [(&str, &[Action]); 3] = [
            ("admin", &Action::ALL),
            (
                "operator",
                &[
                    Action::InferenceRun,
                    Action::ModelsRead,
                    Action::ModelsActivate,
                    Action::DeviceRead,
                ],
            ),
            (
                "auditor",
                &[
                    Action::AuditRead,
                    Action::AuditExport,
                    Action::ModelsRead,
                    Action::PolicyRead,
                    Action::DeviceRead,
                ],
            ),
        ];
        for (role, granted) in table {
            for a in Action::ALL {
                let d = p.authorize(&who(&[role], None), a, Some("m"));
                assert_eq!(d.allowed, granted.contains(&a), "{role} {a}");
            }
        }
    }

    #[test]
    fn deny_is_the_default() {
        let p = Policy::builtin();
        check(
            &p,
            &[],
            None,
            "device:read",
            None,
            "deny: no role grants device:read (roles: none)",
        );
        check(
            &p,
            &["root"],
            None,
            "models:write",
            None,
            "deny: role 'root' is not defined",
        );
        check(
            &p,
            &["auditor"],
            None,
            "models:write",
            Some("m"),
            "deny: no role grants models:write (roles: auditor)",
        );
        check(
            &p,
            &["operator"],
            None,
            "policy:write",
            None,
            "deny: no role grants policy:write (roles: operator)",
        );
    }

    #[test]
    fn apps_run_only_the_models_their_token_names() {
        let p = Policy::builtin();
        let m: &[&str] = &["smollm2*", "gemma3:1"];
        check(
            &p,
            &["app"],
            Some(m),
            "inference:run",
            Some("smollm2:3"),
            "allow: role app grants inference:run on smollm2:3",
        );
        check(
            &p,
            &["app"],
            Some(m),
            "inference:run",
            Some("llama"),
            "deny: role app grants inference:run only on models matching [smollm2*, gemma3:1], not llama",
        );
        check(
            &p,
            &["app"],
            None,
            "inference:run",
            Some("smollm2"),
            "deny: role app grants inference:run only on models matching [], not smollm2",
        );
        check(
            &p,
            &["app"],
            Some(m),
            "inference:run",
            None,
            "deny: role app grants inference:run only on some models, and none was named",
        );
        check(
            &p,
            &["app"],
            None,
            "models:read",
            Some("x"),
            "allow: role app grants models:read",
        );
    }

    #[test]
    fn custom_roles_come_from_a_versioned_document() {
        let p = Policy::parse(
            "version = 7\n[roles.lab-runner]\nactions = [\"inference:run\", \"device:read\"]\nmodels = [\"smol*\"]\n",
        )
        .unwrap();
        assert_eq!(p.version, 7);
        check(
            &p,
            &["lab-runner"],
            None,
            "inference:run",
            Some("smol-1"),
            "allow: role lab-runner grants inference:run on smol-1",
        );
        check(
            &p,
            &["lab-runner"],
            None,
            "device:read",
            None,
            "allow: role lab-runner grants device:read",
        );
        for (doc, err) in [
            ("version = 1\n[roles.admin]\nactions = []\n", "built in"),
            (
                "version = 1\n[roles.x]\nactions = [\"audit:delete\"]\n",
                "unknown action 'audit:delete'",
            ),
            ("[roles.x]\nactions = []\n", "missing field `version`"),
            (
                "version = 1\n[roles.x]\nactions = []\ncolor = 1\n",
                "unknown field `color`",
            ),
            (
                "version = 1\n[roles.\"a b\"]\nactions = []\n",
                "must be 1 to 64",
            ),
        ] {
            let e = Policy::parse(doc).unwrap_err().to_string();
            assert!(e.contains(err), "{doc:?}: {e}");
        }
    }

    #[test]
    fn globs_match_whole_names() {
        for (p, t, m) in [
            ("*", "anything", true),
            ("smol*", "smollm2", true),
            ("smol*", "xsmol", false),
            ("*:1", "gemma3:1", true),
            ("g?mma", "gemma", true),
            ("g?mma", "gemmma", false),
            ("a*b*c", "a-b-b-c", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, t), m, "{p} {t}");
        }
    }
}
