"""Ctrl-C and SIGTERM for the command: stop at once, except while the outputs are being published.

`python -m batch_job` installs GATE.handler for SIGINT (Ctrl-C) and SIGTERM (what `docker stop`, systemd and
Kubernetes send). Outside GATE.deferred() the signal raises KeyboardInterrupt, or Terminated for SIGTERM: the job
removes its temp dir, publishes nothing, leaves the ledger as it was and exits 130 or 143. Inside it (publishing
OUT_DIR and the ledger commit) the signal is held until the section ends, so OUT_DIR and the ledger are never
left half-done and the job's last line is always true.
"""
from __future__ import annotations

import contextlib
import signal

from xray_core.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGate:
    def __init__(self):
        self.depth = 0
        self.pending = 0  # the signal held while publishing; 0: none

    def handler(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self.handler)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


GATE = InterruptGate()
