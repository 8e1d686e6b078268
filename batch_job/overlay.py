"""A heatmap overlay: the X-ray in gray, at most 512 px on its long side, under its class-activation map
upsampled bilinearly to the same size, in colour (matplotlib's "jet": the image's lowest value blue, its
highest red), semi-transparent (the hotter, the more opaque). Pillow + numpy; matplotlib only for the colours.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np
from PIL import Image

from xray_core import content
from xray_core.preprocessing import PreprocessConfig, decode_image, upsample_map

MAX_SIDE = 512
COLORMAP = "jet"
ALPHA_MIN, ALPHA_MAX = 0.15, 0.55  # opacity of the coldest and of the hottest pixels


def display_image(data: bytes, preprocessing: dict) -> Image.Image:
    """Image bytes -> upright 8-bit gray image, at most MAX_SIDE px on its long side (aspect kept). The one
    decoder (xray_core.preprocessing.decode_image), with the JPEG draft asked for MAX_SIDE px, not the model's."""
    config = dataclasses.replace(PreprocessConfig.from_dict(preprocessing), image_size=MAX_SIDE)
    img = decode_image(data, config)
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """(h, w) -> float32 in [0, 1]: the map's minimum 0, its maximum 1 (a flat map: all 0)."""
    heat = np.asarray(heatmap, dtype=np.float32)
    span = float(heat.max() - heat.min())
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


@functools.lru_cache(maxsize=1)
def tables() -> tuple[list[int], ...]:
    """Pillow point tables over the 256 heat levels: red, green, blue (the colormap) and opacity (0-255)."""
    from matplotlib import colormaps

    levels = np.linspace(0.0, 1.0, 256)
    rgb = np.rint(colormaps[COLORMAP](levels)[:, :3] * 255).astype(int)
    alpha = np.rint(255 * (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * levels)).astype(int)
    return rgb[:, 0].tolist(), rgb[:, 1].tolist(), rgb[:, 2].tolist(), alpha.tolist()


def blend(gray: Image.Image, heat01: np.ndarray) -> Image.Image:
    """Gray image and its heat (H, W) in [0, 1] -> RGB: colour over gray, as opaque as hot (Pillow, in C)."""
    levels = Image.fromarray(np.rint(heat01 * 255).astype(np.uint8), mode="L")
    red, green, blue, alpha = tables()
    colour = Image.merge("RGB", [levels.point(table) for table in (red, green, blue)])
    return Image.composite(colour, gray.convert("RGB"), levels.point(alpha))


def render(data: bytes, heatmap: np.ndarray, preprocessing: dict) -> Image.Image:
    """Image bytes and its (h, w) heatmap -> the RGB overlay. The map covers what the model saw: the whole image,
    or, for a model that cuts edge bands of constant grey (`crop_bands`), the scan inside them, measured again on
    the displayed image; the bands are shown in gray."""
    img = display_image(data, preprocessing)
    box = (0, 0, *img.size)
    if PreprocessConfig.from_dict(preprocessing).crop_bands:
        box = content.scan_box(np.asarray(img))
    scan = img.crop(box)
    out = img.convert("RGB")
    out.paste(blend(scan, np.clip(upsample_map(normalise(heatmap), scan.size), 0.0, 1.0)), box[:2])
    return out


def save_png(img: Image.Image, path: str) -> None:
    """PNG with zlib's fast run-length strategy (X-ray grain compresses poorly whatever the level)."""
    img.save(path, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
