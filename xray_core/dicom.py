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

from xray_core import content
from xray_core.dicom_header import (  # noqa: F401 - is_dicom: preprocessing's import
    DicomHeader,
    check_inflated_size,
    is_dicom,
    pydicom_reader,
)
from xray_core.errors import one_line
from xray_core.intensity import BLOCK_ROWS, stretch_to_uint8
from xray_core.jpeg_frame import jpeg_frame_size

# pydicom logs each decoder plugin's failure with its traceback (ERROR) before raising one error that names every
# plugin and its message: that error becomes the file's one-line reason, so the tracebacks would only flood stderr
# (two per undecodable JPEG-LS file). Only this module of pydicom is quietened (and one message: dicom_header.py).
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

# transfer syntax UID -> the pydicom decoding plugin tried before pydicom's own order, where it is measurably faster
# (bench/bench_dicom.py, docs/dicom.md): CharLS for JPEG-LS Lossless and Near-Lossless, Pillow's libjpeg-turbo for
# 8-bit JPEG Baseline
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.50": "pillow",
}
# transfer syntax UIDs whose frames are JPEG (or JPEG-LS) codestreams, and JPEG 2000 ones: a decoder sizes its output
# by the codestream's own frame header, not by Rows and Columns
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                               "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
# (7FE0,0010) Pixel Data as a little-endian file writes its tag
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


@dataclasses.dataclass(frozen=True)
class DecodedDicom:
    """A decoded DICOM file: its first frame as 8-bit grayscale, its header (read in the same pass) and how colourful
    the frame was before it became gray (content.colour_spread; 0 for a grayscale frame)."""

    image: Image.Image
    header: DicomHeader
    colour_spread: float = 0.0


def decode_dicom(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image of :func:`read_dicom`. Raises ValueError with a one-line reason."""
    return read_dicom(data, max_pixels).image


def transfer_syntax(ds):
    """The data set's transfer syntax. A data set written without file meta information (no preamble, as older
    systems did) names none: its pixel data is then native, in the encoding pydicom found the elements in, which is
    set as its file meta's transfer syntax for pydicom to decode it."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        return syntax
    implicit, little = ds.original_encoding
    syntax = uid.ImplicitVRLittleEndian if implicit else (
        uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def read_dicom(data: bytes, max_pixels: int | None) -> DecodedDicom:
    """Parse a DICOM file's bytes once: the first frame as an 8-bit grayscale image, and the header. Frames of more
    than max_pixels samples are refused before decoding. Raises ValueError with a one-line reason for anything that
    cannot be decoded."""
    pydicom = pydicom_reader()

    check_inflated_size(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt files
        raise ValueError(f"corrupt DICOM: {one_line(exc)}") from None
    if "PixelData" not in ds:  # the tag's bytes are there when the file ends inside the element (a cut transfer)
        raise ValueError("DICOM pixel data cut short (the file ends inside it)" if _PIXEL_DATA_TAG in data
                         else "DICOM without pixel data")
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise ValueError("corrupt DICOM: bad Rows/Columns") from None
    if max_pixels and rows * cols * samples > max_pixels:
        raise ValueError(f"decompression bomb: DICOM frame of {cols}x{rows}x{samples} exceeds {max_pixels} pixels")
    syntax = transfer_syntax(ds)
    name = getattr(syntax, "name", str(syntax))
    try:
        check_codestream_size(ds, str(syntax), rows, cols)
    except ValueError as exc:
        raise ValueError(f"DICOM pixel data not decodable ({name}): {exc}") from None
    check_native_length(ds, syntax, rows, cols, samples)
    try:
        arr = first_frame(ds, str(syntax))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"DICOM pixel data not decodable ({name}): {one_line(exc)}") from None
    spread = 0.0
    check_rescale(ds)
    try:
        padding = padding_mask(arr, ds)
        if arr.ndim == 3:  # colour DICOM (RGB; pydicom converts YBR): the input gate sees its colour, then the average
            spread = content.colour_spread(arr if arr.dtype == np.uint8 else stretch_to_uint8(arr))
            arr = arr.mean(axis=-1, dtype=np.float32)
        drop_unusable_window(ds)
        arr = apply_luts(arr, ds)
        if inverted(ds):
            np.subtract(arr.max() + arr.min(), arr, out=arr)
    except Exception as exc:  # noqa: BLE001 - malformed LUTs and the like
        raise ValueError(f"corrupt DICOM LUT/window: {type(exc).__name__}: {one_line(exc)}") from None
    return DecodedDicom(Image.fromarray(stretch_to_uint8(arr, padding), mode="L"), DicomHeader.from_dataset(ds),
                        spread)


def apply_luts(arr: np.ndarray, ds) -> np.ndarray:
    """The modality LUT (rescale), then the VOI LUT or window, as float32, BLOCK_ROWS rows at a time. pydicom computes
    both in float64 with temporaries of the whole frame: a 7000 x 8600 film took 0.8-1.7 GB above the process, per
    worker. Both are per-pixel mappings, so the blocks give the same values; the peak is the float32 result plus
    one block's temporaries."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = np.empty(arr.shape, np.float32)
    for start in range(0, arr.shape[0], BLOCK_ROWS):
        block = apply_modality_lut(arr[start:start + BLOCK_ROWS], ds)
        out[start:start + BLOCK_ROWS] = apply_voi_lut(block, ds, index=0)
    return out


def inverted(ds) -> bool:
    """Whether the frame is shown inverted (low values white): MONOCHROME1, or a Presentation LUT Shape of INVERSE
    (PS3.3 C.11.6). Either says so once: a DX image that is MONOCHROME1 must also carry INVERSE (C.8.11.1.1.1), and
    is inverted once, as viewers show it."""
    return (str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
            or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE")


def check_codestream_size(ds, syntax: str, rows: int, cols: int) -> None:
    """A JPEG or JPEG 2000 frame's own header must give the Rows and Columns that were checked against the pixel
    limit: its decoder allocates what the codestream says (an 8 KB file claiming 30000 x 30000 took 4.5 GB before
    pydicom noticed the mismatch). Reads the first frame's header only (pylibjpeg-libjpeg's get_parameters decodes
    the whole frame to tell, so it cannot be the check). Raises ValueError (one line)."""
    if syntax not in JPEG_SYNTAXES and syntax not in JPEG2000_SYNTAXES:
        return
    from pydicom.encaps import get_frame

    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        frame = bytes(get_frame(ds.PixelData, 0, number_of_frames=max(frames, 1)))
        if syntax in JPEG_SYNTAXES:
            size = jpeg_frame_size(frame)
        else:  # Pillow reads a JPEG 2000 codestream's SIZ segment when it opens it, and decodes nothing
            with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as img:
                size = img.height, img.width
    except Exception as exc:  # noqa: BLE001 - a codestream whose header cannot be read will not decode either
        raise ValueError(f"frame header: {one_line(exc)}") from None
    if size != (rows, cols):
        shown = "no frame header" if size is None else f"a frame of {size[1]}x{size[0]}"
        raise ValueError(f"its codestream holds {shown}, its header says {cols}x{rows}")


def check_native_length(ds, syntax, rows: int, cols: int, samples: int) -> None:
    """Native (not encapsulated) pixel data must be as long as its header says: Rows x Columns x Samples per Pixel x
    Bits Allocated x Number of Frames, plus one byte of padding to an even length. pydicom decodes a longer one from
    its first bytes with only a log warning: a header that says 90 rows over 96 rows of pixels was scored on the
    wrong image (0.400 against 0.271). Raises ValueError (one line); a header without Bits Allocated is left to
    pydicom, which refuses it."""
    from pydicom.uid import UncompressedTransferSyntaxes

    if syntax not in UncompressedTransferSyntaxes or "BitsAllocated" not in ds:
        return
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated)
    except (TypeError, ValueError):
        raise ValueError("corrupt DICOM: bad NumberOfFrames/BitsAllocated") from None
    expected = -(-rows * cols * samples * frames * bits // 8)  # 1-bit data is packed
    if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels
    found = len(ds.PixelData)
    if found not in (expected, expected + 1):
        raise ValueError(f"corrupt DICOM: pixel data of {found} bytes where its header ({cols}x{rows}, {samples} "
                         f"sample(s) of {bits} bits, {frames} frame(s)) needs {expected}")


def _first(value):
    """An element's first value (a multi-valued window gives several)."""
    return value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value


def check_rescale(ds) -> None:
    """ValueError (one line) for a Rescale Slope or Intercept that is not a number ("1,0"): no guess at what it
    meant, since every value of the image depends on it."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            float(_first(value))
        except (TypeError, ValueError):
            raise ValueError(f"corrupt DICOM: {keyword} {str(value)[:40]!r} is not a number") from None


def drop_unusable_window(ds) -> None:
    """A window that cannot be applied (a width below 1, which PS3.3 C.11.2.1.2 forbids, or a value that is not a
    number) is ignored, as viewers do, and as a file without one: the image's own min..max. A VOI LUT Sequence,
    which pydicom applies first, is left alone."""
    if "VOILUTSequence" in ds or "WindowWidth" not in ds:
        return
    try:
        width, center = float(_first(ds.WindowWidth)), float(_first(ds.get("WindowCenter")))
        usable = 1 <= width < float("inf") and np.isfinite(center)
    except (TypeError, ValueError):
        usable = False
    if not usable:
        for keyword in ("WindowWidth", "WindowCenter"):
            if keyword in ds:
                delattr(ds, keyword)


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
            return _decoded(pixel_array, ds, index=0, decoding_plugin=plugin)
        except Exception:  # noqa: BLE001 - the other plugins get their turn, and their error is the one reported
            pass
    return _decoded(pixel_array, ds, index=0)


def _decoded(call, *args, **kwargs):
    """call(*args, **kwargs), with a decoder's crash as an error of the file: a Rust plugin's panic (pylibjpeg-rle on
    one changed byte of an RLE stream: "index out of bounds") comes out as pyo3's PanicException, a BaseException,
    which passed every `except Exception` and failed the whole night (QA). Interrupts and exits still go through. No
    other plugin gets a turn: pydicom's own RLE decoder "decodes" such a stream into wrong pixels with a warning, and a
    corrupt file is an error, not an image to score. (Rust's panic hook still prints its lines on stderr:
    batch_job.runner.DECODER_PANIC_LINES, which the job drops while its worker threads decode.)"""
    try:
        return call(*args, **kwargs)
    except (Exception, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - see above
        raise RuntimeError(f"decoder crashed: {one_line(exc)}") from None
