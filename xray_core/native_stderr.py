"""Native libraries' start-up lines held back from the command's stderr.

TensorFlow writes some ten lines straight to file descriptor 2 as it loads and first looks for devices (absl's
"WARNING: All log messages before absl::InitializeLog() ...", oneDNN's and CUDA's notes, "failed call to cuInit"),
before its log level applies: `TF_CPP_MIN_LOG_LEVEL` does not silence them. A command whose contract is one
`error:` line (export refusing a model below the quality floor, after calibration) printed them first.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile


def _flush() -> None:
    if sys.stderr is not None:  # None in a process started without file descriptor 2
        sys.stderr.flush()


@contextlib.contextmanager
def held_back():
    """While the block runs, whatever reaches file descriptor 2 (native code's and Python's writes alike) goes into
    a temporary file: dropped when the block ends normally, written to stderr when it raises an Exception (the lines
    may say why a library failed to load). Not for blocks that print what the user must see."""
    _flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon started with it closed): nothing to hold back
        yield
        return
    failed = False
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            except Exception:
                failed = True
                raise
            finally:
                _flush()
                os.dup2(saved, 2)
                if failed:
                    held.seek(0)
                    data = held.read()
                    while data:  # a pipe may take part of it per call
                        data = data[os.write(2, data):]
    finally:
        os.close(saved)
