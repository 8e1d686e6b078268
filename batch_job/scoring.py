"""Decode, preprocess and score images with onnxruntime (no TensorFlow, no Beam)."""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass

import numpy as np

from batch_job import ledger
from batch_job.listing import is_uri, label_from_path
from export.package import INPUT_NAME, OUTPUT_NAME, load_session
from xray_core.preprocessing import ImageError, PreprocessConfig, preprocess_image

COLUMNS = ("path", "status", "probability", "prediction", "threshold", "label", "model", "error")

_SESSIONS: dict[tuple, object] = {}
_SESSIONS_LOCK = threading.Lock()


def get_session(model_path: str, intra_op_threads: int):
    """One onnxruntime session per worker process, created on first use and reused.

    Worker threads of one process share it: InferenceSession.run is thread-safe and, with one
    intra-op thread, computes on the calling thread (the GIL is released meanwhile)."""
    st = os.stat(model_path)  # a model file replaced in place gets a new session
    key = (model_path, intra_op_threads, st.st_mtime_ns, st.st_size)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = load_session(model_path, intra_op_threads)
        return _SESSIONS[key]


def read_bytes(path: str) -> bytes:
    if is_uri(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


MAX_FILE_BYTES = 1 << 30  # 1 GiB: nothing larger is read into memory


def read_input(path: str) -> bytes:
    """File -> its bytes; ImageError with a short reason when it cannot be read."""
    try:
        if not is_uri(path):
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ImageError(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})")
        data = read_bytes(path)
    except PermissionError:
        raise ImageError("permission denied") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except FileNotFoundError:
        raise ImageError("file not found (vanished or dangling link)") from None
    except OSError as exc:
        raise ImageError(f"read failed: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a worker needs; small and picklable."""

    model_path: str
    model_id: str  # <name>/<version>
    preprocessing: dict
    threshold: float
    batch_size: int = 64
    intra_op_threads: int = 1
    ledger_path: str | None = None  # skip images already scored by this model


def _record(path: str, spec: ScoringSpec, probability: float | None = None, error: str = "",
            sha256: str = "", status: str | None = None) -> dict:
    ok = probability is not None
    if ok:
        probability = round(float(probability), 8)  # decide on exactly what the CSV and ledger hold
    return {
        "path": path,
        "status": status or ("ok" if ok else "error"),
        "probability": f"{probability:.8f}" if ok else "",
        "prediction": ("PNEUMONIA" if probability >= spec.threshold else "NORMAL") if ok else "",
        "threshold": repr(float(spec.threshold)),
        "label": label_from_path(path),
        "model": spec.model_id,
        "error": error,
        "sha256": sha256,  # not a CSV column: feeds the ledger
    }


def score_paths(paths: list[str], spec: ScoringSpec) -> list[dict]:
    """One record per path, in order: decoded in batches of spec.batch_size and scored."""
    config = PreprocessConfig.from_dict(spec.preprocessing)
    session = get_session(spec.model_path, spec.intra_op_threads)
    records: list[dict] = []
    for start in range(0, len(paths), spec.batch_size):
        chunk = paths[start:start + spec.batch_size]
        arrays, slots, out = [], [], [None] * len(chunk)
        digests = [""] * len(chunk)
        for i, path in enumerate(chunk):
            try:
                data = read_input(path)
                if spec.ledger_path:  # the ledger key; not needed otherwise
                    digests[i] = hashlib.sha256(data).hexdigest()
                    earlier = ledger.lookup(spec.ledger_path, digests[i], spec.model_id)
                    if earlier:
                        out[i] = _record(path, spec, earlier[0], sha256=digests[i], status="skipped")
                        continue
                arrays.append(preprocess_image(data, config))
                slots.append(i)
            except ImageError as exc:
                out[i] = _record(path, spec, error=str(exc), sha256=digests[i])
            except Exception as exc:  # noqa: BLE001 - one odd file must never fail the whole job
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                out[i] = _record(path, spec, error=f"unexpected {type(exc).__name__}: {reason}", sha256=digests[i])
        if arrays:
            (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.stack(arrays)})
            for i, p in zip(slots, probs.reshape(-1)):
                out[i] = _record(chunk[i], spec, float(p), sha256=digests[i])
        records.extend(out)
    return records


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
