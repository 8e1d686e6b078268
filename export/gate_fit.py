"""The input gate fitted on the training split (xray_core/gate.py TRAINING_SPLIT), written into a package.

The training split's images are scored by the package's own graph (onnxruntime, the package's preprocessing);
the Ledoit-Wolf fit on their embeddings goes to gate.npz, and the limit comes from the distances of the package's
reference rows (reference.npz: the validation split, which neither the network nor the fit saw). The orientation
check (xray_core/orientation.py) is fitted on the same images' model inputs and goes to gate.npz too, and so does the
layout check (given the validation split's images, whose block means give its limit). Export does this
from the run's split.csv; `export --add-gate VERSION_DIR --training-dir DIR` from the training folder (its images
that the package's splits.csv does not list as validation or test).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from train.data import DataError, find_examples
from train.loading import load_images
from xray_core import gate, orientation, reference
from xray_core.dicom_header import DEFAULT_MODALITIES
from xray_core.files import content_key, sha256_file
from xray_core.package import score
from xray_core.preprocessing import OUT_OF_SCOPE, PreprocessConfig


class GateFitError(ValueError):
    """The gate cannot be fitted; the message is one line."""


class UnreadableTrainingSplit(GateFitError):
    """Fewer training-split images could be read than the run trained on (moved data, the wrong folder)."""


def training_paths(training_dir: str, splits_file: str) -> list[str]:
    """The images training found under training_dir (train.data.find_examples: the same rule) that splits.csv does
    not list: the training split. GateFitError (one line) for a folder training could not have used."""
    listed = {os.path.normpath(rel) for rel, _ in reference.read_splits(splits_file)}
    try:
        found = find_examples(training_dir)
    except DataError as exc:
        raise GateFitError(str(exc)) from None
    root = os.path.abspath(training_dir)
    return [e.path for e in found if os.path.normpath(os.path.relpath(e.path, root)) not in listed]


def split_digest(paths: list[str], training_dir: str, known: dict[str, str] | None = None) -> str:
    """sha256 over the training split's files as training_paths lists them: each one's path under training_dir and
    its content's sha256 (`known`: contents already verified, path -> sha256, not read again). Recorded at export;
    `--add-gate --training-dir` refuses a folder whose digest differs (QA: 20 training images swapped for
    never-trained ones were fitted on: only their number was checked)."""
    root, known = os.path.abspath(training_dir), known or {}
    lines = sorted(f"{os.path.relpath(p, root)}\t{known.get(p) or content_key(p)}" for p in paths)
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def model_inputs(paths: list[str], config: PreprocessConfig, expected: int | None = None,
                 log=print, modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> np.ndarray:
    """Every readable image of paths as a model input, (n, S, S, 1) float32 (unreadable ones said and left out).
    UnreadableTrainingSplit when `expected` (the run's training-split count) are not exactly what could be read."""
    images, ok, failed = load_images(paths, config, modalities=modalities)
    for path, err in failed[:5]:
        log(f"input gate: skipped {path}: {err}")
    # out of scope: a run trained before 2026-12-02 trained on such images (not missing), a later one skipped them
    refused = sum(err.startswith(OUT_OF_SCOPE) for _, err in failed)
    if expected is not None and expected not in (len(ok), len(ok) + refused):
        raise UnreadableTrainingSplit(f"{len(ok)} of {len(paths)} training-split images could be read; the run "
                                      f"trained on {expected} (moved data, not its training folder, or a run on a "
                                      "subset, --limit-per-class, whose training split the folder cannot tell)")
    if not ok:
        raise GateFitError("no image of the training split could be read (moved data?)")
    return images


def write_gate(package_dir: str, session, paths: list[str], config: PreprocessConfig, expected: int | None = None,
               log=print, modalities: tuple[str, ...] = DEFAULT_MODALITIES,
               validation_paths: list[str] | None = None) -> dict:
    """Fit the gate on the embeddings of `paths` (the training split; `expected` of them must be readable when
    given), write package_dir/gate.npz, derive the limit from package_dir's reference rows -> metadata.json's
    `gate`. With `validation_paths` (the validation split's images) the layout check too: fitted on the training
    images' block means (each image as it is, mirrored and tilted), its limit from the validation images'."""
    rows = reference.load(os.path.join(package_dir, reference.REFERENCE_FILE)).embeddings
    log(f"input gate: scoring {len(paths)} training-split images")
    images = model_inputs(paths, config, expected, log, modalities)
    try:
        spec, fitted = gate.derive_from_split(score(session, images, embedding=True).embedding, rows)
    except gate.GateError as exc:
        raise GateFitError(str(exc)) from None
    turned, figures = orientation.fit(images) if orientation.fits(config.image_size) else (None, None)
    if figures is None:
        log(f"input gate: no orientation check: image_size {config.image_size} is not a multiple of {orientation.GRID}")
    if figures is not None and not orientation.usable(figures):
        log(f"input gate: no orientation check: held out, it refuses {figures['held_out_upside_down_refused']:.1%} of "
            f"images turned 180 degrees and {figures['held_out_upright_refused']:.1%} of upright ones")
        turned = figures = None
    layout_figures, laid, layout_rows = _layout_check(images, validation_paths, len(rows), config, log, modalities)
    path = os.path.join(package_dir, gate.FIT_FILE)
    gate.write_fit(path, dataclasses.replace(fitted, orientation=turned, layout=laid), layout_rows)
    spec = gate.GateSpec(**{**spec.to_dict(), "file": gate.FIT_FILE, "sha256": sha256_file(path),
                            "orientation": figures, "layout": layout_figures})
    log(f"input gate: {spec.line()}")
    return spec.to_dict()


def _layout_check(images: np.ndarray, validation_paths: list[str] | None, reference_rows: int,
                  config: PreprocessConfig, log, modalities: tuple[str, ...]):
    """The layout check (xray_core/gate.py derive_layout) on the training images and every image of the validation
    split (the reference's rows: a part of them would give another limit than the package's validation split does)
    -> (its figures, the fitted check, its validation rows), or three Nones, said, where it cannot be fitted."""
    if not validation_paths:
        return None, None, None
    if not orientation.fits(config.image_size):
        log(f"input gate: no layout check: image_size {config.image_size} is not a multiple of {orientation.GRID}")
        return None, None, None
    validation, ok, _ = load_images(validation_paths, config, modalities=modalities)
    if len(ok) != reference_rows:  # moved away, or changed since: the package goes without it, said
        log(f"input gate: no layout check: {len(ok)} of {len(validation_paths)} validation-split images could be "
            f"read, the reference has {reference_rows}")
        return None, None, None
    try:
        return gate.derive_layout(images, validation)
    except gate.GateError as exc:
        log(f"input gate: no layout check: {exc}")
        return None, None, None
