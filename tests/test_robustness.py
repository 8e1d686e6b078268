"""train.robustness's perturbations (the acquisition-shift proxy) and train.trainers' pure helpers: fast, no
training."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from train.robustness import PERTURBATIONS


@pytest.fixture(scope="module")
def ramp() -> Image.Image:
    """An 8-bit gray horizontal ramp (20 to 235), 200 x 100, with seeded grain (blur and JPEG have texture to
    remove)."""
    grain = np.random.default_rng(0).integers(-20, 21, (100, 200))
    return Image.fromarray((np.linspace(20, 235, 200)[None, :] + grain).clip(0, 255).astype(np.uint8), "L")


def test_every_perturbation_returns_a_gray_image_and_changes_it_except_none(ramp):
    base = np.asarray(ramp, np.float64)
    for name, perturb in PERTURBATIONS.items():
        out = perturb(ramp)
        assert out.mode == "L", name
        arr = np.asarray(out, np.float64)
        if name == "none":
            assert out is ramp
        elif out.size == ramp.size:
            assert np.abs(arr - base).mean() > 0.5, name  # it did something


def test_perturbations_move_the_image_the_stated_way(ramp):
    mid = lambda im: float(np.asarray(im, np.float64)[:, 100].mean())  # noqa: E731 - a pixel in the middle
    assert mid(PERTURBATIONS["gamma 0.7"](ramp)) > mid(ramp) > mid(PERTURBATIONS["gamma 1.4"](ramp))
    assert mid(PERTURBATIONS["brightness x1.2"](ramp)) > mid(ramp)
    spread = lambda im: float(np.asarray(im, np.float64).std())  # noqa: E731
    assert spread(PERTURBATIONS["contrast x0.7"](ramp)) < spread(ramp) < spread(PERTURBATIONS["contrast x1.3"](ramp))
    zoomed = PERTURBATIONS["zoom 1.15"](ramp)
    assert zoomed.size == (200 - 2 * int(200 * (1 - 1 / 1.15) / 2), 100 - 2 * int(100 * (1 - 1 / 1.15) / 2))


def test_ensemble_histories_merge_the_first_members_curves_and_everyones_seconds():
    from train.trainers import _merge_histories

    a = {"loss": [1.0, 0.5], "seconds": [2.0, 1.0], "best_epoch": 2}
    b = {"loss": [0.9, 0.7], "seconds": [3.0, 1.5], "best_epoch": 1}
    merged = _merge_histories([a, b])
    assert merged["loss"] == [1.0, 0.5] and merged["seconds"] == [2.0, 1.0, 3.0, 1.5]
    assert merged["best_epoch"] == 2 and merged["members"] == [a, b]
