"""An input file's bytes, read as the batch job, training, the gate fit and calibration all read one: refused
(ImageError, one line) for what is no regular file, is over MAX_FILE_BYTES (before anything is read) or empty, with
the same words everywhere (a FIFO named `scan.jpeg` in a training folder blocked training's open() for good)."""
from __future__ import annotations

import os
import stat

from xray_core.errors import ImageError

MAX_FILE_BYTES = 1 << 30  # 1 GiB: nothing larger is read into memory


def too_large(size: int, limit: int = MAX_FILE_BYTES) -> ImageError:
    return ImageError(f"file too large ({size} bytes > {limit})" if size else f"file too large (> {limit} bytes)")


def unreadable(exc: OSError) -> ImageError:
    """Why a file could not be read, in the words every row and message uses."""
    if isinstance(exc, PermissionError):
        return ImageError("permission denied")
    if isinstance(exc, IsADirectoryError):
        return ImageError("is a directory")
    if isinstance(exc, FileNotFoundError):
        return ImageError("file not found (vanished or dangling link)")
    return ImageError(f"read failed: {exc.strerror or exc}")


def not_empty(data: bytes) -> bytes:
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def read_file(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """A local file's bytes; ImageError for one that is not there, not a regular file, over `limit` or empty, or
    cannot be read."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if st.st_size > limit:
            raise too_large(st.st_size, limit)
        with open(path, "rb") as f:
            return not_empty(f.read())
    except OSError as exc:
        raise unreadable(exc) from None
