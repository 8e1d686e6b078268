"""The input gate's orientation check: is this chest X-ray upside down? (no TensorFlow)

The network was trained on upright scans and its pooled embedding hardly sees which way up a scan is: the whole
site sample turned by 180 degrees passed the content check (xray_core/gate.py) for 300 of 313 scans, and its
specificity fell from 0.914 to 0.448, its recall from 0.974 to 0.836 (QA). A scan read upside down from a plate or
exported flipped happens; it is an image to send back, not one to screen.

The check is a logistic regression on the model input's GRID x GRID block means (its layout: neck and shoulders
above, the bright abdomen below the dark lungs), fitted at export on the training split's images: upright ones
(as they are, mirrored left-right, and TILTED copies: turned by up to MAX_TILT degrees and cropped to 70-100%, as
scans are positioned and collimated) against the same turned by 180 degrees or flipped top to bottom. Fitted on
upright scans alone, it refused 4-28% of upright scans tilted by 15-20 degrees or tightly cropped (QA). An image is
refused when it is more likely upside down than upright (P > LIMIT: the likelier of the two, nothing tuned on any
folder). Its held-out figures (5 folds, all variants of an image in one fold), for plain and for tilted variants, are
recorded in metadata.json's gate, and a package gets the check only where the plain ones meet the input gate's own
targets (:func:`usable`: at most 1% of upright scans refused, as for real X-rays, and at least 95% of turned ones,
as for non-X-rays). A package holds the coefficients as plain arrays (gate.npz), never a pickled estimator. A scan
turned by 90 degrees is the content check's (docs/gate.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

GRID = 16  # block means per side: the layout, not the detail
LIMIT = 0.5  # refused when P(upside down) is above it: more likely upside down than upright
REASON = "looks upside down"  # how a refusal by the orientation check begins
FOLDS = 5
TILTED = 3  # tilted and cropped copies of each training image
MAX_TILT = 20.0  # degrees, either way
MIN_CROP = 0.8  # the side of a crop, as a share of the image's
FIGURES = ("method", "limit", "rows", "folds", "held_out_upright_refused", "held_out_upside_down_refused",
           "held_out_tilted_refused", "held_out_tilted_upside_down_refused")
MAX_UPRIGHT_REFUSED = 0.01  # the input gate's targets: real X-rays <= 1% out of scope,
MIN_UPSIDE_DOWN_REFUSED = 0.95  # non-X-rays >= 95%
METHOD = (f"logistic regression on the model input's {GRID}x{GRID} block means: training-split images upright, "
          f"mirrored and {TILTED} tilted copies (up to {MAX_TILT:g} degrees, cropped to {MIN_CROP:.0%}-100%) against "
          "the same turned 180 degrees or flipped top to bottom")


@dataclass(frozen=True)
class Orientation:
    coef: np.ndarray  # (GRID * GRID,)
    intercept: float

    def probability(self, arrays: np.ndarray) -> np.ndarray:
        """(N, S, S, 1) model inputs -> (N,) P(upside down)."""
        return self.probability_of(layout(arrays))

    def probability_of(self, blocks: np.ndarray) -> np.ndarray:
        """(N, GRID * GRID) block means (:func:`layout`) -> (N,) P(upside down)."""
        return 1.0 / (1.0 + np.exp(-(blocks @ self.coef + self.intercept)))

    @staticmethod
    def reason(probability: float) -> str | None:
        """One line when the image is more likely upside down than upright, else None."""
        if probability > LIMIT:
            return (f"{REASON} or inverted (P {probability:.2f}, from its layout): the model reads upright scans with "
                    "bones bright only; check how it was taken or exported")
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


def tilted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S) in [0, 1] -> each cropped to a random MIN_CROP-100% of its side (anywhere), resized back, turned by a
    random angle within +-MAX_TILT (the corners filled black or with the image's median), mirrored half the time."""
    size = images.shape[1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        img = Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L")
        side = int(round(size * rng.uniform(MIN_CROP, 1.0)))
        x0, y0 = rng.integers(0, size - side + 1, size=2)
        img = img.crop((int(x0), int(y0), int(x0) + side, int(y0) + side))
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        fill = 0 if rng.random() < 0.5 else int(np.median(np.asarray(img)))
        img = img.rotate(rng.uniform(-MAX_TILT, MAX_TILT), resample=Image.Resampling.BILINEAR, fillcolor=fill)
        out[i] = np.asarray(img, np.float32) / 255.0
        if rng.random() < 0.5:
            out[i] = out[i, :, ::-1]
    return out


def _planes(arrays: np.ndarray) -> np.ndarray:
    """(N, S, S[, 1]) -> (N, S, S)."""
    a = np.asarray(arrays)
    return a[..., 0] if a.ndim == 4 else a


def upright_variants(arrays: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, S, S[, 1]) -> (N * (2 + TILTED), S, S) upright rows: the images, their mirror images and TILTED tilted
    copies, image 0..N-1, then the next variant. The layout check (xray_core/gate.py) counts the same rows."""
    a = _planes(arrays)
    return np.concatenate([a, a[:, :, ::-1]] + [tilted(a, rng) for _ in range(TILTED)])


def _variants(arrays: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upright rows, upside-down rows, whether each pair is a tilted copy): the upright rows are
    :func:`upright_variants`; each upside-down row is the image turned by 180 degrees or flipped top to bottom
    (alternately for the plain rows; seeded at random for the copies)."""
    a = _planes(arrays)
    n, rng = len(a), np.random.default_rng(seed)
    up = upright_variants(a, rng)
    copies = up[2 * n:].reshape(TILTED, n, *a.shape[1:])
    down = [a[:, ::-1, ::-1], a[:, ::-1, :]] + [
        np.where(rng.random(n)[:, None, None] < 0.5, copy[:, ::-1, ::-1], copy[:, ::-1, :]) for copy in copies]
    return up, np.concatenate(down), np.arange(len(up)) >= 2 * n


def _model(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=3000, random_state=seed)


def fit(arrays: np.ndarray, seed: int = 0) -> tuple[Orientation, dict]:
    """The check fitted on (N, S, S, 1) upright training images -> (it, its figures: rows and the shares of
    held-out upright and upside-down variants it refuses, plain and tilted)."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    up, down, is_tilted = _variants(arrays, seed)
    x = np.concatenate([layout(up), layout(down)])
    y = np.r_[np.zeros(len(up)), np.ones(len(down))]
    groups = np.tile(np.arange(len(arrays)), 2 * (2 + TILTED))  # all variants of an image stay in one fold
    refused = cross_val_predict(_model(seed), x, y, groups=groups, cv=GroupKFold(FOLDS),
                                method="predict_proba")[:, 1] > LIMIT
    tilt = np.r_[is_tilted, is_tilted]
    shares = [round(float(np.mean(refused[(y == label) & (tilt == t)])), 4) for t in (False, True) for label in (0, 1)]
    model = _model(seed).fit(x, y)
    figures = dict(zip(FIGURES, (METHOD, LIMIT, int(len(arrays)), FOLDS, *shares)))
    return Orientation(model.coef_[0].astype(np.float64), float(model.intercept_[0])), figures


def usable(figures: dict) -> bool:
    """Whether held-out figures of :func:`fit` on plain variants meet the input gate's targets (training images
    without a layout to read, such as the tests' noise, do not)."""
    return (figures["held_out_upright_refused"] <= MAX_UPRIGHT_REFUSED
            and figures["held_out_upside_down_refused"] >= MIN_UPSIDE_DOWN_REFUSED)
