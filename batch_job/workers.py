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


def death_reason(folder: str | None, limit: int = 400) -> str:
    """How a worker said it died, from its stderr file in `folder`: Python's fatal error, or the exception line that
    ends its last traceback; the first worker's (by file name) that said so. "" when none did (a worker killed by a
    signal says nothing; the others' log records and warnings are no reason)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "worker-*.log"))) if folder else []:
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


def stop_worker_processes() -> None:
    """SIGKILL this process's worker processes. When one has ended, the job stops (batch_job/__main__.py), and Beam
    waits for every other worker to end before it lets the job go: one busy with a bundle whose input will never come
    never does (QA: a worker killed just after start left the job waiting for good)."""
    import psutil

    for child in psutil.Process().children():
        try:
            if COMMAND in child.cmdline():
                child.kill()
        except psutil.Error:  # ended meanwhile
            pass
