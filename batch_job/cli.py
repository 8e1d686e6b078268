"""The command line: arguments, the job, its last lines and its exit code (README, "Exit codes")."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from batch_job.drift import DOMAIN_AUC_LIMIT, PSI_LIMIT, summary_line
from batch_job.errors import JobError, lost_workers, worker_lost
from batch_job.pipeline import run
from batch_job.report import summary
from batch_job.runner import quiet_rust_backtraces
from batch_job.shards import MAX_SHARD
from xray_core.errors import middle_cut, one_line, stopped
from xray_core.interrupts import GATE, Terminated
from xray_core.package import PackageError

LOG = logging.getLogger("batch_job")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EPILOG = """\
runners (--runner):
  DirectRunner   the default: this machine, one worker per core (threads on up to 4 cores, processes beyond);
                 --direct_num_workers N and --direct_running_mode in_memory|multi_threading|multi_processing
                 override both choices
  DaskRunner     a dask.distributed cluster: --dask_client_address tcp://HOST:8786 (without it, a local
                 cluster); one shard per Dask task. Inputs and --output must be on storage every worker shares
  other names    passed to Beam as they are (e.g. DataflowRunner; not tested here)

Beam pipeline options: every option the job does not define above is handed to Beam's PipelineOptions
  untouched (e.g. --direct_num_workers=2, --temp_location=...; --dask_* with --runner DaskRunner); the job's own
  defaults go first, so an option you give wins. An argument that neither the job nor Beam knows (a misspelt
  option, a stray word) is refused: exit 2.

exit codes:
  0    done; unreadable images are error rows in the CSVs. Also a quiet night: no image found (without
       --fail-if-empty), outputs published with images_found 0
  1    the outputs do not account for every image, a worker failed, or someone else created OUT_DIR while
       the job ran: nothing published
  2    refused before anything is written: a bad or unknown argument or runner, a missing input path, a model
       missing or failing verification, OUT_DIR not empty (without --overwrite), holding a folder the user may
       not empty (when it is to be replaced), unwritable, overlapping an input or the model, an empty --output
       or --ledger, the working directory or holding it, a symbolic link, a mount point or a file, the ledger
       unusable or in use, an input folder or URI that cannot be listed, an input that is neither a folder nor
       a regular file (a FIFO, a device), no image found with --fail-if-empty
  3    OUT_DIR was published but the ledger commit failed: the next run rescores those images
  4    --fail-on-drift and drift detected: OUT_DIR published and the ledger committed all the same
  130  Ctrl-C (SIGINT): nothing published, the temporary folder removed, the ledger untouched
  143  SIGTERM (docker stop, systemd, Kubernetes, kill): the same as Ctrl-C (129: SIGHUP, a closed terminal)
  A Ctrl-C or SIGTERM that arrives while OUT_DIR is being published is held until it and the ledger are done.

environment:
  PNEUMONIA_MODEL  the model when --model is not given (else the shipped serving_models/pneumonia)
"""


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """-> (the job's arguments, everything else: Beam pipeline options, passed through untouched)."""
    p = argparse.ArgumentParser(prog="python -m batch_job", description="Score X-ray folders with an ONNX model "
                                "(Apache Beam, onnxruntime; no TensorFlow). docs/batch_job.md.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="folder (recursive), glob, file, or Beam FileSystems URI; repeatable")
    p.add_argument("--model", default=None, metavar="PACKAGE",
                   help="serving_models/<name> (its newest version), serving_models/<name>/<version> or its "
                        "model.onnx, or a serving folder holding one model (default: $PNEUMONIA_MODEL, else the "
                        "shipped serving_models/pneumonia)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--threshold", type=float, default=None,
                   help="default: the package's decision_threshold (metadata.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"images per output shard / work unit (default: spread over workers, <= {MAX_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--ledger", default=None, metavar="PATH.sqlite",
                   help="SQLite ledger: images whose bytes this model already scored are skipped (files unchanged "
                        "since, by path, size, mtime and ctime, are not even read) and counted only as skipped; "
                        "new ones recorded")
    p.add_argument("--heatmaps", type=int, default=12, metavar="N",
                   help="heatmap overlays (OUT_DIR/heatmaps/) for the N flagged images of this run with the highest "
                        "probability, where the model has a heatmap output (default 12, the worklist's first "
                        "screen; with the 8x8 occlusion maps of versions 5 to 7 each costs 64 passes of the "
                        "network, about 0.2 s of one core; 0: none)")
    p.add_argument("--drift-auc-limit", type=float, default=DOMAIN_AUC_LIMIT, metavar="AUC",
                   help="drift is detected when a classifier tells this run's embeddings from the model's "
                        f"reference with a cross-validated ROC AUC above this (default {DOMAIN_AUC_LIMIT}; "
                        "0.5: indistinguishable)")
    p.add_argument("--drift-psi-limit", type=float, default=None, metavar="PSI",
                   help="... or when the PSI of the probability histogram against the reference's is above this "
                        f"(default: the larger of {PSI_LIMIT} and the PSI that 99.9%% of runs of as many images "
                        "drawn from the reference stay under; 0.57 at 100 images, 0.30 at 200, 0.20 from about "
                        "320 with version 7)")
    p.add_argument("--fail-on-drift", action="store_true",
                   help="exit 4 when drift is detected (the outputs are published all the same)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper,
                   help="the job's own log lines on stderr: INFO (default) progress and each step's figures; "
                        "WARNING problems only; DEBUG also tracebacks, which may name files (at INFO and above no "
                        "line names a patient's file or DICOM field). Beam and Dask log warnings and errors")
    p.add_argument("--modalities", default="CR,DX", metavar="LIST",
                   help="DICOM Modality values in scope (comma-separated; default CR,DX); other DICOM files are "
                        "out of scope, with the reason, and never scored. Widen only for a model validated on them")
    p.add_argument("--fail-if-empty", action="store_true",
                   help="exit 2, writing nothing, when the inputs hold no image (default: a quiet night, exit 0, "
                        "outputs published with images_found 0)")
    return p.parse_known_args(argv)


ERROR_CHARACTERS = 1000  # of the one error line: a longer one keeps its start and its end


def fail(message: str, code: int) -> int:
    try:
        sys.stderr.write(f"error: {message}\n")  # one write: worker threads may be logging meanwhile
        sys.stderr.flush()
    except OSError:  # stderr gone (a full log disk, a closed pipe): the exit code still says what happened
        mute(sys.stderr)
    return code


def mute(stream) -> None:
    """Point a standard stream that can no longer be written at /dev/null, so that nothing later (the interpreter's
    exit flushes it) fails on it: Python's advice for a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def main(argv=None, started: float | None = None) -> int:
    """Run the job; -> its exit code. Errors are one line on stderr."""
    args, beam_args = parse_args(argv)
    GATE.raised = 0  # this run's interrupts only
    lost_workers.clear()  # and its worker processes
    LOG.setLevel(args.log_level)
    quiet_rust_backtraces(args.log_level)
    # A worker's failure fails the pipeline, and the job says it in one line (its traceback at DEBUG, below); Beam
    # logs the same failure again, traceback and all, from each worker and from the runner. Its warnings and
    # errors show at --log-level DEBUG.
    logging.getLogger("apache_beam").setLevel(logging.WARNING if args.log_level == "DEBUG" else logging.CRITICAL)
    try:
        out = os.path.abspath(args.output)  # as the job resolves it, before it runs
    except OSError:
        return fail("the working directory no longer exists: give --output as an absolute path", 2)
    try:
        result = run(args, beam_args, started)
    except Terminated as exc:
        return fail(f"{stopped(exc)[0]}; nothing published", exc.code)
    except KeyboardInterrupt:
        if lost_workers:  # not a Ctrl-C: batch_job/__main__.py stopped the job for a worker process that ended
            return fail(str(worker_lost(lost_workers[0])), 1)  # runner.execute says it with the worker's output
        return fail("interrupted; nothing published", 130)
    except JobError as exc:
        return fail(middle_cut(one_line(exc, max(len(str(exc)), 300)), ERROR_CHARACTERS), exc.exit_code)
    except PackageError as exc:
        return fail(middle_cut(one_line(exc, max(len(str(exc)), 300)), ERROR_CHARACTERS), 2)
    except Exception as exc:  # noqa: BLE001 - a worker or runner failure: one line, details in the debug log
        LOG.debug("job failed", exc_info=True)
        interrupt = GATE.as_interrupt(exc)  # an interrupt an extension's C code turned into its own error
        if interrupt is not None:
            what, code = stopped(interrupt)
            return fail(f"{what}; nothing published", code)
        name = type(exc).__name__
        said = one_line(exc).removeprefix(f"{name}: ")  # Beam's error quotes a traceback's last line, with its type
        if "No space left on device" in str(exc):  # a worker's OSError, wrapped by Beam in its own error's text
            return fail(f"job failed ({name}): {said}; the outputs are written in "
                        f"{os.path.dirname(out)} (OUT_DIR's parent) before they are published: if that disk is "
                        "full, free space there and rerun; nothing published", 1)
        return fail(f"job failed ({name}): {said}; nothing published", 1)
    finally:
        held = GATE.take_pending()  # a Ctrl-C or SIGTERM held while publishing (xray_core/interrupts.py)
    if held:
        LOG.warning("%s arrived while the outputs were being published; the job completed first", held)
    try:
        print(summary(result, out), flush=True)
    except OSError:  # a full log disk, a closed pipe: the night is published and committed all the same (QA: exit
        mute(sys.stdout)  # 1, which means "nothing published"); the interpreter's exit must not flush into it again
    if args.fail_on_drift and result.drift.detected:
        return fail(f"{summary_line(result.drift)}; outputs published in {out} (--fail-on-drift)", 4)
    return 0
