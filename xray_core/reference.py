"""A model package's drift reference: what the model saw when it was validated (no TensorFlow here).

``reference.npz`` (plain arrays; always read with ``allow_pickle=False``):

* ``probabilities`` (n,) float32: P(pneumonia) of every readable image of the training run's validation split;
* ``embeddings`` (m, D) float16: the graph's ``embedding`` output for a seeded sample of at most MAX_ROWS of them.

``splits.csv`` (``file,split``): every validation and internal-test image of the run, as its path relative to
the training folder, split ``val`` or ``test``; scoring the ``test`` files rebuilds the in-distribution check.
Export writes both (:func:`compute`, :func:`write`, :func:`write_splits`); the batch job reads reference.npz
(:func:`load`); ``export --verify`` checks them (:func:`reference_check`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from xray_core.errors import one_line
from xray_core.files import sha256_file
from xray_core.package import Metadata, PackageError, score

REFERENCE_FILE = "reference.npz"
SPLITS_FILE = "splits.csv"
MAX_ROWS = 2000  # embeddings kept: the batch job's domain classifier uses at most this many a side
SEED = 0
KEYS = ("probabilities", "embeddings")


@dataclass(frozen=True)
class Reference:
    probabilities: np.ndarray  # (n,) float32
    embeddings: np.ndarray  # (m, D) float16


def compute(session, images: np.ndarray, seed: int = SEED) -> Reference:
    """Score `images` (N, S, S, 1) with the package's graph -> the reference arrays."""
    out = score(session, images, embedding=True)
    emb = out.embedding
    if len(emb) > MAX_ROWS:
        emb = emb[np.sort(np.random.default_rng(seed).choice(len(emb), size=MAX_ROWS, replace=False))]
    return Reference(out.probability.astype(np.float32), emb.astype(np.float16))


def write(path: str, ref: Reference) -> None:
    np.savez(path, probabilities=ref.probabilities, embeddings=ref.embeddings)


def load(path: str) -> Reference:
    """reference.npz -> its arrays; PackageError (one line) when it is missing, unreadable or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise PackageError(f"{path} lacks {', '.join(missing)}")
            return Reference(z["probabilities"], z["embeddings"])
    except FileNotFoundError:
        raise PackageError(f"{path} is missing") from None
    except PackageError:
        raise
    except Exception as exc:  # noqa: BLE001 - not an npz, truncated, or an object array (pickles refused)
        raise PackageError(f"{path} is unreadable: {one_line(exc, 150)}") from None


def problems(ref: Reference, dim: int | None) -> list[str]:
    """What is wrong with the arrays for a model whose embedding output has D = dim ([] when nothing is)."""
    p, e = ref.probabilities, ref.embeddings
    found = []
    if p.ndim != 1 or p.dtype != np.float32 or len(p) == 0:
        found.append(f"probabilities {p.dtype} {p.shape}, expected float32 (n,) with n >= 1")
    elif not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        found.append("probabilities outside [0, 1]")
    if dim is None:
        found.append("the model has no embedding output")
    elif e.ndim != 2 or e.shape[1] != dim or e.dtype != np.float16 or not 1 <= len(e) <= MAX_ROWS:
        found.append(f"embeddings {e.dtype} {e.shape}, expected float16 (m, {dim}) with 1 <= m <= {MAX_ROWS}")
    elif not np.isfinite(e).all():
        found.append("embeddings not finite")
    return found


def reference_problems(version_dir: str, meta: Metadata) -> tuple[list[str], Reference | None]:
    """`export --verify`'s check of reference.npz (sha256 as in the metadata, shapes of the model's outputs)
    and splits.csv: -> (what is wrong, the arrays when they could be read)."""
    path = os.path.join(version_dir, REFERENCE_FILE)
    try:
        ref = load(path)
    except PackageError as exc:
        return [str(exc)], None
    found = problems(ref, meta.embedding_dim)
    if sha256_file(path) != (meta.reference or {}).get("sha256"):
        found.append("sha256 differs from the metadata")
    if not os.path.isfile(os.path.join(version_dir, SPLITS_FILE)):
        found.append(f"{SPLITS_FILE} is missing")
    return found, ref


def training_folder(paths: list[str]) -> str:
    """The folder every image of the run lies under (the parent of the class folders)."""
    return os.path.commonpath([os.path.dirname(os.path.dirname(os.path.abspath(p))) for p in paths])


def write_splits(path: str, rows: list[tuple[str, str]], root: str) -> dict[str, int]:
    """splits.csv from (absolute image path, split) rows: val and test only, paths relative to `root`;
    -> images per split."""
    kept = [(os.path.relpath(p, root), s) for p, s in rows if s in ("val", "test")]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "split"])
        writer.writerows(kept)
    return {s: sum(1 for _, k in kept if k == s) for s in ("val", "test")}


def read_splits(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [(r["file"], r["split"]) for r in csv.DictReader(f)]


def summary(path: str, ref: Reference, splits: dict[str, int], unreadable: int) -> dict:
    """metadata.json's `reference`."""
    return {"file": REFERENCE_FILE, "sha256": sha256_file(path), "source": "validation split",
            "images": int(len(ref.probabilities)), "unreadable": int(unreadable),
            "embedding_rows": int(len(ref.embeddings)), "embedding_dim": int(ref.embeddings.shape[1]),
            "embedding_dtype": "float16", "seed": SEED, "splits_file": SPLITS_FILE, "splits": splits}
