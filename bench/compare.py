#!/usr/bin/env python3
"""Outpost against llama.cpp, same model file, same threads, same run.

Usage: bench/compare.py [--model FILE] [--threads 1,2] [--reps 3] [--outpost BIN]
Runs `outpost bench --json` (the portable release binary) and llama.cpp (llama-cpp-python
0.3.36 built by bench/llama-cpp.sh, AVX2 and native when present), and prints a Markdown
table with ratios. llama.cpp is timed by the wall clock around its llama_decode calls: through
llama-cpp-python 0.3.36, llama_perf_context reported zero times (checked with no_perf=False),
so its own counters could not be used; the Python call overhead (~µs per call) counts against
llama.cpp, not us.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LLAMA_SNIPPET = r"""
import json, resource, sys, time, statistics, llama_cpp
path, threads, reps, pp_list, tg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
pp_list = [int(x) for x in pp_list.split(",")]
# The interpreter's own peak before the model (Python, numpy, the library), taken off below.
base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=max(pp_list + [tg]) + 16, n_batch=512, n_ubatch=512,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
load_ms = (time.perf_counter() - t0) * 1000
vocab = llm.n_vocab()
out = []
def clear():
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
for p in pp_list:
    toks = [(i * 7919 + 13) % vocab for i in range(p)]
    rates = []
    for r in range(reps + 1):
        clear()
        t = time.perf_counter()
        llm.eval(toks)
        if r > 0:
            rates.append(p / (time.perf_counter() - t))
    out.append({"test": f"pp{p}", "tokens_per_s": statistics.mean(rates)})
rates = []
for r in range(reps + 1):
    clear()
    tok = llm.token_bos() if llm.token_bos() >= 0 else 0
    t = time.perf_counter()
    for i in range(tg):
        llm.eval([tok])
    if r > 0:
        rates.append(tg / (time.perf_counter() - t))
out.append({"test": f"tg{tg}", "tokens_per_s": statistics.mean(rates)})
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "load_ms": load_ms, "peak_rss_mib": (peak_kib - base_kib) / 1024}))
"""


def llama_python(flavor):
    venv = os.path.join(os.environ.get("OUTPOST_BENCH_CACHE", os.path.expanduser("~/.cache/outpost/bench")),
                        f"llama-cpp-{flavor}", "bin", "python")
    return venv if os.path.exists(venv) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/outpost/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default="512")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--outpost", default=os.path.join(ROOT, "target", "release", "outpost"))
    a = ap.parse_args()

    data = tempfile.mkdtemp(prefix="outpost-bench-")
    run = lambda *args: subprocess.run([a.outpost, "--data-dir", data, *args], check=True,
                                       capture_output=True, text=True).stdout
    run("models", "import", a.model, "--name", "bench")
    ours = json.loads(run("bench", "--model", "bench", "-p", a.prompt, "-n", str(a.gen),
                          "-t", a.threads, "-r", str(a.reps), "--json"))
    refs = {}
    loads = []
    for flavor in ("avx2", "native"):
        py = llama_python(flavor)
        if not py:
            print(f"(llama.cpp {flavor} not built: bench/llama-cpp.sh {flavor})", file=sys.stderr)
            continue
        for t in a.threads.split(","):
            res = subprocess.run([py, "-c", LLAMA_SNIPPET, a.model, t, str(a.reps), a.prompt, str(a.gen)],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(res.strip().splitlines()[-1])
            for r in got["results"]:
                refs[(flavor, r["test"], int(t))] = r["tokens_per_s"]
            loads.append(f"llama.cpp {flavor} {t} thread(s): load {got['load_ms']:.0f} ms, "
                         f"peak RSS {got['peak_rss_mib']:.0f} MiB above the interpreter's")
    print(f"model: {os.path.basename(a.model)}; outpost load {ours['load_ms']} ms, "
          f"peak RSS {ours['peak_rss_bytes'] / 2**20:.0f} MiB")
    for line in loads:
        print(f"  {line}")
    print("| test | threads | outpost t/s | llama.cpp AVX2 t/s | ratio | llama.cpp native t/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in ours["results"]:
        cells = [r["test"], str(r["threads"]), f"{r['tokens_per_s']:.1f} ± {r['sd']:.1f}"]
        for flavor in ("avx2", "native"):
            ref = refs.get((flavor, r["test"], r["threads"]))
            cells += [f"{ref:.1f}", f"{r['tokens_per_s'] / ref:.2f}"] if ref else ["–", "–"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
