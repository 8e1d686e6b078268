"""The job's stderr while DirectRunner's worker threads run the pipeline: only the main thread writes there.

Beam's SDK harness prints a failing bundle's whole traceback on stderr (sdk_worker.py, `_execute`) besides returning
it to the runner, which fails the job with one line; in DirectRunner's worker threads (up to 4 cores: runner.py) that
is the job's own stderr (a full disk: 100 lines before that one, and a traceback may name files, which the log at
INFO never does). Worker processes have their own stderr files (batch_job/workers.py).
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading


class MainThreadOnly(io.TextIOBase):
    """sys.stderr while DirectRunner's worker threads run the pipeline (:func:`quiet_worker_threads`): the main
    thread's writes reach `stream`, the job's stderr; every other thread's are dropped."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


def job_stderr():
    """The job's own stderr, also while :func:`quiet_worker_threads` holds sys.stderr."""
    return sys.stderr.stream if isinstance(sys.stderr, MainThreadOnly) else sys.stderr


@contextlib.contextmanager
def quiet_worker_threads(quiet: bool):
    """While `quiet`, only the main thread writes on sys.stderr (the module's docstring says why): the job's log
    lines go through logging's handler, which holds the stream itself, and Python's hook for a failing thread
    writes to job_stderr() (batch_job/__main__.py)."""
    if not quiet:
        yield
        return
    saved = sys.stderr
    sys.stderr = MainThreadOnly(saved)
    try:
        yield
    finally:
        sys.stderr = saved
