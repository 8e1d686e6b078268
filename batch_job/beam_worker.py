"""python -m batch_job.beam_worker: Beam's SDK worker (apache_beam.runners.worker.sdk_worker_main) for DirectRunner's
worker processes (runner.py: more than 4 cores, or --direct_running_mode=multi_processing).

workers.py starts it with its stderr in its own file of the job's scratch folder, except at --log-level DEBUG. Beam's
own worker command printed every worker's log records on stderr from Python's default handler (importing Beam logs a
warning through the root logger, which gives the process that handler, and the worker sets the root level to INFO): ~19
lines per worker per night on 16 cores, and a worker's failure with its traceback, at every --log-level. A worker's
records reach the job's process through Beam's logging channel all the same, where they show as Beam's own do (at
--log-level DEBUG); a worker that dies fails the job, which says so in its one-line error.

Ctrl-C and SIGTERM are left to the job first: a terminal's Ctrl-C, and systemd's stop, reach every process of the
group. The job kills its workers (workers.Reaper) and says what happened in one line. A worker the job has not killed
(the signal was sent to that worker alone) ends by itself GRACE_SECONDS after the signal, with 128 + the signal's
number as exit code: a signal sent to that worker alone then fails the job (batch_job/__main__.py), where exit code 0
left it waiting for the worker's results for good. One the signal finds still starting Python ends at once. A worker
exits without the interpreter's teardown, in which gRPC's threads could abort it ("terminate called without an active
exception", the same as in the job's process: batch_job/__main__.py).
"""
import os
import signal
import sys
import threading

GRACE_SECONDS = 2.0  # the job's own stop takes well under a second (tests/test_signals.py)


def leave_after_grace(signum, frame) -> None:
    timer = threading.Timer(GRACE_SECONDS, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
            signal.signal(signum, leave_after_grace)
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
