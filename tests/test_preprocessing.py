"""The one preprocessing function: every Pillow mode, bytes == path, clear errors, no TensorFlow."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import png_with_size
from xray_core.preprocessing import ImageError, PreprocessConfig, preprocess_image, to_grayscale_8bit, to_model_input

CFG = PreprocessConfig(image_size=32)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray_level(value_8bit: int) -> dict[str, Image.Image]:
    """The same uniform gray in every mode the function must accept."""
    v = value_8bit
    p = Image.new("P", (64, 48), 0)
    p.putpalette([v, v, v] * 256)
    rgba = Image.new("RGBA", (64, 48), (v, v, v, 255))
    return {
        "L": Image.new("L", (64, 48), v),
        "RGB": Image.new("RGB", (64, 48), (v, v, v)),
        "RGBA": rgba,
        "P": p,
    }


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_every_mode_gives_same_gray(mode):
    img = gray_level(128)[mode]
    assert img.mode == mode
    out = preprocess_image(encode(img, "PNG"), CFG)
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    assert np.allclose(out, 128 / 255, atol=1 / 255)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_every_in_memory_mode_converts_to_8bit_gray(mode):
    img = gray_level(128)[mode]
    assert img.mode == mode
    gray = to_grayscale_8bit(img)
    assert gray.mode == "L" and np.all(np.asarray(gray) == 128)
    out = to_model_input(gray, CFG)
    assert np.allclose(out, 128 / 255)


def scan_like(h: int = 96, w: int = 80) -> np.ndarray:
    """A smooth image with structure (not uniform), values in 0..1."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    return 0.1 + 0.8 * (0.5 + 0.5 * np.sin(6 * xx) * np.cos(4 * yy))


@pytest.mark.parametrize("bits", [10, 12, 14, 15, 16])
def test_a_16_bit_png_gives_the_same_input_whatever_its_significant_bits(bits):
    """QA defect: 16-bit PNGs were mapped from 0..65535, so a DICOM export holding 12-bit data came out nearly
    black and out of scope, and 15-bit data scored as another image. Now min..max, as a DICOM without a window."""
    picture = scan_like()
    reference = preprocess_image(encode(Image.fromarray(np.rint(picture * 255).astype(np.uint8))), CFG)
    data = np.rint((picture - picture.min()) / np.ptp(picture) * (2 ** bits - 1)).astype(np.uint16)
    png = encode(Image.fromarray(data))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    out = preprocess_image(png, CFG)
    stretched = (reference - reference.min()) / np.ptp(reference)  # the 8-bit one is not stretched: compare shapes
    assert np.abs(out - stretched).max() < 3 / 255
    for mode_data in (data.astype(np.int32), data.astype(np.float32)):  # modes I and F, in memory
        assert np.array_equal(np.asarray(to_grayscale_8bit(Image.fromarray(mode_data))),
                              np.asarray(to_grayscale_8bit(Image.fromarray(data))))


@pytest.mark.parametrize("channels", [3, 2, 4])  # 16-bit RGB, gray+alpha, RGBA: Pillow reads their high bytes
def test_a_16_bit_colour_png_is_stretched_as_a_gray_one_and_refused_under_15_significant_bits(channels):
    """QA (2026-12-02): a 16-bit colour PNG holding 15 significant bits was scored from the half-bright picture of its
    high bytes (three NORMAL scans of 20 flagged); with 12 to 14 it was refused as near-constant, too few grey levels
    or unlike an X-ray, none naming the cause. Now stretched as a 16-bit gray PNG is, or refused saying why."""
    imagecodecs = pytest.importorskip("imagecodecs")
    picture = scan_like()
    gray16 = None
    for bits in (16, 15, 14, 12):
        data = np.rint((picture - picture.min()) / np.ptp(picture) * (2 ** bits - 1)).astype(np.uint16)
        planes = [data] * min(channels, 3) + [np.full_like(data, 65535)] * (channels in (2, 4))
        png = imagecodecs.png_encode(np.dstack(planes[:channels]))
        if bits == 16:
            gray16 = preprocess_image(encode(Image.fromarray(data)), CFG)
        if bits >= 15:
            assert np.abs(preprocess_image(png, CFG) - gray16).max() <= 3 / 255  # 7 bits of grey kept at 15
        else:
            with pytest.raises(ImageError, match="16-bit colour PNG holding 14 or fewer significant bits"):
                preprocess_image(png, CFG)
    eight = encode(Image.fromarray(np.dstack([np.rint(picture * 255).astype(np.uint8)] * 3)))
    assert np.array_equal(preprocess_image(eight, CFG), preprocess_image(encode(Image.fromarray(
        np.rint(picture * 255).astype(np.uint8))), CFG))  # an 8-bit colour PNG is not stretched


def test_a_uniform_16_bit_png_is_near_constant_not_stretched_into_a_picture():
    """Review: with min..max, a uniform 16-bit image has no range to stretch: it stays uniform (0), and the input
    gate refuses it as near-constant."""
    from xray_core.preprocessing import load_input

    png = encode(Image.fromarray(np.full((48, 64), 128 * 257, dtype=np.uint16)))
    assert np.all(preprocess_image(png, CFG) == 0.0)
    assert load_input(png, CFG).reason.startswith("near-constant image")


def test_an_rgb_stored_jpeg_decodes_as_its_ycbcr_twin():
    """QA defect: a JPEG stored as RGB planes (Adobe transform 0) failed ("broken data stream"): libjpeg cannot
    hand its planes out as YCbCr. Gray or colourful, it must decode as the same picture stored as YCbCr."""
    from xray_core.preprocessing import decode

    gray = Image.fromarray(np.rint(scan_like(200, 160) * 255).astype(np.uint8)).convert("RGB")
    colour = Image.merge("RGB", [gray.getchannel(0), gray.getchannel(0).rotate(90), gray.getchannel(0).rotate(180)])
    for img in (gray, colour):
        stored_rgb, ycbcr = encode(img, "JPEG", quality=95, keep_rgb=True), encode(img, "JPEG", quality=95)
        assert Image.open(io.BytesIO(stored_rgb)).info.get("adobe_transform") == 0
        a, b = decode(stored_rgb, CFG), decode(ycbcr, CFG)
        assert np.abs(to_model_input(a.image, CFG) - to_model_input(b.image, CFG)).max() < 4 / 255
        assert abs(a.colour_spread - b.colour_spread) < 2.0
    assert decode(encode(colour, "JPEG", quality=95, keep_rgb=True), CFG).colour_spread > 8  # still refused


def test_cmyk_jpeg_and_rgb_jpeg():
    rgb = Image.new("RGB", (64, 64), (200, 200, 200))
    cmyk = rgb.convert("CMYK")
    a = preprocess_image(encode(rgb, "JPEG", quality=95), CFG)
    b = preprocess_image(encode(cmyk, "JPEG", quality=95), CFG)
    assert a.shape == b.shape == (32, 32, 1)
    assert np.allclose(a, 200 / 255, atol=3 / 255)
    assert np.allclose(b, 200 / 255, atol=6 / 255)


def test_range_resize_and_bytes_equal_path(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (100, 70), dtype=np.uint8)
    arr[0, 0], arr[1, 1] = 0, 255
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    from_path = preprocess_image(str(path), CFG)
    from_bytes = preprocess_image(path.read_bytes(), CFG)
    assert np.array_equal(from_path, from_bytes)
    assert from_path.min() >= 0.0 and from_path.max() <= 1.0
    expected = np.asarray(Image.fromarray(arr).resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    assert np.array_equal(from_path[:, :, 0], expected)


def test_image_size_parameter():
    out = preprocess_image(encode(Image.new("L", (300, 200), 10)), PreprocessConfig(image_size=128))
    assert out.shape == (128, 128, 1)


@pytest.mark.parametrize("mode", ["L", "RGB"])  # RGB: how the training JPEGs are stored (mutation QA: untested)
def test_exif_rotation_is_applied(mode):
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :40] = 255  # left half white
    img = Image.fromarray(arr).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = preprocess_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()), PreprocessConfig(image_size=32))
    assert out[:8, :, 0].mean() > 0.9 and out[-8:, :, 0].mean() < 0.1  # white half is now on top


def test_jpeg_draft_decodes_large_scans_close_to_full_decode():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1100, 0:1400]
    arr = (127 + 60 * np.sin(xx / 90) * np.cos(yy / 70) + rng.normal(0, 5, (1100, 1400))).clip(0, 255)
    data = encode(Image.fromarray(arr.astype(np.uint8)), "JPEG", quality=90)
    fast = preprocess_image(data, PreprocessConfig(image_size=128, jpeg_draft=True))
    full = preprocess_image(data, PreprocessConfig(image_size=128, jpeg_draft=False))
    assert np.abs(fast - full).mean() < 0.01


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "not a decodable image"),
        (b"plain text, not an image", "not a decodable image"),
        (encode(Image.new("L", (64, 64)), "GIF"), "unsupported image format GIF"),
        (encode(Image.new("L", (64, 64)), "BMP"), "unsupported image format BMP"),
        (encode(Image.new("L", (1, 1)), "PNG"), "too small"),
        (png_with_size(20000, 20000), "decompression bomb"),  # Pillow itself refuses (> 2x its limit)
        (png_with_size(12000, 12000), "decompression bomb"),  # Pillow only warns (1x-2x): refused here
        (encode(Image.new("L", (64, 64), 9), "JPEG")[:300], "decode failed"),
    ],
)
def test_bad_inputs_raise_one_line_image_error(data, fragment):
    with pytest.raises(ImageError) as info:
        preprocess_image(data, CFG)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bomb_check_holds_in_concurrent_threads():
    """The batch job decodes in worker threads: every bomb must be refused in every thread, every
    good image decoded, and the process-wide warning filters left as they were (a per-call
    warnings.catch_warnings() swaps them and loses bombs to races)."""
    import threading
    import warnings

    bomb, good = png_with_size(12000, 12000), encode(Image.new("L", (64, 64), 100), "PNG")
    before = list(warnings.filters)
    outcomes, lock = [], threading.Lock()

    def worker(k):
        for i in range(200):
            data = bomb if (i + k) % 2 else good
            try:
                preprocess_image(data, CFG)
                got = "ok"
            except ImageError as exc:
                got = "bomb" if "decompression bomb" in str(exc) else str(exc)
            with lock:
                outcomes.append(("bomb" if data is bomb else "ok", got))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 800
    assert all(expected == got for expected, got in outcomes)
    assert list(warnings.filters) == before


def test_bomb_is_an_image_error_even_when_warnings_are_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # as `python -W error` would
        with pytest.raises(ImageError, match="decompression bomb"):
            preprocess_image(png_with_size(12000, 12000), CFG)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        preprocess_image(str(tmp_path / "nope.png"), CFG)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(image_size=64, resize_filter="bicubic")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_dict({"image_size": 64}) == PreprocessConfig(image_size=64)  # older metadata
    unknown = r"^preprocessing settings this code does not know: unknown_key \(upgrade it\)$"
    with pytest.raises(ValueError, match=unknown):
        PreprocessConfig.from_dict(cfg.to_dict() | {"unknown_key": 1})  # a newer export's step: never left out
    with pytest.raises(ValueError):
        PreprocessConfig(resize_filter="magic")
    for name, value in (("crop_bands", "false"), ("crop_bands", 1), ("jpeg_draft", None)):  # review: not a boolean
        with pytest.raises(ValueError, match=f"^{name} must be true or false"):
            PreprocessConfig.from_dict(cfg.to_dict() | {name: value})
    for name, value in (("min_side", "32"), ("min_side", -1), ("image_size", 64.0), ("image_size", True)):
        with pytest.raises(ValueError, match=f"^{name} must be a whole number >= 1"):  # review: "32" made every
            PreprocessConfig.from_dict(cfg.to_dict() | {name: value})  # image an error row, verify passed it
    with pytest.raises(ValueError, match="unknown resize_filter"):
        PreprocessConfig.from_dict(cfg.to_dict() | {"resize_filter": ["bilinear"]})


def test_preprocessing_imports_no_tensorflow():
    code = "import sys, xray_core.preprocessing, train.data, xray_core.metrics; sys.exit('tensorflow' in sys.modules)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0


def test_an_exception_as_one_line():
    from xray_core.errors import one_line

    assert one_line(ValueError("Unable to decode:\n  pylibjpeg\n\n  gdcm\n")) == "Unable to decode: pylibjpeg gdcm"
    beam = RuntimeError("Error processing bundle\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                        "OSError: disk full [while running 'DecodeScoreWrite']\n")
    assert one_line(beam) == "OSError: disk full [while running 'DecodeScoreWrite']"
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError("  \n ")) == "ValueError"
    assert one_line(ValueError("x" * 500), 200) == "x" * 200


def _gradient(size: int = 160) -> Image.Image:
    return Image.fromarray(np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8), "L")


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding():
    """QA: one 1.2 MB progressive JPEG repeating a scan 10,000 times took 76 s of CPU; nothing bounded it."""
    from xray_core.preprocessing import MAX_JPEG_SCANS

    buf = io.BytesIO()
    _gradient().save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    cfg = PreprocessConfig(image_size=64)
    assert 1 < data.count(b"\xff\xda") < 20
    plain = preprocess_image(data, cfg)
    last_scan = data[data.rindex(b"\xff\xda"):data.rindex(b"\xff\xd9")]
    end = data.rindex(b"\xff\xd9")
    few = data[:end] + last_scan * 5 + data[end:]  # a few more refinement scans: still an image
    assert np.abs(preprocess_image(few, cfg) - plain).max() < 0.1
    bomb = data[:end] + last_scan * MAX_JPEG_SCANS + data[end:]
    with pytest.raises(ImageError, match=f"^progressive JPEG of more than {MAX_JPEG_SCANS} scans$"):
        preprocess_image(bomb, cfg)


def test_a_multi_picture_jpeg_is_scored_on_its_first_picture():
    """QA: a camera's MPO file (a JPEG with more pictures after the first) was an error row."""
    first, second = _gradient(), Image.new("L", (160, 160), 40)
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    plain = io.BytesIO()
    first.save(plain, "JPEG", quality=95)
    cfg = PreprocessConfig(image_size=64)
    assert np.abs(preprocess_image(buf.getvalue(), cfg) - preprocess_image(plain.getvalue(), cfg)).max() < 2 / 255


def test_macos_appledouble_files_are_not_listed(tmp_path):
    """QA: a folder copied from a Mac holds `._scan.jpeg` beside each scan (Finder metadata): each was an error row."""
    from xray_core.input_files import APPLEDOUBLE_MAGIC, is_input_file

    _gradient().save(tmp_path / "scan.jpeg")
    (tmp_path / "._scan.jpeg").write_bytes(APPLEDOUBLE_MAGIC + b"\x00\x02\x00\x00Mac OS X        " + bytes(64))
    _gradient().save(tmp_path / "._real.jpeg")  # an image that happens to be named so stays listed
    (tmp_path / "._empty.jpeg").write_bytes(b"")  # and so does anything else: its row says what it is
    assert [n for n in sorted(os.listdir(tmp_path)) if is_input_file(str(tmp_path / n))] == [
        "._empty.jpeg", "._real.jpeg", "scan.jpeg"]


def test_training_and_calibration_read_a_file_as_the_batch_job_scores_it(tmp_path):
    """read_model_input (training, the gate fit, the drift reference, calibration): the array the job scores, and
    ImageError for what the job leaves out of scope before any model runs (review: training and calibration took
    photographs, blank exports and CT series in a class folder as that class)."""
    from dicom_factory import dicom_bytes, xray_like
    from helpers import textured
    from xray_core.preprocessing import load_input, read_model_input

    scan = encode(textured((80, 96), 120, seed=3))
    (tmp_path / "scan.png").write_bytes(scan)
    assert np.array_equal(read_model_input(str(tmp_path / "scan.png"), CFG), load_input(scan, CFG).array)
    assert np.array_equal(read_model_input(scan, CFG), preprocess_image(scan, CFG))
    photo = Image.merge("RGB", [textured((80, 96), 120, seed=s) for s in (1, 2, 3)])
    refused = {"photo.jpg": (encode(photo, "JPEG", quality=95), "out of scope: colour image"),
               "blank.png": (encode(Image.new("L", (80, 96), 200)), "out of scope: near-constant image"),
               "ct.dcm": (dicom_bytes(xray_like(96, 80), modality="CT"), "out of scope: Modality CT"),
               "junk.jpeg": (b"not an image", "not a decodable image")}
    for name, (data, reason) in refused.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=f"^{reason}"):
            read_model_input(str(tmp_path / name), CFG)
    for name, error in (("gone.png", r"file not found \(vanished or dangling link\)"),
                        ("fifo.jpeg", "not a regular file"),  # review: a FIFO blocked training's open() for good
                        ("empty.png", r"empty file \(0 bytes\)")):
        if name == "fifo.jpeg":
            os.mkfifo(tmp_path / name)
        elif name == "empty.png":
            (tmp_path / name).write_bytes(b"")
        with pytest.raises(ImageError, match=f"^{error}$"):
            read_model_input(str(tmp_path / name), CFG)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_lossless_jpeg_is_decoded_at_full_size_and_scores_as_its_png(channels):
    """QA: Pillow's draft() to a reduced scale on a lossless JPEG (SOF3: a DICOM export saved as .jpg) corrupted
    the heap and killed the whole job (exit 134, nothing published). Run in a child process, so that the old
    behaviour fails this test instead of the test run; 20 decodes, as the crash did not come every time."""
    script = (
        "import io, sys\n"
        "import imagecodecs, numpy as np\n"
        "from PIL import Image\n"
        "from xray_core.preprocessing import PreprocessConfig, preprocess_image\n"
        "rng = np.random.default_rng(0)\n"
        "gray = np.clip(rng.normal(120, 40, (1100, 1400)), 0, 255).astype(np.uint8)\n"
        f"pixels = gray if {channels} == 1 else np.stack([gray] * 3, axis=-1)\n"
        "jpeg = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1)\n"
        "png = io.BytesIO(); Image.fromarray(gray).save(png, format='PNG')\n"
        "cfg = PreprocessConfig(image_size=64)\n"
        "inputs = [preprocess_image(jpeg, cfg) for _ in range(20)]\n"
        "print(max(float(np.abs(x - preprocess_image(png.getvalue(), cfg)).max()) for x in inputs))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1000:])
    assert float(proc.stdout) == 0.0  # the same pixels as its PNG, decoded at full size


def test_only_a_jpeg_with_a_dct_frame_is_decoded_at_a_reduced_scale():
    import imagecodecs

    from xray_core.jpeg_frame import scalable_jpeg

    gray = np.full((100, 80), 128, np.uint8)
    assert scalable_jpeg(encode(Image.fromarray(gray), "JPEG"))
    assert scalable_jpeg(encode(Image.fromarray(gray), "JPEG", progressive=True))
    assert not scalable_jpeg(imagecodecs.jpeg8_encode(gray, lossless=True))
    assert not scalable_jpeg(b"\xff\xd8\xff\xe0\x00\x02")  # no frame header found: full size


@pytest.mark.parametrize("fmt,kept", [("JPEG", 0.3), ("JPEG", 0.9), ("PNG", 0.5), ("JPEG", 0.01), ("PNG", 0.002)])
def test_a_file_cut_short_says_so_and_not_pillows_bytes_not_processed(fmt, kept):
    """Pillow says "image file is truncated (17 bytes not processed)" of a JPEG missing half its bytes: its buffer's
    count, which QA read as what was cut. The reason says what happened instead."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 160), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()[: max(20, int(len(buf.getvalue()) * kept))]  # 0.01, 0.001: inside the header (review)
    with pytest.raises(ImageError) as caught:
        preprocess_image(data, PreprocessConfig(image_size=32))
    assert str(caught.value) == ("decode failed: image file cut short (the file ends before its image does: a "
                                 "transfer that stopped?)")


@pytest.mark.parametrize("missing", [4, 12, 13])
def test_a_png_without_its_end_chunk_is_cut_short_not_scored(missing):
    """QA: a PNG still being written, only its last 4-13 bytes (the IEND chunk) missing, decodes in Pillow: it was
    scored and recorded in the ledger, then scored again whole the next night, on two nights' worklists."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 160), dtype=np.uint8)).save(buf, "PNG")
    whole = buf.getvalue()
    assert preprocess_image(whole + b"trailing bytes", PreprocessConfig(image_size=32)).shape == (32, 32, 1)
    with pytest.raises(ImageError, match="^decode failed: image file cut short"):
        preprocess_image(whole[:-missing], PreprocessConfig(image_size=32))


def test_a_png_whose_iend_bytes_sit_in_a_text_chunk_and_whose_end_is_cut_is_cut_short():
    """QA: the end check searched the whole file for IEND's 12 bytes, which a text chunk after IHDR can hold: a PNG
    cut before its real end was scored. The chunks are walked instead."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("note", "\x00\x00\x00\x00IEND\xaeB`\x82")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 160), dtype=np.uint8)).save(buf, "PNG",
                                                                                                pnginfo=info)
    whole = buf.getvalue()
    assert whole.find(b"\x00\x00\x00\x00IEND\xaeB`\x82") < len(whole) - 12  # the bytes are in the text chunk too
    assert preprocess_image(whole, PreprocessConfig(image_size=32)).shape == (32, 32, 1)
    with pytest.raises(ImageError, match="^decode failed: image file cut short"):
        preprocess_image(whole[:-12], PreprocessConfig(image_size=32))


def test_a_jpeg_drafted_below_min_side_at_a_small_image_size_is_scored_without_crop_bands():
    """Review: the bands' min-side check ran without crop_bands, and a 200 px JPEG that libjpeg drafts to 25 px for a
    16 px model input was refused as "bands of constant grey cover 0.0% of a side"."""
    from xray_core.preprocessing import load_input

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(30, 220, (200, 200), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    loaded = load_input(buf.getvalue(), PreprocessConfig(image_size=16))
    assert loaded.reason == "" and loaded.array.shape == (16, 16, 1)
    cropped = load_input(buf.getvalue(), PreprocessConfig(image_size=16, crop_bands=True))
    assert cropped.reason == "" and cropped.array.shape == (16, 16, 1)  # nothing to crop: the same


def test_the_scan_left_inside_cut_bands_is_measured_in_the_originals_pixels():
    """Review: at a 16 px model input a 200 px JPEG is drafted to 25 px, and a 16 px black band left 23 px of scan
    at that scale: refused as "too little scan inside them" although 184 px of scan remain."""
    from xray_core.preprocessing import load_input

    rng = np.random.default_rng(4)
    ramp = np.linspace(30, 230, 200)[None, :] + np.linspace(0, 20, 200)[:, None]  # grey levels a draft keeps
    scan = np.clip(ramp + rng.normal(0, 4, (200, 200)), 0, 255).astype(np.uint8)
    scan[:, :16] = 0  # a black band at the left
    buf = io.BytesIO()
    Image.fromarray(scan).save(buf, format="JPEG", quality=95)
    for size in (16, 64):
        loaded = load_input(buf.getvalue(), PreprocessConfig(image_size=size, crop_bands=True))
        assert loaded.reason == "" and loaded.array.shape == (size, size, 1), (size, loaded.reason)
    thin = np.zeros((200, 200), np.uint8)
    thin[:, 90:110] = rng.integers(60, 200, (200, 20), dtype=np.uint8)  # 20 px of scan between wide bands
    buf = io.BytesIO()
    Image.fromarray(thin).save(buf, format="PNG")
    assert "too little scan inside them" in load_input(buf.getvalue(), PreprocessConfig(image_size=16,
                                                                                       crop_bands=True)).reason


def test_a_small_scan_inside_wide_bands_is_decoded_at_full_scale_before_the_model_sees_it():
    """Review: the reduced JPEG decode is chosen for the whole image; a 240 px scan inside a 2048 px black frame came
    out 30 px and was stretched to the 64 px model input. Where the cut scan is smaller than the model input, the
    file is decoded again at full scale: the input is the one a full decode gives."""
    from xray_core.preprocessing import load_input

    rng = np.random.default_rng(5)
    canvas = np.zeros((2048, 2048), np.uint8)
    ramp = np.linspace(40, 220, 240)[None, :] + np.linspace(0, 30, 240)[:, None]
    canvas[904:1144, 904:1144] = np.clip(ramp + rng.normal(0, 6, (240, 240)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=95)
    cfg = PreprocessConfig(image_size=64, crop_bands=True)
    full = preprocess_image(buf.getvalue(), PreprocessConfig(image_size=64, crop_bands=True, jpeg_draft=False))
    for got in (preprocess_image(buf.getvalue(), cfg), load_input(buf.getvalue(), cfg).array):
        assert np.abs(got - full).max() < 0.02  # the drafted thumbnail differed by up to 0.64
