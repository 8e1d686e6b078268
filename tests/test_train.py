"""train.models, train.fit and the `python -m train` CLI, on tiny synthetic data.

Everything runs at 32 px for 1-2 epochs; the full CLI run happens once per module. The CLI's defaults are
checked against the shipped model's recorded training command and docs/training.md without training.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import shlex
import shutil
import stat
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from batch_job.synthetic import make_tree
from helpers import assert_one_line_error, sha256_of, textured
from train.__main__ import main as train_main
from train.__main__ import parse_args
from train.data import read_split_csv, read_split_digests
from train.models import (
    VGG19_WEIGHTS_FILE,
    WeightsError,
    build_cnn,
    build_resnet,
    keras,
    load_model,
    resolve_vgg19_weights,
    vgg19_parts,
)
from xray_core.metrics import operating_point
from xray_core.preprocessing import PreprocessConfig, preprocess_image

MODELS = ("baseline_cnn", "augmented_cnn", "vgg19", "resnet_aug")
PNGS = ("training_curves.png", "confusion_matrix_0.5.png", "confusion_matrix_chosen.png", "roc_curve.png",
        "samples.png")
SITE_PNGS = tuple("site_" + p for p in PNGS if p != "training_curves.png")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# -------------------------------------------------------------------- models


def _build(name):
    if name == "vgg19":
        return vgg19_parts(32, None)[0]
    if name == "resnet_aug":
        return build_resnet(32)
    return build_cnn(32, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_builds_saves_and_reloads(tmp_path, name):
    model = _build(name)
    assert model.name == name
    assert tuple(model.input_shape) == (None, 32, 32, 1)
    assert tuple(model.output_shape) == (None, 1)
    layers = list(_all_layers(model))
    assert layers, "no layers?"
    assert not [la.name for la in layers if isinstance(la, keras.layers.Lambda) or type(la).__name__ == "Lambda"]
    # augmentation lives in the input pipeline, never in the saved model
    assert not [la.name for la in layers if type(la).__name__.startswith("Random")]

    x = np.random.default_rng(0).uniform(0, 1, (5, 32, 32, 1)).astype(np.float32)
    before = model.predict(x, verbose=0)
    assert before.shape == (5, 1)
    assert np.all((before >= 0) & (before <= 1))
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = load_model(path)
    assert reloaded.name == name
    assert tuple(reloaded.input_shape) == (None, 32, 32, 1)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), before)


def test_vgg19_parts_compose_and_base_is_frozen():
    full, extractor, head = vgg19_parts(32, None)
    assert extractor.trainable_weights == []
    assert len(head.trainable_weights) == 10  # 5 Dense layers: kernel + bias each
    assert tuple(extractor.output_shape) == (None, 1, 1, 512)  # 32 px / 2**5
    x = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(
        full.predict(x, verbose=0), head.predict(extractor.predict(x, verbose=0), verbose=0), atol=1e-6
    )


def test_resolve_vgg19_weights(tmp_path, monkeypatch):
    cache = tmp_path / "keras_home"
    cache.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(cache))
    with pytest.raises(WeightsError) as info:
        resolve_vgg19_weights("imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert os.path.join(str(cache), "models", VGG19_WEIGHTS_FILE) in msg
    assert "none" in msg
    assert not os.path.exists(cache / "models")  # nothing downloaded or created

    assert resolve_vgg19_weights("none") is None
    assert resolve_vgg19_weights("None") is None
    with pytest.raises(WeightsError, match="not found"):
        resolve_vgg19_weights(str(tmp_path / "missing.h5"))
    own = tmp_path / "own.h5"
    own.write_bytes(b"x")
    assert resolve_vgg19_weights(str(own)) == str(own)
    (cache / "models").mkdir()
    (cache / "models" / VGG19_WEIGHTS_FILE).write_bytes(b"x")
    assert resolve_vgg19_weights("imagenet") == os.path.join(str(cache), "models", VGG19_WEIGHTS_FILE)


# ---------------------------------------------------------------------- fit


def _toy(n, rng):
    y = np.tile([0.0, 1.0], n // 2).astype(np.float32)
    x = rng.uniform(0, 0.5, (n, 32, 32, 1)).astype(np.float32)
    x[y == 1, 8:24, 8:24, :] += 0.5
    return x, y


@pytest.mark.slow
def test_fit_early_stopping_restores_best_weights():
    from train import fit

    rng = np.random.default_rng(0)
    train_xy = _toy(32, rng)
    x_val, y_val = _toy(16, rng)
    y_val[:6] = 1 - y_val[:6]  # partly contradicts training, so val loss turns worse
    keras.utils.set_random_seed(3)  # initial weights independent of what ran before
    model = build_cnn(32, filters=(4,), dense=8, dropout=0.0)
    lines = []
    history = fit.fit(model, train_xy, (x_val, y_val), name="toy", epochs=8, patience=2, seed=0,
                      learning_rate=0.01, log=lines.append)

    val_loss = history["val_loss"]
    n = len(val_loss)
    assert history["best_epoch"] == int(np.argmin(val_loss)) + 1
    # early stopping ran: patience epochs after the best, and the best is not the last epoch,
    # so restoring the best weights actually changed the model
    assert n == history["best_epoch"] + 2 and n < 8, val_loss
    assert val_loss[-1] > min(val_loss) + 1e-2, val_loss
    assert history["best_epoch"] >= 2  # not simply the first epoch
    assert len(history["loss"]) == len(history["seconds"]) == len(lines) == n
    assert lines[0].startswith("[toy] epoch 1/8  loss ")

    loss, _auc = model.evaluate(x_val, y_val, batch_size=32, verbose=0)
    assert loss == pytest.approx(min(val_loss), abs=1e-4)
    # the same by hand: binary cross-entropy (Keras clips p to [1e-7, 1 - 1e-7])
    p = np.clip(model.predict(x_val, verbose=0).reshape(-1).astype(np.float64), 1e-7, 1 - 1e-7)
    bce = -np.mean(y_val * np.log(p) + (1 - y_val) * np.log(1 - p))
    assert bce == pytest.approx(min(val_loss), abs=1e-4)


def test_class_weights_balanced():
    from train.fit import class_weights

    # 2 NORMAL, 6 PNEUMONIA: n / (2 * count) -> 8/4 = 2.0 and 8/12 = 2/3
    w = class_weights(np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=np.float32))
    assert w == {0: pytest.approx(2.0), 1: pytest.approx(2 / 3)}


# ------------------------------------------------------------- CLI end to end

CORRUPT_NAME = "person999_bacteria_999.jpeg"
PHOTO_NAME = "IM-9999-0001.jpeg"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_cli")
    data = base / "data"
    images = make_tree(str(data), per_class=24, size=48, seed=0)
    corrupt = data / "PNEUMONIA" / CORRUPT_NAME
    corrupt.write_text("not an image at all\n")
    photo = data / "NORMAL" / PHOTO_NAME  # what the batch job leaves out of scope is not trained on either
    Image.merge("RGB", [textured((48, 48), m, seed=m) for m in (180, 120, 60)]).save(photo, quality=95)
    site = base / "site"
    site_images = make_tree(str(site), per_class=10, size=48, seed=7)
    out = base / "runs" / "run1"
    argv = ["--data-dir", str(data), "--output-dir", str(out), "--models", ",".join(MODELS), "--image-size", "32",
            "--epochs", "2", "--patience", "1", "--vgg19-weights", "none", "--site-dir", str(site), "--ensemble", "2"]
    rc = train_main(argv)
    return {"rc": rc, "out": out, "data": data, "images": images, "corrupt": str(corrupt), "argv": argv,
            "site": site, "site_images": site_images, "photo": str(photo)}


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_cli_run_succeeds_and_leaves_no_temp_dirs(cli_run):
    assert cli_run["rc"] == 0
    assert os.listdir(cli_run["out"].parent) == ["run1"]
    assert sorted(os.listdir(cli_run["out"])) == sorted(
        ["split.csv", "comparison.json", "comparison.md", "run.json", *MODELS])
    # QA: written 0644/0755 under umask 022, though split.csv names patients' files and PatientIDs: owner and group
    for dirpath, _, files in os.walk(cli_run["out"].parent):
        for path in [dirpath] + [os.path.join(dirpath, f) for f in files]:
            assert os.stat(path).st_mode & 0o027 == 0, path


@pytest.mark.slow
def test_with_a_site_sample_the_best_model_is_the_best_on_the_site(cli_run):
    """The default selection with --site-dir: site ROC AUC (the run trains all four models)."""
    with open(cli_run["out"] / "comparison.json") as f:
        comp = json.load(f)
    aucs = {r["model"]: r["site_roc_auc"] for r in comp["models"]}
    assert comp["select_by"] == "site_roc_auc" and len(aucs) == 4
    assert comp["best"] == max(aucs, key=aucs.get)


@pytest.mark.slow
def test_cli_split_csv(cli_run):
    path = cli_run["out"] / "split.csv"
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "label", "split", "patient", "sha256"]
    rows = read_split_csv(path)
    digests = read_split_digests(path)  # each image's content as train read it (export checks it has not changed)
    assert digests == {ex.path: sha256_of(ex.path) for ex, _ in rows}
    assert sorted(ex.path for ex, _ in rows) == sorted(cli_run["images"])  # corrupt one left out
    assert cli_run["corrupt"] not in {ex.path for ex, _ in rows}
    assert {s for _, s in rows} == {"train", "val", "test"}
    by_patient = defaultdict(set)
    for ex, s in rows:
        by_patient[ex.patient].add(s)
        assert ex.label == os.path.basename(os.path.dirname(ex.path))
    assert len(by_patient) == 24  # 12 IM-1xxx + 12 personNNN, two images each
    assert all(len(v) == 1 for v in by_patient.values())
    for split in ("train", "val", "test"):
        labels = {ex.label for ex, s in rows if s == split}
        assert labels == {"NORMAL", "PNEUMONIA"}, split


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cli_model_outputs(cli_run, name):
    d = cli_run["out"] / name
    for png in PNGS + SITE_PNGS:
        with Image.open(d / png) as img:
            assert img.format == "PNG" and img.size[0] > 100, png
    history = _json(d / "history.json")
    assert 1 <= len(history["loss"]) <= 2
    assert len(history["val_loss"]) == len(history["loss"])
    if name == "resnet_aug":  # cosine schedule, no early stopping: the last epoch's weights; 2 members
        assert len(history["loss"]) == 2 and history["best_epoch"] == 2
        assert [len(h["loss"]) for h in history["members"]] == [2, 2]
        assert len(history["seconds"]) == 4
    else:
        assert len(history["seconds"]) == len(history["loss"])
        assert history["best_epoch"] == int(np.argmin(history["val_loss"])) + 1
    if name == "vgg19":
        assert history["feature_seconds"] >= 0

    m = _json(d / "metrics.json")
    assert m["model"] == name
    assert m["target_recall"] == 0.95
    assert m["preprocessing"] == PreprocessConfig(image_size=32).to_dict()
    assert m["test_at_0.5"]["threshold"] == 0.5
    assert m["test_at_chosen"]["threshold"] == m["chosen_threshold"]
    assert 0.0 <= m["chosen_threshold"] <= 1.0
    rows = read_split_csv(cli_run["out"] / "split.csv")
    n_test = sum(1 for _, s in rows if s == "test")
    n_val = sum(1 for _, s in rows if s == "val")
    assert m["test_at_0.5"]["n"] == m["test_at_chosen"]["n"] == n_test
    assert m["val_at_chosen"]["n"] == n_val
    # the chosen threshold reaches the target recall on validation (its defining property)
    assert m["val_at_chosen"]["recall"] >= 0.95
    # the site sample: all of it, at 0.5, at the validation threshold, and at its own threshold
    assert m["site_at_0.5"]["n"] == m["site_at_chosen"]["n"] == len(cli_run["site_images"]) == 20
    assert m["site_at_chosen"]["threshold"] == m["chosen_threshold"]
    assert m["site_at_site_threshold"]["recall"] >= 0.95
    assert m["site_roc_auc"] == m["site_at_0.5"]["roc_auc"]
    if name == "resnet_aug":
        assert [r["model"] for r in m["members"]] == ["resnet_aug_m0", "resnet_aug_m1"]
        for r in m["members"]:
            assert 0 <= r["site_roc_auc"] <= 1 and 0 <= r["test_roc_auc"] <= 1 and r["seconds"] > 0
    else:
        assert "members" not in m


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_cli_saved_model_reproduces_test_metrics(cli_run, name):
    """model.keras is the model that was evaluated: reloading it and scoring the test split
    from split.csv gives the same confusion matrices and ROC AUC as metrics.json."""
    from train.fit import predict

    m = _json(cli_run["out"] / name / "metrics.json")
    config = PreprocessConfig.from_dict(m["preprocessing"])
    test = [(ex, s) for ex, s in read_split_csv(cli_run["out"] / "split.csv") if s == "test"]
    x = np.stack([preprocess_image(ex.path, config) for ex, _ in test])
    y = np.array([ex.label == "PNEUMONIA" for ex, _ in test], dtype=float)
    model = load_model(str(cli_run["out"] / name / "model.keras"))
    p = predict(model, x)
    for key, thr in (("test_at_0.5", 0.5), ("test_at_chosen", m["chosen_threshold"])):
        # skip decisions sitting within float noise of the threshold (cannot be compared)
        if np.min(np.abs(p - thr)) < 1e-6:
            continue
        got = operating_point(y, p, thr)
        assert got["confusion_matrix"]["matrix"] == m[key]["confusion_matrix"]["matrix"], key
    assert operating_point(y, p, 0.5)["roc_auc"] == pytest.approx(m["test_at_0.5"]["roc_auc"], abs=1e-9)

    # site_predictions.csv holds every site image with the reloaded model's probability
    with open(cli_run["out"] / name / "site_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(cli_run["site_images"])
    x_site = np.stack([preprocess_image(r["path"], config) for r in rows])
    np.testing.assert_allclose(predict(model, x_site), [float(r["probability"]) for r in rows], atol=2e-6)
    y_site = np.array([r["label"] == "PNEUMONIA" for r in rows], dtype=float)
    assert operating_point(y_site, [float(r["probability"]) for r in rows], 0.5)["roc_auc"] == pytest.approx(
        m["site_roc_auc"], abs=1e-5)


@pytest.mark.slow
def test_cli_comparison(cli_run):
    comp = _json(cli_run["out"] / "comparison.json")
    assert comp["select_by"] == "site_roc_auc"  # the default with --site-dir
    assert [r["model"] for r in comp["models"]] == list(MODELS)
    aucs = [r["site_roc_auc"] for r in comp["models"]]
    assert comp["best"] == MODELS[int(np.argmax(aucs))]  # first of any tie, like max()
    for row in comp["models"]:
        m = _json(cli_run["out"] / row["model"] / "metrics.json")
        h = _json(cli_run["out"] / row["model"] / "history.json")
        assert row["val_roc_auc"] == m["val_roc_auc"]
        assert row["chosen_threshold"] == m["chosen_threshold"]
        assert row["best_epoch"] == h["best_epoch"] and row["epochs_run"] == len(h["loss"])
        assert row["test_at_chosen.recall"] == m["test_at_chosen"]["recall"]
        assert row["test_at_0.5.specificity"] == m["test_at_0.5"]["specificity"]
        assert row["val_specificity"] == m["val_at_chosen"]["specificity"]
        assert row["site_roc_auc"] == m["site_roc_auc"]
        assert row["site_at_chosen.specificity"] == m["site_at_chosen"]["specificity"]
        assert row["site_specificity_at_target_recall"] == m["site_at_site_threshold"]["specificity"]
    assert comp["skipped_images"] == [
        {"path": cli_run["photo"], "error": "out of scope: colour image (mean channel spread 120.0 > 8)"},
        {"path": cli_run["corrupt"], "error": "not a decodable image"}]

    md = (cli_run["out"] / "comparison.md").read_text()
    assert f"Best by `site_roc_auc`: **{comp['best']}**" in md
    site_part, internal_part = md.split("## Internal test split")
    assert "## Site sample first" in site_part
    for name in MODELS:  # two operating points in each table
        assert sum(1 for line in site_part.splitlines() if line.startswith(f"| {name} |")) == 2
        assert sum(1 for line in internal_part.splitlines() if line.startswith(f"| {name} |")) == 2
    assert "Skipped images (undecodable, or out of scope for the batch job): 2" in md
    assert f"- `{cli_run['corrupt']}`: not a decodable image" in md


@pytest.mark.slow
def test_cli_run_json(cli_run):
    info = _json(cli_run["out"] / "run.json")
    assert (info["images_found"], info["images_used"], info["images_skipped"]) == (50, 48, 2)
    assert info["data_dir"] == os.path.abspath(cli_run["data"])
    assert info["preprocessing"]["image_size"] == 32
    assert info["args"]["epochs"] == 2 and info["args"]["models"] == "baseline_cnn,augmented_cnn,vgg19,resnet_aug"
    # the defaults the command did not set
    assert (info["args"]["seed"], info["args"]["last_stride"], info["args"]["select_by"]) == (1, 1, "site_roc_auc")
    assert info["site_dir"] == os.path.abspath(cli_run["site"])
    rows = read_split_csv(cli_run["out"] / "split.csv")
    for split in ("train", "val", "test"):
        members = [ex for ex, s in rows if s == split]
        assert info["split_counts"][split] == {
            "images": len(members), "pneumonia": sum(ex.label == "PNEUMONIA" for ex in members)}
    assert sum(c["images"] for c in info["split_counts"].values()) == 48


@pytest.mark.slow
def test_cli_run_json_records_the_given_command(cli_run):
    info = _json(cli_run["out"] / "run.json")
    assert info["command"] == "python -m train " + shlex.join(cli_run["argv"])  # pastes into a shell (QA)


@pytest.mark.slow
def test_cli_run_dir_has_default_permissions(cli_run):
    """Not mkdtemp's 0700: a plain mkdir's under the user's umask, with group write and others' access taken away
    (patient data: xray_core.files.private_umask)."""
    expected = 0o777 & ~(_umask() | 0o027)
    if expected == 0o700:
        pytest.skip("umask makes 0700 the default anyway")
    assert stat.S_IMODE(os.stat(cli_run["out"]).st_mode) == expected


# ---------------------------------------------------------------- CLI errors


def _expect_error(capsys, argv, *fragments):
    return assert_one_line_error(capsys, train_main(argv), *fragments)


def _args(data, out, *extra):
    return ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--epochs", "1",
            "--vgg19-weights", "none", *extra]


def test_cli_error_missing_data_dir(tmp_path, capsys):
    _expect_error(capsys, _args(tmp_path / "nope", tmp_path / "run"), "data directory not found",
                  str(tmp_path / "nope"))
    assert os.listdir(tmp_path) == []


def test_cli_error_no_images(tmp_path, capsys):
    (tmp_path / "data" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "PNEUMONIA").mkdir()
    (tmp_path / "data" / "NORMAL" / "a.txt").write_text("x")
    (tmp_path / "data" / "PNEUMONIA" / "b.gif").write_bytes(b"GIF89a")
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run"), "no images")
    assert os.listdir(tmp_path) == ["data"]


def test_cli_error_empty_class(tmp_path, capsys):
    paths = make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    for p in paths:
        if "/PNEUMONIA/" in p:
            os.remove(p)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run"), "class PNEUMONIA has no images")
    assert os.listdir(tmp_path) == ["data"]


def test_cli_error_split_lacks_a_class(tmp_path, capsys):
    # one patient per class: val and test cannot hold both classes; fails after the temp
    # run dir exists, which must be removed
    make_tree(str(tmp_path / "data"), per_class=2, size=48, seed=2)
    # QA: the message named --split, which cannot help: it names the class and its patients now
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run"), "class NORMAL has 2 decodable images of 1 "
                  "patient(s); train, val and test each need one patient of each class: at least 3 patients a class")
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("models, fragment", [
    ("baseline_cnn,resnet50", "resnet50"),
    ("vgg16", "vgg16"),
    (",", "unknown model"),
])
def test_cli_error_unknown_model(tmp_path, capsys, models, fragment):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run", "--models", models), "unknown model",
                  fragment)
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("split", ["0.5,0.3,0.3", "0.7,0.3", "0.8,0.2,0", "a,b,c"])
def test_cli_error_bad_split(tmp_path, capsys, split):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run", "--split", split), "--split must be")
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("where", ["the data dir", "inside a class folder", "above the data dir", "the site dir",
                                   "a file", "the working directory", "above the teacher"])
def test_cli_refuses_an_output_dir_over_its_inputs_even_with_overwrite(tmp_path, capsys, monkeypatch, where):
    """QA defect (data loss): `--output-dir` naming the data dir (or a folder holding it, the site dir, a plain file)
    with --overwrite replaced it by the run: every training image deleted. Inside a class folder the next run
    trained on the previous run's plots. Each is refused before anything is written."""
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    make_tree(str(tmp_path / "site"), per_class=4, size=48, seed=2)
    (tmp_path / "notes.txt").write_text("keep me")
    out = {"the data dir": tmp_path / "data", "inside a class folder": tmp_path / "data" / "NORMAL" / "run1",
           "above the data dir": tmp_path, "the site dir": tmp_path / "site", "a file": tmp_path / "notes.txt",
           "the working directory": tmp_path / "work", "above the teacher": tmp_path / "serving"}[where]
    from helpers import REPO

    (tmp_path / "work").mkdir()
    shutil.copytree(os.path.join(REPO, "serving_models", "pneumonia", "6"), tmp_path / "serving" / "pneumonia" / "6")
    monkeypatch.chdir(tmp_path / "work")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    extra = ["--overwrite", "--site-dir", str(tmp_path / "site")]
    if where == "above the teacher":
        extra += ["--teacher", str(tmp_path / "serving" / "pneumonia" / "6"), "--models", "resnet_aug",
                  "--image-size", "64"]
    fragment = "exists and is not a folder" if where == "a file" else "--output-dir must not overlap"
    _expect_error(capsys, _args(tmp_path / "data", out, *extra), fragment)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("value", ["", "  ", "two\nlines", "x" * 301])
def test_cli_refuses_a_data_source_that_is_not_one_short_line(tmp_path, capsys, value):
    """--data-source becomes one line of the model card and of every report."""
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run", "--data-source", value),
                  "--data-source must be one line of at most 300 printable characters")
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--learning-rate", "-1"), ("--learning-rate", "0")])
def test_cli_refuses_a_batch_size_or_learning_rate_that_cannot_train(tmp_path, capsys, flag, value):
    """QA defect: --batch-size 0 ended in a ZeroDivisionError traceback; --learning-rate -1 trained."""
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run", flag, value),
                  "--batch-size must be >= 1 and --learning-rate > 0")
    assert os.listdir(tmp_path) == ["data"]


def test_cli_a_refused_run_leaves_no_parent_folder_it_made(tmp_path, capsys):
    """QA defect: a run refused after it started (here: a split without both classes) left the parent folders of
    --output-dir it had made."""
    make_tree(str(tmp_path / "data"), per_class=2, size=48, seed=2)
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "np" / "a" / "b" / "run"), "at least 3 patients")
    assert os.listdir(tmp_path) == ["data"]


def test_a_run_removes_the_temp_folders_runs_killed_outright_left_for_its_run_dir(tmp_path, capsys):
    """Known since the twelfth session: a SIGKILLed run left RUN_DIR.tmp-XXXXXXXX for good. A run now holds a lock in
    its temp folder; the next run for that RUN_DIR removes the ones whose lock is free, and nothing else."""
    from xray_core.files import LOCK_FILE, hold_lock

    make_tree(str(tmp_path / "data"), per_class=2, size=48, seed=2)
    names = ["run.tmp-abcd1234", "run.tmp-held5678", "run.tmp-nolock12", "run.tmp-link1234", "other.tmp-abcd1234"]
    for name in names[:3] + names[4:]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "split.csv").write_text("path,label,split,patient\n")
    for name in ("run.tmp-abcd1234", "run.tmp-held5678", "other.tmp-abcd1234"):
        (tmp_path / name / LOCK_FILE).write_text("1@host\n")
    os.symlink(tmp_path / "run.tmp-abcd1234", tmp_path / "run.tmp-link1234")
    held = hold_lock(str(tmp_path / "run.tmp-held5678"))  # a run still at work
    try:
        rc = train_main(_args(tmp_path / "data", tmp_path / "run"))  # refused later: a split without both classes
    finally:
        held.close()
    out, err = capsys.readouterr()
    assert rc == 2 and "at least 3 patients" in err
    assert f"removed run.tmp-abcd1234, left by a run killed while writing {tmp_path / 'run'}" in out + err
    assert "held5678" not in out + err
    assert sorted(os.listdir(tmp_path)) == sorted(["data", *names[1:]])  # its own temp folder is gone too
    assert os.path.islink(tmp_path / "run.tmp-link1234")  # a link is never followed into


def test_cli_refuses_site_images_found_in_the_training_folder_under_any_name(tmp_path, capsys):
    """QA defect (leakage): site-sample files copied into the training folder were trained on without a word, and
    the site ROC AUC, the number to trust, was then computed on images the model saw."""
    make_tree(str(tmp_path / "data"), per_class=6, size=48, seed=1)
    make_tree(str(tmp_path / "site"), per_class=4, size=48, seed=2)
    site_file = sorted((tmp_path / "site" / "PNEUMONIA").iterdir())[0]
    shutil.copy(site_file, tmp_path / "data" / "NORMAL" / "renamed.png")
    _expect_error(capsys, _args(tmp_path / "data", tmp_path / "run", "--site-dir", str(tmp_path / "site")),
                  "1 images of --site-dir", "are also in --data-dir", str(site_file), "never trained on")
    assert sorted(os.listdir(tmp_path)) == ["data", "site"]


def test_the_same_bytes_under_both_labels_are_left_out_and_said():
    """QA defect: one file filed under NORMAL and, renamed, under PNEUMONIA was trained with both labels."""
    from train.data import Example, label_conflicts

    examples = [Example("d/NORMAL/a.png", "NORMAL", "a"), Example("d/PNEUMONIA/a2.png", "PNEUMONIA", "a2"),
                Example("d/NORMAL/b.png", "NORMAL", "b"), Example("d/NORMAL/b2.png", "NORMAL", "b2"),
                Example("d/PNEUMONIA/c.png", "PNEUMONIA", "c")]
    keep, left = label_conflicts(examples, ["x", "x", "y", "y", "z"])
    assert keep == [2, 3, 4]  # a duplicate with one label stays (grouped as one patient by the split)
    assert left == [("d/NORMAL/a.png", "the same bytes are filed under both NORMAL and PNEUMONIA"),
                    ("d/PNEUMONIA/a2.png", "the same bytes are filed under both NORMAL and PNEUMONIA")]


def test_cli_error_vgg19_imagenet_weights_missing(tmp_path, capsys, monkeypatch):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    (tmp_path / "keras_home").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    argv = _args(tmp_path / "data", tmp_path / "run", "--models", "vgg19")
    argv[argv.index("--vgg19-weights") + 1] = "imagenet"
    line = _expect_error(capsys, argv, "VGG19 ImageNet weights not found",
                         os.path.join(str(tmp_path / "keras_home"), "models", VGG19_WEIGHTS_FILE), "none")
    assert line.startswith("error: VGG19")
    assert sorted(os.listdir(tmp_path)) == ["data", "keras_home"]
    assert os.listdir(tmp_path / "keras_home") == []


@pytest.mark.slow
def test_cli_existing_output_dir_and_overwrite(tmp_path, capsys, cli_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    _expect_error(capsys, _args(cli_run["data"], out, "--models", "baseline_cnn"), "exists and is not empty",
                  "--overwrite")
    assert os.listdir(out) == ["old.txt"]

    # --overwrite with a run that then fails keeps the old contents
    make_tree(str(tmp_path / "tiny"), per_class=2, size=48, seed=2)
    _expect_error(capsys, _args(tmp_path / "tiny", out, "--models", "baseline_cnn", "--overwrite"),
                  "at least 3 patients a class")
    assert os.listdir(out) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["run", "tiny"]

    rc = train_main(_args(cli_run["data"], out, "--models", "baseline_cnn", "--overwrite"))
    assert rc == 0
    capsys.readouterr()
    assert sorted(os.listdir(out)) == ["baseline_cnn", "comparison.json", "comparison.md", "run.json",
                                       "split.csv"]
    assert _json(out / "comparison.json")["best"] == "baseline_cnn"
    assert os.path.isfile(out / "baseline_cnn" / "model.keras")
    assert sorted(os.listdir(tmp_path)) == ["run", "tiny"]  # no .tmp-/.old- leftovers
    # same data, seed and split as the module run: the same split.csv
    assert (out / "split.csv").read_text() == (cli_run["out"] / "split.csv").read_text()


# ------------------------------------------------- CLI defaults (no training)

DIRS = ("--data-dir", "D", "--output-dir", "R")
RECIPE = {"models": "resnet_aug", "image_size": 64, "ensemble": 2, "epochs": 24, "last_stride": 1, "seed": 1,
          "pointwise_stages": 1, "pool": "avg"}
# the rest of the shipped run's settings: the defaults of its time, which its recorded command relied on
RECIPE_REST = {"patience": 20, "split": "0.70,0.15,0.15", "target_recall": 0.95, "batch_size": 32,
               "learning_rate": 1e-3, "mixup": 0.0, "crop_min_area": 0.5, "augment": "recipe",
               "vgg19_weights": "imagenet", "limit_per_class": None, "overwrite": False}
STUDY = {"models": "baseline_cnn,augmented_cnn,vgg19", "image_size": 128, "epochs": 100, "patience": 20, "seed": 42}


def _parse(*argv) -> dict:
    return vars(parse_args(list(argv)))


def _shipped_metadata() -> dict:
    """metadata.json of the shipped default: the newest version in serving_models/pneumonia."""
    versions = glob.glob(os.path.join(ROOT, "serving_models", "pneumonia", "*", "metadata.json"))
    newest = max(versions, key=lambda p: int(os.path.basename(os.path.dirname(p))))
    return _json(newest)


def _train_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "train"], command
    return argv[3:]


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "exit codes:" in text
    assert [line.split()[0] for line in text.split("exit codes:")[1].splitlines()
            if re.match(r"  \d", line)] == ["0", "1", "2", "130", "143"]


def test_defaults_are_the_shipped_recipe():
    args = _parse(*DIRS, "--site-dir", "S")
    assert {k: args[k] for k in RECIPE} == RECIPE
    assert {k: args[k] for k in RECIPE_REST} == RECIPE_REST
    assert args["select_by"] == "site_roc_auc" and args["study"] is False


def test_select_by_default_follows_the_site_sample():
    assert _parse(*DIRS)["select_by"] == "val_roc_auc"  # site_roc_auc would need --site-dir
    assert _parse(*DIRS, "--site-dir", "S")["select_by"] == "site_roc_auc"
    assert _parse(*DIRS, "--site-dir", "S", "--select-by", "val_f1")["select_by"] == "val_f1"
    assert _parse(*DIRS, "--select-by", "site_roc_auc")["select_by"] == "site_roc_auc"  # run() refuses it


def test_study_gives_the_study_settings():
    args = _parse(*DIRS, "--study")
    assert {k: args[k] for k in STUDY} == STUDY
    assert args["study"] is True and args["select_by"] == "val_roc_auc"
    default = _parse(*DIRS)
    # every other option keeps its default
    assert {k: v for k, v in args.items() if k not in STUDY and k != "study"} == \
        {k: v for k, v in default.items() if k not in STUDY and k != "study"}


def test_explicit_options_win_over_study():
    # before and after --study alike
    args = _parse("--epochs", "25", *DIRS, "--study", "--patience", "5", "--image-size", "64",
                  "--models", "baseline_cnn", "--seed", "3", "--select-by", "val_f1")
    assert {k: args[k] for k in STUDY} == {"models": "baseline_cnn", "image_size": 64, "epochs": 25,
                                           "patience": 5, "seed": 3}
    assert args["select_by"] == "val_f1"
    # the study's other settings stay
    args = _parse(*DIRS, "--study", "--epochs", "25", "--patience", "5", "--vgg19-weights", "none")
    assert (args["models"], args["image_size"], args["seed"]) == (STUDY["models"], 128, 42)
    assert (args["epochs"], args["patience"], args["vgg19_weights"]) == (25, 5, "none")


def test_shipped_train_command_equals_the_default_command():
    """The shipped model's recorded command sets nothing the folders alone would not: same training arguments."""
    recorded = _parse(*_train_argv(_shipped_metadata()["source"]["train_command"]))
    minimal = _parse("--data-dir", recorded["data_dir"], "--site-dir", recorded["site_dir"],
                     "--output-dir", recorded["output_dir"])
    assert recorded == minimal


def _doc_commands(path) -> list[str]:
    """The shell commands of a markdown file's code blocks, continuation lines joined, comments dropped."""
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", f.read(), flags=re.S | re.M)
    lines = re.sub(r"\\\n", " ", "\n".join(blocks)).splitlines()
    return [" ".join(line.split("  #")[0].split()) for line in lines if line.strip().startswith("python -m ")]


def test_training_docs_carry_the_shipped_commands():
    source = _shipped_metadata()["source"]
    commands = _doc_commands(os.path.join(ROOT, "docs", "training.md"))
    assert source["train_command"] in commands
    assert source["export_command"] in commands
    recorded = _parse(*_train_argv(source["train_command"]))
    # the short form in the docs trains the same
    short = [c for c in commands if c.startswith("python -m train ") and c != source["train_command"]
             and _parse(*_train_argv(c)) == recorded]
    assert short and all(len(c) < len(source["train_command"]) for c in short)
    for command in commands:  # every documented training command parses
        if command.startswith("python -m train "):
            _parse(*_train_argv(command))


@pytest.mark.slow
def test_sigterm_removes_the_partial_run_and_exits_143(tmp_path):
    """QA: SIGTERM (docker stop, systemd) killed training outright and left its run.tmp-* folder for good; Ctrl-C
    already removed it. Sent once the partial run exists."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    make_tree(str(tmp_path / "data"), per_class=30, size=48, seed=4)
    proc = subprocess.Popen([sys.executable, "-m", "train", "--data-dir", str(tmp_path / "data"), "--output-dir",
                             str(tmp_path / "run"), "--image-size", "32", "--epochs", "200", "--ensemble", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(tmp_path / "run.tmp-*" / "split.csv")):
        time.sleep(0.1)
    assert glob.glob(str(tmp_path / "run.tmp-*")), "training never started its run"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); RUN_DIR not published"
    assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.slow
def test_a_run_killed_outright_leaves_a_locked_temp_folder_the_next_run_removes(tmp_path, capsys):
    """SIGKILL gives a run no chance to clean up: its RUN_DIR.tmp-XXXXXXXX stays, with the lock file the next run
    for that RUN_DIR recognises as a dead run's."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from xray_core.files import LOCK_FILE

    make_tree(str(tmp_path / "data"), per_class=30, size=48, seed=4)
    proc = subprocess.Popen([sys.executable, "-m", "train", "--data-dir", str(tmp_path / "data"), "--output-dir",
                             str(tmp_path / "run"), "--image-size", "32", "--epochs", "200", "--ensemble", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(tmp_path / "run.tmp-*" / "split.csv")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (left,) = glob.glob(str(tmp_path / "run.tmp-*"))
    assert os.path.isfile(os.path.join(left, LOCK_FILE))
    make_tree(str(tmp_path / "tiny"), per_class=2, size=48, seed=2)
    assert train_main(_args(tmp_path / "tiny", tmp_path / "run")) == 2  # refused after the clean-up
    assert f"removed {os.path.basename(left)}, left by a run killed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["data", "tiny"]
