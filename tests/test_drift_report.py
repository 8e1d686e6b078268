"""The drift part of the report and the ledger, on synthetic numbers: drift.png and drift_trend.png,
report.md's section, the job's last lines, report.html's banner, and the ledger's drift rows and history."""
from __future__ import annotations

import os
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from batch_job import drift_report, html_report, report
from batch_job.drift import FAILED, JUDGED, TOO_FEW, DriftResult, failed, no_reference, summary_line
from batch_job.ledger import Ledger
from batch_job.result import LabelMetrics
from helpers import parse, reconciliation, run_result

MODEL = "pneumonia/3"


def judged(detected: bool = True) -> DriftResult:
    """A DriftResult as drift.drift_figures builds it for a judged run (synthetic numbers)."""
    auc, shift = (0.7123, 0.2345) if detected else (0.5234, 0.0412)
    return DriftResult(JUDGED, 1200, 0.60, 0.20, detected=detected, domain_auc=auc, psi=shift, sampled=1200,
                       reference_images=624, reference_sampled=624, positive_rate=0.4567,
                       reference_positive_rate=0.3812, seed=0,
                       histogram={"bin_edges": [round(i / 10, 2) for i in range(11)], "shares": [0.1] * 10,
                                  "reference_shares": [0.1] * 10})


def too_few() -> DriftResult:
    return replace(judged(), state=TOO_FEW, images=42, sampled=42, domain_auc=None, psi=None, detected=False)


def result(drift: DriftResult | None = None, labelled: LabelMetrics | None = None):
    """The run's result around `drift` (default: the model has no drift reference): 1,250 images found, 1,200
    scored in this run, 50 skipped through the ledger."""
    counts = reconciliation(np.linspace(0.0, 1.0, 1250), skipped=50)
    return run_result(drift=drift, labelled=labelled, counts=counts, model=MODEL)


def point(i: int, judged_: bool = True, detected: bool = False) -> dict:
    return {"run_id": f"r{i}", "finished_utc": f"2024-05-{i % 28 + 1:02d}T02:00:00+00:00", "images": 300 + i,
            "judged": judged_, "detected": detected, "domain_auc": 0.52 + 0.01 * i if judged_ else None,
            "psi": 0.03 + 0.01 * i if judged_ else None, "positive_rate": 0.4}


def png_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        return img.size


# ------------------------------------------------------------------ figures

def test_write_figures_draws_the_histograms_and_the_trend(tmp_path):
    history = [point(i, judged_=i != 3, detected=i == 7) for i in range(9)]
    written = drift_report.write_figures(str(tmp_path), judged(), 0.5, MODEL, history)
    assert written == [drift_report.DRIFT_FILE, drift_report.TREND_FILE]
    for name in written:
        path = str(tmp_path / name)
        assert png_size(path) == drift_report.PIXELS == (520, 350)
        assert os.path.getsize(path) > 10_000  # drawn, not an empty canvas
        shot = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert np.mean(shot.max(axis=2) - shot.min(axis=2) > 60) > 0.003  # coloured lines, bars, markers


def test_on_the_trend_only_the_figure_over_its_limit_is_red():
    """A run detected by its domain AUC: its PSI point, under PSI's limit, is not marked (QA read it as PSI's); a run
    over tonight's limit that was not detected under its own night's limits is not marked either (review)."""
    history = [point(0), {**point(1, detected=True), "domain_auc": 0.70, "psi": 0.074}, point(2, judged_=False),
               {**point(3, detected=True), "domain_auc": 0.55, "psi": 0.31},
               {**point(4, detected=False), "domain_auc": 0.65, "psi": 0.05}]
    detected = np.array([h["detected"] for h in history])
    auc, psi = drift_report._series(history, "domain_auc"), drift_report._series(history, "psi")
    assert drift_report.marked(auc, 0.6, detected).tolist() == [False, True, False, False, False]
    assert drift_report.marked(psi, 0.2, detected).tolist() == [False, False, False, True, False]
    # tonight's limits 0.9 / 0.9 (QA): no figure over them, the two detected nights still show, ringed
    red = drift_report.marked(auc, 0.9, detected), drift_report.marked(psi, 0.9, detected)
    assert not np.logical_or(*red).any()
    assert drift_report.detected_elsewhere(detected, *red).tolist() == [False, True, False, True, False]
    assert drift_report.detected_elsewhere(detected, drift_report.marked(auc, 0.6, detected),
                                           drift_report.marked(psi, 0.2, detected)).tolist() == [False] * 5


def test_trend_works_with_one_run_and_with_no_judged_run(tmp_path):
    drift_report.trend_png(str(tmp_path / "one.png"), [point(0)], 0.6, 0.2)
    drift_report.trend_png(str(tmp_path / "gaps.png"), [point(0, judged_=False), point(1, judged_=False)], 0.6, 0.2)
    for name in ("one.png", "gaps.png"):
        assert png_size(str(tmp_path / name)) == drift_report.PIXELS


def test_write_figures_writes_nothing_without_a_reference_scores_or_history(tmp_path):
    assert drift_report.write_figures(str(tmp_path), no_reference(12), 0.5,
                                      MODEL, [drift_report.history_entry("now", no_reference(12))]) == []
    assert drift_report.write_figures(str(tmp_path), replace(judged(), images=0), 0.5, MODEL, []) == []
    assert os.listdir(tmp_path) == []
    history = [point(i) for i in range(40)]
    assert drift_report.write_figures(str(tmp_path), too_few(), 0.5, MODEL, history) == ["drift.png",
                                                                                          "drift_trend.png"]


def test_trend_history_is_the_ledgers_runs_then_this_run(tmp_path):
    assert drift_report.trend_history(None, MODEL, "now", judged()) is None
    with Ledger(str(tmp_path / "ledger.sqlite")) as book:
        assert drift_report.trend_history(book, MODEL, "now", no_reference(300)) is None
        for i in range(35):
            book.commit(f"r{i}", "/out", MODEL, [], drift=judged(detected=i % 2 == 0))
        history = drift_report.trend_history(book, MODEL, "now", judged(detected=False))
    assert len(history) == drift_report.TREND_RUNS == 30
    assert [h["run_id"] for h in history] == [f"r{i}" for i in range(6, 35)] + ["now"]
    assert history[-1]["finished_utc"].endswith("+00:00") and history[-1]["detected"] is False
    assert set(history[-1]) == set(drift_report.HISTORY_KEYS) == set(history[0])


# ------------------------------------------------------------------ report.md and the last lines

def test_markdown_section_has_the_figures_the_reference_and_the_caveat():
    drift = replace(judged(), figures=("drift.png", "drift_trend.png"))
    md = report.report_markdown(result(drift))
    section = md[md.index("## Drift"):]
    assert md.index("## Probability histogram") < md.index("## Drift")
    assert summary_line(drift) in section and "drift: DETECTED (domain AUC 0.712 (limit 0.60)" in section
    assert "| 0.712 (0.60) | 0.234 (0.20) | 0.457 vs 0.381 | 1,200 (1,200 sampled) vs 624 |" in section
    assert "validation split" in section and "prevalence" in section
    assert "not those skipped as already in the ledger" in section
    assert "(drift.png)" in section and "(drift_trend.png)" in section


def test_markdown_section_when_not_judged_without_reference_or_figures():
    section = "\n".join(drift_report.markdown_section(too_few()))
    assert "drift: too few images to judge (42 scored in this run, need 100)" in section
    assert "| n/a (0.60) | n/a (0.20) | 0.457 vs 0.381 | 42 (42 sampled) vs 624 |" in section
    assert ".png)" not in section
    bare = drift_report.markdown_section(no_reference(80))
    assert bare == ["", "## Drift", "", summary_line(no_reference(80))]
    md = report.report_markdown(result(no_reference(80)))  # every run has a drift check, even one not made
    assert md[md.index("## Drift"):].startswith("\n".join(bare[1:]))
    assert "| domain AUC" not in md and ".png)" not in md[md.index("## Drift"):]


def test_summary_has_the_drift_line_after_the_labelled_one_and_the_figures():
    labelled = LabelMetrics(1200, {"accuracy": 0.9, "precision": 0.88, "recall": 0.95, "specificity": 0.85,
                                   "f1": 0.91, "roc_auc": 0.93}, {"tn": 510, "fp": 90, "fn": 30, "tp": 570},
                            ("confusion.png", "roc.png"))
    r = result(replace(judged(detected=False), figures=("drift.png", "drift_trend.png")), labelled)
    lines = report.summary(r, "/out").splitlines()
    assert lines[1].startswith("against folder labels")
    assert lines[2] == ("drift: none (domain AUC 0.523 (limit 0.60), PSI 0.041 (limit 0.20), "
                        "positive rate 0.457 vs 0.381)")
    assert lines[3].endswith("histogram.png, confusion.png, roc.png, drift.png, drift_trend.png")
    plain = report.summary(result(no_reference(1200)), "/out").splitlines()  # no labels, no figures
    assert len(plain) == 3 and plain[1] == summary_line(no_reference(1200))
    assert plain[2].endswith("histogram.png") and "drift" not in plain[2]


# ------------------------------------------------------------------ report.html

def page_for(tmp_path, drift: DriftResult, name: str) -> tuple[str, str]:
    out = tmp_path / name
    out.mkdir()
    if drift.figures:
        assert drift_report.write_figures(str(out), drift, 0.5, MODEL, [point(i) for i in range(5)]) == \
            list(drift.figures)
    html_report.write_html(str(out), result(drift))
    page, text = parse(str(out / "report.html"))
    return open(out / "report.html", encoding="utf-8").read(), text


def test_html_shows_a_detected_banner_the_figures_and_the_card(tmp_path):
    raw, text = page_for(tmp_path, replace(judged(), figures=("drift.png", "drift_trend.png")), "detected")
    assert '<p class="banner detected">' in raw and summary_line(judged()) in text
    assert "DETECTED drift" in text  # the card: value, then key
    assert 'class="num over">0.712' in raw and 'class="num over">0.234' in raw
    for cell in ("limit 0.60", "limit 0.20", "0.457", "0.381", "1,200 (1,200 sampled)", "624", "prevalence"):
        assert cell in text, cell
    assert '<img src="drift.png"' in raw and '<img src="drift_trend.png"' in raw
    assert 'width="520" height="350"' in raw
    assert raw.index('id="worklist"') < raw.index("Probability histogram") < raw.index('id="drift"')
    # QA: the verdict sat ~7,500 px down, after 165 flagged rows; now also in the contents line and above the worklist
    contents = raw[raw.index('id="contents"'):raw.index('id="worklist"')]
    assert 'drift: <b class="over">DETECTED</b>' in contents and 'id="drift-warning"' in contents


def test_the_contents_line_says_the_drift_verdict_and_only_a_detection_warns_above_the_worklist(tmp_path):
    for drift, name, said in ((judged(detected=False), "none", "drift: none"), (too_few(), "few", "drift: not judged")):
        raw, _ = page_for(tmp_path, drift, name)
        contents = raw[raw.index('id="contents"'):raw.index('id="worklist"')]
        assert said in contents and "drift-warning" not in raw


def test_html_banner_for_none_not_judged_and_no_reference(tmp_path):
    raw, text = page_for(tmp_path, judged(detected=False), "none")
    assert '<p class="banner none">' in raw and "none drift" in text and "num over" not in raw
    assert "drift.png" not in raw  # no figures listed: none shown
    raw, text = page_for(tmp_path, too_few(), "few")
    assert '<p class="banner unjudged">' in raw and "not judged drift" in text and "n/a" in text
    raw, text = page_for(tmp_path, no_reference(300), "noref")
    assert '<p class="banner unjudged">' in raw and "no drift reference" in text and "domain AUC" not in text


def test_html_escapes_a_hostile_note(tmp_path):
    drift = failed(42, 0.60, 0.20, "<script>x</script>")
    assert drift.state == FAILED and "<script>x</script>" in summary_line(drift)  # the note is shown
    raw, _ = page_for(tmp_path, drift, "hostile")
    assert "<script>" not in raw and "&lt;script&gt;" in raw


# ------------------------------------------------------------------ ledger

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS scored (
    sha256 TEXT NOT NULL, model TEXT NOT NULL, probability REAL NOT NULL, scored_utc TEXT NOT NULL,
    path TEXT NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (sha256, model)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, out_dir TEXT NOT NULL, model TEXT NOT NULL, images_new INTEGER NOT NULL,
    finished_utc TEXT NOT NULL
);
"""


def test_ledger_commits_drift_and_returns_the_last_runs_of_the_version_oldest_first(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    with Ledger(path) as book:
        assert book.drift_history(MODEL, 29) == []
        for i in range(35):
            block = judged(detected=i % 5 == 0) if i % 7 else too_few()
            assert book.commit(f"r{i}", f"/out/{i}", MODEL, [(f"{i:064x}", 0.5, f"/x/{i}.png")], drift=block) == 1
            book.commit(f"other{i}", "/out/o", "pneumonia/2", [], drift=judged())
        book.commit("noref", "/out/n", MODEL, [], drift=no_reference(300))  # no reference: no drift row
        book.commit("older-code", "/out/c", MODEL, [])  # no drift result at all
        history = book.drift_history(MODEL, 29)
        assert len(book.drift_history(MODEL, 100)) == 35 and book.drift_history(MODEL, 0) == []
    assert [h["run_id"] for h in history] == [f"r{i}" for i in range(6, 35)]
    assert history[-1] == {"run_id": "r34", "finished_utc": history[-1]["finished_utc"], "images": 1200,
                           "judged": True, "detected": False, "domain_auc": 0.5234, "psi": 0.0412,
                           "positive_rate": 0.4567, "domain_auc_limit": 0.60, "psi_limit": 0.20}
    unjudged = history[[h["run_id"] for h in history].index("r14")]
    assert unjudged["judged"] is False and unjudged["domain_auc"] is None and unjudged["psi"] is None
    assert history[[h["run_id"] for h in history].index("r10")]["detected"] is True
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 72
        assert conn.execute("SELECT COUNT(*) FROM drift WHERE model = 'pneumonia/2'").fetchone()[0] == 35


def test_a_ledger_from_before_the_drift_table_opens_and_commits_with_drift(tmp_path):
    path = str(tmp_path / "old.sqlite")
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO scored VALUES (?, ?, 0.7, '2024-01-01T00:00:00+00:00', '/x/a.png', 'old')",
                     ("a" * 64, MODEL))
        conn.execute("INSERT INTO runs VALUES ('old', '/out/old', ?, 1, '2024-01-01T00:00:00+00:00')", (MODEL,))
    conn.close()
    with Ledger(path) as book:
        assert book.drift_history(MODEL, 29) == []
        assert book.commit("new", "/out/new", MODEL, [("a" * 64, 0.1, "/x/a.png"), ("b" * 64, 0.2, "/x/b.png")],
                           drift=judged()) == 1
        assert [h["run_id"] for h in book.drift_history(MODEL, 29)] == ["new"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall() == [("new",), ("old",)]


def test_the_ledger_keeps_each_runs_limits_and_has_none_for_runs_before_it_kept_them(tmp_path):
    """The PSI's default limit depends on the run's size (drift.psi_limit_for), so the trend needs each run's."""
    path = str(tmp_path / "ledger.sqlite")
    with Ledger(path) as book:
        book.commit("small", "/out/s", MODEL, [], drift=replace(judged(), images=132, psi_limit=0.4449))
        book.commit("given", "/out/g", MODEL, [], drift=replace(judged(), domain_auc_limit=0.7, psi_limit=0.3))
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM drift_limits WHERE run_id = 'small'")  # as a run committed before the table
    conn.close()
    with Ledger(path) as book:
        history = book.drift_history(MODEL, 29)
    assert [(h["run_id"], h["domain_auc_limit"], h["psi_limit"]) for h in history] == [
        ("small", None, None), ("given", 0.7, 0.3)]


def test_the_trend_draws_each_runs_own_limit_and_marks_against_it():
    """A small night's PSI of 0.35 under its own limit of 0.45 is not red, a large night's 0.25 over 0.20 is;
    a run without recorded limits is judged against tonight's."""
    history = [{**point(0), "psi": 0.35, "psi_limit": 0.45, "domain_auc_limit": 0.6},
               {**point(1, detected=True), "psi": 0.25, "psi_limit": 0.20, "domain_auc_limit": 0.6},
               {**point(2), "psi": 0.10}, {**point(3, judged_=False), "psi_limit": 0.20}]
    psi_limits = drift_report.limits(history, "psi_limit", 0.30)
    assert psi_limits[:3].tolist() == [0.45, 0.20, 0.30] and np.isnan(psi_limits[3])  # not judged: no limit drawn
    detected = np.array([h["detected"] for h in history])
    assert drift_report.marked(drift_report._series(history, "psi"), psi_limits, detected).tolist() == [
        False, True, False, False]


def test_a_failed_drift_insert_rolls_back_the_whole_commit(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    with Ledger(path) as book:
        book.commit("r1", "/out/1", MODEL, [], drift=judged())
        with pytest.raises(sqlite3.IntegrityError):  # images NOT NULL: the drift row cannot be inserted
            book.commit("r2", "/out/2", MODEL, [("c" * 64, 0.3, "/x/c.png")], drift=replace(judged(), images=None))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM scored").fetchone()[0] == 0
        assert conn.execute("SELECT run_id FROM runs").fetchall() == [("r1",)]


def test_the_roc_figure_names_its_axes_in_the_reports_words(tmp_path, monkeypatch):
    """Not scikit-learn's "(Positive label: 1)" (QA): recall and 1 - specificity, as the report's table says."""
    from xray_core import plots

    drawn = []
    monkeypatch.setattr(plots, "save", lambda fig, path, **_: drawn.append(fig))
    y = np.array([0, 0, 1, 1, 0, 1])
    plots.roc_curve_png(y, np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9]), str(tmp_path / "roc.png"), "ROC", threshold=0.5)
    ax = drawn[0].axes[0]
    assert ax.get_xlabel() == "false positive rate (1 - specificity)"
    assert ax.get_ylabel() == "true positive rate (recall)"
