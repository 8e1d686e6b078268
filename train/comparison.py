"""One row per model for comparison.json, and comparison.md with internal test and site side by side."""
from __future__ import annotations

import numpy as np

POINT_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def summary_row(name: str, m: dict, history: dict) -> dict:
    row = {"model": name, "val_roc_auc": m["val_roc_auc"], "chosen_threshold": m["chosen_threshold"],
           "best_epoch": history["best_epoch"], "epochs_run": len(history["loss"]),
           "seconds_per_epoch": float(np.mean(history["seconds"])),
           "train_minutes": float(sum(history["seconds"]) / 60)}
    for key in ("pr_auc", "specificity", "f1", "accuracy"):
        row[f"val_{key}"] = m["val_at_chosen"][key]
    points = ["test_at_0.5", "test_at_chosen"]
    if "site_at_0.5" in m:
        row["site_roc_auc"] = m["site_roc_auc"]
        row["site_specificity_at_target_recall"] = m["site_at_site_threshold"]["specificity"]
        points += ["site_at_0.5", "site_at_chosen"]
    for point in points:
        for key in POINT_KEYS:
            row[f"{point}.{key}"] = m[point][key]
    return row


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def comparison_markdown(rows: list[dict], best: str, select_by: str, skipped) -> str:
    has_site = all("site_roc_auc" in r for r in rows)
    lines = [f"# Model comparison\n\nBest by `{select_by}`: **{best}**\n"]
    if has_site:
        lines += [
            "## Site sample first (a later collection: what new scans will look like)\n",
            "The threshold `chosen` comes from the internal validation split; `spec@recall` is the specificity at the",
            "most specific threshold reaching the target recall on the site sample itself (optimistic).\n",
            "| model | site ROC AUC | spec@recall (site) | internal test ROC AUC | point | accuracy | recall | specificity | F1 |",
            "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for point, label in (("site_at_0.5", "0.5"), ("site_at_chosen", "chosen")):
                lines.append(
                    f"| {r['model']} | {_fmt(r['site_roc_auc'])} | {_fmt(r['site_specificity_at_target_recall'])} | "
                    f"{_fmt(r['test_at_0.5.roc_auc'])} | {label} ({r['chosen_threshold'] if label != '0.5' else 0.5:.4f}) | "
                    + " | ".join(_fmt(r[f"{point}.{k}"]) for k in ("accuracy", "recall", "specificity", "f1")) + " |")
        lines.append("\n## Internal test split (same collection as training: overestimates)\n")
    lines += ["| model | val ROC AUC | threshold | point | accuracy | precision | recall | specificity | F1 | ROC AUC | s/epoch | train min |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for point, label in (("test_at_0.5", "0.5"), ("test_at_chosen", "chosen")):
            lines.append(
                f"| {r['model']} | {r['val_roc_auc']:.4f} | {r['chosen_threshold']:.4f} | {label} | "
                + " | ".join(_fmt(r[f"{point}.{k}"]) for k in
                             ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"))
                + f" | {r['seconds_per_epoch']:.1f} | {r['train_minutes']:.1f} |")
    lines.append(f"\nSkipped images (undecodable, or out of scope for the batch job): {len(skipped)}")
    lines += [f"- `{p}`: {err}" for p, err in skipped]
    return "\n".join(lines) + "\n"
