"""Distillation (train --teacher): a published package's probabilities mixed into the training labels."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from helpers import assert_one_line_error
from train.distill import TeacherError, soft_labels, teacher_probabilities
from xray_core.package import load_metadata, open_session, score
from xray_core.preprocessing import PreprocessConfig

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "serving_models", "pneumonia", "5")


def _images(n=16, size=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def test_soft_labels_mix_the_folder_label_and_the_teacher():
    y = np.array([0, 1, 1, 0], np.float32)
    teacher = np.array([0.2, 0.9, 0.4, 0.0])
    np.testing.assert_allclose(soft_labels(y, teacher, 0.5), [0.1, 0.95, 0.7, 0.0], atol=1e-7)
    np.testing.assert_array_equal(soft_labels(y, teacher, 0.0), y)
    np.testing.assert_allclose(soft_labels(y, teacher, 1.0), teacher, atol=1e-7)
    assert soft_labels(y, teacher, 0.3).dtype == np.float32
    with pytest.raises(TeacherError, match=r"\[0, 1\]"):
        soft_labels(y, teacher, 1.5)


def test_teacher_probabilities_are_the_packages_scores():
    x = _images()
    meta = load_metadata(SHIPPED)
    got = teacher_probabilities(SHIPPED, x, meta.config)
    want = score(open_session(os.path.join(SHIPPED, "model.onnx"), 1), x).probability
    assert got.shape == (16,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.ptp(got) > 0  # not a constant


def test_a_teacher_that_preprocesses_otherwise_is_refused():
    with pytest.raises(TeacherError, match="--image-size"):
        teacher_probabilities(SHIPPED, _images(size=32), PreprocessConfig(image_size=32))


def test_distilled_training_labels_reach_the_fit():
    from train.trainers import distilled

    x, y = _images(8), np.array([0, 1] * 4, np.float32)
    args = argparse.Namespace(teacher=SHIPPED, teacher_weight=0.25, image_size=64, crop_bands=False)
    x2, soft = distilled(args, (x, y))
    assert x2 is x
    teacher = teacher_probabilities(SHIPPED, x, PreprocessConfig(image_size=64))
    np.testing.assert_allclose(soft, 0.75 * y + 0.25 * teacher, atol=1e-6)


def test_a_run_with_crop_bands_distils_from_a_teacher_with_them(tmp_path):
    """Review: the teacher's probabilities were asked for without the run's --crop-bands, and a teacher that crops
    them (the only one such a run may have) was refused mid-training."""
    from helpers import write_package
    from train.trainers import distilled

    teacher = write_package(str(tmp_path / "serving"), preprocessing={"crop_bands": True})
    x, y = _images(8, size=32), np.array([0, 1] * 4, np.float32)
    args = argparse.Namespace(teacher=teacher, teacher_weight=0.5, image_size=32, crop_bands=True)
    _, soft = distilled(args, (x, y))
    want = score(open_session(os.path.join(teacher, "model.onnx"), 1), x).probability
    np.testing.assert_allclose(soft, 0.5 * y + 0.5 * want, atol=1e-6)
    with pytest.raises(TeacherError, match="preprocesses as"):
        distilled(argparse.Namespace(**{**vars(args), "crop_bands": False}), (x, y))


def _args(data, out, *extra):
    return ["--data-dir", str(data), "--output-dir", str(out), "--epochs", "1", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (("--teacher", "serving_models/pneumonia/999"), "--teacher: "),
    (("--teacher", SHIPPED, "--models", "baseline_cnn"), "--teacher distils into resnet_aug only"),
    (("--teacher", SHIPPED), "was not validated and tested on this run's validation and test images"),
    (("--teacher", SHIPPED, "--image-size", "32"), "pass --image-size 64"),
    (("--teacher", SHIPPED, "--teacher-weight", "1.5"), "--teacher-weight must be in [0, 1]"),
    (("--teacher", "SWAPPED"), "does not verify: "),
])
def test_cli_refuses_a_teacher_it_cannot_use(tmp_path, capsys, extra, fragment):
    if extra[1] == "SWAPPED":  # QA: a teacher whose model.onnx was swapped since it was published taught the student
        import shutil

        shutil.copytree(SHIPPED, tmp_path / "swapped")
        shutil.copy(os.path.join(SHIPPED, "..", "2", "model.onnx"), tmp_path / "swapped" / "model.onnx")
        extra = ("--teacher", str(tmp_path / "swapped"))
    from train.__main__ import main as train_main

    make_tree(str(tmp_path / "data"), per_class=6, size=48, seed=1)  # 3 patients a class: a split can be made
    assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", *extra)), fragment)
    assert sorted(os.listdir(tmp_path)) == ["data"] + ["swapped"] * (fragment == "does not verify: ")


def test_soft_labels_are_weighted_by_their_folder_labels_not_by_rounding():
    """Keras's class_weight would round a soft label to pick its class (0.5 -> NORMAL for a PNEUMONIA image the
    teacher doubts): with folder labels the dataset carries each image's own class weight."""
    tf = pytest.importorskip("tensorflow")
    from train.fit import class_weights, make_dataset, sample_weights

    x = _images(6, size=8)
    folder = np.array([1, 1, 1, 1, 0, 0], np.float32)
    soft = soft_labels(folder, np.array([0.0, 1.0, 0.9, 0.8, 0.0, 1.0]), 0.5)  # 0.5 for the first image
    cw = class_weights(folder)
    (xb, yb, wb), = list(make_dataset(x, soft, 6, False, 0, None, sample_weights(folder)))
    np.testing.assert_allclose(yb.numpy(), soft)
    np.testing.assert_allclose(wb.numpy(), [cw[1]] * 4 + [cw[0]] * 2)
    assert cw[0] != cw[1] and tf.is_tensor(wb)
