"""The drift part of the report: drift.png, drift_trend.png and report.md's "Drift" section.

The statistics are batch_job/drift.py's DriftResult; this module only draws and words them (matplotlib, imported
on first use). The driver writes the figures (:func:`write_figures`) before the ledger commit, and the result's
`figures` names what was written into OUT_DIR (a subset of [DRIFT_FILE, TREND_FILE], in that order): report.md,
report.html and the job's last lines show and list only those. The trend covers the last TREND_RUNS runs of the
same model version (`<name>/<version>`) in the ledger, this run last; without a ledger (or without a reference)
there is none.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np

from batch_job.drift import PSI_LIMIT, DriftResult, summary_line
from batch_job.ledger import DRIFT_COLUMNS, LIMIT_COLUMNS
from xray_core.plots import pyplot, save

DRIFT_FILE = "drift.png"
TREND_FILE = "drift_trend.png"
TREND_RUNS = 30
HISTORY_KEYS = DRIFT_COLUMNS + LIMIT_COLUMNS  # a trend point: a row of the ledger's drift table and its limits
FIGSIZE = (5.2, 3.5)  # inches at DPI: both figures are 520 x 350 pixels, side by side in report.html
DPI = 100
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
REFERENCE_NAME = "the model's validation split"
CAVEAT = ("A change in prevalence alone (more or fewer pneumonia cases) also moves both figures, hence the "
          "positive rate beside them.")


def histogram_png(path: str, drift: DriftResult, threshold: float, title: str) -> None:
    """The reference's and this run's probability histograms overlaid, each bin as a share of its own images:
    the shares drift.py computed (the block's `histogram`), drawn as they are."""
    edges, hist = drift.histogram["bin_edges"], drift.histogram
    ref_shares, shares = hist["reference_shares"], hist["shares"]
    fig, ax = pyplot().subplots(figsize=FIGSIZE)
    ax.stairs(ref_shares, edges, fill=True, color="#b8c2cc",
              label=f"reference: validation split ({drift.reference_images:,})")
    ax.stairs(shares, edges, linewidth=2, color="steelblue", label=f"this run ({drift.images:,})")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.5 * max(max(ref_shares), max(shares), 0.05))  # room for the legend
    ax.set_xlabel("P(pneumonia)")
    ax.set_ylabel("share of images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.14)  # fixed margins: no layout pass to pay for
    save(fig, path, DPI, tight=False)


def _series(history: list[dict], key: str) -> np.ndarray:
    """One figure per run; NaN where the run was not judged (a gap in the line)."""
    return np.array([np.nan if h.get(key) is None or not h["judged"] else float(h[key]) for h in history])


def limits(history: list[dict], key: str, fallback: float) -> np.ndarray:
    """Each judged run's limit of a figure as the ledger recorded it, `fallback` where it recorded none (a run
    committed before table drift_limits); NaN for a run not judged (no limit applied: a gap in the step)."""
    return np.array([np.nan if not h["judged"] else fallback if h.get(key) is None else float(h[key])
                     for h in history])


def marked(values: np.ndarray, limit: np.ndarray | float, detected: np.ndarray) -> np.ndarray:
    """The runs red on a figure's panel: drift detected that night and this figure over the limit drawn for it (a
    run's drift is detected when either figure is over its limit; QA read a red PSI under its limit as PSI's doing).
    A run not judged (NaN) is not."""
    return detected & (np.nan_to_num(values, nan=-np.inf) > limit)


def detected_elsewhere(detected: np.ndarray, *marks: np.ndarray) -> np.ndarray:
    """The runs whose drift was detected but whose figures are all within the limits drawn: runs from before the
    ledger kept each run's limits, judged under other --drift-*-limit values. Ringed in red on both panels, so that
    no detection drops out of the trend (QA)."""
    return detected & ~np.logical_or.reduce(marks)


def _panel(ax, x: np.ndarray, values: np.ndarray, limit: np.ndarray, name: str, floor: float,
           red: np.ndarray, ringed: np.ndarray) -> None:
    ax.plot(x, values, "-o", color="steelblue", markersize=3.5, linewidth=1.2)
    if red.any() or not ringed.any():  # the legend's entries: the marks drawn (at most two beside the title)
        ax.plot(x[red], values[red], "o", color="#b3261e", markersize=7, label="over the limit: drift detected")
    if ringed.any():
        ax.plot(x[ringed], values[ringed], "o", markerfacecolor="none", markeredgecolor="#b3261e", markersize=8,
                label="detected (other limits)")
    # each run's limit across its slot (the PSI's default grows as a run shrinks), tonight's written beyond the axes
    ax.stairs(limit, np.arange(len(limit) + 1) + 0.5, baseline=None, color="#b3261e", linestyle="--", linewidth=1,
              label="limit")
    drawn = limit[~np.isnan(limit)]
    if len(drawn):  # the last judged run's, beyond the axes
        ax.text(1.01, drawn[-1], f"{drawn[-1]:.2f}", transform=ax.get_yaxis_transform(), ha="left", va="center",
                color="#b3261e", fontsize=7)
    seen = values[~np.isnan(values)]
    if not len(seen):
        ax.text(0.5, 0.5, "not judged", transform=ax.transAxes, ha="center", va="center", color="#6b7580")
    top = max(float(drawn.max()) if len(drawn) else floor + 0.1, float(seen.max()) if len(seen) else floor)
    bottom = min(floor, float(seen.min()) if len(seen) else floor)
    ax.set_ylim(bottom, top + 0.15 * max(top - bottom, 0.1))
    ax.set_ylabel(name)
    ax.grid(axis="y", alpha=0.3)


def trend_png(path: str, history: list[dict], auc_limit: float, psi_limit: float) -> None:
    """Domain AUC and PSI of the runs in `history` (oldest first, this run last), each against its run's limit
    (`auc_limit`, `psi_limit`: for runs the ledger kept no limits for); a run's figure in red where
    drift was detected that night and the figure is over its limit, a run detected under other limits ringed in red,
    runs not judged left as gaps."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    x = np.arange(1, len(history) + 1)
    detected = np.array([bool(h["detected"]) for h in history], dtype=bool)
    auc, psi = _series(history, "domain_auc"), _series(history, "psi")
    auc_limits, psi_limits = limits(history, "domain_auc_limit", auc_limit), limits(history, "psi_limit", psi_limit)
    red_auc, red_psi = marked(auc, auc_limits, detected), marked(psi, psi_limits, detected)
    ringed = detected_elsewhere(detected, red_auc, red_psi)
    fig, (top, bottom) = pyplot().subplots(2, 1, sharex=True, figsize=FIGSIZE)
    _panel(top, x, auc, auc_limits, "domain AUC", 0.45, red_auc, ringed)
    _panel(bottom, x, psi, psi_limits, "PSI", 0.0, red_psi, ringed)
    bottom.set_xlim(0.5, len(history) + 0.5)
    bottom.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))  # review: ten MM-DD labels ran together
    days = [h["finished_utc"][5:10] for h in history]  # QA: run numbers alone did not say which night a point was
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: days[int(v) - 1] if v == int(v) and 1 <= v <= len(days)
                                                   else ""))
    bottom.tick_params(axis="x", labelsize=7.5)
    first, last = (h["finished_utc"][:10] for h in (history[0], history[-1]))
    dates = last if first == last else f"{first} to {last[5:] if first[:4] == last[:4] else last}"
    gaps = "; gap: not judged" if not all(h["judged"] for h in history) else ""
    bottom.set_xlabel(f"run, by UTC day ({dates}; the last is this run{gaps})", fontsize=8)
    runs = f"last {len(history)} runs" if len(history) > 1 else "1 run so far"
    top.set_title(f"Drift: {runs}", fontsize=10, loc="left")  # of this version (QA: a longer title met the legend)
    top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=7.5,
               borderaxespad=0.2, handletextpad=0.3, columnspacing=1.0)
    save(fig, path, DPI)


def history_entry(run_id: str, drift: DriftResult) -> dict:
    """This run as one point of the trend (the shape of Ledger.drift_history's entries), finished now."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return dict(zip(HISTORY_KEYS, (run_id, now, drift.images, drift.judged, drift.detected, drift.domain_auc,
                                   drift.psi, drift.positive_rate, drift.domain_auc_limit, drift.psi_limit)))


def trend_history(book, model_id: str, run_id: str, drift: DriftResult) -> list[dict] | None:
    """The trend's points: the ledger's last TREND_RUNS - 1 runs of this model version, then this run; None
    without a ledger (book None) or without a drift reference."""
    if book is None or not drift.reference:
        return None
    return book.drift_history(model_id, TREND_RUNS - 1) + [history_entry(run_id, drift)]


def write_figures(out_dir: str, drift: DriftResult, threshold: float, model_id: str,
                  history: list[dict] | None = None) -> list[str]:
    """drift.png when the model has a drift reference and this run scored any image, drift_trend.png when it
    has one and `history` has a run (without a reference the ledger keeps no drift rows: nothing to trend);
    -> the names written (the result's `figures`)."""
    written = []
    if not drift.reference:
        return written
    if drift.images and drift.histogram is not None:  # a check that failed has no histogram
        histogram_png(os.path.join(out_dir, DRIFT_FILE), drift, threshold,
                      f"{model_id}: this run vs its validation split")
        written.append(DRIFT_FILE)
    if history:
        # runs from before the ledger kept limits: judged under the fixed default when tonight's is the sized one
        trend_png(os.path.join(out_dir, TREND_FILE), history[-TREND_RUNS:], drift.domain_auc_limit,
                  PSI_LIMIT if drift.psi_limit_sized else drift.psi_limit)
        written.append(TREND_FILE)
    return written


def _number(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def figures_row(drift: DriftResult) -> dict:
    """The table's cells as text: domain AUC, PSI (n/a when not judged), positive rates, image counts."""
    sampled = f" ({drift.sampled:,} sampled)" if drift.sampled is not None else ""
    return {"domain_auc": _number(drift.domain_auc), "auc_limit": f"{drift.domain_auc_limit:.2f}",
            "psi": _number(drift.psi), "psi_limit": f"{drift.psi_limit:.2f}",
            "positive_rate": _number(drift.positive_rate),
            "reference_positive_rate": _number(drift.reference_positive_rate),
            "images": f"{drift.images:,}{sampled}", "reference_images": _number(drift.reference_images, ",")}


def explanation(drift: DriftResult) -> str:
    """What the figures compare, in two sentences, and the prevalence caveat."""
    sized = (f" The PSI's limit is the larger of {PSI_LIMIT:.2f} and what 99.9% of runs of {drift.images:,} images "
             f"drawn from {REFERENCE_NAME} stay under: a small run's histogram is noisy."
             if drift.judged and drift.psi_limit_sized else "")
    return (f"Domain AUC: how well a classifier tells this run's images from {REFERENCE_NAME} (0.5: it cannot); "
            f"PSI: how far the probability histogram moved. They cover the {drift.images:,} images scored in "
            f"this run, not those skipped as already in the ledger.{sized} {CAVEAT}")


def markdown_section(drift: DriftResult) -> list[str]:
    """report.md's "Drift" section."""
    lines = ["", "## Drift", "", summary_line(drift)]
    if drift.reference:
        r = figures_row(drift)
        lines += ["", "| domain AUC (limit) | PSI (limit) | positive rate: this run vs reference "
                      "| images scored (sampled) vs reference images |", "|---|---|---|---|",
                  f"| {r['domain_auc']} ({r['auc_limit']}) | {r['psi']} ({r['psi_limit']}) "
                  f"| {r['positive_rate']} vs {r['reference_positive_rate']} "
                  f"| {r['images']} vs {r['reference_images']} |",
                  "", explanation(drift)]
    alts = {DRIFT_FILE: "probabilities: this run vs the validation split", TREND_FILE: "drift trend"}
    shown = [f"![{alts[f]}]({f})" for f in drift.figures if f in alts]
    return lines + (["", *shown] if shown else [])
