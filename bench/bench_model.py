"""Benchmark 6: the network alone, one core: onnxruntime images per second with all outputs, batch 64.

    python -m bench.bench_model [--models serving_models/pneumonia/4,serving_models/pneumonia/5] [--repeat 7]

Each package's graph runs in its own one-thread session on the same batch of 64 real-looking inputs (a
preprocessed X-ray from the bench corpus when `python -m bench.corpus` made one, else a seeded random batch: the
network's cost does not depend on the pixels). Packages run in turn, --repeat rounds, so a noisy neighbour slows
all of them alike; the table gives each one's best round and its ratio to the first package, and the MFLOP per
image counted from the graph (bench.bench_flops).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

from bench.bench_flops import count_flops
from bench.common import machine, table
from xray_core.package import load_metadata, open_session, resolve_version_dir, score
from xray_core.preprocessing import preprocess_image

BATCH = 64
CORPUS = "/tmp/pneumonia-corpus/x2000"


def batch_for(meta, corpus: str = CORPUS) -> np.ndarray:
    paths = sorted(glob.glob(os.path.join(corpus, "*", "*.jpeg")))[:BATCH]
    if len(paths) == BATCH:
        return np.stack([preprocess_image(p, meta.config) for p in paths])
    s = meta.image_size
    return np.random.default_rng(0).random((BATCH, s, s, 1), dtype=np.float32)


def images_per_second(session, meta, x: np.ndarray, rounds: int = 5) -> float:
    """Best of `rounds` timed calls of the whole graph (every output the package has) on x."""
    best = float("inf")
    outputs = {"heatmap": meta.heatmap_hw is not None, "embedding": meta.embedding_dim is not None}
    for _ in range(rounds):
        t0 = time.perf_counter()
        score(session, x, batch_size=len(x), **outputs)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="serving_models/pneumonia/4,serving_models/pneumonia/5",
                   help="comma-separated package version folders; ratios are to the first (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    packages = []
    for model in args.models.split(","):
        vdir = resolve_version_dir(model)
        meta = load_metadata(vdir)
        path = os.path.join(vdir, "model.onnx")
        session = open_session(path, 1)
        x = batch_for(meta)
        images_per_second(session, meta, x, rounds=1)  # warm-up
        packages.append((vdir, session, meta, x, count_flops(path, BATCH) / BATCH / 1e6))
    best = {name: 0.0 for name, *_ in packages}
    for _ in range(args.repeat):
        for name, session, meta, x, _ in packages:
            best[name] = max(best[name], images_per_second(session, meta, x))
    first = packages[0][0]
    rows = [[name, f"{mflop:.0f}", f"{best[name]:.0f}", f"{1e3 / best[name]:.2f}", f"{best[name] / best[first]:.2f}"]
            for name, _, _, _, mflop in packages]
    print(f"machine: {machine()}; one onnxruntime thread, batch {BATCH}, all outputs, best of {args.repeat} rounds")
    print(table(["package", "MFLOP/image", "images/s/core", "ms/image", f"× {first}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
