//! The Debian packages (`scripts/package`): built once per run from the binaries of this
//! build (`--no-build`, no second compilation), then checked as an operator would meet them:
//! lintian, their contents against README's list, the units under `systemd-analyze verify`,
//! and the device package unpacked into a temporary root running the demo.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::support::{demo_model, skip};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// A tool the checks need, or a skip naming its Debian package (scripts/test installs them).
fn tool(name: &str, package: &str) -> Option<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some(())
    } else {
        skip(&format!(
            "{name} is missing (apt-get install {package}; scripts/test does)"
        ))
    }
}

/// The two packages, `outpost` then `outpost-hub`, made once for the whole test binary.
struct Packages {
    _dir: tempfile::TempDir,
    device: PathBuf,
    hub: PathBuf,
}

fn packages() -> Option<&'static Packages> {
    static PACKAGES: OnceLock<Option<Packages>> = OnceLock::new();
    tool("dpkg-deb", "dpkg")?;
    PACKAGES.get_or_init(build_packages).as_ref()
}

/// The packages, and a tool a test runs on them.
fn packages_and_tool(name: &str, package: &str) -> Option<&'static Packages> {
    tool(name, package)?;
    packages()
}

fn build_packages() -> Option<Packages> {
    // target/<profile dir>/deps/e2e-…: package the binaries of the same build.
    let exe = std::env::current_exe().expect("the test binary has a path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("target/<profile>/deps");
    let profile = if profile_dir == "debug" {
        "dev"
    } else {
        profile_dir
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(workspace_root().join("scripts/package"))
        .args(["--profile", profile, "--no-build", "--fast", "--out"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/package");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/package failed: {stderr}");
    let debs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    let find = |prefix: &str| {
        debs.iter()
            .find(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with("_amd64.deb"))
            })
            .unwrap_or_else(|| panic!("no {prefix}*_amd64.deb in {debs:?} ({stderr})"))
            .clone()
    };
    Some(Packages {
        device: find("outpost_"),
        hub: find("outpost-hub_"),
        _dir: dir,
    })
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `dpkg -x` into a fresh temporary root.
fn unpack(deb: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    let (ok, _, err) = run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    assert!(ok, "dpkg-deb -x {}: {err}", deb.display());
    root
}

/// README's "What the packages install" table: (package, path pattern) rows.
fn readme_promises() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("#### What the packages install")
        .nth(1)
        .expect("README has a \"What the packages install\" section");
    let rows: Vec<(String, String)> = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let package = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let path = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((package.to_string(), path.to_string()))
        })
        .collect();
    assert!(rows.len() > 10, "README's table is too short: {rows:?}");
    rows
}

/// `pattern` with `*` standing for any characters but `/`.
fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .take_while(|&i| !rest[..i].contains('/'))
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// The files and symlinks of a package, as absolute paths.
fn contents(deb: &Path) -> BTreeSet<String> {
    let (ok, out, err) = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    assert!(ok, "dpkg-deb -c: {err}");
    out.lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn each_package_holds_what_the_readme_promises() {
    let Some(p) = packages() else { return };
    let promises = readme_promises();
    for (name, deb) in [("outpost", &p.device), ("outpost-hub", &p.hub)] {
        let files = contents(deb);
        let patterns: Vec<&str> = promises
            .iter()
            .filter(|(pkg, _)| pkg == name)
            .map(|(_, path)| path.as_str())
            .collect();
        let unlisted: Vec<&String> = files
            .iter()
            .filter(|f| !patterns.iter().any(|pat| glob_match(pat, f)))
            .collect();
        assert!(
            unlisted.is_empty(),
            "{name} ships files README does not list: {unlisted:?}"
        );
        let missing: Vec<&&str> = patterns
            .iter()
            .filter(|pat| !files.iter().any(|f| glob_match(pat, f)))
            .collect();
        assert!(
            missing.is_empty(),
            "{name} lacks what README promises: {missing:?}"
        );
    }
    // A man page per command, with the subcommands' own pages.
    let device = contents(&p.device);
    for page in [
        "outpost.1.gz",
        "outpost-daemon.1.gz",
        "outpost-models-import.1.gz",
    ] {
        assert!(
            device.contains(&format!("/usr/share/man/man1/{page}")),
            "{page} missing"
        );
    }
    assert!(
        !device.iter().any(|f| f.contains("generate-docs")),
        "the hidden command has a man page"
    );
}

#[test]
fn the_configs_are_conffiles_and_the_binaries_are_stripped() {
    let Some(p) = packages() else { return };
    for (deb, conffile, bin) in [
        (&p.device, "/etc/outpost/outpost.toml", "usr/bin/outpost"),
        (&p.hub, "/etc/outpost-hub/hub.toml", "usr/bin/outpost-hub"),
    ] {
        let control = tempfile::tempdir().expect("temp dir");
        let (ok, _, err) = run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb)
            .arg(control.path()));
        assert!(ok, "dpkg-deb -e: {err}");
        let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
        assert!(conffiles.lines().any(|l| l == conffile), "{conffiles}");
        // Only purge deletes the data directory, and it says so.
        let postrm = std::fs::read_to_string(control.path().join("postrm")).unwrap();
        let purge = postrm
            .split("if [ \"$1\" = \"purge\" ]; then")
            .last()
            .unwrap();
        assert!(
            purge.contains("purge deletes") && purge.contains("rm -rf"),
            "{postrm}"
        );
        let rm_lines = postrm.lines().filter(|l| l.contains("rm -rf")).count();
        assert_eq!(
            rm_lines,
            purge.lines().filter(|l| l.contains("rm -rf")).count(),
            "{postrm}"
        );

        let root = unpack(deb);
        let (ok, out, err) = run(Command::new("file").arg(root.path().join(bin)));
        assert!(ok, "file: {err}");
        assert!(
            out.contains("stripped") && !out.contains("not stripped"),
            "{out}"
        );
    }
}

#[test]
fn lintian_finds_no_errors_and_readme_explains_each_warning() {
    let Some(p) = packages_and_tool("lintian", "lintian") else {
        return;
    };
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    for deb in [&p.device, &p.hub] {
        // Exit status 0 unless a tag at error level (or worse) is found.
        let (ok, out, err) = run(Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(deb));
        assert!(ok, "lintian {}:\n{out}{err}", deb.display());
        for line in out.lines() {
            assert!(!line.starts_with("E:"), "{line}");
            if let Some(rest) = line.strip_prefix("W: ") {
                let tag = rest.split_whitespace().nth(1).unwrap_or(rest);
                assert!(
                    readme.contains(&format!("`{tag}`")),
                    "lintian warns {line:?}: README's Install section must explain `{tag}`"
                );
            }
        }
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Some(p) = packages_and_tool("systemd-analyze", "systemd") else {
        return;
    };
    for (deb, unit) in [
        (&p.device, "outpost.service"),
        (&p.hub, "outpost-hub.service"),
    ] {
        let root = unpack(deb);
        let units = root.path().join("usr/lib/systemd/system");
        assert!(units.join(unit).is_file(), "{unit} is not in the package");
        // The system's own units (sysinit.target…) beside the package's, as on a device; the
        // package's binary and man pages (`Documentation=man:…`) are looked up in the root.
        let (ok, _, err) = run(Command::new("cp")
            .args(["-rn", "/usr/lib/systemd/system/."])
            .arg(&units));
        assert!(ok, "cp: {err}");
        let (ok, out, err) = run(Command::new("systemd-analyze")
            .env("MANPATH", root.path().join("usr/share/man"))
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(format!("/usr/lib/systemd/system/{unit}")));
        // Unknown keys and bad values are only warnings: any output fails the check.
        assert!(
            ok && out.trim().is_empty() && err.trim().is_empty(),
            "{unit}: {out}{err}"
        );
    }
}

#[test]
fn the_unpacked_device_package_runs_the_demo() {
    let Some(p) = packages() else { return };
    let Some(model) = demo_model(SMOLLM2) else {
        return;
    };
    let root = unpack(&p.device);
    let bin = root.path().join("usr/bin/outpost");
    let config = root.path().join("etc/outpost/outpost.toml");
    let data = root.path().join("var/lib/outpost");
    let outpost = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.env_remove("OUTPOST_DATA_DIR")
            .env_remove("OUTPOST_CONFIG")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(args);
        let (ok, out, err) = run(&mut c);
        assert!(ok, "outpost {args:?}: {out}{err}");
        out
    };
    let version = outpost(&["--version"]);
    assert!(
        version.starts_with(&format!("outpost {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let check = outpost(&["config", "check"]);
    assert!(check.contains("Configuration OK"), "{check}");
    outpost(&[
        "models",
        "import",
        model.to_str().expect("a UTF-8 path"),
        "--name",
        "smollm2",
    ]);
    outpost(&["models", "activate", "smollm2"]);
    let answer = outpost(&[
        "generate",
        "--chat",
        "What is the capital of France? Answer in one sentence.",
        "-n",
        "24",
        "--temperature",
        "0",
    ]);
    assert!(answer.contains("Paris"), "{answer}");

    let hub_root = unpack(&p.hub);
    let (ok, out, err) =
        run(Command::new(hub_root.path().join("usr/bin/outpost-hub")).arg("--version"));
    assert!(ok && out.starts_with("outpost-hub "), "{out}{err}");
}

#[test]
fn the_completions_load_in_bash() {
    let Some(p) = packages() else { return };
    let root = unpack(&p.device);
    let script = root
        .path()
        .join("usr/share/bash-completion/completions/outpost");
    let (ok, out, err) = run(Command::new("bash").arg("-c").arg(format!(
        "source '{}' && complete -p outpost",
        script.display()
    )));
    assert!(ok && out.contains("outpost"), "{out}{err}");
}

#[test]
fn glob_patterns_match_one_path_segment() {
    assert!(glob_match(
        "/usr/share/man/man1/outpost*.1.gz",
        "/usr/share/man/man1/outpost-daemon.1.gz"
    ));
    assert!(glob_match("/usr/bin/outpost", "/usr/bin/outpost"));
    assert!(!glob_match("/usr/bin/outpost", "/usr/bin/outpost-hub"));
    assert!(!glob_match("/usr/*/outpost", "/usr/share/doc/outpost"));
}
