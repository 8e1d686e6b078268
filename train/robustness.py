"""python -m train.robustness --run-dir RUN: each model of a run on its test split under acquisition shifts.

The dataset's official test scans come from a different distribution than its training scans; this is a
cheap proxy. Every test image goes through the shared decode, then one perturbation (gamma, contrast,
brightness, zoom, rotation, blur, heavy JPEG re-encoding), then the shared resize/scale. ROC AUC, and recall
and specificity at the run's validation-chosen threshold, are reported per model and perturbation, plus
the worst case; written to RUN/robustness.json and robustness.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from train.data import labels_to_array, read_split_csv
from xray_core.preprocessing import ImageError, PreprocessConfig, decode_image, to_model_input, to_scan


def _gamma(g):
    return lambda im: im.point(lambda v: int(round(255 * (v / 255) ** g)))


def _zoom(f):
    def zoom(im):
        w, h = im.size
        dx, dy = int(w * (1 - 1 / f) / 2), int(h * (1 - 1 / f) / 2)
        return im.crop((dx, dy, w - dx, h - dy))
    return zoom


def _jpeg(q):
    def recode(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return recode


PERTURBATIONS = {
    "none": lambda im: im,
    "gamma 0.7": _gamma(0.7),
    "gamma 1.4": _gamma(1.4),
    "contrast x0.7": lambda im: ImageEnhance.Contrast(im).enhance(0.7),
    "contrast x1.3": lambda im: ImageEnhance.Contrast(im).enhance(1.3),
    "brightness x1.2": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "zoom 1.15": _zoom(1.15),
    "rotate 7deg": lambda im: im.rotate(7, resample=Image.Resampling.BILINEAR),
    "blur r1.5": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "jpeg q20": _jpeg(20),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.robustness", description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--models", default=None, help="comma-separated; default: every model of the run")
    args = p.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from train.models import load_model
    from xray_core.metrics import operating_point

    comparison = json.load(open(os.path.join(args.run_dir, "comparison.json")))
    names = args.models.split(",") if args.models else [r["model"] for r in comparison["models"]]
    rows = [(ex, split) for ex, split in read_split_csv(os.path.join(args.run_dir, "split.csv")) if split == "test"]
    results = {}
    for name in names:
        metrics = json.load(open(os.path.join(args.run_dir, name, "metrics.json")))
        config = PreprocessConfig.from_dict(metrics["preprocessing"])
        thr = metrics["chosen_threshold"]
        decoded, labels = [], []
        for ex, _ in rows:
            try:
                decoded.append(to_scan(decode_image(ex.path, config), config))
                labels.append(ex.label)
            except ImageError:
                continue
        y = labels_to_array(labels)
        model = load_model(os.path.join(args.run_dir, name, "model.keras"))
        results[name] = {}
        for pname, fn in PERTURBATIONS.items():
            x = np.stack([to_model_input(fn(im), config) for im in decoded])
            prob = model.predict(x, batch_size=128, verbose=0).reshape(-1)
            pt = operating_point(y, prob, thr)
            results[name][pname] = {"roc_auc": float(roc_auc_score(y, prob)), "recall": pt["recall"],
                                    "specificity": pt["specificity"]}
            print(f"[{name}] {pname:16s} AUC {results[name][pname]['roc_auc']:.4f}  recall {pt['recall']:.4f}  "
                  f"specificity {pt['specificity']:.4f}", flush=True)
        worst = {k: min(r[k] for r in results[name].values()) for k in ("roc_auc", "recall", "specificity")}
        results[name]["worst"] = worst
    with open(os.path.join(args.run_dir, "robustness.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| model | perturbation | ROC AUC | recall | specificity |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for pname, r in res.items():
            lines.append(f"| {name} | {pname} | {r['roc_auc']:.4f} | {r['recall']:.4f} | {r['specificity']:.4f} |")
    with open(os.path.join(args.run_dir, "robustness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
