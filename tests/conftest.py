"""Shared fixtures: synthetic image trees, hostile inputs, and a TensorFlow-free ONNX model package."""
from __future__ import annotations

import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from batch_job.synthetic import make_tree
from export.package import EMBEDDING_NAME, HEATMAP_NAME, INPUT_NAME, OUTPUT_NAME, sha256_file, triton_config

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray", "train")
SITE_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "chest_xray", "site_sample")


def make_onnx_model(path: str, image_size: int, scale: float = 20.0, offset: float = 0.45,
                    heatmap_hw: tuple[int, int] | None = None, embedding_grid: int | None = None) -> None:
    """P = sigmoid(scale * (mean pixel - offset)): bright (blobby) images score high.

    With heatmap_hw (h, w), dividing image_size: a second output `heatmap` (N, h, w), the input average-pooled
    to h x w (bright = evidence for pneumonia, as in the probability; same orientation as the input).
    With embedding_grid g: an output `embedding` (N, g*g), the input average-pooled to g x g and flattened."""
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
                  threshold: float = 0.5, reference_images: np.ndarray | None = None, **model_kwargs) -> str:
    """A published package as `python -m export` lays it out, around the tiny ONNX model (with a heatmap
    output and its metadata key when model_kwargs has heatmap_hw; with reference_images (N, S, S, 1), an
    `embedding` output and the drift reference computed from them, as export does from the validation split)."""
    vdir = os.path.join(serving_dir, name, str(version))
    os.makedirs(vdir)
    model_path = os.path.join(vdir, "model.onnx")
    if reference_images is not None:
        model_kwargs.setdefault("embedding_grid", 4)
    make_onnx_model(model_path, image_size, **model_kwargs)
    meta = {
        "name": name, "version": version, "architecture": "tiny_test_graph",
        "preprocessing": {"image_size": image_size, "color_mode": "L", "resize_filter": "bilinear",
                          "scaling": "divide_by_255", "jpeg_draft": True, "min_side": 32},
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, image_size, image_size, 1]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, 1]},
        "class_names": ["NORMAL", "PNEUMONIA"], "decision_threshold": threshold, "target_recall": 0.95,
        "sha256": sha256_file(model_path),
    }
    hw = model_kwargs.get("heatmap_hw")
    if hw:
        meta["heatmap_output"] = {"name": HEATMAP_NAME, "dtype": "float32", "shape": [-1, *hw]}
    g = model_kwargs.get("embedding_grid")
    if g:
        meta["embedding_output"] = {"name": EMBEDDING_NAME, "dtype": "float32", "shape": [-1, g * g]}
    if reference_images is not None:
        from export import reference
        from export.package import load_session

        arrays = reference.compute(load_session(model_path), reference_images)
        reference.write(os.path.join(vdir, reference.REFERENCE_FILE), arrays)
        splits = reference.write_splits(os.path.join(vdir, reference.SPLITS_FILE),
                                        [(f"/data/train/NORMAL/{i}.jpeg", "val") for i in range(len(arrays["probabilities"]))],
                                        "/data/train")
        meta["reference"] = reference.summary(os.path.join(vdir, reference.REFERENCE_FILE), arrays, splits, 0)
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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


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
    put("truncated.jpeg", buf[: len(buf) // 2], "decode failed")
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


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> str:
    serving = tmp_path_factory.mktemp("serving")
    write_package(str(serving))
    return str(serving / "pneumonia")


@pytest.fixture(scope="session")
def heat_package(tmp_path_factory) -> str:
    """The tiny model with a 4x4 heatmap output (its input average-pooled)."""
    serving = tmp_path_factory.mktemp("serving_heat")
    write_package(str(serving), image_size=32, heatmap_hw=(4, 4))
    return str(serving / "pneumonia")


@pytest.fixture(scope="session")
def labelled_tree(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """Nested labelled tree + unlabelled folder + every bad-input kind -> (root, bad paths)."""
    root = str(tmp_path_factory.mktemp("xrays"))
    make_tree(os.path.join(root, "site_a"), per_class=24, size=96, seed=3, nested=True)
    unlabelled = os.path.join(root, "site_b", "incoming, night 1", "ünïcode dir")
    os.makedirs(unlabelled)
    for i in range(5):
        Image.new("L", (80, 80), 40 + 40 * i).save(os.path.join(unlabelled, f"scan {i}, copy.png"))
    bad = write_bad_inputs(os.path.join(root, "site_a", "PNEUMONIA", "bad"))
    return root, bad


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def job_log():
    """What the batch job logs (logger "batch_job", INFO and up), through a handler of the test's own: it
    does not depend on pytest's log capture, its version, or which test ran first."""
    logger = logging.getLogger("batch_job")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
