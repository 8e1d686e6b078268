"""The input gate fitted on the training split (gate.npz; xray_core/gate.py TRAINING_SPLIT) and
`python -m export --add-gate VERSION_DIR --training-dir DIR` (no TensorFlow)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.covariance import LedoitWolf

from export.__main__ import main as export_main
from helpers import assert_one_line_error, read_json, sha256_of, write_package
from xray_core import gate, reference
from xray_core.package import open_session, score
from xray_core.preprocessing import PreprocessConfig, preprocess_image
from xray_core.verify import verify_package

TRAIN_IMAGES = 80


def _gaussian(n, d=16, seed=0, shift=0.0):
    mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


def test_the_limit_is_the_validation_rows_percentile_to_the_training_fit_times_the_margin():
    train, val = _gaussian(400, seed=1), _gaussian(150, seed=2)
    spec, fitted = gate.derive_from_split(train, val)
    lw = LedoitWolf().fit(train)
    d = val - lw.location_
    want = np.percentile(np.sqrt(np.einsum("nd,de,ne->n", d, np.linalg.inv(lw.covariance_), d)), 99.5)
    assert spec.statistic == gate.TRAINING_SPLIT and spec.rows == 400 and spec.held_out_rows == 150
    assert spec.held_out_quantile == pytest.approx(want, rel=1e-9)
    assert spec.limit == pytest.approx(1.2 * want, rel=1e-9) and fitted.limit == spec.limit
    far = fitted.distances(_gaussian(50, seed=3, shift=3.0))
    assert (far > spec.limit).mean() > 0.9 and (fitted.distances(val) > spec.limit).mean() == 0.0
    with pytest.raises(gate.GateError, match=">= 50 training and validation rows"):
        gate.derive_from_split(train, val[:20])


def test_the_fit_file_round_trips_and_a_malformed_one_is_one_line(tmp_path):
    _, fitted = gate.derive_from_split(_gaussian(200, seed=1), _gaussian(100, seed=2))
    path = str(tmp_path / "gate.npz")
    gate.write_fit(path, fitted)
    again = gate.read_fit(path, fitted.limit)
    np.testing.assert_array_equal(again.location, fitted.location)
    np.testing.assert_array_equal(again.precision, fitted.precision)
    np.savez(path, location=fitted.location, precision=fitted.precision[:3])
    with pytest.raises(gate.GateError, match="malformed"):
        gate.read_fit(path, 1.0)
    np.savez(path, location=np.array([object()], dtype=object), precision=fitted.precision)
    with pytest.raises(gate.GateError, match="unreadable: ValueError"):  # pickled arrays are never loaded
        gate.read_fit(path, 1.0)
    with pytest.raises(gate.GateError, match="unreadable"):
        gate.read_fit(str(tmp_path / "missing.npz"), 1.0)
    np.savez(path, location=np.float64(1.0), precision=fitted.precision)
    with pytest.raises(gate.GateError, match="malformed"):  # a 0-d location: one line, not a TypeError
        gate.read_fit(path, 1.0)


def test_a_malformed_spec_or_a_changed_fit_file_is_one_line(tmp_path):
    spec, fitted = gate.derive_from_split(_gaussian(200, seed=1), _gaussian(100, seed=2))
    good = {**spec.to_dict(), "file": "gate.npz", "sha256": "0" * 64}
    for bad in ({**good, "limit": "wide"}, {**good, "file": 3}):
        with pytest.raises(gate.GateError, match="malformed"):
            gate.GateSpec.from_dict(bad)
    gate.write_fit(str(tmp_path / "gate.npz"), fitted)
    with pytest.raises(gate.GateError, match="not the file its package recorded"):
        gate.package_gate(gate.GateSpec.from_dict(good), str(tmp_path))
    with pytest.raises(gate.GateError, match="unreadable"):
        gate.package_gate(gate.GateSpec.from_dict(good), str(tmp_path / "elsewhere"))


@pytest.fixture()
def package(tmp_path):
    images = np.random.default_rng(0).uniform(0.2, 0.8, (120, 32, 32, 1)).astype(np.float32)
    return write_package(str(tmp_path / "serving"), reference_images=images, heatmap_hw=(4, 4))


@pytest.fixture()
def training_dir(tmp_path):
    """TRAIN_IMAGES training images, plus one file splits.csv lists as validation (NORMAL/0.jpeg): left out."""
    root = tmp_path / "train"
    rng = np.random.default_rng(5)
    for i in range(TRAIN_IMAGES):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        os.makedirs(root / label, exist_ok=True)
        Image.fromarray(rng.integers(40, 220, (48, 48), dtype=np.uint8)).save(root / label / f"t{i:03d}.png")
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(root / "NORMAL" / "0.jpeg", format="PNG")
    return str(root)


def test_add_gate_with_a_training_dir_fits_the_training_split(package, training_dir, tmp_path, capsys):
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert f"scoring {TRAIN_IMAGES} training-split images" in capsys.readouterr().out
    new = serving / "pneumonia" / "2"
    meta = read_json(new / "metadata.json")
    g = meta["gate"]
    assert g["statistic"] == gate.TRAINING_SPLIT and g["rows"] == TRAIN_IMAGES and g["held_out_rows"] == 120
    assert g["file"] == "gate.npz" and g["sha256"] == sha256_of(new / "gate.npz")
    # the fit is the training images' embeddings by the package's own graph; the limit its reference rows'
    config = PreprocessConfig(image_size=32)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(training_dir) for f in fs if f.startswith("t"))
    emb = score(open_session(os.path.join(package, "model.onnx")), np.stack([preprocess_image(p, config)
                                                                              for p in paths]), embedding=True)
    rows = reference.load(os.path.join(package, "reference.npz")).embeddings
    spec, _ = gate.derive_from_split(emb.embedding, rows)
    assert g["limit"] == pytest.approx(spec.limit, rel=1e-9)
    assert all(c.ok for c in verify_package(str(new)))
    card = " ".join((new / "MODEL_CARD.md").read_text().split())
    assert f"the {TRAIN_IMAGES:,} training-split X-rays' embeddings (`gate.npz`) must be at most **{g['limit']:.1f}**" \
        in card


def test_verify_fails_a_changed_fit_or_a_loosened_limit(package, training_dir, tmp_path):
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    vdir = serving / "pneumonia" / "2"
    meta = read_json(vdir / "metadata.json")
    meta["gate"]["limit"] *= 2
    meta["gate"]["held_out_quantile"] *= 2  # edited to match: only the re-derivation can tell
    (vdir / "metadata.json").write_text(json.dumps(meta))
    failed = [c for c in verify_package(str(vdir)) if not c.ok]
    assert [c.name for c in failed] == ["input gate"] and "re-derived" in failed[0].detail
    with np.load(vdir / "gate.npz") as z:
        np.savez(vdir / "gate.npz", location=z["location"] + 1, precision=z["precision"])
    failed = [c for c in verify_package(str(vdir)) if not c.ok]
    assert [c.name for c in failed] == ["input gate"] and "gate.npz sha256 != metadata" in failed[0].detail


@pytest.mark.parametrize("edit", ["loosened", "tightened", "gate_removed"])
def test_the_job_refuses_a_gate_edited_by_hand(package, training_dir, tmp_path, capsys, edit):
    """QA: the batch job checked only that a gate was usable, not its limit: a limit loosened by hand in
    metadata.json (which `export --verify` failed) scored non-X-rays (12 flagged), and the `gate` entry deleted
    whole (gate.npz left) turned the gate off with a warning; both are refused now, before anything is written."""
    from batch_job.cli import main as job_main
    from batch_job.synthetic import make_tree

    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    vdir = serving / "pneumonia" / "2"
    meta = read_json(vdir / "metadata.json")
    if edit == "gate_removed":
        del meta["gate"]
    else:
        for figure in ("limit", "held_out_quantile"):  # edited to agree with each other
            meta["gate"][figure] *= 2.0 if edit == "loosened" else 0.5
    (vdir / "metadata.json").write_text(json.dumps(meta))
    capsys.readouterr()
    make_tree(str(tmp_path / "in"), per_class=2, size=48, seed=3)
    rc = job_main(["--input", str(tmp_path / "in"), "--model", str(vdir), "--output", str(tmp_path / "out"),
                   "--direct_running_mode=in_memory"])
    line = assert_one_line_error(capsys, rc)
    assert f"model {vdir} failed verification: FAIL input gate: " in line
    assert ("re-derived" in line) != (edit == "gate_removed")
    assert edit != "gate_removed" or "gate.npz is present but metadata.json records no gate" in line
    assert not (tmp_path / "out").exists()


def test_a_training_folder_changed_since_export_is_refused(package, training_dir, tmp_path, capsys):
    """Retrain QA: 20 training images swapped for never-trained ones were fitted on by --add-gate (only their number
    was checked). A package that records its training split's digest (export, since 2026-12-02) refuses a folder
    whose files or contents differ; one without the record is fitted as before."""
    from export.gate_fit import split_digest, training_paths

    meta = read_json(os.path.join(package, "metadata.json"))
    paths = training_paths(training_dir, os.path.join(package, "splits.csv"))
    meta["training_data"] = {"source": "synthetic", "data_dir": training_dir,
                             "train_split_sha256": split_digest(paths, training_dir)}  # as export records it
    with open(os.path.join(package, "metadata.json"), "w") as f:
        json.dump(meta, f)
    serving = tmp_path / "serving2"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert read_json(serving / "pneumonia" / "2" / "metadata.json")["training_data"]["train_split_sha256"] == \
        meta["training_data"]["train_split_sha256"]  # carried forward
    swapped = os.path.join(training_dir, "PNEUMONIA", "t001.png")
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(swapped)  # same name, other image
    capsys.readouterr()
    rc = export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir])
    assert_one_line_error(capsys, rc, f"{training_dir} has changed since the model was exported", "nothing published")
    assert sorted(os.listdir(serving / "pneumonia")) == ["2", "config.pbtxt"]


def test_republishing_a_training_split_gate_without_a_training_dir_is_refused(package, training_dir, tmp_path,
                                                                               capsys):
    """Review: `--add-gate` of such a version without --training-dir published, as the new default, one whose gate
    came from the reference rows alone (limit 50.1 against 40.7 for version 7) and without its orientation check,
    without a word. It is refused; with --training-dir it fits the gate again."""
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    capsys.readouterr()
    rc = export_main(["--add-gate", str(serving / "pneumonia" / "2"), "--serving-dir", str(serving)])
    assert_one_line_error(capsys, rc, "error: pneumonia/2 (", "'s gate is fitted on its training split",
                          "give --training-dir; nothing published")
    assert sorted(os.listdir(serving / "pneumonia")) == ["1", "2", "config.pbtxt"]  # no version 3
    assert export_main(["--add-gate", str(serving / "pneumonia" / "2"), "--serving-dir", str(serving),
                        "--training-dir", training_dir]) == 0
    v3 = serving / "pneumonia" / "3"
    assert read_json(v3 / "metadata.json")["gate"]["statistic"] == gate.TRAINING_SPLIT


def test_a_folder_that_is_not_the_training_folder_is_refused(package, training_dir, tmp_path, capsys):
    path = os.path.join(package, "metadata.json")
    meta = read_json(path)
    meta["source"] = {"split_counts": {"train": {"images": TRAIN_IMAGES + 1}}}
    with open(path, "w") as f:
        json.dump(meta, f)
    serving = tmp_path / "serving"
    assert_one_line_error(capsys, export_main(["--add-gate", package, "--serving-dir", str(serving),
                                               "--training-dir", training_dir]),
                          f"holds {TRAIN_IMAGES} images", f"trained on {TRAIN_IMAGES + 1}", "not its training folder")
    assert_one_line_error(capsys, export_main(["--add-gate", package, "--serving-dir", str(serving),
                                               "--training-dir", str(tmp_path / "nope")]), "training folder not found")
    meta["source"] = {"split_counts": {"train": {"images": TRAIN_IMAGES - 1}}}  # more readable than it trained on
    with open(path, "w") as f:
        json.dump(meta, f)
    assert_one_line_error(capsys, export_main(["--add-gate", package, "--serving-dir", str(serving),
                                               "--training-dir", training_dir]),
                          f"{TRAIN_IMAGES} of {TRAIN_IMAGES} training-split images could be read",
                          f"trained on {TRAIN_IMAGES - 1}")
    assert sorted(os.listdir(serving / "pneumonia")) == ["1", "config.pbtxt"]


def test_images_training_could_not_read_are_the_difference(package, training_dir, tmp_path):
    """A training folder with an unreadable file (skipped when the run trained): exactly the run's count is read."""
    with open(os.path.join(training_dir, "PNEUMONIA", "broken.png"), "wb") as f:
        f.write(b"not an image")
    path = os.path.join(package, "metadata.json")
    meta = read_json(path)
    meta["source"] = {"split_counts": {"train": {"images": TRAIN_IMAGES}}}
    with open(path, "w") as f:
        json.dump(meta, f)
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert read_json(serving / "pneumonia" / "2" / "metadata.json")["gate"]["rows"] == TRAIN_IMAGES


def test_training_dir_goes_with_add_gate(package, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main(["--verify", package, "--training-dir", str(tmp_path)])
    assert exc.value.code == 2 and "--training-dir goes with --add-gate" in capsys.readouterr().err


def test_a_training_split_image_now_out_of_scope_is_accounted_for_not_missing(package, training_dir, tmp_path):
    """Review: a run trained before training left out what the batch job refuses trained on such an image; its gate
    fit then read one image fewer than the run's count and was refused as "moved data, or not its training folder".
    It is left out of the fit instead (the gate's rows: what the job would score)."""
    Image.new("L", (48, 48), 128).save(os.path.join(training_dir, "PNEUMONIA", "blank.png"))  # near-constant
    path = os.path.join(package, "metadata.json")
    meta = read_json(path)
    meta["source"] = {"split_counts": {"train": {"images": TRAIN_IMAGES + 1}}}  # the run trained on it
    with open(path, "w") as f:
        json.dump(meta, f)
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert read_json(serving / "pneumonia" / "2" / "metadata.json")["gate"]["rows"] == TRAIN_IMAGES
    meta["source"] = {"split_counts": {"train": {"images": TRAIN_IMAGES}}}  # a run since: training skipped it (audit)
    with open(path, "w") as f:
        json.dump(meta, f)
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert read_json(serving / "pneumonia" / "3" / "metadata.json")["gate"]["rows"] == TRAIN_IMAGES


def test_the_split_digest_takes_verified_contents_as_read(tmp_path):
    """Export verifies the training images' recorded sha256 (export/run_dir.py), then computes the training split's
    digest from those contents instead of reading every image again; the digest is the one a later
    `--add-gate --training-dir` computes by reading them."""
    from export.gate_fit import split_digest
    from helpers import sha256_of

    paths = []
    for i in range(3):
        path = tmp_path / "NORMAL" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * 10)
        paths.append(str(path))
    read = split_digest(paths, str(tmp_path))
    assert split_digest(paths, str(tmp_path), {p: sha256_of(p) for p in paths[:2]}) == read
    assert split_digest(paths, str(tmp_path), {paths[0]: "0" * 64}) != read  # the known contents are used as given


def test_add_gate_fits_the_layout_check_where_the_validation_images_are_there(package, training_dir, tmp_path, capsys):
    """The layout check: fitted on the training split's block means, each image as it is, mirrored and in 3 tilted
    copies, its limit from the validation split's (splits.csv's `val` rows under --training-dir, as many as the
    reference has), re-derived by --verify from the rows gate.npz keeps."""
    val = _validation_images(training_dir, 120)
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert f"scoring {TRAIN_IMAGES} training-split images" in capsys.readouterr().out
    vdir = serving / "pneumonia" / "2"
    layout = read_json(vdir / "metadata.json")["gate"]["layout"]
    assert (layout["rows"], layout["held_out_rows"], layout["percentile"], layout["margin"]) == (TRAIN_IMAGES * 5,
                                                                                                 120 * 5, 99.5, 1.2)
    assert layout["method"] == gate.LAYOUT_METHOD_TILTED
    config = PreprocessConfig(image_size=32)
    train = sorted(os.path.join(d, f) for d, _, fs in os.walk(training_dir) for f in fs if f.startswith("t"))
    want, _, _ = gate.derive_layout(np.stack([preprocess_image(p, config) for p in train]),
                                    np.stack([preprocess_image(p, config) for p in val]))
    assert layout["limit"] == pytest.approx(want["limit"], rel=1e-9)
    checks = verify_package(str(vdir))
    assert all(c.ok for c in checks)
    assert f"layout limit {layout['limit']:.2f}" in next(c.detail for c in checks if c.name == "input gate")
    card = " ".join((vdir / "MODEL_CARD.md").read_text().split())
    assert (f"{TRAIN_IMAGES * 5:,} rows must be at most **{layout['limit']:.1f}**, the 99.5th percentile of the "
            "distances of the 600 validation rows") in card
    meta = read_json(vdir / "metadata.json")
    for figure in ("limit", "held_out_quantile"):  # loosened by hand, the two edited to agree
        meta["gate"]["layout"][figure] *= 2
    (vdir / "metadata.json").write_text(json.dumps(meta))
    failed = [c for c in verify_package(str(vdir)) if not c.ok]
    assert [c.name for c in failed] == ["input gate"] and "layout limit" in failed[0].detail \
        and "re-derived" in failed[0].detail
    del meta["gate"]["layout"]  # dropped: gate.npz still holds it
    (vdir / "metadata.json").write_text(json.dumps(meta))
    failed = [c for c in verify_package(str(vdir)) if not c.ok]
    assert "holds a layout check that metadata.json does not record" in failed[0].detail


def _validation_images(training_dir: str, n: int) -> list[str]:
    """The first n of the 120 validation rows splits.csv lists (NORMAL/0.jpeg ...), written into the folder (the
    fixture's 0.jpeg, a constant image out of scope, replaced)."""
    rng, paths = np.random.default_rng(6), []
    for i in range(n):
        paths.append(os.path.join(training_dir, "NORMAL", f"{i}.jpeg"))
        Image.fromarray(rng.integers(40, 220, (48, 48), dtype=np.uint8)).save(paths[-1], format="PNG")
    return paths


@pytest.mark.parametrize("present", [0, 60])
def test_without_all_its_validation_images_the_gate_goes_without_the_layout_check_and_says_so(
        package, training_dir, tmp_path, capsys, present):
    """Review: 60 of the 120 validation images gave a layout limit from another sample than the reference's."""
    _validation_images(training_dir, present)
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    assert (f"input gate: no layout check: {present} of 120 validation-split images could be read, the reference "
            "has 120") in capsys.readouterr().out
    assert "layout" not in read_json(serving / "pneumonia" / "2" / "metadata.json")["gate"]


def test_a_version_with_a_layout_check_is_not_republished_without_one(package, training_dir, tmp_path, capsys):
    """Review: with one validation image gone, --add-gate from a version with a layout check published the new
    default without it (exit 0), and it scored the gray photographs the source refuses."""
    _validation_images(training_dir, 120)
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving), "--training-dir", training_dir]) == 0
    with_layout = serving / "pneumonia" / "2"
    assert "layout" in read_json(with_layout / "metadata.json")["gate"]
    os.remove(os.path.join(training_dir, "NORMAL", "7.jpeg"))
    capsys.readouterr()
    rc = export_main(["--add-gate", str(with_layout), "--training-dir", training_dir])
    assert_one_line_error(capsys, rc, "pneumonia/2", "its gate has a layout check that the fit on", "nothing published")
    assert sorted(os.listdir(serving / "pneumonia")) == ["1", "2", "config.pbtxt"]
