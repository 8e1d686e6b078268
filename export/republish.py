"""Publish a new version of a published package without TensorFlow or the training run: the same `model.onnx`
(byte-identical) and reference, with new metadata: the input gate derived from the package's own reference
(`python -m export --add-gate VERSION_DIR`), or a decision threshold chosen on a labelled local sample
(`python -m export --recalibrate VERSION_DIR --calibrate-dir DIR`)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from datetime import datetime, timezone
from typing import Callable

from export import gate_fit
from export.calibrate import MIN_PER_CLASS, CalibrationError, calibrate, list_labelled, refuse_training_folder
from export.card import model_card
from export.faithfulness import faithfulness
from export.metadata import chosen_on
from export.publish_floor import checked, checked_again
from export.triton import triton_config
from xray_core import gate, reference
from xray_core.dicom_header import DEFAULT_MODALITIES
from xray_core.files import atomic_write, publish_dir
from xray_core.interrupts import GATE
from xray_core.occlusion import HeatmapMethod
from xray_core.package import (
    CARD_FILE,
    METADATA_FILE,
    MODEL_FILE,
    Metadata,
    PackageError,
    load_metadata,
    new_version_dir,
    open_session,
    versions,
    write_metadata,
)
from xray_core.quality_floor import measured
from xray_core.staging import PUBLISHED, discard_staging, release_staging, staging_dir
from xray_core.training_data import TrainingData
from xray_core.verify import verify_package

CARRIED = (MODEL_FILE, reference.REFERENCE_FILE, reference.SPLITS_FILE, gate.FIT_FILE)


class RepublishError(ValueError):
    """A package that cannot be republished (exit 2); the message is one line."""


def republish(source_dir: str, serving_dir: str | None, name: str | None,
              edit: Callable[[Metadata, str], Metadata], version: int | None = None, log=print) -> str:
    """Copy `source_dir`'s model and reference into serving_dir/name/<version> (None: the source's serving folder,
    its name: beside it, never under the working directory), with metadata `edit(meta, staging_dir)` returns;
    verified before it is published, atomically. -> the new version dir."""
    problems = [c for c in verify_package(source_dir) if not c.ok]
    if problems:
        raise RepublishError(f"{source_dir} does not verify ({problems[0].line()}); nothing published")
    meta = load_metadata(source_dir)
    # beside the real version: a link to it (or to its name folder) elsewhere published a new "<name>/1" there
    serving_dir = serving_dir or os.path.dirname(os.path.dirname(os.path.realpath(source_dir)))
    name = name or meta.name
    if version is None and name == meta.name:  # above every version of the source's own folder too: version 7
        # recalibrated into an empty serving folder was "pneumonia/1" (QA), and version 6 would have been
        # "pneumonia/7" (review), ids the shipped versions already have in every report and ledger
        found = versions(os.path.join(serving_dir, name)) + versions(os.path.dirname(os.path.realpath(source_dir)))
        version = max(found + [meta.version]) + 1
    try:
        final = new_version_dir(serving_dir, name, version)
    except PackageError as exc:
        raise RepublishError(str(exc)) from None
    version = int(os.path.basename(final))
    staging = ""
    try:
        try:
            with GATE.held():  # a signal as the folder is made: raised once `staging` names it for the cleanup
                staging = staging_dir(final, serving_dir)
        except PackageError as exc:
            raise RepublishError(str(exc)) from None
        for file in CARRIED:
            if os.path.isfile(os.path.join(source_dir, file)):
                shutil.copyfile(os.path.join(source_dir, file), os.path.join(staging, file))
        source = dict(meta.source or {}, republished_from=f"{meta.model_id} ({os.path.realpath(source_dir)})")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")  # every version made now, --add-gate too
        new = edit(dataclasses.replace(meta, name=name, version=version, source=source, created_utc=now), staging)
        write_description(staging, new)
        failed = [c for c in verify_package(staging) if not c.ok]
        if failed:
            raise RepublishError(f"the new version does not verify ({failed[0].line()}); nothing published")
        try:
            publish_version(staging, final)
        except OSError:
            raise RepublishError(f"{final} appeared meanwhile; versions are never overwritten") from None
    except BaseException:
        if staging:
            discard_staging(staging)
        raise
    log(f"published {final}")
    return final


def write_description(staging: str, meta: Metadata) -> None:
    """metadata.json and MODEL_CARD.md of a version about to be published."""
    write_metadata(os.path.join(staging, METADATA_FILE), meta)
    with open(os.path.join(staging, CARD_FILE), "w") as f:
        f.write(model_card(meta.to_dict()))


def publish_version(staging: str, final: str) -> None:
    """Rename the staging folder to its version (OSError when that appeared meanwhile: never overwritten), then
    rewrite the model's Triton config.pbtxt, which follows the newest version that is a package (a folder someone
    is still copying in has no metadata yet). The version stands once renamed: a config.pbtxt that cannot be
    written is a warning line, not a failure. A Ctrl-C or SIGTERM waits for both (xray_core.interrupts); one that came
    before, whose interrupt Python dropped (raised inside a finaliser), stops it here, before anything is renamed."""
    GATE.check()
    with GATE.deferred():
        try:
            publish_dir(staging, final)  # its lock file goes with the rename, then is deleted
            PUBLISHED.append(final)
        finally:
            release_staging(staging)
        name_dir = os.path.dirname(os.path.abspath(final))
        try:
            newest = newest_package(name_dir)
            text = triton_config(os.path.basename(name_dir), newest.image_size, heatmap=newest.heatmap_hw,
                                 embedding=newest.embedding_dim)
            atomic_write(os.path.join(name_dir, "config.pbtxt"), lambda f: f.write(text))
        except OSError as exc:
            print(f"warning: {final} is published, but {name_dir}/config.pbtxt could not be rewritten: "
                  f"{exc.strerror or exc}", file=sys.stderr)


def newest_package(name_dir: str) -> Metadata:
    """The metadata of the highest version under name_dir whose metadata.json reads (at least the one just
    published)."""
    for version in reversed(versions(name_dir)):
        try:
            return load_metadata(os.path.join(name_dir, str(version)))
        except PackageError:
            continue
    raise PackageError(f"no version under {name_dir} has a readable metadata.json")


def with_gate(meta: Metadata, staging: str, training_dir: str | None = None, log=print) -> Metadata:
    """`meta` with the input gate fitted on the training split found in training_dir (export/gate_fit.py), or,
    without one, derived from the package's reference rows alone."""
    if meta.embedding_dim is None or meta.reference is None:
        source = (meta.source or {}).get("republished_from", meta.model_id)  # the source, not the id it would get
        raise RepublishError(f"{source} has no embedding output or no reference: no gate can be derived")
    if training_dir is not None:
        return dataclasses.replace(meta, gate=training_split_gate(meta, staging, training_dir, log))
    if (meta.gate or {}).get("statistic") == gate.TRAINING_SPLIT:  # review: it published a weaker default silently
        source = (meta.source or {}).get("republished_from", meta.model_id)
        raise RepublishError(f"{source}'s gate is fitted on its training split (with its orientation check, if any): "
                             "without --training-dir it would be replaced by one derived from the reference rows "
                             "alone; give --training-dir; nothing published")
    fit_file = os.path.join(staging, gate.FIT_FILE)
    if os.path.exists(fit_file):
        os.remove(fit_file)  # the source's training-split fit, replaced by the reference-rows gate
    try:
        rows = reference.load(os.path.join(staging, reference.REFERENCE_FILE)).embeddings
        spec = gate.derive(rows)
    except (PackageError, gate.GateError) as exc:
        raise RepublishError(str(exc)) from None
    log(f"input gate: {spec.line()}")
    return dataclasses.replace(meta, gate=spec.to_dict())


def training_split_gate(meta: Metadata, staging: str, training_dir: str, log=print) -> dict:
    """The gate fitted on training_dir's images that the package's splits.csv does not list, written into
    staging; refused when their number is not the run's training split's."""
    if not os.path.isdir(training_dir):
        raise RepublishError(f"training folder not found: {training_dir}")
    try:
        paths = gate_fit.training_paths(training_dir, os.path.join(staging, reference.SPLITS_FILE))
    except gate_fit.GateFitError as exc:
        raise RepublishError(f"--training-dir: {exc}; nothing published") from None
    recorded = TrainingData.from_dict(meta.training_data).train_split_sha256
    if recorded and gate_fit.split_digest(paths, training_dir) != recorded:
        raise RepublishError(f"{training_dir} has changed since the model was exported (its training split's "
                             "files and contents are not the ones recorded): the gate would be fitted on images the "
                             "model was not trained on; nothing published")
    expected = ((meta.source or {}).get("split_counts") or {}).get("train", {}).get("images")
    if not paths or (expected is not None and len(paths) < expected):
        raise RepublishError(f"{training_dir} holds {len(paths)} images that {reference.SPLITS_FILE} does not list; "
                             f"{meta.model_id} was trained on {expected}: not its training folder; nothing published")
    if expected is None:
        log(f"input gate: {meta.model_id} records no training-split count: fitting on all {len(paths)} images of "
            f"{training_dir} that {reference.SPLITS_FILE} does not list")
    try:  # exactly `expected` of them must be readable (the images training skipped are the difference)
        trained = TrainingData.from_dict(meta.training_data).modalities or DEFAULT_MODALITIES
        validation = [os.path.join(training_dir, rel) for rel, split in
                      reference.read_splits(os.path.join(staging, reference.SPLITS_FILE)) if split == "val"]
        fitted = gate_fit.write_gate(staging, open_session(os.path.join(staging, MODEL_FILE)), paths, meta.config,
                                     expected, log, trained, validation)
    except gate_fit.GateFitError as exc:
        raise RepublishError(f"{exc}; nothing published") from None
    lost = [check for check in ("orientation", "layout") if (meta.gate or {}).get(check) and not fitted.get(check)]
    if lost:  # review: a validation image gone published a new default without its layout check, exit 0
        source = (meta.source or {}).get("republished_from", meta.model_id)  # the source, not the id it would get
        raise RepublishError(f"{source}: its gate has a {lost[0]} check that the fit on {training_dir} could not make "
                             "again (said above): the new version would be the default with a weaker gate; nothing "
                             "published")
    return fitted


def add_gate(source_dir: str, serving_dir: str | None, name: str | None, version: int | None = None, command: str = "",
             training_dir: str | None = None, log=print, publish_below_floor: bool = False) -> str:
    try:  # judged before anything is staged: a refusal costs nothing (its figures do not change with the gate)
        floor = checked_again(load_metadata(source_dir), publish_below_floor, log)
    except PackageError as exc:
        raise RepublishError(f"{source_dir}: {exc}; nothing published") from None

    def edit(meta: Metadata, staging: str) -> Metadata:
        source = dict(meta.source or {}, republish_command=command)
        return with_gate(dataclasses.replace(meta, source=source, quality_floor=floor), staging, training_dir, log)

    return republish(source_dir, serving_dir, name, edit, version, log)


def recalibrated(meta: Metadata, staging: str, origin: Metadata, cal_dir: str, target_recall: float | None,
                 log=print, modalities: tuple[str, ...] = DEFAULT_MODALITIES,
                 publish_below_floor: bool = False) -> Metadata:
    """`meta` with the decision threshold chosen on cal_dir by the staged model.onnx (export/calibrate.py, as
    `--run-dir --calibrate-dir` does), its 2-fold estimate and quality floor check (BelowQualityFloor below it,
    unless publish_below_floor), and the heatmaps' faithfulness figures measured again at that threshold on cal_dir's
    images; `origin` is the version it is recalibrated from."""
    try:
        refuse_training_folder(cal_dir, TrainingData.from_dict(origin.training_data).data_dir)
    except CalibrationError as exc:
        raise RepublishError(f"{exc}; nothing published") from None
    target = origin.target_recall if target_recall is None else target_recall
    if target is None:
        raise RepublishError(f"{origin.model_id} records no target recall: give --target-recall; nothing published")
    session = open_session(os.path.join(staging, MODEL_FILE))
    validation = origin.validation_threshold
    if validation is None and origin.threshold_source in (None, "internal validation split"):
        validation = origin.decision_threshold  # versions 1 and 2: their threshold is the validation split's
    if validation is None:
        raise RepublishError(f"{origin.model_id} records no validation threshold; nothing published")
    try:
        site, images = calibrate(session, cal_dir, meta.config, validation, target, log, min_per_class=MIN_PER_CLASS,
                                 previous_threshold=origin.decision_threshold, modalities=modalities)
    except CalibrationError as exc:
        raise RepublishError(f"{exc}; nothing published") from None
    floor = checked(measured(site, None), publish_below_floor, log)
    heat = meta.heatmap
    if meta.heatmap_output is not None:  # the faithfulness figures are of the images flagged at the threshold
        faith = faithfulness(session, images, site["threshold"], "site calibration",
                             HeatmapMethod.from_dict(meta.heatmap_method))
        heat = dict(meta.heatmap or {}, faithfulness=faith)
        if faith["flagged"]:
            log(f"faithfulness at {site['threshold']:.4f} on {faith['flagged']} flagged images: hottest 10% beat a "
                f"random 10% for {faith['share_top_beats_random']:.1%} ({'passed' if faith['passed'] else 'FAILED'}), "
                f"the average map for {faith['share_own_beats_average']:.1%}")
        else:
            log(f"faithfulness: not measured, no image of {cal_dir} flagged at {site['threshold']:.4f}")
    log(f"decision threshold {origin.decision_threshold:.4f} ({origin.model_id}) -> {site['threshold']:.4f}")
    provenance = {"model": origin.model_id, "decision_threshold": origin.decision_threshold,
                  "threshold_source": origin.threshold_source or "internal validation split",
                  "target_recall": origin.target_recall, "images": site["images"]}
    source = dict(meta.source or {}, recalibrated_from=provenance)
    if "selected_on_calibration_sample" in source:  # review: on another sample, the card's sentence no longer holds
        source["selected_on_calibration_sample"] = chosen_on(source.get("site_dir"), site)
    return dataclasses.replace(
        meta, source=source, heatmap=heat,
        decision_threshold=site["threshold"], threshold_source="site calibration sample", target_recall=target,
        validation_threshold=validation, site_calibration=site, quality_floor=floor)


def recalibrate(source_dir: str, cal_dir: str, serving_dir: str | None, name: str | None,
                target_recall: float | None = None, version: int | None = None, command: str = "", log=print,
                modalities: tuple[str, ...] = DEFAULT_MODALITIES, publish_below_floor: bool = False) -> str:
    """Publish `source_dir` again as serving_dir/name/<version> with the threshold chosen on cal_dir; -> the new
    version dir. RepublishError (nothing published) for a folder with fewer than MIN_PER_CLASS images of a class."""
    try:
        list_labelled(cal_dir, MIN_PER_CLASS)  # refuse a folder too small before any other work
    except CalibrationError as exc:
        raise RepublishError(f"{exc}; nothing published") from None

    def edit(meta: Metadata, staging: str) -> Metadata:
        meta = dataclasses.replace(meta, source=dict(meta.source or {}, republish_command=command))
        return recalibrated(meta, staging, load_metadata(source_dir), cal_dir, target_recall, log, modalities,
                            publish_below_floor)

    final = republish(source_dir, serving_dir, name, edit, version, log)
    if load_metadata(final).gate is None:
        newest = versions(os.path.dirname(final))[-1] == int(os.path.basename(final))
        log(no_gate_warning(final, newest))
    return final


def no_gate_warning(version_dir: str, newest: bool) -> str:
    """What a version without an input gate means for the job, once it is published (versions 1-4 have none)."""
    role = "as the newest version it is the batch job's default, and" if newest else "with it"
    return (f"warning: {version_dir} has no input gate, as its source had none: {role} photographs and other "
            "non-X-rays can be scored and flagged; give it one with "
            f"`python -m export --add-gate {version_dir} --training-dir DIR` or recalibrate a version with a gate")
