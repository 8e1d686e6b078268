"""What the preprocessing needs of a PNG's chunk headers, read without decoding anything (PNG spec, section 5.3):
whether the file is whole (one that ends before its IEND chunk, which Pillow decodes as far as it goes, is refused),
and its bit depth and colour type (a 16-bit colour PNG reaches Pillow's modes by its high bytes: xray_core/
preprocessing.py)."""
from __future__ import annotations

import struct


def png_depth_and_colour(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from the IHDR chunk, which every PNG starts with (PNG spec, section 11.2.2: after the
    8-byte signature, the chunk's length and type, width and height), or None where there is none."""
    return (data[24], data[25]) if len(data) >= 26 and data[12:16] == b"IHDR" else None


WIDE_COLOUR = {(16, 2), (16, 4), (16, 6)}  # 16-bit RGB, gray+alpha, RGBA: Pillow hands out their high bytes only


def png_ends(data: bytes) -> bool:
    """Whether a PNG's chunks run whole up to its IEND chunk (the end every PNG has): each chunk's length and type
    read in turn, no chunk's data (a file's bytes that spell IEND elsewhere, in a text chunk, do not count: QA)."""
    at = 8  # after the signature
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IEND":
            return at + 12 <= len(data)  # with its CRC
        at += 12 + length  # length, type, data, CRC
    return False
