"""A JPEG or JPEG-LS codestream's frame header, read without decoding anything (ITU T.81 B.2.2, T.87): the DICOM
reader checks a frame's size against its header before a decoder allocates it (xray_core/dicom.py), and the
preprocessing decodes a JPEG at a reduced scale only when its frame is a DCT one (xray_core/preprocessing.py)."""
from __future__ import annotations

import dataclasses

# start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (ITU T.81 B.1.1.3) and JPEG-LS's SOF55 (T.87)
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
# lossless processes (SOF3, 7, 11, 15): libjpeg-turbo decodes them, but not at a reduced scale
LOSSLESS_MARKERS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})


@dataclasses.dataclass(frozen=True)
class JpegFrame:
    marker: int  # the SOF marker's second byte
    rows: int
    columns: int


def jpeg_frame(stream: bytes) -> JpegFrame | None:
    """The first frame header of a codestream that starts with SOI, stepping over the marker segments before it (an
    EXIF thumbnail inside APP1 is stepped over with its segment); None when there is none."""
    pos = 2  # after SOI
    while pos + 9 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in SOF_MARKERS:
            return JpegFrame(marker, int.from_bytes(stream[pos + 5:pos + 7], "big"),
                             int.from_bytes(stream[pos + 7:pos + 9], "big"))
        pos += 2 + int.from_bytes(stream[pos + 2:pos + 4], "big")
    return None


def jpeg_frame_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) of :func:`jpeg_frame`; None when there is no frame header."""
    frame = jpeg_frame(stream)
    return None if frame is None else (frame.rows, frame.columns)


def scalable_jpeg(data: bytes) -> bool:
    """Whether libjpeg may decode this JPEG file at a reduced scale (Pillow's draft()): a DCT frame. Pillow's draft()
    of a lossless one to a smaller size corrupted the heap and killed the whole job (QA: a DICOM export saved as a
    lossless .jpg); one whose frame header cannot be found is decoded at full size too."""
    frame = jpeg_frame(data)
    return frame is not None and frame.marker not in LOSSLESS_MARKERS
