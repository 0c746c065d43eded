#!/usr/bin/env python3
"""Audit sync throughput: drain a backlog device -> Mosquitto (TLS) -> hub, durable and acked,
beside the raw Mosquitto QoS 1 message rate and a raw SQLite batched insert measured in the
same run; then the daemon's idle RSS with sync connected (no model).

Usage: bench/sync.py [--records N] [--raw-messages M] [--keep DIR]

Builds the release binaries (outpost, outpost-hub, audit-writer), makes a fleet in a
temporary directory (pki init, enroll, broker-config on a free port, mosquitto), appends N
records to a device's audit log with no broker, starts `outpost-hub serve` and `outpost
daemon` with [sync], and times from the daemon's start until `outpost sync status` shows
every record acknowledged. Prints a Markdown table (and JSON with --json).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
MOSQUITTO = "/usr/sbin/mosquitto"
DEVICE = "edge-1"


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=10.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Fleet:
    def __init__(self, d: Path):
        self.d = d
        self.port = free_port()
        self.hub = RELEASE / "outpost-hub"
        self.outpost = RELEASE / "outpost"
        self.procs = []
        self.env = dict(os.environ, OUTPOST_DATA_DIR=str(d / "dev"), OUTPOST_CONFIG=str(d / "dev.toml"))
        (d / "hub.toml").write_text(
            f'[hub]\ndata_dir = "{d / "hub"}"\nbroker = "mqtts://127.0.0.1:{self.port}"\n'
            f'ca = "{d / "pki/ca.pem"}"\ncert = "{d / "pki/hub.pem"}"\nkey = "{d / "pki/hub.key"}"\n'
        )
        run(self.hub, "pki", "init", "--out", d / "pki")
        (d / "dev.toml").write_text('[device]\nid = "edge-1"\n[api]\nlisten = "127.0.0.1:0"\n')
        (d / "key.pem").write_text(run(self.outpost, "keys", "device", env=self.env).stdout)
        run(self.hub, "--config", d / "hub.toml", "devices", "enroll", "--id", DEVICE,
            "--audit-key", d / "key.pem", "--pki", d / "pki", "--out", d / "certs")
        run(self.hub, "--config", d / "hub.toml", "broker-config", "--pki", d / "pki",
            "--port", self.port, "--bind", "127.0.0.1", "--out", d / "broker")
        with open(d / "dev.toml", "a") as f:
            f.write(f'[sync]\nbroker = "mqtts://127.0.0.1:{self.port}"\nca = "{d / "certs/ca.pem"}"\n'
                    f'cert = "{d / "certs/edge-1.pem"}"\nkey = "{d / "certs/edge-1.key"}"\n')

    def spawn(self, name, args, env=None):
        log = open(self.d / f"{name}.log", "w")
        p = subprocess.Popen([str(a) for a in args], stdout=log, stderr=log, env=env)
        self.procs.append(p)
        return p

    def broker(self):
        self.spawn("mosquitto", [MOSQUITTO, "-c", self.d / "broker/mosquitto.conf"])
        wait_port(self.port)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def raw_sqlite(d: Path, n: int, batch: int = 500):
    """The hub's table shape, batched like the hub's ingest, WAL and synchronous=FULL."""
    db = sqlite3.connect(d / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (device_id TEXT, seq INTEGER, record_json TEXT, hash TEXT,"
               " received_at TEXT, PRIMARY KEY (device_id, seq))")
    body = '{"seq":0,' + '"x":"' + "a" * 300 + '"}'
    t = time.perf_counter()
    for start in range(0, n, batch):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO r VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       ((DEVICE, s, body, "f" * 64, "2026-12-01T00:00:00.000Z")
                        for s in range(start, min(n, start + batch))))
        db.execute("COMMIT")
    took = time.perf_counter() - t
    db.close()
    return n / took


def raw_mosquitto(f: Fleet, n: int, size: int):
    """mosquitto_pub -l at QoS 1 over the same TLS listener, with the device's certificate,
    onto its telemetry topic (no hub runs yet, so nobody reads it): messages/s acknowledged by the broker."""
    lines = ("x" * size + "\n") * n
    t = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(f.port), "-q", "1", "-l",
                    "-i", DEVICE, "--cafile", str(f.d / "certs/ca.pem"),
                    "--cert", str(f.d / "certs/edge-1.pem"), "--key", str(f.d / "certs/edge-1.key"),
                    "-t", f"outpost/v1/devices/{DEVICE}/telemetry"],
                   input=lines, text=True, check=True, capture_output=True)
    return n / (time.perf_counter() - t)


def cpu_seconds(pid):
    """User + system CPU time of `pid` so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sync_status(f: Fleet):
    out = run(f.outpost, "sync", "status", "--json", env=f.env).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--raw-messages", type=int, default=200_000)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--perf", type=Path, help="record `perf` profiles of the hub and the daemon into this directory")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "outpost-agent",
                    "-p", "outpost-sync", "-p", "outpost-tests", "--bins"], cwd=ROOT, check=True)
    d = Path(tempfile.mkdtemp(prefix="outpost-sync-bench-"))
    f = Fleet(d)
    results = {}
    try:
        t = time.perf_counter()
        run(RELEASE / "audit-writer", d / "dev", DEVICE, a.records)
        results["device_append_per_s"] = a.records / (time.perf_counter() - t)
        results["raw_sqlite_per_s"] = raw_sqlite(d, a.records)
        f.broker()
        # A record of this log as JSON, for the raw broker's message size.
        size = 400
        results["raw_mosquitto_qos1_per_s"] = raw_mosquitto(f, a.raw_messages, size)
        hub = f.spawn("hub", [f.hub, "--config", d / "hub.toml", "serve"])
        broker = f.procs[0]
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in (hub, broker)}
        t = time.perf_counter()
        daemon = f.spawn("daemon", [f.outpost, "daemon"], env=f.env)
        perfs = []
        if a.perf:
            a.perf.mkdir(parents=True, exist_ok=True)
            for name, p in (("hub", hub), ("daemon", daemon)):
                perfs.append(subprocess.Popen(["perf", "record", "-q", "-F", "499", "-g", "-p", str(p.pid),
                                               "-o", str(a.perf / f"{name}.data")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        target = a.records + 1  # the daemon's own start record
        while True:
            s = sync_status(f)
            if s["last_acked_seq"] >= target and s["pending_records"] == 0:
                break
            if daemon.poll() is not None:
                sys.exit(f"the daemon exited: {(d / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.2)
        took = time.perf_counter() - t
        results["drain_cpu_seconds"] = {
            "daemon": cpu_seconds(daemon.pid),
            "hub": cpu_seconds(hub.pid) - cpu0[hub.pid],
            "mosquitto": cpu_seconds(broker.pid) - cpu0[broker.pid],
        }
        for p in perfs:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        results["drain_records"] = s["last_acked_seq"]
        results["drain_seconds"] = took
        results["drain_per_s"] = s["last_acked_seq"] / took
        time.sleep(5)
        results["daemon_drained_rss_mib"] = rss_kib(daemon.pid) / 1024
        # A daemon started afresh, connected, with nothing pending: the idle figure.
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        daemon = f.spawn("daemon-idle", [f.outpost, "daemon"], env=f.env)
        time.sleep(8)
        if daemon.poll() is not None or not sync_status(f)["connected"]:
            sys.exit(f"the restarted daemon is not connected: {(d / 'daemon-idle.log').read_text()[-2000:]}")
        results["daemon_idle_rss_mib"] = rss_kib(daemon.pid) / 1024
        results["daemon_idle_rss_detail_kib"] = {
            k: int(v.split()[0]) for k, v in (
                line.split(":", 1) for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines())
            if k in ("RssAnon", "RssFile", "RssShmem")}
    finally:
        f.stop()
        if a.keep:
            shutil.copytree(d, a.keep, dirs_exist_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    r = results
    print(f"| measure ({a.records:,} records) | figure | reference (same run) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| drain device -> Mosquitto (TLS) -> hub, durable and acked | {r['drain_per_s']:,.0f} records/s "
          f"({r['drain_seconds']:.1f} s) | {r['raw_mosquitto_qos1_per_s']:,.0f} msg/s raw Mosquitto QoS 1 | "
          f"{r['drain_per_s'] / r['raw_mosquitto_qos1_per_s']:.2f} |")
    print(f"| (same) | | {r['raw_sqlite_per_s']:,.0f} rows/s raw SQLite batched insert | "
          f"{r['drain_per_s'] / r['raw_sqlite_per_s']:.2f} |")
    print(f"| hub verify + store vs device audit append | {r['drain_per_s']:,.0f} records/s | "
          f"{r['device_append_per_s']:,.0f} appends/s | {r['drain_per_s'] / r['device_append_per_s']:.2f} |")
    c = r["drain_cpu_seconds"]
    print(f"| CPU during the drain (2 cores, {r['drain_seconds']:.1f} s wall) | daemon {c['daemon']:.1f} s, "
          f"hub {c['hub']:.1f} s, mosquitto {c['mosquitto']:.1f} s | | |")
    print(f"| daemon idle RSS, sync connected, no model, nothing pending | {r['daemon_idle_rss_mib']:.1f} MiB | target 15 MB | |")
    print(f"| daemon RSS 5 s after draining the backlog | {r['daemon_drained_rss_mib']:.1f} MiB | | |")
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
