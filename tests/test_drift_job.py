"""Drift checks in the batch job: the run's seeded embedding sample (per-shard summaries, the driver's merge), the
`drift` block, the summary line, --fail-on-drift (exit 4), the limits' options, small runs, models without a
reference, images skipped through the ledger, and the same figures on DirectRunner and DaskRunner."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from batch_job import drift_check, shard_result
from batch_job.cli import main
from batch_job.drift import DOMAIN_AUC_LIMIT, MIN_IMAGES, PSI_LIMIT
from batch_job.scoring import ScoringSpec, make_row
from batch_job.synthetic import make_tree
from helpers import assert_one_line_error, job, write_bad_inputs, write_package
from xray_core.preprocessing import PreprocessConfig, preprocess_image

PER_CLASS = 60  # 120 images a run: above MIN_IMAGES


@pytest.fixture(scope="module")
def drift_package(tmp_path_factory) -> str:
    """The tiny model with an `embedding` output (the input pooled to 4x4) and a reference of 160 synthetic
    images (the 'validation split')."""
    base = tmp_path_factory.mktemp("drift_pkg")
    paths = make_tree(str(base / "val"), per_class=80, size=48, seed=21)
    config = PreprocessConfig(image_size=32)
    images = np.stack([preprocess_image(p, config) for p in paths])
    write_package(str(base / "serving"), image_size=32, reference_images=images)
    return str(base / "serving" / "pneumonia")


@pytest.fixture(scope="module")
def same_tree(tmp_path_factory) -> str:
    """New images from the reference's distribution."""
    root = str(tmp_path_factory.mktemp("same"))
    make_tree(root, per_class=PER_CLASS, size=48, seed=22)
    return root


@pytest.fixture(scope="module")
def shifted_tree(tmp_path_factory) -> str:
    """The same kind of images from a 'new scanner' that lays them out turned by 90 degrees: the pooled
    features change, the brightness (and so the probability) does not."""
    root = str(tmp_path_factory.mktemp("shifted"))
    for path in make_tree(root, per_class=PER_CLASS, size=48, seed=22):
        with Image.open(path) as img:
            turned = img.transpose(Image.Transpose.ROTATE_90)
        turned.save(path, quality=92) if path.endswith(".jpeg") else turned.save(path)
    return root


def run(tree, package, out, *extra) -> int:
    return main(["--input", tree, "--model", package, "--output", str(out), "--batch-size", "8",
                 "--direct_num_workers=2", "--direct_running_mode=multi_threading", *extra])


def drift_of(out) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["drift"]


@pytest.fixture(scope="module")
def same_run(drift_package, same_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("same_run") / "out"
    assert run(same_tree, drift_package, out) == 0
    return str(out)


def test_in_distribution_run_reports_no_drift(same_run, capsys):
    d = drift_of(same_run)
    assert d["reference"] and d["judged"] and not d["detected"]
    assert d["images"] == d["sampled"] == 2 * PER_CLASS and d["reference_images"] == 160
    assert 0.35 < d["domain_auc"] < DOMAIN_AUC_LIMIT and d["psi"] < PSI_LIMIT
    assert (d["domain_auc_limit"], d["psi_limit"]) == (DOMAIN_AUC_LIMIT, PSI_LIMIT)
    assert abs(d["positive_rate"] - d["reference_positive_rate"]) < 0.15
    assert "scratch" not in os.listdir(same_run)  # shard summaries gathered, never published


def test_shifted_run_reports_drift_and_the_summary_line_says_so(drift_package, shifted_tree, tmp_path, capsys):
    assert run(shifted_tree, drift_package, tmp_path / "out") == 0  # drift alone never fails the job
    d = drift_of(tmp_path / "out")
    assert d["detected"] and d["domain_auc"] > 0.9
    lines = capsys.readouterr().out.splitlines()
    line = [x for x in lines if x.startswith("drift: ")]
    assert len(line) == 1 and line[0].startswith(f"drift: DETECTED (domain AUC {d['domain_auc']:.3f} (limit 0.60)")


def test_rerun_gives_the_same_figures_whatever_the_shards(same_run, drift_package, same_tree, tmp_path):
    assert run(same_tree, drift_package, tmp_path / "out", "--shard-size", "16", "--batch-size", "4") == 0
    a, b = drift_of(same_run), drift_of(tmp_path / "out")
    assert (a["domain_auc"], a["psi"], a["positive_rate"]) == (b["domain_auc"], b["psi"], b["positive_rate"])


def test_fail_on_drift_exits_4_with_outputs_published(drift_package, shifted_tree, same_tree, tmp_path, capsys):
    rc = run(shifted_tree, drift_package, tmp_path / "shifted", "--fail-on-drift")
    line = assert_one_line_error(capsys, rc, "drift: DETECTED", "outputs published", code=4)
    assert "--fail-on-drift" in line
    assert drift_of(tmp_path / "shifted")["detected"]  # published all the same
    assert os.path.exists(tmp_path / "shifted" / "report.html")
    assert run(same_tree, drift_package, tmp_path / "same", "--fail-on-drift") == 0


def test_limits_are_options(drift_package, same_tree, tmp_path, capsys):
    # a limit below what the in-distribution run measures turns the same figures into a detection
    rc = run(same_tree, drift_package, tmp_path / "out", "--drift-psi-limit", "0.0001", "--drift-auc-limit", "0.99")
    assert rc == 0
    d = drift_of(tmp_path / "out")
    assert d["detected"] and (d["psi_limit"], d["domain_auc_limit"]) == (0.0001, 0.99) and d["psi"] > 0.0001


@pytest.mark.parametrize("option", [["--drift-auc-limit", "0.4"], ["--drift-auc-limit", "1.5"],
                                    ["--drift-psi-limit", "0"], ["--drift-psi-limit", "-1"]])
def test_bad_limits_are_refused(drift_package, same_tree, tmp_path, capsys, option):
    rc = run(same_tree, drift_package, tmp_path / "out", *option)
    assert_one_line_error(capsys, rc, "--drift-auc-limit must be in [0.5, 1] and --drift-psi-limit > 0")
    assert not os.path.exists(tmp_path / "out")


def test_small_run_is_too_few_to_judge(drift_package, tmp_path, capsys):
    make_tree(str(tmp_path / "few"), per_class=20, size=48, seed=5)
    assert run(str(tmp_path / "few"), drift_package, tmp_path / "out") == 0
    d = drift_of(tmp_path / "out")
    assert not d["judged"] and not d["detected"] and "domain_auc" not in d
    assert f"drift: too few images to judge (40 scored in this run, need {MIN_IMAGES})" in capsys.readouterr().out


def test_model_without_reference_scores_as_before_and_says_so(tiny_package, same_tree, tmp_path, capsys):
    assert run(same_tree, tiny_package, tmp_path / "out", "--fail-on-drift") == 0
    d = drift_of(tmp_path / "out")
    assert d == {**d, "reference": False, "judged": False, "detected": False, "note": "no drift reference"}
    out = capsys.readouterr().out
    assert "drift: not checked, the model has no drift reference" in out
    assert not os.path.exists(tmp_path / "out" / "drift.png")


def test_figures_cover_only_images_scored_in_this_run(drift_package, same_tree, shifted_tree, tmp_path):
    ledger = str(tmp_path / "ledger.sqlite")
    assert run(same_tree, drift_package, tmp_path / "night1", "--ledger", ledger) == 0
    # night 2: last night's images again (skipped) and the shifted ones (new)
    assert run(same_tree, drift_package, tmp_path / "night2", "--ledger", ledger, "--input", shifted_tree) == 0
    d = drift_of(tmp_path / "night2")
    assert d["images"] == 2 * PER_CLASS and d["detected"] and d["domain_auc"] > 0.9
    # night 3: nothing new: nothing to judge
    assert run(same_tree, drift_package, tmp_path / "night3", "--ledger", ledger) == 0
    assert drift_of(tmp_path / "night3")["images"] == 0 and not drift_of(tmp_path / "night3")["judged"]
    assert os.path.exists(tmp_path / "night3" / "drift_trend.png")


def test_sample_is_the_smallest_keys_over_all_shards(tmp_path):
    rng = np.random.default_rng(0)
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5, drift_sample=50)
    records = [make_row(f"/x/{i}.png", "", spec, 0.5, embedding=rng.normal(size=3)) if i % 7 else
               make_row(f"/x/{i}.png", "", spec, error="bad") for i in range(300)]
    whole = drift_check.smallest(records, 50)
    for shard_id, start in enumerate(range(0, 300, 64)):
        shard_result.write(str(tmp_path), shard_id, shard_result.summarise(records[start:start + 64], spec))
    shards = [(i, 0, 0) for i in range(5)]
    merged = shard_result.gather(str(tmp_path), shards, 0, 50)
    assert np.array_equal(merged.sample_embeddings, whole[1]) and len(merged.sample_embeddings) == 50
    assert np.array_equal(merged.sample_keys, whole[0])
    ok = {r.path for r in records if r.status == "ok"}
    expected = sorted(ok, key=drift_check.sample_key)[:50]
    assert [drift_check.sample_key(p) for p in expected] == whole[0].tolist()
    assert drift_check.sample_key("/x/1.png", seed=1) != drift_check.sample_key("/x/1.png")


@pytest.mark.slow
def test_dask_runner_gives_the_same_figures(same_run, drift_package, same_tree, tmp_path, dask_cluster):
    out = str(tmp_path / "dask")
    assert main(["--input", same_tree, "--model", drift_package, "--output", out, "--batch-size", "8",
                 "--shard-size", "16", "--runner", "DaskRunner", f"--dask_client_address={dask_cluster}"]) == 0
    a, b = drift_of(same_run), drift_of(out)
    assert (a["images"], a["sampled"], a["domain_auc"], a["psi"]) == (b["images"], b["sampled"], b["domain_auc"],
                                                                       b["psi"])


def test_sample_cap_holds_end_to_end_whatever_the_shards(drift_package, same_tree, tmp_path, monkeypatch):
    """With a cap below the run's size the sample is the cap's smallest keys over all shards: the same figures
    with 8 or 3 shards."""
    monkeypatch.setattr(drift_check, "SAMPLE_ROWS", 100)
    figures = []
    for shard_size in ("16", "48"):
        assert run(same_tree, drift_package, tmp_path / shard_size, "--shard-size", shard_size) == 0
        d = drift_of(tmp_path / shard_size)
        assert (d["images"], d["sampled"]) == (2 * PER_CLASS, 100)
        figures.append((d["domain_auc"], d["psi"]))
    assert figures[0] == figures[1]


def test_threshold_override_applies_to_both_positive_rates(drift_package, same_tree, tmp_path):
    from xray_core import reference

    assert run(same_tree, drift_package, tmp_path / "out", "--threshold", "0.9") == 0
    d = drift_of(tmp_path / "out")
    ref = reference.load(os.path.join(drift_package, "1", reference.REFERENCE_FILE)).probabilities
    assert d["reference_positive_rate"] == pytest.approx(float(np.mean(ref >= 0.9)))
    with open(tmp_path / "out" / "metrics.json") as f:
        assert d["positive_rate"] == pytest.approx(json.load(f)["positive_rate"])


def test_failed_images_are_not_in_the_figures(drift_package, same_tree, tmp_path):
    import shutil

    tree = str(tmp_path / "tree")
    shutil.copytree(same_tree, tree)
    bad = write_bad_inputs(os.path.join(tree, "NORMAL", "bad"))
    assert run(tree, drift_package, tmp_path / "out") == 0
    with open(tmp_path / "out" / "metrics.json") as f:
        m = json.load(f)
    assert m["images_failed"] >= len(bad) - 1 and m["images_found"] == m["images_scored"] + m["images_failed"]
    assert m["drift"]["images"] == m["drift"]["sampled"] == m["images_scored"] < m["images_found"]


def test_a_failing_check_costs_no_scores(drift_package, same_tree, tmp_path, monkeypatch, capsys):
    from batch_job import drift

    def broken(*args, **kwargs):
        raise ValueError("Input X contains NaN")

    monkeypatch.setattr(drift, "domain_auc", broken)
    assert run(same_tree, drift_package, tmp_path / "out", "--fail-on-drift") == 0  # published; not detected
    d = drift_of(tmp_path / "out")
    assert not d["judged"] and not d["detected"] and "ValueError: Input X contains NaN" in d["note"]
    assert "drift: not judged, check failed (ValueError: Input X contains NaN)" in capsys.readouterr().out


def test_rows_without_a_usable_embedding_are_left_out_of_the_sample():
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5, drift_sample=10)
    rows = [make_row("/x/a.png", "", spec, error="bad"),
            make_row("/x/b.png", "", spec, 0.5, embedding=np.array([np.nan, 0, 0])),
            make_row("/x/c.png", "", spec, 0.5, embedding=np.ones(3))]
    keys, embeddings = drift_check.smallest(rows, 10)
    assert keys.tolist() == [drift_check.sample_key("/x/c.png")] and embeddings.tolist() == [[1, 1, 1]]
    assert drift_check.smallest(rows[:2], 10)[0].tolist() == []


@pytest.mark.slow
def test_killed_after_scoring_leaves_scratch_the_rerun_cleans_up(drift_package, same_tree, tmp_path):
    import glob
    import signal

    out = str(tmp_path / "out")
    args = ["--input", same_tree, "--model", drift_package, "--output", out, "--shard-size", "32"]
    killed = job(args, env_kill="scored")
    assert killed.returncode == -signal.SIGKILL
    (left,) = glob.glob(out + ".tmp-*")
    assert any(name.startswith("shard-") for name in os.listdir(os.path.join(left, "scratch")))
    rerun = job(args)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    assert not glob.glob(out + ".tmp-*") and drift_of(out)["judged"]
