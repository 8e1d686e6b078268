"""Which Beam runner runs the job, with which options, and running it.

DirectRunner becomes the FnApiRunner with one worker per core (threads on small machines, processes on large
ones: :func:`default_running_mode`), without Beam's Prism download attempt. DaskRunner is resolved by class,
one shard per Dask task. Other runners are resolved by name as Beam does, before any work (an unknown one is
refused). Every option the user gave wins: the job's defaults go first on the option list, or are added only
where Beam's parsed options show the user set nothing. An argument that neither the job nor Beam's option
parser knows is refused (Beam itself would drop it with a log warning).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from batch_job.dask_probe import check_scheduler
from batch_job.errors import InputError, SchedulerLost, lost_to_the_jobs_signal, lost_workers, worker_lost
from batch_job.quiet_stderr import quiet_worker_threads
from batch_job.shards import MIN_SMALL_SHARD
from batch_job.workers import LOGS_ENV, REAPER, death_reason, worker_processes
from xray_core.errors import Terminated, one_line
from xray_core.interrupts import GATE
from xray_core.native_stderr import dropped

THREADS_UP_TO = 4
# What Rust's default panic hook prints straight to file descriptor 2 when pylibjpeg-rle panics on a corrupt RLE file
# (a blank line, "thread '<unnamed>' panicked at src/lib.rs:520:20:", "index out of bounds: the len is 131072 but
# the index is 131072", a note), and the backtrace with RUST_BACKTRACE set (about 150 lines): dropped while worker
# threads decode, as the file's row already says "decoder crashed: ..." (xray_core/dicom.py _decoded).
DECODER_PANIC_LINES = (r"^$|^thread '[^']*' panicked at |^index out of bounds: the len is \d+ but the index is \d+$"
                       r"|^note: (run with `RUST_BACKTRACE=1`|Some details are omitted)|^stack backtrace:$"
                       r"|^ +\d+: |^ +at ")


def quiet_rust_backtraces(log_level: str) -> None:
    """RUST_BACKTRACE=0 for this process and the workers it starts, but at --log-level DEBUG: with it set (these
    machines set it), each decoder panic built a backtrace of ~150 lines that DECODER_PANIC_LINES then dropped, 83 ms
    a corrupt RLE file (QA: 300 of them 25.1 s against 0.8 s), and a night stopped mid-run printed them as its worker
    threads drained. Set before the first panic: Rust reads it once."""
    if log_level != "DEBUG":
        os.environ["RUST_BACKTRACE"] = "0"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_running_mode(cores: int) -> str:
    """Worker threads in this process up to THREADS_UP_TO cores, worker processes beyond.

    Pillow's decoder and onnxruntime release the GIL, so threads need no worker start-up and share one model
    session; the Python part of scoring an image holds the GIL for part of its time, which caps what threads
    gain as cores grow, so beyond THREADS_UP_TO cores the workers are processes (docs/batch_job.md).
    """
    return "multi_threading" if cores <= THREADS_UP_TO else "multi_processing"


@dataclass
class Runner:
    runner: object  # a runner instance, or a runner name Beam resolves
    label: str  # as metrics.json and the summary say it
    options: PipelineOptions
    workers: int  # for sizing shards; a guess where the runner decides
    mode: str = ""  # DirectRunner: its workers, multi_threading, multi_processing or in_memory; "" for others
    worker_stderr: bool = False  # --log-level DEBUG: what DirectRunner's workers write on stderr is kept there

    @property
    def quiet_threads(self) -> bool:
        """Whether execute() drops what DirectRunner's worker threads in this process write on stderr."""
        return self.mode in ("multi_threading", "in_memory") and not self.worker_stderr


def beam_leftovers(beam_args: list[str]) -> list[str]:
    """What Beam's own option parser does not recognise among `beam_args` (stray words, misspelt options):
    Beam would drop them with only a log warning. InputError for a value it cannot parse.

    Beam's parser of every registered option is the one PipelineOptions.get_all_options builds; its public
    add_extra_args_fn hook hands it over, and it parses `beam_args` here."""
    leftovers: list[str] = []

    def parse(parser: argparse.ArgumentParser) -> None:
        parser.exit_on_error = False  # an unparseable value raises ArgumentError instead of exiting
        try:
            leftovers.extend(parser.parse_known_args(beam_args)[1])
        except argparse.ArgumentError as exc:
            raise InputError(f"bad Beam pipeline option: {exc}") from None

    PipelineOptions([]).get_all_options(add_extra_args_fn=parse)
    return leftovers


def refuse_leftovers(beam_args: list[str]) -> None:
    leftovers = beam_leftovers(beam_args)
    if leftovers:
        raise InputError(f"unrecognized arguments: {' '.join(leftovers)} (neither a job option nor a Beam "
                         "pipeline option; see --help)")


def choose_runner(beam_args: list[str], worker_stderr: bool = False) -> Runner:
    """The runner and its options; InputError for arguments neither the job nor Beam knows. worker_stderr:
    DirectRunner's worker processes keep their stderr (--log-level DEBUG), else it goes to the file execute() names.
    """
    name = PipelineOptions(beam_args).view_as(StandardOptions).runner or "DirectRunner"
    short = name.rsplit(".", 1)[-1]
    if short == "DaskRunner":
        from apache_beam.runners.dask import dask_runner  # noqa: F401 - adds --dask_* to Beam's options
    refuse_leftovers(beam_args)
    if short in ("DirectRunner", "FnApiRunner"):
        return direct_runner(beam_args, worker_stderr)
    if short == "DaskRunner":
        return dask_runner_with(beam_args, worker_stderr)
    return other_runner(name, beam_args)


def other_runner(name: str, beam_args: list[str]) -> Runner:
    """A runner Beam resolves by name, resolved now: an unknown or uninstalled one is refused before any work."""
    options = PipelineOptions(beam_args)
    try:
        probe = beam.Pipeline(runner=name, options=options)
    except (ImportError, ValueError, AttributeError, TypeError) as exc:  # unknown, not installed, not a runner
        raise InputError(f"--runner {name}: {type(exc).__name__}: {one_line(exc, 300)}") from None
    shutil.rmtree(probe.local_tempdir, ignore_errors=True)  # made by every Pipeline, removed only by run()
    return Runner(probe.runner, name.rsplit(".", 1)[-1], options, 4)


def dask_runner_with(beam_args: list[str], keep_client_errors: bool = False) -> Runner:
    """DaskRunner, one shard per Dask task unless the options partition otherwise. The dask client's own error
    records (a scheduler lost mid-run: an empty ERROR line and a 36-line traceback before the job's one line, QA)
    show at --log-level DEBUG only, as Beam's do; set after distributed's import, which sets its loggers' levels."""
    from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner

    logging.getLogger("distributed.client").setLevel(logging.WARNING if keep_client_errors else logging.CRITICAL)

    dask = PipelineOptions(beam_args).view_as(DaskOptions)
    if dask.address or dask.scheduler_file:  # a cluster of the user's: it must answer, its workers import the job
        cluster = check_scheduler(dask.address, dask.scheduler_file, dask.timeout)  # (dask_probe.py)
        log = logging.getLogger("batch_job")
        log.info("Dask scheduler answered; workers that import the job: %d", cluster.workers)
        if cluster.waits_for_good:
            log.warning("the Dask scheduler sets no no-workers-timeout: should every worker leave mid-night, the job "
                        "waits for good, holding the ledger's lock; start it with "
                        "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT=10m (docs/batch_job.md)")
    extra = ["--dask_partition_size=1"] if dask.npartitions is None and dask.partition_size is None else []
    return Runner(DaskRunner(), "DaskRunner", PipelineOptions(beam_args + extra), 4)


def direct_runner(beam_args: list[str], worker_stderr: bool = False) -> Runner:
    """FnApiRunner, one worker per core unless the options say otherwise (0 workers: one per core, as Beam)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    cores = default_workers()
    defaults = [f"--direct_running_mode={default_running_mode(cores)}", "--default_sdk_harness_log_level=WARNING"]
    mode = PipelineOptions(defaults + beam_args).view_as(DirectOptions).direct_running_mode
    if mode != "in_memory":  # in_memory runs one worker whatever the count (and warns if it is not 1)
        defaults.append(f"--direct_num_workers={cores}")
    options = PipelineOptions(defaults + beam_args)
    workers = options.view_as(DirectOptions).direct_num_workers
    if workers < 0:
        raise InputError("--direct_num_workers must be >= 0 (0: one worker per core)")
    if mode != "multi_processing":
        return Runner(FnApiRunner(), "DirectRunner", options, workers or cores, mode, worker_stderr)
    return Runner(FnApiRunner(default_environment=worker_processes(worker_stderr)), "DirectRunner",
                  PipelineOptions(defaults + beam_args + ["--direct_running_mode=in_memory"]), workers or cores, mode,
                  worker_stderr)


def for_night(runner: Runner, beam_args: list[str], dicom: int, images: int) -> Runner:
    """DirectRunner's worker processes instead of its threads for a night that is half DICOM files or more, unless
    the user chose the running mode: the DICOM decoder plugins hold the GIL, so threads decode one file at a time
    (docs/dicom.md: 60 compressed files took 26.0 s with threads, 17.0 s with processes). Chosen once the inputs are
    listed, by their names (listing.read_as_dicom), where there are two small shards of DICOM files or more (16: fewer
    are one shard, one worker's, whatever the mode, review); the processes' start-up is a second or two a night (60
    files: 19.8 s against 29.7 s with threads, the whole command)."""
    if (runner.mode != "multi_threading" or runner.workers < 2 or dicom < 2 * MIN_SMALL_SHARD or 2 * dicom < images
            or "direct_running_mode" in PipelineOptions(beam_args).get_all_options(drop_default=True)):
        return runner
    logging.getLogger("batch_job").info(
        "%d of %d inputs are DICOM, whose decoders hold the GIL: worker processes score them "
        "(--direct_running_mode=multi_threading keeps threads)", dicom, images)
    return direct_runner(beam_args + ["--direct_running_mode=multi_processing"], runner.worker_stderr)


def execute(pipeline: beam.Pipeline, worker_logs: str | None = None, quiet_threads: bool = False) -> None:
    """Run the pipeline to the end (DaskRunner leaves its dask client open: closed here). Worker processes started
    without their stderr (batch_job/workers.py) write it into the folder `worker_logs`, one file each: a worker
    process that ends while the job runs (batch_job/__main__.py stops the job) fails it with a WorkerLost error that
    quotes how a worker said it died, e.g. why it could not start. quiet_threads: the worker threads' stderr is
    dropped while it runs (quiet_worker_threads), and so are the lines a decoder's panic prints there (written by
    Rust's hook straight to file descriptor 2: 3 a corrupt RLE file, about 150 with backtraces, QA)."""
    if worker_logs:
        os.makedirs(worker_logs, exist_ok=True)
        os.environ[LOGS_ENV] = worker_logs  # Beam starts each worker with a copy of this process's environment
        REAPER.arm()  # a Ctrl-C or SIGTERM, or a worker that died, kills the workers (batch_job/workers.py)
        GATE.on_interrupt.append(REAPER.start)
    try:
        with quiet_worker_threads(quiet_threads), (dropped(DECODER_PANIC_LINES) if quiet_threads else nullcontext()):
            result = pipeline.run()
            try:
                result.wait_until_finish()
                unfinished = [f for f in getattr(result, "futures", ()) if f.status != "finished"]
            finally:
                client = getattr(result, "client", None)
                if client is not None:
                    client.close()
        if unfinished:  # Beam's DaskRunner says DONE when its scheduler went away: its tasks are cancelled, not done
            raise SchedulerLost(f"lost the Dask scheduler while scoring (the pipeline {unfinished[0].status}): "
                                "nothing published; restart the cluster (its workers end with the scheduler) and "
                                "rerun")
    except KeyboardInterrupt as exc:
        if lost_to_the_jobs_signal(GATE.raised):  # the worker ended of the group's signal before the job's handler
            lost_workers.clear()  # ran (more than batch_job/__main__.py's SIGNAL_WAIT, under load): the job stops for
            GATE.check()  # that signal, which the handler has raised for by now
        if lost_workers and not isinstance(exc, Terminated):  # the job wakes itself with SIGUSR1, never SIGTERM
            raise worker_lost(lost_workers[0], death_reason(worker_logs, REAPER.survivors)) from None
        raise
    finally:
        if worker_logs:
            os.environ.pop(LOGS_ENV, None)
            REAPER.disarm()
            GATE.on_interrupt.remove(REAPER.start)
