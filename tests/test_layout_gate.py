"""The input gate's layout check (xray_core/gate.py `layout`, version 8 on): the content check's statistic and limit
rule on the model input's 16x16 block means, fitted on the training split, its limit from the validation split, kept
in gate.npz as plain arrays with the validation rows it is derived again from."""
from __future__ import annotations

import numpy as np
import pytest
from test_orientation import _chest_like

from xray_core import gate, orientation


def _blob(n: int, seed: int, size: int = 64) -> np.ndarray:
    """A photograph's layout: one bright subject in the middle of a darker scene (a cat, a cameraman)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 1), np.float32)
    for i in range(n):
        img = 0.2 + 0.6 * (((xx - 0.5) / 0.25) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
        out[i, ..., 0] = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
    return out


def _derived():
    return gate.derive_layout(_chest_like(300, seed=0), _chest_like(100, seed=1))


def test_the_limit_is_the_validation_rows_percentile_times_the_margin_and_chest_layouts_pass():
    figures, fitted = _derived()
    assert tuple(figures) == gate.LAYOUT_FIGURES
    assert (figures["rows"], figures["held_out_rows"]) == (300, 100)
    assert (figures["percentile"], figures["margin"]) == (99.5, 1.2)
    validation = orientation.layout(_chest_like(100, seed=1))
    assert figures["held_out_quantile"] == pytest.approx(np.percentile(fitted.distances(validation), 99.5))
    assert figures["limit"] == pytest.approx(figures["held_out_quantile"] * 1.2) == fitted.limit
    assert (fitted.distances(orientation.layout(_chest_like(50, seed=2))) <= fitted.limit).mean() >= 0.98
    assert (fitted.distances(orientation.layout(_blob(20, seed=3))) > fitted.limit).all()


def test_the_gate_says_the_distance_first_then_the_orientation_then_the_layout():
    figures, laid = _derived()
    turned, _ = orientation.fit(_chest_like(60, seed=2))
    g = gate.Gate(np.zeros(2), np.eye(2), 3.0, turned, laid)
    chest, blob = _chest_like(3, seed=4), _blob(2, seed=5)
    arrays = [chest[0], chest[1, ::-1, ::-1], blob[0], blob[1]]
    reasons = g.reasons(np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0]]), arrays)
    assert reasons[0] is None
    assert reasons[1].startswith("looks upside down or inverted (P ")
    distance = float(laid.distances(orientation.layout(blob[:1]))[0])
    assert reasons[2] == (f"not laid out like the chest X-rays the model knows (layout distance {distance:.1f} > "
                          f"limit {laid.limit:.1f})")
    assert reasons[3] == "not like the chest X-rays the model knows (distance 5.0 > limit 3.0)"
    assert gate.Gate(np.zeros(2), np.eye(2), 3.0).reasons(np.zeros((1, 2)), arrays[2:3]) == [None]  # no such check


def test_the_check_round_trips_through_gate_npz_with_its_validation_rows(tmp_path):
    figures, laid = _derived()
    path = str(tmp_path / gate.FIT_FILE)
    validation = orientation.layout(_chest_like(100, seed=1))
    gate.write_fit(path, gate.Gate(np.zeros(4), np.eye(4), 3.0, layout=laid), validation)
    again = gate.read_fit(path, 3.0, layout_limit=figures["limit"])
    np.testing.assert_array_equal(again.layout.location, laid.location)
    np.testing.assert_array_equal(again.layout.precision, laid.precision)
    assert again.layout.limit == figures["limit"] and again.orientation is None
    np.testing.assert_allclose(gate.read_layout_validation(path), validation, atol=1e-6)  # kept as float32
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["layout_location", "layout_precision", "layout_validation", "location", "precision"]
    with pytest.raises(gate.GateError, match="holds a layout check that metadata.json does not record"):
        gate.read_fit(path, 3.0)
    np.savez(path, location=np.zeros(4), precision=np.eye(4), layout_location=np.zeros(7),
             layout_precision=np.eye(7), layout_validation=validation)
    with pytest.raises(gate.GateError, match=r"is malformed: layout \(7,\), \(7, 7\)"):
        gate.read_fit(path, 3.0, layout_limit=1.0)


def test_its_figures_in_metadata_are_checked():
    figures, _ = _derived()
    spec = {"statistic": gate.TRAINING_SPLIT, "limit": 3.0, "percentile": 99.5, "margin": 1.2,
            "held_out_quantile": 2.5, "folds": 0, "rows": 60, "seed": 0, "file": gate.FIT_FILE, "sha256": "x"}
    assert gate.GateSpec.from_dict({**spec, "layout": figures}).layout == figures
    assert "layout" not in gate.GateSpec.from_dict(spec).to_dict()  # as before the check existed
    assert gate.GateSpec.from_dict({**spec, "layout": figures}) != gate.GateSpec.from_dict(spec)
    for bad in ({k: v for k, v in figures.items() if k != "limit"}, {**figures, "limit": -1.0}, [1]):
        with pytest.raises(gate.GateError, match="layout must hold method, limit"):
            gate.GateSpec.from_dict({**spec, "layout": bad})
    with pytest.raises(gate.GateError, match="unusable"):  # a gate fitted on reference rows alone has no images
        gate.GateSpec.from_dict({**spec, "statistic": gate.STATISTIC, "layout": figures})
