"""The job's work units on disk: the listing file (in the job's scratch folder), its cut into shards, and each
shard's CSV. Workers write the CSVs; the driver reads them back to reconcile."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import math
import os
from typing import Iterable, Iterator

from batch_job.errors import InputError
from batch_job.listing import input_root, iter_images, read_as_dicom
from batch_job.scoring import COLUMNS, Row
from xray_core.files import atomic_write
from xray_core.labels import label_from_path

LISTING_FILE = "listing.jsonl"
MAX_SHARD = 2048  # images per shard at most
MIN_SMALL_SHARD = 8  # images per shard at least, where a night is cut below whole batches
LOG = logging.getLogger("batch_job")


def shard_name(shard_id: int) -> str:
    return f"predictions-{shard_id:05d}.csv"


def shard_size(requested: int | None, n: int, batch_size: int, workers: int) -> int:
    """--shard-size, else a few shards per worker (balances the tail), whole batches, <= MAX_SHARD. A night of fewer
    than 4 batches a worker is cut into 4 shards a worker of part of a batch each, MIN_SMALL_SHARD files at least:
    every worker gets some (QA: 60 compressed DICOM files, 0.5-0.8 s each, were one shard of 64, scored by one
    worker), and a many-core machine does not cut 100 JPEGs into 50 shards of 2 (review)."""
    if requested:
        return requested
    size = math.ceil(n / (4 * workers)) if n else batch_size
    if size < batch_size:
        return min(batch_size, max(MIN_SMALL_SHARD, size))
    return int(min(MAX_SHARD, math.ceil(size / batch_size) * batch_size))


def list_images(args: argparse.Namespace, scratch: str, workers: int) -> tuple[str, list, int]:
    """Stream every image path (and its folder label) to the listing file; cut it into shards. -> (the listing, the
    shards, how many of the files are read as DICOM)."""
    listing = os.path.join(scratch, LISTING_FILE)
    roots = [input_root(arg) for arg in args.input]
    dicom = 0

    def found():
        nonlocal dicom
        for index, path in iter_images(args.input):
            dicom += read_as_dicom(path)
            yield index, path, label_from_path(path, roots[index])

    n = write_listing(listing, found())
    if n == 0:
        if args.fail_if_empty:
            raise InputError("no image files (JPEG, PNG, DICOM or another image format) found in "
                             f"{', '.join(args.input)} (--fail-if-empty)")
        LOG.info("no image files found in %s: a quiet night (--fail-if-empty makes this exit 2)",
                 ", ".join(args.input))
        return listing, [(0, 0, 0)], 0  # one empty shard: its CSV is the header alone
    size = shard_size(args.shard_size, n, args.batch_size, workers)
    return listing, cut_listing(listing, size), dicom


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
