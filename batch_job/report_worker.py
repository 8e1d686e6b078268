"""The job's report (metrics with scikit-learn, histogram with matplotlib), made in a helper process.

Importing scikit-learn and matplotlib costs ~2.5 s of one core: more than scoring 2,000 small
images. `python -m batch_job` starts this helper first thing, before it imports Beam, so those
imports run on a core that is otherwise idle while the job imports Beam, verifies the model and
lists the files; at the lowest CPU priority, so it never slows the scoring. The helper then waits, idle, until the report is asked for. If it cannot be
started or fails, the report is made in the job's own process, so the outputs never depend on it.
The helper exits when the job closes its end of the pipe, or dies.
"""
from __future__ import annotations

import logging
import multiprocessing
import os

LOG = logging.getLogger("batch_job")


def make_report(rec: dict, threshold: float, model_id: str, runner: str, histogram_path: str) -> dict:
    """-> metrics.json content (without timings); writes histogram.png."""
    from batch_job import outputs

    metrics = outputs.compute_metrics(rec, threshold, model_id, runner)
    outputs.write_histogram(histogram_path, rec["probabilities"], threshold, model_id)
    return metrics


def _helper(conn) -> None:
    os.nice(19)  # use idle CPU only: never slow the scoring down
    devnull = os.open(os.devnull, os.O_WRONLY)  # never hold the job's stdout/stderr pipes open
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401

    try:
        args = conn.recv()
    except (EOFError, OSError):  # the job finished without a report, or died
        return
    try:
        conn.send((True, make_report(*args)))
    except Exception as exc:  # noqa: BLE001 - the job makes the report itself
        conn.send((False, f"{type(exc).__name__}: {exc}"))


class Reporter:
    """make_report in a spawned helper process (helper=True) or in this process."""

    def __init__(self, helper: bool = True):
        self.conn = self.proc = None
        if helper:
            try:
                ctx = multiprocessing.get_context("spawn")
                self.conn, child = ctx.Pipe()
                self.proc = ctx.Process(target=_helper, args=(child,), daemon=True, name="batch_job-report")
                self.proc.start()
                child.close()  # only the helper holds its end: it sees EOF when this process ends
            except Exception as exc:  # noqa: BLE001 - without a helper the report is made in-process
                LOG.debug("report helper not started: %s", exc)
                self.close()

    def report(self, rec: dict, threshold: float, model_id: str, runner: str, histogram_path: str) -> dict:
        if self.conn is not None:
            try:
                self.conn.send((rec, threshold, model_id, runner, histogram_path))
                ok, payload = self.conn.recv()
                if ok:
                    return payload
                reason = payload
            except (EOFError, OSError) as exc:
                reason = f"helper gone ({type(exc).__name__})"
            LOG.warning("report helper failed (%s); making the report in the job's process", reason[:200])
        return make_report(rec, threshold, model_id, runner, histogram_path)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
        self.conn = self.proc = None
