#!/usr/bin/env python3
"""Replay one trace in libCacheSim and in modelpool-sim, same cache, and print a table.

Run by scripts/libcachesim-compare.sh, which generates the trace (CSV), converts it with
`modelpool-sim export-libcachesim` (oracleGeneral binary plus a JSON summary: size unit,
working set, cache size) and calls this with a Python that has libcachesim==0.3.5.

What is timed, fastest of --repeat runs each:
- libCacheSim: `cache.process_trace(reader)` (its C loop `c_process_trace`): reading each
  24-byte record from the memory-mapped oracleGeneral file (in the page cache after the first
  run) and the cache's get. Cache construction is outside the timer.
- modelpool-sim: `modelpool_sim::run` on the trace already parsed into memory (24-byte ops),
  as `modelpool-sim replay --repeat N` reports it: the PoolState set-up, the replay and the
  report. CSV parsing is outside the timer.

Miss ratios compared: object miss ratio (misses / requests); the miss counts must be equal.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import libcachesim as lcs

POLICIES = {"lru": lcs.LRU, "belady": lcs.Belady}


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C library's INFO lines (written to file descriptor 2) for a while."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def run_libcachesim(path, policy, cache_units, repeat):
    reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
    best, ratios = float("inf"), None
    for _ in range(repeat):
        cache = POLICIES[policy](cache_units)
        t0 = time.perf_counter()
        obj, byte = cache.process_trace(reader)
        best = min(best, time.perf_counter() - t0)
        ratios = (obj, byte)
    return ratios, best


def run_modelpool(sim, trace, policy, cache_bytes, repeat):
    cmd = [
        sim, "replay", trace, "--instant", "--max-models", "1000000",
        "--memory-limit", f"{cache_bytes}B", "--policy", policy, "--repeat", str(repeat),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    requests = int(re.search(r"^\s*requests\s+(\d+)", out, re.M).group(1))
    hits = int(re.search(r"^\s*hits\s+(\d+)", out, re.M).group(1))
    secs = float(re.search(r"replayed \d+ requests in ([0-9.]+) s", out).group(1))
    return requests, hits, secs, " ".join(cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", required=True, help="the modelpool-sim binary")
    ap.add_argument("--trace", required=True, help="the trace, CSV (for modelpool-sim)")
    ap.add_argument("--oracle", required=True, help="the same trace, oracleGeneral (libCacheSim)")
    ap.add_argument("--export", required=True, help="export-libcachesim's JSON summary")
    ap.add_argument("--policies", default="lru,belady")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    ex = json.load(open(a.export))
    n = ex["requests"]

    reader = lcs.TraceReader(a.oracle, lcs.TraceType.ORACLE_GENERAL_TRACE)
    with quiet_stderr():
        objs, units = reader.get_working_set_size()
    if (objs, units * ex["unit_bytes"]) != (ex["models"], ex["working_set_bytes"]):
        sys.exit(f"libCacheSim reads a working set of {objs} objects x {units} units; "
                 f"the export wrote {ex['models']} models, {ex['working_set_bytes']} bytes")

    rows, cmds, ok = [], [], True
    for p in a.policies.split(","):
        (l_obj, _byte), l_secs = run_libcachesim(a.oracle, p, ex["cache_units"], a.repeat)
        m_req, m_hits, m_secs, cmd = run_modelpool(a.sim, a.trace, p, ex["cache_bytes"], a.repeat)
        if m_req != n:
            sys.exit(f"modelpool-sim replayed {m_req} requests, the export has {n}")
        l_miss, m_miss = round(l_obj * n), m_req - m_hits
        same = l_miss == m_miss
        ok &= same
        l_rate, m_rate = n / l_secs / 1e6, n / m_secs / 1e6
        rows.append((p, l_miss / n, m_miss / n, same, l_miss - m_miss, l_rate, m_rate, m_rate / l_rate))
        cmds.append(cmd)

    gb = 1e9
    for cmd in cmds:
        print(f"$ {cmd}")
    print(f"$ python: libcachesim.<LRU|Belady>({ex['cache_units']}).process_trace("
          f"TraceReader('{a.oracle}', TraceType.ORACLE_GENERAL_TRACE))")
    print(f"libCacheSim {lcs.__version__} vs modelpool-sim, {n} requests, {ex['models']} models; "
          f"working set {ex['working_set_bytes'] / gb:.1f} GB, cache {ex['cache_fraction']:.0%} = "
          f"{ex['cache_bytes']} bytes ({ex['cache_units']} units of {ex['unit_bytes']} B)")
    print(f"timed: fastest of {a.repeat}; libCacheSim process_trace on the mmapped oracleGeneral "
          "file, modelpool replay of the parsed trace")
    print(f"{'policy':<8} {'obj-miss lcs':>12} {'obj-miss mp':>12} {'same':>5} "
          f"{'Mreq/s lcs':>11} {'Mreq/s mp':>10} {'mp/lcs':>7}")
    for p, lo, mo, same, diff, lr, mr, ratio in rows:
        s = "yes" if same else f"{diff:+d}"
        print(f"{p:<8} {lo:>12.6f} {mo:>12.6f} {s:>5} {lr:>11.2f} {mr:>10.2f} {ratio:>6.2f}x")
    if not ok:
        sys.exit("miss counts differ (column `same`: libCacheSim's misses minus modelpool's)")


if __name__ == "__main__":
    main()
