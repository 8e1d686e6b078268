"""Whether a PNG file is whole, read from its chunk headers without decoding anything (PNG spec, section 5.3): the
preprocessing refuses one that ends before its IEND chunk (xray_core/preprocessing.py), which Pillow decodes as far
as it goes."""
from __future__ import annotations

import struct


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
