"""Where a scored image's time goes: per-image cost of each step, one thread, on the bench inputs.

    python -m bench.profile_scoring [--n 500] [--model serving_models/pneumonia]

Times each step of the shared preprocessing and scoring on one core (best of 5 passes over n images of
each bench input; run `python -m bench.bench_scoring` first, it generates them) and derives the ceiling for the pipeline
on this machine: cores / (sum of the steps), i.e. every core busy with nothing but decode and model.
The entropy-decoding floor is the JPEG decode at libjpeg's smallest scale (1/8): every Huffman-coded
coefficient is still read; only the inverse DCT and the pixels it writes shrink.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from batch_job.listing import iter_images
from bench.common import DEFAULT_MODEL, machine, table
from xray_core.package import load_metadata, resolve_version_dir
from xray_core.package import open_session as load_session
from xray_core.preprocessing import decode_image, preprocess_image, to_model_input


def per_image_ms(fn, items, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--work-dir", default=os.path.join("/tmp", "pneumonia-bench"))
    p.add_argument("--bench-n", type=int, default=2000, help="size of the bench inputs to read")
    args = p.parse_args(argv)
    vdir = resolve_version_dir(args.model)
    meta = load_metadata(vdir)
    cfg = meta.config
    s = cfg.image_size
    session = load_session(os.path.join(vdir, "model.onnx"), 1)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for name, folder in (("224x224 RGB", f"rgb224-{args.bench_n}"), ("1400x1100 gray", f"gray1400-{args.bench_n}")):
        paths = [q for _, q in iter_images([os.path.join(args.work_dir, folder)])][:args.n]
        if not paths:
            raise SystemExit(f"no bench images in {args.work_dir}/{folder}: run python -m bench.bench_scoring first")
        datas = [open(q, "rb").read() for q in paths]

        def draft_floor(d):
            im = Image.open(io.BytesIO(d))
            im.draft("L", (s // 8, s // 8))  # libjpeg's smallest scale
            im.load()

        def full_decode(d):
            Image.open(io.BytesIO(d)).convert("L")

        decoded = [decode_image(d, cfg) for d in datas]
        read = per_image_ms(lambda q: open(q, "rb").read(), paths)
        full = per_image_ms(full_decode, datas)
        floor = per_image_ms(draft_floor, datas)
        decode = per_image_ms(lambda d: decode_image(d, cfg), datas)
        to_input = per_image_ms(lambda im: to_model_input(im, cfg), decoded)
        pre = per_image_ms(lambda d: preprocess_image(d, cfg), datas)
        x = np.stack([preprocess_image(d, cfg) for d in datas[:64]])
        model = per_image_ms(lambda _: session.run(["probability"], {"image": x}), range(8)) / 64
        total = read + pre + model
        rows.append([name, read, full, floor, decode, to_input, pre, model, total, cores * 1e3 / total])
    print(f"machine: {machine()}; model {meta.model_id} ({s}px), onnxruntime 1 thread, batch 64; "
          f"ms per image, best of 5 over {args.n} images")
    print(table(["input", "read file", "full decode (no draft)", "decode at 1/8 (entropy floor)",
                 "decode_image (draft)", "resize + to float", "preprocess_image", "model", "read+preprocess+model",
                 f"ceiling on {cores} cores (img/s)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
