"""DICOM -> 8-bit grayscale Pillow image (pydicom + numpy, no TensorFlow).

Applies the modality LUT (rescale slope/intercept), then the VOI LUT or window (first one when several), inverts
MONOCHROME1 so bone is bright as in the JPEG training data, takes the first frame of multi-frame files, and maps
the result's own min..max to 0..255. The image then goes through the shared preprocessing like any other.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

DICOM_MAGIC_OFFSET = 128


def is_dicom(head: bytes) -> bool:
    """True for files with the DICOM preamble ('DICM' at byte 128), whatever their extension."""
    return head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_dicom(data: bytes, max_pixels: int | None) -> Image.Image:
    """Raises ValueError with a one-line reason for anything that cannot be decoded."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt files
        raise ValueError(f"corrupt DICOM: {_first_line(exc)}") from None
    if "PixelData" not in ds:
        raise ValueError("DICOM without pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if max_pixels and rows * cols > max_pixels:
        raise ValueError(f"decompression bomb: DICOM of {cols}x{rows} pixels exceeds limit of {max_pixels}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ValueError(f"DICOM pixel data not decodable ({name}): {_first_line(exc)}") from None
    if frames > 1 or arr.ndim == 4:
        arr = arr[0]
    if arr.ndim == 3:  # colour DICOM (RGB): average the channels
        arr = arr.mean(axis=-1)
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    arr = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float64)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _first_line(exc: Exception) -> str:
    """The message folded onto one line (pydicom lists missing decoder packages on later lines)."""
    text = " ".join(part.strip() for part in str(exc).split("\n") if part.strip())
    return (text or type(exc).__name__)[:300]
