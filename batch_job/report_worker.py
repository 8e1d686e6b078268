"""The job's report (metrics with scikit-learn, histogram with matplotlib), made in a helper process.

Importing scikit-learn and matplotlib costs ~2.5 s of one core: more than scoring 2,000 small
images. `python -m batch_job` starts this helper first thing, before it imports Beam, so those
imports run on a core that is otherwise idle while the job imports Beam, verifies the model and
lists the files; at the lowest CPU priority, so they never slow the scoring (the report itself is
made at normal priority). The helper then says it is ready and waits, idle, until the report is
asked for. If it is not ready within READY_WAIT
seconds at that point, fails, or takes longer than REPORT_WAIT, the report is made in the job's
own process, so the outputs never depend on it. The helper exits when the job closes its end of
the pipe, or within a fraction of a second of the job dying; it never holds the job's stdout or
stderr open.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

LOG = logging.getLogger("batch_job")
READY_WAIT = 10.0  # s the job waits, at report time, for the helper to finish its imports
REPORT_WAIT = 600.0  # s for the report itself (metrics of millions of images take a few seconds)


def make_report(rec: dict, threshold: float, model_id: str, runner: str, histogram_path: str) -> dict:
    """-> metrics.json content (without timings); writes histogram.png."""
    from batch_job import outputs

    metrics = outputs.compute_metrics(rec, threshold, model_id, runner)
    outputs.write_histogram(histogram_path, rec["probabilities"], threshold, model_id)
    return metrics


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            os._exit(0)


def _warm_imports() -> None:
    """In a thread of its own at the lowest priority (Linux: nice is per thread), so the imports use
    idle CPU only and never slow the scoring; the report itself is made at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401


def _helper(conn, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    warm = threading.Thread(target=_warm_imports)
    warm.start()
    warm.join()
    try:
        conn.send("ready")
        args = conn.recv()
    except (EOFError, OSError):  # the job finished without a report, or died
        return
    try:
        conn.send((True, make_report(*args)))
    except Exception as exc:  # noqa: BLE001 - the job makes the report itself
        conn.send((False, f"{type(exc).__name__}: {exc}"))


def _start_detached(proc) -> None:
    """Start proc (and multiprocessing's resource tracker, if it starts one) with stdout and
    stderr on /dev/null, so neither holds the job's output pipes open."""
    opened: list[int] = []
    saved: list[int] = []
    try:
        opened.append(os.open(os.devnull, os.O_WRONLY))
        saved.extend((os.dup(1), os.dup(2)))
        os.dup2(opened[0], 1)
        os.dup2(opened[0], 2)
        proc.start()
    finally:
        if len(saved) == 2:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        for fd in opened + saved:
            os.close(fd)


class Reporter:
    """make_report in a spawned helper process (helper=True) or in this process."""

    def __init__(self, helper: bool = True):
        self.conn = self.proc = None
        if helper:
            try:
                ctx = multiprocessing.get_context("spawn")
                self.conn, child = ctx.Pipe()
                self.proc = ctx.Process(target=_helper, args=(child, os.getpid()), daemon=True,
                                        name="batch_job-report")
                _start_detached(self.proc)
                child.close()  # only the helper holds its end: it sees EOF when this process ends
            except Exception as exc:  # noqa: BLE001 - without a helper the report is made in-process
                LOG.debug("report helper not started: %s", exc)
                self.close()

    def _via_helper(self, args: tuple):
        """-> (metrics or None, why not)."""
        if not self.conn.poll(READY_WAIT):
            return None, f"not ready after {READY_WAIT:.0f} s"
        if self.conn.recv() != "ready":
            return None, "unexpected message"
        self.conn.send(args)
        if not self.conn.poll(REPORT_WAIT):
            return None, f"no report after {REPORT_WAIT:.0f} s"
        ok, payload = self.conn.recv()
        return (payload, "") if ok else (None, payload)

    def report(self, rec: dict, threshold: float, model_id: str, runner: str, histogram_path: str) -> dict:
        if self.conn is not None:
            try:
                metrics, reason = self._via_helper((rec, threshold, model_id, runner, histogram_path))
            except (EOFError, OSError) as exc:
                metrics, reason = None, f"helper gone ({type(exc).__name__})"
            self.close()
            if metrics is not None:
                return metrics
            LOG.warning("report helper failed (%s); making the report in the job's process", reason[:200])
        return make_report(rec, threshold, model_id, runner, histogram_path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()  # nothing to clean up; also ends a stopped helper
            self.proc.join(1)  # no write of a killed helper may follow the in-process report
        self.conn = self.proc = None
