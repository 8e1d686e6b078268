"""The shipped default model and the quickstart's real X-rays (no TensorFlow needed)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from batch_job.cli import main as batch_main
from helpers import SHARED_DATA, SITE_SAMPLE, read_predictions
from xray_core import gate
from xray_core.package import resolve_version_dir
from xray_core.verify import verify_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME_DIR = os.path.join(REPO, "serving_models", "pneumonia")
EXAMPLES = os.path.join(REPO, "examples", "xrays")


def _meta(version_dir):
    with open(os.path.join(version_dir, "metadata.json")) as f:
        return json.load(f)


def _rows(out_dir):
    import csv
    import glob

    rows = []
    for shard in sorted(glob.glob(os.path.join(out_dir, "predictions-*.csv"))):
        with open(shard, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows += list(csv.DictReader(f))
    return rows


def test_default_is_version_8_calibrated_on_the_site_with_occlusion_maps_a_drift_reference_and_a_gate():
    vdir = resolve_version_dir(NAME_DIR)
    assert os.path.basename(vdir) == "9"
    assert all(check.ok for check in verify_package(vdir)), [c.line() for c in verify_package(vdir)]
    meta = _meta(vdir)
    assert meta["architecture"] == "resnet_aug"
    assert meta["threshold_source"] == "site calibration sample"
    assert meta["decision_threshold"] == meta["site_calibration"]["threshold"]
    assert meta["heatmap_output"]["shape"] == [-1, 8, 8]
    # the speed issue's quality targets, by the recorded 2-fold estimate (specificity: 0.889, short of its 0.90)
    est = meta["site_calibration"]["two_fold"]
    assert est["roc_auc"] >= 0.985 and est["recall"] >= 0.95 and est["specificity"] >= 0.85
    # heatmaps about each image: the occlusion maps the job shows
    assert meta["heatmap_method"] == {"name": "occlusion", "grid": 8, "fill": "image mean"}
    faith = meta["heatmap"]["faithfulness"]
    assert faith["share_top_beats_random"] >= 0.8 and faith["share_own_beats_average"] >= 0.7
    assert faith["graph_map"]["share_own_beats_average"] < 0.7  # why the graph's map is not shown
    # the drift reference: the validation split's 782 probabilities and embeddings of the 2 members' 256 features
    ref = meta["reference"]
    assert (ref["images"], ref["embedding_rows"], ref["embedding_dim"]) == (782, 782, 512)
    assert ref["splits"] == {"val": 782, "test": 783}
    # the gate: fitted on the training split's 3,651 embeddings, its limit from the 782 validation rows
    g = meta["gate"]
    assert (g["statistic"], g["rows"], g["held_out_rows"], g["margin"]) == (
        "mahalanobis_ledoit_wolf_training_split", 3651, 782, 1.2)
    # and the orientation check, fitted on the same images: held out, it refuses >= 95% of scans turned 180 degrees
    # and <= 1% of upright ones (the input gate's own targets), or the package would not have it
    o = g["orientation"]
    assert (o["limit"], o["rows"], o["folds"]) == (0.5, 3651, 5)
    assert o["held_out_upside_down_refused"] >= 0.95 and o["held_out_upright_refused"] <= 0.01
    # and the layout check: the training split's 16x16 block means, each image as it is, mirrored and in 3 tilted
    # copies, its limit from the 782 validation images' counted the same way
    lo = g["layout"]
    assert (lo["rows"], lo["held_out_rows"], lo["percentile"], lo["margin"]) == (3651 * 5, 782 * 5, 99.5, 1.2)
    assert lo["method"] == gate.LAYOUT_METHOD_TILTED and lo["limit"] == lo["held_out_quantile"] * 1.2
    # version 9 is version 8 with the layout check fitted on the tilted copies too; version 8 is version 7's network,
    # threshold, content and orientation checks with the layout check on the images as they are; version 7 is
    # version 6's with the orientation check; version 6 is version 5's network and threshold with the content check
    v5, v6, v7, v8 = (_meta(os.path.join(NAME_DIR, v)) for v in ("5", "6", "7", "8"))
    assert meta["sha256"] == v8["sha256"] == v7["sha256"] == v6["sha256"] == v5["sha256"]
    assert meta["decision_threshold"] == v8["decision_threshold"] == v7["decision_threshold"] \
        == v6["decision_threshold"] == v5["decision_threshold"]
    assert {k: v for k, v in g.items() if k not in ("layout", "sha256")} == {
        k: v for k, v in v8["gate"].items() if k not in ("layout", "sha256")}
    assert (v8["gate"]["layout"]["rows"], v8["gate"]["layout"]["method"]) == (3651, gate.LAYOUT_METHOD)
    assert {k: v for k, v in v8["gate"].items() if k not in ("layout", "sha256")} == {
        k: v for k, v in v7["gate"].items() if k != "sha256"} and "layout" not in v7["gate"]
    assert abs(g["limit"] - v6["gate"]["limit"]) < 1e-5 and "orientation" not in v6["gate"]
    assert v5["gate"]["statistic"] == "mahalanobis_ledoit_wolf"
    for old in ("5", "6", "7", "8"):
        assert all(check.ok for check in verify_package(os.path.join(NAME_DIR, old)))
    for old in ("1", "2", "3", "4"):  # earlier versions keep scoring, without a gate
        assert all(check.ok for check in verify_package(os.path.join(NAME_DIR, old)))
        assert "gate" not in _meta(os.path.join(NAME_DIR, old))


def test_model_card_gives_the_site_numbers_first():
    card = open(os.path.join(resolve_version_dir(NAME_DIR), "MODEL_CARD.md")).read()
    assert card.index("Site sample first") < card.index("Internal test split")
    assert "overestimates" in card


def test_examples_are_small_grayscale_real_xrays_with_their_licence():
    files = [os.path.join(d, f) for d, _, fs in os.walk(EXAMPLES) for f in fs]
    assert 20 <= len(files) <= 40
    for path in files:
        with Image.open(path) as img:
            assert img.mode == "L" and max(img.size) <= 224, path
    readme = open(os.path.join(REPO, "examples", "README.md")).read()
    assert "CC BY 4.0" in readme and "Kermany" in readme and "calibrate" in readme


def test_quickstart_scores_the_shipped_xrays_with_labels(tmp_path):
    """Quickstart command 1: every shipped X-ray scored, labelled from its folder, and the in-sample
    figures of the shipped model on them."""
    out = str(tmp_path / "scored")
    assert batch_main(["--input", EXAMPLES, "--model", NAME_DIR, "--output", out, "--overwrite"]) == 0
    rows = _rows(out)
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["label"] for r in rows) == ["NORMAL"] * 15 + ["PNEUMONIA"] * 15
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["images_scored"] == 30
    assert m["accuracy"] >= 0.9 and m["roc_auc"] >= 0.95  # these images also calibrated the threshold
    assert m["drift"]["note"] == "too few images to judge" and m["drift"]["images"] == 30
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        assert "Trained on paediatric chest X-rays (children aged 1–5) from one hospital (Kermany et al. 2018)" \
            in f.read()


@pytest.fixture(scope="module")
def site_run(tmp_path_factory) -> str:
    """The site sample (313 real labelled X-rays) scored by the batch job with the shipped model, as a user would."""
    if not os.path.isdir(SITE_SAMPLE):
        pytest.skip("../shared/data/chest_xray/site_sample not present")
    out = str(tmp_path_factory.mktemp("site") / "out")
    assert batch_main(["--input", SITE_SAMPLE, "--model", NAME_DIR, "--output", out]) == 0
    return out


def _by_label(rows) -> dict[str, int]:
    return {label: sum(r["label"] == label for r in rows) for label in ("NORMAL", "PNEUMONIA")}


@pytest.mark.slow
def test_batch_job_reproduces_the_recorded_site_calibration(site_run):
    """Scoring the site sample with the batch job gives the decisions at the package's threshold that export
    recorded (export scores without the gate: the images the gate refuses are the whole difference), and the
    probabilities the package gives the same files outside the job: the two sides preprocess and score
    identically."""
    rows = _rows(site_run)
    vdir = resolve_version_dir(NAME_DIR)
    site = _meta(vdir)["site_calibration"]
    scored = [r for r in rows if r["status"] == "ok"]
    refused = [r for r in rows if r["status"] == "out_of_scope"]
    assert len(rows) == site["images"] == 313 and len(scored) + len(refused) == 313
    assert len(refused) <= 3  # the gate's target: <= 1% of real new scans (version 7: 2, a NORMAL on the content
    # check's limit and a PNEUMONIA that looks upside down to the orientation check)
    assert all(r["error"].startswith(("not like the chest X-rays the model knows", "looks upside down or inverted (P "))
               for r in refused)
    y = np.array([r["label"] == "PNEUMONIA" for r in scored], dtype=int)
    p = np.array([float(r["probability"]) for r in scored])
    cm = np.array(skm.confusion_matrix(y, (p >= site["threshold"]).astype(int), labels=[0, 1]))
    recorded = np.array(site["at_calibrated_threshold"]["confusion_matrix"]["matrix"])
    missing = recorded - cm  # what export counted and the job refused, per true label
    assert missing.min() >= 0 and missing.sum() == len(refused)
    assert missing.sum(axis=1).tolist() == [_by_label(refused)["NORMAL"], _by_label(refused)["PNEUMONIA"]]
    if not refused:
        assert skm.roc_auc_score(y, p) == pytest.approx(site["at_0.5"]["roc_auc"], abs=1e-6)
    # the job's probabilities are the package's on the same files
    from xray_core.package import load_metadata, open_session, score
    from xray_core.preprocessing import preprocess_image

    meta, sample = load_metadata(vdir), scored[::16]
    x = np.stack([preprocess_image(r["path"], meta.config) for r in sample])
    direct = score(open_session(os.path.join(vdir, "model.onnx"), 1), x).probability
    np.testing.assert_allclose([float(r["probability"]) for r in sample], direct, atol=1e-6)
    # the later collection is not what the model was validated on: the drift check says so
    with open(os.path.join(site_run, "metrics.json")) as f:
        drift = json.load(f)["drift"]
    assert drift["judged"] and drift["detected"] and drift["domain_auc"] > drift["domain_auc_limit"]


@pytest.mark.slow
def test_site_sample_counts_labels_and_metrics(site_run):
    """Every image scored once or refused by the gate, labelled from its folder; metrics.json agrees with
    scikit-learn on the scored rows."""
    counts = {label: len(os.listdir(os.path.join(SITE_SAMPLE, label))) for label in ("NORMAL", "PNEUMONIA")}
    rows = read_predictions(site_run)
    assert len(rows) == sum(counts.values()) == 313
    assert {r["status"] for r in rows.values()} <= {"ok", "out_of_scope"}
    assert _by_label(rows.values()) == counts
    scored = [r for r in rows.values() if r["status"] == "ok"]
    refused = _by_label([r for r in rows.values() if r["status"] == "out_of_scope"])
    m = json.load(open(os.path.join(site_run, "metrics.json")))
    assert m["images_found"] == 313 and m["images_scored"] == m["labelled_images"] == len(scored) >= 310
    assert m["images_out_of_scope"] == sum(refused.values())
    cm = m["confusion_matrix"]
    assert (cm["tn"] + cm["fp"], cm["fn"] + cm["tp"]) == (counts["NORMAL"] - refused["NORMAL"],
                                                          counts["PNEUMONIA"] - refused["PNEUMONIA"])
    y = np.asarray([r["label"] == "PNEUMONIA" for r in scored], dtype=int)
    p = np.asarray([float(r["probability"]) for r in scored])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p)) and m["roc_auc"] > 0.5
    assert m["recall"] == pytest.approx(cm["tp"] / (counts["PNEUMONIA"] - refused["PNEUMONIA"]))
    assert m["heatmaps"]["written"] == min(12, m["positive_count"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data/chest_xray/train not present")
def test_internal_test_split_reports_no_drift(tmp_path):
    """The package's splits.csv rebuilds the in-distribution check: the internal test split's files (training
    folder, never trained on) against the validation split's reference."""
    import csv

    folder = tmp_path / "test_split"
    with open(os.path.join(resolve_version_dir(NAME_DIR), "splits.csv"), newline="") as f:
        files = [r["file"] for r in csv.DictReader(f) if r["split"] == "test"]
    for name in files:
        (folder / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(os.path.abspath(SHARED_DATA), name), folder / name)
    out = str(tmp_path / "out")
    assert batch_main(["--input", str(folder), "--model", NAME_DIR, "--output", out, "--heatmaps", "0"]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["images_scored"] + m["images_out_of_scope"] == len(files) == 783
    assert m["images_out_of_scope"] <= 0.01 * len(files)  # real scans pass the input gate (docs/gate.md)
    drift = m["drift"]
    assert drift["judged"] and not drift["detected"]
    assert drift["domain_auc"] < drift["domain_auc_limit"] and drift["psi"] < drift["psi_limit"]


def _upright_and_turned(folder):
    """The shipped X-rays as PNGs, each also turned by 180 degrees (`_turned`)."""
    for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(EXAMPLES) for f in fs):
        label = os.path.basename(os.path.dirname(path))
        os.makedirs(folder / label, exist_ok=True)
        with Image.open(path) as img:
            stem = os.path.splitext(os.path.basename(path))[0]
            img.save(folder / label / f"{stem}.png")
            img.transpose(Image.Transpose.ROTATE_180).save(folder / label / f"{stem}_turned.png")
    return folder


def test_the_shipped_xrays_turned_upside_down_are_out_of_scope(tmp_path):
    """QA: the site sample turned by 180 degrees passed the input gate for 300 of 313 scans, and the model's
    specificity on them fell from 0.914 to 0.448. The shipped X-rays (never trained on), upright and turned: all
    upright ones scored, every turned one refused as upside down, none flagged. Version 6, without the check,
    scores most of the turned ones."""
    folder = _upright_and_turned(tmp_path / "in")
    for model, turned_refused in ((NAME_DIR, 30), (os.path.join(NAME_DIR, "6"), None)):
        out = str(tmp_path / os.path.basename(model))
        assert batch_main(["--input", str(folder), "--model", model, "--output", out, "--heatmaps", "0"]) == 0
        rows = {os.path.basename(r["path"]): r for r in _rows(out)}
        upright = [r for name, r in rows.items() if not name.endswith("_turned.png")]
        turned = [r for name, r in rows.items() if name.endswith("_turned.png")]
        assert len(upright) == len(turned) == 30 and all(r["status"] == "ok" for r in upright)
        refused = [r for r in turned if r["status"] == "out_of_scope"]
        upside_down = [r for r in refused if r["error"].startswith("looks upside down or inverted (P ")]
        if turned_refused is None:
            assert not upside_down and len(refused) <= 10  # version 6 scores most of them
        else:  # a few are refused by the content check first (measured: 2, "not like the chest X-rays ...")
            assert len(refused) == turned_refused and len(upside_down) >= 25
            assert not any(r["prediction"] for r in turned)


@pytest.mark.slow
def test_the_orientation_check_holds_on_the_dask_runner(tmp_path, request):
    """The same check on DaskRunner (a local scheduler and workers), in batches of one: every upright X-ray scored,
    every turned one out of scope, the same rows as DirectRunner."""
    folder = _upright_and_turned(tmp_path / "in")
    rows = {}
    for runner, extra in (("direct", []), ("dask", ["--runner", "DaskRunner", "--batch-size", "1",
                                                    f"--dask_client_address={request.getfixturevalue('dask_cluster')}"])):
        out = str(tmp_path / runner)
        argv = ["--input", str(folder), "--model", NAME_DIR, "--output", out, "--heatmaps", "0", *extra]
        assert batch_main(argv) == 0
        rows[runner] = {r["path"]: (r["status"], r["probability"], r["error"][:19]) for r in _rows(out)}
    assert rows["dask"] == rows["direct"]
    turned = [v for path, v in rows["dask"].items() if path.endswith("_turned.png")]
    assert len(turned) == 30 and all(status == "out_of_scope" for status, _, _ in turned)
    assert sum(status == "ok" for status, _, _ in rows["dask"].values()) == 30


def test_the_shipped_xrays_tilted_or_cropped_stay_in_scope_and_nearly_upside_down_ones_do_not():
    """QA: version 7's first orientation check, fitted on upright scans alone, refused 4-28% of upright site scans
    tilted by 15-20 degrees (P up to 0.99) and 7-8% of tightly cropped ones, and let scans turned by 195 or 210
    degrees through. Refitted on tilted and cropped copies too: on the 30 shipped X-rays (never trained on),
    measured with the package's own check on the job's model inputs."""
    from xray_core import gate
    from xray_core.package import load_metadata
    from xray_core.preprocessing import to_model_input

    vdir = resolve_version_dir(NAME_DIR)
    meta = load_metadata(vdir)
    check = gate.package_gate(gate.GateSpec.from_dict(meta.gate), vdir).orientation
    images = [Image.open(os.path.join(d, f)).convert("L") for d, _, fs in sorted(os.walk(EXAMPLES)) for f in sorted(fs)]

    def refused(variant) -> int:
        x = np.stack([to_model_input(variant(img), meta.config) for img in images])
        return int(np.sum(check.probability(x) > 0.5))

    assert len(images) == 30 and refused(lambda img: img) == 0
    for degrees in (-20, -15, 15, 20):
        assert refused(lambda img: img.rotate(degrees, resample=Image.Resampling.BILINEAR)) <= 1, degrees
    assert refused(lambda img: img.crop((img.width // 8, img.height // 10, img.width * 7 // 8,
                                         img.height * 3 // 4))) <= 1  # the lungs, tightly
    for degrees in (165, 180, 195):
        assert refused(lambda img: img.rotate(degrees, resample=Image.Resampling.BILINEAR)) >= 28, degrees
