"""The input gate's content check (xray_core/gate.py) and `python -m export --add-gate` (no TensorFlow)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from export.__main__ import main as export_main
from helpers import assert_one_line_error, read_json, sha256_of, write_package
from xray_core import gate
from xray_core.verify import verify_package


def _gaussian(n, d=16, seed=0, shift=0.0):
    """n draws of one correlated Gaussian (the same mixing matrix whatever the seed), shifted by `shift`."""
    mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    return (np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift).astype(np.float16)


def test_limit_is_a_held_out_percentile_times_the_margin():
    rows = _gaussian(400)
    spec = gate.derive(rows)
    held = gate.held_out_distances(rows)
    assert held.shape == (400,) and np.all(held > 0)
    assert spec.held_out_quantile == pytest.approx(np.percentile(held, 99.5))
    assert spec.limit == pytest.approx(1.2 * spec.held_out_quantile)
    assert (spec.rows, spec.folds, spec.percentile, spec.margin) == (400, 5, 99.5, 1.2)
    assert gate.derive(rows) == spec  # seeded folds: the same limit every time (verify re-derives it)
    assert gate.derive(rows, percentile=90, margin=1.0).limit < spec.held_out_quantile


def test_in_distribution_rows_pass_and_far_rows_do_not():
    rows = _gaussian(400)
    g = gate.fit(rows, gate.derive(rows).limit)
    new = g.distances(_gaussian(1000, seed=7))
    assert np.mean(new > g.limit) <= 0.01  # fresh draws of the same distribution: at most 1% refused
    far = g.distances(_gaussian(200, seed=8, shift=3.0))
    assert np.all(far > g.limit)
    assert g.reason(float(far[0])).startswith("not like the chest X-rays the model knows (distance ")
    assert g.reason(float(g.limit)) is None


def test_a_refusal_reads_as_past_the_limit():
    """QA nit: a distance just past the limit read 'distance 40.7 > limit 40.7' in the worklist."""
    g = gate.fit(_gaussian(400), 40.68574418657478)
    assert g.reason(80.14).endswith("(distance 80.1 > limit 40.7)")
    assert g.reason(40.71).endswith("(distance 40.71 > limit 40.69)")
    assert g.reason(40.6858).endswith("(distance 40.6858 > limit 40.6857)")


def test_distances_are_the_mahalanobis_distance_of_scikit_learns_fit():
    from sklearn.covariance import LedoitWolf

    rows = _gaussian(200)
    g = gate.fit(rows, gate.derive(rows).limit)
    x = _gaussian(5, seed=3)
    np.testing.assert_allclose(g.distances(x) ** 2, LedoitWolf().fit(rows.astype(np.float64)).mahalanobis(
        x.astype(np.float64)), rtol=1e-6)


def test_too_few_rows_and_bad_specs_are_refused():
    with pytest.raises(gate.GateError, match="needs >= 50"):
        gate.derive(_gaussian(20))
    with pytest.raises(gate.GateError, match="malformed"):
        gate.GateSpec.from_dict({"limit": 3})
    spec = gate.derive(_gaussian(100)).to_dict()
    with pytest.raises(gate.GateError, match="unusable"):
        gate.GateSpec.from_dict({**spec, "statistic": "euclidean"})
    assert gate.GateSpec.from_dict(spec).to_dict() == spec


@pytest.mark.parametrize("edit", [
    {"limit": float("nan")}, {"limit": "50"}, {"limit": True}, {"held_out_quantile": None}, {"rows": 20},
    {"rows": 100.0}, {"limit": 10 ** 400},
    # review: a margin (or percentile) edited with a limit to match passed the spec and --verify
    {"margin": 100.0}, {"percentile": 50.0}])
def test_figures_the_derivation_cannot_give_are_refused_as_read(edit):
    spec = gate.derive(_gaussian(100)).to_dict()
    edited = {**spec, **edit}
    if "margin" in edit:
        edited["limit"] = spec["held_out_quantile"] * edit["margin"]
    with pytest.raises(gate.GateError, match="metadata gate is malformed: limit .* must be the held-out quantile "
                                             "times margin 1.2 at percentile 99.5, from >= 50 rows"):
        gate.GateSpec.from_dict(edited)


@pytest.mark.parametrize("edit", [{"folds": []}, {"seed": "0"}, {"folds": True}, {"source": 3}])
def test_the_other_figures_must_be_of_their_type(edit):
    """Review: "folds": [] passed --verify, then the job crashed on the spec as a cache key (unhashable)."""
    spec = gate.derive(_gaussian(100)).to_dict()
    with pytest.raises(gate.GateError, match="must be (whole numbers|strings)"):
        gate.GateSpec.from_dict({**spec, **edit})


@pytest.fixture()
def package(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (120, 32, 32, 1)).astype(np.float32)
    return write_package(str(tmp_path / "serving"), reference_images=images, heatmap_hw=(4, 4))


def test_add_gate_publishes_the_same_model_with_a_gate(package, tmp_path, capsys):
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving)]) == 0
    new = serving / "pneumonia" / "2"
    assert "input gate: mahalanobis_ledoit_wolf limit" in capsys.readouterr().out
    for f in ("model.onnx", "reference.npz", "splits.csv"):
        assert sha256_of(new / f) == sha256_of(os.path.join(package, f))
    meta, old = read_json(new / "metadata.json"), read_json(os.path.join(package, "metadata.json"))
    assert meta["version"] == 2 and meta["sha256"] == old["sha256"]
    assert meta["gate"]["statistic"] == "mahalanobis_ledoit_wolf" and meta["gate"]["rows"] == 120
    assert meta["source"]["republished_from"].startswith("pneumonia/1 (")
    assert "--add-gate" in meta["source"]["republish_command"]
    assert {k: v for k, v in meta.items() if k not in ("version", "gate", "source", "created_utc")} == \
        {k: v for k, v in old.items() if k not in ("version", "source", "created_utc")}
    assert meta["created_utc"] > old.get("created_utc", "")  # QA: it kept the source's, as if made when the source was
    assert all(c.ok for c in verify_package(str(new)))
    assert f"must be at most **{meta['gate']['limit']:.1f}**" in " ".join((new / "MODEL_CARD.md").read_text().split())


def test_verify_fails_a_gate_that_its_reference_does_not_give(package, tmp_path):
    serving = tmp_path / "serving"
    assert export_main(["--add-gate", package, "--serving-dir", str(serving)]) == 0
    path = serving / "pneumonia" / "2" / "metadata.json"
    meta = read_json(path)
    meta["gate"]["limit"] *= 2  # a limit loosened by hand, alone: not what its own figures give
    path.write_text(json.dumps(meta))
    failed = [c for c in verify_package(str(path.parent)) if not c.ok]
    assert [c.name for c in failed] == ["input gate"] and "must be the held-out quantile times margin 1.2" in \
        failed[0].detail
    meta["gate"]["held_out_quantile"] *= 2  # ... and its quantile with it: not what its reference gives
    path.write_text(json.dumps(meta))
    failed = [c for c in verify_package(str(path.parent)) if not c.ok]
    assert [c.name for c in failed] == ["input gate"] and "re-derived" in failed[0].detail


def test_add_gate_refuses_a_package_without_embeddings(tmp_path, capsys):
    vdir = write_package(str(tmp_path / "serving"))
    before = sorted(os.listdir(tmp_path / "serving" / "pneumonia"))
    argv = ["--add-gate", vdir, "--serving-dir", str(tmp_path / "serving")]
    line = assert_one_line_error(capsys, export_main(argv), "has no embedding output or no reference")
    assert line.startswith("error: pneumonia/1 (")  # the source, not pneumonia/2, the id it would have got
    assert sorted(os.listdir(tmp_path / "serving" / "pneumonia")) == before  # nothing half-written


def test_add_gate_refuses_a_package_that_does_not_verify(package, tmp_path, capsys):
    with open(os.path.join(package, "model.onnx"), "ab") as f:
        f.write(b"\0")
    assert_one_line_error(capsys, export_main(["--add-gate", package, "--serving-dir", str(tmp_path / "serving")]),
                          "does not verify", "sha256")
    assert sorted(os.listdir(tmp_path / "serving" / "pneumonia")) == ["1", "config.pbtxt"]
