"""The report's figures against folder labels: confusion.png and roc.png (xray_core.plots)."""
from __future__ import annotations

import os

import numpy as np

from batch_job.reconcile import Reconciliation
from xray_core.plots import confusion_matrix_png, roc_curve_png

CONFUSION_FILE = "confusion.png"
ROC_FILE = "roc.png"


def labelled(rec: Reconciliation) -> tuple[np.ndarray, np.ndarray]:
    """(y: 1 for a PNEUMONIA folder label, probabilities) of the images with a folder label."""
    labels = np.asarray(rec.labels, dtype=object)
    mask = labels != ""
    return (labels[mask] == "PNEUMONIA").astype(int), np.asarray(rec.probabilities, dtype=np.float64)[mask]


def write_labelled_figures(out_dir: str, rec: Reconciliation, threshold: float) -> list[str]:
    """confusion.png when images have folder labels, roc.png when both labels occur; -> the files written."""
    y, p = labelled(rec)
    written = []
    if len(y):
        confusion_matrix_png(y, p, threshold, os.path.join(out_dir, CONFUSION_FILE), "Confusion matrix",
                             true_label="folder label")
        written.append(CONFUSION_FILE)
    if len(set(y.tolist())) == 2:
        roc_curve_png(y, p, os.path.join(out_dir, ROC_FILE), "ROC", threshold=threshold)
        written.append(ROC_FILE)
    return written
