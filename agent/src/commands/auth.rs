//! `outpost keys`, `outpost token` and `outpost auth`: identities from the command line.

use std::process::ExitCode;

use anyhow::Context as _;
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::identity::{self, NewToken};
use outpost_policy::rbac::Action;
use outpost_policy::signing::KeyPair;
use outpost_policy::time::system_now;

use super::print_json;
use crate::cli::{AuthCommand, KeysCommand, TokenCommand};
use crate::config::valid_id;
use crate::context::{Context, local_actor, parse_duration};

pub fn keys(ctx: &Context, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let (out, name) = match cmd {
        KeysCommand::Generate { out, name } => (out, name),
        KeysCommand::Device => {
            let path = ctx.device_key_path();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let public = KeyPair::load_or_generate(&path)?.public();
            if ctx.json {
                print_json(
                    &serde_json::json!({"public_key_hex": public.to_hex(), "pem": public.to_pem()}),
                )?;
            } else {
                print!("{}", public.to_pem());
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    anyhow::ensure!(
        valid_id(&name),
        "key name '{name}' must be 1 to 64 of A-Z a-z 0-9 . _ -"
    );
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let private = out.join(format!("{name}.key.pem"));
    let public = out.join(format!("{name}.pub.pem"));
    anyhow::ensure!(
        !public.exists(),
        "{} already exists; refusing to overwrite a key",
        public.display()
    );
    let key = KeyPair::generate()?;
    key.write_private(&private)?;
    key.public().write(&public)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "private_key": private, "public_key": public, "public_key_hex": key.public_hex(),
        }))?;
    } else {
        println!(
            "Wrote {} (mode 0600) and {}.",
            private.display(),
            public.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn token(ctx: &Context, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Issue(a) = cmd;
    let meta =
        std::fs::metadata(&a.key).with_context(|| format!("cannot read {}", a.key.display()))?;
    anyhow::ensure!(
        meta.len() <= 16 * 1024,
        "{} is too large for a key",
        a.key.display()
    );
    let pem = std::fs::read(&a.key).with_context(|| format!("cannot read {}", a.key.display()))?;
    let ttl = i64::try_from(parse_duration(&a.ttl)?)?;
    anyhow::ensure!(ttl > 0, "--ttl must be above 0");
    let aud = a.aud.unwrap_or_else(|| ctx.device_id());
    let now = system_now();
    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    let claims = NewToken {
        sub: a.sub,
        iss: a.iss,
        aud: vec![aud],
        roles: a.roles,
        models: a.models,
        iat: now,
        nbf: now,
        exp: now + ttl,
        jti: hex::encode(jti),
    };
    let token = identity::issue(&pem, &a.kid, &claims)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.key.display()))?;
    if ctx.json {
        print_json(&serde_json::json!({"token": token, "claims": claims}))?;
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn check(ctx: &Context, cmd: AuthCommand) -> anyhow::Result<ExitCode> {
    let AuthCommand::Check {
        token,
        action,
        resource,
    } = cmd;
    let action: Action = action.parse()?;
    let (verifier, policy) = ctx.auth()?;
    let audit = ctx.open_audit()?;
    let mut clock = ctx.clock();
    let (allowed, reason, subject, roles) = match verifier.verify(&token, &mut clock) {
        Err(e) => (false, format!("token refused: {e}"), None, Vec::new()),
        Ok(id) => {
            let d = policy.authorize(&id, action, resource.as_deref());
            (d.allowed, d.reason, Some(id.sub), id.roles)
        }
    };
    let mut entry = Entry::new(
        subject.as_deref().unwrap_or("unauthenticated"),
        action.as_str(),
        if allowed {
            Outcome::Allowed
        } else {
            Outcome::Denied
        },
        &reason,
    );
    entry.roles = roles.clone();
    entry.resource = resource;
    entry.policy_version = Some(policy.version);
    entry.details = serde_json::json!({"via": "outpost auth check", "local_actor": local_actor()});
    audit.append(entry).context("cannot record the decision")?;
    audit.close()?;
    if ctx.json {
        print_json(&serde_json::json!({
            "allowed": allowed, "reason": reason, "subject": subject, "roles": roles,
        }))?;
    } else {
        println!("{}: {reason}", if allowed { "allowed" } else { "denied" });
    }
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
