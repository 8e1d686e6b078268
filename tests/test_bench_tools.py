"""bench/bench_gate.py's tilted copies of the site sample: the box cropped inside a turned scan holds none of the
black corners the turn leaves, and the copies keep their label folders."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from bench.bench_gate import inscribed, turned


@pytest.mark.parametrize("size, degrees, least", [((300, 200), 10.0, 0.6), ((200, 300), -10.0, 0.6),
                                                  ((256, 256), 15.0, 0.5), ((400, 60), 20.0, 0.05)])
def test_the_box_inside_a_turned_image_has_no_corner_in_it(size, degrees, least):
    white = Image.new("L", size, 255)
    box = inscribed(*size, degrees)
    inside = np.asarray(white.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0).crop(box))
    assert inside.min() == 255
    w, h = box[2] - box[0], box[3] - box[1]
    assert least * size[0] * size[1] < w * h < size[0] * size[1]  # not a sliver either (a narrow image: a small box)


def test_turned_copies_keep_their_labels_and_alternate_the_turn(tmp_path):
    for label in ("NORMAL", "PNEUMONIA"):
        os.makedirs(tmp_path / "in" / label)
        for i in range(2):
            img = np.zeros((120, 100), np.uint8)
            img[:, :50] = 200  # bright left half: the turn shows in the top row
            Image.fromarray(img).save(tmp_path / "in" / label / f"{i}.jpeg", quality=95)
    out = turned(str(tmp_path / "in"), str(tmp_path / "out"), 10.0, crop=False)
    assert sorted(os.listdir(out)) == ["NORMAL", "PNEUMONIA"]
    first, second = (np.asarray(Image.open(os.path.join(out, "NORMAL", f))) for f in ("0000.png", "0001.png"))
    assert first.shape == second.shape == (120, 100)
    assert (first[0] > 100).sum() != (second[0] > 100).sum()  # +10 and -10 degrees: not the same image
    assert first[0, 0] == 0 and first[0, -1] == 0  # black corners kept
