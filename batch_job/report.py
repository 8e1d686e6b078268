"""The job's report: metrics.json, report.md and histogram.png (scikit-learn, matplotlib), and its last lines;
report.md's drift section and figures come from drift_report.py."""
from __future__ import annotations

import json
import os

import numpy as np

from batch_job import drift_report
from batch_job.drift import summary_line
from xray_core.plots import pyplot, save


def write_metrics(out_dir: str, metrics: dict) -> None:
    """metrics.json and report.md (the same as tables) in out_dir."""
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(metrics))


def compute_metrics(rec: dict, threshold: float, model_id: str, runner: str) -> dict:
    """metrics.json content; labelled metrics (scikit-learn) when any scored image has a folder label.

    The caller adds the timings (:func:`add_timings`) once the histogram is drawn."""
    from xray_core.metrics import operating_point

    probs = rec["probabilities"]
    hist, edges = np.histogram(probs, bins=10, range=(0.0, 1.0))
    positives = int(np.sum(probs >= threshold))
    out = {
        "images_found": rec["images_found"],
        "images_scored": rec["images_scored"],
        "images_failed": rec["images_failed"],
        "images_skipped": rec["images_skipped"],
        "positive_count": positives,
        "positive_rate": positives / len(probs) if len(probs) else 0.0,
        "probability_histogram": {"bin_edges": [round(float(e), 2) for e in edges], "counts": hist.tolist()},
        "per_input": rec["per_input"],
        "model": model_id,
        "threshold": threshold,
        "runner": runner,
    }
    labelled = np.asarray([lab != "" for lab in rec["labels"]], dtype=bool)
    if labelled.any():
        y = np.asarray([lab == "PNEUMONIA" for lab in np.asarray(rec["labels"])[labelled]], dtype=int)
        point = operating_point(y, probs[labelled], threshold)
        out["labelled_images"] = int(labelled.sum())
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
            out[key] = point[key]
        out["confusion_matrix"] = point["confusion_matrix"]
    return out


def add_timings(metrics: dict, setup_s: float, scoring_s: float, report_s: float, heatmaps_s: float = 0.0) -> dict:
    """Wall time of the job's phases: setup (arguments, model verification, listing), scoring (the
    Beam pipeline, worker start included) and report (reconciliation, heatmap overlays, metrics, figures);
    heatmaps_s: the overlays' part of the report phase."""
    wall = setup_s + scoring_s + report_s
    n = metrics["images_found"]
    metrics["wall_seconds"] = round(wall, 3)
    metrics["images_per_second"] = round(n / wall, 2) if wall > 0 else None
    metrics["timings"] = {"setup_seconds": round(setup_s, 3), "scoring_seconds": round(scoring_s, 3),
                          "report_seconds": round(report_s, 3), "heatmaps_seconds": round(heatmaps_s, 3),
                          "scoring_images_per_second": round(n / scoring_s, 2) if scoring_s > 0 else None}
    return metrics


def write_histogram(path: str, probs: np.ndarray, threshold: float, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.hist(probs, bins=10, range=(0, 1), color="steelblue", edgecolor="white")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("P(pneumonia)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    save(fig, path)


def report_markdown(m: dict) -> str:
    lines = ["# Batch scoring report", "",
             f"Model `{m['model']}`, threshold {m['threshold']:.4f}, runner {m['runner']}, "
             f"{m['wall_seconds']:.1f} s, {m['images_per_second']} images/s.", "",
             "| images found | scored | failed | skipped (in ledger) | positive | positive rate |",
             "|---|---|---|---|---|---|",
             f"| {m['images_found']} | {m['images_scored']} | {m['images_failed']} | {m['images_skipped']} "
             f"| {m['positive_count']} | {m['positive_rate']:.4f} |", "", "## Per input", "",
             "| input | found | scored | failed | skipped |", "|---|---|---|---|---|"]
    lines += [f"| `{k}` | {v['found']} | {v['scored']} | {v['failed']} | {v['skipped']} |"
              for k, v in m["per_input"].items()]
    h = m["probability_histogram"]
    lines += ["", "## Probability histogram", "", "| bin | images |", "|---|---|"]
    lines += [f"| {lo:.1f}–{hi:.1f} | {c} |" for lo, hi, c in zip(h["bin_edges"], h["bin_edges"][1:], h["counts"])]
    lines += ["", "![histogram](histogram.png)"]
    lines += drift_report.markdown_section(m)
    heat = m.get("heatmaps")
    if heat and heat["requested"]:
        lines += ["", "## Heatmaps", "",
                  f"{heat['written']} overlays in `heatmaps/` (the top flagged images scored in this run, "
                  f"`--heatmaps {heat['requested']}`); see report.html." if heat["model_has_heatmaps"]
                  else "None: the model has no heatmap output."]
    if "accuracy" in m:
        cm = m["confusion_matrix"]
        lines += ["", f"## Against folder labels ({m['labelled_images']} labelled images)", "",
                  "| accuracy | precision | recall | specificity | F1 | ROC AUC |", "|---|---|---|---|---|---|",
                  "| " + " | ".join("n/a" if m[k] is None else f"{m[k]:.4f}" for k in
                                   ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")) + " |",
                  "", "| true \\ predicted | NORMAL | PNEUMONIA |", "|---|---|---|",
                  f"| NORMAL | {cm['tn']} | {cm['fp']} |", f"| PNEUMONIA | {cm['fn']} | {cm['tp']} |"]
    return "\n".join(lines) + "\n"


def summary(m: dict, out: str) -> str:
    """The job's last lines on stdout."""
    line = (f"scored {m['images_scored']}/{m['images_found']} images ({m['images_failed']} failed, "
            f"{m['images_skipped']} skipped as already in the ledger) with "
            f"{m['model']} on {m['runner']} in {m['wall_seconds']:.1f}s ({m['images_per_second']} images/s); "
            f"{m['positive_count']} flagged PNEUMONIA (rate {m['positive_rate']:.3f}, threshold {m['threshold']:.4f})")
    if "accuracy" in m:
        line += (f"\nagainst folder labels ({m['labelled_images']}): accuracy {m['accuracy']:.4f}, recall "
                 f"{m['recall']:.4f}, specificity {m['specificity']:.4f}, ROC AUC "
                 + ("n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"))
    if "drift" in m:
        line += "\n" + summary_line(m["drift"])
    heat = m.get("heatmaps", {})
    drift_files = "".join(f", {f}" for f in m.get("drift", {}).get("figures", []))
    return line + (f"\noutputs in {out}: report.html, predictions-*.csv, metrics.json, report.md, histogram.png"
                   + drift_files + (f", heatmaps/ ({heat['written']})" if heat.get("written") else ""))
