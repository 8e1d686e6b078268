"""Ctrl-C for the command: stop with one line, except while the outputs are being published.

`python -m batch_job` installs GATE.handler for SIGINT before anything else. Outside
GATE.deferred() a Ctrl-C raises KeyboardInterrupt (the job removes its temp dir and exits 130),
and what worker threads still running print or log is silenced. Inside it (publishing OUT_DIR
and the ledger commit) the interrupt is held until the section ends, so OUT_DIR and the ledger
are never left half-done and the job's last line is always true.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading


class InterruptGate:
    def __init__(self):
        self.depth = 0
        self.pending = False

    def handler(self, signum, frame):
        if self.depth:
            self.pending = True
            return
        # Worker threads still running fail on the removed temp dir; Beam prints their tracebacks to
        # sys.stderr and logs them. The job's own last line goes to sys.__stderr__ (pipeline.main).
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda args: None
        sys.stderr = open(os.devnull, "w")
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


GATE = InterruptGate()
