"""Grey levels to 8 bits: the linear stretch of 16-bit and float images (a DICOM frame after its LUTs, a 16-bit
PNG) to 0..255, BLOCK_ROWS rows at a time."""
from __future__ import annotations

import numpy as np

from xray_core.errors import ImageError

# Rows of a frame mapped at once (also by xray_core.dicom.apply_luts): 512 rows of a 7000-column film are 27 MB of
# float64, or 14 MB of float32, per temporary
BLOCK_ROWS = 512


def stretch_to_uint8(arr: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    """Map an array's own min..max linearly to 0..255 (constant arrays become 0); with a padding mask, the min..max
    of the other pixels, and the padding 0. The caller's array is never changed. Works BLOCK_ROWS rows at a time, each
    block as a float32 copy: the peak is the uint8 result and one block (a whole float32 copy was 240 MB for a
    7000 x 8600 film, per worker, beside apply_luts' own)."""
    lo, hi = np.inf, -np.inf
    for rows, block in _float_blocks(arr):
        inside = True if padding is None else ~padding[rows]
        lo = min(lo, float(np.min(block, where=inside, initial=np.inf)))
        hi = max(hi, float(np.max(block, where=inside, initial=-np.inf)))
    out = np.zeros(arr.shape, np.uint8)
    if lo > hi:  # every pixel is padding
        return out
    for rows, block in _float_blocks(arr):
        if hi > lo:
            block -= np.float32(lo)
            block *= np.float32(255.0 / (hi - lo))
        else:
            block[...] = 0
        if padding is not None:  # padding outside lo..hi would wrap around in uint8
            np.clip(block, 0, 255, out=block)
            block[padding[rows]] = 0
        out[rows] = np.rint(block, out=block)
    return out


def _float_blocks(arr: np.ndarray):
    """(row slice, a float32 copy of those rows with NaN as 0 and infinities as float32's extremes), BLOCK_ROWS rows
    at a time."""
    for start in range(0, arr.shape[0], BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        yield rows, np.nan_to_num(np.array(arr[rows], dtype=np.float32), copy=False)


def high_bytes_stretched(gray: np.ndarray) -> np.ndarray:
    """The grey of a 16-bit colour or gray+alpha PNG, which Pillow reads by its high bytes (uint8), stretched from its
    own min..max as a 16-bit gray PNG is (QA: holding 15 significant bits, it was scored from a half-bright picture,
    and three NORMAL scans of 20 were flagged); ImageError where its high bytes never reach 64, as they do not with
    14 or fewer significant bits (64 grey levels at most: under the 107 of every training scan, content.py)."""
    if int(gray.max()) < 64:
        raise ImageError("16-bit colour PNG holding 14 or fewer significant bits (read by its high byte only, it "
                         "keeps too few grey levels): save the scan as 16-bit grayscale PNG")
    return stretch_to_uint8(gray)
