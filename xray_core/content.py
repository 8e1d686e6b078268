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
  text renderings, thresholded images;
- elongated: one side more than twice the other. The training scans are all stored square (1:1), so this limit
  comes from what a chest radiograph can be: detector and cassette formats run from 18x24 to 43x43 cm (at most
  1.33:1), and a stitched long-length image (spine, legs) is not a chest. 2:1 is half as long again as the widest
  format. Banners, pages, panoramas and strips of text are refused by it.
- padded: edge bands of constant grey (rows at the top and bottom, columns at the left and right, 95% of whose
  pixels lie within 6 grey levels of their median, so that a burnt-in label does not break a band) covering more
  than 23% of the height or of the width, both sides together. Unlike the limits above, this one is the edge of the
  training range, not far outside it: the training scans' bands cover at most 22.3% (9.7% of them have bands of 2%
  or more: their scanners' black borders), so the model never learnt from a scan padded more than that. QA
  (2026-12-02, the site sample padded as exports do): black bands making a square scan 4:3 (25% of the width)
  flipped 55 of 117 NORMAL scans to PNEUMONIA; white bands and a 4:3 portrait pad sent every scan to the model-side
  check's "not like the chest X-rays", naming no cause. Such a scan is refused, saying to crop it to the scan.
Everything else that is not a chest X-ray (photographs, other body parts, other modalities, rotated or inverted
scans) is the model-side check's work (xray_core/gate.py).
"""
from __future__ import annotations

import numpy as np

MAX_COLOUR_SPREAD = 8.0
MIN_GREY_STD = 4.0
MIN_GREY_LEVELS = 32
MAX_ASPECT = 2.0
PADDED = "padded: "  # the reason's start: a chest film not screened, ranked as such (batch_job/worklist.py)
BAND_SPREAD = 12  # grey levels a row or column of padding spans (JPEG's ringing beside the scan included) ...
BAND_FLAT = 0.95  # ... in this share of its pixels at least: a label or marker burnt into the band does not break it
BAND_SIDE = 256  # pixels on the long side the bands are measured at (every k-th row and column): bounded work
MAX_BAND_SHARE = 0.23  # the training scans' widest bands, 0.223 of a side, rounded up


def colour_spread(rgb: np.ndarray) -> float:
    """(H, W, 3+) uint8 -> the mean over pixels of max - min of the first three channels (0 for a gray image)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # three planes: numpy's reductions over a length-3 axis are slow
    return float((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).mean())  # max >= min: no wrap


def _flat_lines(lines: np.ndarray) -> int:
    """How many of the (n, m) lines, from the first, are flat: BAND_FLAT of their pixels within BAND_SPREAD / 2 of
    their median. Stops at the first that is not (one line for a scan without bands)."""
    for i, line in enumerate(lines):
        if (np.abs(line - np.median(line)) <= BAND_SPREAD // 2).mean() < BAND_FLAT:
            return i
    return len(lines)


def _edge_bands(gray: np.ndarray) -> tuple[int, list[tuple[int, int, int]]]:
    """(H, W) uint8 -> the subsampling step and, for the rows then the columns, (flat lines from the start, flat
    lines from the end, lines), counted on every k-th row and column (at most BAND_SIDE a side: the same work for a
    drafted JPEG and a 3000-pixel DICOM). Where every line of an axis is flat there is no scan between bands: (0, 0)
    along that axis (a smooth ramp; a blank image is near-constant before this)."""
    step = max(1, -(-max(gray.shape) // BAND_SIDE))
    small = gray[::step, ::step].astype(np.int16)
    axes = []
    for lines in (small, small.T):
        first = _flat_lines(lines)
        axes.append((0, 0, len(lines)) if first == len(lines) else (first, _flat_lines(lines[::-1]), len(lines)))
    return step, axes


def band_share(gray: np.ndarray) -> float:
    """(H, W) uint8 -> the larger of the shares of the height and of the width that edge bands of constant grey
    cover, both sides together: flat rows from the top and the bottom, flat columns from the left and the right
    (_flat_lines, _edge_bands)."""
    return max((start + end) / n for start, end, n in _edge_bands(gray)[1])


def scan_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) uint8 -> (left, upper, right, lower), Pillow's crop box of what lies inside the edge bands of constant
    grey (band_share's bands), in the image's own pixels: the whole image where it has none. The rows (columns)
    measured flat are cut; those between the last flat one and the first that is not are kept."""
    step, ((top, bottom, rows), (left, right, cols)) = _edge_bands(gray)
    height, width = gray.shape[:2]
    return ((left - 1) * step + 1 if left else 0, (top - 1) * step + 1 if top else 0,
            (cols - right) * step if right else width, (rows - bottom) * step if bottom else height)


def problem(gray: np.ndarray, spread: float = 0.0) -> str | None:
    """A one-line reason why the decoded 8-bit gray image (H, W) is not a chest X-ray, or None."""
    if spread > MAX_COLOUR_SPREAD:
        return f"colour image (mean channel spread {spread:.1f} > {MAX_COLOUR_SPREAD:g})"
    aspect = max(gray.shape[:2]) / max(min(gray.shape[:2]), 1)
    if aspect > MAX_ASPECT:
        return f"not a chest radiograph's shape (aspect {aspect:.2f}:1 > {MAX_ASPECT:g}:1)"
    counts = np.bincount(gray.ravel(), minlength=256)  # one pass over the pixels gives both figures
    values = np.arange(len(counts))
    mean = float(counts @ values) / gray.size
    std = float(np.sqrt(max(float(counts @ (values - mean) ** 2) / gray.size, 0.0)))
    if std < MIN_GREY_STD:
        return f"near-constant image (grey-level std {std:.2f} < {MIN_GREY_STD:g})"  # .1f said "4.0 < 4" (QA)
    levels = int(np.count_nonzero(counts))
    if levels < MIN_GREY_LEVELS:
        return f"too few grey levels ({levels} < {MIN_GREY_LEVELS})"
    share = band_share(gray)
    if share > MAX_BAND_SHARE:
        return (f"{PADDED}bands of constant grey cover {share:.1%} of a side (limit {MAX_BAND_SHARE:.0%}: the training "
                "scans' widest, rounded up); crop it to the scan")
    return None
