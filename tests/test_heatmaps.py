"""Heatmaps of the top N flagged images (--heatmaps N): per-shard choice, the driver's merge, the overlays and
heatmaps/index.csv, on DirectRunner and DaskRunner, with the ledger, and for models without one."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from batch_job import heatmaps, overlay, shard_result
from batch_job.cli import main
from batch_job.scoring import ScoringSpec, make_row
from batch_job.synthetic import make_tree
from helpers import assert_one_line_error, read_predictions, write_package

N = 6
HOT = 50  # red minus blue where the map peaks: at most 0.55 x 128 (jet's top colour is dark red, 128, 0, 0)


def bright(value: int, blob: tuple[int, int] | None = None, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """An image of grey `value` with a little texture (a flat one is out of scope for the input gate; the same
    call gives the same pixels); with `blob` (x, y) a white 24 px square there, the hottest cell of the tiny
    model's map."""
    noise = np.random.default_rng(0).normal(0, 16, size[::-1])
    arr = np.clip(value - 20 + noise, 0, 255).astype(np.uint8)
    if blob:
        x, y = blob
        arr[y:y + 24, x:x + 24] = 255
    return Image.fromarray(arr, "L")


@pytest.fixture(scope="module")
def heat_tree(tmp_path_factory) -> str:
    """Synthetic labelled images, two identical very bright ones (a tie), one with a blob at its top left and
    one JPEG whose EXIF orientation turns its stored top-left blob to the top right when displayed."""
    root = str(tmp_path_factory.mktemp("heat_xrays"))
    make_tree(root, per_class=10, size=96, seed=5)
    extra = os.path.join(root, "PNEUMONIA", "extra")
    os.makedirs(extra)
    for name in ("tie_b.png", "tie_a.png"):
        bright(250).save(os.path.join(extra, name))
    bright(200, blob=(0, 0), size=(192, 96)).save(os.path.join(extra, "blob_top_left.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the stored top left becomes the top right
    bright(200, blob=(0, 0)).save(os.path.join(extra, "rotated.jpeg"), quality=95, exif=exif)
    return root


def run_job(tree: str, package: str, out: str, *extra: str) -> int:
    return main(["--input", tree, "--model", package, "--output", out, "--batch-size", "4", "--shard-size", "8",
                 "--direct_num_workers=2", "--direct_running_mode=multi_threading", *extra])


@pytest.fixture(scope="module")
def heat_run(heat_tree, heat_package, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("heat_run") / "out")
    assert run_job(heat_tree, heat_package, out, "--heatmaps", str(N)) == 0
    return out


def expected_top(rows: dict[str, dict], n: int) -> list[str]:
    flagged = [p for p, r in rows.items() if r["status"] == "ok" and r["prediction"] == "PNEUMONIA"]
    return sorted(flagged, key=lambda p: (-float(rows[p]["probability"]), p))[:n]


def overlays(out_dir: str) -> dict[str, str]:
    """heatmaps/index.csv: image path -> its overlay (relative to OUT_DIR, "" where none was drawn); {} without."""
    path = os.path.join(out_dir, "heatmaps", "index.csv")
    if not os.path.exists(path):
        return {}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    return {r["path"]: r["heatmap"] for r in rows}


SPEC = ScoringSpec("m.onnx", "m/1", {}, 0.5)


def red_minus_blue(img: Image.Image, box: tuple[float, float, float, float]) -> float:
    w, h = img.size
    arr = np.asarray(img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h))), np.float64)
    return float(arr[..., 0].mean() - arr[..., 2].mean())


# ------------------------------------------------------------------------------------------ pure functions

def test_top_flagged_takes_only_flagged_images_scored_now_ties_by_path():
    def rec(path, p, status=None):
        return make_row(path, "", SPEC, p, error="" if p is not None else "bad", status=status)

    records = [rec("/d", 0.9), rec("/c", 0.9), rec("/a", 0.7), rec("/skip", 0.99, "skipped"), rec("/n", 0.4),
               rec("/err", None), rec("/b", 0.95)]
    assert [f.path for f in shard_result.top_flagged(records, 3)] == ["/b", "/c", "/d"]
    assert [f.path for f in shard_result.top_flagged(records, 10)] == ["/b", "/c", "/d", "/a"]
    assert shard_result.top_flagged(records, 0) == []


def test_union_of_shard_top_n_gives_the_run_top_n(tmp_path):
    """Per-shard top N written in the shard summaries, gathered by the driver: exactly the global top N, ties by
    path, maps kept."""
    rng = np.random.default_rng(0)
    probs = np.round(rng.uniform(0.3, 1.0, 200), 2)  # two decimals: many ties
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5, heatmaps=9)
    records = [make_row(f"/img/{i:03d}.png", "", spec, p, heatmap=np.full((2, 2), i, np.float32))
               for i, p in enumerate(probs)]
    cut = [(s, 0, 0) for s in range(7)]
    for s, part in enumerate(np.array_split(np.arange(200), 7)):
        shard_result.write(str(tmp_path), s, shard_result.summarise([records[i] for i in part], spec))
    chosen = shard_result.gather(str(tmp_path), cut, 9, 0).flagged
    want = sorted((r for r in records if r.prediction == "PNEUMONIA"),
                  key=lambda r: (-float(r.probability), r.path))[:9]
    assert [c.path for c in chosen] == [r.path for r in want]
    assert [c.probability for c in chosen] == [float(r.probability) for r in want]
    assert [int(c.heatmap[0, 0]) for c in chosen] == [int(r.path[5:8]) for r in want]


def test_overlay_keeps_orientation_aspect_and_the_gray_image():
    buf = io.BytesIO()
    Image.new("L", (1400, 600), 100).save(buf, "PNG")  # flat: the blend of one grey is known exactly
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 3.0  # top-left cell: the most evidence
    img = overlay.render(buf.getvalue(), heat, {"image_size": 32})
    assert img.mode == "RGB" and img.size == (512, 219)  # long side 512, aspect kept
    assert red_minus_blue(img, (0, 0, 0.06, 0.06)) > HOT  # (dark) red where the map is hottest...
    assert red_minus_blue(img, (0.5, 0.5, 1, 1)) < -15  # ...blue where it is coldest
    # the coldest pixels: 85% gray 100, 15% the colormap's lowest colour (0, 0, 128)
    assert tuple(np.asarray(img)[-1, -1]) == (85, 85, 104)
    assert overlay.normalise(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]


def test_with_crop_bands_the_map_covers_the_scan_inside_its_bands_and_the_bands_stay_gray():
    scan = np.tile(np.linspace(60, 200, 400).astype(np.uint8)[:, None], (1, 300))  # a vertical ramp: no flat column
    padded = np.pad(scan, ((0, 0), (100, 100)))  # pillarboxed: 500 x 400, the scan in columns 100 to 399
    buf = io.BytesIO()
    Image.fromarray(padded).save(buf, "PNG")
    heat = np.zeros((4, 4), np.float32)
    heat[:, 0] = 3.0  # the scan's left quarter: the most evidence
    img = overlay.render(buf.getvalue(), heat, {"image_size": 32, "crop_bands": True})
    assert img.size == (500, 400)
    pixels = np.asarray(img).astype(int)
    # the bands: gray (black), no colour (measured on every 2nd column of 500: the column next to the scan may go
    # either way)
    assert (pixels[:, :99] == 0).all() and (pixels[:, 401:] == 0).all()
    assert red_minus_blue(img, (0.2, 0, 0.3, 1)) > HOT  # hot at the scan's left edge, not at the image's
    assert red_minus_blue(img, (0.65, 0, 0.8, 1)) < -15
    whole = overlay.render(buf.getvalue(), heat, {"image_size": 32})  # a model that sees the bands: its map spans them
    assert red_minus_blue(whole, (0, 0, 0.1, 1)) > HOT


def test_a_vanished_original_gets_no_heatmap_and_the_rest_do(tmp_path, caplog):
    good, gone = str(tmp_path / "good.png"), str(tmp_path / "gone.png")
    bright(220).save(good)
    rows = [make_row(p, "", SPEC, q, heatmap=np.ones((4, 4), np.float32)) for p, q in ((good, 0.8), (gone, 0.9))]
    out = tmp_path / "out"
    out.mkdir()
    chosen = heatmaps.make_heatmaps(str(out), shard_result.top_flagged(rows, 5), {"image_size": 32})
    assert [(c.path, bool(c.png)) for c in chosen] == [(gone, False), (good, True)]
    assert overlays(str(out)) == {gone: "", good: chosen[1].png} and chosen[1].png.startswith("heatmaps/0002-")
    assert "no heatmap for flagged image 1 (heatmaps/index.csv): file not found" in caplog.text
    assert gone not in caplog.text  # file names can identify patients: never logged


def test_an_original_replaced_since_it_was_scored_gets_no_heatmap(tmp_path, caplog):
    """QA defect: a flagged file replaced (renamed over) after it was scored got the new image's overlay beside
    the old image's rank and probability, without a word. Each flagged image carries its size, mtime and ctime from
    before it was read (through the shard summaries); one that differs now is not drawn."""
    from batch_job.scoring import file_stat, score_paths

    kept, swapped = str(tmp_path / "kept.png"), str(tmp_path / "swapped.png")
    bright(220).save(kept)
    bright(230).save(swapped)
    # the scoring side records the key of each flagged image it read (the producer of what is checked below)
    vdir = write_package(str(tmp_path / "serving"), image_size=32, heatmap_hw=(4, 4))
    scored = score_paths([kept, swapped], ScoringSpec(os.path.join(vdir, "model.onnx"), "m/1", {"image_size": 32},
                                                      0.0, heatmaps=5, with_heatmap=True))
    assert [r.file_key for r in scored] == [file_stat(kept), file_stat(swapped)] and file_stat(kept) is not None
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5, heatmaps=5)
    rows = [make_row(p, "", spec, q, heatmap=np.ones((4, 4), np.float32), file_key=file_stat(p))
            for p, q in ((kept, 0.8), (swapped, 0.9))]
    shard_result.write(str(tmp_path), 0, shard_result.summarise(rows, spec))  # the keys travel with the shard
    chosen = shard_result.gather(str(tmp_path), [(0, 0, 0)], 5, 0).flagged
    assert [c.file_key for c in chosen] == [file_stat(swapped), file_stat(kept)]
    bright(90).save(str(tmp_path / "other.png"))
    os.replace(tmp_path / "other.png", swapped)  # a normal scan moved over the flagged one
    out = tmp_path / "out"
    out.mkdir()
    chosen = heatmaps.make_heatmaps(str(out), chosen, {"image_size": 32})
    assert [(c.path, bool(c.png)) for c in chosen] == [(swapped, False), (kept, True)]
    assert "no heatmap for flagged image 1 (heatmaps/index.csv): changed since it was scored" in caplog.text
    assert [c.no_overlay for c in chosen] == ["changed since it was scored", ""]


def test_a_tile_without_its_overlay_says_why(tmp_path, caplog):
    """QA: a flagged tile whose original vanished or changed after scoring showed a probability and a name with no
    picture and no word (only the log said why, and said "changed" for a deleted file)."""
    from batch_job import html_report
    from batch_job.scoring import file_stat
    from helpers import reconciliation, run_result

    paths = {name: str(tmp_path / f"{name}.png") for name in ("kept", "gone", "swapped")}
    for i, path in enumerate(paths.values()):
        bright(200 + 10 * i).save(path)
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5, heatmaps=5)
    rows = [make_row(p, "", spec, 0.9 - 0.1 * i, heatmap=np.ones((4, 4), np.float32), file_key=file_stat(p))
            for i, p in enumerate(paths.values())]
    os.remove(paths["gone"])
    bright(90).save(str(tmp_path / "other.png"))
    os.replace(tmp_path / "other.png", paths["swapped"])
    out = tmp_path / "out"
    out.mkdir()
    chosen = heatmaps.make_heatmaps(str(out), shard_result.top_flagged(rows, 5), {"image_size": 32})
    assert [(c.png != "", c.no_overlay) for c in chosen] == [
        (True, ""), (False, "vanished since it was scored"), (False, "changed since it was scored")]
    assert "no heatmap for flagged image 2 (heatmaps/index.csv): vanished since it was scored" in caplog.text
    result = run_result(counts=reconciliation([0.9, 0.8, 0.7]), flagged=chosen, heatmaps=5, model_has_heatmaps=True,
                        map_hw=(4, 4))
    page = html_report.render(html_report.context(result, str(out), [], tiles_cap=5))
    assert page.count('class="nomap"') == 2
    assert "No heatmap (vanished since it was scored)" in page and "No heatmap (changed since it was scored)" in page


# ------------------------------------------------------------------------------------------ the job

def test_top_n_flagged_get_overlays_and_the_index(heat_run):
    rows = read_predictions(heat_run)
    heat = overlays(heat_run)
    top = expected_top(rows, N)
    assert len(top) == N and {os.path.basename(p) for p in top[:2]} == {"tie_a.png", "tie_b.png"}
    assert os.path.basename(top[0]) == "tie_a.png"  # equal probabilities: the smaller path first
    for rank, path in enumerate(top, 1):
        rel = heat[path]
        assert rel.startswith(f"heatmaps/{rank:04d}-") and rel.endswith(".png")
        with Image.open(os.path.join(heat_run, rel)) as img:
            img.load()
            assert img.mode == "RGB" and max(img.size) <= 512
    assert list(heat) == top  # the index: the top N, highest first
    assert sorted(os.listdir(os.path.join(heat_run, "heatmaps"))) == sorted([os.path.basename(heat[p]) for p in top]
                                                                           + ["index.csv"])
    assert "scratch" not in os.listdir(heat_run)  # shard summaries gathered, never published
    m = json.load(open(os.path.join(heat_run, "metrics.json")))
    assert m["heatmaps"] == {"requested": N, "model_has_heatmaps": True, "flagged_listed": N, "written": N}
    assert 0 <= m["timings"]["heatmaps_seconds"] <= m["timings"]["report_seconds"]


def test_overlays_follow_the_image_as_displayed(heat_package, heat_tree, tmp_path):
    """The hottest cell over the blob: top left for a plain PNG, top right for a JPEG whose EXIF rotates it."""
    out = str(tmp_path / "out")
    extra = os.path.join(heat_tree, "PNEUMONIA", "extra")
    assert main(["--input", os.path.join(extra, "blob_top_left.png"), "--input", os.path.join(extra, "rotated.jpeg"),
                 "--model", heat_package, "--output", out, "--direct_running_mode=in_memory"]) == 0
    rows = {os.path.basename(p): png for p, png in overlays(out).items()}
    with Image.open(os.path.join(out, rows["blob_top_left.png"])) as img:
        assert img.size == (192, 96)
        assert red_minus_blue(img, (0, 0, 0.1, 0.2)) > HOT and red_minus_blue(img, (0.5, 0.5, 1, 1)) < 0
    with Image.open(os.path.join(out, rows["rotated.jpeg"])) as img:
        assert red_minus_blue(img, (0.8, 0, 1, 0.2)) > HOT and red_minus_blue(img, (0, 0, 0.2, 0.2)) < 0


def test_heatmaps_off_and_models_without_heatmaps(heat_tree, heat_package, tiny_package, tmp_path, job_log):
    off = str(tmp_path / "off")
    assert run_job(heat_tree, heat_package, off, "--heatmaps", "0") == 0
    assert not os.path.exists(os.path.join(off, "heatmaps")) and "scratch" not in os.listdir(off)
    assert json.load(open(os.path.join(off, "metrics.json")))["heatmaps"]["written"] == 0
    assert "has no heatmap output" not in job_log.text
    plain = str(tmp_path / "plain")
    assert run_job(heat_tree, tiny_package, plain) == 0  # default --heatmaps 50
    notes = [line for line in job_log.text.splitlines() if "has no heatmap output" in line]
    assert notes == ["model pneumonia/1 has no heatmap output: no heatmaps (the report lists the top flagged "
                     "images without)"]
    assert not os.path.exists(os.path.join(plain, "heatmaps")) and "scratch" not in os.listdir(plain)
    m = json.load(open(os.path.join(plain, "metrics.json")))
    assert m["heatmaps"] == {"requested": 12, "model_has_heatmaps": False,
                             "flagged_listed": min(12, m["positive_count"]), "written": 0}


def test_negative_heatmaps_is_refused(heat_tree, heat_package, tmp_path, capsys):
    rc = main(["--input", heat_tree, "--model", heat_package, "--output", str(tmp_path / "o"), "--heatmaps", "-1"])
    assert_one_line_error(capsys, rc, "--heatmaps must be >= 0")
    assert not os.path.exists(tmp_path / "o")


def test_images_skipped_through_the_ledger_get_no_heatmap(heat_tree, heat_package, tmp_path):
    book = str(tmp_path / "ledger.sqlite")
    first = str(tmp_path / "first")
    extra = os.path.join(heat_tree, "PNEUMONIA", "extra")
    assert run_job(extra, heat_package, first, "--ledger", book) == 0  # the brightest images, scored first
    second = str(tmp_path / "second")
    assert run_job(heat_tree, heat_package, second, "--ledger", book, "--heatmaps", "3") == 0
    rows = read_predictions(second)
    fresh = {p: r for p, r in rows.items() if r["status"] == "ok"}
    heat = overlays(second)
    assert not {p for p, r in rows.items() if r["status"] == "skipped"} & set(heat)
    assert list(heat) == expected_top(fresh, 3) and all(heat.values())


@pytest.mark.slow
def test_dask_runner_writes_the_same_heatmaps(heat_run, heat_tree, heat_package, tmp_path, dask_cluster):
    out = str(tmp_path / "dask")
    assert main(["--input", heat_tree, "--model", heat_package, "--output", out, "--batch-size", "4",
                 "--shard-size", "8", "--heatmaps", str(N), "--runner", "DaskRunner",
                 f"--dask_client_address={dask_cluster}"]) == 0
    assert read_predictions(out) == read_predictions(heat_run)
    assert overlays(out) == overlays(heat_run)
    for name in os.listdir(os.path.join(heat_run, "heatmaps")):
        with open(os.path.join(out, "heatmaps", name), "rb") as a, open(os.path.join(heat_run, "heatmaps", name),
                                                                          "rb") as b:
            assert a.read() == b.read()



def test_occlusion_packages_get_occlusion_maps_drawn(tmp_path):
    """heatmap_method occlusion: the overlays show how much P falls when each cell is blanked (here only the
    bright blob's cell matters to the model), not the graph's map (every cell's mean grey)."""
    from batch_job.heatmaps import with_occlusion_maps
    from batch_job.shard_result import Flagged
    from xray_core.package import open_session, score
    from xray_core.preprocessing import PreprocessConfig, preprocess_image

    vdir = write_package(str(tmp_path / "serving"), image_size=32, heatmap_hw=(4, 4), max_cell=True,
                         heatmap_method={"name": "occlusion", "grid": 4, "fill": "image mean"})
    path = str(tmp_path / "blob.png")
    bright(120, blob=(72, 0)).save(path)  # top right
    x = preprocess_image(path, PreprocessConfig(image_size=32))[None]
    out = score(open_session(os.path.join(vdir, "model.onnx")), x, heatmap=True)
    (item,) = with_occlusion_maps([Flagged(float(out.probability[0]), path, "", out.heatmap[0])],
                                  os.path.join(vdir, "model.onnx"), {"image_size": 32}, 4)
    occ = item.heatmap
    assert occ.shape == (4, 4) and np.unravel_index(occ.argmax(), occ.shape) == (0, 3)
    assert occ[0, 3] > 0.05 and np.abs(np.delete(occ.ravel(), 3)).max() < 1e-6  # only the blob's cell
    assert np.count_nonzero(out.heatmap[0]) == 16  # the graph's map: every cell
    # the whole job draws them
    assert main(["--input", path, "--model", vdir, "--output", str(tmp_path / "o"), "--threshold", "0",
                 "--direct_running_mode=in_memory"]) == 0
    (png,) = overlays(str(tmp_path / "o")).values()
    with Image.open(os.path.join(tmp_path, "o", png)) as img:
        assert red_minus_blue(img, (0.75, 0, 1, 0.25)) > HOT and red_minus_blue(img, (0, 0.5, 0.5, 1)) < -15
    page = open(os.path.join(tmp_path, "o", "report.html"), encoding="utf-8").read()
    assert "its occlusion map: how much P(pneumonia) falls when each of 4×4 cells" in page


def test_a_failing_report_step_waits_for_the_heatmaps_then_leaves_nothing(heat_tree, heat_package, tmp_path,
                                                                           monkeypatch, capsys):
    """The heatmaps are drawn in a thread beside the figures and the drift check. When the drift check fails while
    they are still being drawn, the job waits for them before it discards its temp dir: nothing is left beside
    OUT_DIR (a drawing that went on would create its heatmaps/ folder there again)."""
    from batch_job import pipeline

    drawing, failed, drawn = heatmaps.make_heatmaps, threading.Event(), threading.Event()

    def slow(out_dir, *args):
        failed.wait(30)
        time.sleep(0.5)  # still drawing after the drift check failed
        try:
            return drawing(out_dir, *args)
        finally:
            drawn.set()

    def failing(*args):
        failed.set()
        raise RuntimeError("drift check failed")

    monkeypatch.setattr(heatmaps, "make_heatmaps", slow)
    monkeypatch.setattr(pipeline, "check_drift", failing)
    parent = tmp_path / "night"
    parent.mkdir()
    assert run_job(heat_tree, heat_package, str(parent / "out"), "--heatmaps", str(N)) == 1
    assert "drift check failed" in capsys.readouterr().err
    assert drawn.wait(30)  # set before the job returned, unless it left the drawing behind
    assert os.listdir(parent) == []


def test_a_dicom_its_header_refused_gets_no_thumbnail_and_is_never_decoded(tmp_path, monkeypatch):
    """QA: report.html's out-of-scope thumbnails decoded the pixel data of files the header rules refused, which the
    scoring never decodes (a CT with a hostile codestream took 5.8 GB in the report)."""
    from batch_job import overlay
    from batch_job.worklist import Entry
    from dicom_factory import dicom_bytes, xray_like

    ct, blank = str(tmp_path / "ct.dcm"), str(tmp_path / "blank.png")
    with open(ct, "wb") as f:
        f.write(dicom_bytes(xray_like(96, 96), 12, modality="CT"))
    Image.new("L", (96, 96), 128).save(blank)
    entries = [(1, Entry(ct, "out_of_scope", "", "", "Modality CT not allowed (allowed: CR, DX)")),
               (2, Entry(blank, "out_of_scope", "", "", "near-constant image"))]
    decoded = []
    display = overlay.display_image
    monkeypatch.setattr(overlay, "display_image", lambda data, pre: decoded.append(data[:4]) or display(data, pre))
    shown = heatmaps.draw_thumbnails(str(tmp_path / "out"), entries, {"image_size": 32})
    assert shown[ct] == "" and shown[blank].startswith("out_of_scope/0002-") and len(decoded) == 1
    assert os.path.isfile(tmp_path / "out" / shown[blank])
    widened = heatmaps.draw_thumbnails(str(tmp_path / "out2"), entries, {"image_size": 32}, ("CR", "DX", "CT"))
    assert widened[ct].startswith("out_of_scope/0001-") and len(decoded) == 3  # allowed tonight: decoded, shown


@pytest.mark.parametrize("failing_write", ["overlay", "thumbnail"])
def test_a_full_disk_while_drawing_fails_the_job_and_publishes_nothing(heat_tree, heat_package, tmp_path, monkeypatch,
                                                                       capsys, failing_write):
    """QA defect: OUT_DIR's disk full for a moment while the overlays were written gave exit 0 with 0-byte heatmap
    PNGs published and tiles saying "No heatmap ([Errno 28] No space left on device)": a failed write was taken for
    an original that vanished. A failed write of an overlay or a thumbnail now fails the job: exit 1, nothing
    published. An original that cannot be read still only loses its picture (the tests above)."""
    import errno

    saving = overlay.save_png
    folder = heatmaps.FOLDER if failing_write == "overlay" else heatmaps.OUT_OF_SCOPE_FOLDER

    def full(img, path):
        if f"{os.sep}{folder}{os.sep}" in path:
            open(path, "wb").close()  # as a full disk leaves it: created, empty
            raise OSError(errno.ENOSPC, "No space left on device")
        saving(img, path)

    monkeypatch.setattr(overlay, "save_png", full)
    inp = tmp_path / "in"
    shutil.copytree(heat_tree, inp)
    Image.new("L", (96, 96), 128).save(inp / "blank.png")  # out of scope: a thumbnail
    parent = tmp_path / "night"
    parent.mkdir()
    assert run_job(str(inp), heat_package, str(parent / "out"), "--heatmaps", str(N)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(parent) == []
