"""An exception as one line: the form every command's error messages and error rows use; SIGTERM as an exception,
for the commands that clean up after it as after Ctrl-C; and ImageError, an input that cannot become a model input."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xray_core.dicom_header import DicomHeader

TRACEBACK = "Traceback (most recent call last)"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's message folded onto one line and cut to `limit` characters; its type name if empty.

    A message that carries a traceback (Beam re-raises a worker's error with the worker's traceback in
    the text) gives only its last line: the error that ended the traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any(line.startswith(TRACEBACK) for line in lines):
        lines = lines[-1:]
    return (" ".join(lines) or type(exc).__name__)[:limit]


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, Kubernetes, kill): handled as Ctrl-C (a KeyboardInterrupt to everything
    between), exit 143 instead of 130."""


class ImageError(ValueError):
    """An input that cannot become a model input; the message is one short line. `header`: a DICOM file's header
    when it could be read before decoding failed (its identifiers still belong on the worklist's error row)."""

    def __init__(self, message: str, header: DicomHeader | None = None):
        super().__init__(message)
        self.header = header
