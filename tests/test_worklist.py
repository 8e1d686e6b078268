"""worklist.csv's order and its spreadsheet-safe cells (batch_job/worklist.py)."""
from __future__ import annotations

import csv
import io

from batch_job.worklist import COLUMNS, Entry, ranked, safe_cell, write


def _e(path, status="ok", p="", pred="", **kw):
    return Entry(path, status, p, pred, **kw)


def test_flagged_first_then_scored_then_out_of_scope_then_errors():
    entries = [
        _e("err.png", "error", reason="decode failed"),
        _e("n_low.png", "ok", "0.10000000", "NORMAL"),
        _e("oos.png", "out_of_scope", reason="colour image"),
        _e("f_mid.png", "ok", "0.80000000", "PNEUMONIA"),
        _e("skip.png", "skipped", "0.99000000", "PNEUMONIA"),
        _e("n_high.png", "ok", "0.40000000", "NORMAL"),
        _e("f_top.png", "ok", "0.95000000", "PNEUMONIA"),
        _e("b_tie.png", "ok", "0.80000000", "PNEUMONIA"),
    ]
    assert [e.path for e in ranked(entries)] == ["f_top.png", "b_tie.png", "f_mid.png", "n_high.png", "n_low.png",
                                                "oos.png", "err.png"]


def test_written_with_rank_and_every_column():
    f = io.StringIO()
    assert write(f, [_e("b.png", "ok", "0.2", "NORMAL"), _e("a.png", "ok", "0.9", "PNEUMONIA",
                                                            patient_id="P1", heatmap="heatmaps/0001.png")]) == 2
    rows = list(csv.DictReader(io.StringIO(f.getvalue())))
    assert tuple(rows[0]) == COLUMNS
    assert COLUMNS[:8] == ("rank", "path", "status", "probability", "prediction", "reason", "heatmap", "patient_id")
    assert [(r["rank"], r["path"], r["patient_id"], r["heatmap"]) for r in rows] == \
        [("1", "a.png", "P1", "heatmaps/0001.png"), ("2", "b.png", "", "")]


def test_cells_that_would_run_as_formulas_are_text():
    for text in ("=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"):
        assert safe_cell(text) == "'" + text
    for text in ("person1_bacteria_1.jpeg", "1.2.840.113619", "", "0.5"):
        assert safe_cell(text) == text
    f = io.StringIO()
    write(f, [_e("=cmd|' /C calc'!A0.png", "error", reason="-decode failed", patient_id="@evil")])
    row = next(csv.DictReader(io.StringIO(f.getvalue())))
    assert (row["path"], row["reason"], row["patient_id"]) == ("'=cmd|' /C calc'!A0.png", "'-decode failed", "'@evil")
