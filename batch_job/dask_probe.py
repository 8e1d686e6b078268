"""Before a DaskRunner night: does a Dask scheduler answer at --dask_client_address (or --dask_scheduler_file), and
can its workers import what the job runs, and is it the same code? Refused (exit 2, one line) before anything is
listed or written, within a bounded time.

Without it (QA, 2026-12-02), a wrong address ran until someone noticed: a port where another service listens (a web
server) kept the job printing "0/200 images scored" for 11 minutes and counting, holding the ledger's lock; one that
sends a banner failed as "MemoryError: Unable to allocate 2.82 EiB"; a refused port took 30 s of progress lines after
the whole folder was listed; and workers that could not import the job left one by one while the job waited.
"""
from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass

from batch_job.errors import InputError
from xray_core.errors import one_line

CONNECT_SECONDS = 30  # distributed's own connect timeout (distributed.comm.timeouts.connect); --dask_connection_timeout
# Run on every worker by client.run: a builtin, so that a worker without the job can still load the call itself; it
# imports what the job's steps need there (the job, onnxruntime, Beam) and sends back the job's code as that worker
# loaded it (batch_job.CODE_SHA256; "" for a version from before 2026-12-02): a worker must run the code the driver
# runs (QA, 2026-12-02: a cluster started before an upgrade failed the night with "TypeError: Entry.__init__() got
# an unexpected keyword argument 'same_study_as'").
IMPORTS_THE_JOB = ("__import__('batch_job.scoring') and __import__('onnxruntime') and __import__('apache_beam') and "
                   "getattr(__import__('batch_job'), 'CODE_SHA256', '')")
# How long the scheduler lets tasks wait without any worker before it fails them (Dask's default: None, for good).
NO_WORKERS_TIMEOUT = "distributed.scheduler.no-workers-timeout"  # its config key (DASK_DISTRIBUTED__SCHEDULER__...)


@dataclass(frozen=True)
class SchedulerCheck:
    workers: int  # workers that import the job now (0: the job waits for some to join, as Beam does)
    waits_for_good: bool = False  # the scheduler sets no NO_WORKERS_TIMEOUT: with every worker gone, the night waits


def code_digest() -> str:
    """The job's code as this process loaded it."""
    import batch_job

    return batch_job.CODE_SHA256


def no_workers_timeout(client) -> float | None | bool:
    """The scheduler's no-workers timeout as it applies it, in seconds (None: none; review: not its config, which a
    scheduler given the value otherwise does not reflect); False where it cannot be read (then nothing is said). The
    lambda travels by value (cloudpickle): a scheduler host needs nothing of this project."""
    try:
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.no_workers_timeout)
    except Exception:  # noqa: BLE001 - a scheduler that will not say: no warning rather than a refusal
        return False


def check_scheduler(address: str | None = None, scheduler_file: str | None = None,
                    timeout: float | None = None) -> SchedulerCheck:
    """InputError unless a Dask scheduler answers within `timeout` seconds (CONNECT_SECONDS) and every worker it has
    imports the job within as long again; -> its workers and whether it lets tasks wait for a worker for good. A
    probe that does not return leaves its daemon thread behind: the job refuses and exits."""
    timeout = timeout if isinstance(timeout, (int, float)) else CONNECT_SECONDS  # Beam: an int, or dask's no_default
    where = f"--dask_client_address {address}" if address else f"--dask_scheduler_file {scheduler_file}"
    if not address and not os.path.isfile(scheduler_file):  # distributed would wait for it to appear, for good
        raise InputError(f"{where}: no such file; nothing scored")
    # imported before the clock starts: a busy machine's 1-2 s of importing are not the scheduler's
    from distributed import Client

    outcome: dict = {"stage": "connect"}

    def probe() -> None:
        client = None
        try:
            client = Client(address, scheduler_file=scheduler_file, timeout=timeout, set_as_default=False)
        except BaseException as exc:  # noqa: BLE001 - whatever the other end sent: one line below
            outcome["connect"] = f"{type(exc).__name__}: {one_line(exc, 200)}"  # words only: no traceback kept
        if client is None:
            # The half-made Client is collected here and now, not by whichever thread collects garbage next: its
            # __del__ closes its loop, and in a thread holding distributed's loop lock (starting another Client or
            # a LocalCluster) that deadlocked (a test run hung for good).
            gc.collect()
            return
        outcome["stage"] = "workers"
        try:
            outcome["workers"] = client.run(eval, IMPORTS_THE_JOB)
            outcome["no_workers_timeout"] = no_workers_timeout(client)
        except BaseException as exc:  # noqa: BLE001 - raised on a worker, re-raised here
            outcome["import"] = exc
        finally:
            outcome["stage"] = "done"
            client.close(timeout=timeout)

    thread = threading.Thread(target=probe, name="dask-probe", daemon=True)
    thread.start()
    thread.join(timeout + 2)
    stage = outcome["stage"]  # read once: the thread may still move it on
    if stage == "connect" and thread.is_alive():
        raise InputError(f"{where}: no Dask scheduler answered within {timeout + 2:.0f} s (something listens there "
                         "that does not speak Dask, or --dask_connection_timeout is too short?); nothing scored")
    if stage == "workers":  # connected: its workers get as long again to answer
        thread.join(timeout)
        if outcome["stage"] == "workers":
            raise InputError(f"{where}: the Dask workers did not answer within {timeout:.0f} s (busy, or stuck?); "
                             "nothing scored")
    if "connect" in outcome:
        raise InputError(f"{where}: no Dask scheduler there ({outcome['connect']}); nothing scored")
    if "import" in outcome:
        exc = outcome["import"]
        raise InputError(f"{where}: a Dask worker cannot import the job ({type(exc).__name__}: {one_line(exc, 200)})"
                         "; install this project on every worker (docs/batch_job.md); nothing scored")
    ours = code_digest()
    other = sorted({digest for digest in outcome.get("workers", {}).values() if digest != ours})
    if other:
        theirs = f"sha256 {str(other[0])[:12]}" if other[0] else "a version from before 2026-12-02"
        raise InputError(f"{where}: a Dask worker runs other code of the job ({theirs}, this one's {ours[:12]}): "
                         "restart the workers from this version (docs/batch_job.md); nothing scored")
    return SchedulerCheck(len(outcome.get("workers", {})), outcome.get("no_workers_timeout", False) is None)
