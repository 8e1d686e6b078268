"""How examples/xrays/ was made (run once; needs ../shared/data/chest_xray/site_sample).

python -m examples.make_samples SITE_DIR examples/xrays

15 NORMAL and 15 PNEUMONIA images, drawn at random with seed 2026 (not chosen by any model's score), one per
patient, re-encoded as grayscale JPEG (quality 90), at most 224 px on the long side.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

from train.data import patient_id

PER_CLASS = 15
SEED = 2026
MAX_SIDE = 224


def pick(names: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """n names at random, at most one per patient."""
    chosen, patients = [], set()
    for i in rng.permutation(len(names)):
        if patient_id(names[i]) not in patients:
            patients.add(patient_id(names[i]))
            chosen.append(names[i])
        if len(chosen) == n:
            break
    return sorted(chosen)


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m examples.make_samples SITE_DIR OUT_DIR (e.g. ../shared/data/chest_xray/site_sample "
              "examples/xrays)", file=sys.stderr)
        return 2
    site, out = args
    if os.path.exists(out):
        print(f"error: {out} exists; remove it first", file=sys.stderr)
        return 2
    rng = np.random.default_rng(SEED)
    for label in ("NORMAL", "PNEUMONIA"):
        names = sorted(n for n in os.listdir(os.path.join(site, label))
                       if n.lower().endswith((".jpeg", ".jpg", ".png")))
        os.makedirs(os.path.join(out, label))
        for name in pick(names, PER_CLASS, rng):
            with Image.open(os.path.join(site, label, name)) as img:
                img = img.convert("L")
                img.thumbnail((MAX_SIDE, MAX_SIDE))
                img.save(os.path.join(out, label, os.path.splitext(name)[0] + ".jpeg"), quality=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())
