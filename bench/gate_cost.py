"""Benchmark 7b: what the input gate costs, part by part, on the X-ray-sized corpus (one core each).

    python -m bench.gate_cost [--model serving_models/pneumonia] [--n 500] [--job-seconds S]

The gate adds three things to the job, each timed here on its own (best of 5 passes over n corpus scans):
1. the cheap checks (xray_core/content.py) on each decoded scan: `content.problem`, plus `colour_spread` where the
   JPEG is in colour (the corpus is gray, as real scans are: the colour check is also timed on the colour
   version of the same scans, the worst case);
2. the model-side checks on a batch of 64 scans (`Gate.reasons`: the content check's distances, one matrix product
   per batch of embeddings; the block means of the model inputs, and on them the orientation and layout checks,
   where the package has them);
3. making the content check once per worker process (`gate.package_gate`: reading gate.npz for a gate fitted on
   the training split, version 6 on; a Ledoit-Wolf fit on the reference rows for version 5's); worker threads of
   one process share it, and a second thread waits for the first.
The embedding itself is an output of the same network run that gives the probability: nothing extra.
The share of a 2,000-scan command is (1 + 2) * 2,000 / cores + 3, over --job-seconds (the whole command's time
measured beside it, e.g. by `bench.bench_anchor`). An upper bound: parts 1 and 2 run on both cores at once.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys

import numpy as np
from PIL import Image

from bench.common import machine, table
from bench.profile_scoring import per_image_ms
from xray_core import content, gate, reference
from xray_core.package import load_metadata, open_session, resolve_version_dir, score
from xray_core.preprocessing import decode, to_model_input

CORPUS = "/tmp/pneumonia-corpus/x2000"


def colour_copy(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="serving_models/pneumonia")
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--images", type=int, default=2000, help="scans in the command the share is of")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--job-seconds", type=float, default=None, help="the whole command's seconds at --images")
    args = p.parse_args(argv)
    vdir = resolve_version_dir(args.model)
    meta = load_metadata(vdir)
    if meta.gate is None:
        raise SystemExit(f"{vdir} has no gate")
    paths = sorted(glob.glob(os.path.join(args.corpus, "*", "*.jpeg")))[:args.n]
    if len(paths) < 64:
        raise SystemExit(f"too few scans in {args.corpus}: run python -m bench.corpus first")
    datas = [open(q, "rb").read() for q in paths]
    gray = [np.asarray(decode(d, meta.config).image) for d in datas]
    colour = [np.asarray(Image.open(io.BytesIO(colour_copy(d))).reduce(8).convert("RGB")) for d in datas[:100]]
    ref = reference.load(os.path.join(vdir, reference.REFERENCE_FILE)).embeddings
    spec = gate.GateSpec.from_dict(meta.gate)
    check = gate.package_gate(spec, vdir, lambda: ref)
    x = np.stack([to_model_input(Image.fromarray(g), meta.config) for g in gray[:64]])
    emb = score(open_session(os.path.join(vdir, "model.onnx"), 1), x, embedding=True).embedding

    cheap = per_image_ms(content.problem, gray)
    spread = per_image_ms(content.colour_spread, colour)
    arrays = list(x)
    distances = per_image_ms(lambda _: check.reasons(emb, arrays), range(20)) / len(emb)
    fit_s = min(per_image_ms(lambda _: gate.package_gate(spec, vdir, lambda: ref), range(1), passes=1)
                for _ in range(5)) / 1e3
    per_scan = cheap + distances
    total = per_scan * args.images / args.cores / 1e3 + fit_s
    rows = [["cheap checks (content.problem), per gray scan", f"{cheap:.3f} ms"],
            ["colour check (colour_spread), per colour JPEG (not in the total)", f"{spread:.3f} ms"],
            ["model-side checks (content, orientation, layout), per scan (batches of 64)", f"{distances:.4f} ms"],
            [f"making the check once per worker process ({spec.statistic})", f"{fit_s:.3f} s"],
            [f"total for {args.images:,} gray scans on {args.cores} cores", f"{total:.3f} s"]]
    if args.job_seconds:
        rows.append([f"share of a {args.job_seconds:.1f} s command", f"{total / args.job_seconds:.1%}"])
    print(f"machine: {machine()}; model {vdir}; {len(paths)} corpus scans (draft-decoded at "
          f"{gray[0].shape[1]}x{gray[0].shape[0]})")
    print(table(["part", "cost"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
