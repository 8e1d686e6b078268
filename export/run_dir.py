"""What export reads of a training run (`python -m train`'s RUN_DIR): its JSON files, and whether the images its
split.csv lists are still the ones it trained on."""
from __future__ import annotations

import csv
import json
import os

from train.data import DataError, find_examples, read_split_digests
from xray_core.errors import one_line
from xray_core.files import content_key


class ExportInputError(ValueError):
    """Bad export input (exit 2); the message is one line."""


# what export reads of a model's metrics.json (QA: one without test_at_chosen failed with a KeyError after conversion)
METRICS_KEYS = ("preprocessing", "chosen_threshold", "target_recall", "val_roc_auc", "test_at_0.5", "test_at_chosen")


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


def changed_since_training(run_dir: str, run_info: dict, comparison: dict, log=print) -> dict[str, str]:
    """ExportInputError (exit 2, before any work) when an image of the run's split.csv is missing or no longer holds
    the content train recorded for it, or when its data folder holds images the run did not find (added since): the
    parity images, the drift reference (validation split), the input gate (training split) and the training split's
    digest would come from other images than the model was trained and validated on. Runs from before split.csv
    recorded contents (2026-12-02) are not checked, and said so. -> the contents verified (path -> sha256; {} for
    those runs)."""
    try:
        recorded = read_split_digests(os.path.join(run_dir, "split.csv"))
    except (OSError, csv.Error) as exc:
        raise ExportInputError(f"{run_dir}/split.csv cannot be read: {one_line(exc)}") from None
    if not recorded:
        log(f"{run_dir}/split.csv records no image contents (a run from before 2026-12-02): its images are not "
            "checked against what it trained on")
        return {}
    missing = [path for path in recorded if not os.path.lexists(path)]
    gone = set(missing)
    changed = [path for path, digest in recorded.items() if path not in gone and content_key(path) != digest]
    if missing or changed:
        moved = " (the data moved, or is mounted elsewhere?)" if len(missing) == len(recorded) else ""
        first = (changed or missing)[0]
        raise ExportInputError(f"{len(missing)} missing and {len(changed)} changed of the {len(recorded)} images of "
                               f"{run_dir}/split.csv since the run trained{moved} (first: {first!r}): its drift "
                               "reference and input gate would be built from other images; export from the data the "
                               "run trained on, or train again; nothing published")
    added = added_images(run_info, comparison, set(recorded))
    if added:
        raise ExportInputError(f"{len(added)} images in {run_info['data_dir']} were added since the run trained "
                               f"(first: {added[0]!r}): the training split's digest would count them, and a later "
                               "--add-gate --training-dir fit the gate on them; export from the data the run trained "
                               "on, or train again; nothing published")
    return recorded


def added_images(run_info: dict, comparison: dict, listed: set[str]) -> list[str]:
    """Images train's folder rule finds in the run's data folder now that it neither split nor skipped; [] for a run on
    a subset (--limit-per-class: the folder holds more by design) or a folder that cannot be listed (the checks of the
    listed images have said what is missing)."""
    data_dir = run_info.get("data_dir")
    if not data_dir or (run_info.get("args") or {}).get("limit_per_class"):
        return []
    skipped = {row.get("path") for row in comparison.get("skipped_images") or [] if isinstance(row, dict)}
    try:
        found = find_examples(data_dir)
    except (DataError, OSError):
        return []
    return [e.path for e in found if e.path not in listed and e.path not in skipped]
