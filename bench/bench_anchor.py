"""The job against Beam's canonical inference pipeline, on the X-ray-sized corpus, as whole processes.

    python -m bench.bench_anchor [--n 2000] [--repeat 3] [--model serving_models/pneumonia]

The anchor is what a Beam user writes (apache/beam's examples/inference): ``Create(paths) | Map(decode) |
RunInference(KeyedModelHandler(OnnxModelHandlerNumpy(model.onnx))) | Map(format) | WriteToText`` on DirectRunner
``multi_processing`` with one worker per core, the same model, its input made with plain Pillow (open, gray,
resize to S, / 255) or with Pillow's JPEG draft mode first (libjpeg decodes at the smallest scale >= S). Each
command (anchor plain, anchor draft, ``python -m batch_job`` with its defaults) runs as its own process, imports
included, in turn --repeat times (a shared machine's drift hits all alike); medians, and each pair's ratio.
``--anchor plain|draft`` runs one anchor pipeline (what the benchmark times).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import corpus
from bench.common import DEFAULT_MODEL, REPO, machine, table


def decode(path: str, size: int, draft: bool):
    """(path, (S, S, 1) float32 in [0, 1]) as a user would write it with Pillow."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if draft:
            img.draft("L", (size, size))
        arr = np.asarray(img.convert("L").resize((size, size)), np.float32) / 255.0
    return path, arr[:, :, None]


def run_anchor(folder: str, model_dir: str, out: str, draft: bool, workers: int) -> None:
    """Beam's canonical pipeline: RunInference with the ONNX handler over every image of folder."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
    from apache_beam.options.pipeline_options import PipelineOptions

    from xray_core.package import MODEL_FILE, load_metadata, resolve_version_dir

    vdir = resolve_version_dir(model_dir)
    size = load_metadata(vdir).image_size
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".jpeg"))
    handler = KeyedModelHandler(OnnxModelHandlerNumpy(os.path.join(vdir, MODEL_FILE),
                                                      providers=["CPUExecutionProvider"], max_batch_size=64))
    options = PipelineOptions(["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
    with beam.Pipeline(options=options) as p:
        (p | beam.Create(paths)
           | beam.Map(decode, size, draft)
           | RunInference(handler)
           | beam.MapTuple(lambda path, result: f"{path},{float(result.inference[0]):.8f}")
           | beam.io.WriteToText(os.path.join(out, "predictions")))


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def commands(folder: str, model: str, work: str, i: int) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "anchor, plain decode": [py, "-m", "bench.bench_anchor", "--anchor", "plain", "--input", folder,
                                 "--model", model, "--out", os.path.join(work, f"plain{i}")],
        "anchor, draft decode": [py, "-m", "bench.bench_anchor", "--anchor", "draft", "--input", folder,
                                 "--model", model, "--out", os.path.join(work, f"draft{i}")],
        "python -m batch_job": [py, "-m", "batch_job", "--input", folder, "--model", model,
                                "--output", os.path.join(work, f"job{i}")],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_anchor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="corpus size (bench.corpus)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--anchor", choices=("plain", "draft"), help="run one anchor pipeline and exit")
    p.add_argument("--input", help="with --anchor: the folder to score")
    p.add_argument("--out", help="with --anchor: where WriteToText writes")
    args = p.parse_args(argv)
    workers = len(os.sched_getaffinity(0))
    if args.anchor:
        run_anchor(args.input, args.model, args.out, args.anchor == "draft", workers)
        return 0
    folder = corpus.make(args.n)
    runs: dict[str, list[float]] = {}
    work = tempfile.mkdtemp(prefix="anchor-")
    try:
        for i in range(args.repeat):
            for label, cmd in commands(folder, args.model, work, i).items():
                runs.setdefault(label, []).append(timed(cmd))
                print(f"{label}: {runs[label][-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    job = runs["python -m batch_job"]
    rows = [[label, statistics.median(t), args.n / statistics.median(t),
             statistics.median(a / j for a, j in zip(t, job)), f"{min(a / j for a, j in zip(t, job)):.2f}–"
             f"{max(a / j for a, j in zip(t, job)):.2f}"] for label, t in runs.items()]
    print(f"machine: {machine()}; {args.n} scans 1400x1100 q{corpus.QUALITY}; model {args.model}; "
          f"{workers} workers; medians of {args.repeat}, whole processes")
    print(table(["command", "seconds", "images/s", "its time / the job's (median)", "range"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
