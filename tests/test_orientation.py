"""The input gate's orientation check (xray_core/orientation.py): fitted on upright images against the same turned
180 degrees, kept only where its held-out figures meet the gate's targets, stored as plain arrays in gate.npz."""
from __future__ import annotations

import numpy as np
import pytest

from xray_core import gate, orientation


def _chest_like(n: int, seed: int, size: int = 64) -> np.ndarray:
    """(n, size, size, 1) images with a chest X-ray's layout, each a little shifted, scaled and noisy: mid grey
    shoulders above, two dark lungs, a bright abdomen below."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 1), np.float32)
    for i in range(n):
        dy, dx, s = rng.normal(0, 0.04), rng.normal(0, 0.04), rng.uniform(0.85, 1.15)
        img = np.full((size, size), 0.55) + 0.3 * (yy > 0.78 + dy)  # the abdomen
        for cx in (0.3, 0.7):  # the lungs
            img -= 0.35 * (((xx - cx - dx) / (0.16 * s)) ** 2 + ((yy - 0.48 - dy) / (0.28 * s)) ** 2 < 1)
        out[i, ..., 0] = np.clip(img + rng.normal(0, 0.08, img.shape), 0, 1)
    return out


def test_an_upright_layout_is_told_from_the_same_turned_180_degrees_on_images_it_never_saw():
    check, figures = orientation.fit(_chest_like(120, seed=0))
    assert orientation.usable(figures)
    assert figures["held_out_upside_down_refused"] >= 0.95 and figures["held_out_upright_refused"] <= 0.01
    assert (figures["rows"], figures["folds"], figures["limit"]) == (120, 5, 0.5)
    new = _chest_like(60, seed=1)
    assert (check.probability(new) <= orientation.LIMIT).all()
    assert (check.probability(new[:, ::-1, ::-1]) > orientation.LIMIT).all()  # turned 180 degrees
    assert (check.probability(new[:, ::-1, :]) > orientation.LIMIT).all()  # flipped top to bottom
    assert (check.probability(new[:, :, ::-1]) <= orientation.LIMIT).all()  # mirrored: still upright
    p = float(check.probability(new[:1, ::-1, ::-1])[0])
    assert check.reason(p) == (f"looks upside down or inverted (P {p:.2f}, from its layout): the model reads upright "
                               "scans with bones bright only; check how it was taken or exported")
    assert check.reason(0.5) is None
    assert check.reason(float(np.nextafter(orientation.LIMIT, 1))) is not None  # mutation QA: P > 0.8 passed too


def test_a_check_refusing_upright_scans_is_not_usable():
    """Mutation QA: `usable` was tested on its upside-down target only; 1% of upright scans refused at most."""
    base = {"held_out_upright_refused": 0.01, "held_out_upside_down_refused": 0.99}
    assert orientation.usable(base)
    assert not orientation.usable({**base, "held_out_upright_refused": 0.02})
    assert not orientation.usable({**base, "held_out_upside_down_refused": 0.5})


def test_images_without_a_layout_give_no_check():
    """Noise has no top or bottom: its held-out figures miss the targets, so a package would get no check."""
    rng = np.random.default_rng(0)
    _, figures = orientation.fit(rng.uniform(0, 1, (100, 64, 64, 1)).astype(np.float32))
    assert not orientation.usable(figures)
    assert 0.2 < figures["held_out_upside_down_refused"] < 0.8


def test_only_sizes_a_multiple_of_the_grid_have_the_check():
    assert orientation.fits(64) and orientation.fits(128) and not orientation.fits(100)
    assert orientation.layout(np.ones((3, 128, 128, 1))).shape == (3, orientation.GRID ** 2)


def _fitted(tmp_path):
    check, figures = orientation.fit(_chest_like(60, seed=2))
    rng = np.random.default_rng(3)
    fitted = gate.Gate(rng.normal(size=4), np.eye(4), 3.0, check)
    path = str(tmp_path / gate.FIT_FILE)
    gate.write_fit(path, fitted)
    return path, fitted, figures


def test_the_check_round_trips_through_gate_npz_as_plain_arrays(tmp_path):
    path, fitted, _ = _fitted(tmp_path)
    again = gate.read_fit(path, 3.0, orientation=True)
    np.testing.assert_array_equal(again.orientation.coef, fitted.orientation.coef)
    assert again.orientation.intercept == fitted.orientation.intercept
    with pytest.raises(gate.GateError, match="holds an orientation check that metadata.json does not record"):
        gate.read_fit(path, 3.0)  # a spec without the check: its file must not have one
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["location", "orientation_coef", "orientation_intercept", "precision"]


def test_the_gate_gives_the_distance_reason_first_then_the_orientation():
    check, _ = orientation.fit(_chest_like(60, seed=2))
    g = gate.Gate(np.zeros(2), np.eye(2), 3.0, check)
    images = _chest_like(3, seed=4)
    arrays = [images[0], images[1, ::-1, ::-1], images[2, ::-1, ::-1]]
    reasons = g.reasons(np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0]]), arrays)
    assert reasons[0] is None
    assert reasons[1].startswith("looks upside down or inverted (P ")
    assert reasons[2].startswith("not like the chest X-rays the model knows (distance 5.0 > limit 3.0)")
    assert gate.Gate(np.zeros(2), np.eye(2), 3.0).reasons(np.zeros((2, 2)), arrays[1:]) == [None, None]


def test_a_malformed_check_in_gate_npz_or_metadata_is_refused(tmp_path):
    path, fitted, figures = _fitted(tmp_path)
    np.savez(path, location=fitted.location, precision=fitted.precision, orientation_coef=np.ones(7),
             orientation_intercept=np.array([0.0]))
    with pytest.raises(gate.GateError, match="is malformed: orientation"):
        gate.read_fit(path, 3.0, orientation=True)
    np.savez(path, location=fitted.location, precision=fitted.precision)
    with pytest.raises(gate.GateError, match="is unreadable: KeyError"):
        gate.read_fit(path, 3.0, orientation=True)
    spec = {"statistic": gate.TRAINING_SPLIT, "limit": 3.0, "percentile": 99.5, "margin": 1.2,
            "held_out_quantile": 2.5, "folds": 0, "rows": 60, "seed": 0, "file": gate.FIT_FILE, "sha256": "x",
            "held_out_rows": 60}
    assert gate.GateSpec.from_dict({**spec, "orientation": figures}).orientation == figures
    with_check = gate.GateSpec.from_dict({**spec, "orientation": figures})  # a cache key of the job's workers: the
    assert with_check != gate.GateSpec.from_dict(spec) and hash(with_check)  # check makes another key (review)
    with pytest.raises(gate.GateError, match="orientation must be an object"):
        gate.GateSpec.from_dict({**spec, "orientation": [1]})
    with pytest.raises(gate.GateError, match="unusable"):  # a gate fitted on reference rows alone has no images
        gate.GateSpec.from_dict({**spec, "statistic": gate.STATISTIC, "orientation": figures})


@pytest.mark.parametrize("tamper", ["dropped", "malformed", "loosened"])
def test_an_orientation_check_edited_in_metadata_fails_verification_and_the_job(tamper, tmp_path, capsys):
    """Review: with the check's figures deleted from metadata.json (the arrays still in gate.npz), malformed, or its
    limit and figures loosened by hand, `export --verify` said OK and the job ran with the check off or at 0.5
    anyway. Each is now a failed check (export --verify: 1; the job: exit 2)."""
    import json
    import os
    import shutil

    from batch_job.cli import main
    from xray_core.verify import verify_package

    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving_models",
                           "pneumonia", "7")
    vdir = str(tmp_path / "pneumonia" / "7")
    shutil.copytree(shipped, vdir)
    path = os.path.join(vdir, "metadata.json")
    meta = json.load(open(path))
    if tamper == "dropped":
        del meta["gate"]["orientation"]
    elif tamper == "malformed":
        meta["gate"]["orientation"] = {"limit": 0.99}
    else:
        meta["gate"]["orientation"].update(limit=0.999, held_out_upside_down_refused=0.5)
    json.dump(meta, open(path, "w"))
    failed = [c.line() for c in verify_package(vdir) if not c.ok]
    assert len(failed) == 1 and failed[0].startswith("FAIL input gate: ")
    assert ("holds an orientation check that metadata.json does not record" in failed[0]) == (tamper == "dropped")
    assert ("orientation is unusable" in failed[0]) == (tamper != "dropped")
    (tmp_path / "in").mkdir()
    rc = main(["--input", str(tmp_path / "in"), "--model", vdir, "--output", str(tmp_path / "out")])
    assert rc == 2 and "failed verification: FAIL input gate: " in capsys.readouterr().err

