"""The job's report: metrics.json, report.md and histogram.png (matplotlib), and its last lines, from the run's
typed result (result.py); report.md's drift section comes from drift_report.py."""
from __future__ import annotations

import json
import os

import numpy as np

from batch_job import drift_report, html_report
from batch_job.drift import summary_line
from batch_job.result import RunResult
from xray_core.plots import pyplot, save


def write_metrics(out_dir: str, result: RunResult) -> None:
    """metrics.json and report.md (the same as tables) in out_dir."""
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result.metrics(), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(result))


def write_histogram(path: str, probs: np.ndarray, threshold: float, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.hist(probs, bins=10, range=(0, 1), color="steelblue", edgecolor="white")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("P(pneumonia)")
    ax.set_ylabel("images")
    if not len(probs):  # a quiet night: an axis of whole images from 0, not matplotlib's -0.04..0.04 (QA)
        ax.set_ylim(0, 1)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.text(0.5, 0.5, "no image scored in this run", transform=ax.transAxes, ha="center", color="#6b7580")
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def _score(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _rate(r: RunResult, digits: int = 4) -> str:
    return "n/a" if r.positive_rate is None else f"{r.positive_rate:.{digits}f}"


def heatmaps_line(r: RunResult) -> str:
    """report.md's Heatmaps section (with --heatmaps N > 0)."""
    if not r.heatmaps.model_has_heatmaps:
        return "None: the model has no heatmap output."
    if not r.flagged:
        return "None: no image scored in this run was flagged."
    drawn = (f"{r.overlays_written} overlays in `heatmaps/` (the top {len(r.flagged)} flagged images scored in this "
             f"run, `--heatmaps {r.heatmaps.requested}`; see report.html)" if r.overlays_written else
             f"None drawn: the originals of the top {len(r.flagged)} flagged images could no longer be read (see "
             "report.html and the log)")
    return f"{drawn}. {html_report.map_limits(html_report.map_cells(r))}"


def report_markdown(r: RunResult) -> str:
    c = r.counts
    lines = ["# Batch scoring report", "",
             f"Model `{r.model}`, threshold {r.threshold_text()}, runner {r.runner}, "
             f"{r.wall_seconds:.1f} s, {r.images_per_second} images/s.", "",
             f"A screening aid, not a diagnosis. Trained on {r.trained_on}", "",
             *([f"**Below the quality floor:** {r.below_floor}. Trust its flags less than the floor promises; see "
                f"the model card.", ""] if r.below_floor else []),
             "| images found | scored | failed | out of scope | skipped (in ledger) | positive | positive rate |",
             "|---|---|---|---|---|---|---|",
             f"| {c.found} | {c.scored} | {c.failed} | {c.out_of_scope} | {c.skipped} | {r.positive_count} | "
             f"{_rate(r)} |", "",
             "## Per input", "", "| input | found | scored | failed | out of scope | skipped |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{k}` | {v['found']} | {v['scored']} | {v['failed']} | {v.get('out_of_scope', 0)} | {v['skipped']} |"
              for k, v in c.per_input.items()]
    if len(c.per_input) > 1:
        lines += ["", html_report.PER_INPUT_NOTE]
    if r.skipped_to_read:
        where = f" Their worklists, the latest first: {'; '.join(r.earlier_lines())}." if r.earlier_lines() else ""
        lines += ["", f"**{r.skipped_to_read}{where}**"]
    if c.skipped_new_name:
        lines += ["", html_report.new_name_note(c)]
    counts, edges = r.probability_histogram()
    lines += ["", "## Probability histogram", "", "| bin | images |", "|---|---|"]
    lines += [f"| {lo:.1f}–{hi:.1f} | {n} |" for lo, hi, n in zip(edges, edges[1:], counts)]
    lines += ["", "![histogram](histogram.png)"]
    lines += drift_report.markdown_section(r.drift)
    if r.heatmaps.requested:
        lines += ["", "## Heatmaps", "", heatmaps_line(r)]
    if r.labelled is not None:
        cm, s = r.labelled.confusion_matrix, r.labelled.scores
        lines += ["", f"## Against folder labels ({r.labelled.images} labelled images)", "",
                  "| accuracy | precision | recall | specificity | F1 | ROC AUC |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(_score(s[k]) for k in ("accuracy", "precision", "recall", "specificity", "f1",
                                                          "roc_auc")) + " |",
                  "", "| true \\ predicted | NORMAL | PNEUMONIA |", "|---|---|---|",
                  f"| NORMAL | {cm['tn']} | {cm['fp']} |", f"| PNEUMONIA | {cm['fn']} | {cm['tp']} |"]
    return "\n".join(lines) + "\n"


def summary(r: RunResult, out: str) -> str:
    """The job's last lines on stdout."""
    c = r.counts
    new_names = f", {c.skipped_new_name} of them under a name new to it" if c.skipped_new_name else ""
    earlier = (f"; {r.skipped_flagged} flagged, {r.skipped_unscreened} not screened on earlier nights"
               if r.skipped_flagged or r.skipped_unscreened else "")
    line = (f"scored {c.scored}/{c.found} images ({c.failed} failed, {c.out_of_scope} out of scope, {c.skipped} "
            f"skipped as already in the ledger{new_names}{earlier}) "
            f"with {r.model} on {r.runner} in {r.wall_seconds:.1f}s ({r.images_per_second} images/s); "
            f"{r.positive_count} flagged PNEUMONIA (rate {_rate(r, 3)}, threshold {r.threshold_text()})")
    if r.labelled is not None:
        s = r.labelled.scores
        line += (f"\nagainst folder labels ({r.labelled.images}): accuracy {_score(s['accuracy'])}, recall "
                 f"{_score(s['recall'])}, specificity {_score(s['specificity'])}, ROC AUC {_score(s['roc_auc'])}")
    line += "\n" + summary_line(r.drift)
    files = ["report.html", "worklist.csv", "predictions-*.csv", "metrics.json", "report.md"]
    label_figures = r.labelled.figures if r.labelled else ()
    files += ["model_card.md"] * bool(r.model_card) + ["histogram.png", *label_figures, *r.drift.figures]
    files += [f"heatmaps/ ({r.overlays_written})"] * bool(r.overlays_written)
    thumbnails = sum(map(bool, r.thumbnails.values()))
    files += [f"out_of_scope/ ({thumbnails})"] * bool(thumbnails)
    return line + f"\noutputs in {out}: {', '.join(files)}"
