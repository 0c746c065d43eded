//! `outpost daemon` as a real process on a free port: authentication and authorization per
//! role, bad input, metrics, streaming, cancellation, model swaps, the queue, shutdown on
//! SIGTERM, systemd notifications and the official `openai` Python client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Device, Syscall, Tmpfs, demo_model, is_ci, skip, strace};
use outpost_engine::testing::GgufBuilder;

const ISS: &str = "https://admin.example";
const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A device with an issuer key, tokens for each role, and a daemon to start.
pub struct Agent {
    pub d: Device,
    issuer_key: PathBuf,
    /// The port the daemon bound (it listens on port 0 and logs the one it got); 0 until
    /// `start`.
    pub port: u16,
    child: Option<Child>,
    stderr_log: PathBuf,
}

impl Agent {
    /// `api`: extra lines for the `[api]` table.
    pub fn new(api: &str) -> Self {
        Self::on(Device::new(), api)
    }

    /// On a given device (e.g. one whose data directory is a small mount).
    pub fn on(d: Device, api: &str) -> Self {
        let keys = d.issuer_keys("admin-1");
        std::fs::write(
            &d.config,
            format!(
                "[device]\nid = \"edge-1\"\n\
                 [api]\nlisten = \"127.0.0.1:0\"\n{api}\n\
                 [[auth.issuers]]\niss = \"{ISS}\"\nkid = \"admin-1\"\nalgorithm = \"EdDSA\"\n\
                 public_key = \"{public}\"\n",
                public = keys.join("admin-1.pub.pem").display(),
            ),
        )
        .unwrap();
        let stderr_log = d.root.path().join("daemon.log");
        Self {
            issuer_key: keys.join("admin-1.key.pem"),
            d,
            port: 0,
            child: None,
            stderr_log,
        }
    }

    pub fn token(&self, sub: &str, roles: &str, extra: &[&str]) -> String {
        let key = self.issuer_key.to_str().unwrap();
        let mut args = vec![
            "token", "issue", "--key", key, "--iss", ISS, "--kid", "admin-1", "--sub", sub,
            "--role", roles,
        ];
        args.extend_from_slice(extra);
        self.d.run(&args).ok().trim().to_string()
    }

    /// Imports `bytes` as model `name` and, if `activate`, makes it `default`.
    pub fn add_model(&self, file: &Path, name: &str, activate: bool) {
        self.d.import(file, name, &[]).ok();
        if activate {
            self.d.run(&["models", "activate", name]).ok();
        }
    }

    /// Imports the tiny llama built in code as `name` and makes it `default`.
    pub fn add_tiny(&self, name: &str) {
        let path = self
            .d
            .file(&format!("{name}.gguf"), &GgufBuilder::tiny_llama().build());
        self.add_model(&path, name, true);
    }

    /// Starts the daemon and waits for `/healthz`.
    pub fn start(&mut self) {
        self.start_with(|_| {});
    }

    pub fn start_with(&mut self, edit: impl FnOnce(&mut Command)) {
        let log = std::fs::File::create(&self.stderr_log).unwrap();
        let mut cmd = self.d.command();
        cmd.arg("daemon")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC");
        edit(&mut cmd);
        // Each run binds a port of its own, read from its log.
        self.port = 0;
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.port == 0
                && let Some(port) = bound_port(&self.log())
            {
                self.port = port;
            }
            if self.port != 0
                && let Ok(r) = self.try_request("GET", "/healthz", None, None)
            {
                assert_eq!(r.status, 200);
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no /healthz after 60 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the daemon to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        send(stream, method, path, token, body, &[])
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
        self.try_request(method, path, token, bytes.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; daemon log: {}", self.log()))
    }

    /// Opens a streaming request and returns the reader positioned after the headers.
    pub fn open_stream(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> (u16, BufReader<TcpStream>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write_request(
            &mut s,
            "POST",
            path,
            Some(token),
            Some(&serde_json::to_vec(body).unwrap()),
            &[],
        );
        let mut r = BufReader::new(s);
        let (status, _) = read_head(&mut r).unwrap();
        (status, r)
    }

    /// The audit log, read with the CLI.
    pub fn audit(&self) -> Vec<Value> {
        let out = self
            .d
            .run(&["audit", "query", "--json", "--limit", "100000"]);
        serde_json::from_str::<Value>(out.ok())
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

/// The port in the daemon's `Listening.` log event, text (`address=http://127.0.0.1:PORT`)
/// or JSON (`"address":"http://127.0.0.1:PORT"`).
fn bound_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("Listening."))?;
    let at = line.find("http://127.0.0.1:")? + "http://127.0.0.1:".len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The error code of an OpenAI-shaped error.
    pub fn error_code(&self) -> String {
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

fn write_request(
    s: &mut impl Write,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    extra: &[(&str, &str)],
) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A body the server refuses early may not be read in full: that is fine.
        let _ = s.write_all(b);
    }
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads a body: chunked or to the end (we always send `Connection: close`).
fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> std::io::Result<Vec<u8>> {
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if !chunked {
        r.read_to_end(&mut body)?;
        return Ok(body);
    }
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
        if n == 0 {
            return Ok(body);
        }
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..n]);
    }
}

fn send<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    extra: &[(&str, &str)],
) -> std::io::Result<Response> {
    write_request(&mut s, method, path, token, body, extra);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let body = read_body(&mut r, &headers)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The `data:` payloads of a server-sent event stream, up to and including `[DONE]`.
fn read_events(r: &mut impl BufRead) -> Vec<String> {
    let mut events = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return events,
            Ok(_) => {}
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            events.push(data.to_string());
            if data == "[DONE]" {
                return events;
            }
        }
    }
}

/// Reads a stream up to its first event carrying generated text; that event's line.
fn first_content(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    while !(line.starts_with("data: {")
        && line.contains("\"content\":\"")
        && !line.contains("\"content\":\"\""))
    {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
    }
    line
}

/// A chat request; `extra` adds or overrides fields. Sampling is seeded unless `extra` says
/// otherwise, so that what a test sees does not change from run to run.
fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"messages": [{"role": "user", "content": content}], "seed": 7});
    if let (Value::Object(a), Value::Object(b)) = (&mut v, extra) {
        a.extend(b);
    }
    v
}

#[test]
fn each_role_gets_401_403_or_200_as_the_policy_says_and_all_are_audited() {
    let mut a = Agent::new("");
    a.add_tiny("tiny");
    a.start();
    let admin = a.token("root", "admin", &[]);
    let operator = a.token("olivia", "operator", &[]);
    let auditor = a.token("aude", "auditor", &[]);
    let app_ok = a.token("cam", "app", &["--models", "tiny*"]);
    let app_other = a.token("cam2", "app", &["--models", "gemma*"]);
    let body = chat(PROMPT_CANARY, json!({"max_tokens": 4, "temperature": 0}));

    // No token, a malformed one, a foreign one: 401 with a challenge.
    let r = a.request("POST", "/v1/chat/completions", None, Some(&body));
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(r.error_code(), "invalid_token");
    let r = a.request("GET", "/v1/models", Some("not.a.jwt"), None);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );
    let r = a.request("GET", "/healthz", None, None);
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));

    let cases: [(&str, &str, &str, Option<&Value>, u16); 14] = [
        (&admin, "POST", "/v1/chat/completions", Some(&body), 200),
        (&operator, "POST", "/v1/chat/completions", Some(&body), 200),
        (&app_ok, "POST", "/v1/chat/completions", Some(&body), 200),
        (&app_other, "POST", "/v1/chat/completions", Some(&body), 403),
        (&auditor, "POST", "/v1/chat/completions", Some(&body), 403),
        (&auditor, "GET", "/api/v1/audit?limit=5", None, 200),
        (&operator, "GET", "/api/v1/audit?limit=5", None, 403),
        (&app_ok, "GET", "/v1/models", None, 200),
        (&app_ok, "GET", "/metrics", None, 403),
        (&operator, "GET", "/metrics", None, 200),
        (&auditor, "GET", "/readyz", None, 200),
        (&operator, "DELETE", "/api/v1/models/tiny", None, 403),
        (&app_ok, "POST", "/api/v1/models/tiny/activate", None, 403),
        (&auditor, "GET", "/api/v1/audit/verify", None, 200),
    ];
    for (token, method, path, body, want) in cases {
        let r = a.request(method, path, Some(token), body);
        assert_eq!(r.status, want, "{method} {path}: {}", r.text());
        if want == 403 {
            assert_eq!(r.error_code(), "forbidden");
            assert!(
                r.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("not permitted")
            );
        }
    }

    // Every decision is in the log; inferences carry the prompt's hash, never the prompt.
    let log = a.audit();
    let denied: Vec<&Value> = log.iter().filter(|r| r["outcome"] == "denied").collect();
    assert_eq!(denied.len(), 2 + 6, "{denied:#?}");
    assert!(denied.iter().all(|r| r["request_id"].is_string()));
    assert!(denied.iter().any(|r| r["actor"] == "unauthenticated"));
    assert!(
        denied
            .iter()
            .any(|r| r["actor"] == "cam2" && r["resource"] == "tiny:1")
    );
    let runs: Vec<&Value> = log
        .iter()
        .filter(|r| r["action"] == "inference:run" && r["outcome"] == "success")
        .collect();
    assert_eq!(runs.len(), 3);
    // The digest the CLI records for the same messages (docs/audit-format.md).
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(format!(
        r#"[{{"role":"user","content":"{PROMPT_CANARY}"}}]"#
    )));
    for r in &runs {
        assert_eq!(r["resource"], "tiny:1");
        assert_eq!(r["details"]["prompt_sha256"], digest.as_str());
        assert!(r["details"]["completion_tokens"].as_u64().unwrap() <= 4);
        assert!(r["details"]["prompt_tokens"].as_u64().unwrap() > 0);
    }
    // The response's x-request-id names the records of that request.
    let r = a.request("POST", "/v1/chat/completions", Some(&admin), Some(&body));
    let rid = r.header("x-request-id").unwrap().to_string();
    let log = a.audit();
    let mine: Vec<&str> = log
        .iter()
        .filter(|r| r["request_id"] == rid.as_str())
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(mine, ["allowed", "success"], "{rid}");
    let start = log.iter().find(|r| r["action"] == "agent:start").unwrap();
    assert_eq!(start["actor"], "outpost-daemon");

    // Once the daemon has stopped, no byte of any file it wrote holds the prompt: not
    // `audit.db`, not its WAL, nothing else in the data directory.
    a.signal("TERM");
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0), "{}", a.log());
    let files = files_under(&a.d.data);
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "audit.db"), "{names:?}");
    // The search sees the records: the request id they carry is found.
    assert!(
        files.iter().any(|(_, b)| contains(b, rid.as_bytes())),
        "the request's records are not in the files searched: {names:?}"
    );
    for (path, bytes) in &files {
        assert!(
            !contains(bytes, PROMPT_CANARY.as_bytes()),
            "the prompt itself must never be stored, but {} holds it",
            path.display()
        );
    }
}

/// A prompt no file would hold by chance.
const PROMPT_CANARY: &str = "owl canary 5c1e8d2f";

/// Every file under `dir`, recursively, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_daemon_keeps_serving() {
    let mut a = Agent::new("max_body = \"4KiB\"");
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let raw = |body: &[u8]| {
        a.try_request("POST", "/v1/chat/completions", Some(&t), Some(body))
            .unwrap()
    };
    let r = raw(b"{\"messages\": [");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = raw(b"[1, 2]");
    assert_eq!(r.status, 400);
    let r = raw(&vec![b' '; 8 * 1024]);
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));

    let long = "word ".repeat(100); // the tiny model's window is 64 tokens
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"messages": "hi"}), 400, "does not match"),
        (
            chat("hi", json!({"temperature": "hot"})),
            400,
            "invalid type",
        ),
        (
            chat("hi", json!({"max_tokens": 1_000_000_000})),
            400,
            "context window",
        ),
        (chat("hi", json!({"max_tokens": 0})), 400, "at least 1"),
        (chat("hi", json!({"n": 2})), 400, "n must be 1"),
        (chat("hi", json!({"temperature": 7})), 400, "temperature"),
        (
            chat("hi", json!({"top_logprobs": 3})),
            400,
            "needs logprobs",
        ),
        (
            chat("hi", json!({"model": "no-such-model"})),
            404,
            "no model",
        ),
        (chat("hi", json!({"model": "sha256:zz"})), 404, "no model"),
        (chat(&long, json!({})), 400, "context window"),
        (json!({"messages": []}), 400, "must not be empty"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            400,
            "not supported",
        ),
    ];
    for (body, want, msg) in cases {
        let r = a.request("POST", "/v1/chat/completions", Some(&t), Some(&body));
        assert_eq!(r.status, want, "{body}: {}", r.text());
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(msg), "{body}: expected {msg:?} in {m:?}");
    }
    let r = a.request(
        "POST",
        "/v1/completions",
        Some(&t),
        Some(&json!({"prompt": [1, 99999]})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = a.request(
        "POST",
        "/v1/completions",
        Some(&t),
        Some(&json!({"prompt": ["a", "b"]})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("one prompt per request"));
    let r = a.request(
        "POST",
        "/v1/completions",
        Some(&t),
        Some(&json!({"prompt": [[104, 105]], "max_tokens": 2, "seed": 7})),
    );
    assert_eq!(r.status, 200, "token ids are a prompt too: {}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 2);
    let r = a.request("GET", "/v1/nothing", Some(&t), None);
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = a.request("DELETE", "/v1/models", Some(&t), None);
    assert_eq!(r.status, 405);
    let r = a.request("GET", "/api/v1/audit?limit=abc", Some(&t), None);
    assert_eq!(r.status, 400);

    // Still serving, correctly.
    let r = a.request(
        "POST",
        "/v1/completions",
        Some(&t),
        Some(&json!({"prompt": "hello", "max_tokens": 3, "temperature": 0, "logprobs": 2})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny:1");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(
        v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        n
    );
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + n as u64
    );
}

/// Checks every line of a Prometheus text exposition; returns sample name → value.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap();
            assert!(matches!(kind, "HELP" | "TYPE"), "{line}");
            if kind == "TYPE" {
                assert!(typed.insert(name.to_string()), "TYPE twice: {line}");
                let t = parts.next().unwrap();
                assert!(
                    matches!(t, "counter" | "gauge" | "histogram" | "summary" | "untyped"),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        samples.push((series.to_string(), value.parse::<f64>().unwrap()));
    }
    samples
}

#[test]
fn metrics_are_prometheus_text_and_count_what_happened() {
    let mut a = Agent::new("metrics_public = true");
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&t),
        Some(&chat("hi", json!({"max_tokens": 5, "temperature": 0}))),
    );
    assert_eq!(r.status, 200);
    a.request("GET", "/v1/models", None, None);
    let r = a.request("GET", "/metrics", None, None);
    assert_eq!(r.status, 200, "metrics_public serves without a token");
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let samples = parse_prometheus(&r.text());
    let get = |s: &str| samples.iter().find(|(k, _)| k == s).map(|(_, v)| *v);
    assert_eq!(
        get(
            r#"outpost_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        get(r#"outpost_http_requests_total{method="GET",route="/v1/models",status="401"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(r#"outpost_auth_denials_total{reason="unauthenticated"}"#),
        Some(1.0)
    );
    let generated = get("outpost_generated_tokens_total").unwrap();
    assert!((1.0..=5.0).contains(&generated), "{generated}");
    assert!(get("outpost_decode_tokens_per_second").unwrap() > 0.0);
    assert!(get("outpost_prefill_tokens_per_second").unwrap() > 0.0);
    assert!(get("outpost_model_load_seconds").unwrap() > 0.0);
    assert_eq!(get("outpost_queue_depth"), Some(0.0));
    assert!(get("outpost_audit_records_total").unwrap() >= 3.0);
    assert!(get("outpost_process_resident_memory_bytes").unwrap() > 1e6);
    assert_eq!(get(r#"outpost_model_loaded{model="tiny:1"}"#), Some(1.0));
}

#[test]
fn streams_end_in_done_and_carry_the_same_text_as_a_whole_answer() {
    let mut a = Agent::new("");
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let req = chat(
        "hello",
        json!({"max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    let whole = a
        .request("POST", "/v1/chat/completions", Some(&t), Some(&req))
        .json();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let n = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), n);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, mut r) = a.open_stream("/v1/chat/completions", &t, &streamed);
    assert_eq!(status, 200);
    let events = read_events(&mut r);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text, "the stream says what the whole answer says");
    let lp: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(lp, n, "one logprob entry per token across the chunks");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string())
    );
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"].as_u64().unwrap() as usize, n);
}

#[test]
fn an_invalid_config_exits_78_before_binding() {
    let Some(strace) = strace() else {
        return;
    };
    let a = Agent::new("queue_length = 0");
    // What the daemon did, from its own system calls: it read its config, and never made a
    // listening socket.
    let run_daemon =
        || {
            let (r, calls) =
                a.d.traced(&strace, "openat,socket,bind,listen", &["daemon"]);
            assert!(
                calls.iter().any(|c| c.name == "openat"
                    && c.strings().iter().any(|p| p.ends_with("outpost.toml"))),
                "the trace missed the daemon reading its config: {calls:#?}"
            );
            let bound: Vec<&Syscall> = calls
                .iter()
                .filter(|c| c.name == "bind" || c.name == "listen")
                .collect();
            assert!(bound.is_empty(), "bound on a bad config: {bound:#?}");
            r
        };
    let r = run_daemon();
    assert_eq!(r.code, Some(78), "{r:?}");
    assert!(r.stderr.contains("api.queue_length"), "{}", r.stderr);
    std::fs::write(&a.d.config, "[api]\nlisten = \"localhost-ish\"\n").unwrap();
    let r = run_daemon();
    assert_eq!(r.code, Some(78), "{r:?}");
    assert!(r.stderr.contains("api.listen"), "{}", r.stderr);
    assert!(
        !a.d.data.join("audit.db").exists(),
        "nothing was opened either"
    );
}

#[test]
fn a_unix_socket_and_systemd_notifications_work() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut a = Agent::new("");
    // Listen on the socket instead of the port.
    let cfg = std::fs::read_to_string(&a.d.config).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"unix:{}\"", sock.display()),
    );
    std::fs::write(&a.d.config, cfg).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    a.child = Some(
        a.d.command()
            .arg("daemon")
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let mut states = Vec::new();
    let mut recv = |states: &mut Vec<String>| {
        let n = notify.recv(&mut buf).unwrap();
        states.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    recv(&mut states);
    assert!(states[0].starts_with("READY=1"), "{states:?}");
    recv(&mut states);
    assert_eq!(states[1], "WATCHDOG=1");
    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let r = send(stream, "GET", "/healthz", None, None, &[]).unwrap();
    assert_eq!(r.status, 200);
    let t = a.token("olivia", "operator", &[]);
    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let r = send(stream, "GET", "/readyz", Some(&t), None, &[]).unwrap();
    assert_eq!(r.status, 503, "no model loaded: not ready");
    assert_eq!(r.json()["ready"], false);
    a.signal("TERM");
    loop {
        recv(&mut states);
        if states.last().unwrap().starts_with("STOPPING=1") {
            break;
        }
    }
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0));
    assert!(!sock.exists(), "the socket file is removed at exit");
}

/// A daemon serving the real SmolLM2 model, or a skip.
fn smollm2_agent(api: &str) -> Option<Agent> {
    let model = demo_model(SMOLLM2)?;
    let mut a = Agent::new(api);
    a.add_model(&model, "smollm2", true);
    a.start();
    Some(a)
}

#[test]
fn sigterm_during_a_stream_ends_it_cleanly_and_records_the_stop() {
    let Some(mut a) = smollm2_agent("shutdown_grace_secs = 2") else {
        return;
    };
    let t = a.token("olivia", "operator", &[]);
    let req = chat(
        "Write a long story about a lighthouse keeper.",
        json!({"stream": true, "max_tokens": 4000, "temperature": 0.7, "seed": 3}),
    );
    let (status, mut r) = a.open_stream("/v1/chat/completions", &t, &req);
    assert_eq!(status, 200);
    first_content(&mut r);
    // The rest of the stream is read on its own thread, which notes when it ended.
    let reader = std::thread::spawn(move || {
        let events = read_events(&mut r);
        (events, Instant::now())
    });
    a.signal("TERM");
    // While it is stopping, with the stream still running, new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused_at = loop {
        match TcpStream::connect(("127.0.0.1", a.port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break Instant::now(),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "still accepting connections 5 s after SIGTERM: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        a.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the daemon had already exited when the connection was refused"
    );
    let (events, ended_at) = reader.join().unwrap();
    assert!(
        refused_at < ended_at,
        "the stream had already ended when the connection was refused"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.contains("shutting_down")),
        "a generation cut short says why: {events:?}"
    );
    // Cut short is not finished: never reported as a natural stop or as reaching the limit.
    let finishes: Vec<String> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["finish_reason"].as_str().map(String::from))
        .collect();
    assert!(
        !finishes.iter().any(|f| f == "stop" || f == "length"),
        "a cancelled stream reported finish_reason {finishes:?}"
    );
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0), "{}", a.log());
    let log = a.audit();
    let last = log.last().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["outcome"].as_str()),
        (Some("agent:stop"), Some("success"))
    );
    assert!(
        log.iter()
            .any(|r| r["action"] == "inference:run" && r["reason"] == "cancelled")
    );
    a.d.run(&["audit", "verify"]).ok();
}

/// A whole (not streamed) answer still running when the grace period ends did not finish:
/// the client gets a 503 saying why, never a 200 that looks like a natural stop.
#[test]
fn a_whole_answer_cut_short_by_shutdown_is_a_503() {
    let Some(mut a) = smollm2_agent("shutdown_grace_secs = 1") else {
        return;
    };
    let t = a.token("olivia", "operator", &[]);
    // A continuation that does not stop by itself (greedy SmolLM2 counts on for thousands of
    // tokens), so the answer is still running whatever the machine's speed. A chat asking to
    // count stopped by itself at "20. 20" within the grace period once decoding got faster.
    let body = serde_json::to_vec(&json!({
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": 4000,
        "temperature": 0,
    }))
    .unwrap();
    let port = a.port;
    let client = std::thread::spawn(move || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        send(s, "POST", "/v1/completions", Some(&t), Some(&body), &[]).unwrap()
    });
    // Running: its intent is recorded just before it is queued; give it a moment to start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a
        .audit()
        .iter()
        .any(|r| r["action"] == "inference:run" && r["outcome"] == "allowed")
    {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    a.signal("TERM");
    let r = client.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "shutting_down");
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0), "{}", a.log());
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let Some(a) = smollm2_agent("") else {
        return;
    };
    let t = a.token("olivia", "operator", &[]);
    let req = chat(
        "Count from one to one thousand.",
        json!({"stream": true, "max_tokens": 4000}),
    );
    let (status, mut r) = a.open_stream("/v1/chat/completions", &t, &req);
    assert_eq!(status, 200);
    first_content(&mut r);
    drop(r);
    // The engine is free again well before 4000 tokens could be generated.
    let started = Instant::now();
    let mut cancelled = None;
    while started.elapsed() < Duration::from_secs(60) {
        cancelled = a
            .audit()
            .into_iter()
            .find(|r| r["action"] == "inference:run" && r["outcome"] == "failure");
        if cancelled.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let c = cancelled.expect("the cancellation is recorded");
    assert!(c["reason"].as_str().unwrap().contains("cancelled"), "{c}");
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&t),
        Some(&chat("Hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.status, 200, "the next request is served");
    let m = a.request("GET", "/metrics", Some(&t), None).text();
    let generated: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("outpost_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 1000.0,
        "generation stopped early: {generated} tokens"
    );
}

#[test]
fn sixteen_clients_against_a_queue_of_four_get_answers_or_503s() {
    let Some(a) = smollm2_agent("queue_length = 4") else {
        return;
    };
    let t = a.token("olivia", "operator", &[]);
    let a = Arc::new(a);
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let (a, t, barrier) = (a.clone(), t.clone(), barrier.clone());
            std::thread::spawn(move || {
                let body =
                    serde_json::to_vec(&chat(&format!("Say hello {i}"), json!({"max_tokens": 24})))
                        .unwrap();
                let stream = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(300)))
                    .unwrap();
                barrier.wait();
                send(
                    stream,
                    "POST",
                    "/v1/chat/completions",
                    Some(&t),
                    Some(&body),
                    &[],
                )
                .unwrap()
            })
        })
        .collect();
    let responses: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Response> = responses.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), 16, "only answers or 503s: {responses:?}");
    assert!(
        (1..=5).contains(&ok),
        "one running plus four queued at most: {ok}"
    );
    for r in &busy {
        assert_eq!(r.error_code(), "queue_full");
        assert!(r.header("retry-after").is_some());
    }
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&t),
        Some(&chat("Hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.status, 200, "still serving");
}

#[test]
fn activating_another_model_swaps_it_in_without_dropping_running_requests() {
    let Some(model) = demo_model(SMOLLM2) else {
        return;
    };
    let mut a = Agent::new("");
    let tiny = a.d.file("tiny.gguf", &GgufBuilder::tiny_llama().build());
    a.add_model(&tiny, "tiny", false);
    a.add_model(&model, "smollm2", true);
    a.start();
    let admin = a.token("root", "admin", &[]);
    // A greedy answer that runs to `max_tokens` (it counts on and on), long enough to
    // outlast the swap.
    let max_tokens = 96;
    let req = chat(
        "Count from 1 to 1000, separated by commas.",
        json!({"stream": true, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": true}}),
    );
    let (status, mut r) = a.open_stream("/v1/chat/completions", &admin, &req);
    assert_eq!(status, 200);
    // Text is flowing before the swap is asked for.
    let first = first_content(&mut r);
    assert!(first.contains("smollm2:1"), "{first}");
    let chunk: Value = serde_json::from_str(first.trim_start_matches("data: ").trim()).unwrap();
    let stream_rid = chunk["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_string();

    let act = a.request("POST", "/api/v1/models/tiny/activate", Some(&admin), None);
    assert_eq!(act.status, 200, "{}", act.text());
    assert_eq!(act.json()["model"]["name"], "tiny");
    assert_eq!(act.json()["previous"]["name"], "smollm2");
    let act_rid = act.header("x-request-id").unwrap().to_string();
    // The running stream finishes on the old model, with every token it asked for.
    let events = read_events(&mut r);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events
            .iter()
            .all(|e| e == "[DONE]" || e.contains("smollm2:1"))
    );
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|v| v["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("length"), "{events:?}");
    let usage = chunks.iter().find_map(|v| v["usage"].as_object()).unwrap();
    assert_eq!(usage["completion_tokens"], max_tokens, "{events:?}");
    // The swap was done while the stream was still running: the activation's outcome was
    // recorded before the stream's (which is recorded before its last chunk is sent).
    let log = a.audit();
    let outcome_seq = |rid: &str| {
        log.iter()
            .find(|r| r["request_id"] == rid && r["outcome"] != "allowed")
            .and_then(|r| r["seq"].as_u64())
            .unwrap_or_else(|| panic!("no outcome recorded for {rid}: {log:#?}"))
    };
    assert!(
        outcome_seq(&act_rid) < outcome_seq(&stream_rid),
        "the stream had ended before the swap: {log:#?}"
    );
    // New requests go to the new one.
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.json()["model"], "tiny:1");
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"model": "smollm2"}))),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not loaded"));
    // Rollback brings the old one back; the registry agrees with the daemon.
    let back = a.request("POST", "/api/v1/models/rollback", Some(&admin), None);
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(back.json()["model"]["name"], "smollm2");
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.json()["model"], "smollm2:1");
    let list = a
        .request("GET", "/api/v1/models", Some(&admin), None)
        .json();
    let smol = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "smollm2")
        .unwrap();
    assert_eq!(smol["aliases"], json!(["default"]));
    // Nothing left to roll back to: a conflict, and nothing changes.
    let again = a.request("POST", "/api/v1/models/rollback", Some(&admin), None);
    assert_eq!(again.status, 409, "{}", again.text());
    let gone = a.request("POST", "/api/v1/models/nope/activate", Some(&admin), None);
    assert_eq!(gone.status, 404);
    let del = a.request("DELETE", "/api/v1/models/tiny", Some(&admin), None);
    assert_eq!(del.status, 200, "{}", del.text());
    let del = a.request("DELETE", "/api/v1/models/smollm2", Some(&admin), None);
    assert_eq!(
        del.status,
        409,
        "the active model needs force: {}",
        del.text()
    );
}

#[test]
fn the_audit_api_pages_exports_and_verifies() {
    let mut a = Agent::new("");
    a.start();
    let aud = a.token("aude", "auditor", &[]);
    for _ in 0..5 {
        a.request("GET", "/v1/models", Some(&aud), None);
    }
    // Cursor paging walks the whole log once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<u64> = None;
    loop {
        let path = match cursor {
            Some(c) => format!("/api/v1/audit?limit=2&after={c}"),
            None => "/api/v1/audit?limit=2".into(),
        };
        let page = a.request("GET", &path, Some(&aud), None).json();
        let records = page["records"].as_array().unwrap();
        assert!(records.len() <= 2);
        seen.extend(records.iter().map(|r| r["seq"].as_u64().unwrap()));
        match page["next_cursor"].as_u64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert!(seen.len() >= 6, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    let filtered = a
        .request(
            "GET",
            "/api/v1/audit?action=models:read&actor=aude",
            Some(&aud),
            None,
        )
        .json();
    assert!(filtered["records"].as_array().unwrap().len() >= 5);
    let r = a.request("GET", "/api/v1/audit?outcome=maybe", Some(&aud), None);
    assert_eq!(r.status, 400);

    let export = a.request("GET", "/api/v1/audit/export?format=jsonl", Some(&aud), None);
    assert_eq!(export.status, 200);
    assert_eq!(
        export.header("transfer-encoding"),
        Some("chunked"),
        "streamed"
    );
    let path = a.d.root.path().join("export.jsonl");
    std::fs::write(&path, &export.body).unwrap();
    a.d.run(&["audit", "verify", "--export", path.to_str().unwrap()])
        .ok();
    let csv = a.request("GET", "/api/v1/audit/export?format=csv", Some(&aud), None);
    assert_eq!(csv.status, 200);
    assert!(csv.text().lines().next().unwrap().contains("seq"));
    let bad = a.request("GET", "/api/v1/audit/export?format=xml", Some(&aud), None);
    assert_eq!(bad.status, 400);
    let report = a
        .request("GET", "/api/v1/audit/verify", Some(&aud), None)
        .json();
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["records"].as_u64().unwrap() >= 6);
    // SIGINT stops it as SIGTERM does: exit 0, a stop record, a log that verifies.
    a.signal("INT");
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0), "{}", a.log());
    let log = a.audit();
    assert_eq!(log.last().unwrap()["action"], "agent:stop");
    a.d.run(&["audit", "verify"]).ok();
}

/// The `openai` package's own client against the daemon (installed by scripts/test into
/// a virtual environment; `OUTPOST_OPENAI_PYTHON` names its interpreter).
#[test]
fn the_official_openai_python_client_works_against_the_daemon() {
    let python = std::env::var_os("OUTPOST_OPENAI_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/outpost/venv-openai/bin/python"))
        });
    let Some(python) = python.filter(|p| p.is_file()) else {
        skip::<()>(
            "no Python with the openai package: run scripts/test (it sets up ~/.cache/outpost/venv-openai)",
        );
        return;
    };
    let Some(a) = smollm2_agent("") else {
        return;
    };
    let token = a.token("cam", "app", &["--models", "smollm2*"]);
    let auditor = a.token("aude", "auditor", &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
    let out = Command::new(python)
        .arg(&script)
        .env("OUTPOST_URL", format!("http://127.0.0.1:{}/v1", a.port))
        .env("OUTPOST_TOKEN", &token)
        .env("OUTPOST_FORBIDDEN_TOKEN", &auditor)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\ndaemon: {}",
        a.log()
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
    let _ = is_ci();
}

#[test]
fn a_model_activated_with_the_cli_is_served_without_a_restart() {
    let mut a = Agent::new("");
    a.add_tiny("first");
    let mut b = GgufBuilder::tiny_llama();
    b.kv_str("general.name", "second"); // other bytes: another blob
    let second = a.d.file("second.gguf", &b.build());
    a.add_model(&second, "second", false);
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let ask = || {
        a.request(
            "POST",
            "/v1/chat/completions",
            Some(&t),
            Some(&chat("hi", json!({"max_tokens": 1}))),
        )
        .json()["model"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(ask(), "first:1");
    a.d.run(&["models", "activate", "second"]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask() != "second:1" {
        assert!(
            Instant::now() < deadline,
            "still serving the old model: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Unsetting `default` (a forced removal) stops serving it.
    a.d.run(&["models", "remove", "second", "--force"]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = a.request(
            "POST",
            "/v1/chat/completions",
            Some(&t),
            Some(&chat("hi", json!({}))),
        );
        if r.status == 503 {
            assert_eq!(r.error_code(), "model_not_loaded");
            break;
        }
        assert!(Instant::now() < deadline, "still serving a removed model");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The shipped unit and example config: the unit asks for what the daemon does (notify,
/// watchdog, no restart on a configuration error) and the example config is valid as shipped
/// and with every commented key switched on.
#[test]
fn the_systemd_unit_and_the_example_config_match_the_daemon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/outpost.service")).unwrap();
    let keys: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let has = |k: &str, v: &str| keys.iter().any(|(a, b)| *a == k && *b == v);
    for (k, v) in [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "outpost"),
        // A fixed system user (sysusers.d), so files the CLI makes are the service's.
        ("User", "outpost"),
        ("Group", "outpost"),
    ] {
        assert!(has(k, v), "{k}={v} missing from the unit");
    }
    assert!(keys.iter().any(|(k, _)| *k == "WatchdogSec"));
    let exec = keys.iter().find(|(k, _)| *k == "ExecStart").unwrap().1;
    assert!(exec.ends_with(" daemon"), "{exec}");

    let example = std::fs::read_to_string(root.join("deploy/config/outpost.toml")).unwrap();
    let d = Device::new();
    std::fs::write(&d.config, &example).unwrap();
    d.run(&["config", "check"]).ok();
    // Uncomment every `# key = value` line: the documented keys must all exist. The issuer's
    // key file must exist too, so point it at a real one.
    let keys_dir = d.issuer_keys("admin-1");
    let on: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.contains(" = ") || rest.starts_with("[[") => rest.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "/etc/outpost/keys/admin-1.pub.pem",
            keys_dir.join("admin-1.pub.pem").to_str().unwrap(),
        );
    let on = on
        .lines()
        .filter(|l| {
            !l.starts_with("revoked =")
                && !l.starts_with("policy =")
                && !l.starts_with("data_dir =")
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&d.config, &on).unwrap();
    let r = d.run(&["config", "check", "--json"]);
    let v = r.json();
    assert_eq!(v["config"]["api"]["listen"], "127.0.0.1:8480", "{on}");
    assert_eq!(v["config"]["api"]["queue_length"], 4);
}

#[test]
fn a_full_disk_never_breaks_the_daemon_or_its_log() {
    let Some(fs) = Tmpfs::mount(4 << 20) else {
        return;
    };
    let mut a = Agent::on(Device::with_data(fs.path().join("data")), "");
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let ask = |a: &Agent| {
        a.request(
            "POST",
            "/v1/chat/completions",
            Some(&t),
            Some(&chat("hi", json!({"max_tokens": 2}))),
        )
    };
    assert_eq!(ask(&a).status, 200);
    // Fill the disk to the last byte.
    let filler = fs.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.write_all(&[0u8; 512]);
    let _ = f.sync_all();
    let r = a.request("GET", "/readyz", Some(&t), None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["storage_writable"], false);
    // Each request is answered (and recorded) or refused because it cannot be recorded;
    // on a disk full to the last byte, some must be refused.
    let mut refused = 0;
    for _ in 0..20 {
        let r = ask(&a);
        assert!(
            r.status == 200 || (r.status == 503 && r.error_code() == "audit_unavailable"),
            "{}: {}",
            r.status,
            r.text()
        );
        if r.status == 503 {
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "20 inferences answered on a full disk: were they recorded? {}",
        a.log()
    );
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    let r = a.request("GET", "/readyz", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ask(&a).status, 200, "serving again once there is room");
    a.signal("TERM");
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0), "{}", a.log());
    a.d.run(&["audit", "verify"]).ok();
    // Every answered inference has both of its records.
    let log = a.audit();
    let allowed = log
        .iter()
        .filter(|r| r["action"] == "inference:run" && r["outcome"] == "allowed")
        .count();
    let ended = log
        .iter()
        .filter(|r| r["action"] == "inference:run" && r["outcome"] != "allowed")
        .count();
    assert_eq!(allowed, ended, "each recorded inference has its outcome");
}

#[test]
fn kill_9_mid_answer_loses_no_record_and_the_daemon_comes_back() {
    let Some(mut a) = smollm2_agent("") else {
        return;
    };
    let t = a.token("olivia", "operator", &[]);
    let req = chat(
        "Tell me a long story.",
        json!({"stream": true, "max_tokens": 2000}),
    );
    let (status, mut r) = a.open_stream("/v1/chat/completions", &t, &req);
    assert_eq!(status, 200);
    let line = first_content(&mut r);
    let id: Value = serde_json::from_str(line.trim_start_matches("data: ").trim()).unwrap();
    let rid = id["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("chatcmpl-")
        .to_string();
    a.signal("KILL");
    a.wait(Duration::from_secs(30));
    // The answer stops short; the client sees the connection end without [DONE].
    assert!(!read_events(&mut r).contains(&"[DONE]".to_string()));
    a.start();
    let ready = a.request("GET", "/readyz", Some(&t), None);
    assert_eq!(ready.status, 200, "{}", ready.text());
    a.d.run(&["audit", "verify"]).ok();
    let log = a.audit();
    let mine: Vec<&Value> = log
        .iter()
        .filter(|r| r["request_id"] == rid.as_str())
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "the intent was durable before the answer began: {mine:?}"
    );
    assert_eq!(mine[0]["outcome"], "allowed");
    let starts = log.iter().filter(|r| r["action"] == "agent:start").count();
    assert_eq!(starts, 2);
}

/// Aliases and the registry as `GET /api/v1/models` shows them: (name, aliases).
fn aliases(a: &Agent, token: &str) -> Vec<(String, Vec<String>)> {
    a.request("GET", "/api/v1/models", Some(token), None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let aliases = m["aliases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            (m["name"].as_str().unwrap().to_string(), aliases)
        })
        .collect()
}

#[test]
fn the_management_api_takes_an_alias_and_a_forced_removal() {
    let mut a = Agent::new("");
    a.add_tiny("first");
    let mut b = GgufBuilder::tiny_llama();
    b.kv_str("general.name", "second"); // other bytes: another blob
    let second = a.d.file("second.gguf", &b.build());
    a.add_model(&second, "second", false);
    a.start();
    let admin = a.token("root", "admin", &[]);
    let served = |a: &Agent| {
        a.request(
            "POST",
            "/v1/chat/completions",
            Some(&admin),
            Some(&chat("hi", json!({"max_tokens": 1}))),
        )
        .json()["model"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // ?alias= moves that alias only: `default`, and what is served, stay.
    let r = a.request(
        "POST",
        "/api/v1/models/first/activate?alias=chat",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["alias"], "chat");
    let r = a.request(
        "POST",
        "/api/v1/models/second/activate?alias=chat",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        aliases(&a, &admin),
        [
            ("first".to_string(), vec!["default".to_string()]),
            ("second".to_string(), vec!["chat".to_string()])
        ]
    );
    assert_eq!(served(&a), "first:1");
    let r = a.request(
        "POST",
        "/api/v1/models/rollback?alias=chat",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"]["name"], "first");
    assert_eq!(
        aliases(&a, &admin),
        [
            (
                "first".to_string(),
                vec!["chat".to_string(), "default".to_string()]
            ),
            ("second".to_string(), vec![])
        ]
    );
    // `default` itself has nothing to roll back to.
    let r = a.request("POST", "/api/v1/models/rollback", Some(&admin), None);
    assert_eq!(r.status, 409, "{}", r.text());
    let r = a.request(
        "POST",
        "/api/v1/models/second/activate?colour=blue",
        Some(&admin),
        None,
    );
    assert_eq!(
        r.status,
        400,
        "unknown parameters are refused: {}",
        r.text()
    );

    // The active model is removed only with ?force=true, which stops serving it.
    let r = a.request("DELETE", "/api/v1/models/first", Some(&admin), None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(served(&a), "first:1");
    let r = a.request(
        "DELETE",
        "/api/v1/models/first?force=true",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(aliases(&a, &admin), [("second".to_string(), vec![])]);
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 1}))),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "model_not_loaded");
}

#[test]
fn request_limits_hold_at_their_edges() {
    let mut a = Agent::new("");
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let post = |path: &str, body: Value| a.request("POST", path, Some(&t), Some(&body));
    let chat_path = "/v1/chat/completions";
    let completions = "/v1/completions";

    // max_completion_tokens bounds the answer, and wins over max_tokens.
    let r = post(
        chat_path,
        chat(
            "hi",
            json!({"max_completion_tokens": 3, "max_tokens": 10, "temperature": 0}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let r = post(chat_path, chat("hi", json!({"max_completion_tokens": 0})));
    assert_eq!(r.status, 400, "{}", r.text());

    // stop: four strings at most.
    let four = json!(["w1", "w2", "w3", "w4"]);
    let five = json!(["w1", "w2", "w3", "w4", "w5"]);
    let r = post(
        chat_path,
        chat("hi", json!({"stop": four, "max_tokens": 2})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        chat_path,
        chat("hi", json!({"stop": five, "max_tokens": 2})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("at most 4"), "{}", r.text());

    // Completions: logprobs from 0 to 5.
    for n in [0, 5] {
        let r = post(
            completions,
            json!({"prompt": "hello", "max_tokens": 2, "temperature": 0, "logprobs": n}),
        );
        assert_eq!(r.status, 200, "logprobs {n}: {}", r.text());
        let top = &r.json()["choices"][0]["logprobs"]["top_logprobs"][0];
        // A map keyed by token text: tokens that print alike (partial UTF-8) share a key.
        let len = top.as_object().unwrap().len();
        assert!(len <= n && (len > 0) == (n > 0), "logprobs {n}: {top}");
    }
    for n in [6, -2] {
        let r = post(
            completions,
            json!({"prompt": "hello", "max_tokens": 2, "logprobs": n}),
        );
        assert_eq!(r.status, 400, "logprobs {n}: {}", r.text());
        assert!(r.text().contains("between 0 and 5"), "{}", r.text());
    }

    // Chat: top_logprobs up to 20.
    let r = post(
        chat_path,
        chat(
            "hi",
            json!({"max_tokens": 1, "temperature": 0, "logprobs": true, "top_logprobs": 20}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let top = &r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"];
    assert_eq!(top.as_array().unwrap().len(), 20, "{top}");
    let r = post(
        chat_path,
        chat(
            "hi",
            json!({"max_tokens": 1, "logprobs": true, "top_logprobs": 21}),
        ),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("between 0 and 20"), "{}", r.text());
}

#[test]
fn a_model_over_the_memory_budget_is_refused_with_a_reason_and_changes_nothing() {
    let Some(model) = demo_model(SMOLLM2) else {
        return;
    };
    // SmolLM2 needs well over 50 MB; the tiny model a few kilobytes.
    let mut a = Agent::new("\n[engine]\nmemory_budget = \"50MB\"");
    let tiny = a.d.file("tiny.gguf", &GgufBuilder::tiny_llama().build());
    a.add_model(&tiny, "tiny", false);
    a.add_model(&model, "smollm2", true);
    a.start();
    let admin = a.token("root", "admin", &[]);
    // Started, but not ready: the model behind `default` did not fit, and the log says why.
    let r = a.request("GET", "/readyz", Some(&admin), None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(a.log().contains("memory budget"), "{}", a.log());
    let log = a.audit();
    let load = log
        .iter()
        .find(|r| r["action"] == "models:load")
        .unwrap_or_else(|| panic!("the failed load is recorded: {log:#?}"));
    assert_eq!(load["outcome"], "failure");
    assert!(
        load["reason"].as_str().unwrap().contains("memory budget"),
        "{load}"
    );
    // Activation over the API: refused with the reason, and nothing changes.
    let refused = |a: &Agent| {
        let before = aliases(a, &admin);
        let r = a.request(
            "POST",
            "/api/v1/models/smollm2/activate",
            Some(&admin),
            None,
        );
        assert_eq!(r.status, 422, "{}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("memory budget"), "{message}");
        assert!(message.contains("nothing was changed"), "{message}");
        assert_eq!(aliases(a, &admin), before);
    };
    refused(&a);
    // A model within the budget is served; another try of the big one leaves it serving.
    let r = a.request("POST", "/api/v1/models/tiny/activate", Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.text());
    refused(&a);
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 1}))),
    );
    assert_eq!(r.json()["model"], "tiny:1", "{}", r.text());
}

/// The name of the model behind `default`, as `GET /api/v1/models` says.
fn default_model(a: &Agent, token: &str) -> Option<String> {
    a.request("GET", "/api/v1/models", Some(token), None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            m["aliases"]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x == "default"))
        })
        .map(|m| m["name"].as_str().unwrap().to_string())
}

#[test]
fn a_model_that_fails_its_health_check_changes_nothing_and_says_why() {
    let mut a = Agent::new("");
    a.add_tiny("good");
    // It loads (the shapes are right) but every logit it makes is NaN.
    let bad = a.d.file(
        "bad.gguf",
        &GgufBuilder::tiny_llama().poison_with_nan().build(),
    );
    a.add_model(&bad, "bad", false);
    a.start();
    let admin = a.token("root", "admin", &[]);
    let r = a.request("POST", "/api/v1/models/bad/activate", Some(&admin), None);
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.error_code(), "model_load_failed");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("health check") && message.contains("NaN"),
        "{message}"
    );
    assert!(message.contains("nothing was changed"), "{message}");
    // The registry and the served model are as they were.
    assert_eq!(default_model(&a, &admin).as_deref(), Some("good"));
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "good:1");
    // And the refusal is in the audit trail with its reason.
    let failed = a
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "models:activate" && r["outcome"] == "failure")
        .collect::<Vec<_>>();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("health check"),
        "{failed:#?}"
    );

    // Made `default` behind the daemon's back (the CLI does not load models): the daemon
    // keeps serving the good one and records why it did not switch.
    a.d.run(&["models", "activate", "bad"]).ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let load_failed = a.audit().into_iter().any(|r| {
            r["action"] == "models:load"
                && r["outcome"] == "failure"
                && r["reason"].as_str().is_some_and(|s| s.contains("NaN"))
        });
        if load_failed {
            break;
        }
        assert!(Instant::now() < deadline, "no models:load failure recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = a.request(
        "POST",
        "/v1/chat/completions",
        Some(&admin),
        Some(&chat("hi", json!({"max_tokens": 2}))),
    );
    assert_eq!(r.json()["model"], "good:1", "{}", r.text());
}

#[test]
fn json_logs_carry_each_requests_id_and_one_access_line() {
    let mut a = Agent::new("");
    std::fs::write(
        &a.d.config,
        std::fs::read_to_string(&a.d.config).unwrap() + "[log]\nformat = \"json\"\n",
    )
    .unwrap();
    a.add_tiny("tiny");
    a.start();
    let t = a.token("olivia", "operator", &[]);
    let r = a.request("GET", "/v1/models", Some(&t), None);
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap().to_string();
    a.signal("TERM");
    assert_eq!(a.wait(Duration::from_secs(30)), Some(0));
    let log = a.log();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "Listening." && e["address"].is_string()),
        "{log}"
    );
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "Request answered." && e["request_id"] == id.as_str())
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    assert_eq!(access[0]["route"], "/v1/models");
    assert_eq!(access[0]["method"], "GET");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["level"], "INFO");
    assert_eq!(access[0]["span"]["request_id"], id.as_str(), "{log}");
    assert!(access[0]["duration_ms"].as_f64().is_some(), "{log}");
}

#[test]
fn made_up_methods_and_idle_clients_cannot_grow_or_hold_the_daemon() {
    let mut a = Agent::new("max_connections = 2\nmetrics_public = true");
    a.start();
    // A made-up method is answered, and counted under `other`, not under its own name.
    for m in ["BREW", "PROPFIND", "X-AAAAAAAA"] {
        let s = TcpStream::connect(("127.0.0.1", a.port)).unwrap();
        let r = send(s, m, "/healthz", None, None, &[]).unwrap();
        assert_eq!(r.status, 405, "{m}");
    }
    let text = a.request("GET", "/metrics", None, None).text();
    assert!(
        !text.contains("BREW") && !text.contains("PROPFIND"),
        "{text}"
    );
    assert!(
        text.contains(r#"method="other",route="/healthz",status="405"} 3"#),
        "{text}"
    );
    // Two clients connect and send nothing: they hold both connection slots, so a third
    // waits; the daemon drops the silent ones after its header timeout and serves it.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", a.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let r = a.request("GET", "/healthz", None, None);
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the cap let a third connection in at once ({:?})",
        started.elapsed()
    );
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        // Closed by the daemon (0 bytes) or answered with a 408: either way, not held.
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || head.contains("408"), "{head}");
    }
}
