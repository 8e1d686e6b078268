"""PNG plots for a trained model (matplotlib); the confusion matrix and ROC curve are xray_core.plots'."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.data import CLASSES  # noqa: E402


def training_curves(history: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "auc")):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in history:
                ax.plot(np.arange(1, len(history[prefix + key]) + 1), history[prefix + key], style, label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(images, y_true, y_prob, threshold: float, path: str, n: int = 16, seed: int = 0) -> None:
    """A grid of test X-rays titled with label and prediction (red when wrong)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=min(n, len(images)), replace=False)
    cols = 4
    rows = max(1, int(np.ceil(len(idx) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.5, rows * 2.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        pred = int(y_prob[i] >= threshold)
        ax.imshow(images[i][:, :, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"true {CLASSES[int(y_true[i])]}\npred {CLASSES[pred]} ({y_prob[i]:.2f})",
            fontsize=8,
            color="black" if pred == int(y_true[i]) else "red",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
