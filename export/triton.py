"""The serving package: layout, metadata, verification, Triton config, model card.

No TensorFlow here: the batch job imports this module to find and verify a model.

Layout (a valid Triton model repository)::

    serving_models/<name>/config.pbtxt
    serving_models/<name>/<version>/model.onnx
    serving_models/<name>/<version>/metadata.json
    serving_models/<name>/<version>/MODEL_CARD.md
    serving_models/<name>/<version>/reference.npz, splits.csv  (drift reference, export/reference.py)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from xray_core.errors import one_line
from xray_core.files import sha256_file  # noqa: F401 - re-exported

INPUT_NAME = "image"
OUTPUT_NAME = "probability"
HEATMAP_NAME = "heatmap"  # optional second output: class-activation map (N, h, w)
EMBEDDING_NAME = "embedding"  # optional third output: pooled features (N, D), for the drift check
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


def expected_io(image_size: int, heatmap_hw: tuple[int, int] | None = None, embedding_dim: int | None = None) -> dict:
    io = {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, image_size, image_size, 1]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, 1]},
    }
    if heatmap_hw:
        io["heatmap_output"] = {"name": HEATMAP_NAME, "dtype": "float32", "shape": [None, *heatmap_hw]}
    if embedding_dim:
        io["embedding_output"] = {"name": EMBEDDING_NAME, "dtype": "float32", "shape": [None, embedding_dim]}
    return io


def heatmap_hw(meta: dict) -> tuple[int, int] | None:
    """(h, w) of the package's heatmap output, or None for a package without one."""
    heat = meta.get("heatmap_output")
    return (int(heat["shape"][1]), int(heat["shape"][2])) if heat else None


def embedding_dim(meta: dict) -> int | None:
    """D of the package's embedding output, or None for a package without one."""
    emb = meta.get("embedding_output")
    return int(emb["shape"][1]) if emb else None


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
    hw, dim = heatmap_hw(meta), embedding_dim(meta)
    want = expected_io(size, hw, dim)
    got_outputs = {o["name"]: o for o in outs}
    checks.append(Check("input contract", ins == [want["input"]] and meta["input"] == _json_io(want["input"]),
                        f"model {ins}, metadata {meta['input']}, expected {_json_io(want['input'])}"))
    expected_outputs = [k for k in ("output", "heatmap_output", "embedding_output") if k in want]
    for key in expected_outputs:
        got = got_outputs.get(want[key]["name"])
        ok = got == want[key] and meta[key] == _json_io(want[key])
        label = "output contract" if key == "output" else f"{key.replace('_output', '')} contract"
        checks.append(Check(label, ok, f"model {got}, metadata {meta[key]}, expected {_json_io(want[key])}"))
    if len(outs) != len(expected_outputs):
        checks.append(Check("output contract", False, f"model outputs {[o['name'] for o in outs]}, metadata "
                                                      f"{[meta[k]['name'] for k in expected_outputs]}"))
    if not all(c.ok for c in checks):
        return checks
    shapes = {want[k]["name"]: tuple(2 if d is None else d for d in want[k]["shape"]) for k in expected_outputs}
    checks.append(zero_batch_check(session, shapes, size))
    if checks[-1].ok and "reference" in meta:  # packages exported before drift checks have none
        from export.reference import reference_check

        checks.append(reference_check(version_dir, meta, dim))
    return checks


def zero_batch_check(session, shapes: dict[str, tuple], size: int) -> Check:
    """The model runs on two all-zero images; every output has its contract's shape (`shapes`, by name), is
    float32 and finite, and the probability lies in [0, 1]."""
    try:
        got = dict(zip(shapes, session.run(list(shapes), {INPUT_NAME: np.zeros((2, size, size, 1), np.float32)})))
    except Exception as exc:  # noqa: BLE001
        return Check("zero batch", False, one_line(exc, 200))
    ok = all(a.shape == shapes[n] and a.dtype == np.float32 and bool(np.isfinite(a).all()) for n, a in got.items())
    out = got[OUTPUT_NAME]
    ok = ok and bool(np.all((out >= 0) & (out <= 1)))
    detail = f"output values {out.ravel().round(6).tolist()}; shapes " + ", ".join(
        f"{n} {a.shape}" for n, a in got.items())
    return Check("zero batch", ok, detail)


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


def triton_config(name: str, image_size: int, max_batch_size: int = MAX_BATCH_SIZE,
                  heatmap: tuple[int, int] | None = None, embedding: int | None = None) -> str:
    """config.pbtxt for Triton's onnxruntime backend (dims exclude the batch dimension).

    One config serves every version of a name, and versions differ in input size and outputs, so Triton
    loads only the newest version (`version_policy`), the one this config describes."""
    heat = (f',\n  {{ name: "{HEATMAP_NAME}" data_type: TYPE_FP32 dims: [ {heatmap[0]}, {heatmap[1]} ] }}'
            if heatmap else "")
    if embedding:
        heat += f',\n  {{ name: "{EMBEDDING_NAME}" data_type: TYPE_FP32 dims: [ {embedding} ] }}'
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {image_size}, {image_size}, 1 ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] }}{heat}\n'
        "]\n"
        "version_policy: { latest { num_versions: 1 } }\n"
    )

