"""Export refuses an incomplete run with one line (exit 2) before any work, not with a traceback or exit 1 (QA,
2026-12-01): run.json that is not JSON, a metrics.json without the keys export reads, a split no image of which can
be read, a calibration folder of one patient a class. No training needed: the runs are written here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from export.convert import METRICS_KEYS, ExportInputError, parity_images, read_run
from xray_core.preprocessing import PreprocessConfig


def fake_run(root, run_json: str = "{}", metrics: dict | None = None, split_rows: list[str] = ()) -> str:
    """A run folder as `python -m train` lays it out, minus the model file."""
    run = root / "run"
    (run / "baseline_cnn").mkdir(parents=True)
    (run / "comparison.json").write_text(json.dumps({"best": "baseline_cnn", "models": [{"model": "baseline_cnn"}]}))
    (run / "run.json").write_text(run_json)
    (run / "split.csv").write_text("\n".join(["path,label,split,patient", *split_rows]) + "\n")
    full = {"preprocessing": PreprocessConfig(image_size=32).to_dict(), "chosen_threshold": 0.5, "target_recall": 0.95}
    (run / "baseline_cnn" / "metrics.json").write_text(json.dumps(full if metrics is None else metrics))
    return str(run)


def test_a_complete_run_is_read(tmp_path):
    name, metrics, comparison, run_info = read_run(fake_run(tmp_path, run_json='{"argv": []}'), "best")
    assert name == "baseline_cnn" and metrics["chosen_threshold"] == 0.5 and run_info == {"argv": []}


def test_run_json_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(ExportInputError, match=r"run\.json is unreadable \(not JSON\)"):
        read_run(fake_run(tmp_path, run_json="{truncated"), "best")


@pytest.mark.parametrize("key", METRICS_KEYS)
def test_metrics_without_a_key_export_reads_is_refused(tmp_path, key):
    metrics = {"preprocessing": {}, "chosen_threshold": 0.5, "target_recall": 0.95}
    del metrics[key]
    with pytest.raises(ExportInputError, match=f"metrics.json lacks {key}$"):
        read_run(fake_run(tmp_path, metrics=metrics), "best")


def test_a_split_no_image_of_which_can_be_read_is_an_input_error_not_a_parity_failure(tmp_path):
    """An empty split once passed parity on 0 images and published; moved data was exit 1, kept for disagreement."""
    config = PreprocessConfig(image_size=32)
    with pytest.raises(ExportInputError, match=r"parity needs 1 images of the run's split \(0 listed"):
        parity_images(fake_run(tmp_path / "empty"), config)
    moved = [f"{tmp_path}/gone/{i}.png,NORMAL,test,p{i}" for i in range(3)]
    with pytest.raises(ExportInputError, match=r"parity needs 3 images .* \(3 listed in split\.csv\) but only 0"):
        parity_images(fake_run(tmp_path / "moved", split_rows=moved), config)
    here = tmp_path / "img.png"
    Image.fromarray(np.add.outer(np.arange(40), np.arange(40)).astype(np.uint8)).save(here)
    x, n = parity_images(fake_run(tmp_path / "ok", split_rows=[f"{here},NORMAL,test,p1"]), config)
    assert n == 1 and x.shape == (3, 32, 32, 1)  # the image, then all-zeros and all-ones


def test_a_calibration_folder_of_one_patient_a_class_is_refused(tmp_path):
    """QA: 1 image a class crashed in scikit-learn's StratifiedGroupKFold (n_splits=2) with a traceback."""
    from export.calibrate import CalibrationError, calibrate
    from helpers import textured, write_package
    from xray_core.package import open_session

    vdir = write_package(str(tmp_path / "serving"), image_size=32)
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "cal" / label).mkdir(parents=True)
        textured((48, 48), 90 if label == "NORMAL" else 200).save(tmp_path / "cal" / label / "one.png")
    with pytest.raises(CalibrationError, match="images of fewer than 2 patients of NORMAL, PNEUMONIA"):
        calibrate(open_session(os.path.join(vdir, "model.onnx")), str(tmp_path / "cal"), PreprocessConfig(32), 0.5,
                  0.95)
