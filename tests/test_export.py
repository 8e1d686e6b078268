"""`python -m export`: ONNX conversion, parity, versioned atomic publishing, --verify.

One tiny training run of all three architectures (32 px, 1 epoch) is exported once per module
as versions 1, 2, 3; the other tests copy from it or publish into their own serving dirs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from export.__main__ import main as export_main
from helpers import assert_one_line_error
from train.__main__ import main as train_main
from train.data import read_split_csv
from xray_core.preprocessing import PreprocessConfig, preprocess_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("baseline_cnn", "augmented_cnn", "vgg19")  # resnet_aug: the --calibrate-dir tests below
CHECKS = ["metadata", "sha256", "onnx.checker", "onnxruntime", "input contract", "output contract", "zero batch"]


def _json(path):
    with open(path) as f:
        return json.load(f)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _snapshot(root):
    """{relative path: sha256 or 'dir'} of everything under root ({} if it does not exist)."""
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            snap[os.path.relpath(p, root)] = _sha256(p)
    return snap


def _export(run_dir, serving_dir, *extra):
    return export_main(["--run-dir", str(run_dir), "--serving-dir", str(serving_dir), "--name", "pneumonia",
                        *extra])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    data = base / "data"
    make_tree(str(data), per_class=40, size=48, seed=0)
    run = base / "run"
    rc = train_main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32", "--epochs", "1",
                     "--vgg19-weights", "none", "--models", "baseline_cnn,augmented_cnn,vgg19"])
    assert rc == 0
    serving = base / "serving_models"
    rcs = [_export(run, serving, "--model", arch) for arch in ARCHS]
    return {"base": base, "run": run, "serving": serving, "name_dir": serving / "pneumonia", "rcs": rcs,
            "data": data}


def _vdir(published, version):
    return published["name_dir"] / str(version)


def _copy_version(published, version, dest):
    shutil.copytree(_vdir(published, version), dest)
    return dest


# ---------------------------------------------------------------- publishing


@pytest.mark.slow
def test_three_versions_in_order(published):
    assert published["rcs"] == [0, 0, 0]
    assert sorted(os.listdir(published["name_dir"])) == ["1", "2", "3", "config.pbtxt"]
    for version, arch in enumerate(ARCHS, start=1):
        d = _vdir(published, version)
        assert sorted(os.listdir(d)) == ["MODEL_CARD.md", "metadata.json", "model.onnx"]
        meta = _json(d / "metadata.json")
        assert (meta["version"], meta["architecture"]) == (version, arch)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2, 3])
def test_verify_published_versions(published, version, capsys):
    d = str(_vdir(published, version))
    assert export_main(["--verify", d]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"PASS {c}" for c in CHECKS]
    assert lines[-1] == f"OK: {d}"


@pytest.mark.slow
@pytest.mark.parametrize("version, arch", list(enumerate(ARCHS, start=1)))
def test_metadata(published, version, arch):
    d = _vdir(published, version)
    meta = _json(d / "metadata.json")
    run = published["run"]
    metrics = _json(run / arch / "metrics.json")
    assert meta["name"] == "pneumonia"
    assert meta["version"] == version
    assert meta["architecture"] == arch
    assert meta["preprocessing"] == metrics["preprocessing"] == PreprocessConfig(image_size=32).to_dict()
    assert meta["input"] == {"name": "image", "dtype": "float32", "shape": [-1, 32, 32, 1]}
    assert meta["output"] == {"name": "probability", "dtype": "float32", "shape": [-1, 1]}
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert meta["decision_threshold"] == metrics["chosen_threshold"]
    assert meta["target_recall"] == 0.95
    assert set(meta["test_metrics"]) == {"at_0.5", "at_chosen"}
    for key, src in (("at_0.5", "test_at_0.5"), ("at_chosen", "test_at_chosen")):
        expected = {k: v for k, v in metrics[src].items() if k != "classification_report"}
        assert meta["test_metrics"][key] == expected
    assert meta["test_metrics"]["at_chosen"]["threshold"] == meta["decision_threshold"]

    parity = meta["parity"]
    assert parity["max_abs_diff"] <= 1e-5
    assert parity["decisions_equal"] is True
    assert parity["images"] >= 66
    assert parity["images"] == parity["split_images"] + parity["edge_inputs"]
    assert parity["edge_inputs"] == 2 and parity["split_images"] == 64

    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    assert meta["versions"]["onnx"] == onnx.__version__
    assert meta["versions"]["onnxruntime"] == onnxruntime.__version__
    assert meta["versions"]["tensorflow"] == tf.__version__
    assert meta["versions"]["tf2onnx"] == tf2onnx.__version__
    assert set(meta["versions"]) == {"python", "tensorflow", "tf_keras", "tf2onnx", "onnx", "onnxruntime"}
    assert meta["opset"] == 17
    opsets = {o.domain: o.version for o in onnx.load(str(d / "model.onnx")).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17
    assert meta["sha256"] == _sha256(d / "model.onnx")
    created = datetime.fromisoformat(meta["created_utc"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    assert meta["source"]["model_file"] == os.path.join(str(run), arch, "model.keras")
    assert meta["source"]["split_counts"] == _json(run / "run.json")["split_counts"]
    assert "--model " + arch in meta["source"]["export_command"]

    card = (d / "MODEL_CARD.md").read_text()
    assert "not a diagnosis" in card
    assert f"version {version}" in card
    assert f"{meta['decision_threshold']:.4f}" in card
    assert meta["sha256"] in card


@pytest.mark.slow
@pytest.mark.parametrize("version, arch", list(enumerate(ARCHS, start=1)))
def test_onnx_equals_keras_on_real_images(published, version, arch):
    from train.models import load_model
    from xray_core.package import open_session as load_session

    d = _vdir(published, version)
    meta = _json(d / "metadata.json")
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    rows = [ex for ex, s in read_split_csv(published["run"] / "split.csv") if s in ("test", "val")]
    assert len(rows) >= 20
    x = np.stack([preprocess_image(ex.path, config) for ex in rows])
    keras_model = load_model(str(published["run"] / arch / "model.keras"))
    p_keras = keras_model.predict(x, verbose=0)
    session = load_session(str(d / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probability"]
    (p_onnx,) = session.run(["probability"], {"image": x})
    assert p_onnx.shape == (len(rows), 1) and p_onnx.dtype == np.float32
    assert np.max(np.abs(p_onnx.astype(np.float64) - p_keras.astype(np.float64))) <= 1e-5
    thr = meta["decision_threshold"]
    np.testing.assert_array_equal(p_onnx >= thr, p_keras >= thr)
    # a batch of one works too (dynamic batch dimension)
    (one,) = session.run(["probability"], {"image": x[:1]})
    assert abs(float(one[0, 0]) - float(p_keras[0, 0])) <= 1e-5


def _pbtxt_section(text, key):
    match = re.search(rf"^{key}\s*\[\s*(.*?)^\]", text, re.S | re.M)
    assert match, key
    entries = re.findall(r'\{\s*name:\s*"([^"]+)"\s+data_type:\s*(\w+)\s+dims:\s*\[([^\]]*)\]\s*\}', match.group(1))
    return [(name, dtype, [int(v) for v in dims.replace(",", " ").split()]) for name, dtype, dims in entries]


def _graph_io(values, inits):
    out = []
    for v in values:
        if v.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        out.append((v.name, v.type.tensor_type.elem_type, dims))
    return out


@pytest.mark.slow
def test_triton_config_matches_onnx_graph(published):
    import onnx

    text = (published["name_dir"] / "config.pbtxt").read_text()
    assert re.search(r'^name:\s*"pneumonia"\s*$', text, re.M)
    assert re.search(r'^platform:\s*"onnxruntime_onnx"\s*$', text, re.M)
    max_batch = int(re.search(r"^max_batch_size:\s*(\d+)\s*$", text, re.M).group(1))
    assert max_batch > 0  # the batch dim is implicit in dims
    cfg_in = _pbtxt_section(text, "input")
    cfg_out = _pbtxt_section(text, "output")
    assert len(cfg_in) == len(cfg_out) == 1
    for version in (1, 2, 3):
        model = onnx.load(str(_vdir(published, version) / "model.onnx"))
        inits = {i.name for i in model.graph.initializer}
        (g_in,) = _graph_io(model.graph.input, inits)
        (g_out,) = _graph_io(model.graph.output, inits)
        for (name, dtype, dims), (g_name, g_type, g_dims) in ((cfg_in[0], g_in), (cfg_out[0], g_out)):
            assert name == g_name
            assert g_type == onnx.TensorProto.FLOAT and dtype == "TYPE_FP32"
            assert isinstance(g_dims[0], str)  # dynamic batch
            assert dims == g_dims[1:]
    assert cfg_in[0][0] == "image" and cfg_in[0][2] == [32, 32, 1]
    assert cfg_out[0][0] == "probability" and cfg_out[0][2] == [1]


@pytest.mark.slow
def test_version_dir_has_default_permissions(published):
    old = os.umask(0)
    os.umask(old)
    expected = 0o777 & ~old
    if expected == 0o700:
        pytest.skip("umask makes 0700 the default anyway")
    assert stat.S_IMODE(os.stat(published["name_dir"]).st_mode) == expected
    assert stat.S_IMODE(os.stat(_vdir(published, 1)).st_mode) == expected


# ------------------------------------------------------------ version numbers


def _expect_error(capsys, rc, *fragments):
    assert_one_line_error(capsys, rc, *fragments)


@pytest.mark.slow
def test_explicit_then_default_version_and_no_overwrite(published, tmp_path, capsys):
    serving = tmp_path / "serving"
    assert _export(published["run"], serving, "--model", "baseline_cnn", "--version", "7") == 0
    assert _export(published["run"], serving, "--model", "baseline_cnn") == 0
    name_dir = serving / "pneumonia"
    assert sorted(os.listdir(name_dir)) == ["7", "8", "config.pbtxt"]
    assert _json(name_dir / "7" / "metadata.json")["version"] == 7
    assert _json(name_dir / "8" / "metadata.json")["version"] == 8
    capsys.readouterr()

    before = _snapshot(serving)
    rc = _export(published["run"], serving, "--model", "augmented_cnn", "--version", "8")
    _expect_error(capsys, rc, "already exists", str(name_dir / "8"))
    rc = _export(published["run"], serving, "--model", "augmented_cnn", "--version", "0")
    _expect_error(capsys, rc, "--version must be >= 1")
    assert _snapshot(serving) == before


# ---------------------------------------------------------------- atomicity


@pytest.fixture
def serving_with_v1(published, tmp_path):
    """A serving dir that already holds version 1 (a copy) and config.pbtxt."""
    serving = tmp_path / "serving"
    (serving / "pneumonia").mkdir(parents=True)
    _copy_version(published, 1, serving / "pneumonia" / "1")
    shutil.copy(published["name_dir"] / "config.pbtxt", serving / "pneumonia" / "config.pbtxt")
    return serving


@pytest.mark.slow
def test_failed_conversion_publishes_nothing(published, serving_with_v1, monkeypatch):
    import export.convert

    seen = []

    def broken_to_onnx(keras_model, image_size, opset, path):
        seen.append(path)
        with open(path, "wb") as f:
            f.write(b"\x08\x07partial onnx")
        raise RuntimeError("conversion blew up half way")

    monkeypatch.setattr(export.convert, "to_onnx", broken_to_onnx)
    before = _snapshot(serving_with_v1)
    with pytest.raises(RuntimeError, match="half way"):
        _export(published["run"], serving_with_v1, "--model", "augmented_cnn")
    assert len(seen) == 1
    assert os.path.basename(os.path.dirname(seen[0])).startswith("2.tmp-")  # it was staging version 2
    assert not os.path.exists(seen[0])
    assert _snapshot(serving_with_v1) == before
    leftovers = [n for n in os.listdir(serving_with_v1 / "pneumonia") if ".tmp-" in n or ".old-" in n]
    assert leftovers == []


@pytest.mark.slow
def test_parity_failure_exits_1_and_publishes_nothing(published, serving_with_v1, monkeypatch, capsys):
    import export.convert

    def bad_parity(keras_model, session, x, threshold):
        assert [o.name for o in session.get_outputs()] == ["probability"] and x.shape[1:] == (32, 32, 1)
        return {"images": int(len(x)), "max_abs_diff": 1.0, "mean_abs_diff": 0.5, "decisions_equal": True,
                "tolerance": 1e-5}

    monkeypatch.setattr(export.convert, "parity", bad_parity)
    before = _snapshot(serving_with_v1)
    rc = _export(published["run"], serving_with_v1, "--model", "baseline_cnn")
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parity failed")
    assert "nothing published" in lines[0]
    assert _snapshot(serving_with_v1) == before


@pytest.mark.slow
def test_decisions_differing_is_a_parity_failure(published, tmp_path, monkeypatch, capsys):
    import export.convert

    monkeypatch.setattr(export.convert, "parity", lambda *a: {
        "images": 66, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "decisions_equal": False, "tolerance": 1e-5})
    serving = tmp_path / "serving"
    assert _export(published["run"], serving, "--model", "baseline_cnn") == 1
    assert "decisions equal: False" in capsys.readouterr().err
    assert [n for n in os.listdir(serving / "pneumonia")] == []


# ------------------------------------------------------------------- verify


@pytest.mark.slow
def test_verify_catches_flipped_byte(published, tmp_path, capsys):
    d = _copy_version(published, 1, tmp_path / "1")
    model = d / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert export_main(["--verify", str(d)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("PASS metadata")
    assert lines[1].startswith("FAIL sha256:")
    assert len(lines) == 3 and lines[-1] == f"FAILED: {d}"


@pytest.mark.slow
def test_verify_catches_metadata_model_mismatch(published, tmp_path, capsys):
    d = _copy_version(published, 1, tmp_path / "1")
    meta = _json(d / "metadata.json")
    meta["preprocessing"]["image_size"] = 64
    meta["input"]["shape"] = [-1, 64, 64, 1]
    (d / "metadata.json").write_text(json.dumps(meta, indent=2))
    assert export_main(["--verify", str(d)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "PASS sha256" in [line.split(":")[0] for line in lines]  # the model itself is intact
    fail = [line for line in lines if line.startswith("FAIL ")]
    assert len(fail) == 1 and fail[0].startswith("FAIL input contract")
    assert "32, 32, 1" in fail[0] and "64, 64, 1" in fail[0]
    assert lines[-1] == f"FAILED: {d}"


@pytest.mark.slow
def test_verify_missing_metadata(published, tmp_path, capsys):
    d = _copy_version(published, 1, tmp_path / "1")
    os.remove(d / "metadata.json")
    assert export_main(["--verify", str(d)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("FAIL metadata") and "missing" in lines[0]


# ----------------------------------------------------------------- bad input


def test_error_missing_run_dir(tmp_path, capsys):
    rc = _export(tmp_path / "no_run", tmp_path / "serving", "--model", "baseline_cnn")
    _expect_error(capsys, rc, "run dir not found")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_error_model_not_in_run(published, tmp_path, capsys):
    rc = _export(published["run"], tmp_path / "serving", "--model", "resnet50")
    _expect_error(capsys, rc, "'resnet50' is not in run", "baseline_cnn, augmented_cnn, vgg19")
    assert os.listdir(tmp_path) == []


def _corrupt_run(published, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(published["run"], run, ignore=lambda d, names: ["vgg19", "augmented_cnn"] if d == str(
        published["run"]) else [])
    (run / "baseline_cnn" / "model.keras").write_bytes(b"PK\x03\x04 this is not a zip or a model")
    return run


@pytest.mark.slow
def test_error_corrupt_model_file(published, tmp_path, capsys):
    run = _corrupt_run(published, tmp_path)
    serving = tmp_path / "serving"
    rc = _export(run, serving, "--model", "baseline_cnn")
    _expect_error(capsys, rc, "cannot load", "model.keras")
    # no version, no staging dir, no config.pbtxt
    assert _snapshot(serving) in ({}, {"pneumonia": "dir"})


@pytest.mark.slow
def test_error_corrupt_model_file_writes_nothing(published, tmp_path, capsys):
    run = _corrupt_run(published, tmp_path)
    rc = _export(run, tmp_path / "serving", "--model", "baseline_cnn")
    _expect_error(capsys, rc, "cannot load")
    assert not os.path.exists(tmp_path / "serving")


@pytest.mark.slow
def test_error_unwritable_serving_dir(published, tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permissions: make the serving dir path a regular file instead
        serving = tmp_path / "serving"
        serving.write_text("not a directory")
        rc = _export(published["run"], serving, "--model", "baseline_cnn")
        _expect_error(capsys, rc, "cannot write to serving dir", str(serving))
        assert serving.read_text() == "not a directory"
        assert os.listdir(tmp_path) == ["serving"]
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        os.chmod(parent, 0o500)
        try:
            rc = _export(published["run"], parent / "serving", "--model", "baseline_cnn")
            _expect_error(capsys, rc, "cannot write to serving dir")
            assert os.listdir(parent) == []
        finally:
            os.chmod(parent, 0o700)


# ------------------------------------------------------------- no TensorFlow


def _fresh_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------ --calibrate-dir


@pytest.fixture(scope="module")
def calibrated(published):
    """resnet_aug (an ensemble of two) trained with a site sample, exported with --calibrate-dir."""
    base = published["base"]
    site = base / "site"
    make_tree(str(site), per_class=24, size=48, seed=5)
    run = base / "run_recipe"
    assert train_main(["--data-dir", str(published["data"]), "--output-dir", str(run), "--image-size", "32",
                       "--epochs", "2", "--models", "resnet_aug", "--ensemble", "2", "--last-stride", "2",
                       "--site-dir", str(site)]) == 0
    serving = base / "serving_calibrated"
    rc = _export(run, serving, "--model", "resnet_aug", "--calibrate-dir", str(site), "--target-recall", "0.9")
    return {"rc": rc, "run": run, "site": site, "serving": serving, "vdir": serving / "pneumonia" / "1"}


def _site_scores(calibrated):
    from xray_core.package import open_session as load_session

    meta = _json(calibrated["vdir"] / "metadata.json")
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    paths = sorted(str(p) for p in calibrated["site"].rglob("*") if p.suffix in (".jpeg", ".png"))
    x = np.stack([preprocess_image(p, config) for p in paths])
    (p,) = load_session(str(calibrated["vdir"] / "model.onnx")).run(["probability"], {"image": x})
    y = np.array(["/PNEUMONIA/" in path for path in paths], dtype=int)
    return meta, y, p.reshape(-1).astype(np.float64)


@pytest.mark.slow
def test_calibrated_threshold_comes_from_the_site_sample(calibrated):
    from xray_core.metrics import choose_threshold, operating_point

    assert calibrated["rc"] == 0
    meta, y, p = _site_scores(calibrated)
    site = meta["site_calibration"]
    metrics = _json(calibrated["run"] / "resnet_aug" / "metrics.json")
    assert site["images"] == len(y) == 48 and (site["normal"], site["pneumonia"]) == (24, 24)
    assert site["target_recall"] == meta["target_recall"] == 0.9
    assert meta["threshold_source"] == "site calibration sample"
    assert meta["validation_threshold"] == metrics["chosen_threshold"]
    assert meta["decision_threshold"] == site["threshold"] == pytest.approx(choose_threshold(y, p, 0.9), abs=1e-6)
    for key, thr in (("at_0.5", 0.5), ("at_validation_threshold", metrics["chosen_threshold"]),
                     ("at_calibrated_threshold", site["threshold"])):
        expected = operating_point(y, p, thr)
        assert site[key]["threshold"] == pytest.approx(thr)
        assert site[key]["confusion_matrix"]["matrix"] == expected["confusion_matrix"]["matrix"], key
        assert site[key]["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    assert site["at_calibrated_threshold"]["recall"] >= 0.9
    # parity was checked at the package's (calibrated) threshold
    assert meta["parity"]["decisions_equal"] is True


@pytest.mark.slow
def test_two_fold_estimate_is_out_of_sample_with_intervals(calibrated):
    meta, y, p = _site_scores(calibrated)
    est = meta["site_calibration"]["two_fold"]
    assert [f["eval_images"] for f in est["folds"]] and sum(f["eval_images"] for f in est["folds"]) == len(y)
    assert sum(f["fit_images"] for f in est["folds"]) == len(y)
    for key in ("recall", "specificity", "accuracy", "roc_auc"):
        lo, hi = est[f"{key}_ci95"]
        assert 0 <= lo <= est[key] <= hi <= 1, key
    # pooled counts are whole images: recall * positives is an integer
    assert est["recall"] * y.sum() == pytest.approx(round(est["recall"] * y.sum()))
    correct = est["recall"] * y.sum() + est["specificity"] * (len(y) - y.sum())
    assert est["accuracy"] == pytest.approx(correct / len(y))


def test_two_fold_on_known_scores():
    from export.calibrate import two_fold

    # 20 patients with two images each; scores separate the classes perfectly
    groups = np.repeat(np.arange(20), 2)
    y = np.where(groups % 2 == 0, 0, 1)
    p = np.where(y == 1, 0.9, 0.1) + np.linspace(0, 0.05, 40)
    est = two_fold(y, p, groups, 0.95)
    assert (est["recall"], est["specificity"], est["accuracy"], est["roc_auc"]) == (1.0, 1.0, 1.0, 1.0)
    assert est["recall_ci95"][1] == pytest.approx(1.0) and est["recall_ci95"][0] < 1.0
    # each half's threshold sits between the classes
    assert all(0.15 < f["threshold"] <= 0.95 for f in est["folds"])
    # both halves are patient-disjoint: 10 patients (20 images) each
    assert [f["eval_images"] for f in est["folds"]] == [20, 20]


def test_threshold_from_one_half_can_miss_on_the_other():
    """The out-of-half recall is below target when the halves differ: the estimate is not in-sample."""
    from export.calibrate import two_fold
    from xray_core.metrics import choose_threshold, operating_point

    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 60)
    p = np.where(y == 1, rng.normal(0.7, 0.15, 100), rng.normal(0.35, 0.15, 100))
    groups = np.arange(100)
    est = two_fold(y, p, groups, 0.95)
    in_sample = operating_point(y, p, choose_threshold(y, p, 0.95))
    assert in_sample["recall"] >= 0.95
    assert est["recall"] != in_sample["recall"] or est["specificity"] != in_sample["specificity"]


def test_calibration_labels_only_from_folders_under_the_dir(tmp_path):
    from export.calibrate import list_labelled

    root = tmp_path / "PNEUMONIA" / "incoming"
    make_tree(str(root / "site"), per_class=2, size=48, seed=3)
    (root / "loose.jpeg").write_bytes((root / "site" / "NORMAL").iterdir().__next__().read_bytes())
    (root / "site" / "Normal_extra").mkdir()
    found = list_labelled(str(root))
    assert sorted(label for _, label in found) == ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]
    assert not any(path.endswith("loose.jpeg") for path, _ in found)  # the ancestor PNEUMONIA never counts


@pytest.mark.parametrize("layout, fragment", [
    (None, "calibration dir not found"),
    ("NORMAL", "no images under a folder named PNEUMONIA"),
])
@pytest.mark.slow
def test_calibrate_dir_errors_publish_nothing(calibrated, tmp_path, capsys, layout, fragment):
    cal = tmp_path / "cal"
    if layout:
        make_tree(str(cal), per_class=2, size=48, seed=4)
        shutil.rmtree(cal / "PNEUMONIA")
    serving = tmp_path / "serving"
    rc = _export(calibrated["run"], serving, "--model", "resnet_aug", "--calibrate-dir", str(cal))
    _expect_error(capsys, rc, fragment)
    assert _snapshot(serving) == {}


@pytest.mark.slow
def test_calibrated_model_card_gives_site_numbers_first(calibrated):
    meta = _json(calibrated["vdir"] / "metadata.json")
    card = (calibrated["vdir"] / "MODEL_CARD.md").read_text()
    est = meta["site_calibration"]["two_fold"]
    site_at = card.index("Site sample")
    assert site_at < card.index("Internal test split")
    assert f"{est['roc_auc']:.3f}" in card and f"{est['specificity']:.3f}" in card
    assert f"{meta['decision_threshold']:.4f}" in card
    assert "overestimates" in card


# ------------------------------------------------------------------- heatmaps


@pytest.mark.slow
def test_calibrated_package_has_a_heatmap_matching_keras(calibrated):
    from export.heatmap import reference_heatmaps
    from train.models import load_model

    meta, y, p = _site_scores(calibrated)
    assert meta["heatmap_output"] == {"name": "heatmap", "dtype": "float32", "shape": [-1, 2, 2]}  # 32 px / 16
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    paths = sorted(str(q) for q in calibrated["site"].rglob("*") if q.suffix in (".jpeg", ".png"))
    x = np.stack([preprocess_image(q, config) for q in paths])
    from xray_core.package import open_session as load_session

    prob, heat = load_session(str(calibrated["vdir"] / "model.onnx")).run(["probability", "heatmap"], {"image": x})
    keras_model = load_model(str(calibrated["run"] / "resnet_aug" / "model.keras"))
    ref = reference_heatmaps(keras_model, x)
    assert heat.shape == (len(x), 2, 2) and heat.dtype == np.float32
    assert np.abs(heat - ref).max() <= 1e-4 * np.ptp(ref)
    np.testing.assert_allclose(prob[:, 0], keras_model.predict(x, verbose=0)[:, 0], atol=1e-5)  # unchanged
    # each member's map is exact: sigmoid(mean(map) + bias) is the member's probability
    member = keras_model.get_layer("resnet_aug_m0")
    m_ref = reference_heatmaps(member, x)
    bias = member.get_layer("logit").get_weights()[1][0]
    np.testing.assert_allclose(1 / (1 + np.exp(-(m_ref.mean(axis=(1, 2)) + bias))),
                               member.predict(x, verbose=0)[:, 0], atol=1e-5)
    h = meta["heatmap"]
    assert h["parity"]["passed"] and h["parity"]["max_abs_diff"] <= h["parity"]["tolerance"]
    faith = h["faithfulness"]
    assert faith["source"] == "site calibration" and faith["images"] == len(x)
    assert faith["flagged"] == int((p >= meta["decision_threshold"]).sum())
    if faith["flagged"]:
        assert faith["passed"] == (faith["share_top_beats_random"] >= 0.8)
    card = (calibrated["vdir"] / "MODEL_CARD.md").read_text()
    assert "## Heatmaps" in card and "Faithfulness check" in card


@pytest.mark.slow
def test_heatmap_in_triton_config_and_verify(calibrated, tmp_path, capsys):
    text = (calibrated["serving"] / "pneumonia" / "config.pbtxt").read_text()
    assert [e[0] for e in _pbtxt_section(text, "output")] == ["probability", "heatmap", "embedding"]
    assert _pbtxt_section(text, "output")[1][2] == [2, 2]
    dim = _json(calibrated["vdir"] / "metadata.json")["reference"]["embedding_dim"]
    assert _pbtxt_section(text, "output")[2][2] == [dim]
    assert "version_policy: { latest { num_versions: 1 } }" in text
    assert export_main(["--verify", str(calibrated["vdir"])]) == 0
    assert "PASS heatmap contract" in capsys.readouterr().out
    # metadata that lies about the heatmap's shape fails verification
    bad = tmp_path / "1"
    shutil.copytree(calibrated["vdir"], bad)
    meta = _json(bad / "metadata.json")
    meta["heatmap_output"]["shape"] = [-1, 4, 4]
    (bad / "metadata.json").write_text(json.dumps(meta))
    assert export_main(["--verify", str(bad)]) == 1
    assert "FAIL heatmap contract" in capsys.readouterr().out


@pytest.mark.slow
def test_calibrated_package_has_an_embedding_and_a_drift_reference(calibrated):
    from train.models import keras, load_model
    from xray_core import reference
    from xray_core.package import open_session as load_session

    vdir = calibrated["vdir"]
    meta = _json(vdir / "metadata.json")
    keras_model = load_model(str(calibrated["run"] / "resnet_aug" / "model.keras"))
    members = [keras_model.get_layer(f"resnet_aug_m{i}") for i in range(2)]
    width = members[0].get_layer("gap").output.shape[-1]
    assert meta["embedding_output"] == {"name": "embedding", "dtype": "float32", "shape": [-1, 2 * width]}
    # the embedding is the members' pooled features, concatenated
    rows = read_split_csv(calibrated["run"] / "split.csv")
    val = [ex.path for ex, split in rows if split == "val"]
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    x = np.stack([preprocess_image(p, config) for p in val])
    prob, emb = load_session(str(vdir / "model.onnx")).run(["probability", "embedding"], {"image": x})
    pooled = [keras.Model(m.input, m.get_layer("gap").output).predict(x, verbose=0) for m in members]
    np.testing.assert_allclose(emb, np.concatenate(pooled, axis=1), atol=1e-4)
    # reference.npz: the validation split's probabilities and embeddings, plain arrays
    with np.load(vdir / "reference.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["embeddings", "probabilities"]
        np.testing.assert_allclose(z["probabilities"], prob[:, 0], atol=1e-6)
        assert z["embeddings"].dtype == np.float16
        np.testing.assert_allclose(z["embeddings"].astype(np.float32), emb, rtol=1e-3, atol=1e-3)
    ref = meta["reference"]
    assert (ref["images"], ref["embedding_rows"], ref["embedding_dim"]) == (len(val), len(val), 2 * width)
    assert ref["sha256"] == _sha256(vdir / "reference.npz") and ref["embedding_parity_max_abs_diff"] < 1e-4
    # splits.csv: every val and test image, relative to the training folder
    splits = reference.read_splits(str(vdir / "splits.csv"))
    expected = [(os.path.relpath(ex.path, published_data(calibrated)), s) for ex, s in rows if s in ("val", "test")]
    assert splits == expected and {s for _, s in splits} == {"val", "test"}
    assert all(os.path.isfile(os.path.join(published_data(calibrated), f)) for f, _ in splits)
    assert ref["splits"] == {"val": len(val), "test": sum(s == "test" for _, s in rows)}
    card = (vdir / "MODEL_CARD.md").read_text()
    assert "## Drift reference" in card and f"Output `embedding` (N, {2 * width})" in card


def published_data(calibrated):
    return str(calibrated["run"].parent / "data")


@pytest.mark.slow
def test_verify_checks_the_drift_reference(calibrated, tmp_path, capsys):
    assert export_main(["--verify", str(calibrated["vdir"])]) == 0
    out = capsys.readouterr().out
    assert "PASS embedding contract" in out and "PASS drift reference" in out
    meta = _json(calibrated["vdir"] / "metadata.json")
    dim = meta["reference"]["embedding_dim"]
    cases = {
        "wrong_width": lambda d: np.savez(d / "reference.npz", probabilities=np.full(5, 0.5, np.float32),
                                          embeddings=np.zeros((5, dim + 1), np.float16)),
        "pickled": lambda d: np.savez(d / "reference.npz", probabilities=np.full(5, 0.5, np.float32),
                                      embeddings=np.array([{"a": 1}], dtype=object)),
        "not_probabilities": lambda d: np.savez(d / "reference.npz", probabilities=np.full(5, 2.0, np.float32),
                                                embeddings=np.zeros((5, dim), np.float16)),
        "no_splits": lambda d: os.remove(d / "splits.csv"),
    }
    for name, spoil in cases.items():
        bad = tmp_path / name / "1"
        shutil.copytree(calibrated["vdir"], bad)
        spoil(bad)
        if name != "no_splits":  # a consistent sha256: only the arrays' shapes or content are wrong
            m = _json(bad / "metadata.json")
            m["reference"]["sha256"] = _sha256(bad / "reference.npz")
            (bad / "metadata.json").write_text(json.dumps(m))
        assert export_main(["--verify", str(bad)]) == 1, name
        fail = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
        assert len(fail) == 1 and fail[0].startswith("FAIL drift reference"), (name, fail)
    # a reference replaced after export: its sha256 no longer matches
    bad = tmp_path / "sha" / "1"
    shutil.copytree(calibrated["vdir"], bad)
    with np.load(bad / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["probabilities"] = arrays["probabilities"][::-1].copy()
    np.savez(bad / "reference.npz", **arrays)
    assert export_main(["--verify", str(bad)]) == 1
    assert "sha256 differs from the metadata" in capsys.readouterr().out


@pytest.mark.slow
def test_models_without_a_cam_head_export_probability_only(published):
    import onnx

    for version in (1, 2, 3):
        meta = _json(_vdir(published, version) / "metadata.json")
        assert "heatmap_output" not in meta and "heatmap" not in meta
        outputs = [o.name for o in onnx.load(str(_vdir(published, version) / "model.onnx")).graph.output]
        assert outputs == ["probability"]
        assert "None: this model's head" in (_vdir(published, version) / "MODEL_CARD.md").read_text()


def _region_model(path, size=16):
    """P = sigmoid(40 * (mean of the top-left quadrant - 0.5)); heatmap input-independent (fed as an input
    so the test chooses where it points)."""
    import onnx
    from onnx import TensorProto, helper

    half = size // 2
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["quad"]),
            helper.make_node("ReduceMean", ["quad"], ["mean"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Sub", ["mean", "half"], ["c"]),
            helper.make_node("Mul", ["c", "k"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["p"]),
            helper.make_node("Unsqueeze", ["p", "one"], ["probability"]),
            helper.make_node("Mul", ["mean", "zero"], ["z"]),  # (N,) zeros, to give the map a batch dimension
            helper.make_node("Reshape", ["z", "shape3"], ["z3"]),
            helper.make_node("Add", ["z3", "map"], ["heatmap"]),
        ],
        "region",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 1]),
         helper.make_tensor_value_info("map", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 2, 2])],
        initializer=[
            helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
            helper.make_tensor("ends", TensorProto.INT64, [2], [half, half]),
            helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("k", TensorProto.FLOAT, [], [40.0]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("shape3", TensorProto.INT64, [3], [-1, 1, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


class _FixedMap:
    """An onnxruntime session whose `map` input is fixed: the heatmap points where the test says."""

    def __init__(self, path, heat):
        from xray_core.package import open_session as load_session

        self.session, self.heat = load_session(path), np.asarray(heat, np.float32)

    def run(self, names, feeds):
        return self.session.run(names, {**feeds, "map": self.heat})


@pytest.mark.parametrize("heat, passes", [
    ([[1.0, 0.0], [0.0, 0.0]], True),   # points at the quadrant that drives the score
    ([[0.0, 0.0], [0.0, 1.0]], False),  # points at a quadrant the score ignores
])
def test_faithfulness_tells_a_pointing_map_from_a_wrong_one(tmp_path, heat, passes):
    from export.faithfulness import faithfulness

    _region_model(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.3, (20, 16, 16, 1)).astype(np.float32)
    x[:, :8, :8] = rng.uniform(0.7, 1.0, (20, 8, 8, 1))  # bright top-left: all flagged
    result = faithfulness(_FixedMap(str(tmp_path / "m.onnx"), heat), x, 0.5, "test")
    assert result["flagged"] == 20
    assert result["passed"] is passes
    assert (result["share_top_beats_random"] == 1.0) if passes else (result["share_top_beats_random"] <= 0.2)
