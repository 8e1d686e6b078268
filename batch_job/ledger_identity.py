"""Which package a ledger knows under a model id (batch_job/ledger.py), checked before a night is run: table
`models` holds the sha256 of the model.onnx each id first committed with, table `packages` that of what decides a
row besides the image (batch_job/model.py scoring_identity). Read-only."""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3

from batch_job.ledger import LedgerError
from batch_job.ledger_lookup import read_only

LOG = logging.getLogger("batch_job")


def table_rows(conn: sqlite3.Connection, query: str, *args) -> list[tuple]:
    """The query's rows; none where its table is not there yet (a ledger written before it)."""
    try:
        return conn.execute(query, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a ledger written before that table: it knows nothing of this yet
            return []
        raise


def _known(conn: sqlite3.Connection, query: str, model: str) -> str | None:
    rows = table_rows(conn, query, model)
    return rows[0][0] if rows else None


def check_model(path: str, model: str, onnx_sha256: str, scoring_sha256: str = "") -> None:
    """Refuse (LedgerError) a model id this ledger knows as another package: its rows were scored by another
    model.onnx, or by the same one behind another input gate or preprocessing (QA: version 6 and 7 recalibrated in
    two serving folders, both as pneumonia/8: the second skipped 30 upside-down scans the first had scored, with the
    first's probabilities). Read-only; a ledger, or a table, not there yet knows none."""
    if not os.path.exists(path):
        return
    with contextlib.closing(read_only(path)) as conn:
        onnx = _known(conn, "SELECT onnx_sha256 FROM models WHERE model = ?", model)
        scoring = _known(conn, "SELECT scoring_sha256 FROM packages WHERE model = ?", model)
    if onnx is not None and onnx != onnx_sha256:
        raise LedgerError(f"ledger {path} holds the scores of another {model} (its model.onnx sha256 {onnx[:12]}, "
                          f"this one's {onnx_sha256[:12]}): publish this model as a new version, or name another "
                          "--ledger")
    if scoring is not None and scoring_sha256 and scoring != scoring_sha256:
        raise LedgerError(f"ledger {path} holds the scores of another {model}: the same model.onnx behind another "
                          f"input gate or preprocessing (package {scoring[:12]}, this one's {scoring_sha256[:12]}): "
                          "publish this package as a new version, or name another --ledger")


def other_models(path: str, model: str) -> list[str]:
    """The model ids this ledger has nights of, where it has none of `model` (else, or without a ledger, []): a
    version new to the ledger scores every image in its inputs, those earlier nights read with the others too (QA: a
    night run with version 6 put 98 scans version 7 had flagged the night before on the worklist again, and no line
    said why)."""
    if not os.path.exists(path):
        return []
    with contextlib.closing(read_only(path)) as conn:  # not a killed run's publishing row (images_new -1)
        rows = table_rows(conn, "SELECT DISTINCT model FROM runs WHERE images_new >= 0 ORDER BY model")
    models = [row[0] for row in rows]
    return [] if model in models else models


def warn_if_new_model(path: str, model: str) -> None:
    """A WARNING when the ledger has nights of other model versions and none of this one (other_models)."""
    others = other_models(path, model)
    if others:
        LOG.warning("ledger %s has no night of %s (it has nights of %s): every image in the inputs is scored with it, "
                    "those read on earlier nights too, and tonight's worklist holds them all", path, model,
                    ", ".join(others))
