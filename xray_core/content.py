"""The input gate's cheap checks: facts of the decoded image that need no model (pure functions, numpy only).

Limits, from the 5,216 training X-rays decoded as the batch job decodes them (Pillow draft scale, 8-bit): every one
is stored as a colour JPEG whose channels are equal (mean channel spread 0.0); their grey-level standard deviation
is at least 19.6 and they use at least 107 distinct grey levels. The limits sit far outside that range, so a real
scan is never refused by them, whatever its exposure:
- colour: a mean spread between the channels above 8 grey levels (a grayscale scan saved through JPEG's chroma
  subsampling stays within 0-2);
- near-constant: a standard deviation below 4 grey levels (a fifth of the training minimum): blank, black or
  white exports;
- too few grey levels: fewer than 32 distinct values (under a third of the training minimum): masks, drawings,
  text renderings, thresholded images.
Everything else that is not a chest X-ray (photographs, other body parts, other modalities, rotated or inverted
scans) is the model-side check's work (xray_core/gate.py).
"""
from __future__ import annotations

import numpy as np

MAX_COLOUR_SPREAD = 8.0
MIN_GREY_STD = 4.0
MIN_GREY_LEVELS = 32


def colour_spread(rgb: np.ndarray) -> float:
    """(H, W, 3+) uint8 -> the mean over pixels of max - min of the first three channels (0 for a gray image)."""
    a = rgb[..., :3].astype(np.int16)
    return float((a.max(axis=-1) - a.min(axis=-1)).mean())


def problem(gray: np.ndarray, spread: float = 0.0) -> str | None:
    """A one-line reason why the decoded 8-bit gray image (H, W) is not a chest X-ray, or None."""
    if spread > MAX_COLOUR_SPREAD:
        return f"colour image (mean channel spread {spread:.1f} > {MAX_COLOUR_SPREAD:g})"
    std = float(gray.std())
    if std < MIN_GREY_STD:
        return f"near-constant image (grey-level std {std:.1f} < {MIN_GREY_STD:g})"
    levels = int(np.count_nonzero(np.bincount(gray.ravel(), minlength=256)))
    if levels < MIN_GREY_LEVELS:
        return f"too few grey levels ({levels} < {MIN_GREY_LEVELS})"
    return None
