//! The engine computes what llama.cpp computes: `../shared/golden/` holds, for both demo
//! models, llama.cpp's prompt ids, greedy continuation, logit margins and first-step top ten.
//! The comparison rule is the golden README's:
//! 1. prompt ids equal, exactly;
//! 2. generated ids equal up to the first difference, which may only fall where llama.cpp's
//!    own margin between its best and second-best logit is below 1.0 (a near-tie);
//! 3. at the first step, llama.cpp's five best tokens are among our ten best, each with a gap
//!    to the top within 1.0 of llama.cpp's gap.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use outpost_engine::generate::{GenerateParams, SamplingParams};
use outpost_engine::{LoadOptions, LoadedModel};
use serde_json::Value;

use crate::support::demo_model;

fn golden(name: &str) -> Option<Value> {
    let dir = std::env::var_os("OUTPOST_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("golden"));
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("golden JSON")),
        Err(e) => crate::support::skip(&format!("{}: {e}", path.display())),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_model(model_file: &str, golden_file: &str) {
    let (Some(path), Some(g)) = (demo_model(model_file), golden(golden_file)) else {
        return;
    };
    let mut model = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let params = GenerateParams {
        max_tokens: g["n_gen"].as_u64().unwrap() as usize,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        top_logprobs: 10,
        logprobs: false,
    };
    let mut failures = Vec::new();
    for item in g["items"].as_array().unwrap() {
        let prompt = item["prompt"].as_str().unwrap();
        let ours = model.encode_text(prompt).unwrap();
        let want = ids(&item["prompt_ids"]);
        if ours != want {
            failures.push(format!(
                "{prompt:?}: prompt ids {ours:?}, llama.cpp {want:?}"
            ));
            continue;
        }
        let out = model
            .generate(&ours, &params, &mut |_| {}, &AtomicBool::new(false))
            .unwrap();
        let gen_ids = ids(&item["gen_ids"]);
        let margins: Vec<f64> = item["gen_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let diverge = (0..gen_ids.len()).find(|&i| out.tokens.get(i) != Some(&gen_ids[i]));
        if let Some(i) = diverge
            && margins[i] >= 1.0
        {
            failures.push(format!(
                "{prompt:?}: step {i} gave {:?}, llama.cpp {} with a margin of {:.3}",
                out.tokens.get(i),
                gen_ids[i],
                margins[i]
            ));
        }
        let top = &out.top_logprobs.as_ref().unwrap()[0];
        let golden_top: Vec<(u32, f64)> = item["first_step_top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap()))
            .collect();
        let (g_best, our_best) = (golden_top[0].1, f64::from(top[0].logprob));
        for &(id, logit) in &golden_top[..5] {
            match top.iter().find(|t| t.id == id) {
                None => failures.push(format!(
                    "{prompt:?}: golden top token {id} not in our top 10"
                )),
                Some(t) => {
                    let ours = f64::from(t.logprob) - our_best;
                    let theirs = logit - g_best;
                    if (ours - theirs).abs() > 1.0 {
                        failures.push(format!(
                            "{prompt:?}: token {id} gap {ours:.3} vs llama.cpp {theirs:.3}"
                        ));
                    }
                }
            }
        }
        eprintln!(
            "{prompt:?}: {} of {} tokens equal",
            diverge.unwrap_or(gen_ids.len()),
            gen_ids.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "golden-smollm2-135m-q4_1.json",
    );
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model("gemma-3-270m-q4_k_m.gguf", "golden-gemma3-270m-q4_k_m.json");
}
