"""Before/after: the batch job of two checkouts on the same images, interleaved.

    python -m bench.bench_ab --before /tmp/old [--after .] [--n 2000] [--repeat 5] [--model serving_models/pneumonia]

e.g. before = `git worktree add /tmp/old ddc3b43`. Runs `python -m batch_job` of each checkout (the command runs
in the checkout, so its own batch_job/, export/ and xray_core/ are imported; same Python environment, same model)
on the same inputs, before and after in turn --repeat times, so drifts in machine speed hit both alike. Reports
medians of the scoring phase's throughput (images / metrics.json `timings.scoring_seconds`: the Beam pipeline,
worker start included) and of the whole command's wall time, and the after/before ratio of each pair (median and
range). Inputs: n 224x224 RGB JPEGs and n 1400x1100 gray JPEGs (quality 90); for n above 2,000, 2,000 images
hard-linked n/2,000 times (distinct paths, no extra disk).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile

from bench.bench_scoring import interleaved
from bench.common import DEFAULT_MODEL, hardlink_copies, machine, make_jpegs, table

BASE = 2000  # images generated per input; larger inputs are hard links of these


def inputs(work_dir: str, n: int) -> dict[str, str]:
    out = {}
    for name, tag, size, mode in (("224x224 RGB", "rgb224", (224, 224), "RGB"),
                                  ("1400x1100 gray", "gray1400", (1400, 1100), "L")):
        base = make_jpegs(os.path.join(work_dir, f"{tag}-{min(n, BASE)}"), min(n, BASE), size, mode=mode)
        copies = math.ceil(n / BASE)
        out[name] = base if copies == 1 else hardlink_copies(base, os.path.join(work_dir, f"{tag}-{BASE}x{copies}"),
                                                              copies)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the code before (e.g. a git worktree)")
    p.add_argument("--after", default=".", help="checkout of the code after (default: this one)")
    p.add_argument("--n", type=int, default=2000, help=f"images per input (a multiple of {BASE} above {BASE})")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "pneumonia-bench"))
    args = p.parse_args(argv)
    model = os.path.abspath(args.model)
    repos = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    med = statistics.median
    rows = []
    for name, folder in inputs(args.work_dir, args.n).items():
        runs = interleaved(folder, {which: {"model": model, "repo": repo} for which, repo in repos.items()},
                           args.repeat)
        found = {m["images_found"] for r in runs.values() for _, m in r}
        assert len(found) == 1, found  # both scored the same images
        n = found.pop()
        rate = {w: [m["timings"]["scoring_images_per_second"] for _, m in r] for w, r in runs.items()}
        wall = {w: [s for s, _ in r] for w, r in runs.items()}
        ratio = [a / b for a, b in zip(rate["after"], rate["before"])]
        wall_diff = [a - b for a, b in zip(wall["after"], wall["before"])]
        rows.append([name, n, med(rate["before"]), med(rate["after"]), med(ratio), f"{min(ratio):.3f}–{max(ratio):.3f}",
                     med(wall["before"]), med(wall["after"]), med(wall_diff)])
    print(f"machine: {machine()}; before {repos['before']}, after {repos['after']}; medians of {args.repeat} "
          "interleaved runs")
    print(table(["input", "images", "before: scoring img/s", "after: scoring img/s", "after/before",
                 "after/before range", "before: whole command s", "after: whole command s", "after - before s"],
                rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
