"""`python -m export --recalibrate`: a published package published again with the threshold chosen on a labelled
local folder (JPEG, PNG or DICOM), without TensorFlow or the training run, on the tests' tiny ONNX model."""
from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from batch_job.synthetic import make_tree, synthetic_xray
from export.__main__ import main as export_main
from export.calibrate import list_labelled
from export.faithfulness import faithfulness
from export.triton import triton_config
from helpers import REPO, SITE_SAMPLE, assert_one_line_error, read_json, sha256_of, snapshot, write_package
from xray_core.labels import CLASSES
from xray_core.metrics import choose_threshold, operating_point, without_report
from xray_core.package import load_metadata, open_session, versions
from xray_core.preprocessing import PreprocessConfig, preprocess_image
from xray_core.verify import verify_package

CARRIED_FILES = ("model.onnx", "reference.npz", "splits.csv")
SITE_KEYS = {"dir", "images", "normal", "pneumonia", "patients", "skipped", "target_recall", "modalities", "threshold",
             "at_0.5",
             "at_validation_threshold", "at_calibrated_threshold", "two_fold"}  # what export --calibrate-dir writes


def _source(serving) -> str:
    """pneumonia/2: the tiny model with a heatmap, an embedding, a drift reference and an input gate (added by
    --add-gate), its threshold and heatmap figures as an export from the internal validation split records them."""
    images = np.random.default_rng(0).uniform(0.2, 0.8, (120, 32, 32, 1)).astype(np.float32)
    v1 = write_package(str(serving), reference_images=images, heatmap_hw=(4, 4))
    path = os.path.join(v1, "metadata.json")
    meta = read_json(path)
    meta.update(validation_threshold=0.5, threshold_source="internal validation split",
                heatmap={"parity": {"images": 66, "max_abs_diff": 2e-6, "map_range": 1.0, "tolerance": 1e-4,
                                    "passed": True},
                         "faithfulness": {"source": "test split", "images": 10, "flagged": 0, "passed": False,
                                          "share_top_beats_random": None, "note": "no image flagged"}})
    with open(path, "w") as f:
        json.dump(meta, f)
    assert export_main(["--add-gate", v1, "--serving-dir", str(serving)]) == 0
    return os.path.join(str(serving), "pneumonia", "2")


def _scores(vdir: str, paths: list[str]) -> np.ndarray:
    """P(pneumonia) of the files by the package's model, outside the code under test."""
    meta = load_metadata(vdir)
    x = np.stack([preprocess_image(p, meta.config) for p in paths])
    (p,) = open_session(os.path.join(vdir, "model.onnx")).run(["probability"], {"image": x})
    return p.reshape(-1).astype(np.float64)


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    base = tmp_path_factory.mktemp("recal")
    serving = base / "serving"
    source = _source(serving)
    cal = base / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)
    before = snapshot(source)
    rc = export_main(["--recalibrate", source, "--calibrate-dir", str(cal), "--serving-dir", str(serving)])
    return {"rc": rc, "source": source, "new": str(serving / "pneumonia" / "3"), "cal": cal, "before": before,
            "serving": serving}


def test_a_new_version_with_the_same_model_and_the_threshold_chosen_on_the_folder(recalibrated):
    assert recalibrated["rc"] == 0
    source, new = recalibrated["source"], recalibrated["new"]
    for f in CARRIED_FILES:
        assert sha256_of(os.path.join(new, f)) == sha256_of(os.path.join(source, f)), f
    assert snapshot(source) == recalibrated["before"]  # the source version is untouched
    old, meta = read_json(os.path.join(source, "metadata.json")), read_json(os.path.join(new, "metadata.json"))
    found = list_labelled(str(recalibrated["cal"]))
    y = np.array([CLASSES.index(label) for _, label in found])
    p = _scores(source, [path for path, _ in found])
    assert meta["version"] == 3 and meta["sha256"] == old["sha256"]
    assert meta["target_recall"] == old["target_recall"] == 0.95  # the source version's by default
    assert meta["decision_threshold"] == pytest.approx(choose_threshold(y, p, 0.95), abs=1e-6)
    assert meta["decision_threshold"] != pytest.approx(old["decision_threshold"], abs=1e-3)
    assert meta["threshold_source"] == "site calibration sample"
    # the gate, the drift reference and everything else but the calibration are carried over as they were
    changed = {"version", "source", "decision_threshold", "threshold_source", "site_calibration", "quality_floor",
               "heatmap", "created_utc"}
    assert {k: v for k, v in meta.items() if k not in changed} == {k: v for k, v in old.items() if k not in changed}
    assert meta["gate"] == old["gate"] and meta["reference"] == old["reference"]
    assert meta["source"]["recalibrated_from"] == {
        "model": "pneumonia/2", "decision_threshold": 0.5, "threshold_source": "internal validation split",
        "target_recall": 0.95, "images": 64}
    assert "--recalibrate" in meta["source"]["republish_command"]
    assert meta["source"]["republished_from"].startswith("pneumonia/2 (")
    assert all(c.ok for c in verify_package(new)), [c.line() for c in verify_package(new)]


def test_the_calibration_block_has_export_s_format_and_the_sample_s_numbers(recalibrated):
    meta = read_json(os.path.join(recalibrated["new"], "metadata.json"))
    site = meta["site_calibration"]
    assert set(site) == SITE_KEYS | {"at_previous_threshold"}
    found = list_labelled(str(recalibrated["cal"]))
    y = np.array([CLASSES.index(label) for _, label in found])
    p = _scores(recalibrated["source"], [path for path, _ in found])
    assert (site["images"], site["normal"], site["pneumonia"], site["skipped"]) == (64, 32, 32, [])
    assert site["patients"] == 32  # make_tree names two images per patient
    assert site["dir"] == os.path.abspath(recalibrated["cal"])
    assert site["threshold"] == meta["decision_threshold"] and site["target_recall"] == 0.95
    for key, thr in (("at_0.5", 0.5), ("at_validation_threshold", 0.5), ("at_previous_threshold", 0.5),
                     ("at_calibrated_threshold", site["threshold"])):
        expected = without_report(operating_point(y, p, thr))
        assert site[key].pop("confusion_matrix") == expected.pop("confusion_matrix"), key
        assert site[key] == pytest.approx(expected), key
    assert site["at_calibrated_threshold"]["recall"] >= 0.95
    est = site["two_fold"]
    assert sum(f["eval_images"] for f in est["folds"]) == 64
    for key in ("recall", "specificity", "accuracy", "roc_auc"):
        lo, hi = est[f"{key}_ci95"]
        assert 0 <= lo <= est[key] <= hi <= 1, key


def test_faithfulness_is_measured_again_at_the_new_threshold_on_the_folder(recalibrated):
    meta = read_json(os.path.join(recalibrated["new"], "metadata.json"))
    old = read_json(os.path.join(recalibrated["source"], "metadata.json"))
    heat = meta["heatmap"]
    assert heat["parity"] == old["heatmap"]["parity"]  # a property of the model: carried over
    found = list_labelled(str(recalibrated["cal"]))
    p = _scores(recalibrated["source"], [path for path, _ in found])
    faith = heat["faithfulness"]
    assert faith["threshold"] == meta["decision_threshold"] and faith["source"] == "site calibration"
    assert faith["images"] == 64 and faith["flagged"] == int((p >= meta["decision_threshold"]).sum()) > 0
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    x = np.stack([preprocess_image(path, config) for path, _ in found])
    session = open_session(os.path.join(recalibrated["new"], "model.onnx"))
    assert faith == faithfulness(session, x, meta["decision_threshold"], "site calibration")
    assert faith["passed"] is True  # the tiny model's map is its input: blanking the brightest pixels lowers P


def test_the_model_card_says_where_the_version_came_from(recalibrated):
    meta = read_json(os.path.join(recalibrated["new"], "metadata.json"))
    card = open(os.path.join(recalibrated["new"], "MODEL_CARD.md")).read()
    est = meta["site_calibration"]["two_fold"]
    assert "**Recalibrated** from pneumonia/2 (threshold 0.5000, chosen on the internal validation split)" in card
    assert "on 64 labelled images (32 normal, 32 pneumonia)" in card
    assert f"**Decision threshold:** {meta['decision_threshold']:.4f}" in card
    assert f"recall {est['recall']:.3f} (95% CI {est['recall_ci95'][0]:.3f}–{est['recall_ci95'][1]:.3f})" in card
    assert "| 0.5000 (pneumonia/2's) |" in card
    assert f"on {meta['heatmap']['faithfulness']['flagged']} images of the site calibration flagged at " \
           f"{meta['decision_threshold']:.4f}" in card
    assert meta["source"]["republish_command"] in card and "## Licence" in card


def test_export_verify_passes_the_new_version(recalibrated, capsys):
    assert export_main(["--verify", recalibrated["new"]]) == 0
    assert f"OK: {recalibrated['new']}" in capsys.readouterr().out


# ------------------------------------------------------------------ DICOM

def _dicom_tree(root, per_class: int) -> dict[str, str]:
    """ROOT/{NORMAL,PNEUMONIA}/<SOP UID>.dcm, two files per patient (PatientID in the header only); -> path:
    PatientID."""
    import pydicom
    from pydicom.uid import generate_uid

    from dicom_factory import dicom_bytes

    rng = np.random.default_rng(11)
    patients = {}
    for label in CLASSES:
        os.makedirs(os.path.join(root, label))
        for i in range(per_class):
            pixels = np.asarray(synthetic_xray(rng, label == "PNEUMONIA", 48))
            ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
            ds.PatientID = f"{label[0]}{i // 2:04d}"
            path = os.path.join(root, label, f"{generate_uid()}.dcm")
            ds.save_as(path, enforce_file_format=True)
            patients[path] = ds.PatientID
    return patients


def test_a_dicom_folder_with_a_target_recall_of_its_own(tmp_path, capsys):
    serving = tmp_path / "serving"
    source = _source(serving)
    patients = _dicom_tree(str(tmp_path / "dicom"), per_class=30)
    rc = export_main(["--recalibrate", source, "--calibrate-dir", str(tmp_path / "dicom"), "--target-recall", "0.8",
                      "--serving-dir", str(serving), "--name", "local", "--publish-below-floor"])
    assert rc == 0, capsys.readouterr()  # the test model does not rank these synthetic DICOMs: below the floor
    new = serving / "local" / "1"  # another name starts at version 1, with its own Triton config
    assert 'name: "local"' in (serving / "local" / "config.pbtxt").read_text()
    meta = read_json(new / "metadata.json")
    site = meta["site_calibration"]
    assert (site["images"], site["normal"], site["pneumonia"]) == (60, 30, 30)
    assert site["patients"] == len(set(patients.values())) == 30  # from the headers, not the UID file names
    assert meta["target_recall"] == site["target_recall"] == 0.8
    paths = sorted(patients)
    y = np.array([int("/PNEUMONIA/" in p) for p in paths])
    p = _scores(source, paths)
    assert meta["decision_threshold"] == pytest.approx(choose_threshold(y, p, 0.8), abs=1e-6)
    assert meta["name"] == "local" and meta["version"] == 1
    assert all(c.ok for c in verify_package(str(new)))
    out = capsys.readouterr().out
    assert "calibrated on 60 images" in out
    assert meta["quality_floor"]["met"] is False and meta["quality_floor"]["roc_auc"] < 0.95
    assert "below the quality floor" in out and "--publish-below-floor: it is published if every other check" in out
    card = (new / "MODEL_CARD.md").read_text()
    assert "**Below the quality floor:** site calibration, 2-fold estimate: ROC AUC" in card


def test_a_sample_the_model_does_not_rank_is_refused_below_the_quality_floor(tmp_path, capsys):
    serving = tmp_path / "serving"
    source = _source(serving)
    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)  # the sample the module's fixture calibrates on, classes swapped
    os.rename(cal / "NORMAL", cal / "swap")
    os.rename(cal / "PNEUMONIA", cal / "NORMAL")
    os.rename(cal / "swap", cal / "PNEUMONIA")
    before = snapshot(str(serving))
    rc = export_main(["--recalibrate", source, "--calibrate-dir", str(cal)])
    assert_one_line_error(capsys, rc, "site calibration, 2-fold estimate: ROC AUC 0.",
                          "< 0.95: below the quality floor", "nothing published", code=1)
    assert snapshot(str(serving)) == before  # no version 3, no staging folder, config.pbtxt untouched


def test_without_serving_dir_and_name_the_new_version_goes_beside_its_source(tmp_path, monkeypatch):
    """QA: --recalibrate without --serving-dir published ./serving_models/pneumonia/1 under the working directory,
    an id a ledger already knew for the shipped model."""
    serving = tmp_path / "serving"
    source = _source(serving)
    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert export_main(["--recalibrate", source, "--calibrate-dir", str(cal)]) == 0
    assert sorted(os.listdir(serving / "pneumonia")) == ["1", "2", "3", "config.pbtxt"]
    assert os.listdir(elsewhere) == [] and load_metadata(str(serving / "pneumonia" / "3")).model_id == "pneumonia/3"


def test_into_an_empty_serving_folder_the_new_version_follows_its_sources_folder(recalibrated, tmp_path, capsys):
    """QA: version 7 recalibrated into an empty --serving-dir was published as pneumonia/1, the id of the shipped
    version 1 in every report and ledger (and version 6 would have been pneumonia/7, review). Under the source's
    name the default is above the source's number and every version of its folder and of the target; under
    another name, or with --version, as asked."""
    source, cal = recalibrated["source"], str(recalibrated["cal"])  # pneumonia/2 of a folder holding 1, 2 and 3
    assert versions(str(recalibrated["serving"] / "pneumonia")) == [1, 2, 3]
    fresh = tmp_path / "fresh"
    assert export_main(["--recalibrate", source, "--calibrate-dir", cal, "--serving-dir", str(fresh)]) == 0
    assert versions(str(fresh / "pneumonia")) == [4] and load_metadata(str(fresh / "pneumonia" / "4")).version == 4
    assert export_main(["--recalibrate", source, "--calibrate-dir", cal, "--serving-dir", str(fresh)]) == 0
    assert versions(str(fresh / "pneumonia")) == [4, 5]  # the highest + 1 above it
    assert export_main(["--add-gate", source, "--serving-dir", str(fresh), "--version", "1"]) == 0
    assert export_main(["--recalibrate", source, "--calibrate-dir", cal, "--serving-dir", str(fresh),
                        "--name", "site_b"]) == 0
    assert versions(str(fresh / "pneumonia")) == [1, 4, 5] and versions(str(fresh / "site_b")) == [1]
    older = str(recalibrated["serving"] / "pneumonia" / "1")  # review: version 1 of a folder whose newest is 3
    other = tmp_path / "other"
    assert export_main(["--recalibrate", older, "--calibrate-dir", cal, "--serving-dir", str(other)]) == 0
    assert versions(str(other / "pneumonia")) == [4]  # not 2, the id its own folder's version 2 already has


def test_a_half_copied_newest_folder_does_not_fail_a_publish(source_package, tmp_path, capsys):
    """QA: a folder 20/ holding only model.onnx (someone copying a version in) made --recalibrate crash with a
    traceback (exit 1) after publishing, config.pbtxt not rewritten. config.pbtxt now follows the newest version that
    is a package."""
    name_dir = tmp_path / "serving" / "pneumonia"
    (name_dir / "20").mkdir()
    shutil.copy(os.path.join(source_package, "model.onnx"), name_dir / "20" / "model.onnx")
    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--version", "8"]) == 0
    assert load_metadata(str(name_dir / "8")).model_id == "pneumonia/8"
    assert "Traceback" not in capsys.readouterr().err
    with open(name_dir / "config.pbtxt") as f:
        assert 'name: "pneumonia"' in f.read()
    assert os.path.getmtime(name_dir / "config.pbtxt") >= os.path.getmtime(name_dir / "8")


# ------------------------------------------------------------------ refusals

@pytest.fixture()
def source_package(tmp_path):
    return _source(tmp_path / "serving")


def _refused(capsys, tmp_path, argv, *fragments, code=2):
    serving = tmp_path / "serving"
    before = snapshot(serving)
    line = assert_one_line_error(capsys, export_main(argv), *fragments, code=code)
    assert snapshot(serving) == before  # nothing published, nothing half-written
    return line


def test_fewer_than_30_images_of_a_class_are_refused(source_package, tmp_path, capsys):
    cal = tmp_path / "small"
    make_tree(str(cal), per_class=40, size=48, seed=4)
    for path in sorted((cal / "NORMAL").iterdir())[29:]:
        path.unlink()
    line = _refused(capsys, tmp_path, ["--recalibrate", source_package, "--calibrate-dir", str(cal),
                                       "--serving-dir", str(tmp_path / "serving")],
                    "has 29 NORMAL and 40 PNEUMONIA images; at least 30 of each class are needed",
                    "nothing published")
    assert line.startswith(f"error: calibration dir {cal} ")


def test_fewer_than_30_decodable_images_of_a_class_are_refused_after_scoring(source_package, tmp_path, capsys):
    cal = tmp_path / "damaged"
    make_tree(str(cal), per_class=30, size=48, seed=5)
    (cal / "PNEUMONIA" / "truncated.jpeg").write_bytes(b"\xff\xd8\xff")  # 31 files, 30 of them readable ...
    sorted((cal / "PNEUMONIA").glob("*.jpeg"))[0].write_bytes(b"")  # ... then 29
    _refused(capsys, tmp_path, ["--recalibrate", source_package, "--calibrate-dir", str(cal),
                                "--serving-dir", str(tmp_path / "serving")],
             "has 30 NORMAL and 29 PNEUMONIA decodable images; at least 30 of each class", "nothing published")
    assert sorted(os.listdir(tmp_path / "serving" / "pneumonia")) == ["1", "2", "config.pbtxt"]  # no temp dir


def test_recalibrating_a_version_without_a_gate_warns_that_it_becomes_the_default(source_package, tmp_path, capsys):
    """QA defect: export.md's example recalibrated version 4, which has no input gate; the new version became the
    job's default and flagged 15 of 47 photographs, with one INFO line said. Export now warns when it publishes a
    version without a gate, and the job warns (WARNING) when its model has none."""
    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)
    gateless = os.path.join(os.path.dirname(source_package), "1")
    assert load_metadata(gateless).gate is None
    assert export_main(["--recalibrate", gateless, "--calibrate-dir", str(cal)]) == 0
    new = os.path.join(os.path.dirname(source_package), "3")
    out = capsys.readouterr().out
    assert f"warning: {new} has no input gate, as its source had none" in out and "--add-gate" in out
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal)]) == 0
    assert "no input gate" not in capsys.readouterr().out  # version 4 of this folder has the gate of 2
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--version", "9"]) == 0
    capsys.readouterr()
    older = os.path.join(os.path.dirname(source_package), "5")
    assert export_main(["--recalibrate", gateless, "--calibrate-dir", str(cal), "--version", "5"]) == 0
    out = capsys.readouterr().out  # QA: not the newest, so not the default: the warning must not say it is
    assert f"warning: {older} has no input gate, as its source had none: with it photographs" in out


def test_a_full_disk_at_staging_leaves_nothing_and_the_lock_goes_with_the_rename(source_package, tmp_path,
                                                                                  monkeypatch, capsys):
    """Review: a staging folder whose lock file could not be written (a full disk) stayed, lockless, for good, with
    the folders made for it; and publishing deleted the lock file before the rename, so a kill in between left a
    lockless staging folder too (as the batch job's temp dir did)."""
    import errno

    from export import republish
    from xray_core import staging as staging_module
    from xray_core.files import LOCK_FILE

    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging_module, "hold_lock", full)
    fresh = tmp_path / "fresh"
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--serving-dir",
                        str(fresh / "serving")]) == 2
    assert "No space left on device" in capsys.readouterr().err and not fresh.exists()
    monkeypatch.undo()
    seen = []
    renaming = republish.publish_dir
    monkeypatch.setattr(republish, "publish_dir", lambda src, dst: seen.append(os.listdir(src)) or renaming(src, dst))
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal)]) == 0
    assert LOCK_FILE in seen[0]  # a kill at the rename leaves a folder the next export recognises
    assert LOCK_FILE not in os.listdir(os.path.join(os.path.dirname(source_package), "3"))


def test_a_refusal_after_staging_leaves_no_folder_it_made(source_package, tmp_path, capsys):
    """QA defect: a refused export left an empty `<serving>/<name>/` (and serving folder) it had made for its
    staging folder. Folders the export made are removed again while empty; one that was there stays."""
    cal = tmp_path / "damaged"
    make_tree(str(cal), per_class=30, size=48, seed=5)
    sorted((cal / "PNEUMONIA").glob("*.jpeg"))[0].write_bytes(b"")  # 29 decodable: refused after scoring
    fresh = tmp_path / "fresh" / "serving"
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--serving-dir", str(fresh),
                        "--name", "site_b"]) == 2
    assert "29 PNEUMONIA decodable images" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    (fresh / "site_b").mkdir(parents=True)
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--serving-dir", str(fresh),
                        "--name", "site_b"]) == 2
    assert os.listdir(fresh / "site_b") == []  # the user's folder stays, empty as it was


@pytest.mark.parametrize("where", ["the training folder", "inside it", "holding it", "a class folder's link target"])
def test_the_folder_the_model_was_trained_on_is_refused(source_package, tmp_path, capsys, where):
    """Known since the eighth session: recalibrating on the model's own training images chose an in-sample threshold
    without a word. The package records its training folder (metadata.json training_data); a calibration folder
    that is it, lies inside it or holds it is refused, before any scoring, and nothing is published."""
    train = tmp_path / "data" / "train"
    make_tree(str(train / "hospital"), per_class=30, size=48, seed=6)
    if where == "a class folder's link target":  # QA: the run's data folder linked NORMAL from the shared folder
        shared = tmp_path / "shared"
        make_tree(str(shared), per_class=30, size=48, seed=7)
        os.symlink(shared / "NORMAL", train / "NORMAL")
    path = os.path.join(source_package, "metadata.json")
    meta = read_json(path)
    meta["training_data"] = {"source": "synthetic", "data_dir": str(train)}
    with open(path, "w") as f:
        json.dump(meta, f)
    cal = {"the training folder": train, "inside it": train / "hospital", "holding it": tmp_path / "data",
           "a class folder's link target": tmp_path / "shared"}[where]
    line = _refused(capsys, tmp_path, ["--recalibrate", source_package, "--calibrate-dir", str(cal),
                                       "--serving-dir", str(tmp_path / "serving")],
                    f"overlaps {train}, the folder the model was trained on", "nothing published")
    assert line.startswith(f"error: calibration dir {cal} ")


def test_only_the_folders_train_reads_count_as_its_training_folder(tmp_path):
    """Review: following every link two levels down refused calibration folders train never read from: a link
    inside a class folder (train's walk does not follow it), or one beside the class folders."""
    from export.calibrate import CalibrationError, refuse_training_folder

    data, shared = tmp_path / "data", tmp_path / "shared"
    make_tree(str(data), per_class=2, size=32, seed=1)
    make_tree(str(shared / "site"), per_class=2, size=32, seed=2)
    make_tree(str(shared / "linked_class"), per_class=2, size=32, seed=3)
    os.symlink(shared / "site", data / "NORMAL" / "old_batches")  # inside a class folder: not read by train
    os.symlink(shared / "site", data / "site_sample")  # beside the class folders: not read by train either
    refuse_training_folder(str(shared / "site"), str(data))  # not refused
    linked = tmp_path / "linked"  # a training folder whose PNEUMONIA class folder is a link: train reads it
    make_tree(str(linked), per_class=2, size=32, seed=4)
    shutil.rmtree(linked / "PNEUMONIA")
    os.symlink(shared / "linked_class" / "PNEUMONIA", linked / "PNEUMONIA")
    with pytest.raises(CalibrationError, match="overlaps"):
        refuse_training_folder(str(shared / "linked_class"), str(linked))


@pytest.mark.parametrize("case, fragment", [
    ("missing dir", "calibration dir not found"),
    ("no PNEUMONIA", "no images under a folder named PNEUMONIA"),
    ("broken source", "does not verify"),
])
def test_bad_inputs_are_one_line_errors_and_publish_nothing(source_package, tmp_path, capsys, case, fragment):
    cal = tmp_path / "cal"
    if case != "missing dir":
        make_tree(str(cal), per_class=30, size=48, seed=6)
    if case == "no PNEUMONIA":
        for path in (cal / "PNEUMONIA").iterdir():
            path.unlink()
    if case == "broken source":
        with open(os.path.join(source_package, "model.onnx"), "ab") as f:
            f.write(b"\0")
    _refused(capsys, tmp_path, ["--recalibrate", source_package, "--calibrate-dir", str(cal),
                                "--serving-dir", str(tmp_path / "serving")], fragment)


def test_sigterm_removes_the_staging_folder_and_the_next_export_removes_a_killed_ones(source_package, tmp_path):
    """QA defect: an export stopped by SIGTERM (docker stop) or SIGKILL left `<version>.tmp-XXXXXXXX` beside the
    versions, for good. Now SIGTERM cleans up as Ctrl-C does (exit 143), and a staging folder whose export is gone
    (its lock free) goes with the next export of that name; one still locked, or not named so, stays."""
    import signal
    import subprocess
    import sys
    import time

    from xray_core.files import LOCK_FILE, hold_lock

    name_dir = tmp_path / "serving" / "pneumonia"
    cal = tmp_path / "cal"
    make_tree(str(cal), per_class=400, size=48, seed=7)  # enough work to be stopped in the middle
    argv = [sys.executable, "-m", "export", "--recalibrate", source_package, "--calibrate-dir", str(cal),
            "--serving-dir", str(tmp_path / "serving")]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(name_dir.glob("3.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing published"
    assert sorted(os.listdir(name_dir)) == ["1", "2", "config.pbtxt"]

    # an export still at work stages another version (one staging this version refuses the next: test below)
    killed, running, other = name_dir / "3.tmp-abcd1234", name_dir / "4.tmp-wxyz9876", name_dir / "3.tmp-notours"
    for folder in (killed, running, other):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"half")
        (folder / LOCK_FILE).write_text("1@host\n")
    held = hold_lock(str(running))  # an export still at work
    try:
        cal_small = tmp_path / "cal_small"
        make_tree(str(cal_small), per_class=30, size=48, seed=8)
        assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal_small),
                            "--serving-dir", str(tmp_path / "serving")]) == 0
    finally:
        held.close()
    assert sorted(os.listdir(name_dir)) == ["1", "2", "3", "3.tmp-notours", "4.tmp-wxyz9876", "config.pbtxt"]
    assert LOCK_FILE not in os.listdir(name_dir / "3")  # the lock is no part of the version


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_version_is_published_waits_for_it(source_package, tmp_path, monkeypatch, capsys, signum):
    """QA defect: a SIGTERM between the rename of the staging folder and the rewrite of config.pbtxt said "nothing
    published" (exit 143) with the version published and config.pbtxt still naming the one before. The signal now
    waits for both: the version and its config are published, the command says the signal came, exit 0."""
    import signal

    import xray_core.files

    rename = xray_core.files.publish_dir

    def rename_then_signal(staging, final):
        rename(staging, final)
        os.kill(os.getpid(), getattr(signal, signum))  # handled at once by Python, between two bytecodes

    monkeypatch.setattr("export.republish.publish_dir", rename_then_signal)
    cal = tmp_path / "cal"
    make_tree(str(cal), per_class=30, size=48, seed=7)
    serving = tmp_path / "serving"
    config = serving / "pneumonia" / "config.pbtxt"
    config.write_text("stale\n")  # what the rewrite must replace
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal),
                        "--serving-dir", str(serving)]) == 0
    err = capsys.readouterr().err
    held = "SIGTERM" if signum == "SIGTERM" else "Ctrl-C"
    assert f"warning: {held} arrived while the version was being published; it was published first" in err
    assert "nothing published" not in err
    name_dir = serving / "pneumonia"
    assert sorted(os.listdir(name_dir)) == ["1", "2", "3", "config.pbtxt"]
    newest = load_metadata(str(name_dir / "3"))
    assert config.read_text() == triton_config("pneumonia", newest.image_size, heatmap=newest.heatmap_hw,
                                               embedding=newest.embedding_dim)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


@pytest.mark.parametrize("case", ["held, then publishing failed", "after publishing"])
def test_a_signal_around_publishing_gets_a_true_last_line(source_package, tmp_path, monkeypatch, capsys, case):
    """Review defects: a signal held while publishing that then failed printed "it was published first" (exit 2)
    though nothing was; one right after publishing said "nothing published" (exit 143) though the version was."""
    import signal

    import export.republish

    if case == "held, then publishing failed":
        def rename(staging, final):
            os.kill(os.getpid(), signal.SIGTERM)
            raise FileExistsError(final)

        monkeypatch.setattr("export.republish.publish_dir", rename)
    else:
        real = export.republish.publish_version

        def publish_then_signal(staging, final):
            real(staging, final)
            os.kill(os.getpid(), signal.SIGTERM)  # outside the held section: stops the command at once

        monkeypatch.setattr("export.republish.publish_version", publish_then_signal)
    cal = tmp_path / "cal"
    make_tree(str(cal), per_class=30, size=48, seed=7)
    serving = tmp_path / "serving"
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal),
                        "--serving-dir", str(serving)]) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    if case == "held, then publishing failed":
        assert last == "error: terminated (SIGTERM); nothing published"
        assert sorted(os.listdir(serving / "pneumonia")) == ["1", "2", "config.pbtxt"]
    else:
        assert last == f"error: terminated (SIGTERM); after {serving / 'pneumonia' / '3'} was published"
        assert sorted(os.listdir(serving / "pneumonia")) == ["1", "2", "3", "config.pbtxt"]


def test_recalibrate_needs_a_calibration_dir(source_package, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--recalibrate", source_package])
    assert exc.value.code == 2
    assert "--recalibrate needs --calibrate-dir" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../escape", "", "a/b", ".hidden", "-x"])
def test_a_name_that_is_not_one_folder_name_is_refused(source_package, tmp_path, name, capsys):
    """QA: --name ../../escape published outside the serving folder; --name "" published into its root."""
    with pytest.raises(SystemExit) as exc:
        export_main(["--recalibrate", source_package, "--calibrate-dir", str(tmp_path), "--serving-dir",
                     str(tmp_path / "other"), f"--name={name}"])
    assert exc.value.code == 2 and "--name must be one folder name" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "other") and not os.path.exists(tmp_path.parent / "escape")


def test_a_source_without_a_target_recall_needs_one_given(tmp_path, capsys):
    serving = tmp_path / "serving"
    vdir = write_package(str(serving))
    path = os.path.join(vdir, "metadata.json")
    meta = read_json(path)
    del meta["target_recall"]
    with open(path, "w") as f:
        json.dump(meta, f)
    cal = tmp_path / "cal"
    make_tree(str(cal), per_class=30, size=48, seed=7)
    _refused(capsys, tmp_path, ["--recalibrate", vdir, "--calibrate-dir", str(cal), "--serving-dir", str(serving)],
             "pneumonia/1 records no target recall: give --target-recall")
    assert export_main(["--recalibrate", vdir, "--calibrate-dir", str(cal), "--serving-dir", str(serving),
                        "--target-recall", "0.9"]) == 0
    new = load_metadata(str(serving / "pneumonia" / "2"))
    assert new.target_recall == 0.9 and new.site_calibration["at_calibrated_threshold"]["recall"] >= 0.9
    assert new.heatmap is None  # a package without heatmaps gets no figures for them
    # a version that recorded no validation threshold used the validation split's as its decision threshold
    assert new.validation_threshold == 0.5 and new.site_calibration["at_validation_threshold"]["threshold"] == 0.5


# ------------------------------------------------------------------ the shipped model on the real site sample

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SITE_SAMPLE), reason="../shared/data/chest_xray/site_sample not present")
def test_version_4_recalibrated_on_its_own_site_sample_gets_the_calibration_export_recorded(tmp_path):
    """Version 4 was calibrated on the site sample by `export --run-dir --calibrate-dir` with target recall 0.97:
    recalibrating it there, without Keras, must give the same threshold and faithfulness figures, and the same 2-fold
    estimate but for one change of rule since (2026-12-02, QA): two byte-identical NORMAL scans filed as two patients
    (NORMAL2-IM-0095 and -0096) are one patient now, so the split never puts the same image on both sides."""
    shipped = os.path.join(REPO, "serving_models", "pneumonia", "4")
    serving = tmp_path / "serving"
    assert export_main(["--recalibrate", shipped, "--calibrate-dir", SITE_SAMPLE, "--serving-dir", str(serving)]) == 0
    newest = str(versions(os.path.dirname(shipped))[-1] + 1)  # above every shipped version (review)
    new, old = read_json(serving / "pneumonia" / newest / "metadata.json"), read_json(os.path.join(shipped,
                                                                                                   "metadata.json"))
    assert new["target_recall"] == old["target_recall"] == 0.97
    assert new["decision_threshold"] == pytest.approx(old["decision_threshold"], abs=1e-6)  # float32 scores
    a, b = new["site_calibration"], old["site_calibration"]
    assert [a[k] for k in ("images", "normal", "pneumonia", "patients")] == [313, 117, 196, 221]
    assert [b[k] for k in ("images", "normal", "pneumonia", "patients")] == [313, 117, 196, 222]
    for key in ("at_0.5", "at_validation_threshold", "at_calibrated_threshold"):
        assert a[key]["confusion_matrix"] == b[key]["confusion_matrix"], key
    assert a["at_previous_threshold"]["confusion_matrix"] == b["at_calibrated_threshold"]["confusion_matrix"]
    assert (b["two_fold"]["recall"], b["two_fold"]["specificity"]) == (192 / 196, 110 / 117)  # as recorded
    assert (a["two_fold"]["recall"], a["two_fold"]["specificity"]) == (190 / 196, 110 / 117)  # the copies as one
    assert a["two_fold"]["roc_auc"] == b["two_fold"]["roc_auc"]
    fa, fb = new["heatmap"]["faithfulness"], old["heatmap"]["faithfulness"]
    assert (fa["flagged"], fa["share_top_beats_random"], fa["passed"]) == (fb["flagged"], 1.0, True) == (197, 1.0, True)
    assert fa["share_own_beats_average"] == pytest.approx(98 / 197)  # the figure the export commit recorded: 49.7%
    assert all(c.ok for c in verify_package(str(serving / "pneumonia" / newest)))  # numbered after its folder


def test_calibration_leaves_out_what_the_batch_job_would_not_score(tiny_package, tmp_path):
    """A threshold is chosen on the images the job scores: a photograph, a blank export or a CT series in the
    calibration folder is skipped with the job's reason, not calibrated on (review)."""
    from PIL import Image

    from dicom_factory import dicom_bytes, xray_like
    from export.calibrate import score
    from helpers import textured

    config = PreprocessConfig(image_size=32)
    scan = tmp_path / "scan.png"
    textured((64, 64), 120, seed=1).save(scan)
    photo, blank, ct = tmp_path / "photo.jpg", tmp_path / "blank.png", tmp_path / "ct.dcm"
    Image.merge("RGB", [textured((64, 64), m, seed=m) for m in (180, 120, 60)]).save(photo, quality=95)
    Image.new("L", (64, 64), 200).save(blank)
    ct.write_bytes(dicom_bytes(xray_like(64, 64), modality="CT"))
    session = open_session(os.path.join(tiny_package, "1", "model.onnx"))
    p, x, ok, failed = score(session, [str(photo), str(scan), str(blank), str(ct)], config)
    assert ok == [1] and p.shape == (1,) and np.array_equal(x[0], preprocess_image(str(scan), config))
    assert [(path, error.split(" (")[0]) for path, error in failed] == [
        (str(photo), "out of scope: colour image"), (str(blank), "out of scope: near-constant image"),
        (str(ct), "out of scope: Modality CT not allowed")]


def test_a_version_named_through_a_symbolic_link_is_published_beside_the_real_one(tmp_path, capsys):
    """QA: `--add-gate LINK` (or `--recalibrate LINK`) to a version folder published a new `pneumonia/1` beside the
    link, outside the serving folder: the job's default never changed, and a ledger could know that id already."""
    images = np.random.default_rng(0).uniform(0.2, 0.8, (120, 32, 32, 1)).astype(np.float32)
    v1 = write_package(str(tmp_path / "serving"), reference_images=images, heatmap_hw=(4, 4))
    (tmp_path / "our links").mkdir()
    link = str(tmp_path / "our links" / "current")
    os.symlink(v1, link)
    assert export_main(["--add-gate", link]) == 0
    assert sorted(os.listdir(tmp_path / "serving" / "pneumonia")) == ["1", "2", "config.pbtxt"]
    assert os.listdir(tmp_path / "our links") == ["current"]
    assert sorted(os.listdir(tmp_path)) == ["our links", "serving"]
    meta = read_json(str(tmp_path / "serving" / "pneumonia" / "2" / "metadata.json"))
    assert meta["source"]["republished_from"] == f"pneumonia/1 ({os.path.realpath(v1)})"
    assert shlex.split(meta["source"]["republish_command"]) == ["python", "-m", "export", "--add-gate", link]  # QA


def test_calibration_takes_byte_identical_copies_as_one_patient_and_bytes_under_both_labels_not_at_all(
        tiny_package, tmp_path):
    """QA: copies of one scan under other names counted as patients of their own (so the 2-fold split could put the
    same image on both sides, and they counted towards the 30 a class needs), and a file filed under both labels was
    calibrated on as both. As training does: copies are one patient, bytes under both labels are left out."""
    from export.calibrate import CalibrationError, calibrate
    from helpers import textured

    for label, mean in (("NORMAL", 80), ("PNEUMONIA", 200)):
        (tmp_path / "cal" / label).mkdir(parents=True)
        for i in range(3):
            textured((48, 48), mean, seed=i).save(tmp_path / "cal" / label / f"IM-{mean}{i}-0001.png")
    normal, pneumonia = tmp_path / "cal" / "NORMAL", tmp_path / "cal" / "PNEUMONIA"
    shutil.copyfile(normal / "IM-800-0001.png", normal / "IM-809-0001.png")  # another patient's name, same bytes
    shutil.copyfile(normal / "IM-801-0001.png", pneumonia / "IM-801-0001.png")
    session = open_session(os.path.join(tiny_package, "1", "model.onnx"))
    site, images = calibrate(session, str(tmp_path / "cal"), PreprocessConfig(image_size=32), 0.5, 0.95,
                             log=lambda line: None)
    assert (site["images"], site["normal"], site["pneumonia"], site["patients"]) == (6, 3, 3, 5) and len(images) == 6
    assert sorted((os.path.relpath(s["path"], tmp_path / "cal"), s["error"]) for s in site["skipped"]) == [
        ("NORMAL/IM-801-0001.png", "the same bytes are filed under both NORMAL and PNEUMONIA"),
        ("PNEUMONIA/IM-801-0001.png", "the same bytes are filed under both NORMAL and PNEUMONIA")]
    (normal / "IM-802-0001.png").unlink()  # two NORMAL files left, one image: a copy counts once towards a floor
    with pytest.raises(CalibrationError, match="has 1 NORMAL and 3 PNEUMONIA decodable images; at least 2 of each"):
        calibrate(session, str(tmp_path / "cal"), PreprocessConfig(image_size=32), 0.5, 0.95, log=lambda line: None,
                  min_per_class=2)


def test_a_fifo_in_a_calibration_or_training_folder_is_a_skipped_file_not_a_hang(tiny_package, tmp_path):
    """Review: a FIFO named `.jpeg` in a calibration folder (or a training or site folder) blocked the command for good:
    its patient (a DICOM PatientID) and its digest were read before the file was refused."""
    from helpers import textured

    for label, mean in (("NORMAL", 80), ("PNEUMONIA", 200)):
        (tmp_path / "cal" / label).mkdir(parents=True)
        for i in range(3):
            textured((48, 48), mean, seed=i).save(tmp_path / "cal" / label / f"IM-{mean}{i}-0001.png")
    os.mkfifo(tmp_path / "cal" / "NORMAL" / "stuck.jpeg")
    script = f"""
import json
from export.calibrate import calibrate
from train.data import find_examples, refuse_site_images
from train.loading import load_images
from xray_core.package import open_session
from xray_core.preprocessing import PreprocessConfig
site, _ = calibrate(open_session({os.path.join(tiny_package, "1", "model.onnx")!r}), {str(tmp_path / "cal")!r},
                    PreprocessConfig(image_size=32), 0.5, 0.95, log=lambda line: None)
examples = find_examples({str(tmp_path / "cal")!r})
_, ok, failed = load_images([e.path for e in examples], PreprocessConfig(image_size=32))
refuse_site_images({str(tmp_path / "cal")!r}, "data", [], [])
print(json.dumps([site["images"], site["skipped"], len(examples), len(ok), failed]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images, skipped, listed, read, failed = json.loads(proc.stdout.strip().splitlines()[-1])
    stuck = str(tmp_path / "cal" / "NORMAL" / "stuck.jpeg")
    assert (images, skipped) == (6, [{"path": stuck, "error": "not a regular file"}])
    assert (listed, read, failed) == (7, 6, [[stuck, "not a regular file"]])


def test_calibration_reads_dicom_of_the_modalities_the_job_is_run_with(tiny_package, tmp_path, capsys):
    """Review: calibration read DICOM with the job's default modalities only, so a site scoring other modalities with
    the job's --modalities could not calibrate on them. `export --modalities` is the job's option."""
    from dicom_factory import dicom_bytes, xray_like
    from export.calibrate import CalibrationError, calibrate

    for label, scale in (("NORMAL", 0.4), ("PNEUMONIA", 1.0)):
        (tmp_path / "cal" / label).mkdir(parents=True)
        for i in range(2):
            pixels = (xray_like(64, 64, seed=i) * scale).astype(np.uint16)
            ot = dicom_bytes(pixels, modality="OT", PatientID=f"{label}{i}")  # secondary capture
            (tmp_path / "cal" / label / f"{i}.dcm").write_bytes(ot)
    session = open_session(os.path.join(tiny_package, "1", "model.onnx"))
    config = PreprocessConfig(image_size=32)

    with pytest.raises(CalibrationError, match="no calibration image could be decoded and is in scope"):
        calibrate(session, str(tmp_path / "cal"), config, 0.5, 0.95, log=lambda line: None)
    site, _ = calibrate(session, str(tmp_path / "cal"), config, 0.5, 0.95, log=lambda line: None,
                        modalities=("CR", "DX", "OT"))
    assert (site["images"], site["patients"], site["modalities"], site["skipped"]) == (4, 4, ["CR", "DX", "OT"], [])
    with pytest.raises(SystemExit):
        export_main(["--recalibrate", tiny_package, "--calibrate-dir", str(tmp_path / "cal"), "--modalities", " , "])
    assert "--modalities needs at least one DICOM Modality" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["--verify", tiny_package, "--modalities", "CR,DX,OT"])
    assert "--modalities goes with --calibrate-dir" in capsys.readouterr().err


def test_a_second_export_of_the_version_another_is_staging_is_refused_before_its_work(source_package, tmp_path,
                                                                                    capsys):
    """QA: two exports to one name both chose the next version; the second did all its work (calibration, checks),
    then failed as the first had published it. The second now refuses at once while the first's staging folder is
    held, and goes ahead once the first has finished."""
    from xray_core.staging import discard_staging, staging_dir

    cal = tmp_path / "hospital"
    make_tree(str(cal), per_class=32, size=48, seed=3)
    name_dir = os.path.dirname(source_package)
    first = staging_dir(os.path.join(name_dir, "3"), str(tmp_path / "serving"))  # a running export's, lock held
    try:
        _refused(capsys, tmp_path, ["--recalibrate", source_package, "--calibrate-dir", str(cal)],
                 f"another export is publishing {os.path.join(name_dir, '3')} (its staging folder "
                 f"{os.path.basename(first)} is held by a running process)", "nothing published")
        assert "calibration: scoring" not in capsys.readouterr().out  # refused before any scoring
        assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal), "--version", "4"]) == 0
    finally:
        discard_staging(first)
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal)]) == 0  # the first gone: 5
    assert versions(name_dir) == [1, 2, 4, 5]
    os.mkdir(os.path.join(name_dir, "6.tmp-abcdefgh"))  # review: a staging folder with no lock file (a kill between
    # mkdtemp and its lock, or an older release's) blocked its version for good, "held by a running process"
    assert export_main(["--recalibrate", source_package, "--calibrate-dir", str(cal)]) == 0
    assert versions(name_dir) == [1, 2, 4, 5, 6] and os.path.isdir(os.path.join(name_dir, "6.tmp-abcdefgh"))
