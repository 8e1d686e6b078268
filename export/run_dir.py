"""What export reads of a training run (`python -m train`'s RUN_DIR): its JSON files, and whether the images its
split.csv lists are still the ones it trained on."""
from __future__ import annotations

import csv
import json
import os

from train.data import read_split_digests
from xray_core.files import content_key


class ExportInputError(ValueError):
    """Bad export input (exit 2); the message is one line."""


METRICS_KEYS = ("preprocessing", "chosen_threshold", "target_recall")  # what export reads of a model's metrics.json


def read_run(run_dir: str, model: str) -> tuple[str, dict, dict, dict]:
    """-> (model name, its metrics.json, the run's comparison.json, its run.json); ExportInputError (exit 2) before
    any work for a run that is not complete."""
    if not os.path.isdir(run_dir):
        raise ExportInputError(f"run dir not found: {run_dir}")
    try:
        with open(os.path.join(run_dir, "comparison.json")) as f:
            comparison = json.load(f)
    except PermissionError as exc:  # train writes RUN_DIR for its owner and group only (xray_core.files)
        raise ExportInputError(f"{run_dir}/comparison.json is not readable: {exc.strerror} (train writes its run "
                               "for the owner and group only)") from None
    except (OSError, ValueError):
        raise ExportInputError(f"{run_dir} has no readable comparison.json (is it a `python -m train` run?)") from None
    try:
        name = comparison["best"] if model == "best" else model
        trained = [r["model"] for r in comparison["models"]]
    except (KeyError, TypeError):
        raise ExportInputError(f"{run_dir}/comparison.json lacks 'best' or 'models'") from None
    for needed in ("run.json", "split.csv"):
        if not os.path.isfile(os.path.join(run_dir, needed)):
            raise ExportInputError(f"{run_dir}/{needed} is missing (is it a complete `python -m train` run?)")
    if name not in trained:
        raise ExportInputError(f"model {name!r} is not in run {run_dir} (it has {', '.join(trained)})")
    try:
        with open(os.path.join(run_dir, name, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        raise ExportInputError(f"{run_dir}/{name}/metrics.json is missing or unreadable") from None
    missing = [key for key in METRICS_KEYS if key not in metrics] if isinstance(metrics, dict) else METRICS_KEYS
    if missing:
        raise ExportInputError(f"{run_dir}/{name}/metrics.json lacks {', '.join(missing)}")
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            run_info = json.load(f)
    except (OSError, ValueError):
        raise ExportInputError(f"{run_dir}/run.json is unreadable (not JSON)") from None
    return name, metrics, comparison, run_info


def changed_since_training(run_dir: str) -> None:
    """ExportInputError (exit 2, before any work) when an image of the run's split.csv is missing or no longer holds
    the content train recorded for it: the parity images, the drift reference (validation split) and the input gate
    (training split) would be computed from other images than the model was trained and validated on. Runs from
    before split.csv recorded contents (2026-12-03) are not checked."""
    try:
        recorded = read_split_digests(os.path.join(run_dir, "split.csv"))
    except (OSError, csv.Error) as exc:
        raise ExportInputError(f"{run_dir}/split.csv cannot be read: {exc}") from None
    changed = [path for path, digest in recorded.items() if content_key(path) != digest]
    if changed:
        raise ExportInputError(f"{len(changed)} of {len(recorded)} images of {run_dir}/split.csv are missing or have "
                               f"changed since the run trained (first: {changed[0]}): its drift reference and input "
                               "gate would be built from other images; export from the data the run trained on, or "
                               "train again; nothing published")
