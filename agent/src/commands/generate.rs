//! `outpost generate`: one prompt, answered offline by a local model.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use outpost_engine::chat::Message;
use outpost_engine::registry::{ModelRecord, ModelRef, Registry};
use outpost_engine::{GenerateParams, LoadOptions, LoadedModel, SamplingParams};
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::rbac::Action;
use sha2::{Digest, Sha256};

use super::print_json;
use crate::cli::GenerateArgs;
use crate::context::{Context, local_actor};

/// Finds the model a REF or alias names (default: the alias `default`).
pub fn resolve(reg: &Registry, reference: Option<&str>) -> anyhow::Result<ModelRecord> {
    let name = reference.unwrap_or("default");
    if let Some(m) = reg.alias(name)? {
        return Ok(m);
    }
    if reference.is_none() {
        anyhow::bail!(
            "no model is active as 'default': import one and run `outpost models activate NAME`"
        );
    }
    Ok(reg.resolve(&name.parse::<ModelRef>()?)?)
}

/// Loads a model from the registry, holding its blob so that it is not deleted meanwhile.
pub fn load(
    ctx: &Context,
    reference: Option<&str>,
    context: Option<usize>,
) -> anyhow::Result<(ModelRecord, LoadedModel, std::fs::File)> {
    let reg = Registry::open_read_only(ctx.data_dir().root())?;
    let record = resolve(&reg, reference)?;
    let held = reg.blobs().open_shared(&record.sha256)?;
    let engine = &ctx.loaded.config.engine;
    let opts = LoadOptions {
        context_length: context.or(engine.context_length.map(|c| c as usize)),
        memory_budget: engine.memory_budget.map(|b| b.0),
    };
    let model = LoadedModel::load(&reg.model_path(&record), &opts)
        .with_context(|| format!("cannot load {}", record.label()))?;
    Ok((record, model, held))
}

pub fn run(ctx: &Context, a: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.max_tokens <= 1 << 20, "-n {} is absurd", a.max_tokens);
    anyhow::ensure!(
        a.temperature >= 0.0 && a.temperature.is_finite(),
        "--temperature must be 0 or more"
    );
    let (record, mut model, _held) = load(ctx, a.model.as_deref(), a.context)?;
    if a.chat.is_some() && model.chat.is_fallback() {
        eprintln!(
            "note: {} has no chat template; using a plain 'role: text' prompt",
            record.label()
        );
    }
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => model.encode_text(p)?,
        (None, Some(c)) => {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(Message::new("system", s));
            }
            messages.push(Message::new("user", c));
            model.encode_chat(&messages)?
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplingParams::default()
        },
        stop: a.stop.clone(),
        top_logprobs: a.top_logprobs.min(100),
        logprobs: false,
    };
    let cancel = AtomicBool::new(false);
    let stream = !ctx.json;
    let mut out = std::io::stdout();
    let generation = model.generate(
        &prompt,
        &params,
        &mut |piece| {
            if stream {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        },
        &cancel,
    )?;
    record_inference(ctx, &record, &a, &generation);
    if ctx.json {
        let mut v = serde_json::to_value(&generation)?;
        v["model"] = serde_json::Value::String(record.label());
        print_json(&v)?;
    } else {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// Records the inference in the audit log: model, token counts and the prompt's SHA-256,
/// never the prompt. Best effort: inference keeps working when the disk is full.
fn record_inference(
    ctx: &Context,
    record: &ModelRecord,
    a: &GenerateArgs,
    g: &outpost_engine::Generation,
) {
    let text = a
        .prompt
        .clone()
        .or_else(|| a.chat.clone())
        .unwrap_or_default();
    let mut e = Entry::new(
        &local_actor(),
        Action::InferenceRun.as_str(),
        Outcome::Success,
        "local command line",
    );
    e.resource = Some(record.label());
    e.details = serde_json::json!({
        "prompt_sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "prompt_tokens": g.prompt_tokens.len(),
        "completion_tokens": g.tokens.len(),
        "finish_reason": g.finish_reason,
    });
    let result = ctx.open_audit().and_then(|log| {
        log.append(e)?;
        log.close()?;
        Ok(())
    });
    if let Err(err) = result {
        eprintln!("warning: the inference was not recorded in the audit log: {err:#}");
    }
}
