#!/usr/bin/env python3
"""Model transfer throughput: a rollout of a model file hub -> Mosquitto (TLS) -> device,
every chunk verified and fsynced, the bitmap recorded, the whole SHA-256 verified, beside
raw Mosquitto throughput for the same payload size through the same broker in the same run.

Usage: bench/transfer.py [--model FILE] [--chunk-size BYTES] [--window N] [--raw-messages M]
                         [--profile release|dev] [--no-build] [--keep DIR] [--json]

Makes a fleet in a temporary directory (as bench/sync.py: pki init, enroll, broker-config on
a free port, mosquitto), publishes the model with `outpost-hub models publish --chunk-size`,
starts `outpost-hub serve` (rate limit lifted) and `outpost daemon` with [sync] and a pinned
release key, starts a rollout, and takes the transfer time from the daemon's audit records:
`sync:transfer` step `started` to step `verified` (every chunk checked, written, fsynced and
recorded; then the whole file hashed). The install that follows (a rename) is reported on
its own. The raw reference: `mosquitto_pub -l` publishing M messages of the chunk size at
QoS 1 with the device's certificate while `mosquitto_sub -C M` (the hub's certificate)
receives them; the time until the subscriber has them all.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync as syncbench  # noqa: E402  (the fleet set-up is shared)

ROOT = syncbench.ROOT
DEVICE = syncbench.DEVICE
GEMMA = Path.home() / ".cache/outpost/models/gemma-3-270m-q4_k_m.gguf"


def raw_stream(f, n: int, size: int) -> float:
    """Bytes/s from a QoS 1 publisher (the device's certificate, its telemetry topic) to a
    QoS 1 subscriber (the hub's certificate), through the same TLS listener."""
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(f.port), "-q", "1", "-C", str(n),
         "-i", "raw-sub", "--cafile", str(f.d / "pki/ca.pem"), "--cert", str(f.d / "pki/hub.pem"),
         "--key", str(f.d / "pki/hub.key"), "-t", f"outpost/v1/devices/{DEVICE}/telemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    lines = ("x" * (size - 1) + "\n") * n
    t = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(f.port), "-q", "1", "-l",
                    "-i", DEVICE, "--cafile", str(f.d / "certs/ca.pem"),
                    "--cert", str(f.d / "certs/edge-1.pem"), "--key", str(f.d / "certs/edge-1.key"),
                    "-t", f"outpost/v1/devices/{DEVICE}/telemetry"],
                   input=lines, text=True, check=True, capture_output=True)
    sub.wait(120)
    took = time.perf_counter() - t
    if sub.returncode != 0:
        sys.exit(f"mosquitto_sub failed: {sub.stderr.read().decode()[-500:]}")
    return n * (size - 1) / took


def steps(f, env):
    try:
        out = syncbench.run(f.outpost, "audit", "query", "--action", "sync:transfer", "--json", env=env).stdout
    except subprocess.CalledProcessError:
        return {}  # no audit log yet: the daemon is starting
    return {r["details"]["step"]: r for r in json.loads(out)}


def ts(record) -> float:
    return datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=GEMMA)
    ap.add_argument("--chunk-size", type=int, default=128 * 1024)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--raw-messages", type=int, default=2000)
    ap.add_argument("--profile", choices=["release", "dev"], default="release")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not a.model.is_file():
        sys.exit(f"{a.model} is missing: run scripts/fetch-models.py")
    folder = "release" if a.profile == "release" else "debug"
    if not a.no_build:
        subprocess.run(["cargo", "build", "--profile", a.profile, "--locked", "-q", "-p", "outpost-agent",
                        "-p", "outpost-sync", "--bins"], cwd=ROOT, check=True)
    syncbench.RELEASE = ROOT / "target" / folder
    d = Path(tempfile.mkdtemp(prefix="outpost-transfer-bench-"))
    f = syncbench.Fleet(d)
    env = f.env
    results = {"model": a.model.name, "bytes": a.model.stat().st_size, "chunk_size": a.chunk_size,
               "window": a.window, "profile": a.profile}
    try:
        with open(d / "hub.toml", "a") as h:
            h.write("chunk_rate = 1000000\nchunk_burst = 100000\n")
        syncbench.run(f.outpost, "keys", "generate", "--out", d / "keys", "--name", "release-1", env=env)
        text = (d / "dev.toml").read_text()
        text += (f"transfer_window = {a.window}\n[[sync.release_keys]]\nkid = \"release-1\"\n"
                 f"public_key = \"{d / 'keys/release-1.pub.pem'}\"\n")
        (d / "dev.toml").write_text(text)
        f.broker()
        results["raw_bytes_per_s"] = raw_stream(f, a.raw_messages, a.chunk_size)
        key = d / "keys/release-1.key.pem"
        manifest = json.loads(syncbench.run(
            f.hub, "--config", d / "hub.toml", "models", "publish", a.model, "--name", "bench",
            "--version", "1", "--key", key, "--kid", "release-1", "--chunk-size", a.chunk_size).stdout)
        results["chunks"] = len(manifest["chunk_sha256"])
        f.spawn("hub", [f.hub, "--config", d / "hub.toml", "serve"])
        syncbench.run(f.hub, "--config", d / "hub.toml", "rollout", "start", "--model", "bench:1",
                      "--target", f"device:{DEVICE}", "--key", key, "--kid", "release-1")
        daemon = f.spawn("daemon", [f.outpost, "daemon"], env=env)
        deadline = time.monotonic() + 600
        while True:
            s = steps(f, env)
            if "installed" in s or "failed" in s:
                break
            if daemon.poll() is not None:
                sys.exit(f"the daemon exited: {(d / 'daemon.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                sys.exit("no install within 600 s")
            time.sleep(0.2)
        if "failed" in s:
            sys.exit(f"the download failed: {s['failed']['reason']}")
        results["transfer_seconds"] = ts(s["verified"]) - ts(s["started"])
        results["install_seconds"] = ts(s["installed"]) - ts(s["verified"])
        results["transfer_bytes_per_s"] = results["bytes"] / results["transfer_seconds"]
        status = json.loads(syncbench.run(f.hub, "--config", d / "hub.toml", "rollout", "status",
                                          "--json").stdout)
        results["chunks_requested"] = status["rollouts"][0]["devices"][0]["chunks_requested"]
    finally:
        f.stop()
        if a.keep:
            shutil.copytree(d, a.keep, dirs_exist_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    r = results
    mb = 1e6
    print(f"| measure ({r['model']}, {r['bytes'] / mb:.0f} MB, chunks of {r['chunk_size'] // 1024} KiB, "
          f"window {r['window']}, {r['profile']}) | figure | reference (same run) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| rollout download hub -> Mosquitto (TLS) -> device, each chunk verified + fsynced + recorded, "
          f"whole SHA-256 verified | {r['transfer_bytes_per_s'] / mb:.0f} MB/s ({r['transfer_seconds']:.2f} s, "
          f"{r['chunks_requested']} requests for {r['chunks']} chunks) | {r['raw_bytes_per_s'] / mb:.0f} MB/s raw "
          f"Mosquitto QoS 1 pub -> sub, same payload size | {r['transfer_bytes_per_s'] / r['raw_bytes_per_s']:.2f} |")
    print(f"| install into the registry (GGUF check, digest check, rename) | {r['install_seconds']:.2f} s | | |")
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
