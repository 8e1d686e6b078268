"""The drift check of a run: this run's scores and embeddings against the model's reference (drift.py).

Worker: of the shard's images scored in this run, the SAMPLE_ROWS with the smallest sample key (sha256 of the seed
and the path) go with their embeddings into the shard's summary (shard_result.py). Driver: the SAMPLE_ROWS smallest
keys over all shards (:func:`keep_smallest`, shard by shard) are a seeded uniform random sample of the images
scored in this run, the same whatever the runner, the shard size or the order in which shards finished. With the
probabilities of every image scored in this run (not those skipped through the ledger) they make metrics.json's
``drift`` block.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from batch_job import drift
from xray_core import reference
from xray_core.errors import one_line

LOG = logging.getLogger("batch_job")

SAMPLE_ROWS = drift.MAX_ROWS  # embeddings of this run the domain classifier sees at most
SEED = 0


def sample_key(path: str, seed: int = SEED) -> int:
    """A path's place in the seeded random order (first 8 bytes of sha256(seed, path))."""
    digest = hashlib.sha256(f"{seed}\0".encode() + os.fsencode(path)).digest()
    return int.from_bytes(digest[:8], "big")


def smallest(rows, k: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 (m,), embeddings float16 (m, D)) of the k rows scored in this run (status ok, finite
    embedding) with the smallest sample keys, in key order; m <= k."""
    scored = sorted((sample_key(r.path, seed), i) for i, r in enumerate(rows)
                    if r.status == "ok" and r.embedding is not None and np.isfinite(r.embedding).all())[:k]
    if not scored:
        return np.zeros(0, np.uint64), np.zeros((0, 0), np.float16)
    keys = np.asarray([key for key, _ in scored], dtype=np.uint64)
    return keys, np.stack([rows[i].embedding for _, i in scored]).astype(np.float16)


def keep_smallest(keys: np.ndarray, embeddings: np.ndarray | None, new_keys: np.ndarray, new_embeddings: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The k smallest keys (and their embeddings) of the two samples, in key order."""
    if not len(new_keys):
        return keys, embeddings
    keys = np.concatenate([keys, new_keys])
    embeddings = new_embeddings if embeddings is None else np.concatenate([embeddings, new_embeddings])
    order = np.argsort(keys, kind="stable")[:k]
    return keys[order], embeddings[order]


def run_drift(reference_path: str | None, probs: np.ndarray, embeddings: np.ndarray | None, threshold: float,
              auc_limit: float, psi_limit: float | None) -> drift.DriftResult:
    """The drift check for the probabilities `probs` scored in this run and the run's sample of
    embeddings (`psi_limit` None: by the run's size). A check that fails says so in the block and the log: the
    night's scores are still published."""
    if reference_path is None:
        return drift.no_reference(len(probs), auc_limit, psi_limit)
    ref = reference.load(reference_path)
    try:
        sample = np.zeros((0, 0), np.float32) if embeddings is None else embeddings.astype(np.float32)
        block = drift.drift_figures(ref.embeddings.astype(np.float32), ref.probabilities, sample, probs,
                                    threshold, auc_limit, psi_limit, seed=SEED)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the night's scores
        LOG.warning("drift check failed: %s", one_line(exc, 300))
        block = drift.failed(len(probs), auc_limit, psi_limit, f"{type(exc).__name__}: {one_line(exc, 200)}")
    return block
