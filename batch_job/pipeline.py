"""The batch job, step by step: check -> list -> score -> reconcile -> heatmaps -> drift -> report -> publish ->
commit.

Each step's work lives in its own module: listing.py (find images, folder labels), shards.py (the listing file,
shards, shard CSVs), stages.py and runner.py (the Beam pipeline and its runner), shard_result.py (each shard's
summary, gathered by the driver), reconcile.py, heatmaps.py (overlays of the top flagged images), drift_check.py
(this run against the model's reference; drift.py the statistics, drift_report.py the figures), result.py (the
run's typed result), report.py, figures.py and html_report.py (report.html), outdir.py (OUT_DIR's temp dir,
publishing), leftovers.py, ledger.py. Everything is written into the temp dir beside OUT_DIR; the job's scratch (the
listing, the shard summaries) lies in its ``scratch/`` folder, removed before publishing. Nothing is published unless
every listed image has exactly one row; the ledger is committed only after OUT_DIR is published.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import apache_beam as beam

from batch_job import (
    drift_check,
    drift_report,
    figures,
    heatmaps,
    html_report,
    leftovers,
    outdir,
    report,
    shard_result,
    worklist,
)
from batch_job import shards as shard_files
from batch_job.drift import DriftResult, summary_line
from batch_job.earlier_nights import nights_of
from batch_job.errors import InputError, LedgerNotUpdated
from batch_job.ledger import Ledger, check_usable
from batch_job.ledger_identity import check_model, warn_if_new_model
from batch_job.listing import check_inputs
from batch_job.model import Model, load_model
from batch_job.progress import Progress
from batch_job.reconcile import Reconciliation, check, check_counts, reconcile
from batch_job.result import HeatmapSummary, RunResult, Timings, label_metrics
from batch_job.runner import Runner, choose_runner, default_workers, execute, for_night
from batch_job.scoring import ScoringSpec
from batch_job.stages import build_pipeline
from xray_core.dicom_header import DEFAULT_MODALITIES, parse_modalities
from xray_core.errors import one_line
from xray_core.files import private_umask
from xray_core.interrupts import GATE
from xray_core.occlusion import HeatmapMethod

LOG = logging.getLogger("batch_job")
KILL_ENV = "BATCH_JOB_TEST_KILL_AT"  # crash-safety tests: SIGKILL the job at a named step


def kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run(args: argparse.Namespace, beam_args: list[str], started: float | None = None) -> RunResult:
    """The job; -> its result. `started`: the command's perf_counter() at start-up, so the timings include its
    imports. Raises JobError, PackageError (README, "Exit codes") or KeyboardInterrupt. What it creates is
    readable by the owner and group only (xray_core.files.private_umask)."""
    with private_umask():
        return _run(args, beam_args, started)


def _run(args: argparse.Namespace, beam_args: list[str], started: float | None) -> RunResult:
    t0 = time.perf_counter() if started is None else started
    if args.batch_size < 1 or (args.shard_size is not None and args.shard_size < 1):
        raise InputError("--batch-size and --shard-size must be >= 1")
    if not args.output:
        raise InputError("--output is empty: name the folder the outputs go to")
    if args.ledger is not None and not args.ledger:  # an unset variable in a nightly script: no ledger at all
        raise InputError("--ledger is empty: name the ledger file, or leave the option out to run without one")
    if args.heatmaps < 0:
        raise InputError("--heatmaps must be >= 0 (0 turns heatmaps off)")
    if not (0.5 <= args.drift_auc_limit <= 1.0 and (args.drift_psi_limit is None
                                                      or 0 < args.drift_psi_limit < float("inf"))):
        raise InputError("--drift-auc-limit must be in [0.5, 1] and --drift-psi-limit > 0")
    runner = choose_runner(beam_args, worker_stderr=args.log_level == "DEBUG")  # refuses unknown arguments
    check_inputs(args.input, args.fail_if_empty)
    modalities(args.modalities)
    model = load_model(args.model, args.threshold)
    if model.gate is None:
        LOG.warning("model %s records no input gate: only the DICOM header rules and the cheap checks (colour, "
                    "near-constant, too few grey levels) run, so photographs and other non-X-rays can be scored "
                    "(`python -m export --add-gate` gives a version one)", model.model_id)
    if model.below_floor:
        LOG.warning("model %s is below the quality floor: %s; trust its flags less than the floor promises "
                    "(docs/export.md)", model.model_id, model.below_floor)
    # <serving>/<name>: every version of the model, where the files are (a --model given as a symlink included)
    package = os.path.dirname(os.path.dirname(os.path.realpath(model.path)))
    outdir.refuse_overlaps(args.input, args.output, args.ledger, package)
    if args.ledger:
        check_usable(args.ledger)  # every refusal comes before anything is created
        check_model(args.ledger, model.model_id, model.sha256, model.scoring_sha256)
        warn_if_new_model(args.ledger, model.model_id)
    out = os.path.abspath(args.output)
    leftovers.clean_leftovers(out)  # only what killed jobs left (locks prove it); a parked OUT_DIR comes back
    if args.ledger and args.overwrite:
        leftovers.refuse_rerun(out, args.ledger, model.model_id)
    outdir.refuse_existing(out, replaceable(args, out))
    with Ledger(args.ledger) if args.ledger else contextlib.nullcontext() as book:
        overwrite = replaceable(args, out)  # again, now that this job holds the ledger
        if overwrite and not args.overwrite:
            LOG.warning("%s was published by a run killed before its ledger commit: replacing it", out)
        tmp = ""
        try:
            with GATE.held():  # a signal as the temp dir is made: raised once `tmp` names it for the cleanup below
                tmp = outdir.prepare(out, overwrite)
            scratch = os.path.join(tmp, shard_result.SCRATCH)
            os.mkdir(scratch)
            listing, shards, dicom = shard_files.list_images(args, scratch, runner.workers)
            runner = for_night(runner, beam_args, dicom, sum(c for _, _, c in shards))
            LOG.info("listed %d images in %.1fs -> %d shards; model %s, threshold %.4f, runner %s%s",
                     sum(c for _, _, c in shards), time.perf_counter() - t0, len(shards), model.model_id,
                     model.threshold, runner.label, f" ({runner.mode}, {runner.workers} workers)" * bool(runner.mode))
            kill_point("listed")
            t_scoring = time.perf_counter()
            spec = scoring_spec(model, args.batch_size, runner, book, args.heatmaps, modalities(args.modalities))
            score(runner, shards, listing, spec, tmp, scratch)
            t_report = time.perf_counter()
            LOG.info("pipeline finished after %.1fs (%.1fs scoring)", t_report - t0, t_report - t_scoring)
            kill_point("scored")
            rec = reconcile(tmp, listing, shards, args.input)
            check(rec)  # every shard's CSV is there before its summary is read
            gathered = shard_result.gather(scratch, shards, args.heatmaps, spec.drift_sample)
            check_counts(rec, gathered.counts)
            # The heatmaps (onnxruntime and Pillow, which release the GIL) are drawn in a thread beside the figures
            # and the drift step (imports and Python that hold it). Leaving the `with` waits for that thread, also
            # after an exception, so nothing writes into tmp once it is discarded.
            with ThreadPoolExecutor(1) as pool:
                drawing = pool.submit(timed, heatmaps.make_heatmaps, tmp, gathered.flagged, model.preprocessing,
                                      model.path, HeatmapMethod.from_dict(model.heatmap_method),
                                      max(1, default_workers() - 1))  # a core for this thread's work
                labelled = write_figures(rec, model, tmp)
                run_id = uuid.uuid4().hex
                drift, t_drift = timed(check_drift, args, tmp, model, rec, gathered.sample_embeddings, run_id, book)
                flagged, t_heatmaps = drawing.result()
            listed = worklist.merge(scratch, [s for s, _, _ in shards], os.path.join(tmp, worklist.WORKLIST_FILE),
                                    {f.path: f.png for f in flagged if f.png}, html_report.MAX_FLAGGED_ROWS,
                                    html_report.OUT_OF_SCOPE_SHOWN, html_report.CAPS[1])
            outdir.remove_scratch(scratch)  # read once: nothing of it is published
            thumbnails = heatmaps.draw_thumbnails(tmp, listed.out_of_scope, model.preprocessing,
                                                  modalities(args.modalities))
            if model.card:
                shutil.copyfile(model.card, os.path.join(tmp, MODEL_CARD_COPY))
            result = RunResult(run_id, model.model_id, model.threshold, runner.label, book.path if book else None,
                               rec, labelled, flagged, HeatmapSummary(
                                   args.heatmaps, model.heatmap_hw is not None, model.heatmap_hw,
                                   HeatmapMethod.from_dict(model.heatmap_method)),
                               drift, Timings(t_scoring - t0, t_report - t_scoring, time.perf_counter() - t_report,
                                              t_heatmaps, t_drift),
                               listed, thumbnails, MODEL_CARD_COPY if model.card else "", model.package_threshold,
                               model.trained_on, model.below_floor,
                               tuple(nights_of(book.path, gathered.earlier)) if book else (), runner.mode)
            report.write_metrics(tmp, result)
            html_report.write_html(tmp, result)
            kill_point("written")
            GATE.check()  # a signal whose interrupt Python dropped (raised inside a finaliser) still stops the job
        except BaseException:
            if tmp:
                outdir.discard(tmp)
            if book is not None:
                book.remove_if_new()  # nothing published (a refusal: nothing made): a ledger this run created goes too
            raise
        with GATE.deferred():  # a Ctrl-C from here on waits for the ledger commit
            if book is not None:  # what tells a rerun that this run was killed before its commit (leftovers.orphaned)
                book.mark_publishing(result.run_id, out, result.model)
            try:
                outdir.publish(tmp, out, overwrite)
            except BaseException:
                if book is not None:
                    book.unmark_publishing(result.run_id)
                raise
            kill_point("published")
            if book is not None:
                commit_ledger(book, result, out, gathered.ledger_rows, gathered.file_keys, gathered.refused,
                              model.sha256, model.scoring_sha256)
    return result


def timed(step, *args):
    """(step(*args), its seconds)."""
    t = time.perf_counter()
    return step(*args), time.perf_counter() - t


MODEL_CARD_COPY = "model_card.md"  # the package's MODEL_CARD.md, beside the report that links it
WORKER_LOGS = "workers"  # worker processes' stderr files (batch_job/workers.py), in the scratch folder: never published


def modalities(text: str) -> tuple[str, ...]:
    """--modalities -> the DICOM Modality values in scope (InputError for an empty list)."""
    try:
        return parse_modalities(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def replaceable(args: argparse.Namespace, out: str) -> bool:
    """--overwrite, or OUT_DIR was published by a job on this ledger killed before its ledger commit."""
    return args.overwrite or (bool(args.ledger) and leftovers.orphaned(out, args.ledger))


def scoring_spec(model: Model, batch_size: int, runner: Runner, book: Ledger | None,
                 n_heatmaps: int = 0, modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> ScoringSpec:
    if n_heatmaps and model.heatmap_hw is None:
        LOG.info("model %s has no heatmap output: no heatmaps (the report lists the top flagged images without)",
                 model.model_id)
    return ScoringSpec(model.path, model.model_id, model.preprocessing, model.threshold, batch_size,
                       intra_op_threads=1 if runner.workers > 1 else 0,  # one per worker: no oversubscription
                       ledger_path=book.path if book is not None else None,
                       heatmaps=n_heatmaps, with_heatmap=bool(n_heatmaps) and model.heatmap_hw is not None,
                       drift_sample=drift_check.SAMPLE_ROWS if model.reference else 0,
                       reference_path=model.reference, gate=model.gate,
                       allowed_modalities=modalities)


def score(runner: Runner, shards: list, listing: str, spec: ScoringSpec, tmp: str, scratch: str) -> None:
    """Run the Beam pipeline: every shard's CSV written into tmp, its summary into scratch. A quiet night's one
    empty shard is written here, without a pipeline."""
    if not any(count for _, _, count in shards):
        for shard_id, _, _ in shards:
            shard_result.write(scratch, shard_id, shard_result.summarise([], spec))
            worklist.write_part(scratch, shard_id, [])
            shard_files.write_shard(tmp, shard_id, [])
        return
    with Progress(tmp, shards):
        p = beam.Pipeline(runner=runner.runner, options=runner.options)
        build_pipeline(p, shards, listing, spec, tmp, scratch)
        execute(p, os.path.join(scratch, WORKER_LOGS) if runner.mode == "multi_processing" else None,
                runner.quiet_threads)
    shard_files.remove_partial_files(tmp)  # half-written shards of killed or retried tasks


def write_figures(rec: Reconciliation, model: Model, tmp: str):
    """histogram.png and, with folder labels, confusion.png and roc.png; -> the label metrics (None without)."""
    report.write_histogram(os.path.join(tmp, "histogram.png"), rec.probabilities, model.threshold, model.model_id)
    written = figures.write_labelled_figures(tmp, rec, model.threshold)
    return label_metrics(rec, model.threshold, tuple(written))


def check_drift(args: argparse.Namespace, tmp: str, model: Model, rec: Reconciliation, sample, run_id: str,
                book: Ledger | None) -> DriftResult:
    """The drift check of the images scored in this run, drift.png and with a ledger drift_trend.png (this model
    version's last runs)."""
    drift = drift_check.run_drift(model.reference, rec.probabilities, sample, model.threshold, args.drift_auc_limit,
                                  args.drift_psi_limit)
    history = drift_report.trend_history(book, model.model_id, run_id, drift)
    drift = replace(drift, figures=tuple(drift_report.write_figures(tmp, drift, model.threshold, model.model_id,
                                                                    history)))
    LOG.info(summary_line(drift))
    return drift


def commit_ledger(book: Ledger, result: RunResult, out: str, rows: list[tuple[str, float, str]],
                  file_keys: list = (), refused: list = (), onnx_sha256: str = "", scoring_sha256: str = "") -> None:
    """Record the newly scored images and the keys of the files read, in one transaction; LedgerNotUpdated (exit 3)
    if that fails."""
    try:
        added = book.commit(result.run_id, out, result.model, rows, result.drift, file_keys, refused, onnx_sha256,
                            scoring_sha256)
    except Exception as exc:  # noqa: BLE001 - whatever it was, OUT_DIR is published and the ledger is not
        kept = "" if book.unmark_publishing(result.run_id) else (
            f"; {out} stays marked as publishing in it: use another --output next time")  # else a rerun replaces it
        raise LedgerNotUpdated(
            f"outputs published in {out}, but the ledger {book.path} was not updated "
            f"({type(exc).__name__}: {one_line(exc, 200)}); the next run with this ledger rescores these images{kept}"
        ) from None
    # rows not added: byte-identical files of this run, one row each (QA: "242 recorded" after 244 scored, and 59
    # out of scope said for 58 rows); nothing else, as an image this model judged on an earlier night is skipped
    refused_rows = len({sha for sha, _, _ in refused})
    same = len(rows) - added + len(refused) - refused_rows
    LOG.info("ledger %s: %d new images recorded, %d out of scope%s", book.path, added, refused_rows,
             f" ({same} byte-identical {'copy' if same == 1 else 'copies'} of files of this run, recorded once)" if same
             else "")
