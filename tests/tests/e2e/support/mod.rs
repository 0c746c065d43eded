//! The harness: run `outpost` as a process against a temp data directory, find the demo
//! models, mount small or read-only filesystems.
//!
//! Tests that need something the machine may lack (root for mounts, the demo models) skip
//! with a printed reason locally, and fail under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// Whether we run under CI, where nothing may be skipped.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the calling test (returns `None`) with a reason, or panics under CI.
pub fn skip<T>(reason: &str) -> Option<T> {
    assert!(!is_ci(), "cannot skip under CI=true: {reason}");
    eprintln!("SKIPPED: {reason}");
    None
}

/// The `outpost` binary of this build (target/<profile>/outpost).
pub fn outpost_bin() -> PathBuf {
    workspace_bin("outpost")
}

/// A binary of this workspace's build (target/<profile>/NAME).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --bins`, or run scripts/test)",
        bin.display()
    );
    bin
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success, got {self:#?}");
        &self.stdout
    }

    /// Asserts a failure with exit `code` and exactly one line on stderr containing `expect`.
    pub fn fails(&self, code: i32, expect: &str) {
        assert_eq!(self.code, Some(code), "expected exit {code}, got {self:#?}");
        let err = self.stderr.trim_end();
        assert_eq!(
            err.lines().count(),
            1,
            "expected one line on stderr: {err:?}"
        );
        assert!(err.starts_with("error: "), "{err:?}");
        assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

/// One device: a temp folder holding an (empty) config and a data directory.
pub struct Device {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub config: PathBuf,
}

impl Device {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let data = root.path().join("data");
        let config = root.path().join("etc").join("outpost.toml");
        std::fs::create_dir_all(config.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&config, "").expect("write config");
        Self { root, data, config }
    }

    /// A device whose data directory is `data` (e.g. a mount point).
    pub fn with_data(data: PathBuf) -> Self {
        Self {
            data,
            ..Self::new()
        }
    }

    /// A command with this device's config and data dir, isolated from the caller's
    /// environment.
    pub fn command(&self) -> Command {
        let mut c = Command::new(outpost_bin());
        c.env_remove("OUTPOST_DATA_DIR")
            .env_remove("OUTPOST_CONFIG")
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data);
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command().args(args).output().expect("run outpost"))
    }

    /// `keys generate --out <root>/keys --name NAME`: an issuer key pair; the folder holding
    /// `NAME.key.pem` and `NAME.pub.pem`.
    pub fn issuer_keys(&self, name: &str) -> PathBuf {
        let keys = self.root.path().join("keys");
        let out = keys.to_str().expect("a UTF-8 path");
        self.run(&["keys", "generate", "--out", out, "--name", name])
            .ok();
        keys
    }

    /// `models import PATH --name NAME [extra…]`.
    pub fn import(&self, path: &Path, name: &str, extra: &[&str]) -> Run {
        let path = path.to_str().expect("a UTF-8 path");
        let mut args = vec!["models", "import", path, "--name", name];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Writes `bytes` to a file in the device's temp folder and returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.root.path().join(name);
        std::fs::write(&p, bytes).expect("write file");
        p
    }

    /// `models list --json`, as (label, aliases) pairs.
    pub fn models(&self) -> Vec<(String, Vec<String>)> {
        let v = self.run(&["models", "list", "--json"]).json();
        v.as_array()
            .expect("a JSON array")
            .iter()
            .map(|m| {
                let label = format!(
                    "{}:{}",
                    m["name"].as_str().unwrap(),
                    m["version"].as_str().unwrap()
                );
                let aliases = m["aliases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                (label, aliases)
            })
            .collect()
    }

    /// Names in the blob folder (temp files included).
    pub fn blob_files(&self) -> Vec<String> {
        let dir = self.data.join("blobs/sha256");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

pub fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).expect("open");
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

/// A demo model from the cache `scripts/fetch-models.py` fills, or a skip.
pub fn demo_model(file: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("OUTPOST_MODEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/outpost/models"))
        })?;
    let p = cache.join(file);
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!(
            "{} is missing: run scripts/fetch-models.py",
            p.display()
        ))
    }
}

/// A tmpfs mounted on a temp folder, unmounted on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes, or skips when mounting is not allowed here.
    pub fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir }),
            Ok(o) => skip(&format!(
                "cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => skip(&format!("cannot run mount: {e}")),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn remount_read_only(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "remount read-only failed");
    }
}

/// Bytes available on the filesystem holding `path`, as `df` reports them.
pub fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("run df");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df said: {text}"))
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The Python of the tests' virtual environment (`tests/python/requirements.txt`, set up by
/// scripts/test: `OUTPOST_OPENAI_PYTHON`, else `~/.cache/outpost/venv-openai`), when it
/// exists and imports `module`; else a skip naming what is missing.
pub fn venv_python(module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("OUTPOST_OPENAI_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/outpost/venv-openai/bin/python"))
        });
    let Some(python) = python.filter(|p| p.is_file()) else {
        return skip(
            "no Python virtual environment for the tests: run scripts/test (it sets up ~/.cache/outpost/venv-openai)",
        );
    };
    let imports = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if imports {
        Some(python)
    } else {
        skip(&format!(
            "{} cannot import {module}: run scripts/test (it installs tests/python/requirements.txt)",
            python.display()
        ))
    }
}

/// `strace`, or a skip (a failure under CI, where it must be installed).
pub fn strace() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/strace");
    let works = p.is_file()
        && Command::new(&p)
            .args(["-f", "-e", "trace=none", "true"])
            .output()
            .is_ok_and(|o| o.status.success());
    if works {
        Some(p)
    } else {
        skip("strace is missing or cannot trace here (apt-get install strace)")
    }
}

/// One finished system call of an `strace -f -y` log. Calls are kept in the order they
/// returned, which for calls on different threads is the order that matters here: a call
/// that returned before another started happened before it.
#[derive(Debug, Clone)]
pub struct Syscall {
    pub pid: u32,
    pub name: String,
    /// The argument text, as strace printed it.
    pub args: String,
    /// What follows ` = `: a number, with `<path>` for a descriptor (`-y`), or `-1 ERRNO …`.
    pub result: String,
}

impl Syscall {
    /// Whether the call succeeded.
    pub fn ok(&self) -> bool {
        !self.result.starts_with('-') && !self.result.starts_with('?')
    }

    /// The first argument as a descriptor number.
    pub fn fd(&self) -> Option<i32> {
        let end = self.args.find(|c: char| !c.is_ascii_digit())?;
        self.args[..end].parse().ok()
    }

    /// The path of the descriptor in the first argument (`-y` prints `3</the/path>`).
    pub fn fd_path(&self) -> Option<&str> {
        let rest = self.args.strip_prefix(|c: char| c.is_ascii_digit())?;
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        let rest = rest.strip_prefix('<')?;
        Some(&rest[..rest.find('>')?])
    }

    /// The path of a descriptor the call returned (`openat(…) = 5</the/path>`).
    pub fn result_path(&self) -> Option<&str> {
        let rest = self.result.split_once('<')?.1;
        Some(&rest[..rest.rfind('>')?])
    }

    /// The string arguments, unescaped (paths of `openat` and `rename`).
    pub fn strings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = self.args.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut s = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some(other) => s.push(other),
                        None => break,
                    },
                    c => s.push(c),
                }
            }
            out.push(s);
        }
        out
    }

    /// `fsync` or `fdatasync`.
    pub fn is_sync(&self) -> bool {
        matches!(self.name.as_str(), "fsync" | "fdatasync")
    }

    /// `write`, `pwrite64`, `writev` or `pwritev`.
    pub fn is_write(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2"
        )
    }

    pub fn is_rename(&self) -> bool {
        matches!(self.name.as_str(), "rename" | "renameat" | "renameat2")
    }
}

/// Parses an `strace -f -y -o FILE` log, joining `<unfinished ...>` calls with their
/// `<... NAME resumed>` ends. Signals, exits and anything unparsable are skipped.
pub fn parse_strace(text: &str) -> Vec<Syscall> {
    let mut calls = Vec::new();
    let mut pending: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    for line in text.lines() {
        let (pid, rest) = match line.split_once(char::is_whitespace) {
            Some((p, rest)) if p.bytes().all(|b| b.is_ascii_digit()) => {
                (p.parse().unwrap_or(0), rest.trim_start())
            }
            _ => (0, line),
        };
        let whole = if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, start.to_string());
            continue;
        } else if let Some(end) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = end.split_once(" resumed>") else {
                continue;
            };
            match pending.remove(&pid) {
                Some(start) => format!("{start}{tail}"),
                None => continue,
            }
        } else {
            rest.to_string()
        };
        let Some(open) = whole.find('(') else {
            continue;
        };
        let Some(close) = whole.rfind(") = ") else {
            continue;
        };
        let name = &whole[..open];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        calls.push(Syscall {
            pid,
            name: name.to_string(),
            args: whole[open + 1..close].to_string(),
            result: whole[close + 4..].to_string(),
        });
    }
    calls
}

impl Device {
    /// Runs `outpost ARGS` under `strace -f -y`, tracing the system calls `calls`
    /// (comma-separated); what it printed, and the calls in the order they returned.
    pub fn traced(&self, strace: &Path, calls: &str, args: &[&str]) -> (Run, Vec<Syscall>) {
        let log = self.root.path().join(format!(
            "strace-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let c = self.command();
        let mut cmd = Command::new(strace);
        cmd.args(["-f", "-y", "-qq", "-s", "256", "-e"])
            .arg(format!("trace={calls}"))
            .arg("-o")
            .arg(&log)
            .arg(c.get_program())
            .args(c.get_args())
            .args(args);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let run = Run::from(cmd.output().expect("run strace"));
        let text = std::fs::read_to_string(&log).expect("read the strace log");
        (run, parse_strace(&text))
    }
}
