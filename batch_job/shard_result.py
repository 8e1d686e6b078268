"""One result per shard: its CSV (published) and one summary in the job's scratch folder (never published).

A worker scores a shard and writes, inside DoFn.process(), first the summary ``scratch/shard-NNNNN.npz``, then
the shard's CSV ``predictions-NNNNN.csv`` (the CSV marks the shard complete); both atomically, so a retried task
rewrites the same two files. The summary holds what the driver needs besides the CSV rows:

* counts: images scored, failed, skipped (through the ledger) and out of scope (the input gate);
* the shard's top N flagged images scored in this run (probability, path, folder label, heatmap): the run's top N
  lie within the union of the shards' top N (heatmaps.py);
* the shard's drift sample: the images scored in this run with the smallest sample keys, with their embeddings
  (drift_check.py);
* ledger rows: (sha256, probability, path) of every image scored in this run, with a ledger, and the file keys
  (path, size, mtime, ctime, sha256) of every file read in this run (unchanged.py).

The driver reads each summary once (:func:`gather`), keeping the top N flagged, the k smallest sample keys and the
ledger rows: memory holds N + k rows, the ledger rows and one shard's summary. The whole scratch folder is
removed before OUTDIR is published (the one clean-up rule); a killed job's temp dir goes with it. The file is an
npz of plain arrays (read with allow_pickle=False): fixed-size records, no pickled objects.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field

import numpy as np

from batch_job import drift_check, worklist
from batch_job.errors import ReconciliationError
from batch_job.ledger import FileKey
from batch_job.scoring import Row, ScoringSpec
from xray_core.files import atomic_write

SCRATCH = "scratch"  # inside the job's temp dir; removed before publishing


def summary_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.npz"


@dataclass(frozen=True)
class Flagged:
    """A flagged image of this run: its probability (as in the CSV), path, folder label and heatmap (None for
    a model without one); once drawn, its overlay's path under OUT_DIR."""

    probability: float
    path: str
    label: str = ""
    heatmap: np.ndarray | None = None
    png: str = ""
    file_key: tuple[int, int, int] | None = None  # scoring.file_stat before it was scored (None: not checked)
    no_overlay: str = ""  # why no overlay could be drawn (heatmaps.draw), "" otherwise


def rank_key(item: Flagged) -> tuple[float, str]:
    """Highest probability first; ties: the smaller path first."""
    return -item.probability, item.path


def top_flagged(rows: list[Row], n: int) -> list[Flagged]:
    """The n flagged rows scored in this run (status ok) with the highest probability, highest first."""
    found = (Flagged(float(r.probability), r.path, r.label, r.heatmap, file_key=r.file_key) for r in rows
             if r.flagged)
    return heapq.nsmallest(n, found, key=rank_key)


@dataclass(frozen=True)
class ShardSummary:
    scored: int
    failed: int
    skipped: int
    flagged: list[Flagged]
    sample_keys: np.ndarray  # uint64 (m,)
    sample_embeddings: np.ndarray  # float16 (m, D)
    ledger_rows: list[tuple[str, float, str]]  # (sha256, probability, path) of the images scored in this run
    file_keys: list[FileKey] = field(default_factory=list)  # of the files read in this run, with a ledger
    out_of_scope: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (sha256, reason, path), with a ledger
    earlier: dict[str, tuple[int, int]] = field(default_factory=dict)  # earlier_counts


def earlier_counts(rows: list[Row]) -> dict[str, tuple[int, int]]:
    """The skipped images flagged (at this run's threshold) or not screened on an earlier night: run id of that night
    -> (flagged, not screened). Bounded by the nights the ledger holds."""
    out: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.status == "skipped" and r.earlier_run:
            flagged, unscreened = r.prediction == "PNEUMONIA", worklist.unscreened(r.error)
            if flagged or unscreened:
                f, u = out.get(r.earlier_run, (0, 0))
                out[r.earlier_run] = (f + flagged, u + unscreened)
    return out


def summarise(rows: list[Row], spec: ScoringSpec, file_keys: list[FileKey] = ()) -> ShardSummary:
    """What the driver needs of a shard besides its CSV rows."""
    keys, embeddings = drift_check.smallest(rows, spec.drift_sample)
    ledger_rows = [(r.sha256, float(r.probability), r.path) for r in rows if r.status == "ok"] \
        if spec.ledger_path else []
    refused = [(r.sha256, r.error, r.path) for r in rows if r.status == "out_of_scope"] if spec.ledger_path else []
    return ShardSummary(sum(r.status == "ok" for r in rows), sum(r.status == "error" for r in rows),
                        sum(r.status == "skipped" for r in rows), top_flagged(rows, spec.heatmaps), keys, embeddings,
                        ledger_rows, list(file_keys), sum(r.status == "out_of_scope" for r in rows), refused,
                        earlier_counts(rows))


NO_KEY = (-1, -1, -1)  # a flagged image's file_key where there is none (a URI)


def _strings(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=str) if values else np.zeros(0, dtype="<U1")


def write(scratch: str, shard_id: int, s: ShardSummary) -> None:
    maps = [f.heatmap for f in s.flagged if f.heatmap is not None]
    arrays = {
        "counts": np.asarray([s.scored, s.failed, s.skipped, s.out_of_scope], np.int64),
        "flagged_probability": np.asarray([f.probability for f in s.flagged], np.float64),
        "flagged_path": _strings([f.path for f in s.flagged]),
        "flagged_label": _strings([f.label for f in s.flagged]),
        "flagged_key": np.asarray([f.file_key or NO_KEY for f in s.flagged], np.int64).reshape(-1, 3),
        # every flagged image has a map, or none has (a model without a heatmap output)
        "flagged_heatmap": np.stack(maps).astype(np.float32) if len(maps) == len(s.flagged) and maps
        else np.zeros((0, 0, 0), np.float32),
        "sample_keys": s.sample_keys.astype(np.uint64),
        "sample_embeddings": s.sample_embeddings.astype(np.float16),
        "ledger_sha256": _strings([r[0] for r in s.ledger_rows]),
        "ledger_probability": np.asarray([r[1] for r in s.ledger_rows], np.float64),
        "ledger_path": _strings([r[2] for r in s.ledger_rows]),
        "refused_sha256": _strings([r[0] for r in s.refused]),
        "refused_reason": _strings([r[1] for r in s.refused]),
        "refused_path": _strings([r[2] for r in s.refused]),
        "file_path": _strings([k[0] for k in s.file_keys]),
        "file_stat": np.asarray([k[1:4] for k in s.file_keys], np.int64).reshape(-1, 3),  # size, mtime, ctime
        "file_sha256": _strings([k[4] for k in s.file_keys]),
        "earlier_run": _strings(list(s.earlier)),
        "earlier_counts": np.asarray(list(s.earlier.values()), np.int64).reshape(-1, 2),  # flagged, not screened
    }
    atomic_write(os.path.join(scratch, summary_name(shard_id)), lambda f: np.savez(f, **arrays), binary=True)


def read(scratch: str, shard_id: int) -> ShardSummary:
    with np.load(os.path.join(scratch, summary_name(shard_id)), allow_pickle=False) as z:
        maps = z["flagged_heatmap"]
        flagged = [Flagged(float(p), str(path), str(label), maps[i] if len(maps) else None,
                           file_key=None if tuple(key) == NO_KEY else tuple(int(v) for v in key))
                   for i, (p, path, label, key) in enumerate(zip(z["flagged_probability"], z["flagged_path"],
                                                                z["flagged_label"], z["flagged_key"]))]
        ledger_rows = [(str(h), float(p), str(path)) for h, p, path in
                       zip(z["ledger_sha256"], z["ledger_probability"], z["ledger_path"])]
        file_keys = [(str(path), *(int(v) for v in st), str(h)) for path, st, h in
                     zip(z["file_path"], z["file_stat"], z["file_sha256"])]
        scored, failed, skipped, out_of_scope = (int(c) for c in z["counts"])
        refused = [(str(h), str(why), str(path)) for h, why, path in
                   zip(z["refused_sha256"], z["refused_reason"], z["refused_path"])]
        earlier = {str(run): (int(f), int(u)) for run, (f, u) in zip(z["earlier_run"], z["earlier_counts"])}
        return ShardSummary(scored, failed, skipped, flagged, z["sample_keys"], z["sample_embeddings"], ledger_rows,
                            file_keys, out_of_scope, refused, earlier)


@dataclass
class Gathered:
    """All shards' summaries, merged: the run's top N flagged (highest first), its drift sample (the k smallest
    sample keys, in key order) and its ledger rows, and the counts the summaries report."""

    counts: dict[str, int] = field(default_factory=lambda: {"scored": 0, "failed": 0, "skipped": 0,
                                                            "out_of_scope": 0})
    flagged: list[Flagged] = field(default_factory=list)
    sample_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    sample_embeddings: np.ndarray | None = None
    ledger_rows: list[tuple[str, float, str]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    file_keys: list[FileKey] = field(default_factory=list)
    earlier: dict[str, tuple[int, int]] = field(default_factory=dict)  # earlier_counts, summed over the shards


def gather(scratch: str, shards, n_flagged: int, k_sample: int) -> Gathered:
    """Read every shard's summary once, in shard order (ReconciliationError for a shard without one)."""
    out = Gathered()
    for shard_id, _, _ in shards:
        try:
            s = read(scratch, shard_id)
        except FileNotFoundError:
            raise ReconciliationError(f"reconciliation failed: shard {shard_id} has a CSV but no summary; output "
                                      "not published") from None
        for key, value in (("scored", s.scored), ("failed", s.failed), ("skipped", s.skipped),
                           ("out_of_scope", s.out_of_scope)):
            out.counts[key] += value
        out.flagged = heapq.nsmallest(n_flagged, out.flagged + s.flagged, key=rank_key)
        out.sample_keys, out.sample_embeddings = drift_check.keep_smallest(
            out.sample_keys, out.sample_embeddings, s.sample_keys, s.sample_embeddings, k_sample)
        out.ledger_rows.extend(s.ledger_rows)
        out.refused.extend(s.refused)
        out.file_keys.extend(s.file_keys)
        for run, (f, u) in s.earlier.items():
            before = out.earlier.get(run, (0, 0))
            out.earlier[run] = (before[0] + f, before[1] + u)
    return out
