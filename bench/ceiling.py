"""Benchmark 8: the whole command at 20,000 scans against the machine's ceiling, measured in one sitting.

    python -m bench.ceiling [--n 20000] [--repeat 2] [--model serving_models/pneumonia]

The ceiling is what the cores could do with nothing but the two unavoidable steps of a scan: reading and decoding it
into the model's input (`load_input`: draft decode, the gate's cheap checks) and the network with every output the
job fetches, both timed on one core (best of 3 passes over 500 corpus scans; the network on batches of 64 in a
one-thread session), so ceiling = cores / (decode + network) scans per second. Then the job runs on --n scans of the
corpus (bench.corpus, hard links beyond 2,000) as a whole process, imports included; the ceiling is measured before
and after each run (a shared machine's speed drifts), and the ratio uses the mean of the two around it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import corpus
from bench.common import DEFAULT_MODEL, REPO, machine, table
from xray_core.package import load_metadata, open_session, resolve_version_dir, score
from xray_core.preprocessing import load_input

SAMPLE = 500


def per_scan_ms(model: str, folder: str) -> tuple[float, float]:
    """(load_input ms, network ms) per scan, one core each, best of 3."""
    vdir = resolve_version_dir(model)
    meta = load_metadata(vdir)
    paths = sorted(glob.glob(os.path.join(folder, "*", "*.jpeg")))[:SAMPLE]
    datas = [open(p, "rb").read() for p in paths]
    decode = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        arrays = [load_input(d, meta.config).array for d in datas]
        decode = min(decode, (time.perf_counter() - t0) / len(datas) * 1e3)
    session = open_session(os.path.join(vdir, "model.onnx"), 1)
    x = np.stack(arrays[:64])
    outputs = {"heatmap": meta.heatmap_hw is not None, "embedding": meta.embedding_dim is not None}
    network = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        score(session, x, batch_size=64, **outputs)
        network = min(network, (time.perf_counter() - t0) / 64 * 1e3)
    return decode, network


def run_job(model: str, folder: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "batch_job", "--input", folder, "--model", model, "--output", out,
                        "--log-level", "WARNING"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        with open(os.path.join(out, "metrics.json")) as f:
            return seconds, json.load(f)["timings"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--model", default=DEFAULT_MODEL)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    folder = corpus.make(args.n)
    base = corpus.make(2000)
    rows = []
    before = per_scan_ms(args.model, base)
    for _ in range(args.repeat):
        seconds, timings = run_job(args.model, folder)
        after = per_scan_ms(args.model, base)
        ceiling = cores * 1e3 / ((before[0] + after[0]) / 2 + (before[1] + after[1]) / 2)
        rate = args.n / seconds
        rows.append([f"{(before[0] + after[0]) / 2:.2f}", f"{(before[1] + after[1]) / 2:.2f}", f"{ceiling:.0f}",
                     f"{seconds:.1f}", f"{rate:.0f}", f"{args.n / timings['scoring_seconds']:.0f}",
                     f"{rate / ceiling:.3f}"])
        before = after
    print(f"machine: {machine()}; {args.n} scans 1400x1100 q90; model {args.model}")
    print(table(["decode ms/scan (1 core)", "network ms/scan (1 core)", f"ceiling on {cores} cores (scans/s)",
                 "whole command s", "whole command scans/s", "scoring phase scans/s", "whole / ceiling"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
