"""Heatmaps of the run's top N flagged images: chosen per shard by the workers, merged by the driver.

Worker (inside DecodeScoreWrite's process()): the shard's N flagged (PNEUMONIA) images scored in this run
with the highest probability (ties: the smaller path first), with their class-activation maps, go to a sidecar
``_heatmaps-NNNNN.jsonl`` written atomically before the shard's CSV (the CSV marks the shard complete). The
run's top N lie within the union of the shards' top N, so the driver reads at most N per shard.

Driver (after reconciliation): merges the sidecars, re-reads and decodes only the chosen originals to draw
their overlays (overlay.py) as ``heatmaps/RRRR-<sha1 of the path>.png``, fills the ``heatmap`` column of the
shards concerned (each CSV rewritten atomically, in the temp dir, before publishing) and removes the sidecars.
Images skipped through the ledger were not scored in this run and get none.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import numpy as np

from batch_job import overlay
from batch_job import shards as shard_files
from batch_job.scoring import read_input
from xray_core.errors import one_line
from xray_core.files import atomic_write

LOG = logging.getLogger("batch_job")
FOLDER = "heatmaps"
DRAW_THREADS = 4  # Pillow decodes, resizes and encodes with the GIL released


@dataclass(frozen=True)
class Flagged:
    """A flagged image of this run: its probability (as in the CSV), path, folder label and heatmap (None for
    a model without one); the shard that holds its row, and once drawn its overlay's path under OUT_DIR."""

    probability: float
    path: str
    label: str = ""
    heatmap: np.ndarray | None = None
    shard_id: int = -1
    png: str = ""


def rank_key(item: Flagged) -> tuple[float, str]:
    return -item.probability, item.path


def top_flagged(records: Iterable[dict], n: int) -> list[Flagged]:
    """The n flagged records scored in this run (status ok) with the highest probability, highest first."""
    found = (Flagged(float(r["probability"]), r["path"], r["label"], r.get("heatmap_array"))
             for r in records if r["status"] == "ok" and r["prediction"] == "PNEUMONIA")
    return heapq.nsmallest(n, found, key=rank_key)


def sidecar_name(shard_id: int) -> str:
    return f"_heatmaps-{shard_id:05d}.jsonl"


def write_sidecar(out_dir: str, shard_id: int, items: list[Flagged]) -> None:
    """One JSON line per image: [probability, path, label, heatmap as nested lists or null] (atomic)."""
    atomic_write(os.path.join(out_dir, sidecar_name(shard_id)), lambda f: f.writelines(
        json.dumps([i.probability, i.path, i.label, None if i.heatmap is None else
                    np.asarray(i.heatmap, np.float32).tolist()]) + "\n" for i in items))


def read_sidecars(out_dir: str, shards) -> Iterator[Flagged]:
    for shard_id, _, _ in shards:
        path = os.path.join(out_dir, sidecar_name(shard_id))
        if not os.path.exists(path):  # a shard written without heatmaps (n = 0)
            continue
        with open(path, encoding="ascii") as f:
            for line in f:
                p, image, label, heat = json.loads(line)
                yield Flagged(p, image, label, None if heat is None else np.asarray(heat, np.float32), shard_id)


def png_name(rank: int, path: str) -> str:
    """A safe file name whatever the image's name: its rank and a digest of its path."""
    return f"{rank:04d}-{hashlib.sha1(os.fsencode(path)).hexdigest()[:12]}.png"


def draw(out_dir: str, item: Flagged, rank: int, preprocessing: dict) -> Flagged:
    """Write the item's overlay under out_dir/heatmaps; -> the item with its relative png path ("" and a warning
    when the original can no longer be read or decoded)."""
    rel = f"{FOLDER}/{png_name(rank, item.path)}"
    try:
        overlay.save_png(overlay.render(read_input(item.path), item.heatmap, preprocessing),
                         os.path.join(out_dir, rel))
    except Exception as exc:  # noqa: BLE001 - the image changed or vanished since it was scored: no heatmap
        LOG.warning("no heatmap for %s: %s", item.path, one_line(exc, 200))
        return item
    return replace(item, png=rel)


def fill_column(out_dir: str, items: list[Flagged]) -> None:
    """Write each drawn overlay's path into the `heatmap` column of its row; only the shards concerned."""
    by_shard: dict[int, dict[str, str]] = defaultdict(dict)
    for item in items:
        if item.png:
            by_shard[item.shard_id][item.path] = item.png
    for shard_id, pngs in sorted(by_shard.items()):
        rows = shard_files.read_shard(os.path.join(out_dir, shard_files.shard_name(shard_id)))
        for row in rows:
            row["heatmap"] = pngs.get(row["path"], row["heatmap"])
        shard_files.write_shard(out_dir, shard_id, rows)


def make_heatmaps(out_dir: str, shards, n: int, preprocessing: dict) -> list[Flagged]:
    """The driver's step: the run's top n flagged images, highest first, their overlays drawn where the model
    gave heatmaps and the CSVs filled in; the sidecars removed."""
    if n <= 0:
        return []
    chosen = heapq.nsmallest(n, read_sidecars(out_dir, shards), key=rank_key)
    for shard_id, _, _ in shards:
        sidecar = os.path.join(out_dir, sidecar_name(shard_id))
        if os.path.exists(sidecar):
            os.remove(sidecar)
    if any(item.heatmap is not None for item in chosen):
        os.makedirs(os.path.join(out_dir, FOLDER), exist_ok=True)
        with ThreadPoolExecutor(max(1, min(DRAW_THREADS, os.cpu_count() or 1, len(chosen)))) as pool:
            chosen = list(pool.map(lambda ranked: draw(out_dir, ranked[1], ranked[0], preprocessing)
                                   if ranked[1].heatmap is not None else ranked[1], enumerate(chosen, 1)))
        fill_column(out_dir, chosen)
    return chosen


def summary(chosen: list[Flagged], n: int, model_has_heatmaps: bool) -> dict:
    """metrics.json's `heatmaps`."""
    return {"requested": n, "model_has_heatmaps": model_has_heatmaps, "flagged_listed": len(chosen),
            "written": sum(bool(i.png) for i in chosen)}
