#!/usr/bin/env python3
"""Benchmarks of `outpost daemon` (issue 5): idle RSS without and with SmolLM2, time from
start to /readyz = 200, and the overhead of the HTTP API over `outpost generate` for the
same greedy request, measured in the same run.

Usage: python3 bench/daemon.py [--outpost target/release/outpost] [--reps 5] [--tokens 128]
Needs the demo model (python3 scripts/fetch-models.py). Stdlib only.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path.home() / ".cache/outpost/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Device:
    def __init__(self, outpost, root, threads):
        self.outpost, self.root = outpost, Path(root)
        self.data = self.root / "data"
        self.config = self.root / "outpost.toml"
        self.port = free_port()
        keys = self.root / "keys"
        self.config.write_text("")
        self.run("keys", "generate", "--out", str(keys), "--name", "bench")
        self.config.write_text(
            f'[device]\nid = "bench"\n[engine]\nthreads = {threads}\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[[auth.issuers]]\niss = "bench"\nkid = "bench"\nalgorithm = "EdDSA"\n'
            f'public_key = "{keys}/bench.pub.pem"\n'
        )
        self.token = self.run(
            "token", "issue", "--key", str(keys / "bench.key.pem"), "--iss", "bench",
            "--kid", "bench", "--sub", "bench", "--role", "operator",
        ).strip()

    def cmd(self, *args):
        return [str(self.outpost), "--config", str(self.config), "--data-dir", str(self.data), *args]

    def run(self, *args):
        return subprocess.run(self.cmd(*args), check=True, capture_output=True, text=True).stdout

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path, token=True):
        req = urllib.request.Request(self.url(path))
        if token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def chat(self, max_tokens):
        body = json.dumps({
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0,
        }).encode()
        req = urllib.request.Request(self.url("/v1/chat/completions"), data=body, method="POST")
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            v = json.load(r)
        return time.perf_counter() - t, v["usage"]["completion_tokens"]

    def start(self):
        t0 = time.perf_counter()
        p = subprocess.Popen(self.cmd("daemon"), stderr=subprocess.DEVNULL)
        while True:
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return p, time.perf_counter() - t0
                if status == 503 and not MODEL_EXPECTED[0]:
                    return p, time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError):
                pass
            if p.poll() is not None:
                sys.exit(f"the daemon exited with {p.returncode}")
            time.sleep(0.005)

    def stop(self, p):
        p.terminate()
        p.wait(timeout=60)


MODEL_EXPECTED = [False]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--outpost", default=str(ROOT / "target/release/outpost"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if not Path(a.outpost).is_file():
        sys.exit(f"{a.outpost} is missing: cargo build --release")
    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: python3 scripts/fetch-models.py")
    model_bytes = MODEL.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        d = Device(a.outpost, tmp, a.threads)
        # 1. No model.
        p, t_up = d.start()
        time.sleep(1.0)
        idle_empty = rss_kib(p.pid)
        d.stop(p)
        # 2. SmolLM2 behind default.
        d.run("models", "import", str(MODEL), "--name", "smollm2")
        d.run("models", "activate", "smollm2")
        MODEL_EXPECTED[0] = True
        ready = []
        for _ in range(3):
            p, t_ready = d.start()
            ready.append(t_ready)
            d.stop(p)
        p, _ = d.start()
        time.sleep(1.0)
        idle_model = rss_kib(p.pid)
        # 3. API vs `outpost generate`, interleaved, same greedy request.
        d.chat(8)  # warm-up
        api, cli, n_api, n_cli = [], [], set(), set()
        for _ in range(a.reps):
            t, n = d.chat(a.tokens)
            api.append(t)
            n_api.add(n)
            out = subprocess.run(
                d.cmd("generate", "--chat", PROMPT, "-n", str(a.tokens), "--temperature", "0",
                      "--threads", str(a.threads), "--json"),
                check=True, capture_output=True, text=True,
            )
            g = json.loads(out.stdout)
            tm = g["timings"]
            n_cli.add(len(g["tokens"]))
            # The CLI's own generation time: prefill plus decode, without the model load.
            cli.append(len(g["prompt_tokens"]) / tm["prefill_tokens_per_s"]
                       + max(len(g["tokens"]) - 1, 1) / tm["decode_tokens_per_s"])
        after = rss_kib(p.pid)
        peak = rss_kib(p.pid, "VmHWM")
        d.stop(p)
    med_api, med_cli = statistics.median(api), statistics.median(cli)
    mib = lambda kib: kib / 1024
    print(f"threads {a.threads}, {a.reps} reps, {a.tokens} tokens (API {sorted(n_api)}, CLI {sorted(n_cli)})")
    print(f"idle RSS, no model:        {mib(idle_empty):7.1f} MiB (target <= 15 MB)")
    print(f"idle RSS, SmolLM2 loaded:  {mib(idle_model):7.1f} MiB = {idle_model * 1024 / model_bytes:.2f}x the model file")
    print(f"RSS after requests:        {mib(after):7.1f} MiB = {after * 1024 / model_bytes:.2f}x; peak {mib(peak):.1f} MiB = {peak * 1024 / model_bytes:.2f}x (target <= 1.3x)")
    print(f"start to /readyz = 200:    {statistics.median(ready) * 1000:7.0f} ms (median of 3; no model: {t_up * 1000:.0f} ms to /readyz answering)")
    print(f"request via API:           {med_api * 1000:7.0f} ms median, {min(api) * 1000:.0f} ms best")
    print(f"same in `outpost generate`:{med_cli * 1000:7.0f} ms median, {min(cli) * 1000:.0f} ms best (generation only)")
    print(f"API overhead:              {(med_api / med_cli - 1) * 100:+7.1f} % by medians, "
          f"{(min(api) / min(cli) - 1) * 100:+.1f} % by best runs (target <= 5 %)")


if __name__ == "__main__":
    main()
