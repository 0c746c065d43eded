//! Embeds the git commit in the binary for `outpost --version`.
//!
//! `OUTPOST_GIT_COMMIT` overrides it (packaging from a tarball); without git it reads "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_GIT_COMMIT");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git_dir = root.join(".git");
    if git_dir.exists() {
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", git_dir.join("refs").display());
        println!(
            "cargo:rerun-if-changed={}",
            git_dir.join("packed-refs").display()
        );
    }
    let commit = std::env::var("OUTPOST_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(&root)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=OUTPOST_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_string())
    );
}
