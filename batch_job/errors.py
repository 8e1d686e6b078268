"""The job's own failures. Each carries its exit code (README, "Exit codes"); the message is one line."""
from __future__ import annotations


class JobError(Exception):
    exit_code = 1


class InputError(JobError, ValueError):
    """Refused: bad arguments, inputs, output or ledger (exit 2)."""

    exit_code = 2


class ReconciliationError(JobError):
    """The outputs do not account for every listed image; nothing published (exit 1)."""

    exit_code = 1


class LedgerNotUpdated(JobError):
    """OUT_DIR was published but the ledger commit failed (exit 3)."""

    exit_code = 3


class SchedulerLost(JobError):
    """DaskRunner's scheduler went away while the job ran (Beam reports the pipeline DONE); nothing published
    (exit 1)."""

    exit_code = 1


class WorkerLost(JobError):
    """A worker process ended while the job ran; nothing published (exit 1)."""

    exit_code = 1


def worker_lost(exit_line: str, printed: str = "") -> WorkerLost:
    """The error for Beam's `exit_line` ("Worker subprocess exited with return code N") and how that worker said it
    died (workers.death_reason), where the job kept its stderr."""
    code = exit_line.rsplit(" ", 1)[-1]
    if code == "-9":
        why = "; -9 is SIGKILL, e.g. the out-of-memory killer"
    elif printed:
        why = f": {printed}"
    else:
        why = "; --log-level DEBUG shows the worker's own output" if code == "1" else ""
    return WorkerLost(f"job failed: a worker process ended while scoring ({exit_line}{why}); nothing published")


# Beam's FnApiRunner only raises this in the thread that waits for a worker process (local_job_service.py) and goes
# on waiting for that worker's results: a worker killed mid-run (the kernel's out-of-memory killer) left the job
# waiting for good. batch_job/__main__.py's thread hook records it here and stops the job (cli.py says why).
WORKER_EXITED = "Worker subprocess exited with return code"
lost_workers: list[str] = []
# exit codes of a worker a signal to the job's process group (a terminal's Ctrl-C or hang-up, systemd's SIGTERM) ended
# before the job's own handler ran (as Python starts: -N; batch_job/beam_worker.py: 128 + N; and 1: a Ctrl-C while the
# worker's Python is still starting, "Fatal Python error: init_import_site", full suite, once); the job itself kills
# its workers with SIGKILL (workers.Reaper)
STOPPED_BY_SIGNAL = ("-1", "-2", "-15", "1", "129", "130", "143")


def lost_to_the_jobs_signal(raised: int) -> bool:
    """Whether the worker recorded as lost ended of a signal the job got too (`raised`: the signal the job's handler
    raised for, 0 for none): the group's signal, not a lost worker (the full suite under load: a group Ctrl-C as the
    workers started ended 1, "a worker process ended", once in four runs)."""
    return bool(lost_workers and raised) and lost_workers[0].rsplit(" ", 1)[-1] in STOPPED_BY_SIGNAL
