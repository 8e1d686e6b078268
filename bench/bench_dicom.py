"""Decode time of one X-ray-sized DICOM in every encoding, per pydicom decoder plugin installed.

    python -m bench.bench_dicom [--rows 2500 --cols 2000 --repeat 5]

A 12-bit chest-radiograph-like image (tests/dicom_factory.xray_like: body, lungs, spine, ribs, detector noise) is
encoded once per transfer syntax (tests/dicom_factory.encode), then decoded with pydicom's public
``pixel_array(ds, decoding_plugin=NAME)`` by each plugin that pydicom reports available for that syntax: the best
of --repeat runs, in CPU seconds of this process (the decoders run on one thread; CPU time stays put when other jobs
share the cores, wall time does not), with the file size and the largest pixel error. The last column is the
project's whole ``read_dicom`` (parse, the plugin it picks, LUTs, 8-bit mapping) on the file's bytes.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import numpy as np

from bench.common import REPO, machine, table

sys.path.insert(0, os.path.join(REPO, "tests"))  # the one encoder of test X-ray DICOMs

from dicom_factory import LOSSLESS, LOSSY, dicom_bytes, xray_like  # noqa: E402

PLUGINS = ("pylibjpeg", "pyjpegls", "gdcm", "pillow", "pydicom")


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def rows_for(img: np.ndarray, repeat: int) -> list[list]:
    import pydicom
    from pydicom.pixels import get_decoder, pixel_array

    from xray_core.dicom import read_dicom

    out = []
    for label, table_ in (("lossless", LOSSLESS), ("lossy", LOSSY)):
        for syntax, options in table_.items():
            px = (img >> 4).astype(np.uint8) if syntax == pydicom.uid.JPEGBaseline8Bit else img
            data = dicom_bytes(px, bits_stored=8 if px.dtype == np.uint8 else 12, syntax=syntax, options=options,
                               modality="DX")
            ds = pydicom.dcmread(io.BytesIO(data))
            available = list(get_decoder(syntax).available_plugins) or ["pydicom"]
            cells = []
            for plugin in PLUGINS:
                if plugin not in available:
                    cells.append("")
                    continue
                name = "" if plugin == "pydicom" and plugin not in get_decoder(syntax).available_plugins else plugin
                try:
                    err = int(np.abs(pixel_array(ds, decoding_plugin=name).astype(np.int32) - px).max())
                    seconds = best_of(lambda: pixel_array(ds, decoding_plugin=name), repeat)
                    cells.append(f"{seconds * 1000:.0f} ms (err {err})")
                except Exception as exc:  # noqa: BLE001 - a plugin's refusal is a result here
                    cells.append(f"fails: {type(exc).__name__}")
            whole = best_of(lambda: read_dicom(data, None), repeat)
            kind = "lossless" if label == "lossless" and options.get("jls_error", 0) == 0 else "lossy"
            out.append([f"{syntax.name} ({kind})", f"{len(data) / 1e6:.2f} MB", *cells, f"{whole * 1000:.0f} ms"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    img = xray_like(args.rows, args.cols, bits=12)
    print(f"{args.cols}x{args.rows} 12-bit, CPU time, best of {args.repeat}; {machine()}")
    print(table(["encoding", "file", *PLUGINS, "read_dicom"], rows_for(img, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
