"""The Dockerfile without a Docker engine: COPY sources, the install line, and the entrypoint in a fresh venv."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instructions() -> list[tuple[str, str]]:
    text = open(os.path.join(REPO, "Dockerfile")).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def copies() -> list[tuple[str, str]]:
    """(source, destination relative to /app) of every COPY."""
    out = []
    for op, rest in instructions():
        if op == "COPY":
            *sources, dest = shlex.split(rest)
            out += [(src, os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest)
                    for src in sources]
    return out


def exec_form(op: str) -> list[str]:
    (rest,) = [r for o, r in instructions() if o == op]
    return json.loads(rest)


def test_base_image_user_and_copy_sources():
    ops = instructions()
    assert ops[0] == ("FROM", "python:3.11-slim")
    users = [r for o, r in ops if o == "USER"]
    assert users and users[-1] not in ("root", "0")
    sources = [src for src, _ in copies()]
    for src in sources:
        assert os.path.exists(os.path.join(REPO, src)), f"COPY source {src} does not exist"
    assert {"xray_core", "batch_job", "serving_models"} <= set(sources)
    assert not {"export", "train"} & set(sources)  # the scoring side needs neither
    assert "train" not in sources  # the scoring side imports nothing from train/ (tested in test_batch_job.py)
    assert os.path.isfile(os.path.join(REPO, "serving_models", "pneumonia", "config.pbtxt"))


def test_install_line_is_the_base_install_without_tensorflow():
    runs = [r for o, r in instructions() if o == "RUN" and "pip install" in r]
    assert runs == ["pip install ."]  # the project itself, no extras: exactly pyproject's base dependencies
    project = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "tensorflow" not in base and "keras" not in base and "tf2onnx" not in base
    assert any(d.startswith("tensorflow") for d in project["optional-dependencies"]["train"])
    for pkg in ("apache-beam[dask]", "onnxruntime", "pillow", "numpy", "scikit-learn", "pydicom", "jinja2",
                "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls"):
        assert pkg in base


def environment() -> dict[str, str]:
    """ENV KEY=VALUE ... lines (values without spaces)."""
    return dict(pair.split("=", 1) for op, rest in instructions() if op == "ENV" for pair in shlex.split(rest))


def test_entrypoint_defaults():
    entry, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    # exec form, the job itself: it is PID 1 and gets docker stop's SIGTERM (a shell would not pass it on)
    assert entry == ["python", "-m", "batch_job"]
    assert environment()["PNEUMONIA_MODEL"] == "/app/serving_models/pneumonia"  # the model without --model
    assert cmd[cmd.index("--input") + 1] == "/input" and cmd[cmd.index("--output") + 1].startswith("/output")
    volumes = json.loads([r for o, r in instructions() if o == "VOLUME"][0])
    assert set(volumes) == {"/input", "/output"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SKIP_FRESH_VENV") == "1", reason="SKIP_FRESH_VENV=1")
def test_entrypoint_runs_in_a_fresh_base_virtualenv(tmp_path):
    """What the container runs, run directly in a new venv with an install of exactly the files the Dockerfile
    COPYs into /app (here tmp_path/app), as the Dockerfile's `pip install .` does. The install is uv's (the dev
    extra's; the same resolution of pyproject's dependencies, from its cache), which keeps the suite fast."""
    app = tmp_path / "app"
    app.mkdir()
    for src, dest in copies():
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, src)) else shutil.copy
        copy(os.path.join(REPO, src), app / dest, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                     if copy is shutil.copytree else {}))
    venv = tmp_path / "venv"
    uv = shutil.which("uv", path=os.path.dirname(sys.executable)) or shutil.which("uv")
    if uv:
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        install_cmd = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(app)]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install_cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(app)]
    py = str(venv / "bin" / "python")
    install = subprocess.run(install_cmd, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is None)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "True"  # the scoring install has no TensorFlow
    # and has a decoder for every common DICOM encoding (the plugins are base dependencies; tests/test_dicom.py)
    plugins = subprocess.run([py, "-c", "from pydicom import uid; from pydicom.pixels import get_decoder; print("
                              "*sorted(get_decoder(uid.JPEGExtended12Bit).available_plugins), '/', *sorted("
                              "get_decoder(uid.JPEGLSLossless).available_plugins))"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert plugins.stdout.split() == ["pillow", "pylibjpeg", "/", "pyjpegls", "pylibjpeg"], plugins.stderr[-2000:]
    for label in ("NORMAL", "PNEUMONIA"):  # real X-rays: synthetic ones are out of scope for the shipped model's gate
        os.makedirs(tmp_path / "input" / label)
        for name in sorted(os.listdir(os.path.join(REPO, "examples", "xrays", label)))[:6]:
            shutil.copy(os.path.join(REPO, "examples", "xrays", label, name), tmp_path / "input" / label)
    entry = [py if a == "python" else a.replace("/app/", f"{app}/") for a in exec_form("ENTRYPOINT")]
    cmd = [a.replace("/input", str(tmp_path / "input")).replace("/output", str(tmp_path / "output"))
           for a in exec_form("CMD")]
    env = {**os.environ, "PNEUMONIA_MODEL": environment()["PNEUMONIA_MODEL"].replace("/app/", f"{app}/")}
    env.pop("PYTHONPATH", None)  # the venv's own install, not a checkout's
    proc = subprocess.run(entry + cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"scored 12/12 images", proc.stdout)
    metrics = json.load(open(tmp_path / "output" / "scores" / "metrics.json"))
    assert metrics["model"].startswith("pneumonia/") and metrics["images_found"] == 12
    assert "Batch scoring report" in (tmp_path / "output" / "scores" / "report.html").read_text()  # template installed
    # a later --output on the command line wins, and the exit code is the job's: an existing output dir -> 2
    again = subprocess.run(entry + cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 2 and "not empty" in again.stderr
