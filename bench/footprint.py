#!/usr/bin/env python3
"""The packages' footprint (issue 14): for each .deb, its size, the installed size dpkg
records, and the stripped binary it carries; for this machine's `outpost` package, the
daemon unpacked from it (`dpkg-deb -x`; no model, bench/daemon.py's config: a free port) and
timed from exec to /readyz answering (503: no model yet), then its idle RSS. The reference,
in the same run: the same binary's `outpost --version` (exec, dynamic linking, exit).

Usage: python3 bench/footprint.py [--reps 7] [DEB...]   (default: target/debian/*.deb)
       python3 bench/footprint.py --where target/release/outpost
Make the packages first: scripts/package [--arch arm64]. Stdlib only (plus dpkg-deb, nm, size).
`--where BINARY` says where the bytes of an unstripped build go: its sections (`size -A`) and
its symbols' sizes (`nm -S`) summed by crate (a generic function is counted in the crate of
the type it is instantiated for: `<Vec<T>>::push` under alloc, `<T as Trait>::f` under T's).
"""

import argparse
import collections
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import Device, rss_kib  # noqa: E402  (bench/daemon.py: the daemon's harness)

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def unpack(deb, into):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return Path(into)


def daemon_figures(outpost, reps):
    """Medians over `reps` fresh starts: ms to /readyz answering, idle RSS (KiB) after 1 s,
    and ms for `outpost --version`."""
    up, rss, version = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        d = Device(outpost, tmp, 1)
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run([str(outpost), "--version"], check=True, capture_output=True)
            version.append(time.perf_counter() - t)
            p, t_up = d.start()
            up.append(t_up)
            time.sleep(1.0)
            rss.append(rss_kib(p.pid))
            d.stop(p)
    return statistics.median(up) * 1000, statistics.median(rss), statistics.median(version) * 1000


def crate_of(symbol):
    """The crate a demangled symbol belongs to, or a label for C and assembly."""
    name = symbol.lstrip("<&*").removeprefix("dyn ").removeprefix("mut ").lstrip("<&*[(")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", name)
    if m:
        return m.group(1)
    if name.startswith("sqlite3") or name.startswith("sqlite"):
        return "SQLite (C)"
    if "ring_core" in name or name.startswith(("GFp", "aes_", "ChaCha20", "ecp_nistz", "x25519", "bn_", "p256", "p384", "sha256_block", "sha512_block", "gcm_")):
        return "ring (C, asm)"
    return "other (C, libc glue, unnamed)"


def where(binary, top):
    sections = subprocess.run(["size", "-A", str(binary)], check=True, capture_output=True,
                              text=True).stdout
    print(f"{binary}: {Path(binary).stat().st_size / MB:.2f} MB")
    print("| section | MB |")
    print("|---|---:|")
    for line in sections.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and int(parts[1]) >= 100_000:
            print(f"| `{parts[0]}` | {int(parts[1]) / MB:.2f} |")
    nm = subprocess.run(["nm", "-S", "--size-sort", "-C", str(binary)], check=True,
                        capture_output=True, text=True).stdout
    by = collections.Counter()
    for line in nm.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            by[crate_of(parts[3])] += int(parts[1], 16)
    total = sum(by.values())
    print(f"\nsymbols: {total / MB:.2f} MB; the {top} largest crates:")
    print("| crate | MB | share |")
    print("|---|---:|---:|")
    for crate, size in by.most_common(top):
        print(f"| `{crate}` | {size / MB:.2f} | {size / total:.1%} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--where", dest="where_", type=Path, metavar="BINARY")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("debs", nargs="*", type=Path)
    a = ap.parse_args()
    if a.where_:
        where(a.where_, a.top)
        return
    debs = a.debs or sorted((ROOT / "target/debian").glob("*.deb"))
    if not debs:
        sys.exit("no packages: run scripts/package first (or name the .deb files)")
    host = subprocess.run(["dpkg", "--print-architecture"], check=True,
                          capture_output=True, text=True).stdout.strip()
    print("| package | .deb | installed size | binary (stripped) |")
    print("|---|---:|---:|---:|")
    device = None
    with tempfile.TemporaryDirectory() as tmp:
        for deb in debs:
            name, arch = field(deb, "Package"), field(deb, "Architecture")
            root = unpack(deb, Path(tmp) / deb.name)
            binary = root / "usr/bin" / name
            print(f"| `{deb.name}` | {deb.stat().st_size / MB:.2f} MB "
                  f"| {int(field(deb, 'Installed-Size')):,} KiB "
                  f"| {binary.stat().st_size / MB:.2f} MB |")
            if name == "outpost" and arch == host:
                device = binary
        if device is None:
            print(f"(no outpost package for {host}: the daemon figures need one)")
            return
        up, rss, version = daemon_figures(device, a.reps)
        print()
        print(f"daemon from the {host} package, no model, median of {a.reps} starts:")
        print(f"  start to /readyz answering: {up:6.0f} ms  (reference, `outpost --version`: {version:.0f} ms)")
        print(f"  idle RSS after 1 s:         {rss / 1024:6.1f} MiB (target <= 15 MB)")


if __name__ == "__main__":
    main()
