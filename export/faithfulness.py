"""Does the heatmap point at what drives the score? A deletion check, run at export (no TensorFlow).

For each image flagged at the package's threshold, at the model's input resolution and with the heatmap
upsampled bilinearly: blank (set to the image's mean) the 10% of pixels with the highest heatmap values, and
separately a random 10% (fixed seed), and separately the 10% hottest of the *average* map of all flagged images
(each map scaled to [0, 1] first). The check passes when blanking the image's own hottest pixels lowers
P(pneumonia) more than blanking random ones for at least 80% of the flagged images. Whether the maps are about
each image is the second figure: the share of flagged images for which their own map beats the average map
(`about_each_image` when at least 70%; a map that looks the same on every image beats random pixels yet ties
with the average).
"""
from __future__ import annotations

import numpy as np

from xray_core.package import score
from xray_core.preprocessing import upsample_map

FRACTION = 0.10
REQUIRED_SHARE = 0.80
REQUIRED_SHARE_VS_AVERAGE = 0.70
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


def scaled(heat: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] (a flat map: all 0), so each image weighs the same in the average map."""
    span = float(heat.max() - heat.min())
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


def _probability(session, x: np.ndarray) -> np.ndarray:
    return score(session, x).probability.astype(np.float64)


def faithfulness(session, images: np.ndarray, threshold: float, source: str) -> dict:
    """images (N, S, S, 1) -> the check's figures for the metadata."""
    out = score(session, images, heatmap=True)
    p, heat = out.probability.astype(np.float64), out.heatmap
    flagged = np.flatnonzero(p >= threshold)
    rng = np.random.default_rng(SEED)
    size = images.shape[1]
    if not len(flagged):
        return {"source": source, "images": int(len(images)), "flagged": 0, "passed": False,
                "share_top_beats_random": None, "note": "no image flagged at the threshold"}
    maps = [upsample_map(heat[i], (size, size)) for i in flagged]
    average = top_mask(np.mean([scaled(m) for m in maps], axis=0), FRACTION)
    top = [blank(images[i], top_mask(m, FRACTION)) for i, m in zip(flagged, maps)]
    rand = [blank(images[i], random_mask(m.shape, FRACTION, rng)) for i, m in zip(flagged, maps)]
    drop_top = p[flagged] - _probability(session, np.stack(top))
    drop_random = p[flagged] - _probability(session, np.stack(rand))
    drop_average = p[flagged] - _probability(session, np.stack([blank(images[i], average) for i in flagged]))
    share = float(np.mean(drop_top > drop_random))
    own = float(np.mean(drop_top > drop_average))
    return {
        "source": source, "images": int(len(images)), "flagged": int(len(flagged)), "threshold": float(threshold),
        "fraction_blanked": FRACTION, "seed": SEED, "required_share": REQUIRED_SHARE,
        "share_top_beats_random": share,
        "mean_drop_top": float(drop_top.mean()), "mean_drop_random": float(drop_random.mean()),
        "passed": share >= REQUIRED_SHARE,
        "required_share_vs_average": REQUIRED_SHARE_VS_AVERAGE, "share_own_beats_average": own,
        "mean_drop_average": float(drop_average.mean()), "about_each_image": own >= REQUIRED_SHARE_VS_AVERAGE,
    }
