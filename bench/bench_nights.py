"""Nights with a ledger: a night whose files were all scored before, against the night that scored them.

    python -m bench.bench_nights [--n 2000] [--repeats 3] [--model serving_models/pneumonia]

On the X-ray-sized corpus (bench/corpus.py, OUT/xN), whole commands (`python -m batch_job ... --ledger L`), one
after the other:

1. **scoring night**: a new ledger; every image is scored;
2. **hash night**: the same files with a copy of that ledger without its ``files`` table (a ledger of the version
   before it): every file is read and hashed, and skipped by its bytes;
3. **skip night** (``--repeats`` times): the ledger of night 1: no file is opened (path, size, mtime, ctime).

Prints each night's whole-command seconds, its scoring phase and its share of the scoring night.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from bench import corpus
from bench.common import DEFAULT_MODEL, REPO, machine, table


def night(inp: str, model: str, ledger: str, out: str) -> tuple[float, dict]:
    """-> (whole command seconds, metrics.json)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batch_job", "--input", inp, "--model", model, "--output", out,
                           "--ledger", ledger], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed with exit {proc.returncode}: {proc.stderr[-1000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        return wall, json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="skip nights (the median is reported)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--corpus", default=corpus.DEFAULT_OUT)
    args = p.parse_args(argv)
    inp = corpus.make(args.n, args.corpus)
    work = tempfile.mkdtemp(prefix="bench-nights-")
    try:
        ledger = os.path.join(work, "ledger.sqlite")
        rows = []
        wall, m = night(inp, args.model, ledger, os.path.join(work, "night1"))
        assert m["images_scored"] + m["images_failed"] == args.n, m
        score_wall = wall
        rows.append(["scoring night", m["images_scored"], m["images_skipped"], wall,
                     m["timings"]["scoring_seconds"], 1.0])
        old = os.path.join(work, "old.sqlite")
        shutil.copy(ledger, old)
        with sqlite3.connect(old) as conn:
            conn.execute("DROP TABLE files")
        wall, m = night(inp, args.model, old, os.path.join(work, "hash"))
        rows.append(["hash night (ledger without file keys)", m["images_scored"], m["images_skipped"], wall,
                     m["timings"]["scoring_seconds"], wall / score_wall])
        skips = []
        for i in range(args.repeats):
            wall, m = night(inp, args.model, ledger, os.path.join(work, f"skip{i}"))
            assert m["images_scored"] == 0 and m["images_skipped"] == rows[0][1], m
            skips.append((wall, m["timings"]["scoring_seconds"]))
        walls = [w for w, _ in skips]
        rows.append([f"skip night (median of {args.repeats}: {', '.join(f'{w:.1f}' for w in walls)})", 0,
                     args.n, statistics.median(walls), statistics.median(s for _, s in skips),
                     statistics.median(walls) / score_wall])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.n} X-ray-sized JPEGs ({inp}), {machine()}, load average {os.getloadavg()[0]:.1f}")
    print(table(["night", "scored", "skipped", "whole command s", "scoring phase s", "share of scoring night"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
