"""Heatmap overlays of the run's top N flagged images, and their index ``heatmaps/index.csv``.

The workers chose each shard's top N flagged images with their class-activation maps (shard_result.py); the
driver merged them into the run's top N. Here the chosen originals are read and decoded once more (none that
changed since it was scored: its size, mtime and ctime then and now), at the overlay's size (overlay.py: at most
512 px, more than the model's input), and drawn as ``heatmaps/RRRR-<sha1 of the path>.png``.
``heatmaps/index.csv`` (rank, path, probability, label, heatmap) lists every chosen image, highest first, with its
overlay's path relative to OUT_DIR ("" where none could be drawn). Images skipped through the ledger were not
scored in this run and get none.

Where the package's `heatmap_method` is occlusion (xray_core/occlusion.py), the maps drawn are not the graph's:
each chosen image is preprocessed again and its k x k occlusion map computed here, k*k passes of the network per
image (the workers are done by then; the job draws the heatmaps beside its figures and drift step, so they get all
cores but one): at most N * k * k passes whatever the run's size.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from batch_job import overlay
from batch_job.scoring import get_session, read_input, read_unchanged
from batch_job.shard_result import Flagged
from xray_core.dicom_header import DEFAULT_MODALITIES, header_problem, is_dicom, read_dicom_header
from xray_core.errors import one_line
from xray_core.occlusion import OCCLUSION, HeatmapMethod, occlusion_maps
from xray_core.preprocessing import ImageError, PreprocessConfig, preprocess_image

LOG = logging.getLogger("batch_job")
FOLDER = "heatmaps"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("rank", "path", "probability", "label", "heatmap")
DRAW_THREADS = 4  # Pillow decodes, resizes and encodes with the GIL released


def png_name(rank: int, path: str) -> str:
    """A safe file name whatever the image's name: its rank and a digest of its path."""
    return f"{rank:04d}-{hashlib.sha1(os.fsencode(path)).hexdigest()[:12]}.png"


def draw(out_dir: str, item: Flagged, rank: int, preprocessing: dict) -> Flagged:
    """Write the item's overlay under out_dir/heatmaps; -> the item with its relative png path, or, when the original
    can no longer be read or decoded, with why not (no_overlay) and a warning."""
    rel = f"{FOLDER}/{png_name(rank, item.path)}"
    try:
        picture = overlay.render(read_unchanged(item.path, item.file_key), item.heatmap, preprocessing)
    except Exception as exc:  # noqa: BLE001 - the image changed or vanished since it was scored: no heatmap
        # by rank, never by name: file names can identify patients (docs/operations.md, "Who reads OUT_DIR")
        reason = one_line(exc, 200).replace(item.path, "<path>")
        LOG.warning("no heatmap for flagged image %d (heatmaps/index.csv): %s", rank, reason)
        return replace(item, no_overlay=reason)
    overlay.save_png(picture, os.path.join(out_dir, rel))  # a failed write (a full disk) fails the job: no half output
    return replace(item, png=rel)


def write_index(out_dir: str, items: list[Flagged]) -> None:
    with open(os.path.join(out_dir, FOLDER, INDEX_FILE), "w", newline="", encoding="utf-8",
              errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows((rank, i.path, f"{i.probability:.8f}", i.label, i.png) for rank, i in enumerate(items, 1))


def with_occlusion_maps(chosen: list[Flagged], model_path: str, preprocessing: dict, grid: int,
                        threads: int = 0) -> list[Flagged]:
    """The chosen images with their occlusion maps in place of the graph's (an image that can no longer be read
    keeps its map; draw() then says so)."""
    config = PreprocessConfig.from_dict(preprocessing)
    session = get_session(model_path, threads)  # the workers' own where they ran here on as many threads
    out = []
    for item in chosen:
        try:
            x = preprocess_image(read_unchanged(item.path, item.file_key), config)[np.newaxis]
        except Exception:  # noqa: BLE001 - vanished or changed since it was scored: draw() warns, by rank
            out.append(item)
            continue
        out.append(replace(item, heatmap=occlusion_maps(session, x, grid, np.array([item.probability]))[0]))
    return out


def make_heatmaps(out_dir: str, chosen: list[Flagged], preprocessing: dict, model_path: str = "",
                  method: HeatmapMethod = HeatmapMethod(), threads: int = 0) -> list[Flagged]:
    """Overlays of the chosen images (highest first) where the model gave heatmaps, and their index;
    -> the images with their overlays' paths. `threads`: the cores to use (onnxruntime's threads for the occlusion maps,
    and at most DRAW_THREADS drawing the overlays; 0: every core)."""
    if not any(item.heatmap is not None for item in chosen):
        return chosen
    if method.name == OCCLUSION:
        chosen = with_occlusion_maps(chosen, model_path, preprocessing, method.grid, threads)
    os.makedirs(os.path.join(out_dir, FOLDER), exist_ok=True)
    with ThreadPoolExecutor(max(1, min(DRAW_THREADS, threads or os.cpu_count() or 1, len(chosen)))) as pool:
        chosen = list(pool.map(lambda ranked: draw(out_dir, ranked[1], ranked[0], preprocessing)
                               if ranked[1].heatmap is not None else ranked[1], enumerate(chosen, 1)))
    write_index(out_dir, chosen)
    return chosen



OUT_OF_SCOPE_FOLDER = "out_of_scope"
THUMBNAIL_SIDE = 160


def draw_thumbnails(out_dir: str, entries, preprocessing: dict,
                    modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> dict[str, str]:
    """Small grayscale thumbnails of the first out-of-scope images (rank, worklist entry) for report.html, as
    ``out_of_scope/RRRR-<digest>.png``; -> path -> thumbnail ("" where the image is not shown: a DICOM file its
    header refuses (under `modalities`, as scoring did) is never decoded, here either, and one that cannot be)."""
    shown = {}
    for rank, entry in entries:
        rel = f"{OUT_OF_SCOPE_FOLDER}/{png_name(rank, entry.path)}"
        try:
            data = read_input(entry.path)
            if is_dicom(data) and header_problem(read_dicom_header(data), modalities):
                raise ImageError("refused by its header: its pixels are not decoded")
            img = overlay.display_image(data, preprocessing)
            img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        except Exception:  # noqa: BLE001 - the reason stays in the table; the picture is a courtesy
            shown[entry.path] = ""
            continue
        os.makedirs(os.path.join(out_dir, OUT_OF_SCOPE_FOLDER), exist_ok=True)
        overlay.save_png(img, os.path.join(out_dir, rel))  # a failed write (a full disk) fails the job
        shown[entry.path] = rel
    return shown
