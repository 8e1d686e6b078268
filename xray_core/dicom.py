"""DICOM -> 8-bit grayscale Pillow image and its header (pydicom + numpy, no TensorFlow).

Applies the modality LUT (rescale slope/intercept), then the VOI LUT or window (first one when several), inverts
MONOCHROME1 so bone is bright as in the JPEG training data, takes the first frame of multi-frame files (only that
frame is decoded), and maps the result's own min..max to 0..255. Pixels the header marks as padding (Pixel Padding
Value, with Pixel Padding Range Limit a range) take no part in that min..max and become black, as the unexposed
area outside the field is in the training images. The image then goes through the shared preprocessing like any
other.

Compressed pixel data is decoded through pydicom's public pixel API by the decoder plugins the project depends on
(docs/dicom.md says why these and what each costs): pylibjpeg with pylibjpeg-libjpeg (JPEG Baseline, Extended
12-bit, Lossless Process 14 with any predictor, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000) and pylibjpeg-rle (RLE);
pyjpegls (CharLS) for JPEG-LS and Pillow for 8-bit JPEG Baseline go first where they are faster (PREFERRED_PLUGIN).
pydicom inflates deflated files itself. pylibjpeg-libjpeg is the only plugin pydicom 3 has for 12-bit JPEG Extended
(GDCM and Pillow refuse it).
"""
from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
from PIL import Image

from xray_core.dicom_header import DicomHeader, is_dicom, pydicom_reader  # noqa: F401 - is_dicom: preprocessing's import
from xray_core.errors import one_line

# pydicom logs each decoder plugin's failure with its traceback (ERROR) before raising one error that names every
# plugin and its message: that error becomes the file's one-line reason, so the tracebacks would only flood stderr
# (two per undecodable JPEG-LS file). Only this module of pydicom is quietened; its other warnings still show.
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

# transfer syntax UID -> the pydicom decoding plugin tried before pydicom's own order, where it is measurably faster
# (bench/bench_dicom.py, docs/dicom.md): CharLS for JPEG-LS Lossless and Near-Lossless, Pillow's libjpeg-turbo for
# 8-bit JPEG Baseline
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.50": "pillow",
}


@dataclasses.dataclass(frozen=True)
class DecodedDicom:
    """A decoded DICOM file: its first frame as 8-bit grayscale, and its header (read in the same pass)."""

    image: Image.Image
    header: DicomHeader


def decode_dicom(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image of :func:`read_dicom`. Raises ValueError with a one-line reason."""
    return read_dicom(data, max_pixels).image


def read_dicom(data: bytes, max_pixels: int | None) -> DecodedDicom:
    """Parse a DICOM file's bytes once: the first frame as an 8-bit grayscale image, and the header. Frames of more
    than max_pixels samples are refused before decoding. Raises ValueError with a one-line reason for anything that
    cannot be decoded."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pydicom = pydicom_reader()

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
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = first_frame(ds, str(syntax))
    except Exception as exc:  # noqa: BLE001
        name = getattr(syntax, "name", str(syntax))
        raise ValueError(f"DICOM pixel data not decodable ({name}): {one_line(exc)}") from None
    try:
        padding = padding_mask(arr, ds)
        if arr.ndim == 3:  # colour DICOM (RGB): average the channels
            arr = arr.mean(axis=-1, dtype=np.float32)
        arr = apply_modality_lut(arr, ds)
        arr = np.asarray(apply_voi_lut(arr, ds, index=0), dtype=np.float32)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = arr.max() + arr.min() - arr
    except Exception as exc:  # noqa: BLE001 - malformed LUTs and the like
        raise ValueError(f"corrupt DICOM LUT/window: {type(exc).__name__}: {one_line(exc)}") from None
    return DecodedDicom(Image.fromarray(stretch_to_uint8(arr, padding), mode="L"), DicomHeader.from_dataset(ds))


def padding_mask(stored: np.ndarray, ds) -> np.ndarray | None:
    """True where a grayscale frame's stored value is padding (PS3.3 C.7.5.1.1.2): equal to Pixel Padding Value, or
    with Pixel Padding Range Limit between the two, inclusive. None when the header gives no padding (or a colour
    frame). A value that is not one integer is ignored, as viewers do."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if value is None or stored.ndim != 2 or not str(ds.get("PhotometricInterpretation", "")).upper().startswith(
            "MONOCHROME"):
        return None
    try:
        bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        ends = [as_stored(int(v), bits, signed) for v in ((value,) if limit is None else (value, limit))]
    except (TypeError, ValueError):
        return None
    lo, hi = min(ends), max(ends)
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def as_stored(value: int, bits: int, signed: bool) -> int:
    """A header value as the pixel array holds it: its low `bits` bits, sign-extended for signed pixels (pydicom
    masks the pixels so; a padding value may be written with the unused high bits set, or as US for SS pixels)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def first_frame(ds, syntax: str) -> np.ndarray:
    """Only the first frame is decoded, whatever NumberOfFrames says. The PREFERRED_PLUGIN goes first; pydicom's
    own plugin order (pylibjpeg first) is the fallback, so a stream one plugin refuses still gets the others."""
    from pydicom.pixels import pixel_array

    plugin = PREFERRED_PLUGIN.get(syntax, "")
    if plugin:
        try:
            return pixel_array(ds, index=0, decoding_plugin=plugin)
        except Exception:  # noqa: BLE001 - the other plugins get their turn, and their error is the one reported
            pass
    return pixel_array(ds, index=0)


def stretch_to_uint8(arr: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    """Map an array's own min..max linearly to 0..255 (constant arrays become 0); with a padding mask, the min..max
    of the other pixels, and the padding 0. Works in one float32 copy of the array (a 9000 x 9000 16-bit PNG: 324 MB
    once, where each step's temporary array cost as much again)."""
    out = np.array(arr, dtype=np.float32)  # a copy: the caller's array is never changed
    np.nan_to_num(out, copy=False)
    inside = True if padding is None else ~padding
    if not np.any(inside):
        return np.zeros(out.shape, np.uint8)
    lo = float(np.min(out, where=inside, initial=np.inf))
    hi = float(np.max(out, where=inside, initial=-np.inf))
    if hi > lo:
        out -= np.float32(lo)
        out *= np.float32(255.0 / (hi - lo))
    else:
        out[...] = 0
    if padding is not None:  # padding outside lo..hi would wrap around in uint8
        np.clip(out, 0, 255, out=out)
        out[padding] = 0
    np.rint(out, out=out)
    return out.astype(np.uint8)
