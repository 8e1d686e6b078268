"""Benchmark 2: peak RSS of the batch job (the whole process tree: job and workers) for N vs 10*N scans of the
X-ray-sized corpus (bench/corpus.py), with the whole command's time and its drift step's share.

    python -m bench.bench_memory [--n 2000] [--factor 10] [--model serving_models/pneumonia] [--far]

--far also runs both sizes of the corpus made from the site sample (`bench.corpus --far`: real-looking scans far
from the model's reference), for the drift step's share on a folder the check reads as DETECTED.

Peak RSS is the maximum over time of the summed RSS of the job's whole process tree, sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

from bench import corpus
from bench.common import DEFAULT_MODEL, REPO, machine, table


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss(inp: str, model: str) -> tuple[int, float, dict]:
    """-> (peak RSS bytes, whole command seconds, the job's metrics.json)."""
    out = tempfile.mkdtemp(prefix="bench-mem-")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "batch_job", "--input", inp, "--model", model, "--output", out,
                             "--overwrite"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed with exit {proc.returncode}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    return peak, wall, metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--far", action="store_true",
                   help="also both sizes of the corpus made from the site sample (far from the reference)")
    args = p.parse_args(argv)
    rows = []
    for far in (False, True) if args.far else (False,):
        for n in (args.n, args.n * args.factor):
            peak, wall, m = peak_rss(corpus.make(n, far=far), args.model)
            drift = m["timings"]["drift_seconds"]
            verdict = "DETECTED" if m["drift"].get("detected") else "none"
            rows.append([f"{'far' if far else 'x'}{n}", round(peak / 2**20, 1), round(wall, 1),
                         m["timings"]["scoring_seconds"], drift, f"{drift / wall:.1%}",
                         f"{verdict} ({m['drift'].get('domain_auc') or float('nan'):.3f})"])
    print(f"machine: {machine()}; corpus 1400x1100 q{corpus.QUALITY}; model {args.model}")
    print(table(["corpus", "peak RSS (MiB, process tree)", "whole command s", "scoring s", "drift step s",
                 "drift share", "drift (domain AUC)"], rows))
    print(f"peak RSS ratio {args.n * args.factor} / {args.n} images: {rows[1][1] / rows[0][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
