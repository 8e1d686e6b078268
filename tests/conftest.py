"""Shared fixtures: synthetic image trees, hostile inputs, and a TensorFlow-free ONNX model package (helpers.py)."""
from __future__ import annotations

import logging
import os

# The suite runs one pytest-xdist worker per core: TensorFlow and the BLAS behind numpy and scikit-learn compute on
# one thread in each worker (set before they are imported), so the workers do not fight over the cores.
for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image

from batch_job.synthetic import make_tree
from helpers import write_bad_inputs, write_package


@pytest.fixture(scope="session")
def dask_cluster() -> str:
    """One dask.distributed LocalCluster (2 worker processes) for every DaskRunner test; -> its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


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
    rng = np.random.default_rng(7)
    for i in range(5):  # mean grey 40 + 40 i, with texture: real scans are never flat (xray_core/content.py)
        pixels = np.clip(40 + 40 * i + rng.normal(0, 12, (80, 80)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(os.path.join(unlabelled, f"scan {i}, copy.png"))
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
