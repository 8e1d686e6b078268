"""The shift-robust recipe: augmentation, the ResNet's class-activation-map head, ensembles, the cosine
schedule, and the train CLI's --site-dir / --select-by site_roc_auc handling (tiny synthetic data)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from helpers import assert_one_line_error
from train.__main__ import main as train_main
from train.augment import AugmentConfig, augment_batch, mixup, photometric, random_frame, random_resized_crop
from train.models import build_resnet, ensemble, keras, load_model

tf = pytest.importorskip("tensorflow")


def _batch(n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 1, (n, size, size, 1)).astype(np.float32))


# ---------------------------------------------------------------- augmentation


def test_full_area_square_crop_is_the_identity():
    x = _batch()
    out = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), seed=1)
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-5)


def test_crop_zooms_in():
    # a centred bright square on black: a crop of at most 60% of the area makes the square bigger
    x = np.zeros((16, 32, 32, 1), np.float32)
    x[:, 12:20, 12:20] = 1.0
    out = random_resized_crop(tf.constant(x), (0.3, 0.6), (1.0, 1.0), seed=2).numpy()
    assert out.shape == x.shape
    bright = (out > 0.5).reshape(16, -1).sum(axis=1)
    assert np.all((bright == 0) | (bright > 64)), bright  # the square is either cropped away or enlarged
    assert (bright > 64).sum() >= 8


def test_a_frame_shrinks_the_image_inside_a_black_border_of_at_most_the_limit():
    """--frame-prob: a scan exported inside a border (QA: a 5% black frame lowered version 7's recall to 0.935)."""
    x = tf.ones((64, 40, 40, 1))
    out = random_frame(x, 0.5, 0.1, seed=3).numpy()[..., 0]
    framed = out.min(axis=(1, 2)) < 0.5
    assert 16 <= framed.sum() <= 48  # about half
    np.testing.assert_allclose(out[~framed], 1.0, atol=1e-5)  # the others untouched
    for img in out[framed]:
        inside = np.argwhere(img > 0.5)
        top, left = inside.min(axis=0)
        bottom, right = 39 - inside.max(axis=0)
        assert max(top, left, bottom, right) <= 0.1 * 40 / 1.0 + 1 and (top, left, bottom, right) != (0, 0, 0, 0)
        assert np.all(img[:top] < 0.5) and np.all(img[:, :left] < 0.5)  # black outside
    assert AugmentConfig().frame_prob == 0.0  # off unless asked for


def test_artefacts_are_a_band_at_one_edge_and_a_bright_square_on_about_the_share_asked_for():
    """--artefact-prob: a collimator's band (2-15% of the side, at one edge, bright or dark) and a lead marker (a
    bright square of 4-8% of the side), each on about `prob` of the images; the rest of the image untouched."""
    from train.augment import random_artefacts

    x = tf.fill((400, 50, 50, 1), 0.5)
    out = random_artefacts(x, 0.3, seed=5).numpy()[..., 0]
    changed = out != 0.5
    assert 0.35 <= changed.any(axis=(1, 2)).mean() <= 0.65  # 1 - 0.7 * 0.7 = 0.51 of the images have one or both
    bands = 0
    for img, diff in zip(out, changed):
        rows, cols = diff.all(axis=1), diff.all(axis=0)  # a band covers whole rows (top/bottom) or columns
        for line, axis_img in ((rows, img), (cols, img.T)):
            if line.any():
                bands += 1
                k = int(line.sum())
                assert 1 <= k <= 0.15 * 50 + 1 and (line[:k].all() or line[-k:].all())  # at an edge, at most 15%
                edge = axis_img[0] if line[0] else axis_img[-1]
                level = np.median(edge)  # constant but where a marker lies over it; bright or dark
                assert (edge == level).mean() >= 0.8 and (level >= 0.85 or level <= 0.1)
    assert 80 <= bands <= 160  # about 0.3 of 400
    untouched = random_artefacts(x, 0.0, seed=5).numpy()
    np.testing.assert_array_equal(untouched, x.numpy())
    assert AugmentConfig().artefact_prob == 0.0  # off unless asked for


def test_photometric_stays_in_range_and_varies_per_image():
    x = tf.tile(_batch(1), [16, 1, 1, 1])  # the same image 16 times
    out = photometric(x, AugmentConfig(), seed=3).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    means = out.reshape(16, -1).mean(axis=1)
    assert np.ptp(means) > 0.05  # different brightness/contrast/gamma per image
    none = AugmentConfig(brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0))
    np.testing.assert_allclose(photometric(x, none, seed=3).numpy(), x.numpy(), atol=1e-6)


def test_mixup_is_a_convex_combination_of_pairs():
    x = tf.constant(np.stack([np.full((4, 4, 1), v, np.float32) for v in (0.0, 1.0, 0.0, 1.0)]))
    y = tf.constant([0.0, 1.0, 0.0, 1.0])
    xm, ym = mixup(x, y, alpha=0.4, seed=4)
    xm, ym = xm.numpy(), ym.numpy()
    assert np.all((ym >= 0) & (ym <= 1))
    # images are constant 0 or 1 with labels equal to the value: mixed label == mixed pixel value
    np.testing.assert_allclose(xm[:, 0, 0, 0], ym, atol=1e-6)


def test_augment_batch_without_mixup_keeps_labels():
    y = tf.constant([0.0, 1.0] * 4)
    x, y_out = augment_batch(_batch(), y, AugmentConfig(), seed=5)
    assert x.shape == (8, 32, 32, 1)
    np.testing.assert_array_equal(y_out.numpy(), y.numpy())


# ------------------------------------------------------------- the model head


@pytest.mark.slow
def test_resnet_head_gives_exact_class_activation_maps():
    """GAP over `last_block`, then one linear unit: the logit is the spatial mean of the CAM."""
    keras.utils.set_random_seed(0)
    model = build_resnet(32)
    x = _batch(4).numpy()
    # give batch norm non-trivial statistics so the check is not vacuous
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, np.array([0, 1, 0, 1.0]), epochs=1, verbose=0)
    names = [layer.name for layer in model.layers]
    assert names[-4:] == ["gap", "dropout", "logit", "probability"]
    assert names.index("last_block") == len(names) - 5
    features = keras.Model(model.input, model.get_layer("last_block").output).predict(x, verbose=0)
    assert features.shape[1:3] == (2, 2)  # 32 px / 16
    w, b = model.get_layer("logit").get_weights()
    cam = np.einsum("nhwc,c->nhw", features, w[:, 0])
    logit = cam.mean(axis=(1, 2)) + b[0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), model.predict(x, verbose=0)[:, 0], atol=1e-5)


@pytest.mark.slow
def test_softmax_head_pools_its_own_logit_map(tmp_path):
    """pool="softmax": the logit is the softmax-weighted mean of `logit_map` (the heatmap), so it lies between
    the map's mean and its maximum; the model reloads without pickled code."""
    from train.models import SOFTMAX_POOL_SCALE

    keras.utils.set_random_seed(0)
    model = build_resnet(32, last_stride=1, pool="softmax")
    x = _batch(4).numpy()
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, np.array([0, 1, 0, 1.0]), epochs=2, verbose=0)
    cells = keras.Model(model.input, model.get_layer("logit_map").output).predict(x, verbose=0).reshape(4, -1)
    assert cells.shape == (4, 16)  # 4 x 4 cells at 32 px with the last stride 1
    w = np.exp(SOFTMAX_POOL_SCALE * (cells - cells.max(axis=1, keepdims=True)))
    logit = (w * cells).sum(axis=1) / w.sum(axis=1)
    assert np.all(logit >= cells.mean(axis=1) - 1e-6) and np.all(logit <= cells.max(axis=1) + 1e-6)
    p = model.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), p, atol=1e-5)
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(load_model(str(tmp_path / "model.keras")).predict(x, verbose=0)[:, 0], p, atol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        build_resnet(32, pool="max")


@pytest.mark.slow
def test_ensemble_averages_members_and_reloads(tmp_path):
    keras.utils.set_random_seed(1)
    members = [build_resnet(32, name=f"m{i}") for i in range(3)]
    model = ensemble(members, "resnet_aug")
    x = _batch(5).numpy()
    expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-6)
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(load_model(str(tmp_path / "model.keras")).predict(x, verbose=0), expected, atol=1e-6)
    assert ensemble(members[:1], "x") is members[0]


@pytest.mark.slow
def test_cosine_schedule_keeps_the_last_epoch():
    from train import fit

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 32, 32, 1)).astype(np.float32)
    y = np.tile([0.0, 1.0], 8).astype(np.float32)
    model = build_resnet(32)
    history = fit.fit(model, (x, y), (x[:8], y[:8]), name="toy", epochs=3, patience=0, seed=0, cosine=True,
                      label_smoothing=0.05, augment=AugmentConfig(), log=lambda _: None)
    assert len(history["loss"]) == 3 and history["best_epoch"] == 3  # patience 0 would stop a constant schedule
    assert int(model.optimizer.iterations) == 3  # one step of 16 per epoch
    # the rate used by the last of 3 steps: cosine from 1e-3 to 0 over 3 steps, at step 2
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 2 / 3)), rel=1e-4)
    loss = model.evaluate(x[:8], y[:8], verbose=0)[0]
    assert loss == pytest.approx(history["val_loss"][-1], abs=1e-4)  # no weights were restored


# ------------------------------------------------------------------ CLI


def _args(data, out, *extra):
    return ["--data-dir", str(data), "--output-dir", str(out), "--image-size", "32", "--epochs", "1", *extra]


def test_select_by_site_needs_site_dir(tmp_path, capsys):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", "--select-by", "site_roc_auc")),
                          "--select-by site_roc_auc needs --site-dir")
    assert os.listdir(tmp_path) == ["data"]


def test_a_frame_outside_its_bounds_is_refused(tmp_path, capsys):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    for bad in (["--frame-prob", "1.5"], ["--frame-max", "0.6"], ["--frame-prob", "-0.1"]):
        assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", *bad)),
                              "--frame-prob must be in [0, 1] and --frame-max in [0, 0.5]")
    assert os.listdir(tmp_path) == ["data"]


def test_site_dir_missing_or_inside_data_is_refused(tmp_path, capsys):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", "--site-dir",
                                                   str(tmp_path / "nope"))), "site directory not found")
    assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", "--site-dir",
                                                   str(tmp_path / "data" / "NORMAL"))), "must not overlap")
    assert os.listdir(tmp_path) == ["data"]


def test_last_stride_one_doubles_the_heatmap_resolution():
    for stride, side in ((2, 2), (1, 4)):  # 32 px input: S/16 or S/8 per side
        model = build_resnet(32, last_stride=stride)
        assert model.get_layer("last_block").output_shape[1:3] == (side, side)
        assert model.count_params() == build_resnet(32).count_params()  # same weights, finer last map


def test_pointwise_stages_use_one_by_one_convolutions():
    full, local = build_resnet(32, last_stride=1), build_resnet(32, last_stride=1, pointwise_stages=2)
    kernels = {layer.name: layer.kernel_size for layer in local.layers if layer.name.endswith("_conv")}
    assert kernels["stage1_a_conv"] == (3, 3) and kernels["stage2_a_conv"] == kernels["stage3_b_conv"] == (1, 1)
    assert local.get_layer("last_block").output_shape == full.get_layer("last_block").output_shape
    assert local.count_params() < full.count_params() / 4


@pytest.mark.slow
def test_crop_bands_is_a_preprocessing_setting_of_the_run(tmp_path, capsys):
    """--crop-bands: a training image pillarboxed past the padded check's limit is trained on (its scan inside the
    bands), and the setting is recorded with the run's preprocessing, which export and the job rebuild from."""
    import json

    from PIL import Image

    make_tree(str(tmp_path / "data"), per_class=16, size=48, seed=1)
    paths = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.parent.name in ("NORMAL", "PNEUMONIA")]
    assert len(paths) == 32
    for path in paths:
        img = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(np.pad(img, ((0, 0), (20, 20)))).save(path, format=Image.open(path).format, quality=95)
        # 40 of 88 columns: bands over 45% of the width
    common = ["--models", "resnet_aug", "--ensemble", "1"]
    assert train_main(_args(tmp_path / "data", tmp_path / "plain", *common)) == 2  # every image refused as padded
    plain = capsys.readouterr()
    assert plain.out.count("padded: bands of constant grey cover 45.5%") == 32
    assert plain.err == ("error: no image to train on: 0 could not be decoded, 32 are out of scope (the lines above "
                         "say why)\n")
    assert train_main(_args(tmp_path / "data", tmp_path / "crop", *common, "--crop-bands")) == 0
    with open(tmp_path / "crop" / "resnet_aug" / "metrics.json") as f:
        assert json.load(f)["preprocessing"]["crop_bands"] is True
    assert "skipped 0" in capsys.readouterr().out


def test_artefacts_or_gamma_outside_their_bounds_are_refused(tmp_path, capsys):
    make_tree(str(tmp_path / "data"), per_class=4, size=48, seed=1)
    for bad in (["--artefact-prob", "1.5"], ["--gamma-range", "2.0", "0.5"], ["--gamma-range", "0", "1"],
                ["--gamma-range", "1", "inf"], ["--gamma-range", "nan", "1"]):  # review: inf made blank images
        assert_one_line_error(capsys, train_main(_args(tmp_path / "data", tmp_path / "run", *bad)),
                              "--artefact-prob must be in [0, 1] and --gamma-range two numbers in (0, 5], low first")
    assert os.listdir(tmp_path) == ["data"]
