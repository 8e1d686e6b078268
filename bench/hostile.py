"""A hostile corpus for the input gate, from public package data and the shared training X-rays (never the site
sample; written outside the repo):

    python -m bench.hostile [--out /tmp/pneumonia-hostile] [--xrays 20]

OUT/photos/      scikit-image's bundled pictures (`pip install scikit-image`; skipped without it), scikit-learn's
                 two sample photographs and matplotlib's: each as it is and as grayscale PNG
OUT/faces/       scikit-image's 200 small gray faces (`lfw_subset`, 25 px) upscaled to 256 px: ID photographs a PACS
                 may hold, and the non-X-rays a layout check passes most often (QA, 2026-12-03); skipped without it
OUT/synthetic/   constant black, white and mid-grey, uniform noise, a smooth gradient, a checkerboard (512 px)
OUT/dicom/       every file of pydicom's bundled test data with pixel data (CT, MR, US, SC, ... in many encodings)
OUT/inverted/    --xrays training X-rays (seeded choice), grey levels inverted
OUT/rotated/     the same X-rays turned by 90 degrees
The folder is replaced on each call (it is this tool's output); it never holds the site sample.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageOps

from xray_core.labels import CLASSES

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray", "train")
SKIMAGE = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
           "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
           "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def pictures() -> dict[str, np.ndarray]:
    """name -> uint8 image array, from the libraries installed here."""
    found = {}
    try:
        import skimage.data

        for name in SKIMAGE:
            found[f"skimage_{name}"] = np.asarray(getattr(skimage.data, name)())
    except ImportError:
        print("scikit-image not installed: its pictures are left out", file=sys.stderr)
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images):
        found["sklearn_" + os.path.splitext(os.path.basename(path))[0]] = img
    import matplotlib

    hopper = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    found["matplotlib_grace_hopper"] = np.asarray(Image.open(hopper))
    return {k: (v.astype(np.uint8) * 255 if v.dtype == bool else v.astype(np.uint8)) for k, v in found.items()}


def faces(size: int = 256) -> dict[str, np.ndarray]:
    """name -> uint8 gray face photograph, upscaled (bicubic) from scikit-image's lfw_subset; {} without it."""
    try:
        import skimage.data
    except ImportError:
        return {}
    return {f"lfw_{i:03d}": np.asarray(Image.fromarray(np.round(face * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)) for i, face in enumerate(skimage.data.lfw_subset())}


def synthetic(size: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, size), (size, 1))
    checker = ((np.indices((size, size)) // 32).sum(axis=0) % 2 * 255)
    return {"black": np.zeros((size, size)), "white": np.full((size, size), 255), "grey": np.full((size, size), 128),
            "noise": rng.integers(0, 256, (size, size)), "gradient": ramp, "checkerboard": checker}


def xrays(n: int, seed: int = 0) -> list[str]:
    paths = sorted(p for c in CLASSES for p in glob.glob(os.path.join(TRAIN, c, "*.jpeg")))
    if not paths:
        return []
    return [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), n, replace=False))]


def build(out: str, n_xrays: int) -> dict[str, int]:
    if os.path.isdir(out):
        shutil.rmtree(out)
    for sub in ("photos", "faces", "synthetic", "dicom", "inverted", "rotated"):
        os.makedirs(os.path.join(out, sub))
    for name, arr in faces().items():
        Image.fromarray(arr, mode="L").save(os.path.join(out, "faces", f"{name}.png"))
    for name, arr in pictures().items():
        img = Image.fromarray(arr)
        img.save(os.path.join(out, "photos", f"{name}.png"))
        if img.mode not in ("L", "1"):
            img.convert("L").save(os.path.join(out, "photos", f"{name}_gray.png"))
    for name, arr in synthetic().items():
        Image.fromarray(arr.astype(np.uint8), mode="L").save(os.path.join(out, "synthetic", f"{name}.png"))
    import pydicom
    from pydicom.data import get_testdata_files

    for path in get_testdata_files("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - not DICOM at all
            continue
        if "PixelData" in pydicom.dcmread(path, force=True) and getattr(ds, "file_meta", None) is not None:
            shutil.copyfile(path, os.path.join(out, "dicom", os.path.basename(path) + ".dcm"))
    for path in xrays(n_xrays):
        img = ImageOps.exif_transpose(Image.open(path)).convert("L")
        name = os.path.basename(path)
        ImageOps.invert(img).save(os.path.join(out, "inverted", name))
        img.transpose(Image.Transpose.ROTATE_90).save(os.path.join(out, "rotated", name))
    return {sub: len(os.listdir(os.path.join(out, sub))) for sub in sorted(os.listdir(out))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/pneumonia-hostile")
    p.add_argument("--xrays", type=int, default=20)
    args = p.parse_args(argv)
    counts = build(args.out, args.xrays)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
