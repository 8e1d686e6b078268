"""`python -m export --calibrate-dir`: the site-calibrated threshold and its 2-fold estimate, the heatmap and
embedding outputs, and the drift reference, on one tiny resnet_aug run (an ensemble of two, 32 px, 2 epochs)
exported once per module; the calibration's pure functions on known scores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from batch_job.synthetic import make_tree
from export.__main__ import main as export_main
from helpers import assert_one_line_error, export_run, pbtxt_section, read_json, sha256_of, snapshot
from train.__main__ import main as train_main
from train.data import read_split_csv
from xray_core.preprocessing import PreprocessConfig, preprocess_image
from xray_core.quality_floor import OVERRIDDEN, SITE, QualityFloor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------ --calibrate-dir


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """resnet_aug (an ensemble of two) trained with a site sample, exported with --calibrate-dir."""
    base = tmp_path_factory.mktemp("calibrated")
    data = base / "data"
    make_tree(str(data), per_class=40, size=48, seed=0)
    site = base / "site"
    make_tree(str(site), per_class=30, size=48, seed=5)
    run = base / "run_recipe"
    assert train_main(["--data-dir", str(data), "--output-dir", str(run), "--image-size", "32",
                       "--epochs", "2", "--models", "resnet_aug", "--ensemble", "2", "--last-stride", "2",
                       "--site-dir", str(site)]) == 0
    serving = base / "serving_calibrated"
    rc = export_run(run, serving, "--model", "resnet_aug", "--calibrate-dir", str(site), "--target-recall", "0.9")
    return {"rc": rc, "run": run, "site": site, "serving": serving, "vdir": serving / "pneumonia" / "1"}


def _site_scores(calibrated):
    from xray_core.package import open_session as load_session

    meta = read_json(calibrated["vdir"] / "metadata.json")
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
    metrics = read_json(calibrated["run"] / "resnet_aug" / "metrics.json")
    assert site["images"] == len(y) == 60 and (site["normal"], site["pneumonia"]) == (30, 30)
    from export.gate_fit import split_digest, training_paths  # the digest --add-gate --training-dir checks against

    data = str(calibrated["run"].parent / "data")
    assert meta["training_data"]["train_split_sha256"] == split_digest(
        training_paths(data, str(calibrated["vdir"] / "splits.csv")), data)
    src = meta["source"]  # chosen by the run (one model: no selection to state), on the site sample it calibrated on
    assert (src["selected_by"], src["candidates"], src["selected_on_calibration_sample"]) == (
        "site_roc_auc", ["resnet_aug"], True)
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
    """Each half is judged at the threshold chosen on the other half: the estimate is not in-sample. (Mutation QA,
    2026-12-02: a two_fold choosing each threshold on the half it measures passed the `!=` this test had.)"""
    from sklearn.model_selection import StratifiedGroupKFold

    from export.calibrate import two_fold
    from xray_core.metrics import choose_threshold, operating_point

    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 60)
    p = np.where(y == 1, rng.normal(0.7, 0.15, 100), rng.normal(0.35, 0.15, 100))
    groups = np.arange(100)
    est = two_fold(y, p, groups, 0.95)
    in_sample = operating_point(y, p, choose_threshold(y, p, 0.95))
    assert in_sample["recall"] >= 0.95
    halves = list(StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=0).split(p, y, groups))
    flagged = np.zeros(100, bool)
    for (fit, judged), fold in zip(halves, est["folds"]):
        assert fold["threshold"] == choose_threshold(y[fit], p[fit], 0.95)
        assert fold["threshold"] != choose_threshold(y[judged], p[judged], 0.95)
        flagged[judged] = p[judged] >= fold["threshold"]
    assert (est["recall"], est["specificity"]) == (flagged[y == 1].mean(), 1 - flagged[y == 0].mean()) == (58 / 60,
                                                                                                             32 / 40)


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
    ("training", "the folder the model was trained on: calibrate on labelled scans it never saw"),
    ("few", "has 5 NORMAL and 5 PNEUMONIA images; at least 30 of each class are needed"),  # QA: a 2-fold AUC of 0.4
])
@pytest.mark.slow
def test_calibrate_dir_errors_publish_nothing(calibrated, tmp_path, capsys, layout, fragment):
    cal = tmp_path / "cal"
    if layout == "training":  # the run's own --data-dir (run.json): an in-sample threshold
        cal = calibrated["run"].parent / "data"
    elif layout == "few":
        make_tree(str(cal), per_class=5, size=48, seed=4)
    elif layout:
        make_tree(str(cal), per_class=2, size=48, seed=4)
        shutil.rmtree(cal / "PNEUMONIA")
    serving = tmp_path / "serving"
    rc = export_run(calibrated["run"], serving, "--model", "resnet_aug", "--calibrate-dir", str(cal))
    assert_one_line_error(capsys, rc, fragment)
    assert snapshot(serving) == {}


@pytest.mark.slow
def test_calibrated_model_card_gives_site_numbers_first(calibrated):
    meta = read_json(calibrated["vdir"] / "metadata.json")
    card = (calibrated["vdir"] / "MODEL_CARD.md").read_text()
    est = meta["site_calibration"]["two_fold"]
    site_at = card.index("Site sample")
    assert site_at < card.index("Internal test split")
    assert f"{est['roc_auc']:.3f}" in card and f"{est['specificity']:.3f}" in card
    assert f"{meta['decision_threshold']:.4f}" in card
    internal, site = meta["test_metrics"]["at_0.5"]["roc_auc"], meta["site_calibration"]["at_0.5"]["roc_auc"]
    assert ("overestimates" in card) == (internal > site)  # said only where it does (QA)
    floor = QualityFloor(SITE, est["roc_auc"], est["recall"])  # judged on the 2-fold estimate, recorded as such
    assert meta["quality_floor"] == floor.to_dict()  # a run this small may be below it: export_run publishes anyway
    expected = (f"**Quality floor:** {floor.line()}." if floor.met
                else f"**Below the quality floor:** {floor.below(OVERRIDDEN)}.")
    assert expected in card


@pytest.mark.slow
def test_a_calibration_sample_the_model_does_not_rank_is_refused_after_scoring(calibrated, tmp_path, capsys):
    """The quality floor judged on the 2-fold estimate, once the sample is scored: exit 1, one line, and the staging
    folder (converted model and all) removed with the folders made for it."""
    swapped = tmp_path / "swapped"
    shutil.copytree(calibrated["site"] / "NORMAL", swapped / "PNEUMONIA")
    shutil.copytree(calibrated["site"] / "PNEUMONIA", swapped / "NORMAL")
    serving = tmp_path / "serving"
    rc = export_run(calibrated["run"], serving, "--model", "resnet_aug", "--calibrate-dir", str(swapped),
                    "--target-recall", "0.9", floor=True)
    assert_one_line_error(capsys, rc, "site calibration, 2-fold estimate: ROC AUC 0.", "below the quality floor",
                          "nothing published", code=1)
    assert not serving.exists()


@pytest.mark.slow
def test_the_command_refusing_after_tensorflow_loaded_prints_its_one_line_and_nothing_before(calibrated, tmp_path):
    """As a user runs it, in its own process: TensorFlow's start-up lines (absl, oneDNN, CUDA; 7 of them before
    2026-12-02) no longer come before the `error:` line (xray_core/native_stderr.py)."""
    swapped = tmp_path / "swapped"
    shutil.copytree(calibrated["site"] / "NORMAL", swapped / "PNEUMONIA")
    shutil.copytree(calibrated["site"] / "PNEUMONIA", swapped / "NORMAL")
    serving = tmp_path / "serving"
    done = subprocess.run([sys.executable, "-m", "export", "--run-dir", str(calibrated["run"]), "--serving-dir",
                           str(serving), "--model", "resnet_aug", "--calibrate-dir", str(swapped), "--target-recall",
                           "0.9"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: site calibration"), done.stderr
    assert "calibrated on 60 images" in done.stdout  # refused after TensorFlow loaded and the sample was scored
    assert not serving.exists()


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
    assert "## Heatmaps" in card and "Faithfulness of the occlusion maps the job shows" in card  # export's default


@pytest.mark.slow
def test_heatmap_in_triton_config_and_verify(calibrated, tmp_path, capsys):
    text = (calibrated["serving"] / "pneumonia" / "config.pbtxt").read_text()
    assert [e[0] for e in pbtxt_section(text, "output")] == ["probability", "heatmap", "embedding"]
    assert pbtxt_section(text, "output")[1][2] == [2, 2]
    dim = read_json(calibrated["vdir"] / "metadata.json")["reference"]["embedding_dim"]
    assert pbtxt_section(text, "output")[2][2] == [dim]
    assert "version_policy: { latest { num_versions: 1 } }" in text
    assert export_main(["--verify", str(calibrated["vdir"])]) == 0
    assert "PASS heatmap contract" in capsys.readouterr().out
    # metadata that lies about the heatmap's shape fails verification
    bad = tmp_path / "1"
    shutil.copytree(calibrated["vdir"], bad)
    meta = read_json(bad / "metadata.json")
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
    meta = read_json(vdir / "metadata.json")
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
    assert ref["sha256"] == sha256_of(vdir / "reference.npz") and ref["embedding_parity_max_abs_diff"] < 1e-4
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
    meta = read_json(calibrated["vdir"] / "metadata.json")
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
            m = read_json(bad / "metadata.json")
            m["reference"]["sha256"] = sha256_of(bad / "reference.npz")
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


@pytest.mark.parametrize("threshold", [0.05, 1.5, float("nan")])
def test_a_threshold_edited_in_the_package_fails_verify_and_the_job_refuses_it(calibrated, threshold, tmp_path,
                                                                               capsys):
    """QA defect: metadata.json's decision_threshold edited to 0.05 (or 1.5, NaN) passed --verify, and the job scored
    with 0.05 (specificity 0.40) or refused with '--threshold must be in [0, 1]' though none was given."""
    from batch_job.cli import main as job_main

    bad = tmp_path / "pneumonia" / "1"
    shutil.copytree(calibrated["vdir"], bad)
    meta = read_json(bad / "metadata.json")
    meta["decision_threshold"] = threshold
    (bad / "metadata.json").write_text(json.dumps(meta))
    assert export_main(["--verify", str(bad)]) == 1
    fail = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert fail == [f"FAIL {'decision threshold' if threshold == 0.05 else 'metadata'}: " + (
        f"0.0500 != the site calibration's {meta['site_calibration']['threshold']:.4f}" if threshold == 0.05
        else fail[0].split(": ", 1)[1])]
    assert threshold == 0.05 or "not in [0, 1]" in fail[0]
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=3)
    rc = job_main(["--input", str(inp), "--model", str(bad), "--output", str(tmp_path / "out")])
    assert_one_line_error(capsys, rc, f"model {bad} failed verification")
    assert not os.path.exists(tmp_path / "out")


def test_verify_reports_the_reference_and_gate_when_the_model_fails(calibrated, tmp_path, capsys):
    """QA defect: with model.onnx altered and reference.npz deleted, --verify printed only the sha256 failure."""
    bad = tmp_path / "1"
    shutil.copytree(calibrated["vdir"], bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.onnx").write_bytes(bytes(data))
    os.remove(bad / "reference.npz")
    assert export_main(["--verify", str(bad)]) == 1
    fail = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL ")]
    assert fail == ["FAIL sha256", "FAIL drift reference"]


def test_the_bootstraps_auc_is_scikit_learns():
    from sklearn.metrics import roc_auc_score

    from export.calibrate import auc

    rng = np.random.default_rng(4)
    for _ in range(20):
        y = rng.integers(0, 2, 120)
        p = np.round(rng.random(120), 1)  # many ties
        assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
