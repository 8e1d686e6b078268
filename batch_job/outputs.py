"""The job's files: listing, prediction shards, reconciliation, metrics.json, report.md, histogram.png."""
from __future__ import annotations

import csv
import glob
import json
import os
from collections import defaultdict
from typing import Iterable, Iterator

import numpy as np

from batch_job.scoring import COLUMNS
from xray_core.files import atomic_write

LISTING_FILE = "_listing.jsonl"


def shard_name(shard_id: int) -> str:
    return f"predictions-{shard_id:05d}.csv"


def write_listing(path: str, items: Iterable[tuple[int, str]]) -> int:
    """Stream (input index, path) pairs to a JSON-lines file; returns the count."""
    count = 0
    with open(path, "w", encoding="ascii") as f:
        for index, p in items:
            f.write(json.dumps([index, p]) + "\n")  # ASCII: surrogate-escaped names round-trip
            count += 1
    return count


def shard_listing(path: str, shard_size: int) -> list[tuple[int, int, int]]:
    """Cut the listing into shards: (shard id, byte offset, count); one pass, no paths kept."""
    shards, offset, start, in_shard = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            in_shard += 1
            if in_shard == shard_size:
                shards.append((len(shards), start, in_shard))
                start, in_shard = offset, 0
    if in_shard:
        shards.append((len(shards), start, in_shard))
    return shards


def read_listing(path: str, offset: int = 0, count: int | None = None) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        f.seek(offset)
        for n, line in enumerate(f):
            if count is not None and n >= count:
                break
            index, p = json.loads(line)
            yield index, p


def ledger_sidecar(shard_id: int) -> str:
    return f"_ledger-{shard_id:05d}.jsonl"


def write_shard(out_dir: str, shard_id: int, records: list[dict], with_ledger: bool = False) -> str:
    """Write one CSV shard atomically (temp file + rename), so a retried task just rewrites it.

    With the ledger, the newly scored images' (sha256, probability, path) go to a sidecar
    first; the CSV, written last, is what marks the shard complete.
    """
    if with_ledger:
        atomic_write(os.path.join(out_dir, ledger_sidecar(shard_id)), lambda f: f.writelines(
            json.dumps([r["sha256"], float(r["probability"]), r["path"]]) + "\n"
            for r in records if r["status"] == "ok"))
    final = os.path.join(out_dir, shard_name(shard_id))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)

    atomic_write(final, write_csv)
    return final


def read_ledger_entries(out_dir: str, shards) -> Iterator[tuple[str, float, str]]:
    for shard_id, _, _ in shards:
        with open(os.path.join(out_dir, ledger_sidecar(shard_id)), encoding="utf-8") as f:
            for line in f:
                sha, prob, path = json.loads(line)
                yield sha, prob, path


def remove_partial_files(out_dir: str) -> None:
    """Delete hidden temp files that a killed or retried task left half-written."""
    for path in glob.glob(os.path.join(out_dir, ".*.tmp")):
        os.remove(path)


def read_shard(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: unexpected header {reader.fieldnames}")
        return list(reader)


def reconcile(out_dir: str, shards: list[tuple[int, int, int]], inputs: list[str]) -> dict:
    """Check every listed path has exactly one row; gather what metrics need.

    Streams shard by shard: memory holds one shard plus the scored probabilities.
    """
    listing = os.path.join(out_dir, LISTING_FILE)
    probs, labels = [], []
    per_input = defaultdict(lambda: {"found": 0, "scored": 0, "failed": 0, "skipped": 0})
    found = scored = failed = skipped = missing = duplicated = unexpected = 0
    expected_files = {shard_name(s) for s, _, _ in shards}
    for shard_id, offset, count in shards:
        listed = list(read_listing(listing, offset, count))
        found += len(listed)
        path = os.path.join(out_dir, shard_name(shard_id))
        rows = read_shard(path) if os.path.exists(path) else []
        by_path: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_path[row["path"]].append(row)
        listed_paths = {p for _, p in listed}
        unexpected += sum(len(v) for k, v in by_path.items() if k not in listed_paths)
        for index, p in listed:
            counts = per_input[inputs[index]]
            counts["found"] += 1
            hits = by_path.get(p, [])
            if not hits:
                missing += 1
                continue
            duplicated += len(hits) - 1
            row = hits[0]
            if row["status"] in ("ok", "skipped"):  # skipped rows carry their earlier probability
                if row["status"] == "ok":
                    scored += 1
                    counts["scored"] += 1
                else:
                    skipped += 1
                    counts["skipped"] += 1
                probs.append(float(row["probability"]))
                labels.append(row["label"])
            else:
                failed += 1
                counts["failed"] += 1
    stray = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "predictions-*.csv"))
                   if os.path.basename(p) not in expected_files)
    return {
        "images_found": found, "images_scored": scored, "images_failed": failed, "images_skipped": skipped,
        "missing": missing, "duplicated": duplicated, "unexpected": unexpected, "stray_shards": stray,
        "per_input": dict(per_input), "probabilities": np.asarray(probs, dtype=np.float64), "labels": labels,
        "ok": missing == 0 and duplicated == 0 and unexpected == 0 and not stray
        and found == scored + failed + skipped,
    }


def compute_metrics(rec: dict, threshold: float, model_id: str, runner: str) -> dict:
    """metrics.json content; labelled metrics (scikit-learn) when any scored image has a label.

    The caller adds the timings (:func:`add_timings`) once the whole report is written."""
    from xray_core.metrics import operating_point

    probs = rec["probabilities"]
    hist, edges = np.histogram(probs, bins=10, range=(0.0, 1.0))
    positives = int(np.sum(probs >= threshold))
    out = {
        "images_found": rec["images_found"],
        "images_scored": rec["images_scored"],
        "images_failed": rec["images_failed"],
        "images_skipped": rec["images_skipped"],
        "positive_count": positives,
        "positive_rate": positives / len(probs) if len(probs) else 0.0,
        "probability_histogram": {"bin_edges": [round(float(e), 2) for e in edges], "counts": hist.tolist()},
        "per_input": rec["per_input"],
        "model": model_id,
        "threshold": threshold,
        "runner": runner,
    }
    labelled = np.asarray([lab != "" for lab in rec["labels"]], dtype=bool)
    if labelled.any():
        y = np.asarray([lab == "PNEUMONIA" for lab in np.asarray(rec["labels"])[labelled]], dtype=int)
        point = operating_point(y, probs[labelled], threshold)
        out["labelled_images"] = int(labelled.sum())
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
            out[key] = point[key]
        out["confusion_matrix"] = point["confusion_matrix"]
    return out


def add_timings(metrics: dict, setup_s: float, scoring_s: float, report_s: float) -> dict:
    """Wall time of the job's phases: setup (arguments, model verification, listing), scoring (the
    Beam pipeline, worker start included) and report (reconciliation, metrics, histogram)."""
    wall = setup_s + scoring_s + report_s
    n = metrics["images_found"]
    metrics["wall_seconds"] = round(wall, 3)
    metrics["images_per_second"] = round(n / wall, 2) if wall > 0 else None
    metrics["timings"] = {"setup_seconds": round(setup_s, 3), "scoring_seconds": round(scoring_s, 3),
                          "report_seconds": round(report_s, 3),
                          "scoring_images_per_second": round(n / scoring_s, 2) if scoring_s > 0 else None}
    return metrics


def write_histogram(path: str, probs: np.ndarray, threshold: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(probs, bins=10, range=(0, 1), color="steelblue", edgecolor="white")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("P(pneumonia)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(m: dict) -> str:
    lines = ["# Batch scoring report", "",
             f"Model `{m['model']}`, threshold {m['threshold']:.4f}, runner {m['runner']}, "
             f"{m['wall_seconds']:.1f} s, {m['images_per_second']} images/s.", "",
             "| images found | scored | failed | skipped (in ledger) | positive | positive rate |",
             "|---|---|---|---|---|---|",
             f"| {m['images_found']} | {m['images_scored']} | {m['images_failed']} | {m['images_skipped']} "
             f"| {m['positive_count']} | {m['positive_rate']:.4f} |", "", "## Per input", "",
             "| input | found | scored | failed | skipped |", "|---|---|---|---|---|"]
    lines += [f"| `{k}` | {v['found']} | {v['scored']} | {v['failed']} | {v['skipped']} |"
              for k, v in m["per_input"].items()]
    h = m["probability_histogram"]
    lines += ["", "## Probability histogram", "", "| bin | images |", "|---|---|"]
    lines += [f"| {lo:.1f}–{hi:.1f} | {c} |" for lo, hi, c in zip(h["bin_edges"], h["bin_edges"][1:], h["counts"])]
    lines += ["", "![histogram](histogram.png)"]
    if "accuracy" in m:
        cm = m["confusion_matrix"]
        lines += ["", f"## Against folder labels ({m['labelled_images']} labelled images)", "",
                  "| accuracy | precision | recall | specificity | F1 | ROC AUC |", "|---|---|---|---|---|---|",
                  "| " + " | ".join("n/a" if m[k] is None else f"{m[k]:.4f}" for k in
                                   ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")) + " |",
                  "", "| true \\ predicted | NORMAL | PNEUMONIA |", "|---|---|---|",
                  f"| NORMAL | {cm['tn']} | {cm['fp']} |", f"| PNEUMONIA | {cm['fn']} | {cm['tp']} |"]
    return "\n".join(lines) + "\n"
