"""Which package a ledger knows under a model id (batch_job/ledger.py), checked before a night is run: table
`models` holds the sha256 of the model.onnx each id first committed with, table `packages` that of what decides a
row besides the image (batch_job/model.py scoring_identity). Read-only."""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass

from batch_job.ledger import LedgerError
from batch_job.ledger_lookup import read_only

LOG = logging.getLogger("batch_job")


def _rows(conn: sqlite3.Connection, query: str, *args) -> list[tuple]:
    try:
        return conn.execute(query, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a ledger written before that table: it knows nothing of this yet
            return []
        raise


def _known(conn: sqlite3.Connection, query: str, model: str) -> str | None:
    rows = _rows(conn, query, model)
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
        models = [row[0] for row in _rows(conn, "SELECT DISTINCT model FROM runs WHERE images_new >= 0 ORDER BY model")]
    return [] if model in models else models


def warn_if_new_model(path: str, model: str) -> None:
    """A WARNING when the ledger has nights of other model versions and none of this one (other_models)."""
    others = other_models(path, model)
    if others:
        LOG.warning("ledger %s has no night of %s (it has nights of %s): every image in the inputs is scored with it, "
                    "those read on earlier nights too, and tonight's worklist holds them all", path, model,
                    ", ".join(others))



@dataclass(frozen=True)
class EarlierNight:
    """An earlier night whose worklist holds images tonight skips: where it published, when it finished (UTC), and
    how many of tonight's skipped images it flagged (at tonight's threshold) or did not screen."""

    out_dir: str  # "" where the ledger no longer knows the run
    finished_utc: str
    flagged: int
    unscreened: int

    def line(self) -> str:
        """`OUT_DIR (finished 2026-12-01 02:14 UTC): N flagged, M not screened`."""
        where = self.out_dir or "a run the ledger no longer lists"
        when = f" (finished {self.finished_utc[:16].replace('T', ' ')} UTC)" if self.finished_utc else ""
        return f"{where}{when}: {self.flagged} flagged, {self.unscreened} not screened"


def nights_of(path: str, counts: dict[str, tuple[int, int]]) -> list[EarlierNight]:
    """The earlier nights of `counts` (run id -> flagged, not screened: shard_result.earlier_nights), the latest first
    (QA: a night's 110 flagged scans were only "184 skipped" the night after, and no page said where to read them)."""
    if not counts or not os.path.exists(path):
        return []
    runs = list(counts)
    known: dict[str, tuple[int, str, str]] = {}
    with contextlib.closing(read_only(path)) as conn:
        for start in range(0, len(runs), 500):  # SQLite's bound on the number of parameters
            chunk = runs[start:start + 500]
            rows = _rows(conn, f"SELECT run_id, rowid, out_dir, finished_utc FROM runs WHERE run_id IN "
                               f"({', '.join('?' * len(chunk))})", *chunk)
            known.update({run: (order, out, finished) for run, order, out, finished in rows})
    # the commit order (a commit replaces its run's row: a new rowid); finished_utc is to the second only
    latest_first = sorted(runs, key=lambda run: known.get(run, (-1,))[0], reverse=True)
    return [EarlierNight(*known.get(run, (-1, "", ""))[1:], *counts[run]) for run in latest_first]
