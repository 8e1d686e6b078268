"""Reconciliation: every listed image has exactly one row in the shard CSVs, and nothing else does."""
from __future__ import annotations

import glob
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from batch_job.errors import ReconciliationError
from batch_job.scoring import is_new_name
from batch_job.shards import read_listing, read_shard, shard_name
from batch_job.worklist import unscreened

NEW_NAMES_KEPT = 50  # skipped rows under names new to the ledger kept for report.html (flagged first)


@dataclass(frozen=True)
class Reconciliation:
    """What the shard CSVs hold against the listing, and the scores the report needs."""

    found: int
    scored: int
    failed: int
    skipped: int  # through the ledger: scored by this model on an earlier night
    missing: int
    duplicated: int
    unexpected: int
    stray_shards: list[str]
    per_input: dict[str, dict[str, int]]  # --input -> found, scored, failed, skipped, out_of_scope
    # Of the images scored in this run, in listing order: every figure of the night is theirs (those skipped
    # through the ledger were counted on the night that scored them, and are counted here only as skipped).
    probabilities: np.ndarray  # float64
    labels: list[str]  # their folder labels ("" where none)
    out_of_scope: int = 0  # refused by the input gate: no probability
    skipped_new_name: int = 0  # of the skipped: under a path the ledger had not seen (scoring.is_new_name)
    skipped_new_name_flagged: int = 0  # of those, PNEUMONIA at this run's threshold
    new_name_rows: list[dict] = field(default_factory=list)  # NEW_NAMES_KEPT of them (CSV rows), flagged first
    unscreened: int = 0  # of this run's out-of-scope images: not screened, maybe chest films (worklist.unscreened)

    @property
    def ok(self) -> bool:
        return (self.missing == 0 and self.duplicated == 0 and self.unexpected == 0 and not self.stray_shards
                and self.found == self.scored + self.failed + self.skipped + self.out_of_scope)


def reconcile(out_dir: str, listing: str, shards: list[tuple[int, int, int]], inputs: list[str]) -> Reconciliation:
    """Count what the shards hold against the listing; gather what the report needs.

    Streams shard by shard: memory holds one shard plus the probabilities and labels of the images scored in this
    run."""
    probs, labels = [], []
    per_input = {arg: {"found": 0, "scored": 0, "failed": 0, "skipped": 0, "out_of_scope": 0}
                 for arg in inputs}  # all, even empty
    found = scored = failed = skipped = out_of_scope = missing = duplicated = unexpected = new_names = 0
    new_names_flagged = unscreened_now = 0
    kept: dict[bool, list[dict]] = {True: [], False: []}  # new names, flagged or not, NEW_NAMES_KEPT of each
    for shard_id, offset, count in shards:
        listed = list(read_listing(listing, offset, count))
        found += len(listed)
        path = os.path.join(out_dir, shard_name(shard_id))
        by_path: dict[str, list[dict]] = defaultdict(list)
        for row in read_shard(path) if os.path.exists(path) else []:
            by_path[row["path"]].append(row)
        listed_paths = {p for _, p, _ in listed}
        unexpected += sum(len(v) for k, v in by_path.items() if k not in listed_paths)
        for index, p, _ in listed:
            counts = per_input[inputs[index]]
            counts["found"] += 1
            hits = by_path.get(p, [])
            if not hits:
                missing += 1
                continue
            duplicated += len(hits) - 1
            row = hits[0]
            if row["status"] == "ok":
                scored += 1
                counts["scored"] += 1
                probs.append(float(row["probability"]))
                labels.append(row["label"])
            elif row["status"] == "skipped":  # scored on an earlier night: its figures were that night's
                skipped += 1
                counts["skipped"] += 1
                if is_new_name(row):
                    flagged = row["prediction"] == "PNEUMONIA"
                    new_names += 1
                    new_names_flagged += flagged
                    if len(kept[flagged]) < NEW_NAMES_KEPT:
                        kept[flagged].append(row)
            elif row["status"] == "out_of_scope":
                out_of_scope += 1
                counts["out_of_scope"] += 1
                unscreened_now += unscreened(row["error"])
            else:
                failed += 1
                counts["failed"] += 1
    expected = {shard_name(s) for s, _, _ in shards}
    stray = sorted(name for name in map(os.path.basename, glob.glob(os.path.join(out_dir, "predictions-*.csv")))
                   if name not in expected)
    return Reconciliation(found, scored, failed, skipped, missing, duplicated, unexpected, stray, dict(per_input),
                          np.asarray(probs, dtype=np.float64), labels, out_of_scope, new_names, new_names_flagged,
                          (kept[True] + kept[False])[:NEW_NAMES_KEPT], unscreened_now)


def check(rec: Reconciliation) -> None:
    """ReconciliationError (exit 1, nothing published) unless every listed image is accounted for once."""
    if not rec.ok:
        raise ReconciliationError(
            f"reconciliation failed: found {rec.found}, scored {rec.scored}, failed {rec.failed}, skipped "
            f"{rec.skipped}, out of scope {rec.out_of_scope}, missing {rec.missing}, duplicated {rec.duplicated}, "
            f"unexpected {rec.unexpected}, "
            f"stray shards {len(rec.stray_shards)}; output not published")


def check_counts(rec: Reconciliation, summary_counts: dict[str, int]) -> None:
    """ReconciliationError unless the shards' summaries count what their CSVs hold."""
    in_csv = {"scored": rec.scored, "failed": rec.failed, "skipped": rec.skipped, "out_of_scope": rec.out_of_scope}
    if summary_counts != in_csv:
        raise ReconciliationError(f"reconciliation failed: the shard CSVs hold {in_csv} but the shard summaries "
                                  f"count {summary_counts}; output not published")
