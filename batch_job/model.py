"""The model the job scores with: a verified serving package (export/package.py) and its threshold."""
from __future__ import annotations

import os
from dataclasses import dataclass

from batch_job.errors import InputError
from export.package import PackageError, heatmap_hw, load_metadata, resolve_version_dir, verify_package
from export.reference import REFERENCE_FILE
from xray_core.errors import one_line
from xray_core.preprocessing import PreprocessConfig


@dataclass(frozen=True)
class Model:
    path: str  # model.onnx
    model_id: str  # <name>/<version>
    preprocessing: dict
    threshold: float
    heatmap_hw: tuple[int, int] | None = None  # (h, w) of the package's heatmap output; None: it has none
    reference: str | None = None  # the package's verified reference.npz; None: exported before drift checks


def load_model(model_arg: str, threshold_arg: float | None) -> Model:
    """--model (newest version unless one is named) -> Model; every problem is one PackageError line."""
    version_dir = os.path.abspath(resolve_version_dir(model_arg))
    failed = [c for c in verify_package(version_dir) if not c.ok]
    if failed:
        raise PackageError(f"model {version_dir} failed verification: {failed[0].line()}")
    meta = load_metadata(version_dir)
    try:
        PreprocessConfig.from_dict(meta["preprocessing"])
        threshold = float(meta["decision_threshold"] if threshold_arg is None else threshold_arg)
    except (TypeError, ValueError, KeyError) as exc:
        raise PackageError(f"model {version_dir} has unusable metadata: {one_line(exc)}") from None
    if not 0.0 <= threshold <= 1.0:
        raise InputError("--threshold must be in [0, 1]")
    return Model(os.path.join(version_dir, "model.onnx"), f"{meta['name']}/{meta['version']}",
                 meta["preprocessing"], threshold, heatmap_hw(meta),
                 os.path.join(version_dir, REFERENCE_FILE) if "reference" in meta else None)
