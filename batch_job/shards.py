"""The job's work units on disk: the listing file (in the job's scratch folder), its cut into shards, and each
shard's CSV. Workers write the CSVs; the driver reads them back to reconcile."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
from typing import Iterable, Iterator

from batch_job.scoring import COLUMNS, Row
from xray_core.files import atomic_write

LISTING_FILE = "listing.jsonl"
MAX_SHARD = 2048  # images per shard at most


def shard_name(shard_id: int) -> str:
    return f"predictions-{shard_id:05d}.csv"


def shard_size(requested: int | None, n: int, batch_size: int, workers: int) -> int:
    """--shard-size, else a few shards per worker (balances the tail), whole batches, <= MAX_SHARD."""
    if requested:
        return requested
    size = math.ceil(n / (4 * workers)) if n else batch_size
    return int(min(MAX_SHARD, max(batch_size, math.ceil(size / batch_size) * batch_size)))


def write_listing(path: str, items: Iterable[tuple[int, str, str]]) -> int:
    """Stream (input index, path, folder label) to a JSON-lines file; returns the count."""
    count = 0
    with open(path, "w", encoding="ascii") as f:
        for item in items:
            f.write(json.dumps(list(item)) + "\n")  # ASCII: surrogate-escaped names round-trip
            count += 1
    return count


def cut_listing(path: str, size: int) -> list[tuple[int, int, int]]:
    """Cut the listing into shards: (shard id, byte offset, count); one pass, no paths kept."""
    shards, offset, start, in_shard = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            offset += len(line)
            in_shard += 1
            if in_shard == size:
                shards.append((len(shards), start, in_shard))
                start, in_shard = offset, 0
    if in_shard:
        shards.append((len(shards), start, in_shard))
    return shards


def read_listing(path: str, offset: int = 0, count: int | None = None) -> Iterator[tuple[int, str, str]]:
    """-> (input index, path, folder label) of `count` entries from byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        for n, line in enumerate(f):
            if count is not None and n >= count:
                break
            index, p, label = json.loads(line)
            yield index, p, label


def write_shard(out_dir: str, shard_id: int, rows: list[Row]) -> str:
    """Write one CSV shard atomically (temp file + rename), so a retried task just rewrites it."""
    final = os.path.join(out_dir, shard_name(shard_id))

    def write_csv(f):
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(r.csv_row() for r in rows)

    atomic_write(final, write_csv)
    return final


def read_shard(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: unexpected header {reader.fieldnames}")
        return list(reader)


def remove_partial_files(out_dir: str) -> None:
    """Delete hidden temp files that a killed or retried task left half-written."""
    for path in glob.glob(os.path.join(out_dir, ".*.tmp")):
        os.remove(path)
