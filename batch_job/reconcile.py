"""Reconciliation: every listed image has exactly one row in the shard CSVs, and nothing else does."""
from __future__ import annotations

import glob
import os
from collections import defaultdict

import numpy as np

from batch_job.errors import ReconciliationError
from batch_job.shards import LISTING_FILE, read_listing, read_shard, shard_name


def reconcile(out_dir: str, shards: list[tuple[int, int, int]], inputs: list[str]) -> dict:
    """Count what the shards hold against the listing; gather what the report needs.

    Streams shard by shard: memory holds one shard plus the scored probabilities and labels."""
    listing = os.path.join(out_dir, LISTING_FILE)
    probs, labels, fresh = [], [], []
    per_input = defaultdict(lambda: {"found": 0, "scored": 0, "failed": 0, "skipped": 0})
    found = scored = failed = skipped = missing = duplicated = unexpected = 0
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
            elif row["status"] == "skipped":  # skipped rows carry their earlier probability
                skipped += 1
                counts["skipped"] += 1
            else:
                failed += 1
                counts["failed"] += 1
                continue
            probs.append(float(row["probability"]))
            labels.append(row["label"])
            fresh.append(row["status"] == "ok")
    expected = {shard_name(s) for s, _, _ in shards}
    stray = sorted(name for name in map(os.path.basename, glob.glob(os.path.join(out_dir, "predictions-*.csv")))
                   if name not in expected)
    return {
        "images_found": found, "images_scored": scored, "images_failed": failed, "images_skipped": skipped,
        "missing": missing, "duplicated": duplicated, "unexpected": unexpected, "stray_shards": stray,
        "per_input": dict(per_input), "probabilities": np.asarray(probs, dtype=np.float64), "labels": labels,
        "scored_in_run": np.asarray(fresh, dtype=bool),  # False: skipped through the ledger
        "ok": missing == 0 and duplicated == 0 and unexpected == 0 and not stray
        and found == scored + failed + skipped,
    }


def check(rec: dict) -> None:
    """ReconciliationError (exit 1, nothing published) unless every listed image is accounted for once."""
    if not rec["ok"]:
        raise ReconciliationError(
            f"reconciliation failed: found {rec['images_found']}, scored {rec['images_scored']}, failed "
            f"{rec['images_failed']}, skipped {rec['images_skipped']}, missing {rec['missing']}, duplicated "
            f"{rec['duplicated']}, unexpected {rec['unexpected']}, stray shards {len(rec['stray_shards'])}; "
            "output not published")
