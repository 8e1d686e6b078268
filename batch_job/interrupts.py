"""Ctrl-C for the command: stop at once, except while the outputs are being published.

`python -m batch_job` installs GATE.handler for SIGINT. Outside GATE.deferred() a Ctrl-C raises
KeyboardInterrupt (the job removes its temp dir and exits 130). Inside it (publishing OUT_DIR and the
ledger commit) the interrupt is held until the section ends, so OUT_DIR and the ledger are never left
half-done and the job's last line is always true.
"""
from __future__ import annotations

import contextlib


class InterruptGate:
    def __init__(self):
        self.depth = 0
        self.pending = False

    def handler(self, signum, frame):
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


GATE = InterruptGate()
