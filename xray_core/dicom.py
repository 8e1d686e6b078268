"""DICOM -> 8-bit grayscale Pillow image (pydicom + numpy, no TensorFlow).

Applies the modality LUT (rescale slope/intercept), then the VOI LUT or window (first one when several), inverts
MONOCHROME1 so bone is bright as in the JPEG training data, takes the first frame of multi-frame files, and maps
the result's own min..max to 0..255. The image then goes through the shared preprocessing like any other.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from xray_core.errors import one_line

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
        raise ValueError(f"corrupt DICOM: {one_line(exc)}") from None
    if "PixelData" not in ds:
        raise ValueError("DICOM without pixel data")
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise ValueError("corrupt DICOM: bad Rows/Columns") from None
    if max_pixels and rows * cols * samples > max_pixels:
        raise ValueError(f"decompression bomb: DICOM frame of {cols}x{rows}x{samples} exceeds {max_pixels} pixels")
    try:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=0)  # only the first frame is decoded, whatever NumberOfFrames says
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ValueError(f"DICOM pixel data not decodable ({name}): {one_line(exc)}") from None
    try:
        if arr.ndim == 3:  # colour DICOM (RGB): average the channels
            arr = arr.mean(axis=-1, dtype=np.float32)
        arr = apply_modality_lut(arr, ds)
        arr = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float32)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = arr.max() + arr.min() - arr
    except Exception as exc:  # noqa: BLE001 - malformed LUTs and the like
        raise ValueError(f"corrupt DICOM LUT/window: {type(exc).__name__}: {one_line(exc)}") from None
    return Image.fromarray(stretch_to_uint8(arr), mode="L")


def stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an array's own min..max linearly to 0..255 (constant arrays become 0)."""
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float32))
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.rint(scaled).astype(np.uint8)

