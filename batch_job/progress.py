"""Progress while the pipeline runs: images done and images/s, from the shard files as they appear (any runner)."""
from __future__ import annotations

import logging
import os
import threading
import time

from batch_job.shards import shard_name

LOG = logging.getLogger("batch_job")


class Progress(threading.Thread):
    """Logs every `interval` seconds until stop is set (``with Progress(...):``)."""

    def __init__(self, tmp: str, shards, interval: float = 2.0):
        super().__init__(daemon=True)
        self.tmp, self.sizes, self.interval = tmp, {shard_name(s): c for s, _, c in shards}, interval
        self.total = sum(self.sizes.values())
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def done(self) -> int:
        return sum(c for name, c in self.sizes.items() if os.path.exists(os.path.join(self.tmp, name)))

    def run(self):
        while not self.stop.wait(self.interval):
            n = self.done()
            rate = n / (time.perf_counter() - self.t0)
            LOG.info("progress: %d/%d images scored (%.1f images/s)", n, self.total, rate)

    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
