"""The one preprocessing function: image bytes -> (S, S, 1) float32 in [0, 1].

Pillow + numpy only (no TensorFlow), with the parameters recorded in the model's metadata (:class:`PreprocessConfig`):
the batch job reads each file with :func:`load_input` (DICOM header rules and the cheap checks, then
:func:`to_model_input`); training, the export's checks, the gate fit and calibration with :func:`read_model_input`, the
same reading; :func:`preprocess_image` is the decode and resize alone, which both end in.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from xray_core import content
from xray_core.dicom import is_dicom, read_dicom
from xray_core.dicom_header import (
    DEFAULT_MODALITIES,
    DicomHeader,
    header_problem,
    read_dicom_header,
)
from xray_core.errors import ImageError, one_line
from xray_core.intensity import high_bytes_stretched, stretch_to_uint8
from xray_core.jpeg_frame import scalable_jpeg
from xray_core.png_chunks import WIDE_COLOUR, png_depth_and_colour, png_ends
from xray_core.reading import read_file

# _check_size refuses these images itself. Not warnings.catch_warnings() per call: it swaps the
# process-wide filter list and is not thread-safe (the batch job decodes in several threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

OUT_OF_SCOPE = "out of scope: "  # read_model_input's error for what the batch job leaves out of scope
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a multi-picture JPEG (a camera's), whose first picture Pillow decodes as JPEG
SUPPORTED_FORMATS = (*JPEG_FORMATS, "PNG")
# A progressive JPEG is decoded scan by scan, and nothing in the format bounds their number: one 1.2 MB file of 10,000
# repeated scans took 76 s of CPU (QA), so the 1 GiB file limit allowed hours. Real files have about 10 (libjpeg's
# standard scripts: 6 for gray, 10 for colour); 500 is the scan limit libjpeg-turbo's fuzzers set (TJPARAM_SCANLIMIT).
MAX_JPEG_SCANS = 500
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Everything the scoring side needs to reproduce training's inputs exactly."""

    image_size: int = 128
    color_mode: str = "L"  # 8-bit grayscale
    resize_filter: str = "bilinear"
    scaling: str = "divide_by_255"  # float32 in [0, 1]
    jpeg_draft: bool = True  # let libjpeg decode at a reduced scale (>= image_size)
    min_side: int = 32  # smaller inputs are rejected, not upscaled from nothing
    crop_bands: bool = False  # cut edge bands of constant grey before the resize (to_scan)

    def __post_init__(self):
        for name in ("image_size", "min_side"):  # review: "32" failed every image with a TypeError, as an error row
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("jpeg_draft", "crop_bands"):  # review: "false" (a string) would have read as cropping
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.resize_filter, str) or self.resize_filter not in _FILTERS:
            raise ValueError(f"unknown resize_filter {self.resize_filter!r}")
        if self.color_mode != "L" or self.scaling != "divide_by_255":
            raise ValueError("only color_mode 'L' with scaling 'divide_by_255' is implemented")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """ValueError for a setting this code does not know: a package from a newer export that preprocesses in a
        way this code would not (crop_bands, before 2026-12-02) must be refused, not scored without it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"preprocessing settings this code does not know: {', '.join(unknown)} (upgrade it)")
        return cls(**data)


def to_grayscale_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> mode 'L'. 16/32-bit integer and float data is mapped linearly from its own min..max to
    0..255, as a DICOM without a window (xray_core/dicom.py): a 16-bit PNG is often a DICOM export holding 10 to 16
    significant bits, which a PNG does not record (Pillow's own convert would clip at 255)."""
    if img.mode == "L":
        return img
    if img.mode in _HIGH_BIT_MODES or img.mode == "F":
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


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded input: upright 8-bit grayscale, how colourful it was before (content.colour_spread), and its
    DICOM header (None for JPEG and PNG)."""

    image: Image.Image
    colour_spread: float = 0.0
    header: DicomHeader | None = None


def _decode(data: bytes, config: PreprocessConfig) -> Decoded:
    if is_dicom(data):
        dicom = read_dicom(data, Image.MAX_IMAGE_PIXELS)
        return Decoded(_check_size(dicom.image, config), dicom.colour_spread, dicom.header)
    img = Image.open(io.BytesIO(data), formats=None)
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {img.format} (JPEG, PNG and DICOM are read: convert it)")
    if img.format == "PNG" and not png_ends(data):  # Pillow decodes the pixels it has and stops: a PNG still being
        raise ImageError(f"decode failed: {CUT_SHORT}")  # written was scored whole, then again (QA)
    _check_size(img, config)
    jpeg = img.format in JPEG_FORMATS
    wide_colour = img.format == "PNG" and png_depth_and_colour(data) in WIDE_COLOUR
    draft = config.jpeg_draft and jpeg and scalable_jpeg(data)
    if jpeg and img.info.get("progressive") and data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # SOS markers (FF is
        raise ImageError(f"progressive JPEG of more than {MAX_JPEG_SCANS} scans")  # stuffed in coded data)
    stored_rgb = img.info.get("adobe_transform") == 0  # RGB planes, not YCbCr: libjpeg cannot hand out YCbCr
    if jpeg and img.mode == "RGB" and not stored_rgb:
        # Decoded as YCbCr, libjpeg's luma plane is exactly what decoding to "L" gives (no colour conversion
        # either way), and the chroma planes tell a colour photograph from a gray scan saved in colour.
        img.draft("YCbCr", (config.image_size, config.image_size) if draft else img.size)
        img.load()
        img = ImageOps.exif_transpose(img)
        return Decoded(img.getchannel(0), content.colour_spread(np.asarray(img.convert("RGB"))))
    if draft:  # an RGB-stored JPEG stays RGB: its colour is checked
        img.draft("RGB" if stored_rgb else "L", (config.image_size, config.image_size))
    img.load()
    img = ImageOps.exif_transpose(img)
    colour = img.mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "RGBa", "La")
    gray = to_grayscale_8bit(img)
    if wide_colour:
        gray = Image.fromarray(high_bytes_stretched(np.asarray(gray)), mode="L")
    return Decoded(gray, content.colour_spread(np.asarray(img.convert("RGB"))) if colour else 0.0)


PILLOW_TRUNCATED = ("image file is truncated", "Truncated File Read")  # Pillow's words: a file ends in its pixels


CUT_SHORT = "image file cut short (the file ends before its image does: a transfer that stopped?)"


def _read_or_refuse(source: Union[bytes, str, os.PathLike]) -> bytes:
    """The bytes, or ImageError (one line) for a file that cannot be read (xray_core/reading.py)."""
    return bytes(source) if isinstance(source, (bytes, bytearray)) else read_file(source)


def decode(source: Union[bytes, str, os.PathLike], config: PreprocessConfig) -> Decoded:
    """Open, validate and decode (JPEG, PNG or DICOM) to an upright 8-bit grayscale image, with what the input
    gate needs of the original. Raises ImageError (one line) for anything that cannot be decoded."""
    data = _read_or_refuse(source)
    try:
        return _decode(data, config)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: if made an error
        raise ImageError(f"decompression bomb: {one_line(exc, 200)}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a decodable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if str(exc).startswith(PILLOW_TRUNCATED):  # its "(17 bytes not processed)" read as what was cut (QA)
            raise ImageError(f"decode failed: {CUT_SHORT}") from None
        raise ImageError(f"decode failed: {one_line(exc, 385)}") from None


def decode_image(source: Union[bytes, str, os.PathLike], config: PreprocessConfig) -> Image.Image:
    """Open, validate and decode (JPEG, PNG or DICOM) to an upright 8-bit grayscale Pillow image."""
    return decode(source, config).image


def to_scan(img: Image.Image, config: PreprocessConfig) -> Image.Image:
    """A decoded gray image -> what the model sees of it: with `crop_bands`, the part inside its edge bands of
    constant grey (a border, a pillarbox, a scanner's black edge; content.scan_box), else the whole image."""
    if not config.crop_bands:
        return img
    box = content.scan_box(np.asarray(img))
    return img if box == (0, 0, *img.size) else img.crop(box)


def decoded_scan(data: bytes, config: PreprocessConfig) -> tuple[Decoded, Image.Image]:
    """The decoded file and :func:`to_scan` of it. Where bands were cut and the scan inside them came out smaller than
    the model input or `min_side`, the file is decoded again without JPEG's reduced scale, chosen for the whole image
    (review: a 240 px scan inside a 2048 px black frame reached the model as 30 px, stretched; a 184 px one was refused
    as too small at its 23 px draft): what is left is then measured in the original's pixels."""
    decoded = decode(data, config)
    scan = to_scan(decoded.image, config)
    if config.jpeg_draft and scan is not decoded.image and min(scan.size) < max(config.image_size, config.min_side):
        decoded = decode(data, dataclasses.replace(config, jpeg_draft=False))
        scan = to_scan(decoded.image, config)
    return decoded, scan


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
    return to_model_input(decoded_scan(_read_or_refuse(source), config)[1], config)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """An input as the batch job scores it: the model input, or why the image is out of scope before any model
    runs (DICOM header rules, cheap content checks), and the DICOM header."""

    array: np.ndarray | None  # (S, S, 1) float32; None when out of scope
    reason: str = ""  # why out of scope ("" when in scope)
    header: DicomHeader | None = None


def load_input(data: bytes, config: PreprocessConfig,
               allowed_modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> Loaded:
    """The batch job's reading of one file's bytes: a DICOM header that is out of scope stops before its pixel data
    is decoded; then the cheap content checks; then :func:`to_model_input`, exactly as :func:`preprocess_image`.
    Raises ImageError (one line) for anything that cannot be decoded."""
    header = None
    if is_dicom(data):
        try:
            header = read_dicom_header(data)
        except ValueError as exc:
            raise ImageError(one_line(exc, 385)) from None
        reason = header_problem(header, allowed_modalities)
        if reason:
            return Loaded(None, reason, header)
    try:
        decoded, scan = decoded_scan(data, config)
    except ImageError as exc:
        raise ImageError(str(exc), header) from None
    # what the bands leave (decoded_scan: at full scale where it matters), said as the share they cover; only where
    # they were cut (review: a draft-decoded JPEG below min_side at a small image_size was refused as "0.0%" bands)
    if scan is not decoded.image and min(scan.size) < config.min_side:
        share = 1 - min(scan.width / decoded.image.width, scan.height / decoded.image.height)
        return Loaded(None, f"{content.PADDED}bands of constant grey cover {share:.1%} of a side: too little scan "
                            "inside them to score", decoded.header)
    reason = content.problem(np.asarray(scan), decoded.colour_spread)
    if reason:
        return Loaded(None, reason, decoded.header)
    return Loaded(to_model_input(scan, config), "", decoded.header)


def read_model_input(source: Union[bytes, str, os.PathLike], config: PreprocessConfig,
                     allowed_modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> np.ndarray:
    """A file as the batch job reads it (:func:`load_input`; its --modalities) -> (S, S, 1) float32:
    what training, the gate fit, the drift reference and calibration use, so that they learn from and are checked on
    the images the job would score. ImageError (one line) for a file that cannot be read or decoded, or that the job
    leaves out of scope before any model runs ("out of scope: " and the job's reason)."""
    loaded = load_input(_read_or_refuse(source), config, allowed_modalities)
    if loaded.array is None:
        raise ImageError(f"{OUT_OF_SCOPE}{loaded.reason}")
    return loaded.array


def upsample_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A model's (h, w) map -> (height, width) for size (width, height), bilinear (Pillow, float32). The map
    covers the whole image, as the model's input is the whole image resized (no crop)."""
    heat = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32), mode="F")
    return np.asarray(heat.resize(size, _FILTERS["bilinear"]))


