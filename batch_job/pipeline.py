"""The Beam pipeline that scores image trees, correct on DirectRunner and on DaskRunner.

Design (see README, "Why the pipeline looks like this"):
* Files are listed by the driver, streamed to ``_listing.jsonl`` in the temporary
  output dir and cut into shards; the pipeline starts from ``Create`` over shard
  descriptors (id, byte offset, count) - a few integers per shard.
* Each shard is read, decoded, scored in batches and written as one CSV inside
  ``process`` (never ``finish_bundle``, whose output DaskRunner drops), as a single
  linear chain (DaskRunner computes only the last leaf).
* The driver then reconciles: every listed path must have exactly one row. Only
  then are metrics computed and the directory renamed into place.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from batch_job import outputs
from batch_job.ledger import Ledger, LedgerError
from batch_job.listing import InputError, check_inputs, iter_images
from batch_job.interrupts import GATE
from batch_job.report_worker import Reporter
from batch_job.scoring import ScoringSpec, default_workers, score_paths
from xray_core.files import publish_dir, temp_dir_beside
from xray_core.preprocessing import PreprocessConfig
from export.package import PackageError, load_metadata, resolve_version_dir, verify_package

LOG = logging.getLogger("batch_job")
MAX_SHARD = 2048


class ReconciliationError(RuntimeError):
    """Outputs do not account for every listed image (exit 1)."""


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m batch_job", description="Score X-ray folders with an ONNX model.")
    p.add_argument("--input", action="append", required=True,
                   help="folder (recursive), glob, file, or Beam FileSystems URI; repeatable")
    p.add_argument("--model", required=True, help="serving_models/<name>[/<version>] (newest version by default)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's validation-chosen threshold")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"images per output shard / work unit (default: spread over workers, <= {MAX_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--ledger", default=None, metavar="PATH.sqlite",
                   help="SQLite ledger: images whose bytes this model already scored are skipped, new ones recorded")
    return p.parse_known_args(argv)


# ---------------------------------------------------------------- Beam stages

class ReadShard(beam.DoFn):
    """(shard id, offset, count) -> (shard id, [paths as bytes]) from the listing file.

    Paths travel as bytes (os.fsencode): Beam's string coder rejects file names that are
    not valid UTF-8, which real file systems do contain.
    """

    def __init__(self, listing_path: str):
        self.listing_path = listing_path

    def process(self, shard):
        shard_id, offset, count = shard
        yield shard_id, [os.fsencode(p) for _, p in outputs.read_listing(self.listing_path, offset, count)]


class ScoreAndWriteShard(beam.DoFn):
    """(shard id, [paths]) -> (shard id, rows written).

    Decodes and scores in batches (one onnxruntime session per worker process, shared by its threads) and
    writes the shard's CSV atomically inside process(): never in finish_bundle, whose
    output DaskRunner drops. A retried task simply rewrites the same file.
    """

    def __init__(self, spec: ScoringSpec, out_dir: str):
        self.spec, self.out_dir = spec, out_dir
        self.images = beam.metrics.Metrics.counter("batch_job", "images")

    def process(self, element):
        shard_id, paths = element
        records = score_paths([os.fsdecode(p) for p in paths], self.spec)
        outputs.write_shard(self.out_dir, shard_id, records, self.spec.ledger_path is not None)
        self.images.inc(len(records))
        yield shard_id, len(records)


def build_pipeline(p: beam.Pipeline, shards, listing_path: str, spec: ScoringSpec, out_dir: str):
    return (
        p
        | "ListShards" >> beam.Create(shards, reshuffle=True)
        | "ReadShard" >> beam.ParDo(ReadShard(listing_path))
        | "DecodeScoreWrite" >> beam.ParDo(ScoreAndWriteShard(spec, out_dir))
    )


# ------------------------------------------------------------ runner choice

THREADS_UP_TO = 4


def default_running_mode(cores: int) -> str:
    """Worker threads in this process up to THREADS_UP_TO cores, worker processes beyond.

    Pillow's decoder and onnxruntime release the GIL, so threads need no worker start-up
    (two SDK worker processes cost ~2-3 s each job) and share one model session. The
    Python part of scoring an image holds the GIL for ~15% of its time on 2 cores
    (measured: 2 threads score 1.7x as fast as 1), which caps threads at ~6x; beyond
    4 cores, processes. bench/RESULTS.md has the numbers.
    """
    return "multi_threading" if cores <= THREADS_UP_TO else "multi_processing"


def resolve_runner(pipeline_args: list[str]):
    """-> (runner object or name, runner label, options, worker count).

    DirectRunner becomes the FnApiRunner with one worker per core (threads on small
    machines, processes on large ones: :func:`default_running_mode`) unless
    --direct_num_workers / --direct_running_mode say otherwise, without Beam's Prism
    download attempt. DaskRunner is resolved by class. Other runners pass through by name.
    """
    options = PipelineOptions(pipeline_args)
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    short = name.rsplit(".", 1)[-1]
    if short in ("DirectRunner", "FnApiRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        joined, extra, cores = " ".join(pipeline_args), [], default_workers()  # defaults only where unset
        if "--direct_num_workers" not in joined and "in_memory" not in joined:
            extra.append(f"--direct_num_workers={cores}")
        if "--direct_running_mode" not in joined:
            extra.append("--direct_running_mode=" + default_running_mode(cores))
        if "--default_sdk_harness_log_level" not in joined:
            extra.append("--default_sdk_harness_log_level=WARNING")
        options = PipelineOptions(pipeline_args + extra)
        workers = options.view_as(DirectOptions).direct_num_workers or 1
        return FnApiRunner(), "DirectRunner", options, workers
    if short == "DaskRunner":
        from apache_beam.runners.dask.dask_runner import DaskRunner

        joined, extra = " ".join(pipeline_args), []
        if "--dask_npartitions" not in joined and "--dask_partition_size" not in joined:
            extra.append("--dask_partition_size=1")  # one shard per Dask task
        return DaskRunner(), "DaskRunner", PipelineOptions(pipeline_args + extra), None
    return name, short, options, None


# ------------------------------------------------------------------- driver

def _prepare_output(out: str, overwrite: bool) -> str:
    """Refuse a non-empty OUT_DIR (unless --overwrite); make the temp dir beside it."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"output dir {out} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_leftovers(out)
        return temp_dir_beside(out, f"tmp-{os.getpid()}@{socket.gethostname()}")
    except OSError as exc:
        raise InputError(f"output dir {out} is not writable: {exc.strerror}") from None


def _clean_leftovers(out: str) -> None:
    """Leftovers of killed runs on this OUT_DIR: temp dirs whose process (on this host) is gone,
    and the previous OUT_DIR parked by an --overwrite killed between its two renames (restored)."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(base + ".tmp-"):
            owner = name[len(base) + 5:].rsplit("-", 1)[0]  # "<pid>@<host>"
            pid, _, host = owner.partition("@")
            if pid.isdigit() and host == socket.gethostname() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(base + ".old-"):
            parked = os.path.join(path, "old")
            if os.path.isdir(parked) and not os.path.exists(out):
                os.rename(parked, out)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shard_size(requested: int | None, n: int, batch_size: int, workers: int | None) -> int:
    if requested:
        return requested
    per_worker_units = 4 * (workers or 4)  # a few units per worker balances the tail
    size = math.ceil(n / per_worker_units) if n else batch_size
    return int(min(MAX_SHARD, max(batch_size, math.ceil(size / batch_size) * batch_size)))


class Progress(threading.Thread):
    """Logs images done and images/s from the shard files as they appear (any runner)."""

    def __init__(self, tmp: str, shards, interval: float = 2.0):
        super().__init__(daemon=True)
        self.tmp, self.sizes, self.interval = tmp, {outputs.shard_name(s): c for s, _, c in shards}, interval
        self.total = sum(self.sizes.values())
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def done(self) -> int:
        return sum(c for name, c in self.sizes.items() if os.path.exists(os.path.join(self.tmp, name)))

    def run(self):
        while not self.stop.wait(self.interval):
            n = self.done()
            rate = n / (time.perf_counter() - self.t0)
            LOG.info("progress: %d/%d images scored (%.1f images/s)", n, self.total, rate)


KILL_ENV = "BATCH_JOB_TEST_KILL_AT"  # crash-safety tests: SIGKILL the driver at a named point


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _discard(tmp: str) -> None:
    """Remove a failed job's temp dir. Renamed first: workers still running (threads after Ctrl-C,
    Dask tasks after a driver failure) then fail to create files in it instead of racing rmtree.
    The new name keeps the "<out>.tmp-<pid>@<host>-" prefix, so a later run cleans up what remains."""
    gone = tmp + ".discarded"
    try:
        os.rename(tmp, gone)
    except OSError:
        gone = tmp
    shutil.rmtree(gone, ignore_errors=True)


def _execute(p: beam.Pipeline) -> None:
    result = p.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)  # DaskRunner leaves its dask client open
        if client is not None:
            client.close()


def _orphaned_output(out: str, book) -> bool:
    """OUT_DIR published by a run on this ledger that was killed before its ledger commit."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return m.get("ledger") == book.path and bool(m.get("run_id")) and not book.knows_run(m["run_id"])


def _model_contract(version_dir: str, threshold_arg: float | None):
    """Verified package -> (metadata, model id, threshold); every problem is one PackageError line."""
    checks = verify_package(version_dir)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PackageError(f"model {version_dir} failed verification: {failed[0].line()}")
    meta = load_metadata(version_dir)
    try:
        PreprocessConfig.from_dict(meta["preprocessing"])
        threshold = float(meta["decision_threshold"] if threshold_arg is None else threshold_arg)
    except (TypeError, ValueError, KeyError) as exc:
        raise PackageError(f"model {version_dir} has unusable metadata: {exc}") from None
    if not 0.0 <= threshold <= 1.0:
        raise InputError("--threshold must be in [0, 1]")
    return meta, f"{meta['name']}/{meta['version']}", threshold


def run(argv=None, test_pipeline=None, reporter: Reporter | None = None, started: float | None = None) -> int:
    """The batch job; returns the exit code (0 ok, 1 reconciliation failure, 2 bad input).

    `reporter` makes metrics.json's content and histogram.png (default: in this process);
    `started` is the command's perf_counter() at start-up, so the timings include the imports."""
    t0 = time.perf_counter() if started is None else started
    args, pipeline_args = parse_args(argv)
    if args.batch_size < 1 or (args.shard_size is not None and args.shard_size < 1):
        raise InputError("--batch-size and --shard-size must be >= 1")
    check_inputs(args.input)
    version_dir = os.path.abspath(resolve_version_dir(args.model))
    meta, model_id, threshold = _model_contract(version_dir, args.threshold)
    runner, runner_label, options, workers = resolve_runner(pipeline_args)
    out = os.path.abspath(args.output)
    book = Ledger(args.ledger) if args.ledger else contextlib.nullcontext()
    publishing = contextlib.ExitStack()  # holds GATE.deferred() from publishing to the ledger commit
    with book, publishing:
        overwrite = args.overwrite
        if args.ledger and not overwrite and _orphaned_output(out, book):
            LOG.warning("%s was published by a run killed before its ledger commit: replacing it", out)
            overwrite = True
        tmp = _prepare_output(out, overwrite)
        try:
            listing = os.path.join(tmp, outputs.LISTING_FILE)
            # Count first (paths only), then cut into shards sized for the worker count.
            n = outputs.write_listing(listing, iter_images(args.input))
            if n == 0:
                raise InputError(f"no image files (.jpeg/.jpg/.png/.dcm) found in {', '.join(args.input)}")
            _kill_point("listed")
            size = _shard_size(args.shard_size, n, args.batch_size, workers)
            shards = outputs.shard_listing(listing, size)
            LOG.info("listed %d images in %.1fs -> %d shards of <= %d; model %s, threshold %.4f, runner %s",
                     n, time.perf_counter() - t0, len(shards), size, model_id, threshold, runner_label)
            if runner_label == "DirectRunner" and len(shards) == 1 and "--direct_running_mode" not in " ".join(pipeline_args):
                # one work unit cannot be parallelised: score it in this process, no worker start-up
                options, workers = PipelineOptions(pipeline_args + ["--direct_running_mode=in_memory",
                                                                    "--direct_num_workers=1"]), 1
            spec = ScoringSpec(os.path.join(version_dir, "model.onnx"), model_id, meta["preprocessing"], threshold,
                               args.batch_size, intra_op_threads=1 if (workers or 2) > 1 else 0,
                               ledger_path=book.path if args.ledger else None)
            progress = Progress(tmp, shards)
            progress.start()
            t_scoring = time.perf_counter()
            try:
                p = test_pipeline or beam.Pipeline(runner=runner, options=options)
                build_pipeline(p, shards, listing, spec, tmp)
                _execute(p)
            finally:
                progress.stop.set()
            t_report = time.perf_counter()
            LOG.info("pipeline finished after %.1fs (%.1fs scoring)", t_report - t0, t_report - t_scoring)
            _kill_point("scored")
            outputs.remove_partial_files(tmp)  # half-written shards of killed/retried tasks
            rec = outputs.reconcile(tmp, shards, args.input)
            if not rec["ok"]:
                raise ReconciliationError(
                    f"reconciliation failed: found {rec['images_found']}, scored {rec['images_scored']}, failed "
                    f"{rec['images_failed']}, skipped {rec['images_skipped']}, missing {rec['missing']}, "
                    f"duplicated {rec['duplicated']}, unexpected {rec['unexpected']}, stray shards "
                    f"{len(rec['stray_shards'])}; output not published")
            metrics = (reporter or Reporter(helper=False)).report(rec, threshold, model_id, runner_label,
                                                                   os.path.join(tmp, "histogram.png"))
            outputs.add_timings(metrics, t_scoring - t0, t_report - t_scoring, time.perf_counter() - t_report)
            metrics["run_id"] = uuid.uuid4().hex
            if args.ledger:
                metrics["ledger"] = book.path
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            with open(os.path.join(tmp, "report.md"), "w") as f:
                f.write(outputs.report_markdown(metrics))
            _kill_point("written")
            publishing.enter_context(GATE.deferred())  # a Ctrl-C from here on waits for the ledger commit
            try:
                publish_dir(tmp, out, replace=overwrite)
            except FileExistsError:
                raise InputError(f"output dir {out} was created by someone else during the run; "
                                 "nothing published (rerun with another --output or --overwrite)") from None
            _kill_point("published")
        except BaseException:
            _discard(tmp)
            raise
        if args.ledger:  # only after OUT_DIR is published; one transaction
            added = book.commit(metrics["run_id"], out, model_id, outputs.read_ledger_entries(out, shards))
            LOG.info("ledger %s: %d new images recorded", book.path, added)
        publishing.close()
    if GATE.pending:
        GATE.pending = False
        LOG.warning("Ctrl-C arrived while the outputs were being published; the job completed first")
    print(summary(metrics, out))
    return 0


def summary(m: dict, out: str) -> str:
    line = (f"scored {m['images_scored']}/{m['images_found']} images ({m['images_failed']} failed, "
            f"{m['images_skipped']} skipped as already in the ledger) with "
            f"{m['model']} on {m['runner']} in {m['wall_seconds']:.1f}s ({m['images_per_second']} images/s); "
            f"{m['positive_count']} flagged PNEUMONIA (rate {m['positive_rate']:.3f}, threshold {m['threshold']:.4f})")
    if "accuracy" in m:
        line += (f"\nagainst folder labels ({m['labelled_images']}): accuracy {m['accuracy']:.4f}, recall "
                 f"{m['recall']:.4f}, specificity {m['specificity']:.4f}, ROC AUC "
                 + ("n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"))
    return line + f"\noutputs in {out}: predictions-*.csv, metrics.json, report.md, histogram.png"


def main(argv=None, reporter: Reporter | None = None, started: float | None = None) -> int:
    if not LOG.handlers:  # Beam configures the root logger on import; the job logs through its own handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    for noisy in ("apache_beam", "distributed", "dask"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return run(argv, reporter=reporter, started=started)
    except (InputError, PackageError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ReconciliationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # __stderr__: the command's SIGINT handler has muted sys.stderr
        print("error: interrupted; nothing published", file=sys.__stderr__ or sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a worker or runner failure: one line, details in debug log
        LOG.debug("job failed", exc_info=True)
        reason = (str(exc).strip().splitlines() or [""])[-1][:300]
        print(f"error: job failed ({type(exc).__name__}): {reason}; nothing published", file=sys.stderr)
        return 1
