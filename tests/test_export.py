"""`python -m export`: ONNX conversion, parity, versioned atomic publishing, --verify.

One tiny training run of all three architectures (32 px, 1 epoch) is exported once per module
as versions 1, 2, 3; the other tests copy from it or publish into their own serving dirs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from export.__main__ import main as export_main
from helpers import assert_one_line_error, export_run, pbtxt_section, read_json, sha256_of, snapshot
from train.__main__ import main as train_main
from train.data import read_split_csv
from xray_core.preprocessing import PreprocessConfig, preprocess_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "synthetic test images (tests/test_export.py)"
ARCHS = ("baseline_cnn", "augmented_cnn", "vgg19")  # resnet_aug: tests/test_export_calibrated.py
CHECKS = ["metadata", "decision threshold", "sha256", "onnx.checker", "onnxruntime", "input contract",
          "output contract", "zero batch"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    data = base / "data"
    make_tree(str(data), per_class=40, size=48, seed=0)
    run = base / "run"
    rc = train_main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32", "--epochs", "1",
                     "--vgg19-weights", "none", "--models", "baseline_cnn,augmented_cnn,vgg19",
                     "--data-source", SOURCE])
    assert rc == 0
    serving = base / "serving_models"
    rcs = [export_run(run, serving, "--model", arch) for arch in ARCHS]
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
        meta = read_json(d / "metadata.json")
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
    meta = read_json(d / "metadata.json")
    run = published["run"]
    metrics = read_json(run / arch / "metrics.json")
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
    assert meta["training_data"] == {"source": SOURCE, "data_dir": str(published["data"]), "modalities": ["CR", "DX"]}
    card = (d / "MODEL_CARD.md").read_text()
    assert f"The images under `{published['data']}` ({SOURCE}), re-split" in card and "Kermany" not in card

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
    assert meta["sha256"] == sha256_of(d / "model.onnx")
    created = datetime.fromisoformat(meta["created_utc"])
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    assert meta["source"]["model_file"] == os.path.join(str(run), arch, "model.keras")
    assert meta["source"]["split_counts"] == read_json(run / "run.json")["split_counts"]
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
    meta = read_json(d / "metadata.json")
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
    cfg_in = pbtxt_section(text, "input")
    cfg_out = pbtxt_section(text, "output")
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
    assert export_run(published["run"], serving, "--model", "baseline_cnn", "--version", "7") == 0
    assert export_run(published["run"], serving, "--model", "baseline_cnn") == 0
    name_dir = serving / "pneumonia"
    assert sorted(os.listdir(name_dir)) == ["7", "8", "config.pbtxt"]
    assert read_json(name_dir / "7" / "metadata.json")["version"] == 7
    assert read_json(name_dir / "8" / "metadata.json")["version"] == 8
    capsys.readouterr()

    before = snapshot(serving)
    rc = export_run(published["run"], serving, "--model", "augmented_cnn", "--version", "8")
    _expect_error(capsys, rc, "already exists", str(name_dir / "8"))
    rc = export_run(published["run"], serving, "--model", "augmented_cnn", "--version", "0")
    _expect_error(capsys, rc, "--version must be >= 1")
    assert snapshot(serving) == before


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
    before = snapshot(serving_with_v1)
    with pytest.raises(RuntimeError, match="half way"):
        export_run(published["run"], serving_with_v1, "--model", "augmented_cnn")
    assert len(seen) == 1
    assert os.path.basename(os.path.dirname(seen[0])).startswith("2.tmp-")  # it was staging version 2
    assert not os.path.exists(seen[0])
    assert snapshot(serving_with_v1) == before
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
    before = snapshot(serving_with_v1)
    rc = export_run(published["run"], serving_with_v1, "--model", "baseline_cnn")
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parity failed")
    assert "nothing published" in lines[0]
    assert snapshot(serving_with_v1) == before


@pytest.mark.slow
def test_decisions_differing_is_a_parity_failure(published, tmp_path, monkeypatch, capsys):
    import export.convert

    monkeypatch.setattr(export.convert, "parity", lambda *a: {
        "images": 66, "max_abs_diff": 0.0, "mean_abs_diff": 0.0, "decisions_equal": False, "tolerance": 1e-5})
    serving = tmp_path / "serving"
    assert export_run(published["run"], serving, "--model", "baseline_cnn") == 1
    assert "decisions equal: False" in capsys.readouterr().err
    assert not serving.exists()  # the serving and name folders it made for its staging folder went with it


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
    assert lines[0].startswith("PASS metadata") and lines[1].startswith("PASS decision threshold")
    assert lines[2].startswith("FAIL sha256:")
    assert len(lines) == 4 and lines[-1] == f"FAILED: {d}"


@pytest.mark.slow
def test_verify_catches_metadata_model_mismatch(published, tmp_path, capsys):
    d = _copy_version(published, 1, tmp_path / "1")
    meta = read_json(d / "metadata.json")
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


def test_verify_a_folder_that_is_not_there_is_a_bad_input(tmp_path, capsys):
    """QA: `--verify` of a folder that does not exist said "metadata.json is missing", exit 1 (a failed check)."""
    assert export_main(["--verify", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --verify {tmp_path / 'nope'}: no such version folder"


# ----------------------------------------------------------------- bad input


def test_error_missing_run_dir(tmp_path, capsys):
    rc = export_run(tmp_path / "no_run", tmp_path / "serving", "--model", "baseline_cnn")
    _expect_error(capsys, rc, "run dir not found")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_error_model_not_in_run(published, tmp_path, capsys):
    rc = export_run(published["run"], tmp_path / "serving", "--model", "resnet50")
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
    rc = export_run(run, serving, "--model", "baseline_cnn")
    _expect_error(capsys, rc, "cannot load", "model.keras")
    # no version, no staging dir, no config.pbtxt
    assert snapshot(serving) in ({}, {"pneumonia": "dir"})


@pytest.mark.slow
def test_error_corrupt_model_file_writes_nothing(published, tmp_path, capsys):
    run = _corrupt_run(published, tmp_path)
    rc = export_run(run, tmp_path / "serving", "--model", "baseline_cnn")
    _expect_error(capsys, rc, "cannot load")
    assert not os.path.exists(tmp_path / "serving")


@pytest.mark.slow
def test_error_unwritable_serving_dir(published, tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permissions: make the serving dir path a regular file instead
        serving = tmp_path / "serving"
        serving.write_text("not a directory")
        rc = export_run(published["run"], serving, "--model", "baseline_cnn")
        _expect_error(capsys, rc, "cannot write to serving dir", str(serving))
        assert serving.read_text() == "not a directory"
        assert os.listdir(tmp_path) == ["serving"]
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        os.chmod(parent, 0o500)
        try:
            rc = export_run(published["run"], parent / "serving", "--model", "baseline_cnn")
            _expect_error(capsys, rc, "cannot write to serving dir")
            assert os.listdir(parent) == []
        finally:
            os.chmod(parent, 0o700)


@pytest.mark.slow
def test_models_without_a_cam_head_export_probability_only(published):
    import onnx

    for version in (1, 2, 3):
        meta = read_json(_vdir(published, version) / "metadata.json")
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


def test_a_fixed_map_ties_with_the_average_map_and_is_not_about_each_image(tmp_path):
    """The check the random-pixel comparison cannot make: the same map on every image is its own average."""
    from export.faithfulness import faithfulness

    _region_model(str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.3, (20, 16, 16, 1)).astype(np.float32)
    x[:, :8, :8] = rng.uniform(0.7, 1.0, (20, 8, 8, 1))
    result = faithfulness(_FixedMap(str(tmp_path / "m.onnx"), [[1.0, 0.0], [0.0, 0.0]]), x, 0.5, "test")
    assert result["passed"] and result["share_own_beats_average"] == 0.0 and not result["about_each_image"]
    assert result["mean_drop_average"] == pytest.approx(result["mean_drop_top"])


class _QuadrantModel:
    """A stand-in session: each image has one bright quadrant, P(pneumonia) follows the brightest quadrant's mean,
    and the heatmap is the image's 2x2 quadrant means: a map about each image."""

    def run(self, names, feeds):
        x = feeds["image"][..., 0]
        quads = x.reshape(len(x), 2, x.shape[1] // 2, 2, x.shape[2] // 2).mean(axis=(2, 4))
        p = 1 / (1 + np.exp(-40 * (quads.reshape(len(x), -1).max(axis=1) - 0.5)))
        out = {"probability": p[:, None].astype(np.float32), "heatmap": quads.astype(np.float32)}
        return [out[n] for n in names]


def test_maps_that_follow_each_image_beat_the_average_map():
    from export.faithfulness import faithfulness

    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 0.3, (24, 16, 16, 1)).astype(np.float32)
    for i in range(24):  # the bright quadrant moves from image to image
        r, c = divmod(i % 4, 2)
        x[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = rng.uniform(0.7, 1.0, (8, 8, 1))
    result = faithfulness(_QuadrantModel(), x, 0.5, "test")
    assert result["flagged"] == 24 and result["passed"]
    assert result["share_own_beats_average"] >= 0.7 and result["about_each_image"]
    assert result["mean_drop_top"] > result["mean_drop_average"]


class _FixedQuadrantMap(_QuadrantModel):
    """The same stand-in, but its graph heatmap is the same top-left quadrant on every image."""

    def run(self, names, feeds):
        out = dict(zip(["probability", "heatmap"], super().run(["probability", "heatmap"], feeds)))
        out["heatmap"] = np.tile(np.float32([[1.0, 0.0], [0.0, 0.0]]), (len(feeds["image"]), 1, 1))
        return [out[n] for n in names]


def test_occlusion_maps_find_each_images_evidence_where_the_graphs_map_does_not():
    """With heatmap_method occlusion, the figures are of the occlusion maps the job shows; the graph's own map
    (here the same quadrant on every image) is measured beside them."""
    from export.faithfulness import faithfulness
    from xray_core.occlusion import HeatmapMethod, occlusion_maps

    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 0.3, (24, 16, 16, 1)).astype(np.float32)
    for i in range(24):
        r, c = divmod(i % 4, 2)
        x[i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = rng.uniform(0.7, 1.0, (8, 8, 1))
    maps = occlusion_maps(_FixedQuadrantMap(), x[:4], 2)
    assert [tuple(np.unravel_index(m.argmax(), m.shape)) for m in maps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    result = faithfulness(_FixedQuadrantMap(), x, 0.5, "test", HeatmapMethod("occlusion", 2, "image mean"))
    assert result["method"] == {"name": "occlusion", "grid": 2, "fill": "image mean"}
    assert result["passed"] and result["about_each_image"] and result["share_own_beats_average"] >= 0.7
    graph = result["graph_map"]
    assert graph["share_own_beats_average"] == 0.0 and not graph["about_each_image"]


def test_occluded_cells_cover_the_image_once():
    from xray_core.occlusion import HeatmapMethod, occluded

    image = np.random.default_rng(0).uniform(0, 1, (10, 10, 1)).astype(np.float32)
    blanked = occluded(image, 3)  # 10 px in 3 cells: 3, 4, 3
    assert blanked.shape == (9, 10, 10, 1)
    changed = (blanked != image[np.newaxis]).reshape(9, -1)
    assert changed.sum(axis=0).max() == 1 and changed.any(axis=0).sum() >= 95  # each pixel in one cell
    assert [int(c.sum()) for c in changed[:3]] == [9, 12, 9]
    np.testing.assert_allclose(blanked[4, 3:7, 3:7, 0], image.mean())
    assert HeatmapMethod.from_dict(None).name == "graph"
    with pytest.raises(ValueError):
        HeatmapMethod.from_dict({"name": "occlusion", "grid": 1, "fill": ""})
