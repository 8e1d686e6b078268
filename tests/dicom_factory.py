"""Build DICOM files with pydicom for tests and benchmarks (no downloads), in any transfer syntax the project decodes.

RLE, JPEG-LS and JPEG 2000 are encoded by pydicom's own `Dataset.compress` (its pylibjpeg, pyjpegls and pydicom
encoder plugins); pydicom has no JPEG (ISO 10918) encoder, so JPEG Baseline, Extended and Lossless (Process 14, with
and without Selection Value 1) streams come from imagecodecs' libjpeg-turbo (the dev extra) and are encapsulated
with pydicom. Deflated is pydicom's own writer.
"""
from __future__ import annotations

import functools
import io
import os
import urllib.request
import warnings

import numpy as np
import pydicom
from pydicom import uid
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

# transfer syntax -> encoder options, for the encodings archives send (issue 20, item 4)
LOSSLESS = {
    uid.ExplicitVRLittleEndian: {},
    uid.DeflatedExplicitVRLittleEndian: {},
    uid.RLELossless: {},
    uid.JPEGLossless: {"predictor": 6},  # Process 14 with a predictor other than 1
    uid.JPEGLosslessSV1: {"predictor": 1},
    uid.JPEGLSLossless: {},
    uid.JPEGLSNearLossless: {"jls_error": 0},  # near-lossless syntax with NEAR=0: lossless in the lossy syntax
    uid.JPEG2000Lossless: {},
}
LOSSY = {
    uid.JPEGBaseline8Bit: {"level": 90},  # 8-bit samples only
    uid.JPEGExtended12Bit: {"level": 90},
    uid.JPEGLSNearLossless: {"jls_error": 3},
    uid.JPEG2000: {"j2k_cr": [20]},  # compression ratio 20:1
}
_JPEG = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)


def dicom_dataset(pixels: np.ndarray, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                  window: tuple[float, float] | None = None, slope: float = 1.0, intercept: float = 0.0,
                  modality: str = "CR", **elements) -> Dataset:
    """An uncompressed (Explicit VR Little Endian) dataset; pixels: (rows, cols) or (frames, rows, cols) unsigned
    ints. `elements` are set as they are (e.g. BodyPartExamined="CHEST", PatientID="P1"); a value of None leaves
    the element out."""
    pixels = np.asarray(pixels)
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    allocated = 8 if pixels.dtype == np.uint8 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = (DigitalXRayImageStorageForPresentation if modality == "DX"
                                    else SecondaryCaptureImageStorage)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in elements.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    return ds


def encode(ds: Dataset, syntax: str, **options) -> None:
    """Re-encode `ds`'s uncompressed single-frame pixel data in transfer syntax `syntax`, in place."""
    syntax = uid.UID(syntax)
    if syntax in (uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax  # deflate happens on writing
    elif syntax in _JPEG:
        import imagecodecs

        arr = ds.pixel_array
        kwargs = {"level": options.get("level", 90)}
        if syntax in (uid.JPEGLossless, uid.JPEGLosslessSV1):
            kwargs = {"lossless": True, "predictor": options["predictor"]}
        frame = imagecodecs.jpeg8_encode(arr, bitspersample=int(ds.BitsStored), **kwargs)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
            ds.LossyImageCompression = "01"
    else:
        ds.compress(syntax, generate_instance_uid=False, **options)
        if syntax in (uid.JPEGLSNearLossless, uid.JPEG2000) and options.get("jls_error", 1):
            ds.LossyImageCompression = "01"


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_bytes(pixels: np.ndarray, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, slope: float = 1.0, intercept: float = 0.0,
                compressed_junk: bool = False, syntax: str = ExplicitVRLittleEndian, options: dict | None = None,
                modality: str = "CR", **elements) -> bytes:
    """A DICOM file's bytes (see dicom_dataset), encoded in `syntax` with encoder `options` (LOSSLESS, LOSSY).
    compressed_junk: a JPEG-LS file whose single fragment is not a JPEG-LS stream."""
    ds = dicom_dataset(pixels, bits_stored, photometric, window, slope, intercept, modality, **elements)
    if compressed_junk:
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
    elif syntax != ExplicitVRLittleEndian:
        encode(ds, syntax, **(options or {}))
    return to_bytes(ds)


def xray_like(rows: int = 500, cols: int = 400, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like unsigned image using `bits` bits: dark air around a bright body, two darker lung
    fields, a bright spine and mediastinum, ribs, smooth shading and detector noise. Compressors see texture and
    noise as in a scan (a flat or random image would be too easy or too hard for them)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    u, v = (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)  # -1..1
    body = 1.0 / (1.0 + np.exp(-(0.92 - np.hypot(u / 0.95, v * 0.8)) * 25))
    lungs = sum(np.exp(-(((u - cx) / 0.28) ** 2 + ((v + 0.05) / 0.55) ** 2) ** 2) for cx in (-0.42, 0.42))
    spine = np.exp(-(u / 0.09) ** 2) * (v > -0.9)
    ribs = 0.5 + 0.5 * np.sin(v * 22 + 3 * u ** 2)
    img = 0.08 + 0.62 * body - 0.38 * lungs * body + 0.22 * spine + 0.06 * ribs * lungs + 0.05 * v
    img = img + rng.normal(0, 0.006, img.shape)
    top = 2 ** bits - 1
    return np.clip(np.rint(img * top), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def _no_network(*args, **kwargs):
    raise OSError("the tests never download")


@functools.cache
def bundled_files() -> dict[str, tuple[str, bytes]]:
    """name -> (transfer syntax UID, file bytes) of every file pydicom ships that has pixel data (CT, MR, US, NM,
    SC, RT, SEG, C-spine CR: 95 in pydicom 3.0.2). get_testdata_files also tries to download pydicom-data's files:
    urllib's urlretrieve is stubbed meanwhile, so that it finds the bundled ones only, at once and the same with or
    without a network."""
    real = urllib.request.urlretrieve
    urllib.request.urlretrieve = _no_network
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths = get_testdata_files()
    finally:
        urllib.request.urlretrieve = real
    found = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:  # noqa: BLE001 - JSON, ICC profiles, text and a few deliberately broken files
            continue
        if "PixelData" in ds:
            found[os.path.basename(path)] = (str(ds.file_meta.get("TransferSyntaxUID", "")), data)
    return found
