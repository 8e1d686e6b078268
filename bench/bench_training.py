"""Benchmark 4: training seconds per epoch (needs the train extra and ../shared/data).

    python -m bench.bench_training [--data-dir ../shared/data/chest_xray/train] [--epochs 2] [--vgg-images 600]

(1) baseline_cnn at 128 px on the shared data's training split (70% of 5,216 images), seconds per epoch
    (the first epoch includes tf.function tracing, so the table shows the later epochs' mean too);
(2) the VGG19 head trained on cached frozen-base features vs the full model with the frozen base run every
    epoch, on a subset of --vgg-images images (weights=None: the same compute as ImageNet weights).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.common import SHARED_TRAIN, machine, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=SHARED_TRAIN)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--vgg-images", type=int, default=600)
    p.add_argument("--image-size", type=int, default=128)
    args = p.parse_args(argv)

    from train import fit
    from train.data import find_examples, labels_to_array, split_examples
    from train.loading import load_images
    from train.models import build_cnn, keras, vgg19_parts
    from xray_core.preprocessing import PreprocessConfig

    examples = find_examples(args.data_dir)
    t0 = time.perf_counter()
    x, ok, _ = load_images([e.path for e in examples], PreprocessConfig(image_size=args.image_size))
    decode_s = time.perf_counter() - t0
    examples = [examples[i] for i in ok]
    y = labels_to_array(e.label for e in examples)
    splits = np.asarray(split_examples(examples, seed=42))
    tr, va = splits == "train", splits == "val"
    quiet = lambda *_: None  # noqa: E731
    rows = [["decode + preprocess all images (2 processes)", len(x), round(decode_s, 1), ""]]

    keras.utils.set_random_seed(0)
    h = fit.fit(build_cnn(args.image_size), (x[tr], y[tr]), (x[va], y[va]), name="b", epochs=args.epochs,
                patience=100, seed=0, log=quiet)
    later = round(float(np.mean(h["seconds"][1:])), 1)
    rows.append(["baseline_cnn epoch", int(tr.sum()), round(h["seconds"][0], 1), later])

    n = min(args.vgg_images, int(tr.sum()))
    idx = np.flatnonzero(tr)[:n]
    vidx = np.flatnonzero(va)[: max(64, n // 5)]
    full, extractor, head = vgg19_parts(args.image_size, None)
    t0 = time.perf_counter()
    f_tr = extractor.predict(x[idx], batch_size=64, verbose=0)
    f_va = extractor.predict(x[vidx], batch_size=64, verbose=0)
    cache_s = time.perf_counter() - t0
    h = fit.fit(head, (f_tr, y[idx]), (f_va, y[vidx]), name="h", epochs=args.epochs, patience=100, seed=0, log=quiet)
    head_epoch = float(np.mean(h["seconds"][1:]))
    rows.append(["vgg19: compute feature cache (once)", n, round(cache_s, 1), ""])
    rows.append(["vgg19 head epoch on cached features", n, round(h["seconds"][0], 2), round(head_epoch, 2)])
    full2, _, _ = vgg19_parts(args.image_size, None)
    h = fit.fit(full2, (x[idx], y[idx]), (x[vidx], y[vidx]), name="f", epochs=2, patience=100, seed=0, log=quiet)
    full_epoch = float(h["seconds"][-1])
    rows.append(["vgg19 full model epoch (frozen base run every epoch)", n, round(h["seconds"][0], 1),
                 round(full_epoch, 1)])
    print(f"machine: {machine()}; image size {args.image_size}")
    print(table(["what", "images", "first epoch / once (s)", "later epochs mean (s)"], rows))
    e = 50
    print(f"vgg19, {e} epochs on these {n} images: cached {cache_s + e * head_epoch:.0f} s vs uncached "
          f"{e * full_epoch:.0f} s ({e * full_epoch / (cache_s + e * head_epoch):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
