"""The batch job, step by step: check -> list -> score -> reconcile -> heatmaps -> drift -> report -> publish ->
commit.

Each step's work lives in its own module: listing.py (find images, folder labels), shards.py (the
listing file, shards, shard CSVs), stages.py and runner.py (the Beam pipeline and its runner),
reconcile.py, heatmaps.py (overlays of the top flagged images), drift_check.py (this run against the model's
reference; drift.py the statistics, drift_report.py the figures), report.py, figures.py and html_report.py
(report.html), outdir.py (OUT_DIR's temp dir, publishing), ledger.py. Nothing is published
unless every listed image has exactly one row; the ledger is committed only after OUT_DIR is published.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time
import uuid

import apache_beam as beam

from batch_job import drift_check, drift_report, figures, heatmaps, html_report, outdir, report
from batch_job import shards as shard_files
from batch_job.drift import summary_line
from batch_job.errors import InputError, LedgerNotUpdated
from batch_job.interrupts import GATE
from batch_job.ledger import Ledger, check_usable
from batch_job.listing import check_inputs, input_root, iter_images
from batch_job.model import Model, load_model
from batch_job.progress import Progress
from batch_job.reconcile import check, reconcile
from batch_job.runner import Runner, choose_runner, execute
from batch_job.scoring import ScoringSpec
from batch_job.stages import build_pipeline
from xray_core.errors import one_line
from xray_core.labels import label_from_path

LOG = logging.getLogger("batch_job")
KILL_ENV = "BATCH_JOB_TEST_KILL_AT"  # crash-safety tests: SIGKILL the job at a named step


def kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace, beam_args: list[str], started: float | None = None) -> dict:
    """The job; -> metrics.json's content. `started`: the command's perf_counter() at start-up, so the
    timings include its imports. Raises JobError, PackageError (README, "Exit codes") or KeyboardInterrupt."""
    t0 = time.perf_counter() if started is None else started
    if args.batch_size < 1 or (args.shard_size is not None and args.shard_size < 1):
        raise InputError("--batch-size and --shard-size must be >= 1")
    if args.heatmaps < 0:
        raise InputError("--heatmaps must be >= 0 (0 turns heatmaps off)")
    if not (0.5 <= args.drift_auc_limit <= 1.0 and 0 < args.drift_psi_limit < float("inf")):
        raise InputError("--drift-auc-limit must be in [0.5, 1] and --drift-psi-limit > 0")
    runner = choose_runner(beam_args)  # refuses arguments that neither the job nor Beam knows
    check_inputs(args.input)
    model = load_model(args.model, args.threshold)
    package = os.path.dirname(os.path.dirname(model.path))  # <serving>/<name>: every version of the model
    outdir.refuse_overlaps(args.input, args.output, args.ledger, package)
    if args.ledger:
        check_usable(args.ledger)  # every refusal comes before anything is created
    out = os.path.abspath(args.output)
    outdir.clean_leftovers(out)  # only what killed jobs left (locks prove it); a parked OUT_DIR comes back
    outdir.refuse_existing(out, replaceable(args, out))
    with Ledger(args.ledger) if args.ledger else contextlib.nullcontext() as book:
        overwrite = replaceable(args, out)  # again, now that this job holds the ledger
        if overwrite and not args.overwrite:
            LOG.warning("%s was published by a run killed before its ledger commit: replacing it", out)
        tmp = outdir.prepare(out, overwrite)
        try:
            listing, shards = list_images(args, tmp, runner.workers)
            LOG.info("listed %d images in %.1fs -> %d shards; model %s, threshold %.4f, runner %s",
                     sum(c for _, _, c in shards), time.perf_counter() - t0, len(shards), model.model_id,
                     model.threshold, runner.label)
            kill_point("listed")
            t_scoring = time.perf_counter()
            score(runner, shards, listing, scoring_spec(model, args.batch_size, runner, book, args.heatmaps), tmp)
            t_report = time.perf_counter()
            LOG.info("pipeline finished after %.1fs (%.1fs scoring)", t_report - t0, t_report - t_scoring)
            kill_point("scored")
            rec = reconcile(tmp, shards, args.input)
            check(rec)
            flagged = heatmaps.make_heatmaps(tmp, shards, args.heatmaps, model.preprocessing)
            t_heatmaps = time.perf_counter() - t_report
            metrics = write_report(rec, model, runner.label, tmp, book)
            metrics["heatmaps"] = heatmaps.summary(flagged, args.heatmaps, model.heatmap_hw is not None)
            t_drift = time.perf_counter()
            metrics["drift"] = check_drift(args, tmp, shards, model, rec, metrics["run_id"], book)
            t_drift = time.perf_counter() - t_drift
            report.add_timings(metrics, t_scoring - t0, t_report - t_scoring, time.perf_counter() - t_report,
                               t_heatmaps)
            metrics["timings"]["drift_seconds"] = round(t_drift, 3)
            report.write_metrics(tmp, metrics)
            html_report.write_html(tmp, metrics, flagged, shards)
            kill_point("written")
        except BaseException:
            outdir.discard(tmp)
            raise
        with GATE.deferred():  # a Ctrl-C from here on waits for the ledger commit
            outdir.publish(tmp, out, overwrite)
            kill_point("published")
            if book is not None:
                commit_ledger(book, metrics, out, shards)
    return metrics


def replaceable(args: argparse.Namespace, out: str) -> bool:
    """--overwrite, or OUT_DIR was published by a job on this ledger killed before its ledger commit."""
    return args.overwrite or (bool(args.ledger) and outdir.orphaned(out, args.ledger))


def list_images(args: argparse.Namespace, tmp: str, workers: int) -> tuple[str, list]:
    """Stream every image path (and its folder label) to the listing file; cut it into shards."""
    listing = os.path.join(tmp, shard_files.LISTING_FILE)
    roots = [input_root(arg) for arg in args.input]
    found = ((index, path, label_from_path(path, roots[index])) for index, path in iter_images(args.input))
    n = shard_files.write_listing(listing, found)
    if n == 0:
        raise InputError(f"no image files (.jpeg/.jpg/.png/.dcm) found in {', '.join(args.input)}")
    size = shard_files.shard_size(args.shard_size, n, args.batch_size, workers)
    return listing, shard_files.cut_listing(listing, size)


def scoring_spec(model: Model, batch_size: int, runner: Runner, book: Ledger | None,
                 n_heatmaps: int = 0) -> ScoringSpec:
    if n_heatmaps and model.heatmap_hw is None:
        LOG.info("model %s has no heatmap output: no heatmaps (the report lists the top flagged images without)",
                 model.model_id)
    return ScoringSpec(model.path, model.model_id, model.preprocessing, model.threshold, batch_size,
                       intra_op_threads=1 if runner.workers > 1 else 0,  # one per worker: no oversubscription
                       ledger_path=book.path if book is not None else None,
                       heatmaps=n_heatmaps, with_heatmap=bool(n_heatmaps) and model.heatmap_hw is not None,
                       drift_sample=drift_check.SAMPLE_ROWS if model.reference else 0)


def score(runner: Runner, shards: list, listing: str, spec: ScoringSpec, tmp: str) -> None:
    """Run the Beam pipeline: every shard's CSV written into tmp."""
    with Progress(tmp, shards):
        p = beam.Pipeline(runner=runner.runner, options=runner.options)
        build_pipeline(p, shards, listing, spec, tmp)
        execute(p)
    shard_files.remove_partial_files(tmp)  # half-written shards of killed or retried tasks


def write_report(rec: dict, model: Model, runner_label: str, tmp: str, book: Ledger | None) -> dict:
    """Metrics, histogram.png and with folder labels confusion.png and roc.png; -> metrics.json's content
    without timings."""
    metrics = report.compute_metrics(rec, model.threshold, model.model_id, runner_label)
    report.write_histogram(os.path.join(tmp, "histogram.png"), rec["probabilities"], model.threshold, model.model_id)
    figures.write_labelled_figures(tmp, rec, metrics)
    metrics["run_id"] = uuid.uuid4().hex
    if book is not None:
        metrics["ledger"] = book.path
    return metrics


def check_drift(args: argparse.Namespace, tmp: str, shards: list, model: Model, rec: dict, run_id: str,
                book: Ledger | None) -> dict:
    """metrics.json's `drift` for the images scored in this run, drift.png and with a ledger drift_trend.png
    (this model version's last runs)."""
    fresh = rec["probabilities"][rec["scored_in_run"]]
    block = drift_check.run_drift(tmp, shards, model.reference, fresh, model.threshold, args.drift_auc_limit,
                                  args.drift_psi_limit, drift_check.SAMPLE_ROWS)
    history = drift_report.trend_history(book, model.model_id, run_id, block)
    block["figures"] = drift_report.write_figures(tmp, block, model.threshold, model.model_id, history)
    LOG.info(summary_line(block))
    return block


def commit_ledger(book: Ledger, metrics: dict, out: str, shards: list) -> None:
    """Record the newly scored images, in one transaction; LedgerNotUpdated (exit 3) if that fails."""
    try:
        added = book.commit(metrics["run_id"], out, metrics["model"], shard_files.read_ledger_entries(out, shards),
                            metrics["drift"])
    except Exception as exc:  # noqa: BLE001 - whatever it was, OUT_DIR is published and the ledger is not
        raise LedgerNotUpdated(
            f"outputs published in {out}, but the ledger {book.path} was not updated "
            f"({type(exc).__name__}: {one_line(exc, 200)}); the next run with this ledger rescores these images"
        ) from None
    LOG.info("ledger %s: %d new images recorded", book.path, added)
