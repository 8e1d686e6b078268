"""The input gate's layout check (xray_core/gate.py `layout`, version 8 on): the content check's statistic and limit
rule on the model input's 16x16 block means, fitted on the training split, its limit from the validation split (from
version 9 each image as it is, mirrored and in the orientation check's tilted copies), kept in gate.npz as plain
arrays with the validation rows it is derived again from."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
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


def _derived(tilted: bool = True):
    return gate.derive_layout(_chest_like(300, seed=0), _chest_like(100, seed=1), tilted=tilted)


def _turned(images: np.ndarray, degrees: float) -> np.ndarray:
    """Each image turned by `degrees`, the corners black (a scan rotated in software)."""
    return np.stack([np.asarray(Image.fromarray(np.round(a[..., 0] * 255).astype(np.uint8)).rotate(
        degrees, resample=Image.Resampling.BILINEAR), np.float32)[..., None] / 255.0 for a in images])


@pytest.mark.parametrize("tilted", [True, False])
def test_the_limit_is_the_validation_rows_percentile_times_the_margin_and_chest_layouts_pass(tilted):
    figures, fitted, validation = _derived(tilted)
    copies = 2 + orientation.TILTED if tilted else 1
    assert tuple(figures) == gate.LAYOUT_FIGURES
    assert figures["method"] == (gate.LAYOUT_METHOD_TILTED if tilted else gate.LAYOUT_METHOD)
    assert (figures["rows"], figures["held_out_rows"]) == (300 * copies, 100 * copies) == (figures["rows"],
                                                                                           len(validation))
    assert (figures["percentile"], figures["margin"]) == (99.5, 1.2)
    plain = orientation.layout(_chest_like(100, seed=1))
    np.testing.assert_array_equal(validation[:100], plain)  # the images as they are come first
    assert figures["held_out_quantile"] == pytest.approx(np.percentile(fitted.distances(validation), 99.5))
    assert figures["limit"] == pytest.approx(figures["held_out_quantile"] * 1.2) == fitted.limit
    assert (fitted.distances(orientation.layout(_chest_like(50, seed=2))) <= fitted.limit).mean() >= 0.98
    assert (fitted.distances(orientation.layout(_blob(20, seed=3))) > fitted.limit).all()


def test_fitted_with_the_tilted_copies_it_takes_tilted_scans_that_the_plain_fit_refuses():
    """QA (version 8): fitted on the scans as they are, the check refused site scans tilted by 10-15 degrees
    (2-14%) that the model scores as well as upright ones; the orientation check's tilted copies in its fit (version
    9) take them, and still refuse the photograph-like layouts."""
    tilted = orientation.layout(_turned(_chest_like(60, seed=7), 12.0))
    _, plain, _ = _derived(tilted=False)
    _, copies, _ = _derived(tilted=True)
    assert (plain.distances(tilted) > plain.limit).mean() >= 0.5
    assert (copies.distances(tilted) > copies.limit).mean() <= 0.02
    assert (copies.distances(orientation.layout(_blob(20, seed=3))) > copies.limit).all()


def test_the_gate_says_the_distance_first_then_the_orientation_then_the_layout():
    figures, laid, _ = _derived()
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
    figures, laid, validation = _derived()
    path = str(tmp_path / gate.FIT_FILE)
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


@pytest.mark.parametrize("rows", [np.zeros((100, 7)), np.zeros((10, 256)), np.full((100, 256), np.nan),
                                  np.zeros(256)])
def test_validation_rows_of_the_wrong_shape_or_number_are_one_line(tmp_path, rows):
    """Review: rows of another shape reached the percentile and crashed --verify and the job with a numpy error."""
    path = str(tmp_path / gate.FIT_FILE)
    np.savez(path, layout_validation=rows)
    with pytest.raises(gate.GateError, match=r"gate.npz is malformed: layout validation rows \("):
        gate.read_layout_validation(path)


def _spec(figures: dict) -> dict:
    copies = gate.LAYOUT_COPIES[figures["method"]]
    return {"statistic": gate.TRAINING_SPLIT, "limit": 3.0, "percentile": 99.5, "margin": 1.2,
            "held_out_quantile": 2.5, "folds": 0, "rows": figures["rows"] // copies, "seed": 0, "file": gate.FIT_FILE,
            "sha256": "x", "held_out_rows": figures["held_out_rows"] // copies, "layout": figures}


@pytest.mark.parametrize("tilted", [True, False])
def test_its_figures_in_metadata_are_checked(tilted):
    figures, _, _ = _derived(tilted)
    spec = _spec(figures)
    assert gate.GateSpec.from_dict(spec).layout == figures
    plain = {k: v for k, v in spec.items() if k != "layout"}
    assert "layout" not in gate.GateSpec.from_dict(plain).to_dict()  # as before the check existed
    assert gate.GateSpec.from_dict(spec) != gate.GateSpec.from_dict(plain)
    q = figures["held_out_quantile"]
    for bad in ({k: v for k, v in figures.items() if k != "limit"}, {**figures, "limit": -1.0}, [1],
                {**figures, "limit": str(figures["limit"])}, {**figures, "percentile": "99.5"},
                {**figures, "margin": 100.0, "limit": q * 100.0},  # review: passed with a limit to match
                {**figures, "limit": q * 2.0}, {**figures, "method": "a method this code does not know"},
                {**figures, "method": [1]}, {**figures, "limit": 10 ** 400}):
        with pytest.raises(gate.GateError, match="layout must hold method, limit"):
            gate.GateSpec.from_dict({**spec, "layout": bad})
    for rows in ({"rows": figures["rows"] + 1}, {"held_out_rows": figures["held_out_rows"] * 2},
                 {"rows": float(figures["rows"])}):
        with pytest.raises(gate.GateError, match="layout rows .* must be the gate's"):
            gate.GateSpec.from_dict({**spec, "layout": {**figures, **rows}})
    with pytest.raises(gate.GateError, match="unusable"):  # a gate fitted on reference rows alone has no images
        gate.GateSpec.from_dict({**spec, "statistic": gate.STATISTIC})
    with pytest.raises(gate.GateError, match="must be the held-out quantile"):  # review: a traceback
        gate.GateSpec.from_dict({**plain, "held_out_rows": None})
    turned = dict.fromkeys(orientation.FIGURES, "x")
    with pytest.raises(gate.GateError, match="metadata gate is malformed: TypeError"):  # strings where numbers go
        gate.GateSpec.from_dict({**spec, "orientation": {**turned, "limit": 0.5}})


def test_the_tilted_method_names_the_copies_the_orientation_check_makes():
    """A package's method names what its rows are: the literal must change with the orientation check's constants
    (review: built from them, a change would have made version 9 unloadable)."""
    assert gate.LAYOUT_COPIES[gate.LAYOUT_METHOD_TILTED] == 2 + orientation.TILTED
    assert (f"in {orientation.TILTED} tilted copies (the orientation check's: turned by up to {orientation.MAX_TILT:g} "
            f"degrees, cropped to {orientation.MIN_CROP:.0%}-100%)") in gate.LAYOUT_METHOD_TILTED
    assert f"{orientation.GRID}x{orientation.GRID} block means" in gate.LAYOUT_METHOD
