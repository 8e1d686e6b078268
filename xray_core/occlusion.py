"""Occlusion maps: how much P(pneumonia) drops when each cell of a k x k grid of the model input is blanked (set to
the image's mean, as the faithfulness check blanks). No TensorFlow: the package's graph through
:func:`xray_core.package.score`.

The graph's own `heatmap` output (the class-activation map) costs nothing but looks alike on every image: on the
site sample's flagged images, blanking the top 10% of each image's own map lowers the probability less often than
blanking the top 10% of the average map (export/faithfulness.py measures it for each package). An occlusion map is
the model's answer to "what if this part were not there", image by image, at k*k extra forward passes: the batch job
draws it only for the top-N flagged images it renders, so its cost is bounded by N * k * k passes whatever the run's
size. The package's metadata names the method (`heatmap_method`); packages without it show the graph's map.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from xray_core.package import score

OCCLUSION = "occlusion"
GRAPH = "graph"  # the `heatmap` output itself


@dataclass(frozen=True)
class HeatmapMethod:
    """metadata.json's `heatmap_method`."""

    name: str = GRAPH
    grid: int = 0  # k of a k x k occlusion grid (0 for the graph's map)
    fill: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "HeatmapMethod":
        if not data:
            return cls()
        method = cls(**data)
        if method.name not in (GRAPH, OCCLUSION) or (method.name == OCCLUSION and method.grid < 2):
            raise ValueError(f"unknown heatmap method {data!r}")
        return method


def occluded(image: np.ndarray, grid: int) -> np.ndarray:
    """image (S, S, 1) -> (grid * grid, S, S, 1): cell (a, b) of the grid set to the image's mean, row-major. Cells
    share out the pixels as evenly as S / grid allows."""
    size = image.shape[0]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    out = np.repeat(image[np.newaxis], grid * grid, axis=0)
    fill = image.mean()
    for a in range(grid):
        for b in range(grid):
            out[a * grid + b, edges[a]:edges[a + 1], edges[b]:edges[b + 1], 0] = fill
    return out


def occlusion_maps(session, images: np.ndarray, grid: int, probabilities: np.ndarray | None = None) -> np.ndarray:
    """images (N, S, S, 1) -> (N, grid, grid) float32: P(image) - P(image with that cell blanked). `probabilities`:
    the images' own, when already scored."""
    if probabilities is None:
        probabilities = score(session, images).probability
    maps = np.zeros((len(images), grid, grid), np.float32)
    for i, image in enumerate(images):
        blanked = score(session, occluded(image, grid)).probability
        maps[i] = (float(probabilities[i]) - blanked).reshape(grid, grid)
    return maps
