"""Does the heatmap point at what drives the score? A deletion check, run at export (no TensorFlow).

For each image flagged at the package's threshold, at the model's input resolution and with the heatmap
upsampled bilinearly: blank (set to the image's mean) the 10% of pixels with the highest heatmap values, and
separately a random 10% (fixed seed). The check passes when blanking the hottest pixels lowers P(pneumonia)
more than blanking random ones for at least 80% of the flagged images.
"""
from __future__ import annotations

import numpy as np

from xray_core.package import score
from xray_core.preprocessing import upsample_map

FRACTION = 0.10
REQUIRED_SHARE = 0.80
SEED = 0


def blank(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """image (S, S, 1) with the pixels of mask (S, S) set to the image's mean."""
    out = image.copy()
    out[mask, 0] = image.mean()
    return out


def top_mask(heat: np.ndarray, fraction: float) -> np.ndarray:
    k = int(round(fraction * heat.size))
    mask = np.zeros(heat.size, bool)
    mask[np.argsort(heat, axis=None, kind="stable")[-k:]] = True
    return mask.reshape(heat.shape)


def random_mask(shape: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    k = int(round(fraction * shape[0] * shape[1]))
    mask = np.zeros(shape[0] * shape[1], bool)
    mask[rng.choice(mask.size, size=k, replace=False)] = True
    return mask.reshape(shape)


def _probability(session, x: np.ndarray) -> np.ndarray:
    return score(session, x).probability.astype(np.float64)


def faithfulness(session, images: np.ndarray, threshold: float, source: str) -> dict:
    """images (N, S, S, 1) -> the check's figures for the metadata."""
    out = score(session, images, heatmap=True)
    p, heat = out.probability.astype(np.float64), out.heatmap
    flagged = np.flatnonzero(p >= threshold)
    rng = np.random.default_rng(SEED)
    size = images.shape[1]
    top, rand = [], []
    for i in flagged:
        up = upsample_map(heat[i], (size, size))
        top.append(blank(images[i], top_mask(up, FRACTION)))
        rand.append(blank(images[i], random_mask(up.shape, FRACTION, rng)))
    if not len(flagged):
        return {"source": source, "images": int(len(images)), "flagged": 0, "passed": False,
                "share_top_beats_random": None, "note": "no image flagged at the threshold"}
    drop_top = p[flagged] - _probability(session, np.stack(top))
    drop_random = p[flagged] - _probability(session, np.stack(rand))
    share = float(np.mean(drop_top > drop_random))
    return {
        "source": source, "images": int(len(images)), "flagged": int(len(flagged)), "threshold": float(threshold),
        "fraction_blanked": FRACTION, "seed": SEED, "required_share": REQUIRED_SHARE,
        "share_top_beats_random": share,
        "mean_drop_top": float(drop_top.mean()), "mean_drop_random": float(drop_random.mean()),
        "passed": share >= REQUIRED_SHARE,
    }
