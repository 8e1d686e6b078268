"""Benchmark 1: scoring throughput of (a) the Beam pipeline, (b) a bare onnxruntime loop, (c) the notebook way.

    python -m bench.bench_scoring [--n 2000] [--repeat 5] [--model serving_models/pneumonia] [--keras-model F]

Generates two inputs (n 224x224 RGB JPEGs; n 1400x1100 grayscale JPEGs, quality 90), then times on the same
images, each method --repeat times in turn (a shared, noisy 2-core VM: single runs vary by ±15%, so each repeat
is one a, b, c triple run back to back, and the table gives medians: of each rate and of the per-triple ratios,
with the range of the ratios):
(a) `python -m batch_job` on DirectRunner with one worker per core. Its throughput is images / the job's scoring
    phase (the Beam pipeline from submission to the last shard written, worker start included), as the job
    itself reports in metrics.json `timings`; the whole command (imports, model verification, listing, report,
    exit) is printed too, and its fixed part is the start-up below.
(b) one process: plain Pillow decode + resize, onnxruntime, batch 64 (session created before the clock starts);
(c) Keras `model.predict` on images loaded one by one with Keras image utils (TensorFlow import and model load
    before the clock starts; needs the train extra). Without the package's source model.keras, (c) uses the same
    architecture with untrained weights: the same FLOPs, so the same speed.
Also the pipeline's start-up: a one-image job, whole command.

    python -m bench.bench_scoring --heatmap-cost 50 --model PACKAGE_WITH_HEATMAPS [--n 2000] [--repeat 5]

measures only what `--heatmaps N` costs: the job on the n 1400x1100 JPEGs with `--heatmaps N` and with
`--heatmaps 0`, in turn --repeat times, both with `--threshold 0` (every image flagged: the most work for the
per-shard choice, and N overlays for sure); medians of the whole command, the scoring phase and the overlays
step (metrics.json `timings.heatmaps_seconds`), and of the per-pair ratio of the whole command's time.

    python -m bench.bench_scoring --drift-cost serving_models/pneumonia/3 --model serving_models/pneumonia/4 \
        [--n 2000] [--copies 10] [--repeat 3]

measures what the drift check costs: the job on n x copies 1400x1100 JPEGs (hard-linked copies of n) with
--model (a package with a drift reference) and with the --drift-cost package (the same network exported
without one: no `embedding` output, no check), in turn --repeat times; medians of the whole command, the scoring
phase and the drift step (metrics.json `timings.drift_seconds`), and of the per-pair ratio of the whole command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from batch_job.listing import iter_images
from bench.common import DEFAULT_MODEL, REPO, hardlink_copies, machine, make_jpegs, table
from xray_core.package import load_metadata, resolve_version_dir
from xray_core.package import open_session as load_session


def run_pipeline(inp: str, model: str, extra=(), repo: str = REPO) -> tuple[float, dict]:
    """`python -m batch_job` of the checkout `repo` (its working directory comes first on sys.path)
    -> (whole-command seconds, the job's metrics.json)."""
    out = tempfile.mkdtemp(prefix="bench-out-")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "batch_job", "--input", inp, "--model", model, "--output", out,
                           "--overwrite", *extra], cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed: {proc.stderr[-800:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    return wall, metrics


def bare_loop(paths: list[str], model_path: str, size: int, batch: int = 64) -> float:
    session = load_session(model_path)  # default threads: all cores for one process
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        x = np.stack([np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR),
                                 np.float32)[:, :, None] / 255.0 for p in paths[i:i + batch]])
        session.run(["probability"], {"image": x})
    return time.perf_counter() - t0


def notebook_way(paths: list[str], keras_model: str | None, size: int, architecture: str) -> float:
    code = f"""
import os, sys, time, json
os.environ["TF_USE_LEGACY_KERAS"] = "1"; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tf_keras as keras
if {keras_model!r}:
    model = keras.models.load_model({keras_model!r}, compile=False)
elif {architecture!r} == "vgg19":
    from train.models import vgg19_parts
    model = vgg19_parts({size}, None)[0]
else:  # baseline_cnn and augmented_cnn are the same network at inference
    from train.models import build_cnn
    model = build_cnn({size})
paths = json.load(sys.stdin)
t0 = time.perf_counter()
x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, color_mode="grayscale",
                                                          target_size=({size}, {size}))) / 255.0 for p in paths])
model.predict(x, verbose=0)
print(time.perf_counter() - t0)
"""
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(paths), capture_output=True, text=True,
                          cwd=REPO)  # `-c` puts the working directory first on sys.path: this checkout's train/
    if proc.returncode != 0:
        raise SystemExit(f"keras run failed: {proc.stderr[-800:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def interleaved(folder: str, variants: dict[str, dict], repeat: int) -> dict[str, list[tuple[float, dict]]]:
    """run_pipeline of each variant (its keyword arguments) in turn, `repeat` times: a shared machine's drift
    hits all of them alike. -> {label: [(whole-command seconds, metrics.json), ...]}"""
    runs: dict[str, list] = {label: [] for label in variants}
    for _ in range(repeat):
        for label, kwargs in variants.items():
            runs[label].append(run_pipeline(folder, **kwargs))
    return runs


def ratio_line(what: str, ratios: list[float]) -> str:
    return f"{what} (per pair): median {statistics.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}"


def heatmap_cost(folder: str, model: str, n_heatmaps: int, repeat: int) -> str:
    """The job with --heatmaps n_heatmaps and with --heatmaps 0, interleaved; -> a table."""
    runs = interleaved(folder, {f"--heatmaps {n}": {"model": model, "extra": ["--heatmaps", str(n), "--threshold", "0"]}
                                for n in (n_heatmaps, 0)}, repeat)
    med = statistics.median
    rows = [[label, med(w for w, _ in r), med(m["timings"]["scoring_seconds"] for _, m in r),
             med(m["timings"]["heatmaps_seconds"] for _, m in r), med(m["heatmaps"]["written"] for _, m in r)]
            for label, r in runs.items()]
    on, off = runs.values()
    return (table(["job", "whole command s", "scoring s", "overlays s", "overlays written"], rows) + "\n"
            + ratio_line("whole command, with / without", [a[0] / b[0] for a, b in zip(on, off)]))


def drift_cost(folder: str, model: str, without: str, repeat: int) -> str:
    """The job with `model` (drift checked) and `without` (no reference), interleaved; -> a table."""
    runs = interleaved(folder, {m: {"model": m} for m in (model, without)}, repeat)
    med = statistics.median
    rows = [[m, med(w for w, _ in r), med(x["timings"]["scoring_seconds"] for _, x in r),
             med(x["timings"].get("drift_seconds", 0.0) for _, x in r),
             r[0][1]["drift"].get("sampled", 0), r[0][1]["drift"].get("domain_auc", "n/a")] for m, r in runs.items()]
    on, off = runs.values()
    return (table(["model", "whole command s", "scoring s", "drift step s", "embeddings sampled", "domain AUC"], rows)
            + "\n" + ratio_line("whole command, with / without the drift check",
                               [a[0] / b[0] for a, b in zip(on, off)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5, help="interleaved runs of each method per input (medians)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--keras-model", default=None, help="model.keras for (c); default: the package's source model")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "pneumonia-bench"))
    p.add_argument("--heatmap-cost", type=int, default=None, metavar="N",
                   help="only time --heatmaps N against --heatmaps 0 on the 1400x1100 JPEGs (a model with heatmaps)")
    p.add_argument("--drift-cost", default=None, metavar="PACKAGE_WITHOUT_REFERENCE",
                   help="only time --model (with a drift reference) against this package (without one)")
    p.add_argument("--copies", type=int, default=1, help="--drift-cost: hard-linked copies of the n JPEGs")
    args = p.parse_args(argv)
    vdir = resolve_version_dir(args.model)
    meta = load_metadata(vdir)
    if args.drift_cost is not None:
        folder = make_jpegs(os.path.join(args.work_dir, f"gray1400-{args.n}"), args.n, (1400, 1100), mode="L")
        if args.copies > 1:
            folder = hardlink_copies(folder, os.path.join(args.work_dir, f"gray1400-{args.n}x{args.copies}"),
                                     args.copies)
        print(f"machine: {machine()}; {args.n * args.copies} 1400x1100 gray JPEGs; medians of {args.repeat}")
        print(drift_cost(folder, args.model, args.drift_cost, args.repeat))
        return 0
    if args.heatmap_cost is not None:
        if meta.heatmap_output is None:
            raise SystemExit(f"{vdir} has no heatmap output: --heatmap-cost needs a model exported with one")
        folder = make_jpegs(os.path.join(args.work_dir, f"gray1400-{args.n}"), args.n, (1400, 1100), mode="L")
        print(f"machine: {machine()}; model {meta.model_id}; {args.n} 1400x1100 gray JPEGs; "
              f"medians of {args.repeat}")
        print(heatmap_cost(folder, args.model, args.heatmap_cost, args.repeat))
        return 0
    size = meta.image_size
    keras_model = args.keras_model or (meta.source or {}).get("model_file")
    if keras_model and not os.path.isfile(keras_model):
        keras_model = None
    has_tf = importlib.util.find_spec("tf_keras") is not None  # (c) runs in its own process

    inputs = {
        "224x224 RGB": make_jpegs(os.path.join(args.work_dir, f"rgb224-{args.n}"), args.n, (224, 224), mode="RGB"),
        "1400x1100 gray": make_jpegs(os.path.join(args.work_dir, f"gray1400-{args.n}"), args.n, (1400, 1100), mode="L"),
    }
    one = os.path.join(args.work_dir, "one")
    make_jpegs(one, 1, (224, 224))
    startup = statistics.median(run_pipeline(one, args.model)[0] for _ in range(args.repeat))
    rows, whole_rows = [], []
    for name, folder in inputs.items():
        paths = [q for _, q in iter_images([folder])]
        n = len(paths)
        a_runs, b_runs, c_runs = [], [], []
        for _ in range(args.repeat):  # interleaved, so drifts in machine speed hit every method alike
            a_runs.append(run_pipeline(folder, args.model))
            b_runs.append(bare_loop(paths, os.path.join(vdir, "model.onnx"), size))
            if has_tf:
                c_runs.append(notebook_way(paths, keras_model, size, meta.architecture or "baseline_cnn"))
        a_i = [m["timings"]["scoring_images_per_second"] for _, m in a_runs]
        b_i = [n / s for s in b_runs]
        c_i = [n / s for s in c_runs] if c_runs else [float("nan")] * len(a_i)
        ab = [x / y for x, y in zip(a_i, b_i)]
        ac = [x / y for x, y in zip(a_i, c_i)]
        med = statistics.median
        rows.append([name, n, med(a_i), med(b_i), med(c_i), med(ab), f"{min(ab):.3f}–{max(ab):.3f}", med(ac),
                     f"{min(ac):.3f}–{max(ac):.3f}"])
        mid_whole, mid_m = sorted(a_runs, key=lambda r: r[0])[len(a_runs) // 2]
        mid_t = mid_m["timings"]
        whole_rows.append([name, n / mid_whole, mid_whole, mid_t["setup_seconds"], mid_t["scoring_seconds"],
                           mid_t["report_seconds"], n / mid_whole / med(b_i)])
    print(f"machine: {machine()}; model {meta.model_id} ({size}px); medians of {args.repeat}; "
          f"(c) from {(keras_model or 'the architecture, untrained weights') if has_tf else 'n/a: no TensorFlow'}")
    print(f"pipeline start-up (1-image job, whole command, median): {startup:.2f} s")
    print(table(["input", "images", "a: pipeline img/s", "b: bare loop img/s", "c: notebook img/s", "a/b",
                 "a/b range", "a/c", "a/c range"], rows))
    print("\nwhole command (a, start-up and report included; the median run; phases from metrics.json timings):")
    print(table(["input", "img/s", "wall s", "setup s", "scoring s", "report s", "a_whole/b"], whole_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
