"""The model package contract, shared by export (which writes packages) and the batch job (which reads them).

No TensorFlow here. A package is one version folder of a Triton model repository::

    serving_models/<name>/config.pbtxt
    serving_models/<name>/<version>/model.onnx        the graph (contract below)
    serving_models/<name>/<version>/metadata.json     :class:`Metadata`
    serving_models/<name>/<version>/MODEL_CARD.md
    serving_models/<name>/<version>/reference.npz, splits.csv   drift reference (xray_core/reference.py)

The graph's interface: input ``image`` (N, S, S, 1) float32 in [0, 1], S fixed and recorded in the metadata's
preprocessing; outputs ``probability`` (N, 1) = P(pneumonia), and where the model has them ``heatmap`` (N, h, w)
(class-activation map) and ``embedding`` (N, D) (pooled features). :func:`score` is the one way anything runs a
package's graph: the batch job, export's calibration, parity and faithfulness checks, and the drift reference.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xray_core.preprocessing import PreprocessConfig

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
HEATMAP_NAME = "heatmap"
EMBEDDING_NAME = "embedding"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CARD_FILE = "MODEL_CARD.md"
MAX_BATCH_SIZE = 64


class PackageError(ValueError):
    """A model package that cannot be used; the message is one line."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (None: a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(str(data["name"]), str(data["dtype"]), tuple(None if d in (-1, None) else int(d)
                                                                 for d in data["shape"]))

    def to_json(self) -> dict:
        """As metadata.json writes it: a dynamic dimension is -1."""
        return {"name": self.name, "dtype": self.dtype, "shape": [-1 if d is None else d for d in self.shape]}


def expected_io(image_size: int, heatmap_hw: tuple[int, int] | None = None,
                embedding_dim: int | None = None) -> dict[str, TensorSpec]:
    """The contract's tensors for an input size and the outputs a model has, keyed as in metadata.json."""
    io = {"input": TensorSpec(INPUT_NAME, "float32", (None, image_size, image_size, 1)),
          "output": TensorSpec(OUTPUT_NAME, "float32", (None, 1))}
    if heatmap_hw:
        io["heatmap_output"] = TensorSpec(HEATMAP_NAME, "float32", (None, *heatmap_hw))
    if embedding_dim:
        io["embedding_output"] = TensorSpec(EMBEDDING_NAME, "float32", (None, embedding_dim))
    return io


REQUIRED = ("name", "version", "sha256", "preprocessing", "input", "output", "decision_threshold")
_SPECS = ("input", "output", "heatmap_output", "embedding_output")


@dataclass(frozen=True, kw_only=True)
class Metadata:
    """metadata.json of a published version. The contract the batch job relies on: name, version, sha256 (of
    model.onnx), preprocessing, the tensors, decision_threshold and reference; the rest records where the version
    came from and what export checked (None: not recorded, as in versions exported before that field existed).
    Field order is the file's key order."""

    name: str
    version: int
    architecture: str | None = None
    source: dict | None = None  # run dir, train and export commands, seed, split
    training_data: dict | None = None  # xray_core/training_data.py; None: not recorded (exported before the field)
    preprocessing: dict  # PreprocessConfig.to_dict()
    input: TensorSpec
    output: TensorSpec
    heatmap_output: TensorSpec | None = None
    heatmap: dict | None = None  # export's heatmap parity and faithfulness figures
    heatmap_method: dict | None = None  # the maps the batch job draws (xray_core/occlusion.py); None: the graph's
    embedding_output: TensorSpec | None = None
    reference: dict | None = None  # reference.npz's summary (xray_core/reference.py); None: no drift reference
    gate: dict | None = None  # the input gate's statistic and limit (xray_core/gate.py GateSpec); None: no gate
    class_names: list | None = None
    decision_threshold: float
    threshold_source: str | None = None
    validation_threshold: float | None = None
    target_recall: float | None = None
    val_roc_auc: float | None = None
    test_metrics: dict | None = None
    site_calibration: dict | None = None
    quality_floor: dict | None = None  # export's check of the figures above (xray_core/quality_floor.py)
    parity: dict | None = None
    versions: dict | None = None
    opset: int | None = None
    sha256: str
    created_utc: str | None = None

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocessing)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    @property
    def heatmap_hw(self) -> tuple[int, int] | None:
        """(h, w) of the heatmap output; None for a package without one."""
        return (int(self.heatmap_output.shape[1]), int(self.heatmap_output.shape[2])) if self.heatmap_output else None

    @property
    def embedding_dim(self) -> int | None:
        """D of the embedding output; None for a package without one."""
        return int(self.embedding_output.shape[1]) if self.embedding_output else None

    @classmethod
    def from_dict(cls, data: dict, where: str = "metadata") -> "Metadata":
        """PackageError (one line) for missing contract keys or values of the wrong kind."""
        if not isinstance(data, dict):
            raise PackageError(f"{where} is not a JSON object")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise PackageError(f"{where} lacks {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        try:
            for key in _SPECS:
                if values.get(key) is not None:
                    values[key] = TensorSpec.from_json(values[key])
                    if None in values[key].shape[1:]:
                        raise ValueError(f"{key} has a dynamic dimension besides the batch: {data[key]['shape']}")
            values["version"] = int(values["version"])
            values["decision_threshold"] = float(values["decision_threshold"])
            if not 0.0 <= values["decision_threshold"] <= 1.0:  # NaN too
                raise ValueError(f"decision_threshold {values['decision_threshold']} is not in [0, 1]")
            PreprocessConfig.from_dict(values["preprocessing"])
        except (TypeError, ValueError, KeyError) as exc:
            raise PackageError(f"{where} has unusable values: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """metadata.json's content: fields in order, tensors as JSON, provenance left out where not recorded."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name not in REQUIRED:
                continue
            out[f.name] = value.to_json() if isinstance(value, TensorSpec) else value
        return out


def versions(name_dir: str) -> list[int]:
    """Published version numbers under serving_models/<name> (temporary dirs ignored)."""
    if not os.path.isdir(name_dir):
        return []
    return sorted(int(d) for d in os.listdir(name_dir) if d.isdecimal() and os.path.isdir(os.path.join(name_dir, d)))


def _is_version_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE)) or os.path.isfile(os.path.join(path, MODEL_FILE))


def model_names(serving_dir: str) -> list[str]:
    """The model names of a serving folder: its subfolders holding at least one published version."""
    if not os.path.isdir(serving_dir):
        return []
    return sorted(d for d in os.listdir(serving_dir) if versions(os.path.join(serving_dir, d)))


PACKAGE_FORMS = (f"serving_models (holding one model), serving_models/<name>, serving_models/<name>/<version> "
                 f"or its {MODEL_FILE}")


def new_version_dir(serving_dir: str, name: str, version: int | None = None) -> str:
    """serving_dir/name/<version> for a version about to be published (default: the newest + 1); PackageError (one
    line) for a version < 1 or one that exists: versions are never overwritten."""
    name_dir = os.path.join(serving_dir, name)
    existing = versions(name_dir)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if version < 1:
        raise PackageError("--version must be >= 1")
    final = os.path.join(name_dir, str(version))
    if os.path.exists(final):
        raise PackageError(f"{final} already exists; versions are never overwritten")
    return final


def resolve_version_dir(model_path: str) -> str:
    """What --model may name -> the version folder to load (PackageError, one line, for anything else):

    * ``serving_models/<name>/<version>/model.onnx`` or ``serving_models/<name>/<version>``: that version;
    * ``serving_models/<name>``: its newest version;
    * ``serving_models``, when it holds exactly one model name: that model's newest version.
    """
    path = os.path.normpath(model_path)
    if not os.path.exists(path):
        raise PackageError(f"model not found: {model_path}")
    if os.path.isfile(path):
        if os.path.basename(path) == MODEL_FILE:
            return os.path.dirname(path) or "."
        raise PackageError(f"{model_path} is a file but not a package's {MODEL_FILE}; --model takes "
                           f"{PACKAGE_FORMS}")
    if _is_version_dir(path):
        return path
    found = versions(path)
    if found:
        return os.path.join(path, str(found[-1]))
    names = model_names(path)
    if len(names) == 1:
        return os.path.join(path, names[0], str(versions(os.path.join(path, names[0]))[-1]))
    if names:
        raise PackageError(f"{model_path} holds {len(names)} models ({', '.join(names)}); name one: "
                           f"{os.path.join(model_path, names[0])}")
    raise PackageError(f"no published model under {model_path}; --model takes {PACKAGE_FORMS}")


def load_metadata(version_dir: str) -> Metadata:
    path = os.path.join(version_dir, METADATA_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PackageError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path} is unreadable: {exc}") from None
    return Metadata.from_dict(data, path)


def write_metadata(path: str, meta: Metadata) -> None:
    with open(path, "w") as f:
        json.dump(meta.to_dict(), f, indent=2)


def open_session(model_path: str, intra_op_threads: int = 0):
    """An onnxruntime CPU session with full graph optimisation (0 threads: onnxruntime's default, one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Outputs:
    """What :func:`score` computed for N images: probability (N,) float32, and where asked for the heatmaps
    (N, h, w) and embeddings (N, D), float32."""

    probability: np.ndarray
    heatmap: np.ndarray | None = None
    embedding: np.ndarray | None = None


def score(session, images: np.ndarray, heatmap: bool = False, embedding: bool = False,
          batch_size: int = MAX_BATCH_SIZE) -> Outputs:
    """Run the graph on preprocessed images (N, S, S, 1) float32, batch_size at a time; -> the outputs asked for."""
    names = [OUTPUT_NAME] + [HEATMAP_NAME] * heatmap + [EMBEDDING_NAME] * embedding
    parts = [session.run(names, {INPUT_NAME: images[i:i + batch_size]}) for i in range(0, len(images), batch_size)]
    if not parts:
        return Outputs(np.zeros(0, np.float32))
    joined = dict(zip(names, (np.concatenate(arrays) for arrays in zip(*parts))))
    return Outputs(joined[OUTPUT_NAME].reshape(-1), joined.get(HEATMAP_NAME), joined.get(EMBEDDING_NAME))
