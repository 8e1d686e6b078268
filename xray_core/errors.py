"""An exception as one line: the form every command's error messages and error rows use; SIGTERM as an exception,
for the commands that clean up after it as after Ctrl-C; and ImageError, an input that cannot become a model input."""
from __future__ import annotations

import signal
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


def middle_cut(text: str, limit: int) -> str:
    """`text` at most `limit` characters, its middle cut out: a message's end (its reason) stays, also after a path
    thousands of characters long (review: "output dir /tmp/q…q" lost "File name too long")."""
    if len(text) <= limit:
        return text
    return text[:limit // 2 - 1] + "…" + text[-(limit // 2):]


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, Kubernetes, kill), or SIGHUP (the terminal of a run by hand closed: an ssh
    session that dropped): handled as Ctrl-C (a KeyboardInterrupt to everything between), exit 128 + the signal's
    number (143, 129) instead of 130."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(int(signum))
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def code(self) -> int:
        return 128 + self.signum


def stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What a command stopped by `exc` says it was, and its exit code: ("terminated (SIGTERM)", 143),
    ("terminated (SIGHUP)", 129) or ("interrupted", 130) for Ctrl-C."""
    return (f"terminated ({exc.name})", exc.code) if isinstance(exc, Terminated) else ("interrupted", 130)


class ImageError(ValueError):
    """An input that cannot become a model input; the message is one short line. `header`: a DICOM file's header
    when it could be read before decoding failed (its identifiers still belong on the worklist's error row)."""

    def __init__(self, message: str, header: DicomHeader | None = None):
        super().__init__(message)
        self.header = header
