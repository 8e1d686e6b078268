"""How a night is cut into work and which workers run it: shard sizes (small nights reach every worker) and
DirectRunner's worker processes for nights of DICOM files (their decoders hold the GIL)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from batch_job import runner as runner_module
from batch_job.cli import main
from batch_job.listing import read_as_dicom
from batch_job.runner import choose_runner, for_night
from batch_job.shards import MAX_SHARD, shard_size
from dicom_factory import dicom_bytes, xray_like
from helpers import read_predictions, write_package


@pytest.mark.parametrize("n, workers, expected", [
    (60, 2, 8),  # QA: 60 compressed DICOM files were one shard of 64, one worker's
    (1, 2, 8), (7, 2, 8), (9, 2, 8), (100, 2, 13), (100, 16, 8), (255, 64, 8), (60, 1, 15), (511, 2, 64),
    (512, 2, 64), (513, 2, 128), (2000, 2, 256), (20_000, 2, 2048), (10**6, 16, MAX_SHARD), (0, 2, 64)])
def test_a_night_is_cut_into_about_four_shards_a_worker(n, workers, expected):
    assert shard_size(None, n, 64, workers) == expected
    assert shard_size(10, n, 64, workers) == 10  # --shard-size wins
    shards = -(-n // expected)
    assert n == 0 or shards <= 4 * workers or expected == MAX_SHARD
    assert expected >= 8  # review: not 100 JPEGs cut into 50 shards of 2 on 16 cores
    assert n < 8 * workers or shards >= workers  # small nights too: every worker gets work


def test_files_are_read_as_dicom_by_extension_or_by_having_no_image_extension():
    assert read_as_dicom("/a/1.2.840.113619.2.55.3") and read_as_dicom("/a/IM0001") and read_as_dicom("/a/x.DCM")
    assert not any(read_as_dicom(f"/a/x{ext}") for ext in (".jpeg", ".JPG", ".png", ".jfif", ".tif", ".webp"))


@pytest.fixture
def two_cores(monkeypatch):
    """DirectRunner's defaults as on a 2-core machine: worker threads, two of them."""
    monkeypatch.setattr(runner_module, "default_workers", lambda: 2)


def test_a_night_mostly_of_dicom_gets_worker_processes_unless_the_user_chose(two_cores):
    threads = choose_runner([])
    assert (threads.mode, threads.workers) == ("multi_threading", 2)
    processes = for_night(threads, [], dicom=30, images=60)
    assert (processes.mode, processes.workers, processes.label) == ("multi_processing", 2, "DirectRunner")
    assert for_night(threads, [], dicom=29, images=60) is threads  # under half: JPEG nights keep their threads
    assert for_night(threads, [], dicom=0, images=0) is threads  # a quiet night
    assert for_night(threads, [], dicom=15, images=15) is threads  # one shard: one worker whatever the mode (review)
    assert for_night(threads, [], dicom=16, images=16).mode == "multi_processing"
    chosen = ["--direct_running_mode=multi_threading"]
    assert for_night(choose_runner(chosen), chosen, dicom=60, images=60).mode == "multi_threading"
    one = ["--direct_num_workers=1"]
    assert for_night(choose_runner(one), one, dicom=60, images=60).mode == "multi_threading"  # nothing to share
    dask = ["--runner=DaskRunner"]
    assert for_night(choose_runner(dask), dask, dicom=60, images=60).label == "DaskRunner"
    given = ["--direct_num_workers=2", "--direct_running_mode", "in_memory"]
    assert for_night(choose_runner(given), given, dicom=60, images=60).mode == "in_memory"


@pytest.mark.slow
def test_a_dicom_night_is_scored_by_worker_processes(two_cores, tmp_path, caplog):
    """16 DICOM files and 2 PNGs on 2 cores: the log says why processes score them, every file has its row, and
    the scores are those of worker threads."""
    package = write_package(str(tmp_path / "serving"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(16):
        (folder / f"1.2.3.{i}").write_bytes(dicom_bytes(xray_like(96, 80, seed=i), bits_stored=12, modality="DX"))
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(40, 200, (64, 64), dtype=np.uint8), "L").save(folder / f"scan{i}.png")
    caplog.set_level(logging.INFO, logger="batch_job")
    assert main(["--input", str(folder), "--model", package, "--output", str(tmp_path / "processes"),
                 "--heatmaps", "0"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert "16 of 18 inputs are DICOM, whose decoders hold the GIL: worker processes score them " \
           "(--direct_running_mode=multi_threading keeps threads)" in said
    assert any(m.startswith("listed 18 images") and "-> 3 shards;" in m and m.endswith("(multi_processing, 2 workers)")
               for m in said)
    assert json.load(open(tmp_path / "processes" / "metrics.json"))["runner_mode"] == "multi_processing"
    assert main(["--input", str(folder), "--model", package, "--output", str(tmp_path / "threads"), "--heatmaps", "0",
                 "--direct_running_mode=multi_threading"]) == 0
    by_processes, by_threads = (read_predictions(str(tmp_path / out)) for out in ("processes", "threads"))
    assert len(by_processes) == 18 and sorted(map(os.path.basename, by_processes)) == sorted(os.listdir(folder))
    assert {p: r["probability"] for p, r in by_processes.items()} == {p: r["probability"]
                                                                       for p, r in by_threads.items()}
    assert [r["status"] for r in by_processes.values()] == ["ok"] * 18
