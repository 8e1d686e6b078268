"""The drift check of a run: this run's scores and embeddings against the model's reference (drift.py).

Worker (inside DecodeScoreWrite's process()): of the shard's images scored in this run, the SAMPLE_ROWS with the
smallest sample key (sha256 of the seed and the path) go with their embeddings to a sidecar
``_drift-NNNNN.npz``, written atomically before the shard's CSV (which marks the shard complete).

Driver (after reconciliation): the SAMPLE_ROWS smallest keys over all sidecars are a seeded uniform random
sample of the images scored in this run, the same whatever the runner, the shard size or the order in which
shards finished; the sidecars are then removed. With the probabilities of every image scored in this run (not
those skipped through the ledger) they make metrics.json's ``drift`` block.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from batch_job import drift
from export import reference
from xray_core.errors import one_line
from xray_core.files import atomic_write

LOG = logging.getLogger("batch_job")

SAMPLE_ROWS = drift.MAX_ROWS  # embeddings of this run the domain classifier sees at most
SEED = 0


def sample_key(path: str, seed: int = SEED) -> int:
    """A path's place in the seeded random order (first 8 bytes of sha256(seed, path))."""
    digest = hashlib.sha256(f"{seed}\0".encode() + os.fsencode(path)).digest()
    return int.from_bytes(digest[:8], "big")


def smallest(records: list[dict], k: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 (m,), embeddings float16 (m, D), the reference's precision) of the k records scored in this
    run (status ok, finite embedding) with the smallest sample keys; m <= k."""
    scored = sorted((sample_key(r["path"], seed), i) for i, r in enumerate(records)
                    if r["status"] == "ok" and r.get("embedding") is not None and np.isfinite(r["embedding"]).all())[:k]
    keys = np.asarray([key for key, _ in scored], dtype=np.uint64)
    return keys, np.asarray([records[i]["embedding"] for _, i in scored], dtype=np.float16)


def sidecar_name(shard_id: int) -> str:
    return f"_drift-{shard_id:05d}.npz"


def write_sidecar(out_dir: str, shard_id: int, keys: np.ndarray, embeddings: np.ndarray) -> None:
    """The shard's sample (atomic); for a shard without images scored in this run none (and none left by an
    earlier attempt of this shard's task)."""
    path = os.path.join(out_dir, sidecar_name(shard_id))
    if not len(keys):
        if os.path.exists(path):
            os.remove(path)
        return
    atomic_write(path, lambda f: np.savez(f, keys=keys, embeddings=embeddings), binary=True)


def merge(out_dir: str, shards, k: int) -> np.ndarray:
    """The embeddings of the k smallest sample keys over all shards' sidecars (float32 (m, D), m <= k), in key
    order; the sidecars are removed. Shard by shard, keeping the k smallest so far: memory holds k rows plus one
    shard's, however many shards the run has."""
    keys, embeddings = np.zeros(0, np.uint64), None
    for shard_id, _, _ in shards:
        path = os.path.join(out_dir, sidecar_name(shard_id))
        if not os.path.exists(path):
            continue
        with np.load(path, allow_pickle=False) as z:
            keys = np.concatenate([keys, z["keys"]])
            embeddings = z["embeddings"] if embeddings is None else np.concatenate([embeddings, z["embeddings"]])
        os.remove(path)
        order = np.argsort(keys, kind="stable")[:k]
        keys, embeddings = keys[order], embeddings[order]
    return np.zeros((0, 0), np.float32) if embeddings is None else embeddings.astype(np.float32)


def run_drift(out_dir: str, shards, reference_path: str | None, probs: np.ndarray, threshold: float,
              auc_limit: float, psi_limit: float, sample_rows: int = SAMPLE_ROWS) -> dict:
    """metrics.json's `drift` block for the probabilities `probs` scored in this run and the sample of
    `sample_rows` embeddings in the sidecars. A check that fails says so in the block and the log: the night's
    scores are still published."""
    if reference_path is None:
        return drift.no_reference(len(probs), auc_limit, psi_limit)
    ref = reference.load(reference_path)
    try:
        embeddings = merge(out_dir, shards, sample_rows)
        block = drift.drift_figures(ref["embeddings"].astype(np.float32), ref["probabilities"], embeddings, probs,
                                    threshold, auc_limit, psi_limit, seed=SEED)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the night's scores
        LOG.warning("drift check failed: %s", one_line(exc, 300))
        block = {**drift.no_reference(len(probs), auc_limit, psi_limit), "reference": True,
                 "note": f"check failed ({type(exc).__name__}: {one_line(exc, 200)})"}
    return block
