"""The model the job scores with: a verified serving package (xray_core/package.py) and its threshold."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from batch_job.errors import InputError
from xray_core.gate import GateSpec
from xray_core.package import CARD_FILE, MODEL_FILE, Metadata, PackageError, load_metadata, resolve_version_dir
from xray_core.quality_floor import below_floor
from xray_core.reference import REFERENCE_FILE
from xray_core.training_data import TrainingData
from xray_core.verify import verify_package

MODEL_ENV = "PNEUMONIA_MODEL"  # the model to use when --model is not given
# The shipped packages, beside the batch_job package in a checkout (an editable install too); the Docker image
# sets MODEL_ENV instead.
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving_models",
                             "pneumonia")


def default_model() -> tuple[str, str]:
    """(the model to use without --model, where that choice comes from): $PNEUMONIA_MODEL, else the shipped one."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    return SHIPPED_MODEL, "the shipped model"


@dataclass(frozen=True)
class Model:
    path: str  # model.onnx
    model_id: str  # <name>/<version>
    preprocessing: dict
    threshold: float
    heatmap_hw: tuple[int, int] | None = None  # (h, w) of the package's heatmap output; None: it has none
    reference: str | None = None  # the package's verified reference.npz; None: exported before drift checks
    gate: GateSpec | None = None  # the content check (xray_core/gate.py); None: header and cheap checks only
    heatmap_method: dict | None = None  # the maps the report shows (xray_core/occlusion.py); None: the graph's
    card: str | None = None  # the package's MODEL_CARD.md, copied into OUT_DIR
    package_threshold: float | None = None  # the package's calibrated threshold, where --threshold set another
    sha256: str = ""  # of model.onnx, as metadata.json records it (verified)
    trained_on: str = TrainingData().population()  # what report.html says the model was trained on
    scoring_sha256: str = ""  # of what decides a ledger row besides the image (scoring_identity)
    below_floor: str = ""  # the package below the quality floor: what it misses and how it was published (else "")


def scoring_identity(meta: Metadata) -> str:
    """sha256 of what decides a ledger row besides the image: model.onnx, the preprocessing and the input gate (its
    limit, its fit's sha256, its orientation and layout checks). Not the threshold: the ledger keeps probabilities and
    refusal reasons, which it does not decide."""
    keyed = {"model.onnx": meta.sha256, "preprocessing": meta.preprocessing, "gate": meta.gate}  # as recorded: a
    # field the code's PreprocessConfig adds later must not make every ledger refuse every package (review)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def load_model(model_arg: str | None, threshold_arg: float | None) -> Model:
    """--model (newest version unless one is named; None: :func:`default_model`) -> Model; every problem is one
    PackageError line."""
    if model_arg is None:
        model_arg, source = default_model()
        try:
            version_dir = os.path.abspath(resolve_version_dir(model_arg))
        except PackageError as exc:
            raise PackageError(f"no --model given and {source} cannot be used: {exc}") from None
    else:
        version_dir = os.path.abspath(resolve_version_dir(model_arg))
    failed = [c for c in verify_package(version_dir) if not c.ok]
    if failed:
        raise PackageError(f"model {version_dir} failed verification: {failed[0].line()}")
    meta = load_metadata(version_dir)
    threshold = meta.decision_threshold if threshold_arg is None else float(threshold_arg)
    if not 0.0 <= threshold <= 1.0:
        raise InputError("--threshold must be in [0, 1]")
    card = os.path.join(version_dir, CARD_FILE)
    return Model(os.path.join(version_dir, MODEL_FILE), meta.model_id, meta.preprocessing, threshold,
                 meta.heatmap_hw, os.path.join(version_dir, REFERENCE_FILE) if meta.reference is not None else None,
                 GateSpec.from_dict(meta.gate) if meta.gate else None, meta.heatmap_method,
                 card if os.path.isfile(card) else None,
                 None if threshold == meta.decision_threshold else meta.decision_threshold, meta.sha256,
                 TrainingData.from_dict(meta.training_data).population(), scoring_identity(meta),
                 below_floor(meta.quality_floor, meta.site_calibration, meta.test_metrics))
