"""Helpers shared by the benchmarks: machine description, synthetic inputs, tables."""
from __future__ import annotations

import os
import platform
import shutil

import numpy as np
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TRAIN = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "chest_xray", "train"))
SHARED_SITE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "chest_xray", "site_sample"))
DEFAULT_MODEL = os.path.join(REPO, "serving_models", "pneumonia")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, {cpu}, Python {platform.python_version()}"


def make_jpegs(folder: str, n: int, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> str:
    """n synthetic X-ray-like JPEGs (quality 90) under folder/{NORMAL,PNEUMONIA}; reused if present."""
    marker = os.path.join(folder, f".done-v2-{n}-{size[0]}x{size[1]}-{mode}")
    if os.path.exists(marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 50 * np.sin(xx / (w / 9)) * np.cos(yy / (h / 7))
    for i in range(n):
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        # film-grain-like noise: correlated over ~4 px, as in real scans (white noise would make
        # unrealistically large JPEGs whose entropy decoding dominates every decoder)
        grain = rng.normal(0, 6, (h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
        arr = np.clip(base + grain + rng.uniform(-30, 30), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L").filter(ImageFilter.GaussianBlur(1.5))
        if mode == "RGB":
            img = img.convert("RGB")
        img.save(os.path.join(folder, label, f"img{i:06d}.jpeg"), quality=90)
    open(marker, "w").close()
    return folder


def hardlink_copies(src: str, dst: str, copies: int) -> str:
    """dst/copyNNN/{NORMAL,PNEUMONIA}/...: `copies` hard-linked copies of src's images (distinct paths, which the
    job scores one by one, no extra disk); reused if present."""
    if not os.path.isdir(dst):
        for c in range(copies):
            for label in ("NORMAL", "PNEUMONIA"):
                folder = os.path.join(dst, f"copy{c:03d}", label)
                os.makedirs(folder)
                for name in os.listdir(os.path.join(src, label)):
                    os.link(os.path.join(src, label, name), os.path.join(folder, name))
    return dst


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)
