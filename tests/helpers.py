"""Helpers the tests share (imported as `helpers`): a TensorFlow-free ONNX model package, hostile inputs, and the
CLI's one-line error contract. Fixtures live in conftest.py."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import zlib
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from batch_job.pipeline import KILL_ENV
from export.triton import triton_config
from xray_core import reference
from xray_core.files import sha256_file
from xray_core.package import EMBEDDING_NAME, HEATMAP_NAME, INPUT_NAME, OUTPUT_NAME, open_session

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray", "train")
SITE_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray", "site_sample")


def make_onnx_model(path: str, image_size: int, scale: float = 20.0, offset: float = 0.45,
                    heatmap_hw: tuple[int, int] | None = None, embedding_grid: int | None = None,
                    max_cell: bool = False) -> None:
    """P = sigmoid(scale * (mean pixel - offset)): bright (blobby) images score high.

    With heatmap_hw (h, w), dividing image_size: a second output `heatmap` (N, h, w), the input average-pooled
    to h x w (bright = evidence for pneumonia, as in the probability; same orientation as the input).
    With embedding_grid g: an output `embedding` (N, g*g), the input average-pooled to g x g and flattened.
    With max_cell (and heatmap_hw): P follows the brightest cell of that map instead of the mean pixel, so blanking
    that cell lowers it (what occlusion maps measure)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["mean", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Unsqueeze", ["p", "one"], [OUTPUT_NAME]),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])]
    inits = [
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    if heatmap_hw:
        h, w = heatmap_hw
        assert image_size % h == 0 and image_size % w == 0, (image_size, heatmap_hw)
        nodes += [helper.make_node("Reshape", ["image", "blocks"], ["tiles"]),
                  helper.make_node("ReduceMean", ["tiles"], [HEATMAP_NAME], axes=[2, 4], keepdims=0)]
        outputs.append(helper.make_tensor_value_info(HEATMAP_NAME, TensorProto.FLOAT, ["N", h, w]))
        inits.append(helper.make_tensor("blocks", TensorProto.INT64, [5],
                                        [-1, h, image_size // h, w, image_size // w]))
        if max_cell:  # the map's two nodes first, its brightest cell in place of the mean pixel, then the rest
            brightest = helper.make_node("ReduceMax", [HEATMAP_NAME], ["mean"], axes=[1, 2], keepdims=0)
            nodes = nodes[5:7] + [brightest] + nodes[1:5]
    if embedding_grid:
        g = embedding_grid
        nodes += [helper.make_node("Reshape", ["image", "cells"], ["cell_tiles"]),
                  helper.make_node("ReduceMean", ["cell_tiles"], ["pooled"], axes=[2, 4], keepdims=0),
                  helper.make_node("Reshape", ["pooled", "flat"], [EMBEDDING_NAME])]
        outputs.append(helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, ["N", g * g]))
        inits += [helper.make_tensor("cells", TensorProto.INT64, [5], [-1, g, image_size // g, g, image_size // g]),
                  helper.make_tensor("flat", TensorProto.INT64, [2], [-1, g * g])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", image_size, image_size, 1])],
        outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_package(serving_dir: str, name: str = "pneumonia", version: int = 1, image_size: int = 32,
                  threshold: float = 0.5, reference_images: np.ndarray | None = None,
                  heatmap_method: dict | None = None, preprocessing: dict | None = None, **model_kwargs) -> str:
    """A published package as `python -m export` lays it out, around the tiny ONNX model (with a heatmap
    output and its metadata key when model_kwargs has heatmap_hw; with reference_images (N, S, S, 1), an
    `embedding` output and the drift reference computed from them, as export does from the validation split;
    `preprocessing`: settings over the default ones)."""
    vdir = os.path.join(serving_dir, name, str(version))
    os.makedirs(vdir)
    model_path = os.path.join(vdir, "model.onnx")
    if reference_images is not None:
        model_kwargs.setdefault("embedding_grid", 4)
    make_onnx_model(model_path, image_size, **model_kwargs)
    meta = {
        "name": name, "version": version, "architecture": "tiny_test_graph",
        "preprocessing": {"image_size": image_size, "color_mode": "L", "resize_filter": "bilinear",
                          "scaling": "divide_by_255", "jpeg_draft": True, "min_side": 32, **(preprocessing or {})},
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, image_size, image_size, 1]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, 1]},
        "class_names": ["NORMAL", "PNEUMONIA"], "decision_threshold": threshold, "target_recall": 0.95,
        "sha256": sha256_file(model_path),
    }
    hw = model_kwargs.get("heatmap_hw")
    if hw:
        meta["heatmap_output"] = {"name": HEATMAP_NAME, "dtype": "float32", "shape": [-1, *hw]}
    if heatmap_method:
        meta["heatmap_method"] = heatmap_method
    g = model_kwargs.get("embedding_grid")
    if g:
        meta["embedding_output"] = {"name": EMBEDDING_NAME, "dtype": "float32", "shape": [-1, g * g]}
    if reference_images is not None:
        ref = reference.compute(open_session(model_path), reference_images)
        reference.write(os.path.join(vdir, reference.REFERENCE_FILE), ref)
        splits = reference.write_splits(os.path.join(vdir, reference.SPLITS_FILE),
                                        [(f"/data/train/NORMAL/{i}.jpeg", "val")
                                         for i in range(len(ref.probabilities))],
                                        "/data/train")
        meta["reference"] = reference.summary(os.path.join(vdir, reference.REFERENCE_FILE), ref, splits, 0)
    with open(os.path.join(vdir, "metadata.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(serving_dir, name, "config.pbtxt"), "w") as f:
        f.write(triton_config(name, image_size, heatmap=tuple(hw) if hw else None, embedding=g * g if g else None))
    return vdir


def png_with_size(width: int, height: int) -> bytes:
    """A PNG header claiming width x height (no real pixel data): trips Pillow's bomb check at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def write_bad_inputs(folder: str) -> dict[str, str]:
    """Every hostile input kind of issue 'batch_job'; -> {path: expected error fragment}."""
    os.makedirs(folder, exist_ok=True)
    bad = {}

    def put(name, data: bytes, fragment):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        bad[path] = fragment

    put("zero_bytes.jpeg", b"", "empty file")
    buf = _jpeg_bytes(64)
    put("truncated.jpeg", buf[: len(buf) // 2], "decode failed: image file cut short")
    put("text_file.jpg", b"this is not an image, just text\n", "not a decodable image")
    gif = _encode(Image.new("L", (64, 64), 100), "GIF")
    put("actually_gif.png", gif, "unsupported image format GIF")
    put("bomb.png", png_with_size(20000, 20000), "decompression bomb")
    put("one_pixel.png", _encode(Image.new("L", (1, 1), 5), "PNG"), "too small")
    unreadable = os.path.join(folder, "no_permission.jpeg")
    with open(unreadable, "wb") as f:
        f.write(_jpeg_bytes(64))
    os.chmod(unreadable, 0)
    if os.geteuid() != 0:  # root reads anything: then the file is simply scored
        bad[unreadable] = "permission denied"
    return bad


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg_bytes(size: int) -> bytes:
    rng = np.random.default_rng(1)
    return _encode(Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)), "JPEG", quality=90)


def assert_one_line_error(capsys, rc: int, *fragments: str, code: int = 2) -> str:
    """The CLI contract for bad input: exit `code`, exactly one stderr line starting 'error: '."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, (out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_predictions(out_dir: str) -> dict[str, dict]:
    rows = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "predictions-*.csv"))):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["path", "status", "probability", "prediction", "threshold", "label",
                                         "model", "error"]
            for row in reader:
                assert row["path"] not in rows, f"duplicate row for {row['path']}"
                rows[row["path"]] = row
    return rows


class Page(HTMLParser):
    """The page's tags and attributes, and its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: str) -> tuple[Page, str]:
    raw = open(path, "rb").read()
    page = Page()
    page.feed(raw.decode("utf-8"))  # strict: the page is valid UTF-8 whatever the file names
    return page, " ".join(" ".join(page.text).split())


# ------------------------------------------------------------------ typed run results for the report writers

def reconciliation(probabilities=(), failed: int = 0, skipped: int = 0, labels: list[str] | None = None,
                   input_dir: str = "/data"):
    """A clean Reconciliation of one input: `probabilities` of the scored images then the `skipped` ones (the
    last `skipped` of them, through the ledger), `failed` error rows besides."""
    from batch_job.reconcile import Reconciliation

    probs = np.asarray(probabilities, dtype=np.float64)
    scored, found = len(probs) - skipped, len(probs) + failed
    labels = list(labels) if labels is not None else [""] * len(probs)
    return Reconciliation(found, scored, failed, skipped, 0, 0, 0, [],
                          {input_dir: {"found": found, "scored": scored, "failed": failed, "skipped": skipped}},
                          probs[:scored], labels[:scored])  # a run's figures are of the images it scored


def run_result(drift=None, labelled=None, flagged=(), counts=None, model: str = "pneumonia/3",
               threshold: float = 0.5, runner: str = "DirectRunner", run_id: str = "run-now",
               ledger: str | None = None, heatmaps: int = 0, model_has_heatmaps: bool = False,
               wall_seconds: float = 12.0, map_hw: tuple[int, int] | None = None):
    """A RunResult for the report writers (report.md, the last lines, report.html): `counts` a Reconciliation
    (default: nothing found), `drift` a DriftResult (default: the model has no drift reference), the whole
    wall time spent scoring."""
    from batch_job.drift import no_reference
    from batch_job.result import HeatmapSummary, RunResult, Timings

    counts = counts if counts is not None else reconciliation()
    drift = drift if drift is not None else no_reference(counts.scored)
    return RunResult(run_id, model, threshold, runner, ledger, counts, labelled, list(flagged),
                     HeatmapSummary(heatmaps, model_has_heatmaps, map_hw), drift,
                     Timings(0.0, wall_seconds, 0.0, 0.0, 0.0))


def job(args: list[str], env_kill: str | None = None, timeout: int = 120, peak: list | None = None):
    """Run the batch job in its own process group; `peak` receives the max summed RSS of its process tree."""
    import psutil

    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    if env_kill:
        env[KILL_ENV] = env_kill
    proc = subprocess.Popen([sys.executable, "-m", "batch_job", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    stop = threading.Event()

    def sample():
        top, best = psutil.Process(proc.pid), 0
        while not stop.wait(0.05):
            try:
                best = max(best, sum(p.memory_info().rss for p in [top] + top.children(recursive=True)))
            except psutil.Error:
                pass
        if peak is not None:
            peak.append(best)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        sampler.join()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # reap orphaned Beam workers of a killed driver
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ------------------------------------------------------------------ export tests

def read_json(path):
    with open(path) as f:
        return json.load(f)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(root):
    """{relative path: sha256 or 'dir'} of everything under root ({} if it does not exist)."""
    snap = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            snap[os.path.relpath(p, root)] = sha256_of(p)
    return snap


def export_run(run_dir, serving_dir, *extra, floor: bool = False):
    """`python -m export --run-dir`. The tests' runs (an epoch or two on synthetic images) are mostly below the quality
    floor, and their tests are about what export does, so they publish with --publish-below-floor unless `floor`
    (tests/test_quality_floor.py tests the floor itself)."""
    from export.__main__ import main as export_main

    return export_main(["--run-dir", str(run_dir), "--serving-dir", str(serving_dir), "--name", "pneumonia",
                        *extra, *([] if floor else ["--publish-below-floor"])])


def pbtxt_section(text, key):
    match = re.search(rf"^{key}\s*\[\s*(.*?)^\]", text, re.S | re.M)
    assert match, key
    entries = re.findall(r'\{\s*name:\s*"([^"]+)"\s+data_type:\s*(\w+)\s+dims:\s*\[([^\]]*)\]\s*\}', match.group(1))
    return [(name, dtype, [int(v) for v in dims.replace(",", " ").split()]) for name, dtype, dims in entries]


def textured(size: tuple[int, int], mean: int, mode: str = "L", seed: int = 0) -> Image.Image:
    """An image of grey level `mean` with noise (std 20): scorable, where a flat image is out of scope for the
    input gate's cheap checks (xray_core/content.py). Same mean, same probability from the tiny test model."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(mean + rng.normal(0, 20, (size[1], size[0])), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").convert(mode)
