"""The report's figures against folder labels: confusion.png and roc.png (scikit-learn, matplotlib)."""
from __future__ import annotations

import os

import numpy as np

CONFUSION_FILE = "confusion.png"
ROC_FILE = "roc.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def labelled(rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(y: 1 for a PNEUMONIA folder label, probabilities) of the images with a folder label."""
    labels = np.asarray(rec["labels"], dtype=object)
    mask = labels != ""
    return (labels[mask] == "PNEUMONIA").astype(int), np.asarray(rec["probabilities"], dtype=np.float64)[mask]


def write_confusion(path: str, cm: dict, threshold: float) -> None:
    """The 2x2 confusion matrix (rows: folder label, columns: prediction), counts written in the cells."""
    plt = _pyplot()
    m = np.asarray([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=14,
                color="white" if count > m.max() / 2 else "black")
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_xlabel(f"prediction (threshold {threshold:.3f})")
    ax.set_ylabel("folder label")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_roc(path: str, y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    """The ROC curve (scikit-learn) with the operating point at the threshold marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(y, p)
    pred = p >= threshold
    point = (float(np.mean(pred[y == 0])), float(np.mean(pred[y == 1])))
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.plot(fpr, tpr, color="steelblue", label=f"ROC (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.plot(*point, "o", color="red", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title("ROC curve")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_labelled_figures(out_dir: str, rec: dict, metrics: dict) -> list[str]:
    """confusion.png when images have folder labels, roc.png when both labels occur; -> the files written."""
    y, p = labelled(rec)
    written = []
    if "confusion_matrix" in metrics:
        write_confusion(os.path.join(out_dir, CONFUSION_FILE), metrics["confusion_matrix"], metrics["threshold"])
        written.append(CONFUSION_FILE)
    if len(set(y.tolist())) == 2:
        write_roc(os.path.join(out_dir, ROC_FILE), y, p, metrics["threshold"])
        written.append(ROC_FILE)
    return written
