"""Benchmark 2: peak RSS of the batch job (the whole process tree: job and workers) for N vs 10*N images.

    python -m bench.bench_memory [--n 2000] [--model serving_models/pneumonia]

The larger input repeats the same files as hard links in many folders: distinct paths (the job de-duplicates
symlinks, not hard links), no extra disk.
Peak RSS is the maximum over time of the summed RSS of the job's whole process tree, sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil

from bench.common import DEFAULT_MODEL, REPO, hardlink_copies, machine, make_jpegs, table


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss(inp: str, model: str) -> tuple[int, float]:
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
    if proc.returncode != 0:
        raise SystemExit(f"job failed with exit {proc.returncode}")
    return peak, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "pneumonia-bench"))
    args = p.parse_args(argv)
    small = make_jpegs(os.path.join(args.work_dir, f"rgb224-{args.n}"), args.n, (224, 224), mode="RGB")
    large = hardlink_copies(small, os.path.join(args.work_dir, f"rgb224-{args.n}x{args.factor}-hardlinks"), args.factor)
    rows = []
    for name, folder, n in (("small", small, args.n), ("large", large, args.n * args.factor)):
        peak, wall = peak_rss(folder, args.model)
        rows.append([name, n, round(peak / 2**20, 1), round(wall, 1)])
    print(f"machine: {machine()}")
    print(table(["input", "images", "peak RSS (MiB, process tree)", "wall s"], rows))
    print(f"peak RSS ratio {args.n * args.factor} / {args.n} images: {rows[1][2] / rows[0][2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
