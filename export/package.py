"""The serving package: layout, metadata, verification, Triton config, model card.

No TensorFlow here: the batch job imports this module to find and verify a model.

Layout (a valid Triton model repository)::

    serving_models/<name>/config.pbtxt
    serving_models/<name>/<version>/model.onnx
    serving_models/<name>/<version>/metadata.json
    serving_models/<name>/<version>/MODEL_CARD.md
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from xray_core.errors import one_line
from xray_core.labels import CLASSES as CLASS_NAMES  # noqa: F401 - re-exported for the scoring side
from xray_core.files import sha256_file  # noqa: F401 - re-exported

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CARD_FILE = "MODEL_CARD.md"
MAX_BATCH_SIZE = 64
_ONNX_TYPES = {1: "float32"}  # onnx.TensorProto.FLOAT


class PackageError(ValueError):
    """A model package that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def versions(name_dir: str) -> list[int]:
    """Published version numbers under serving_models/<name> (temporary dirs ignored)."""
    if not os.path.isdir(name_dir):
        return []
    return sorted(int(d) for d in os.listdir(name_dir) if d.isdigit() and os.path.isdir(os.path.join(name_dir, d)))


def resolve_version_dir(model_path: str) -> str:
    """serving_models/<name> -> its newest version dir; serving_models/<name>/<v> -> itself."""
    path = os.path.normpath(model_path)
    if os.path.isfile(os.path.join(path, METADATA_FILE)) or os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    found = versions(path)
    if not found:
        if not os.path.exists(path):
            raise PackageError(f"model not found: {model_path}")
        raise PackageError(f"no published version under {model_path} (expected {model_path}/<N>/{MODEL_FILE})")
    return os.path.join(path, str(found[-1]))


def load_metadata(version_dir: str) -> dict:
    path = os.path.join(version_dir, METADATA_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise PackageError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path} is unreadable: {exc}") from None
    missing = [k for k in ("name", "version", "sha256", "preprocessing", "input", "output", "decision_threshold")
               if k not in meta]
    if missing:
        raise PackageError(f"{path} lacks {', '.join(missing)}")
    return meta


def expected_io(image_size: int) -> dict:
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, image_size, image_size, 1]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, 1]},
    }


def _graph_io(value_info) -> dict:
    t = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return {"name": value_info.name, "dtype": _ONNX_TYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}


def model_io(onnx_model) -> tuple[list[dict], list[dict]]:
    """The graph's real inputs and outputs as {name, dtype, shape} (None = dynamic)."""
    inits = {i.name for i in onnx_model.graph.initializer}
    ins = [_graph_io(v) for v in onnx_model.graph.input if v.name not in inits]
    return ins, [_graph_io(v) for v in onnx_model.graph.output]


def verify_package(version_dir: str) -> list[Check]:
    """Every check of `export --verify`; stops at the first failure that blocks the rest."""
    import onnx

    checks: list[Check] = []
    try:
        meta = load_metadata(version_dir)
        checks.append(Check("metadata", True, f"{meta['name']}/{meta['version']}"))
    except PackageError as exc:
        return [Check("metadata", False, str(exc))]
    model_path = os.path.join(version_dir, MODEL_FILE)
    if not os.path.isfile(model_path):
        return checks + [Check("sha256", False, f"{model_path} is missing")]
    digest = sha256_file(model_path)
    checks.append(Check("sha256", digest == meta["sha256"],
                        f"{digest[:16]}… {'matches' if digest == meta['sha256'] else '!= metadata ' + meta['sha256'][:16] + '…'}"))
    if not checks[-1].ok:
        return checks
    try:
        model = onnx.load(model_path)
        onnx.checker.check_model(model)
        checks.append(Check("onnx.checker", True, f"opset {model.opset_import[0].version}"))
    except Exception as exc:  # noqa: BLE001 - any checker failure is a failed check
        return checks + [Check("onnx.checker", False, one_line(exc, 200))]
    try:
        session = load_session(model_path)
        checks.append(Check("onnxruntime", True, "session created"))
    except Exception as exc:  # noqa: BLE001
        return checks + [Check("onnxruntime", False, one_line(exc, 200))]
    ins, outs = model_io(model)
    size = int(meta["preprocessing"]["image_size"])
    want = expected_io(size)
    for key, got in (("input", ins), ("output", outs)):
        ok = got == [want[key]] and meta[key] == _json_io(want[key])
        checks.append(Check(f"{key} contract", ok, f"model {got}, metadata {meta[key]}, expected {_json_io(want[key])}"))
    if not all(c.ok for c in checks):
        return checks
    try:
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((2, size, size, 1), np.float32)})
        ok = out.shape == (2, 1) and out.dtype == np.float32 and bool(np.all((out >= 0) & (out <= 1)))
        checks.append(Check("zero batch", ok, f"output shape {out.shape}, values {out.ravel().round(6).tolist()}"))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("zero batch", False, one_line(exc, 200)))
    return checks


def _json_io(io: dict) -> dict:
    return {"name": io["name"], "dtype": io["dtype"], "shape": [-1 if d is None else d for d in io["shape"]]}


def load_session(model_path: str, intra_op_threads: int = 0):
    """An onnxruntime CPU session with full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])


def triton_config(name: str, image_size: int, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """config.pbtxt for Triton's onnxruntime backend (dims exclude the batch dimension)."""
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {image_size}, {image_size}, 1 ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] }}\n'
        "]\n"
        "version_policy: { latest { num_versions: 1 } }\n"
    )

