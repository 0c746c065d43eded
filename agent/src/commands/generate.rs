//! `outpost generate`: one prompt, answered offline by a local model.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use outpost_engine::chat::Message;
use outpost_engine::generate::TopLogprob;
use outpost_engine::registry::{ModelRecord, Registry, RegistryError};
use outpost_engine::{Event, GenerateParams, LoadOptions, ModelLease, Prompt, SamplingParams};
use outpost_policy::audit::{Entry, Outcome};
use outpost_policy::rbac::Action;

use super::print_json;
use crate::cli::GenerateArgs;
use crate::context::{Context, local_actor};

/// Finds the model a REF or alias names (default: the alias `default`).
pub fn resolve(reg: &Registry, reference: Option<&str>) -> anyhow::Result<ModelRecord> {
    match reg.resolve_ref_or_alias(reference.unwrap_or("default")) {
        Err(RegistryError::NotFound(_)) if reference.is_none() => anyhow::bail!(
            "no model is active as 'default': import one and run `outpost models activate NAME`"
        ),
        found => Ok(found?),
    }
}

/// Loads a model from the registry, holding its blob so that it is not deleted meanwhile.
pub fn load(
    ctx: &Context,
    reference: Option<&str>,
    context: Option<usize>,
) -> anyhow::Result<ModelLease> {
    let reg = Registry::open_read_only(ctx.data_dir().root())?;
    let record = resolve(&reg, reference)?;
    let engine = &ctx.loaded.config.engine;
    let opts = LoadOptions {
        context_length: context.or(engine.context_length.map(|c| c as usize)),
        memory_budget: engine.memory_budget.map(|b| b.0),
    };
    let label = record.label();
    ModelLease::load(reg.blobs(), record, &opts).with_context(|| format!("cannot load {label}"))
}

pub fn run(ctx: &Context, a: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.max_tokens <= 1 << 20, "-n {} is absurd", a.max_tokens);
    anyhow::ensure!(
        a.temperature >= 0.0 && a.temperature.is_finite(),
        "--temperature must be 0 or more"
    );
    // The lease holds the blob's lock for as long as the model is used.
    let mut lease = load(ctx, a.model.as_deref(), a.context)?;
    let (model, record) = (&mut lease.model, &lease.record);
    if a.chat.is_some() && model.chat.is_fallback() {
        eprintln!(
            "note: {} has no chat template; using a plain 'role: text' prompt",
            record.label()
        );
    }
    let input = match (&a.prompt, &a.chat) {
        (Some(p), _) => Prompt::Text(p.clone()),
        (None, Some(c)) => {
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(Message::new("system", s));
            }
            messages.push(Message::new("user", c));
            Prompt::Chat(messages)
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let prompt = model.prompt_ids(&input)?;
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
    let mut top: Vec<Vec<TopLogprob>> = Vec::new();
    let generation = model.generate_with(
        &prompt,
        &params,
        &mut |event| match event {
            Event::Token { top: Some(t), .. } => top.push(t.to_vec()),
            Event::Token { .. } => {}
            Event::Text(piece) => {
                if stream {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }
            }
        },
        &cancel,
    )?;
    record_inference(ctx, record, &input, prompt.len(), &generation);
    if ctx.json {
        let mut v = serde_json::to_value(&generation)?;
        v["model"] = serde_json::Value::String(record.label());
        v["prompt_tokens"] = serde_json::to_value(&prompt)?;
        if params.top_logprobs > 0 {
            v["top_logprobs"] = serde_json::to_value(&top)?;
        }
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
    input: &Prompt,
    prompt_tokens: usize,
    g: &outpost_engine::Generation,
) {
    let mut e = Entry::new(
        &local_actor(),
        Action::InferenceRun.as_str(),
        Outcome::Success,
        "local command line",
    );
    e.resource = Some(record.label());
    e.details = serde_json::json!({
        "prompt_sha256": input.digest(),
        "prompt_tokens": prompt_tokens,
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
