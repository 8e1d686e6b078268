"""Export refuses an incomplete run with one line (exit 2) before any work, not with a traceback or exit 1 (QA,
2026-12-01): run.json that is not JSON, a metrics.json without the keys export reads, a split no image of which can
be read, a calibration folder of one patient a class. No training needed: the runs are written here."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from export.__main__ import main as export_main
from export.convert import ExportInputError, parity_images, read_run
from export.run_dir import METRICS_KEYS
from helpers import assert_one_line_error, sha256_of
from xray_core.preprocessing import PreprocessConfig


def fake_run(root, run_json: str = "{}", metrics: dict | None = None, split_rows: list[str] = ()) -> str:
    """A run folder as `python -m train` lays it out, minus the model file."""
    run = root / "run"
    (run / "baseline_cnn").mkdir(parents=True)
    (run / "comparison.json").write_text(json.dumps({"best": "baseline_cnn", "models": [{"model": "baseline_cnn"}]}))
    (run / "run.json").write_text(run_json)
    (run / "split.csv").write_text("\n".join(["path,label,split,patient", *split_rows]) + "\n")
    at = {"roc_auc": 0.99, "recall": 0.96}  # above the quality floor
    full = {"preprocessing": PreprocessConfig(image_size=32).to_dict(), "chosen_threshold": 0.5, "target_recall": 0.95,
            "val_roc_auc": 0.99, "test_at_0.5": at, "test_at_chosen": at}
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
    metrics = {k: {} for k in METRICS_KEYS}
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


def _run_with_recorded_contents(tmp_path) -> tuple[str, list[str]]:
    """A fake run whose split.csv records its three images' sha256, as train writes it since 2026-12-02, and whose
    run.json names its data folder."""
    images = []
    for i, label in enumerate(["NORMAL", "PNEUMONIA", "NORMAL"]):
        path = tmp_path / "data" / label / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40), 60 + 40 * i, np.uint8)).save(path)
        images.append(str(path))
    run = fake_run(tmp_path, run_json=json.dumps({"data_dir": str(tmp_path / "data"), "args": {}}))
    with open(os.path.join(run, "split.csv"), "w") as f:
        f.write("path,label,split,patient,sha256\n")
        for path, split in zip(images, ["train", "val", "test"]):
            f.write(f"{path},{os.path.basename(os.path.dirname(path))},{split},p{split},{sha256_of(path)}\n")
    return run, images


@pytest.mark.parametrize("change, counts", [("rewritten", "0 missing and 1 changed"),
                                            ("removed", "1 missing and 0 changed")])
def test_images_changed_since_training_are_refused_before_any_work(tmp_path, capsys, change, counts):
    run, images = _run_with_recorded_contents(tmp_path)
    if change == "rewritten":  # e.g. a rescan saved over the file, or another image copied in under its name
        Image.fromarray(np.full((40, 40), 200, np.uint8)).save(images[1])
    else:
        os.remove(images[1])
    rc = export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")])
    line = assert_one_line_error(capsys, rc, f"{counts} of the 3 images of {run}/split.csv since the run trained "
                                 f"(first: {images[1]!r})", "nothing published")
    assert "mounted elsewhere" not in line
    assert not (tmp_path / "serving").exists()


def test_a_data_folder_moved_away_is_named_as_such(tmp_path, capsys):
    run, _ = _run_with_recorded_contents(tmp_path)
    os.rename(tmp_path / "data", tmp_path / "moved")
    rc = export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")])
    assert_one_line_error(capsys, rc, "3 missing and 0 changed of the 3 images",
                          "(the data moved, or is mounted elsewhere?)", "nothing published")


def test_a_file_name_with_a_newline_stays_one_line(tmp_path, capsys):
    run, images = _run_with_recorded_contents(tmp_path)
    odd = os.path.join(os.path.dirname(images[0]), "a\nb.png")  # review: a raw path split the error in two
    with open(os.path.join(run, "split.csv"), "a", newline="") as f:
        csv.writer(f).writerow([odd, "NORMAL", "train", "pz", "0" * 64])
    rc = export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")])
    assert_one_line_error(capsys, rc, "1 missing and 0 changed of the 4 images", repr(odd))


def test_images_added_to_the_data_folder_since_training_are_refused(tmp_path, capsys):
    """Review: export's training-split digest lists the folder, so an image added after training was counted, and a
    later `--add-gate --training-dir` would fit the gate on it. Images the run skipped (undecodable) are no addition,
    nor are the rest of the folder for a run on a subset (--limit-per-class)."""
    run, images = _run_with_recorded_contents(tmp_path)
    skipped = os.path.join(os.path.dirname(images[1]), "corrupt.png")
    with open(skipped, "wb") as f:
        f.write(b"not a png")
    with open(os.path.join(run, "comparison.json"), "w") as f:
        json.dump({"best": "baseline_cnn", "models": [{"model": "baseline_cnn"}],
                   "skipped_images": [{"path": skipped, "error": "cannot decode"}]}, f)
    assert export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")]) == 2
    assert "model file not found" in capsys.readouterr().err  # the skipped file is no addition: the next step
    added = os.path.join(os.path.dirname(images[0]), "new.png")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(added)
    rc = export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")])
    assert_one_line_error(capsys, rc, f"1 images in {tmp_path / 'data'} were added since the run trained "
                          f"(first: {added!r})", "nothing published")
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump({"data_dir": str(tmp_path / "data"), "args": {"limit_per_class": 1}}, f)
    assert export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")]) == 2
    assert "model file not found" in capsys.readouterr().err  # a subset run's folder holds more by design


def test_unchanged_images_and_runs_from_before_the_check_go_on(tmp_path, capsys):
    run, images = _run_with_recorded_contents(tmp_path)
    assert export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")]) == 2
    captured = capsys.readouterr()
    assert "model file not found" in captured.err and "not checked" not in captured.out  # no model: the next step
    with open(os.path.join(run, "split.csv")) as f:  # the same run as written before split.csv had the column
        rows = [line.rsplit(",", 1)[0] for line in f.read().splitlines()]
    with open(os.path.join(run, "split.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    os.remove(images[1])
    assert export_main(["--run-dir", run, "--serving-dir", str(tmp_path / "serving")]) == 2
    captured = capsys.readouterr()
    assert "model file not found" in captured.err  # not checked: nothing recorded to check against, and said
    assert f"{run}/split.csv records no image contents (a run from before 2026-12-02)" in captured.out
