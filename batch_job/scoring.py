"""Decode, preprocess and score images with onnxruntime (no TensorFlow, no Beam)."""
from __future__ import annotations

import functools
import hashlib
import os
import stat
import threading
from dataclasses import dataclass, replace

import numpy as np

from batch_job import ledger_lookup
from batch_job.listing import is_uri
from xray_core import gate, reading, reference
from xray_core.dicom_header import DEFAULT_MODALITIES, DicomHeader
from xray_core.errors import one_line
from xray_core.gate import Gate
from xray_core.package import open_session, score
from xray_core.preprocessing import ImageError, PreprocessConfig, load_input

COLUMNS = ("path", "status", "probability", "prediction", "threshold", "label", "model", "error")
SESSIONS_KEPT = 4  # per worker process; a long-lived Dask worker sees one model version after another
_SESSIONS_LOCK = threading.Lock()


@functools.lru_cache(maxsize=SESSIONS_KEPT)
def _session(model_path: str, intra_op_threads: int, mtime_ns: int, size: int):
    return open_session(model_path, intra_op_threads)


def get_session(model_path: str, intra_op_threads: int):
    """One onnxruntime session per model file and worker process, created on first use and reused; the
    SESSIONS_KEPT most recently used are kept.

    Worker threads of one process share it: InferenceSession.run is thread-safe and, with one
    intra-op thread, computes on the calling thread (the GIL is released meanwhile)."""
    st = os.stat(model_path)  # a model file replaced in place gets a new session
    with _SESSIONS_LOCK:
        return _session(model_path, intra_op_threads, st.st_mtime_ns, st.st_size)


MAX_FILE_BYTES = reading.MAX_FILE_BYTES  # 1 GiB: nothing larger is read into memory


def read_bytes(path: str) -> bytes:
    """A local file's bytes (checked against MAX_FILE_BYTES before reading), or a URI's through Beam's
    FileSystems (read up to MAX_FILE_BYTES + 1 bytes: one more means too large)."""
    if not is_uri(path):
        if os.path.isdir(path):  # listing.py lists a folder only when it cannot list what is in it
            raise ImageError(f"folder could not be listed ({_listing_error(path)}): the images in it were not scored")
        return reading.read_file(path, MAX_FILE_BYTES)  # training and calibration read files so too
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise reading.too_large(0, MAX_FILE_BYTES)
    return data


def _listing_error(folder: str) -> str:
    """Why a folder cannot be listed, as the system says it now."""
    try:
        with os.scandir(folder):
            return "it can be listed now: its permissions changed, or it took a listed file's place since: rerun"
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()


def file_stat(path: str) -> tuple[int, int, int] | None:
    """(size, mtime_ns, ctime_ns) of a local regular file; None for URIs and anything that is not one. Taken before
    a file is read, it tells a later reader whether the file changed since (unchanged.py, heatmaps.py)."""
    if is_uri(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if stat.S_ISREG(st.st_mode) else None


def read_unchanged(path: str, key: tuple[int, int, int] | None) -> bytes:
    """read_input, for a file read before whose file_stat then was `key` (None: not checked): ImageError when it
    changed since, so that nothing drawn later is of another image than the one scored."""
    if key is not None:
        now = file_stat(path)
        if now is None and not os.path.lexists(path):
            raise ImageError("vanished since it was scored")
        if now != tuple(key):
            raise ImageError("changed since it was scored")
    return read_input(path)


def read_input(path: str) -> bytes:
    """File -> its bytes; ImageError with a short reason when it cannot be read (xray_core/reading.py)."""
    try:
        return reading.not_empty(read_bytes(path))
    except OSError as exc:  # a URI's (a local file's are ImageErrors already)
        raise reading.unreadable(exc) from None


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
    heatmaps: int = 0  # keep the shard's top N flagged images for the heatmap step (0: none)
    with_heatmap: bool = False  # the model has a heatmap output: fetch it for flagged images
    drift_sample: int = 0  # keep the embeddings of the shard's first N images in the seeded order (0: none)
    reference_path: str | None = None  # the package's reference.npz, for the content check
    gate: gate.GateSpec | None = None  # the content check (its statistic and limit); None: no content check
    allowed_modalities: tuple[str, ...] = DEFAULT_MODALITIES  # DICOM Modality values in scope


@dataclass(frozen=True)
class Row:
    """One image's result: its CSV row (COLUMNS, as text) and what the shard summary keeps of it."""

    path: str
    status: str  # ok, error, out_of_scope, or skipped (scored by this model on an earlier night: the ledger's)
    probability: str  # 8 decimals; "" for an error or an image out of scope
    prediction: str  # PNEUMONIA, NORMAL or ""
    threshold: str
    label: str  # the folder label, or ""
    model: str
    error: str  # why it failed, or why it is out of scope
    sha256: str = ""  # of the file's bytes, with a ledger only
    heatmap: np.ndarray | None = None  # (h, w): flagged images of this run, with spec.with_heatmap
    embedding: np.ndarray | None = None  # (D,): images scored in this run, with spec.drift_sample
    header: DicomHeader | None = None  # DICOM input: its identifiers for the worklist
    file_key: tuple[int, int, int] | None = None  # file_stat before it was read: flagged images of this run
    earlier_run: str = ""  # skipped: the run id of the night that scored or refused these bytes

    def csv_row(self) -> list[str]:
        return [getattr(self, c) for c in COLUMNS]

    @property
    def flagged(self) -> bool:
        return self.status == "ok" and self.prediction == "PNEUMONIA"


def make_row(path: str, label: str, spec: ScoringSpec, probability: float | None = None, error: str = "",
             sha256: str = "", status: str | None = None, heatmap: np.ndarray | None = None,
             embedding: np.ndarray | None = None, header: DicomHeader | None = None,
             file_key: tuple[int, int, int] | None = None) -> Row:
    ok = probability is not None
    if ok:
        probability = round(float(probability), 8)  # decide on exactly what the CSV and ledger hold
    prediction = ("PNEUMONIA" if probability >= spec.threshold else "NORMAL") if ok else ""
    return Row(path, status or ("ok" if ok else "error"), f"{probability:.8f}" if ok else "", prediction,
               repr(float(spec.threshold)), label, spec.model_id, error, sha256,
               heatmap if prediction == "PNEUMONIA" else None, embedding, header,
               file_key if prediction == "PNEUMONIA" else None)


def out_of_scope_row(path: str, label: str, spec: ScoringSpec, reason: str, sha256: str = "",
                     header: DicomHeader | None = None) -> Row:
    """No probability and no prediction: nothing can sort the image onto a reading list."""
    return Row(path, "out_of_scope", "", "", repr(float(spec.threshold)), label, spec.model_id, reason, sha256,
               header=header)


NEW_NAME = "a new name for bytes an earlier night read as"  # a skipped row's `error`, where its path is new


def skipped_row(path: str, label: str, spec: ScoringSpec, earlier: ledger_lookup.Earlier,
                new_name: bool = False) -> Row:
    """An image this model scored (its probability) or refused (its reason) on an earlier night; under a path the
    ledger has not seen (`new_name`), its `error` also names the path it was read under then."""
    note = f"{NEW_NAME} {earlier.path}" if new_name else ""
    return replace(make_row(path, label, spec, earlier.probability, error="; ".join(filter(None, (earlier.reason,
                                                                                                 note))),
                            sha256=earlier.sha256, status="skipped"), earlier_run=earlier.run_id)


def is_new_name(csv_row: dict) -> bool:
    """A skipped row of a shard CSV whose path the ledger had not seen (skipped_row)."""
    error = csv_row["error"]
    return csv_row["status"] == "skipped" and (error.startswith(NEW_NAME) or f"; {NEW_NAME} " in error)


def read_before_as(csv_row: dict) -> str:
    """The path a new name's bytes were read under before, as its row's `error` names it (is_new_name rows)."""
    return csv_row["error"].rsplit(f"{NEW_NAME} ", 1)[-1]


@functools.lru_cache(maxsize=SESSIONS_KEPT)
def _gate(reference_path: str, mtime_ns: int, spec: gate.GateSpec) -> Gate:
    return gate.package_gate(spec, os.path.dirname(reference_path), lambda: reference.load(reference_path).embeddings)


def get_gate(spec: ScoringSpec) -> Gate | None:
    """The package's content check, read (gate.npz) or fitted (Ledoit-Wolf on its reference rows) once per worker
    process."""
    if spec.gate is None or spec.reference_path is None:
        return None
    with _SESSIONS_LOCK:
        return _gate(spec.reference_path, os.stat(spec.reference_path).st_mtime_ns, spec.gate)


def score_paths(paths: list[str], spec: ScoringSpec, labels: list[str] | None = None) -> list[Row]:
    """One row per path, in order: decoded in batches of spec.batch_size and scored. `labels` are the folder
    labels the listing found for the paths (default: none). The input gate runs before and after the network:
    a DICOM header out of scope or an image the cheap checks refuse is never scored; an image whose embedding is
    past the package's limit, or that its orientation check finds upside down, gets no probability either."""
    labels = labels or [""] * len(paths)
    config = PreprocessConfig.from_dict(spec.preprocessing)
    session = get_session(spec.model_path, spec.intra_op_threads)
    content_check = get_gate(spec)
    embedding = bool(spec.drift_sample) or content_check is not None
    rows: list[Row] = []
    for start in range(0, len(paths), spec.batch_size):
        chunk = list(zip(paths[start:start + spec.batch_size], labels[start:start + spec.batch_size]))
        arrays, slots, out = [], [], [None] * len(chunk)
        digests = [""] * len(chunk)
        headers: list[DicomHeader | None] = [None] * len(chunk)
        keys = [file_stat(path) if spec.heatmaps and spec.with_heatmap else None  # before reading
                for path, _ in chunk]
        for i, (path, label) in enumerate(chunk):
            try:
                data = read_input(path)
                if spec.ledger_path:  # the ledger key; not needed otherwise
                    digests[i] = hashlib.sha256(data).hexdigest()
                    earlier = ledger_lookup.lookup(spec.ledger_path, digests[i], spec.model_id, spec.allowed_modalities)
                    if earlier:  # a URI: table files records local files only, so no new name is judged
                        new_name = not is_uri(path) and not ledger_lookup.known_path(spec.ledger_path, path, earlier)
                        out[i] = skipped_row(path, label, spec, earlier, new_name)
                        continue
                loaded = load_input(data, config, spec.allowed_modalities)
                headers[i] = loaded.header
                if loaded.reason:
                    out[i] = out_of_scope_row(path, label, spec, loaded.reason, digests[i], loaded.header)
                    continue
                arrays.append(loaded.array)
                slots.append(i)
            except ImageError as exc:
                out[i] = make_row(path, label, spec, error=str(exc), sha256=digests[i], header=exc.header)
            except Exception as exc:  # noqa: BLE001 - one odd file must never fail the whole job
                reason = f"unexpected {type(exc).__name__}: {one_line(exc, 200)}"
                out[i] = make_row(path, label, spec, error=reason, sha256=digests[i])
        if arrays:
            got = score(session, np.stack(arrays), heatmap=spec.with_heatmap, embedding=embedding,
                        batch_size=len(arrays))
            reasons = content_check.reasons(got.embedding, arrays) if content_check is not None else [None] * len(slots)
            for j, i in enumerate(slots):
                reason = reasons[j]
                if reason:
                    out[i] = out_of_scope_row(*chunk[i], spec, reason, digests[i], headers[i])
                    continue
                out[i] = make_row(*chunk[i], spec, float(got.probability[j]), sha256=digests[i],
                                  heatmap=None if got.heatmap is None else got.heatmap[j],
                                  embedding=got.embedding[j] if spec.drift_sample else None, header=headers[i],
                                  file_key=keys[i])
        rows.extend(out)
    return rows
