"""The confusion-matrix and ROC figures that training and the batch job both draw (scikit-learn displays,
matplotlib), and the two helpers every figure uses. matplotlib is imported on first use: a job that draws
nothing does not pay for it."""
from __future__ import annotations

import numpy as np

from xray_core.labels import CLASSES


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int = 100, tight: bool = True) -> None:
    """Lay out (tight: matplotlib's tight_layout, a drawing pass of its own), write and close a figure."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def confusion_matrix_png(y_true, y_prob, threshold: float, path: str, title: str,
                         true_label: str = "true label") -> None:
    """Rows: the true class, columns: the prediction at `threshold` (PNEUMONIA when probability >= it)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = pyplot().subplots(figsize=(4.5, 4))
    y_pred = (np.asarray(y_prob) >= threshold).astype(int)
    ConfusionMatrixDisplay.from_predictions(np.asarray(y_true).astype(int), y_pred, labels=[0, 1],
                                            display_labels=list(CLASSES), ax=ax, colorbar=False, cmap="Blues")
    ax.set_xlabel(f"prediction (threshold {threshold:.3f})")
    ax.set_ylabel(true_label)
    ax.set_title(title)
    save(fig, path)


def roc_curve_png(y_true, y_prob, path: str, name: str, title: str = "ROC curve",
                  threshold: float | None = None) -> None:
    """The ROC curve, with the operating point at `threshold` marked when one is given."""
    from sklearn.metrics import RocCurveDisplay

    y_true, y_prob = np.asarray(y_true).astype(int), np.asarray(y_prob, dtype=np.float64)
    fig, ax = pyplot().subplots(figsize=(4.5, 4))
    RocCurveDisplay.from_predictions(y_true, y_prob, name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")  # sklearn's: "(Positive label: 1)" (QA)
    ax.set_ylabel("true positive rate (recall)")
    if threshold is not None:
        pred = y_prob >= threshold
        ax.plot(float(np.mean(pred[y_true == 0])), float(np.mean(pred[y_true == 1])), "o", color="red",
                label=f"threshold {threshold:.3f}")
        ax.legend(loc="lower right")
    ax.set_title(title)
    save(fig, path)
