"""Distillation targets: a published package's probabilities on the training split as soft labels.

The teacher is scored with onnxruntime from its package (no TensorFlow model, nothing pickled), on the same
preprocessed arrays the student trains on, so the teacher's preprocessing must be the run's. The student's
training label becomes (1 - weight) * folder label + weight * teacher probability; validation, test and site
labels stay the folder's.
"""
from __future__ import annotations

import os

import numpy as np

from xray_core.package import PackageError, load_metadata, open_session, resolve_version_dir, score
from xray_core.preprocessing import PreprocessConfig
from xray_core.reference import SPLITS_FILE, read_splits, training_folder


class TeacherError(ValueError):
    """A teacher package that cannot label this run's inputs (one line)."""


def check_teacher(teacher: str, weight: float, config: PreprocessConfig) -> None:
    """Before any work: the teacher is a published package that verifies (xray_core.verify) and preprocesses as this
    run does, weight in [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise TeacherError(f"--teacher-weight must be in [0, 1], got {weight}")
    try:
        version_dir = resolve_version_dir(teacher)
        meta = load_metadata(version_dir)
    except PackageError as exc:
        raise TeacherError(f"--teacher: {exc}") from None
    from xray_core.verify import verify_package

    failed = [c for c in verify_package(version_dir) if not c.ok]
    if failed:  # a model.onnx swapped or damaged since it was published would teach another model
        raise TeacherError(f"--teacher {version_dir} does not verify: {failed[0].line()}")
    if meta.config.image_size != config.image_size:
        raise TeacherError(f"--teacher {teacher} takes {meta.image_size} px inputs: pass --image-size "
                           f"{meta.image_size}")
    if meta.config != config:
        crop = "pass --crop-bands" if meta.config.crop_bands else "leave out --crop-bands"
        raise TeacherError(f"--teacher {teacher} preprocesses as {meta.config.to_dict()}: {crop}")


def check_teacher_split(teacher: str, paths: list[str], splits: list[str]) -> None:
    """The teacher's validation and internal test images (its splits.csv) must be this run's: a teacher that trained on
    them would leak them into the student, and the student's threshold and test metrics would be optimistic."""
    root = training_folder(paths)
    held = {(os.path.normpath(os.path.relpath(p, root)), s) for p, s in zip(paths, splits) if s != "train"}
    path = os.path.join(resolve_version_dir(teacher), SPLITS_FILE)
    theirs = {(os.path.normpath(f), s) for f, s in read_splits(path)} if os.path.isfile(path) else set()
    if theirs != held:
        raise TeacherError(f"--teacher {teacher} was not validated and tested on this run's validation and test images "
                           f"({len(theirs & held)} of {len(held)} in common): train with its --seed and --split")


def teacher_probabilities(package: str, images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """P(pneumonia) of the package at `package` for preprocessed images (N, S, S, 1) -> (N,) float64."""
    version_dir = resolve_version_dir(package)
    meta = load_metadata(version_dir)
    if meta.config != config:
        raise TeacherError(f"teacher {version_dir} preprocesses as {meta.config.to_dict()}, this run as "
                           f"{config.to_dict()}: train at the teacher's --image-size")
    session = open_session(f"{version_dir}/model.onnx")
    return score(session, images, batch_size=64).probability.astype(np.float64)


def soft_labels(labels: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * labels + weight * teacher, float32; weight in [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise TeacherError(f"--teacher-weight must be in [0, 1], got {weight}")
    return ((1.0 - weight) * labels + weight * teacher).astype(np.float32)
