"""python -m batch_job (or pneumonia-batch): score X-ray folders with a published ONNX model (Apache Beam)."""
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback

# the threads of Beam's FnApiRunner that read a worker process's control and data streams
BEAM_STREAM_THREADS = ("beam_control_read", "read_grpc_client_inputs")
# How a worker process's end wakes the main thread, blocked in Beam's wait: not SIGINT, which a shell ignores in a job a
# script starts with `&` (QA: such a job waited for good, holding the ledger's lock, after a worker was killed)
WAKE = signal.SIGUSR1
SIGNAL_WAIT = 3.0  # seconds the job's handler gets to run before such a worker counts as lost (1 s was too few for one
# group SIGHUP in the test suite, under load; a worker the OOM killer ends (SIGKILL) does not wait)


def thread_failed(args) -> None:
    """threading.excepthook. Once a Ctrl-C or SIGTERM has stopped the job, a failure in one of Beam's threads (a
    worker process that ended, its gRPC stream closed) is the stop's echo, printed after the job's one line: it is
    logged at DEBUG only. A worker process that ended while the job ran (killed by the out-of-memory killer, say)
    stops the job as a Ctrl-C would, after its other worker processes are killed, and the job says which
    (batch_job.errors.lost_workers; Beam would wait for that worker, or for the others, for good); the failures of the
    threads that read its streams, which come first, and the other workers' ends are logged at DEBUG. Any other
    failure is printed as Python's own hook does, on the job's stderr."""
    from batch_job.errors import STOPPED_BY_SIGNAL, WORKER_EXITED, lost_workers
    from batch_job.workers import REAPER
    from xray_core.interrupts import GATE

    if GATE.raised:
        logging.getLogger("batch_job").debug("after the interrupt, thread %s: %s: %s",
                                             getattr(args.thread, "name", "?"), args.exc_type.__name__, args.exc_value)
        return
    if getattr(args.thread, "name", "") in BEAM_STREAM_THREADS and args.exc_type.__module__.startswith("grpc"):
        # a worker process's gRPC streams, closed as it ended: the thread that waits for the process says why
        logging.getLogger("batch_job").debug("thread %s: %s", args.thread.name, args.exc_type.__name__)
        return
    if issubclass(args.exc_type, RuntimeError) and str(args.exc_value).startswith(WORKER_EXITED):
        code = str(args.exc_value).rsplit(" ", 1)[-1]
        if code in STOPPED_BY_SIGNAL and GATE.wait_raised(SIGNAL_WAIT):  # a group's Ctrl-C or SIGTERM reached the
            logging.getLogger("batch_job").debug("thread %s: %s", args.thread.name, args.exc_value)  # worker first
            return
        if lost_workers:  # the first one stopped the job: the others end with it
            logging.getLogger("batch_job").debug("after a lost worker: %s", args.exc_value)
            return
        lost_workers.append(str(args.exc_value))
        REAPER.start()  # Beam waits for the others, and one waiting for its bundle's input never ends
        # a real signal (WAKE), to the main thread itself: it wakes the wait the main thread is blocked in, which
        # _thread.interrupt_main() does not; its handler (woken) raises KeyboardInterrupt there
        signal.pthread_kill(threading.main_thread().ident, WAKE)
        return
    from batch_job.quiet_stderr import job_stderr

    if args.exc_type is SystemExit:  # as Python's own hook
        return
    stream = job_stderr()  # not the worker threads' stderr, dropped while the pipeline runs (quiet_stderr.py)
    print(f"Exception in thread {getattr(args.thread, 'name', '?')}:", file=stream)
    traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=stream)
    stream.flush()


def woken(signum, frame) -> None:
    """WAKE's handler: the main thread's wait ends as a Ctrl-C's would; runner.execute and cli.main turn it into the
    lost worker's one line (batch_job.errors.lost_workers)."""
    raise KeyboardInterrupt


def main() -> int:
    started = time.perf_counter()
    from xray_core.errors import stopped
    from xray_core.interrupts import GATE

    # Ctrl-C and SIGTERM stop the job (nothing published), except while the outputs are published. A handler
    # also makes SIGTERM reach the job as PID 1 of a container, where a signal without one is ignored.
    GATE.install()
    signal.signal(WAKE, woken)
    threading.excepthook = thread_failed
    # Importing Beam logs a warning about optional GCP client libraries (apitools/BigQuery) that this job
    # never uses: the root logger stays at ERROR until Beam is imported.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.ERROR)
    # dask.distributed sets its loggers to INFO from its config when imported, in this process and in the scheduler,
    # nanny and worker processes a local DaskRunner starts: its config, read from the environment they inherit,
    # keeps them at WARNING as the docs say (a DASK_LOGGING__DISTRIBUTED of the user's own wins).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        from batch_job.cli import main as job_main
    except KeyboardInterrupt as exc:  # before the job started: nothing written yet
        what, code = stopped(exc)
        sys.stderr.write(f"error: {what}; nothing published\n")
        return code

    logging.getLogger().setLevel(logging.WARNING)  # the job's own logger: --log-level (cli.py)
    for noisy in ("apache_beam", "distributed", "dask"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    code = job_main(started=started)
    if code != 0:
        # After a Ctrl-C or a failed pipeline, Beam's worker threads and gRPC servers may still be running; the
        # interpreter's teardown can then abort the process (SIGABRT, "terminate called without an active
        # exception": 2 Ctrl-C runs of 8 here) and replace the job's exit code. Its outputs are settled by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    GATE.hold()  # published: a signal during the exit below must not make it 130/143 ("nothing published")
    # At exit the interpreter's last garbage collection walks every object of the ~2,500 modules the job imported
    # (Beam, scikit-learn, matplotlib, gRPC): 0.6 s of every run. Frozen objects are left to the OS; atexit
    # handlers and the flushing of files and streams still run.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
