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
