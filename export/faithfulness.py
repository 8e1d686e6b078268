"""Does the heatmap point at what drives the score? A deletion check, run at export (no TensorFlow).

It measures the maps the batch job shows: the package's `heatmap_method` (xray_core/occlusion.py): occlusion maps
of a k x k grid, or the graph's own `heatmap` output. For occlusion it also measures the graph's map (`graph_map`),
which the job no longer shows, so the card can say why.

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

from xray_core.occlusion import OCCLUSION, HeatmapMethod, occlusion_maps
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


def deletion_figures(session, images: np.ndarray, p: np.ndarray, heat: np.ndarray) -> dict:
    """The deletion figures of maps `heat` (n, h, w) for images (n, S, S, 1) whose probabilities are p (n,)."""
    rng = np.random.default_rng(SEED)
    size = images.shape[1]
    maps = [upsample_map(h, (size, size)) for h in heat]
    average = top_mask(np.mean([scaled(m) for m in maps], axis=0), FRACTION)
    top = [blank(image, top_mask(m, FRACTION)) for image, m in zip(images, maps)]
    rand = [blank(image, random_mask(m.shape, FRACTION, rng)) for image, m in zip(images, maps)]
    drop_top = p - _probability(session, np.stack(top))
    drop_random = p - _probability(session, np.stack(rand))
    drop_average = p - _probability(session, np.stack([blank(image, average) for image in images]))
    share = float(np.mean(drop_top > drop_random))
    own = float(np.mean(drop_top > drop_average))
    return {"share_top_beats_random": share, "mean_drop_top": float(drop_top.mean()),
            "mean_drop_random": float(drop_random.mean()), "passed": share >= REQUIRED_SHARE,
            "required_share_vs_average": REQUIRED_SHARE_VS_AVERAGE, "share_own_beats_average": own,
            "mean_drop_average": float(drop_average.mean()), "about_each_image": own >= REQUIRED_SHARE_VS_AVERAGE}


def faithfulness(session, images: np.ndarray, threshold: float, source: str,
                 method: HeatmapMethod = HeatmapMethod()) -> dict:
    """images (N, S, S, 1) -> the check's figures for the metadata, for the maps `method` draws."""
    out = score(session, images, heatmap=True)
    p, heat = out.probability.astype(np.float64), out.heatmap
    flagged = np.flatnonzero(p >= threshold)
    if not len(flagged):
        return {"source": source, "images": int(len(images)), "flagged": 0, "passed": False,
                "share_top_beats_random": None, "note": "no image flagged at the threshold"}
    head = {"source": source, "images": int(len(images)), "flagged": int(len(flagged)), "threshold": float(threshold),
            "fraction_blanked": FRACTION, "seed": SEED, "required_share": REQUIRED_SHARE}
    x, pf = images[flagged], p[flagged]
    if method.name != OCCLUSION:
        return {**head, **deletion_figures(session, x, pf, heat[flagged])}
    shown = deletion_figures(session, x, pf, occlusion_maps(session, x, method.grid, pf))
    return {**head, "method": method.to_dict(), **shown, "graph_map": deletion_figures(session, x, pf, heat[flagged])}
