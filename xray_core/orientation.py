"""The input gate's orientation check: is this chest X-ray upside down? (no TensorFlow)

The network was trained on upright scans and its pooled embedding hardly sees which way up a scan is: the whole
site sample turned by 180 degrees passed the content check (xray_core/gate.py) for 300 of 313 scans, and its
specificity fell from 0.914 to 0.448, its recall from 0.974 to 0.836 (QA). A scan read upside down from a plate or
exported flipped happens; it is an image to send back, not one to screen.

The check is a logistic regression on the model input's GRID x GRID block means (its layout: neck and shoulders
above, the bright abdomen below the dark lungs), fitted at export on the training split's images, upright and
mirrored left-right against the same images turned by 180 degrees and flipped top to bottom. An image is refused when
it is more likely upside down than upright (P > LIMIT: the likelier of the two, nothing tuned on any folder). Its
held-out figures (5 folds, an image's four variants kept in one fold) are recorded in metadata.json's gate, and a
package gets the check only where they meet the input gate's own targets (:func:`usable`: at most 1% of upright
scans refused, as for real X-rays, and at least 95% of turned ones, as for non-X-rays). A package
holds the coefficients as plain arrays (gate.npz), never a pickled estimator. A scan turned by 90 degrees is the
content check's (docs/gate.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 16  # block means per side: the layout, not the detail
LIMIT = 0.5  # refused when P(upside down) is above it: more likely upside down than upright
FOLDS = 5
FIGURES = ("method", "limit", "rows", "folds", "held_out_upright_refused", "held_out_upside_down_refused")
MAX_UPRIGHT_REFUSED = 0.01  # the input gate's targets: real X-rays <= 1% out of scope,
MIN_UPSIDE_DOWN_REFUSED = 0.95  # non-X-rays >= 95%
METHOD = (f"logistic regression on the model input's {GRID}x{GRID} block means: training-split images upright and "
          "mirrored against turned 180 degrees and flipped top to bottom")


@dataclass(frozen=True)
class Orientation:
    coef: np.ndarray  # (GRID * GRID,)
    intercept: float

    def probability(self, arrays: np.ndarray) -> np.ndarray:
        """(N, S, S, 1) model inputs -> (N,) P(upside down)."""
        logit = layout(arrays) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logit))

    @staticmethod
    def reason(probability: float) -> str | None:
        """One line when the image is more likely upside down than upright, else None."""
        if probability > LIMIT:
            return (f"looks upside down (P {probability:.2f}, from its layout): the model reads upright scans only; "
                    "check how it was taken or exported")
        return None


def layout(arrays: np.ndarray) -> np.ndarray:
    """(N, S, S[, 1]) -> (N, GRID * GRID) block means, float64. S must be a multiple of GRID (:func:`fits`)."""
    arrays = np.asarray(arrays, np.float64)
    n, size = len(arrays), arrays.shape[1]
    step = size // GRID
    return arrays.reshape(n, GRID, step, GRID, step).mean(axis=(2, 4)).reshape(n, GRID * GRID)


def fits(image_size: int) -> bool:
    """Whether a model input of this size has the check (its side a multiple of GRID)."""
    return image_size % GRID == 0


def _variants(arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upright: as they are and mirrored left-right, upside down: turned 180 degrees and flipped top to bottom),
    each (2N, S, S) in the order image 0..N-1, then its second variant."""
    a = np.asarray(arrays)[..., 0] if np.asarray(arrays).ndim == 4 else np.asarray(arrays)
    return np.concatenate([a, a[:, :, ::-1]]), np.concatenate([a[:, ::-1, ::-1], a[:, ::-1, :]])


def _model(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed)


def fit(arrays: np.ndarray, seed: int = 0) -> tuple[Orientation, dict]:
    """The check fitted on (N, S, S, 1) upright training images -> (it, its figures: rows and the shares of
    held-out upright and upside-down variants it refuses)."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    up, down = _variants(arrays)
    x = np.concatenate([layout(up), layout(down)])
    y = np.r_[np.zeros(len(up)), np.ones(len(down))]
    groups = np.tile(np.arange(len(arrays)), 4)  # an image's four variants stay in one fold
    held_out = cross_val_predict(_model(seed), x, y, groups=groups, cv=GroupKFold(FOLDS),
                                 method="predict_proba")[:, 1]
    model = _model(seed).fit(x, y)
    figures = dict(zip(FIGURES, (METHOD, LIMIT, int(len(arrays)), FOLDS,
                                 round(float(np.mean(held_out[y == 0] > LIMIT)), 4),
                                 round(float(np.mean(held_out[y == 1] > LIMIT)), 4))))
    return Orientation(model.coef_[0].astype(np.float64), float(model.intercept_[0])), figures


def usable(figures: dict) -> bool:
    """Whether held-out figures of :func:`fit` meet the input gate's targets (training images without a layout to
    read, such as the tests' noise, do not)."""
    return (figures["held_out_upright_refused"] <= MAX_UPRIGHT_REFUSED
            and figures["held_out_upside_down_refused"] >= MIN_UPSIDE_DOWN_REFUSED)
