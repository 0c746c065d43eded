#!/usr/bin/env python3
"""Fleet scale: N simulated devices -> one Mosquitto (TLS) -> 1 or 2 `outpost-hub serve` on
PostgreSQL, measured; then bad input at scale. Figures and reading in docs/scale.md.

Usage: bench/scale.py [--sizes 1000,5000,10000] [--hubs 1,2] [--interval 5] [--duration 60]
                      [--bad] [--bad-only] [--json FILE] [--keep DIR] [--bin-dir DIR]

Builds the release binaries (outpost-hub, fleet-sim). For each size and hub count, in a
temporary directory: `outpost-hub pki init`; a PostgreSQL database of its own on
postgres://postgres@127.0.0.1:5432 (created here, dropped at the end); `fleet-sim enroll`
(certificates from the PKI, an audit key per device, enrolled in the store; the device files
are made once per session and reused); `outpost-hub broker-config` and Mosquitto on a free
port, started from it and stopped by PID; the hubs (`[hub] listen` for /metrics, one
`instance` each); `fleet-sim run` for --duration seconds, each device writing a record every
--interval seconds. Meanwhile /proc is sampled every 2 s: CPU and RSS of each hub, the broker,
the simulator, and the PostgreSQL backends serving the database. At the end: `fleet-sim
verify` (every device's chain in the store, with the hub's verifier, against what it wrote)
and SQL (rows = records written, no seq twice, seqs 1..=N per device).

--bad adds the bad-input run: 1,000 devices of which 5 flood (500 records/s each, one
message per record, no window) and 5 replay their first batch every second,
1,000 raw TCP connections that send half a TLS ClientHello and sit, two hubs, one of which is
stopped (SIGSTOP) for --stall seconds in the middle and then continued.

The open-file limit is raised for this script's children only (setrlimit to the hard limit in
the child before exec; the simulator raises its own), never on the machine.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync import free_port, wait_port  # noqa: E402  (bench/sync.py's helpers)

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"  # or --bin-dir
MOSQUITTO = "/usr/sbin/mosquitto"
PG = "postgres://postgres@127.0.0.1:5432"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def raise_nofile():
    """In the child, before exec: its open-file limit up to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def psql(sql, db="postgres"):
    return run("psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-AtX", "-v",
               "ON_ERROR_STOP=1", "-c", sql).stdout.strip()


def proc_cpu_rss(pid):
    """(CPU seconds, RSS KiB) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return cpu, rss
    except (OSError, ValueError, IndexError):
        return None


class Sampler(threading.Thread):
    """Every 2 s: CPU seconds and RSS of each named process group (PostgreSQL: the backends
    serving `db`, looked up each time)."""

    def __init__(self, pids, db):
        super().__init__(daemon=True)
        self.pids = pids  # name -> [pid]
        self.db = db
        self.samples = []  # (t, {name: (cpu, rss)})
        self.stop = threading.Event()

    def pg_pids(self):
        try:
            out = psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.db}'")
            return [int(p) for p in out.split()]
        except SystemExit:
            return []

    def take(self):
        groups = dict(self.pids)
        groups["postgres"] = self.pg_pids()
        row = {}
        for name, pids in groups.items():
            cpu, rss = 0.0, 0
            for p in pids:
                got = proc_cpu_rss(p)
                if got:
                    cpu += got[0]
                    rss += got[1]
            row[name] = (cpu, rss)
        self.samples.append((time.monotonic(), row))

    def run(self):
        while not self.stop.wait(2.0):
            self.take()

    def window(self, t0, t1):
        """Per group: mean CPU % over [t0, t1] and the largest RSS (MiB) seen in it.
        PostgreSQL backends that came and went are counted while they were there."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            inside = self.samples[-2:]
        out = {}
        if len(inside) < 2:
            return out
        (ta, a), (tb, b) = inside[0], inside[-1]
        for name in b:
            cpu = 0.0
            # Sum of positive steps (a backend that ended drops out of the sum).
            for (_, x), (_, y) in zip(inside, inside[1:]):
                if name in x and name in y:
                    cpu += max(0.0, y[name][0] - x[name][0])
            rss = max(s[1].get(name, (0, 0))[1] for s in inside)
            out[name] = {"cpu_pct": round(100 * cpu / (tb - ta), 1), "rss_mib": round(rss / 1024, 1)}
        return out


def metrics(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "device=" in line:
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


class Setup:
    """PKI and device files shared by the session's runs (devices are enrolled again into
    each run's own database from the same files)."""

    def __init__(self, root: Path):
        self.root = root
        self.pki = root / "pki"
        self.devices = root / "devices"
        run(RELEASE / "outpost-hub", "pki", "init", "--out", self.pki)


def scenario(setup, n, hubs, a, bad=False):
    label = f"{n} devices, {hubs} hub{'s' if hubs > 1 else ''}" + (", bad input" if bad else "")
    log(f"== {label}")
    d = Path(tempfile.mkdtemp(prefix="scale-", dir=setup.root))
    db = f"outpost_scale_{os.getpid()}_{n}_{hubs}{'_bad' if bad else ''}"
    url = f"{PG}/{db}"
    psql(f"DROP DATABASE IF EXISTS {db}")
    psql(f"CREATE DATABASE {db}")
    procs = []
    result = {"label": label, "devices": n, "hubs": hubs, "bad": bad}
    try:
        port = free_port()
        hub_ports = [free_port() for _ in range(hubs)]
        for k in range(hubs):
            (d / f"hub-{k}.toml").write_text(
                f'[hub]\ndata_dir = "{d / "hub"}"\nbroker = "mqtts://127.0.0.1:{port}"\n'
                f'ca = "{setup.pki / "ca.pem"}"\ncert = "{setup.pki / "hub.pem"}"\n'
                f'key = "{setup.pki / "hub.key"}"\nstore = "{url}"\ninstance = "h{k}"\n'
                f'listen = "127.0.0.1:{hub_ports[k]}"\n'
                # The per-device limit the figures in docs/scale.md were measured with
                # (the shipped default is 1,000/2,000).
                'ingest_rate = 200\ningest_burst = 400\n')
        t = time.monotonic()
        run(RELEASE / "fleet-sim", "enroll", "--data-dir", d / "hub", "--store", url,
            "--pki", setup.pki, "--out", setup.devices, "--devices", n)
        result["enroll_s"] = round(time.monotonic() - t, 1)
        run(RELEASE / "outpost-hub", "--config", d / "hub-0.toml", "broker-config", "--pki",
            setup.pki, "--port", port, "--bind", "127.0.0.1", "--out", d / "broker")
        broker = subprocess.Popen([MOSQUITTO, "-c", str(d / "broker/mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=open(d / "mosquitto.log", "w"),
                                  preexec_fn=raise_nofile)
        procs.append(broker)
        wait_port(port)
        hub_procs = []
        for k in range(hubs):
            p = subprocess.Popen([str(RELEASE / "outpost-hub"), "--config", str(d / f"hub-{k}.toml"), "serve"],
                                 stdout=subprocess.DEVNULL, stderr=open(d / f"hub-{k}.log", "w"),
                                 env=dict(os.environ, RUST_LOG="info"), preexec_fn=raise_nofile)
            procs.append(p)
            hub_procs.append(p)
            wait_port(hub_ports[k])
        time.sleep(1)
        sim_args = ["run", "--dir", str(setup.devices), "--broker", f"mqtts://127.0.0.1:{port}",
                    "--devices", str(n), "--interval", str(a.interval), "--duration",
                    str(a.bad_duration if bad else a.duration), "--connect-rate",
                    str(a.connect_rate), "--drain", str(a.drain), "--json", str(d / "run.json")]
        if bad:
            sim_args += ["--flooders", "5", "--flood-rate", "500", "--replayers", "5",
                         "--half-open", "1000"]
        sim = subprocess.Popen([str(RELEASE / "fleet-sim"), *sim_args], stdout=subprocess.PIPE,
                               stderr=open(d / "sim.log", "w"), text=True)
        sampler = Sampler({"hub": [p.pid for p in hub_procs], "broker": [broker.pid],
                           "simulator": [sim.pid]}, db)
        for k, p in enumerate(hub_procs):
            sampler.pids[f"hub-{k}"] = [p.pid]
        t_sim = time.monotonic()
        sampler.take()
        sampler.start()
        if bad and a.stall > 0:
            time.sleep(a.stall_at)
            log(f"   hub-0 stopped (SIGSTOP) for {a.stall} s")
            hub_procs[0].send_signal(signal.SIGSTOP)
            time.sleep(a.stall)
            hub_procs[0].send_signal(signal.SIGCONT)
            log("   hub-0 continued")
        out, _ = sim.communicate()
        sampler.stop.set()
        sampler.join()
        print(out, file=sys.stderr)
        rep = json.loads((d / "run.json").read_text())
        duration = rep["duration_s"]
        steady = (t_sim + (rep["all_connected_s"] or 0.0), t_sim + duration)
        result["sim"] = {k: rep[k] for k in (
            "connected", "connect_ms", "all_connected_s", "written", "acked", "sustained",
            "lag_ms", "flooder_lag_ms", "connects", "disconnects", "connect_failures",
            "rewinds", "publish_refused", "replays", "half_open_closed_by_broker", "ok",
            "finished_s")}
        result["resources"] = sampler.window(*steady)
        result["hub_metrics"] = []
        for hp in hub_ports:
            m = metrics(hp)
            keep = ("outpost_hub_records_stored_total", "outpost_hub_messages_received_total",
                    "outpost_hub_messages_shed_total", "outpost_hub_messages_limited_total",
                    'outpost_hub_batches_total{outcome="duplicate"}',
                    'outpost_hub_batches_total{outcome="stored"}',
                    'outpost_hub_batches_total{outcome="ahead"}',
                    'outpost_hub_batches_total{outcome="parked"}',
                    "outpost_hub_store_transaction_seconds_count",
                    "outpost_hub_store_transaction_seconds_sum",
                    "outpost_hub_broker_disconnects_total", "outpost_hub_acks_unsent_total")
            result["hub_metrics"].append({k: m.get(k) for k in keep})
        for p in hub_procs:
            p.send_signal(signal.SIGTERM)
        for p in hub_procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        # Nothing lost, nothing twice, every chain verifies.
        v = subprocess.run([str(RELEASE / "fleet-sim"), "verify", "--data-dir", str(d / "hub"),
                            "--store", url, "--report", str(d / "run.json"), "--json",
                            str(d / "verify.json")], capture_output=True, text=True)
        print(v.stdout.strip(), file=sys.stderr)
        ver = json.loads((d / "verify.json").read_text()) if (d / "verify.json").exists() else {}
        rows = psql("SELECT count(*), count(DISTINCT (device_id, seq)), count(DISTINCT device_id) "
                    "FROM audit_records", db).split("|")
        gaps = psql("SELECT count(*) FROM (SELECT device_id FROM audit_records GROUP BY device_id "
                    "HAVING max(seq) <> count(*) OR min(seq) <> 1) g", db)
        result["check"] = {
            "verified_devices": ver.get("ok"), "verify_ok": v.returncode == 0 and ver.get("all_ok"),
            "rows": int(rows[0]), "distinct_rows": int(rows[1]), "devices_with_rows": int(rows[2]),
            "written": rep["written"], "devices_with_gaps": int(gaps),
            "lost": rep["written"] - int(rows[1]), "duplicated": int(rows[0]) - int(rows[1]),
        }
        log(f"   {json.dumps(result['check'])}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
                    p.wait(timeout=15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    p.kill()
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return result


def fmt_row(r):
    s, res, c = r["sim"], r["resources"], r["check"]
    sus = s["sustained"] or {}
    hub_cpu = sum(v["cpu_pct"] for k, v in res.items() if k.startswith("hub-"))
    hub_rss = max((v["rss_mib"] for k, v in res.items() if k.startswith("hub-")), default=0)
    g = lambda k, f: res.get(k, {}).get(f, "-")
    conn = f"{s['all_connected_s']:.1f} s" if s["all_connected_s"] is not None else "never"
    whole = "yes" if (c["lost"] == 0 and c["duplicated"] == 0 and c["verify_ok"]) else "NO"
    return (f"| {r['devices']:,} | {r['hubs']} | {conn} "
            f"(p50 {s['connect_ms']['p50']} ms, p99 {s['connect_ms']['p99']} ms) | "
            f"{sus.get('acked_per_s', 0):,.0f} ({sus.get('written_per_s', 0):,.0f} written) | "
            f"{s['lag_ms']['p50']} / {s['lag_ms']['p99']} ms | {hub_cpu:.0f} % / {hub_rss} MiB | "
            f"{g('broker', 'cpu_pct')} % / {g('broker', 'rss_mib')} MiB | "
            f"{g('postgres', 'cpu_pct')} % | {g('simulator', 'cpu_pct')} % / {g('simulator', 'rss_mib')} MiB | "
            f"{c['written']:,} / lost {c['lost']} / twice {c['duplicated']} / verified {whole} |")


def fmt_bad(r):
    """The bad-input run's own line: the flooders' lag beside the others', and what the hubs
    did with the flood (summed over the hubs)."""
    s = r["sim"]
    total = lambda k: sum((m.get(k) or 0) for m in r["hub_metrics"])
    fl = s.get("flooder_lag_ms") or {}
    ahead = total('outpost_hub_batches_total{outcome="ahead"}')
    parked = total('outpost_hub_batches_total{outcome="parked"}')
    tx = total("outpost_hub_store_transaction_seconds_count")
    tx_ms = 1000 * total("outpost_hub_store_transaction_seconds_sum") / max(1, tx)
    return (f"bad input: others' lag p50 {s['lag_ms']['p50']} ms, p99 {s['lag_ms']['p99']} ms; "
            f"flooders' lag p50 {fl.get('p50', '-')} ms, p99 {fl.get('p99', '-')} ms; hubs: "
            f"received {total('outpost_hub_messages_received_total'):,.0f}, limited "
            f"{total('outpost_hub_messages_limited_total'):,.0f}, shed "
            f"{total('outpost_hub_messages_shed_total'):,.0f}, ahead {ahead:,.0f}, parked "
            f"{parked:,.0f}, transactions {tx:,.0f} ({tx_ms:.1f} ms on average)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--hubs", default="1,2")
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--connect-rate", type=float, default=500.0)
    ap.add_argument("--drain", type=float, default=180.0)
    ap.add_argument("--bad", action="store_true", help="add the bad-input run")
    ap.add_argument("--bad-only", action="store_true", help="only the bad-input run")
    ap.add_argument("--bad-devices", type=int, default=1000)
    ap.add_argument("--bad-duration", type=float, default=200.0)
    ap.add_argument("--stall-at", type=float, default=40.0)
    ap.add_argument("--stall", type=float, default=120.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="keep the run folders under this directory")
    ap.add_argument("--bin-dir", help="run outpost-hub and fleet-sim from here (built "
                    "elsewhere, e.g. an older commit's, to compare); implies --no-build")
    a = ap.parse_args()
    global RELEASE
    if a.bin_dir:
        RELEASE = Path(a.bin_dir).resolve()
        a.no_build = True
    # SIGTERM ends the run like Ctrl-C: the processes it started are stopped by PID and the
    # database dropped (the `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    if not Path(MOSQUITTO).exists():
        sys.exit(f"{MOSQUITTO} is missing")
    if not a.no_build:
        log("building release binaries ...")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "outpost-sync",
                        "--bin", "outpost-hub", "-p", "outpost-tests", "--bin", "fleet-sim"],
                       cwd=ROOT, check=True)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="outpost-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    setup = Setup(root)
    results = []
    try:
        if not a.bad_only:
            for n in [int(x) for x in a.sizes.split(",") if x]:
                for h in [int(x) for x in a.hubs.split(",") if x]:
                    results.append(scenario(setup, n, h, a))
        if a.bad or a.bad_only:
            results.append(scenario(setup, a.bad_devices, 2, a, bad=True))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| devices | hubs | all connected after (connect p50, p99) | records/s acked, sustained "
          "| lag p50 / p99 | hubs CPU / RSS (max) | broker CPU / RSS | PostgreSQL CPU "
          "| simulator CPU / RSS | records / lost / twice / chains |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(fmt_row(r))
    for r in results:
        if r["bad"]:
            print(fmt_bad(r))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
