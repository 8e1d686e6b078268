"""The one preprocessing function: image bytes -> (S, S, 1) float32 in [0, 1].

Pillow + numpy only (no TensorFlow): training, the export parity check and the
batch job all call :func:`preprocess_image` with the parameters recorded in the
model's metadata (:class:`PreprocessConfig`).
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from xray_core.dicom import decode_dicom, is_dicom, stretch_to_uint8
from xray_core.errors import one_line

# _check_size refuses these images itself. Not warnings.catch_warnings() per call: it swaps the
# process-wide filter list and is not thread-safe (the batch job decodes in several threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".dcm")
SUPPORTED_FORMATS = ("JPEG", "PNG")
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """An input that cannot become a model input; the message is one short line."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything the scoring side needs to reproduce training's inputs exactly."""

    image_size: int = 128
    color_mode: str = "L"  # 8-bit grayscale
    resize_filter: str = "bilinear"
    scaling: str = "divide_by_255"  # float32 in [0, 1]
    jpeg_draft: bool = True  # let libjpeg decode at a reduced scale (>= image_size)
    min_side: int = 32  # smaller inputs are rejected, not upscaled from nothing

    def __post_init__(self):
        if self.resize_filter not in _FILTERS:
            raise ValueError(f"unknown resize_filter {self.resize_filter!r}")
        if self.color_mode != "L" or self.scaling != "divide_by_255":
            raise ValueError("only color_mode 'L' with scaling 'divide_by_255' is implemented")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def to_grayscale_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> mode 'L'. 16/32-bit integer data is mapped linearly from
    [0, 65535] to [0, 255] (Pillow's own convert would clip at 255)."""
    if img.mode == "L":
        return img
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    if img.mode == "F":
        return Image.fromarray(stretch_to_uint8(np.asarray(img)), mode="L")
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA").convert("RGB")
    return img.convert("L")


def _check_size(img: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Reject images too small to score and, before any pixel is decoded, anything over Pillow's
    MAX_IMAGE_PIXELS (Pillow itself only warns there and refuses at twice that)."""
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {limit}")
    if min(w, h) < config.min_side:
        raise ImageError(f"image too small ({w}x{h}, need >= {config.min_side} px per side)")
    return img


def decode_image(source: Union[bytes, str, os.PathLike], config: PreprocessConfig) -> Image.Image:
    """Open, validate and decode (JPEG, PNG or DICOM) to an upright 8-bit grayscale Pillow image."""
    try:
        if not isinstance(source, (bytes, bytearray)):
            with open(source, "rb") as f:
                source = f.read()
        if is_dicom(source):
            return _check_size(decode_dicom(bytes(source), Image.MAX_IMAGE_PIXELS), config)
        img = Image.open(io.BytesIO(source), formats=None)
        if img.format not in SUPPORTED_FORMATS:
            raise ImageError(f"unsupported image format {img.format}")
        _check_size(img, config)
        if config.jpeg_draft and img.format == "JPEG":
            img.draft("L", (config.image_size, config.image_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_grayscale_8bit(img)
    except ImageError:
        raise
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: if made an error
        raise ImageError(f"decompression bomb: {one_line(exc, 200)}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a decodable image") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"decode failed: {one_line(exc, 385)}") from None


def to_model_input(img: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Grayscale Pillow image -> (S, S, 1) float32 in [0, 1]."""
    size = (config.image_size, config.image_size)
    if img.size != size:
        img = img.resize(size, _FILTERS[config.resize_filter])
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return arr[:, :, np.newaxis]


def preprocess_image(source: Union[bytes, str, os.PathLike],
                     config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """THE preprocessing function: file path or bytes -> (S, S, 1) float32 in [0, 1].

    Raises ImageError (one-line message) for anything that is not a usable image.
    """
    return to_model_input(decode_image(source, config), config)


def upsample_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A model's (h, w) map -> (height, width) for size (width, height), bilinear (Pillow, float32). The map
    covers the whole image, as the model's input is the whole image resized (no crop)."""
    heat = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32), mode="F")
    return np.asarray(heat.resize(size, _FILTERS["bilinear"]))


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
