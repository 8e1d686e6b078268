"""The benchmark corpus: X-ray-sized scans made from the shared training images (--far: from the site sample).

    python -m bench.corpus --n 2000 [--out /tmp/pneumonia-corpus]      # -> OUT/x2000
    python -m bench.corpus --n 20000                                    # -> OUT/x20000
    python -m bench.corpus --n 2000 --far                               # -> OUT/far2000

N images of ``../shared/data/chest_xray/train/{NORMAL,PNEUMONIA}`` (the site sample only with --far), evenly spaced
over the sorted file list, each turned 8-bit gray, upscaled to 1400x1100 (bicubic) and written as JPEG quality 90 under
OUT/xN/{NORMAL,PNEUMONIA}/: the size and decode cost of real scans, with folder labels. Above the images the
source folder holds (5,216 training images; 313 with --far), the distinct scans are hard-linked again under
copyNNN/ folders (distinct paths, the job scores each; no extra disk). Reused when complete (a marker file). Every
speed figure in bench/RESULTS.md from 2026-11-30 on is on this corpus; synthetic noise images stay for fault tests only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

from bench.common import SHARED_SITE, SHARED_TRAIN

SIZE = (1400, 1100)  # width, height
QUALITY = 90
CLASSES = ("NORMAL", "PNEUMONIA")
DEFAULT_OUT = os.path.join("/tmp", "pneumonia-corpus")


def training_images(src: str = SHARED_TRAIN) -> list[str]:
    """CLASS/name of every image in the training folder, sorted."""
    found = []
    for label in CLASSES:
        folder = os.path.join(src, label)
        found += [f"{label}/{n}" for n in os.listdir(folder) if n.lower().endswith((".jpeg", ".jpg", ".png"))]
    return sorted(found)


def pick(names: list[str], n: int) -> list[str]:
    """n names evenly spaced over the list (all of them, in order, when n >= its length)."""
    return names if n >= len(names) else [names[i * len(names) // n] for i in range(n)]


def upscale(job: tuple[str, str]) -> None:
    src, dst = job
    with Image.open(src) as img:
        img.convert("L").resize(SIZE, Image.Resampling.BICUBIC).save(dst, quality=QUALITY)


def make(n: int, out: str = DEFAULT_OUT, src: str = SHARED_TRAIN, workers: int | None = None,
         far: bool = False) -> str:
    """OUT/xN with n scans (made once; reused when complete) -> its path; far: OUT/farN from the site sample."""
    if far:
        src = SHARED_SITE
    root = os.path.join(out, f"{'far' if far else 'x'}{n}")
    marker = os.path.join(root, f".complete-{n}-{SIZE[0]}x{SIZE[1]}-q{QUALITY}")
    if os.path.exists(marker):
        return root
    if not os.path.isdir(src):
        raise SystemExit(f"error: images not found at {src}")
    shutil.rmtree(root, ignore_errors=True)
    chosen = pick(training_images(src), n)
    distinct = os.path.join(root, "copy000") if n > len(chosen) else root
    for label in CLASSES:
        os.makedirs(os.path.join(distinct, label))
    jobs = [(os.path.join(src, name), os.path.join(distinct, os.path.splitext(name)[0] + ".jpeg")) for name in chosen]
    with ProcessPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(upscale, jobs, chunksize=16), 1):
            if done % 500 == 0:
                print(f"corpus: {done}/{len(jobs)} scans", file=sys.stderr, flush=True)
    made, copy = len(jobs), 1
    while made < n:  # hard-linked copies up to n
        for name, (_, first) in zip(chosen, jobs):
            if made == n:
                break
            link = os.path.join(root, f"copy{copy:03d}", os.path.dirname(name))
            os.makedirs(link, exist_ok=True)
            os.link(first, os.path.join(link, os.path.basename(first)))
            made += 1
        copy += 1
    open(marker, "w").close()
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--far", action="store_true", help="from the site sample: far from the model's reference")
    args = p.parse_args(argv)
    print(make(args.n, args.out, far=args.far))
    return 0


if __name__ == "__main__":
    sys.exit(main())
