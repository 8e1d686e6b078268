"""Export of a resnet_aug member with the logit-map head (--pool softmax): its heatmap output is the member's
own `logit_map`, its embedding the global average of `last_block`, and both match Keras."""
from __future__ import annotations

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from helpers import export_run, read_json
from train.__main__ import main as train_main
from xray_core.package import open_session, score
from xray_core.preprocessing import PreprocessConfig, preprocess_image


@pytest.fixture(scope="module")
def softmax_package(tmp_path_factory):
    base = tmp_path_factory.mktemp("softmax")
    data, site, run = base / "data", base / "site", base / "run"
    make_tree(str(data), per_class=40, size=48, seed=0)
    make_tree(str(site), per_class=30, size=48, seed=5)
    assert train_main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32", "--epochs", "2",
                       "--ensemble", "1", "--pool", "softmax", "--site-dir", str(site)]) == 0
    serving = base / "serving"
    assert export_run(run, serving, "--model", "resnet_aug", "--calibrate-dir", str(site),
                      "--target-recall", "0.9") == 0
    return {"run": run, "site": site, "vdir": serving / "pneumonia" / "1"}


@pytest.mark.slow
def test_softmax_head_exports_its_logit_map_and_pooled_features(softmax_package):
    from export.heatmap import reference_heatmaps
    from train.models import SOFTMAX_POOL_SCALE, keras, load_model

    vdir = softmax_package["vdir"]
    meta = read_json(vdir / "metadata.json")
    assert meta["heatmap_output"]["shape"] == [-1, 4, 4]  # 32 px, last stride 1
    assert meta["embedding_output"]["shape"] == [-1, 256]
    assert meta["heatmap"]["parity"]["passed"]
    config = PreprocessConfig.from_dict(meta["preprocessing"])
    paths = sorted(str(q) for q in softmax_package["site"].rglob("*") if q.suffix in (".jpeg", ".png"))
    x = np.stack([preprocess_image(q, config) for q in paths])
    out = score(open_session(str(vdir / "model.onnx")), x, heatmap=True, embedding=True)
    model = load_model(str(softmax_package["run"] / "resnet_aug" / "model.keras"))
    ref = reference_heatmaps(model, x)
    assert np.abs(out.heatmap - ref).max() <= 1e-4 * np.ptp(ref)
    # the probability is the sigmoid of the map's softmax-weighted mean: the map is exact
    cells = out.heatmap.reshape(len(x), -1).astype(np.float64)
    w = np.exp(SOFTMAX_POOL_SCALE * (cells - cells.max(axis=1, keepdims=True)))
    logit = (w * cells).sum(axis=1) / w.sum(axis=1)
    np.testing.assert_allclose(out.probability, 1 / (1 + np.exp(-logit)), atol=1e-5)
    pooled = keras.Model(model.input, model.get_layer("last_block").output).predict(x, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(out.embedding, pooled, atol=1e-4)
