"""Native libraries' start-up lines kept off the command's stderr.

TensorFlow writes some lines straight to file descriptor 2 as it loads and first looks for devices (absl's
"WARNING: All log messages before absl::InitializeLog() ...", oneDNN's and CUDA's notes, "failed call to cuInit"),
before its log level applies: `TF_CPP_MIN_LOG_LEVEL` does not silence them. A command whose contract is one
`error:` line (export refusing a model below the quality floor, after calibration) printed 7 of them first.

While a block runs, file descriptor 2 goes through a small filter process that drops the lines matching a pattern
and passes every other line on as it comes. A process of its own, so that what native code prints as it aborts
the whole process (a fatal check, a CPU without the instructions the library was built for) still arrives: the
filter reads it before the end of the pipe that the dead process held.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

FILTER = """\
import re, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # its own session (the terminal's Ctrl-C is not its); it ends at end of input
noise = re.compile(sys.argv[1].encode())
out = sys.stderr.buffer
for line in sys.stdin.buffer:
    if not noise.search(line):
        out.write(line)
        out.flush()
"""
WAIT_SECONDS = 10  # for the filter to pass on what it still holds once the block is done


def _flush() -> None:
    """sys.stderr's buffer out, where there is one: None in a process started without file descriptor 2, and the
    batch job's MainThreadOnly wrapper around that None has no stream to flush (QA: a night started `2>&-` failed)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


@contextlib.contextmanager
def dropped(noise: str):
    """While the block runs, the lines written to file descriptor 2 (by native code and Python alike) that match
    the regular expression `noise` are dropped; every other line reaches stderr as it is written. Without stderr,
    or where no filter process can start, the block runs as it is."""
    _flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon started with it closed): nothing to keep off it
        yield
        return
    try:
        try:
            filt = subprocess.Popen([sys.executable, "-I", "-S", "-c", FILTER, noise], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=saved,
                                    start_new_session=True)  # a signal to the command's group is not the filter's
        except OSError:
            yield
            return
        os.dup2(filt.stdin.fileno(), 2)
        try:
            yield
        finally:
            _flush()
            os.dup2(saved, 2)
            filt.stdin.close()
            try:
                filt.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                filt.kill()
                filt.wait()
    finally:
        os.close(saved)
