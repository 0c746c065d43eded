//! The dependency direction of ARCHITECTURE.md, read from `cargo metadata`: a change that
//! breaks it fails here, not in review.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// Crates that do network or async I/O; the engine and the policy crate must not pull them in.
const NETWORK_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "hyper",
    "axum",
    "reqwest",
    "rumqttc",
    "rustls",
    "tokio-rustls",
    "ureq",
];
const HTTP_CRATES: &[&str] = &["hyper", "axum", "reqwest", "ureq", "warp", "actix-web"];

/// Package name → names of everything it depends on, transitively (normal and build
/// dependencies; dev-dependencies do not ship).
fn closures() -> HashMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut edges: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].as_str() != Some("dev"))
            })
            .map(|d| d["pkg"].as_str().unwrap())
            .collect();
        edges.insert(node["id"].as_str().unwrap(), deps);
    }
    let mut result = HashMap::new();
    for member in meta["workspace_members"].as_array().unwrap() {
        let start = member.as_str().unwrap();
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(id) = stack.pop() {
            for &d in edges.get(id).into_iter().flatten() {
                if seen.insert(names[d].to_string()) {
                    stack.push(d);
                }
            }
        }
        result.insert(names[start].to_string(), seen);
    }
    result
}

fn assert_none(closures: &HashMap<String, BTreeSet<String>>, krate: &str, banned: &[&str]) {
    let deps = closures
        .get(krate)
        .unwrap_or_else(|| panic!("{krate} is not in the workspace"));
    let found: Vec<&&str> = banned.iter().filter(|b| deps.contains(**b)).collect();
    assert!(found.is_empty(), "{krate} must not depend on {found:?}");
}

#[test]
fn dependencies_point_one_way() {
    let c = closures();
    // The engine is offline and synchronous, and knows no other outpost crate.
    assert_none(
        &c,
        "outpost-engine",
        &["outpost-policy", "outpost-sync", "outpost-agent"],
    );
    assert_none(&c, "outpost-engine", NETWORK_CRATES);
    // candle is the engine's test reference only: the shipped binaries do not link it.
    for k in ["outpost-engine", "outpost-agent", "outpost-sync"] {
        assert_none(
            &c,
            k,
            &["candle-core", "candle-nn", "candle-transformers", "gemm"],
        );
    }
    // Sync knows nothing about inference.
    assert_none(
        &c,
        "outpost-sync",
        &["outpost-engine", "outpost-agent", "candle-core"],
    );
    assert_none(&c, "outpost-sync", HTTP_CRATES);
    // Policy knows nothing of networks, HTTP or MQTT.
    assert_none(
        &c,
        "outpost-policy",
        &["outpost-engine", "outpost-sync", "outpost-agent"],
    );
    assert_none(&c, "outpost-policy", NETWORK_CRATES);
    // Only the agent ties them together.
    for k in ["outpost-engine", "outpost-policy", "outpost-sync"] {
        assert!(c["outpost-agent"].contains(k), "the agent wires {k}");
    }
}

/// Every `.rs` file of the product crates (not tests), with its path from the workspace root.
fn product_sources() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    let mut out = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = ["engine/src", "policy/src", "sync/src", "agent/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    assert!(out.len() > 30, "found only {} source files", out.len());
    out
}

/// Code lines of `src` (comment lines dropped) that name `word` as a whole word.
fn mentions(src: &str, word: &str) -> bool {
    src.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .any(|l| {
            l.match_indices(word).any(|(i, _)| {
                let before = l[..i].chars().next_back();
                let after = l[i + word.len()..].chars().next();
                let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                // `lib::` is followed by a name; a bare word must end where it ends.
                !ident(before) && (word.ends_with(':') || !ident(after))
            })
        })
}

#[test]
fn each_external_library_has_one_home() {
    // library (as code names it) → the files or folders allowed to use it.
    let homes: &[(&str, &[&str])] = &[
        ("jsonwebtoken", &["policy/src/identity"]),
        ("ed25519_dalek", &["policy/src/signing.rs"]),
        // candle is the engine's test reference: `…/tests.rs` modules (exempt below) and the
        // test modules at the end of these two files.
        ("candle_transformers", &[]),
        (
            "candle_core",
            &["engine/src/quant.rs", "engine/src/quantize.rs"],
        ),
        (
            "rusqlite",
            &["engine/src/registry/", "policy/src/audit/", "sync/src/"],
        ),
        ("minijinja", &["engine/src/chat.rs"]),
        ("rumqttc", &["sync/src/conn"]),
        ("rustls", &["sync/src/conn"]),
        ("rustls_pki_types", &["sync/src/conn"]),
        (
            "clap",
            &[
                "agent/src/cli.rs",
                "agent/src/main.rs",
                "sync/src/bin/outpost-hub.rs",
            ],
        ),
        // Man pages and completions: `generate-docs` beside each binary's clap definitions.
        (
            "clap_mangen",
            &["agent/src/cli.rs", "sync/src/bin/outpost-hub.rs"],
        ),
        (
            "clap_complete",
            &["agent/src/cli.rs", "sync/src/bin/outpost-hub.rs"],
        ),
        ("rcgen", &["sync/src/hub/pki.rs"]),
        ("axum", &["agent/src/daemon/"]),
        ("hyper", &["agent/src/daemon/server.rs"]),
        ("hyper_util", &["agent/src/daemon/server.rs"]),
        (
            "tracing_subscriber",
            &["agent/src/logging.rs", "sync/src/bin/outpost-hub.rs"],
        ),
        ("prometheus", &["agent/src/daemon/metrics.rs"]),
        ("postgres", &["sync/src/hub/store/pg"]),
        ("r2d2", &["sync/src/hub/store/pg"]),
        ("nix", &["agent/src/context.rs", "sync/src/transfer.rs"]),
        ("indicatif", &["agent/src/commands/models.rs"]),
        // The one memory map (of a model file) sits with the other unsafe code.
        ("memmap2", &["engine/src/kernels/mod.rs"]),
    ];
    let sources = product_sources();
    let mut wrong = Vec::new();
    for (lib, allowed) in homes {
        // Unit-test modules (`…/tests.rs`) may use a library to build fixtures.
        for (path, src) in sources.iter().filter(|(p, _)| !p.ends_with("/tests.rs")) {
            if mentions(src, &format!("{lib}::")) && !allowed.iter().any(|a| path.starts_with(a)) {
                wrong.push(format!("{path} uses {lib} (its home: {allowed:?})"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn unsafe_code_lives_in_its_two_modules() {
    // Each file here justifies every `unsafe` block it holds (ARCHITECTURE.md, Invariants):
    // the agent's system calls, and the engine's kernels (SIMD, the weights' memory map).
    let allowed =
        |path: &str| path == "agent/src/sys.rs" || path.starts_with("engine/src/kernels/");
    let sources = product_sources();
    let offenders: Vec<&String> = sources
        .iter()
        .filter(|(path, src)| {
            !allowed(path) && (mentions(src, "unsafe") || src.contains("allow(unsafe_code)"))
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        offenders.is_empty(),
        "unsafe outside its modules: {offenders:?}"
    );
    // And the modules themselves say why, for each block.
    let mut checked = 0;
    for (path, src) in sources.iter().filter(|(p, _)| allowed(p)) {
        let blocks = src.matches("unsafe {").count();
        let reasons = src.matches("// SAFETY:").count();
        assert!(
            reasons >= blocks,
            "{path}: {blocks} unsafe blocks, {reasons} SAFETY notes"
        );
        checked += blocks;
    }
    assert!(checked > 0, "no unsafe block found where it is allowed");
}
