"""DirectRunner's worker processes (runner.py: more than 4 cores, or --direct_running_mode=multi_processing): the
command that starts each, where its stderr goes, how one said it died, and stopping the others when one has.

Each worker runs `python -m batch_job.beam_worker` (beam_worker.py says why not Beam's own command). Its stderr goes
to its own file, `worker-<pid>.log` in the folder runner.execute names through LOGS_ENV (the job's scratch folder:
never published), else to /dev/null; at --log-level DEBUG it stays on the job's stderr.
"""
from __future__ import annotations

import glob
import logging
import os
import shlex
import sys
import threading

LOGS_ENV = "PNEUMONIA_WORKER_LOGS"  # the folder of the workers' stderr files, set by runner.execute
COMMAND = "batch_job.beam_worker"  # what tells the job's worker processes from its other children
FATAL = "Fatal Python error:"
TRACEBACK = "Traceback (most recent call last):"


def worker_processes(keep_stderr: bool = False):
    """Beam's worker processes, started as `python -m batch_job.beam_worker`, instead of Beam's own command.
    FnApiRunner takes the environment given to it, and the processes, one per --direct_num_workers, when the running
    mode is `in_memory`: `multi_processing` would replace it by Beam's command. Beam then warns that `in_memory` runs
    one worker; it runs the given count, so that warning is not shown. The shell's `$$` is the worker's own pid (it
    `exec`s Python), so each worker writes its own file."""
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").setLevel(logging.ERROR)
    stderr = "" if keep_stderr else f' 2>>"${{{LOGS_ENV}:-/dev/null}}${{{LOGS_ENV}:+/worker-$$.log}}"'
    return SubprocessSDKEnvironment.from_command_string(f"exec {shlex.quote(sys.executable)} -m {COMMAND}" + stderr)


def death_reason(folder: str | None, survivors: set[int] = frozenset(), limit: int = 400) -> str:
    """How a worker said it died, from its stderr file in `folder`: Python's fatal error, or the exception line that
    ends its last traceback; the first worker's (by file name) that said so, leaving out the `survivors` (workers the
    job killed). "" when none did (a worker killed by a signal says nothing; log records and warnings are no reason)."""
    if not folder:
        return ""
    killed = {os.path.join(folder, f"worker-{pid}.log") for pid in survivors}
    for path in sorted(set(glob.glob(os.path.join(glob.escape(folder), "worker-*.log"))) - killed):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                reason = said_it_died(f.read().splitlines())
        except OSError:
            continue
        if reason:
            return reason[:limit]
    return ""


def said_it_died(lines: list[str]) -> str:
    """A Python process's last words on stderr: its fatal error, or its last traceback's exception line; ""."""
    fatal = [line.strip() for line in lines if line.startswith(FATAL)]
    if fatal:
        return fatal[-1]
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK)]
    if not starts:
        return ""
    ending = [line.strip() for line in lines[starts[-1] + 1:] if line.strip() and not line[0].isspace()]
    return ending[0] if ending else ""


class Reaper:
    """Kills this process's worker processes once the job stops (a Ctrl-C or SIGTERM, or a worker that died), and
    again every PERIOD until the pipeline has returned (runner.execute disarms it). Beam's cleanup waits for every
    worker to end, and one busy with a bundle whose input will never come never does (QA: a worker killed just after
    start, or a SIGTERM to the job just as its workers started, left the job waiting for good); a worker that Beam
    started just after the signal never got it. The workers alive at its first pass did not end on their own: their
    stderr files are no reason for the job's error (death_reason)."""

    PERIOD = 0.25

    def __init__(self):
        self.done = threading.Event()
        self.done.set()  # disarmed
        self.survivors: set[int] = set()
        self._lock = threading.RLock()  # a second signal may call start() from inside the first one's
        self._started = False

    def arm(self) -> None:
        """For one pipeline run: a new event, so a thread of an earlier run can never act on this one's workers."""
        with self._lock:
            self.done, self.survivors, self._started = threading.Event(), set(), False

    def disarm(self) -> None:
        self.done.set()

    def start(self, *_) -> None:
        """From the signal handler (GATE.on_interrupt) or the thread hook: kill the workers now, and keep at it."""
        with self._lock:
            if self.done.is_set() or self._started:
                return
            self._started = True
            done = self.done
        self.survivors = stop_worker_processes()
        threading.Thread(target=self._run, args=(done,), name="stop-workers", daemon=True).start()

    def _run(self, done: threading.Event) -> None:
        while not done.wait(self.PERIOD):
            stop_worker_processes()


REAPER = Reaper()


def stop_worker_processes() -> set[int]:
    """SIGKILL this process's worker processes, the shells about to start them too; -> their pids."""
    import psutil

    killed = set()
    for child in psutil.Process().children():
        try:
            if COMMAND in " ".join(child.cmdline()):
                child.kill()
                killed.add(child.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return killed
