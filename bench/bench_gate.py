"""Benchmark 7: what the input gate lets through, per kind of input, with the job itself.

    python -m bench.hostile                      # makes /tmp/pneumonia-hostile first
    python -m bench.bench_gate [--model serving_models/pneumonia] [--hostile /tmp/pneumonia-hostile]

Runs `python -m batch_job` once over every group (the hostile corpus's folders; the site sample, as it is, turned by
180 degrees, and turned by 10 degrees, each scan the other way from the next, cropped to the rectangle inside or with
black corners; the package's internal test split from its splits.csv, as symlinks) and tabulates, per group: images,
out of scope, flagged PNEUMONIA, failed. The targets (issue "input gate"): non-X-rays >= 95% out of scope and none
flagged; inverted or rotated X-rays >= 80% out of scope (upside down: the orientation check, from version 7); real
X-rays (site sample, internal test split) <= 1% out of scope. A scan tilted by 10 degrees is a real X-ray positioned
differently: version 8's layout check refused 135 of 313 with black corners, version 9's (fitted on tilted copies) 2.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter

from bench.common import machine, table
from xray_core.package import resolve_version_dir
from xray_core.reference import SPLITS_FILE, read_splits

HOSTILE = "/tmp/pneumonia-hostile"
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray")
NON_XRAYS = ("photos", "faces", "synthetic", "dicom")


def internal_test_split(version_dir: str, folder: str) -> str:
    """Symlinks to the package's internal test split (splits.csv, relative to the training folder)."""
    os.makedirs(folder)
    for i, (rel, split) in enumerate(read_splits(os.path.join(version_dir, SPLITS_FILE))):
        src = os.path.join(SHARED, "train", rel)
        if split == "test" and os.path.isfile(src):
            os.symlink(os.path.abspath(src), os.path.join(folder, f"{i:05d}_{os.path.basename(rel)}"))
    return folder


def upside_down(folder: str, out: str) -> str:
    """The images under folder turned by 180 degrees, as PNGs in out (a check's copy: temporary, never kept)."""
    from PIL import Image

    os.makedirs(out)
    for i, path in enumerate(sorted(glob.glob(os.path.join(folder, "**", "*.jpeg"), recursive=True))):
        with Image.open(path) as img:
            img.convert("L").transpose(Image.Transpose.ROTATE_180).save(os.path.join(out, f"{i:04d}.png"))
    return out


def inscribed(width: int, height: int, degrees: float) -> tuple[int, int, int, int]:
    """The largest axis-aligned box inside a width x height image turned by `degrees` about its centre."""
    a = math.radians(abs(degrees))
    sin, cos = math.sin(a), math.cos(a)
    long, short = max(width, height), min(width, height)
    if short <= 2 * sin * cos * long:  # a narrow image: the box touches the long sides
        x = short / 2
        w, h = (x / sin, x / cos) if width >= height else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        w, h = (width * cos - height * sin) / cos2, (height * cos - width * sin) / cos2
    cx, cy = width / 2, height / 2  # a pixel in from each side: the turn's interpolated edge stays out
    return (math.ceil(cx - w / 2) + 1, math.ceil(cy - h / 2) + 1, math.floor(cx + w / 2) - 1,
            math.floor(cy + h / 2) - 1)


def turned(folder: str, out: str, degrees: float, crop: bool) -> str:
    """The images under folder turned by +-degrees (alternately), cropped to the box inside or with black corners,
    as PNGs in out under their label folders (a check's copy: temporary, never kept)."""
    from PIL import Image

    for i, path in enumerate(sorted(glob.glob(os.path.join(folder, "**", "*.jpeg"), recursive=True))):
        label = os.path.basename(os.path.dirname(path))
        os.makedirs(os.path.join(out, label), exist_ok=True)
        with Image.open(path) as img:
            gray = img.convert("L")
        angle = degrees if i % 2 == 0 else -degrees
        tilted = gray.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
        if crop:
            tilted = tilted.crop(inscribed(gray.width, gray.height, angle))
        tilted.save(os.path.join(out, label, f"{i:04d}.png"))
    return out


def run_group(model: str, folder: str, out: str) -> Counter:
    subprocess.run([sys.executable, "-m", "batch_job", "--input", folder, "--model", model, "--output", out,
                    "--heatmaps", "0", "--log-level", "WARNING"], check=True, stdout=subprocess.DEVNULL)
    counts: Counter = Counter()
    for path in glob.glob(os.path.join(out, "predictions-*.csv")):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                counts["images"] += 1
                counts[row["status"]] += 1
                counts["flagged"] += row["prediction"] == "PNEUMONIA"
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="serving_models/pneumonia")
    p.add_argument("--hostile", default=HOSTILE)
    args = p.parse_args(argv)
    vdir = resolve_version_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        groups = {sub: os.path.join(args.hostile, sub) for sub in sorted(os.listdir(args.hostile))}
        groups["site sample"] = os.path.join(SHARED, "site_sample")
        groups["site sample turned 180"] = upside_down(groups["site sample"], os.path.join(tmp, "site_180"))
        for crop, how in ((True, "cropped inside"), (False, "black corners")):
            folder = os.path.join(tmp, f"site_10_{crop}")
            groups[f"site sample turned 10, {how}"] = turned(groups["site sample"], folder, 10.0, crop)
        groups["internal test split"] = internal_test_split(vdir, os.path.join(tmp, "test_split"))
        rows, non_xray = [], Counter()
        for name, folder in groups.items():
            c = run_group(vdir, folder, os.path.join(tmp, name.replace(" ", "_")))
            if name in NON_XRAYS:
                non_xray.update(c)
            rows.append([name, c["images"], c["out_of_scope"], f"{c['out_of_scope'] / max(c['images'], 1):.1%}",
                         c["flagged"], c["error"]])
        rows.append(["all non-X-rays", non_xray["images"], non_xray["out_of_scope"],
                     f"{non_xray['out_of_scope'] / max(non_xray['images'], 1):.1%}", non_xray["flagged"],
                     non_xray["error"]])
    print(f"machine: {machine()}; model {vdir}")
    print(table(["group", "images", "out of scope", "share", "flagged PNEUMONIA", "failed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
