"""End-to-end tests of the Beam batch job on DirectRunner (2 worker threads; 2 worker processes) and DaskRunner."""
from __future__ import annotations

import glob
import html
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from batch_job import shards
from batch_job.cli import main
from batch_job.listing import input_root, iter_images
from batch_job.reconcile import reconcile
from batch_job.scoring import ScoringSpec, make_row
from batch_job.synthetic import make_tree
from helpers import assert_one_line_error, read_predictions, write_package
from xray_core.files import hold_lock
from xray_core.labels import label_from_path
from xray_core.package import open_session as load_session
from xray_core.preprocessing import PreprocessConfig, preprocess_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_image_paths(root: str) -> set[str]:
    return {p for _, p in iter_images([root])}


@pytest.fixture(scope="module", params=["multi_threading", "multi_processing"])
def direct_run(request, labelled_tree, tiny_package, tmp_path_factory):
    """DirectRunner with 2 workers in both modes: threads (the default up to 4 cores) and processes."""
    root, _ = labelled_tree
    out = str(tmp_path_factory.mktemp(f"direct-{request.param.replace('_', '-')}") / "out")
    rc = main(["--input", root, "--model", tiny_package, "--output", out, "--batch-size", "8",
               "--direct_num_workers=2", f"--direct_running_mode={request.param}"])
    return rc, out


@pytest.fixture(scope="module")
def dask_run(labelled_tree, tiny_package, tmp_path_factory, dask_cluster):
    root, _ = labelled_tree
    out = str(tmp_path_factory.mktemp("dask") / "out")
    rc = main(["--input", root, "--model", tiny_package, "--output", out, "--batch-size", "8",
               "--runner", "DaskRunner", f"--dask_client_address={dask_cluster}"])
    return rc, out


def test_direct_runner_scores_every_image_once(direct_run, labelled_tree):
    rc, out = direct_run
    root, bad = labelled_tree
    assert rc == 0
    rows = read_predictions(out)
    assert set(rows) == all_image_paths(root)
    assert len(rows) == 48 + 5 + 7  # synthetic labelled + unlabelled + every bad kind (incl. the chmod-0 one)
    assert len(glob.glob(os.path.join(out, "predictions-*.csv"))) > 1  # work was spread over shards
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["images_found"] == m["images_scored"] + m["images_failed"] + m["images_out_of_scope"] == len(rows)
    assert m["images_out_of_scope"] == 0  # the gate's cases: tests/test_gate_job.py
    t = m["timings"]  # the job's phases add up to its wall time; the bench reads the scoring phase
    assert min(t["setup_seconds"], t["scoring_seconds"], t["report_seconds"]) > 0
    phases = t["setup_seconds"] + t["scoring_seconds"] + t["report_seconds"]
    assert phases == pytest.approx(m["wall_seconds"], abs=0.002)
    assert t["scoring_images_per_second"] == pytest.approx(len(rows) / t["scoring_seconds"], rel=0.01)
    assert m["images_per_second"] == pytest.approx(len(rows) / m["wall_seconds"], rel=0.01)
    assert m["images_failed"] == len(bad)
    assert m["runner"] == "DirectRunner" and m["model"] == "pneumonia/1"
    assert m["runner_mode"] == ("multi_processing" if "-processing" in direct_run[1] else "multi_threading")
    for path, fragment in bad.items():
        assert rows[path]["status"] == "error" and fragment in rows[path]["error"], rows[path]
        assert rows[path]["probability"] == "" and rows[path]["prediction"] == ""


def test_labels_come_from_folders_below_the_input(direct_run, labelled_tree):
    rows = read_predictions(direct_run[1])
    for path, row in rows.items():
        expected = "PNEUMONIA" if "/PNEUMONIA/" in path else "NORMAL" if "/NORMAL/" in path else ""
        assert row["label"] == expected
    assert label_from_path("/a/in/normal/x/y.png", "/a/in") == "NORMAL"  # any case, nearest folder wins
    assert label_from_path("/a/in/NORMAL/PNEUMONIA/y.png", "/a/in") == "PNEUMONIA"
    assert label_from_path("/a/in/b/y.png", "/a/in") == ""
    assert label_from_path("/a/NORMAL/y.png", "/a/NORMAL") == "NORMAL"  # the input's own folder counts
    assert label_from_path("/a/NORMAL/in/y.png", "/a/NORMAL/in") == ""  # a folder above it never does
    assert label_from_path("/a/NORMAL/y.png", "/a/NORMAL/y.png") == ""  # a single-file input: no folder below
    assert input_root("/a/NORMAL/*/x.png") == "/a/NORMAL" and input_root("gs://b/PNEUMONIA/**") == "gs://b/PNEUMONIA"


def test_no_labels_from_folders_above_the_input(tmp_path, tiny_package):
    """--input /data/Pneumonia/incoming: the images are not labelled, and no labelled metrics are reported."""
    incoming = tmp_path / "data" / "Pneumonia" / "incoming"
    make_tree(str(incoming / "site"), per_class=3, size=64, seed=4)  # labelled folders below the input...
    for p in glob.glob(str(incoming / "site" / "*" / "*")):
        os.rename(p, incoming / os.path.basename(p))  # ...moved up: now only the folder above is named
    out = str(tmp_path / "out")
    assert main(["--input", str(incoming), "--model", tiny_package, "--output", out,
                 "--direct_running_mode=in_memory"]) == 0
    rows = read_predictions(out)
    assert len(rows) == 6 and {r["label"] for r in rows.values()} == {""}
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert "accuracy" not in m and "labelled_images" not in m and "recall" not in m
    # the input's own folder, and a glob's literal folders, still label
    out2, out3 = str(tmp_path / "out2"), str(tmp_path / "out3")
    assert main(["--input", str(tmp_path / "data" / "Pneumonia"), "--model", tiny_package, "--output", out2,
                 "--direct_running_mode=in_memory"]) == 0
    assert {r["label"] for r in read_predictions(out2).values()} == {"PNEUMONIA"}
    glob_input = str(tmp_path / "data" / "*" / "incoming" / "*.jpeg")
    assert main(["--input", glob_input, "--model", tiny_package, "--output", out3,
                 "--direct_running_mode=in_memory"]) == 0
    assert {r["label"] for r in read_predictions(out3).values()} == {"PNEUMONIA"}  # below the glob's root


def test_a_package_that_cuts_edge_bands_scores_a_padded_scan_as_the_scan(tmp_path, capsys):
    """preprocessing `crop_bands` (train --crop-bands): the job cuts the bands before the resize, as training did; a
    package without it refuses the same file as padded; one naming a setting this job does not know is refused."""
    from PIL import Image

    scan = np.clip(np.random.default_rng(3).normal(120, 40, (160, 160)), 0, 255).astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(scan).save(folder / "scan.png")
    Image.fromarray(np.pad(scan, ((0, 0), (40, 40)))).save(folder / "pillarboxed.png")  # 4:3, bands 33% of the width
    crop = write_package(str(tmp_path / "crop"), preprocessing={"crop_bands": True})
    plain = write_package(str(tmp_path / "plain"))
    for package, out in ((crop, "out_crop"), (plain, "out_plain")):
        assert main(["--input", str(folder), "--model", package, "--output", str(tmp_path / out),
                     "--direct_running_mode=in_memory"]) == 0
    rows = {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / "out_crop")).items()}
    assert rows["pillarboxed.png"]["status"] == "ok"
    assert float(rows["pillarboxed.png"]["probability"]) == pytest.approx(float(rows["scan.png"]["probability"]),
                                                                        abs=1e-6)
    rows = {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / "out_plain")).items()}
    assert rows["pillarboxed.png"]["status"] == "out_of_scope"
    assert rows["pillarboxed.png"]["error"].startswith("padded: bands of constant grey cover 33.3% of a side")
    capsys.readouterr()
    newer = write_package(str(tmp_path / "newer"), preprocessing={"crop_bands": True, "deskew": True})
    assert_one_line_error(capsys, main(["--input", str(folder), "--model", newer, "--output", str(tmp_path / "o3")]),
                          "preprocessing settings this code does not know: deskew (upgrade it)", code=2)
    assert not os.path.exists(tmp_path / "o3")


def test_probabilities_equal_direct_onnxruntime(direct_run, tiny_package):
    rows = read_predictions(direct_run[1])
    session = load_session(os.path.join(tiny_package, "1", "model.onnx"))
    config = PreprocessConfig(image_size=32)
    ok = [p for p, r in rows.items() if r["status"] == "ok"]
    x = np.stack([preprocess_image(p, config) for p in ok])
    direct = session.run(["probability"], {"image": x})[0].reshape(-1)
    got = np.asarray([float(rows[p]["probability"]) for p in ok])
    assert np.max(np.abs(got - direct)) <= 1e-6
    for p in ok:
        assert rows[p]["prediction"] == ("PNEUMONIA" if float(rows[p]["probability"]) >= 0.5 else "NORMAL")


def test_metrics_equal_scikit_learn(direct_run):
    rc, out = direct_run
    rows = read_predictions(out)
    m = json.load(open(os.path.join(out, "metrics.json")))
    labelled = [r for r in rows.values() if r["status"] == "ok" and r["label"]]
    y = np.asarray([r["label"] == "PNEUMONIA" for r in labelled], dtype=int)
    p = np.asarray([float(r["probability"]) for r in labelled])
    pred = (p >= 0.5).astype(int)
    assert m["labelled_images"] == len(labelled)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["confusion_matrix"]["matrix"] == [[tn, fp], [fn, tp]]
    all_ok = np.asarray([float(r["probability"]) for r in rows.values() if r["status"] == "ok"])
    assert m["positive_count"] == int((all_ok >= 0.5).sum())
    assert m["probability_histogram"]["counts"] == np.histogram(all_ok, bins=10, range=(0, 1))[0].tolist()
    assert sum(v["found"] for v in m["per_input"].values()) == m["images_found"]
    report = open(os.path.join(out, "report.md")).read()
    assert f"| {m['images_found']} | {m['images_scored']} | {m['images_failed']} |" in report
    assert os.path.getsize(os.path.join(out, "histogram.png")) > 1000


@pytest.mark.slow
def test_dask_runner_gives_identical_predictions(direct_run, dask_run):
    rc, out = dask_run
    assert rc == 0
    direct, dask = read_predictions(direct_run[1]), read_predictions(out)
    assert dask == direct
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["runner"] == "DaskRunner" and m["runner_mode"] is None
    assert m["images_found"] == m["images_scored"] + m["images_failed"] == len(direct)


def test_rerun_is_identical_and_overwrite_needed(direct_run, labelled_tree, tiny_package, capsys):
    root, _ = labelled_tree
    out = direct_run[1]
    before = read_predictions(out)
    assert main(["--input", root, "--model", tiny_package, "--output", out, "--direct_num_workers=1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--input", root, "--model", tiny_package, "--output", out, "--overwrite",
                 "--direct_num_workers=1", "--shard-size", "16"]) == 0
    assert read_predictions(out) == before
    assert not glob.glob(out + ".tmp-*") and not glob.glob(out + ".old-*")


@pytest.mark.slow
def test_worker_processes_log_nothing_of_their_own(labelled_tree, tiny_package, tmp_path):
    """QA: with worker processes (the default beyond 4 cores) each of Beam's SDK workers printed ~19 INFO lines of
    its own on stderr ("Logging handler created.", "Control channel established.", ...) at every --log-level: 300
    lines a night on 16 cores. They run as batch_job.beam_worker now: the job's stderr holds its own lines only,
    and the workers score as Beam's did."""
    from helpers import job

    root, _ = labelled_tree
    out = str(tmp_path / "out")
    proc = job(["--input", root, "--model", tiny_package, "--output", out, "--batch-size", "8",
                "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    own = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ")
    stray = [line for line in proc.stderr.splitlines() if not own.match(line)]
    assert stray == [], stray[:5]
    assert len(read_predictions(out)) == len(all_image_paths(root))
    assert len(glob.glob(os.path.join(out, "predictions-*.csv"))) > 1


@pytest.mark.slow
def test_a_worker_process_that_cannot_start_fails_the_job_saying_why(tiny_package, tmp_path):
    """QA: a worker process that could not start failed the job with "return code 1; --log-level DEBUG shows the
    worker's own output": the night had to be run again to learn why. The job now quotes what the worker printed
    (here Python's own fatal error: the workers inherit a PYTHONHASHSEED it refuses; the job's process started
    before it was set), and nothing is published or left behind."""
    make_tree(str(tmp_path / "in"), per_class=3, size=48, seed=2)
    out = str(tmp_path / "out")
    code = ("import os, sys; os.environ['PYTHONHASHSEED'] = 'bogus'; from batch_job.__main__ import main; "
            "sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "--input", str(tmp_path / "in"), "--model", tiny_package,
                           "--output", out, "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: job failed: a worker process ended while scoring (Worker subprocess exited with return code 1: "
        "Fatal Python error: config_init_hash_seed: PYTHONHASHSEED must be "), proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("); nothing published") and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no OUT_DIR, no temp dir, no worker log


def test_a_worker_s_death_reason_is_its_fatal_error_or_traceback_never_another_worker_s_warnings(tmp_path):
    """Review: all workers appended to one file, and the job quoted its last lines: a healthy worker's Pillow warning
    was given as the reason a killed worker ended, and two workers' fatal errors came out interleaved. Each worker now
    has its own file, and only how a Python process says it died is quoted."""
    from batch_job.errors import worker_lost
    from batch_job.workers import death_reason

    healthy = ("INFO:apache_beam.runners.worker.sdk_worker:Control channel established.\n"
               "/x/PIL/Image.py:1136: UserWarning: Palette images with Transparency expressed in bytes should be "
               "converted to RGBA images\n  warnings.warn(\nWARNING:root:apitools not found\n")
    (tmp_path / "worker-100.log").write_text(healthy)
    assert death_reason(str(tmp_path)) == death_reason(None) == death_reason(str(tmp_path / "none")) == ""
    (tmp_path / "worker-200.log").write_text(
        "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    import x\n"
        "ImportError: first\n\nDuring handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n  File \"b.py\", line 2, in <module>\n"
        "ModuleNotFoundError: No module named 'onnxruntime'\nINFO:a:b\n")
    assert death_reason(str(tmp_path)) == "ModuleNotFoundError: No module named 'onnxruntime'"
    (tmp_path / "worker-150.log").write_text(healthy + 'Fatal Python error: config_init_hash_seed: PYTHONHASHSEED must '
                                             'be "random"\nPython runtime state: preinitialized\n')
    assert death_reason(str(tmp_path)) == 'Fatal Python error: config_init_hash_seed: PYTHONHASHSEED must be "random"'
    exited = "Worker subprocess exited with return code"
    assert str(worker_lost(f"{exited} 1", "E: x")) == (
        f"job failed: a worker process ended while scoring ({exited} 1: E: x); nothing published")
    assert "--log-level DEBUG shows the worker's own output" in str(worker_lost(f"{exited} 1"))
    assert "-9 is SIGKILL" in str(worker_lost(f"{exited} -9", "whatever")) and worker_lost("x 1").exit_code == 1
    assert str(worker_lost(f"{exited} 143")).endswith(f"({exited} 143); nothing published")


def test_the_reaper_kills_workers_once_started_until_disarmed_and_only_for_its_own_run(monkeypatch):
    """A stopped job's workers are killed at once and again every PERIOD while Beam still waits for them; never
    outside a run, never by a thread of an earlier run."""
    from batch_job import workers

    calls = []
    monkeypatch.setattr(workers, "stop_worker_processes", lambda: calls.append(time.monotonic()) or {7})
    monkeypatch.setattr(workers.Reaper, "PERIOD", 0.05)
    reaper = workers.Reaper()
    reaper.start()
    assert calls == []  # not armed: not in a run
    reaper.arm()
    reaper.start()
    reaper.start()  # a second signal, or the hook after the handler: the same reaper
    assert len(calls) == 1 and reaper.survivors == {7}
    time.sleep(0.3)
    assert len(calls) >= 3  # again and again while the pipeline has not returned
    reaper.disarm()
    time.sleep(0.15)
    stopped = len(calls)
    reaper.arm()  # the next run: the earlier thread does not come back to life
    time.sleep(0.15)
    assert len(calls) == stopped and reaper.survivors == set()
    reaper.disarm()


def test_runner_defaults_apply_only_where_the_user_set_nothing():
    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.runners.dask.dask_runner import DaskOptions

    from batch_job.runner import THREADS_UP_TO, choose_runner, default_running_mode, default_workers

    assert default_running_mode(1) == default_running_mode(THREADS_UP_TO) == "multi_threading"
    assert default_running_mode(THREADS_UP_TO + 1) == default_running_mode(64) == "multi_processing"
    cores = default_workers()

    def direct(args):
        r = choose_runner(args)
        o = r.options.view_as(DirectOptions)
        assert o.direct_running_mode == ("in_memory" if r.mode == "multi_processing" else r.mode)  # beam_worker.py
        return r.label, r.mode, o.direct_num_workers, r.workers

    assert direct([]) == ("DirectRunner", default_running_mode(cores), cores, cores)
    assert direct(["--job_name=in_memory_direct_num_workers"]) == direct([])  # values are not option names
    assert direct(["--direct_running_mode", "multi_processing", "--direct_num_workers", "3"])[1:] == (
        "multi_processing", 3, 3)
    assert direct(["--direct_running_mode=in_memory"])[1:] == ("in_memory", 1, 1)  # Beam's default, given explicitly
    assert direct(["--direct_num_workers=1"])[2:] == (1, 1)
    assert choose_runner([]).options.get_all_options()["default_sdk_harness_log_level"] == "WARNING"
    from batch_job.workers import worker_processes  # worker processes' stderr: kept at --log-level DEBUG only

    assert worker_processes(False).command_string.endswith(
        '-m batch_job.beam_worker 2>>"${PNEUMONIA_WORKER_LOGS:-/dev/null}${PNEUMONIA_WORKER_LOGS:+/worker-$$.log}"')
    assert worker_processes(True).command_string.endswith("-m batch_job.beam_worker")
    dask = choose_runner(["--runner=DaskRunner"])
    assert dask.label == "DaskRunner" and dask.options.view_as(DaskOptions).partition_size == 1
    dask = choose_runner(["--runner", "DaskRunner", "--dask_npartitions", "3"]).options.view_as(DaskOptions)
    assert (dask.npartitions, dask.partition_size) == (3, None)


def test_worker_threads_write_nothing_on_the_jobs_stderr_while_the_pipeline_runs(capsys):
    """QA: Beam's SDK harness printed a failing bundle's ~100-line traceback on the job's stderr from DirectRunner's
    worker threads (it may name files). While quiet, only the main thread writes there, and a failing thread that
    is not Beam's stream reader is still printed, on the job's stderr; at --log-level DEBUG nothing is dropped."""
    import threading

    from batch_job.__main__ import thread_failed
    from batch_job.quiet_stderr import quiet_worker_threads
    from batch_job.runner import choose_runner

    def from_a_thread(target):
        worker = threading.Thread(target=target, name="harness")
        worker.start()
        worker.join()

    with quiet_worker_threads(True):
        sys.stderr.write("main thread\n")
        from_a_thread(lambda: print("Traceback (most recent call last): a bundle failed", file=sys.stderr))
        previous, threading.excepthook = threading.excepthook, thread_failed
        try:
            from_a_thread(lambda: 1 / 0)
        finally:
            threading.excepthook = previous
    sys.stderr.write("after\n")
    err = capsys.readouterr().err
    assert "a bundle failed" not in err
    assert err.startswith("main thread\nException in thread harness:\nTraceback (most recent call last):\n")
    assert err.endswith("ZeroDivisionError: division by zero\nafter\n")
    with quiet_worker_threads(False):
        from_a_thread(lambda: print("kept", file=sys.stderr))
    assert capsys.readouterr().err == "kept\n"
    assert choose_runner(["--direct_running_mode=multi_threading"]).quiet_threads
    assert not choose_runner(["--direct_running_mode=multi_threading"], worker_stderr=True).quiet_threads
    assert not choose_runner(["--direct_running_mode=multi_processing"]).quiet_threads  # files of their own


def test_workers_compute_with_one_blas_thread():
    """The workers keep every core busy; BLAS's own threads (busy-waiting after each of the gate's products) would
    take cores from them. A fresh process: the limit is process-wide."""
    code = ("import numpy; from threadpoolctl import threadpool_info; from batch_job.stages import ScoreAndWriteShard\n"
            "blas = lambda: sorted(p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas')\n"
            "print(blas()); ScoreAndWriteShard(None, '', '').setup(); print(blas())")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env=env).stdout.split("\n")[:2]
    assert before.startswith("[2") and after == "[1]"


def test_threshold_override(labelled_tree, tiny_package, tmp_path, capsys):
    """--threshold decides every row, and every report says it was set so, beside the package's calibrated one
    (QA: an override looked like the package's threshold, whose figures the model card quotes)."""
    from xray_core.package import load_metadata, resolve_version_dir

    own = load_metadata(resolve_version_dir(tiny_package)).decision_threshold
    assert own != 0.9
    root, _ = labelled_tree
    out = str(tmp_path / "o")
    assert main(["--input", os.path.join(root, "site_b"), "--model", tiny_package, "--output", out,
                 "--threshold", "0.9", "--direct_running_mode=in_memory"]) == 0
    rows = read_predictions(out)
    assert len(rows) == 5
    for r in rows.values():
        assert float(r["threshold"]) == 0.9
        assert r["prediction"] == ("PNEUMONIA" if float(r["probability"]) >= 0.9 else "NORMAL")
        assert r["label"] == ""
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert "accuracy" not in m  # no labels -> no labelled metrics
    assert m["threshold"] == 0.9 and m["package_threshold"] == own
    said = f"0.9000 (set by --threshold; the package's calibrated threshold is {own:.4f})"
    assert said in capsys.readouterr().out
    assert said in open(os.path.join(out, "report.md")).read()
    assert said in html.unescape(" ".join(open(os.path.join(out, "report.html"), encoding="utf-8").read().split()))
    plain = str(tmp_path / "plain")
    assert main(["--input", os.path.join(root, "site_b"), "--model", tiny_package, "--output", plain,
                 "--direct_running_mode=in_memory"]) == 0
    m = json.load(open(os.path.join(plain, "metrics.json")))
    assert m["threshold"] == own and "package_threshold" not in m
    assert "set by --threshold" not in capsys.readouterr().out + open(os.path.join(plain, "report.md")).read()


def test_a_file_reached_twice_is_listed_once(tmp_path, monkeypatch):
    """Overlapping inputs, a linked file and a linked folder name files already listed: each is listed once, under
    the path it was first found by; the duplicate key is the file's real path, resolved folder by folder."""
    from batch_job.listing import resolved

    make_tree(str(tmp_path / "in"), per_class=2, size=64, seed=3)
    os.symlink(tmp_path / "in", tmp_path / "alias")  # a linked folder
    first = sorted(glob.glob(str(tmp_path / "in" / "NORMAL" / "*")))[0]
    os.symlink(first, tmp_path / "in" / "PNEUMONIA" / "link.jpeg")  # a linked file inside the input
    os.symlink(tmp_path / "gone.jpeg", tmp_path / "dangling.jpeg")
    found = list(iter_images([str(tmp_path / "in"), str(tmp_path / "in" / "NORMAL"), str(tmp_path / "alias")]))
    assert len(found) == 4 and {i for i, _ in found} == {0}
    assert not any(p.endswith("link.jpeg") for _, p in found)  # its target, NORMAL/..., was listed first
    monkeypatch.chdir(tmp_path)
    cache: dict[str, str] = {}
    for path in ("alias/NORMAL/" + os.path.basename(first), str(tmp_path / "in" / "PNEUMONIA" / "link.jpeg"),
                 "dangling.jpeg", "in/../alias/PNEUMONIA", "nowhere/x.jpeg"):
        assert resolved(path, cache) == os.path.realpath(path)


def test_a_symlinked_folder_that_is_not_followed_is_said(tmp_path, caplog):
    """QA: a day folder linked into the input (`mix/NORMAL -> /nas/...`) was skipped without a word: "scored 0/0",
    a quiet night, exit 0. Links to folders are still not followed (no loops), but the log says which."""
    make_tree(str(tmp_path / "nas"), per_class=2, size=64, seed=3)
    (tmp_path / "mix").mkdir()
    for label in ("NORMAL", "PNEUMONIA"):
        os.symlink(tmp_path / "nas" / label, tmp_path / "mix" / label)
    with caplog.at_level("DEBUG", logger="batch_job"):
        assert list(iter_images([str(tmp_path / "mix")])) == []
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    mix = tmp_path / "mix"
    assert said == [("WARNING", f"2 symbolic link(s) to folders under {mix} not followed (--log-level DEBUG names "
                                "them): name them as --input, or with a glob, to score what they hold"),
                    ("DEBUG", f"not followed: {mix / 'NORMAL'}, {mix / 'PNEUMONIA'}")]  # QA: a folder may name a
    # patient: the log names only the input the user gave, unless at DEBUG
    caplog.clear()
    with caplog.at_level("WARNING", logger="batch_job"):  # named as the input itself: walked, nothing to say
        assert len(list(iter_images([str(tmp_path / "mix" / "NORMAL")]))) == 2
    assert not caplog.records


def test_glob_input_and_newest_version(labelled_tree, tmp_path):
    root, _ = labelled_tree
    serving = str(tmp_path / "serving")
    write_package(serving, version=1, offset=0.45)
    write_package(serving, version=2, offset=0.2)
    out = str(tmp_path / "o")
    assert main(["--input", os.path.join(root, "site_a", "NORMAL", "*", "*.jpeg"), "--model",
                 os.path.join(serving, "pneumonia"), "--output", out, "--direct_running_mode=in_memory"]) == 0
    rows = read_predictions(out)
    assert rows and all(r["model"] == "pneumonia/2" and r["path"].endswith(".jpeg") for r in rows.values())


def test_a_glob_that_matches_folders_walks_them_as_folder_inputs(labelled_tree):
    """QA: `--input '/data/incoming/2026-12-*'` (folders) found nothing, and the night was a quiet one, exit 0."""
    root, _ = labelled_tree
    site_a = os.path.join(root, "site_a")
    everything = {path for _, path in iter_images([site_a])}
    normal = {path for _, path in iter_images([os.path.join(site_a, "NORMAL")])}
    assert len(normal) == 24 and len(everything) > len(normal)
    assert {path for _, path in iter_images([os.path.join(site_a, "*")])} == everything
    assert {path for _, path in iter_images([os.path.join(site_a, "*") + "/"])} == everything
    assert {path for _, path in iter_images([os.path.join(site_a, "N*")])} == normal
    assert {path for _, path in iter_images([os.path.join(root, "*", "NORMAL")])} == normal
    jpeg = {path for path in normal if path.endswith(".jpeg")}
    assert jpeg and {path for _, path in iter_images([os.path.join(site_a, "N*", "*", "*.jpeg")])} == jpeg


def test_a_glob_walks_linked_folders_it_matches_never_hidden_ones_and_only_what_can_match(tmp_path, monkeypatch):
    """Review: a glob skipped a matched folder that is a symbolic link (nights linked to a NAS: a quiet night),
    `*` took hidden folders (`.snapshot`: copies of every scan), `'/data/*/'` took loose files too, and the walk
    entered every folder under the glob's literal prefix (the whole archive, each night)."""
    from helpers import textured

    incoming, nas = tmp_path / "incoming", tmp_path / "nas"
    for folder in (incoming / "2026-12-02", incoming / ".snapshot" / "2026-12-02", nas / "2026-12-01",
                   incoming / "2025-01-01" / "deep"):
        folder.mkdir(parents=True)
        textured((64, 64), 120).save(folder / "scan.png")
    textured((64, 64), 120).save(incoming / "loose.png")
    os.symlink(nas / "2026-12-01", incoming / "2026-12-01")

    def listed(pattern: str) -> list[str]:
        return sorted(os.path.relpath(path, incoming) for _, path in iter_images([f"{incoming}/{pattern}"]))

    assert listed("2026-12-0*") == ["2026-12-01/scan.png", "2026-12-02/scan.png"]
    assert listed("*") == ["2025-01-01/deep/scan.png", "2026-12-01/scan.png", "2026-12-02/scan.png", "loose.png"]
    assert "loose.png" not in listed("*/") and "2026-12-02/scan.png" in listed("*/")
    assert listed("**/scan.png") == ["2025-01-01/deep/scan.png", "2026-12-02/scan.png"]  # links not followed by **
    os.symlink(incoming, incoming / "2026-12-02" / "loop")  # audit: `**` followed a link back up, hidden names too
    assert listed("**") == ["2025-01-01/deep/scan.png", "2026-12-02/scan.png", "loose.png"]
    os.symlink(incoming / "2026-12-02", incoming / "2026-12-03")  # a link to a folder also listed: its real path
    assert listed("2026-12-0*") == ["2026-12-01/scan.png", "2026-12-02/scan.png"]
    entered = []
    real_walk = os.walk

    def walk(top, *args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, *args, **kwargs):
            entered.append(os.path.relpath(dirpath, incoming))
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(os, "walk", walk)
    assert listed("2026-12-02/*.png") == ["2026-12-02/scan.png"]
    assert "2025-01-01" not in entered and ".snapshot" not in entered


def test_a_folder_input_lists_no_hidden_folder_or_file_and_says_how_many(tmp_path, caplog):
    """QA: a folder input walked `.snapshot/hourly.0` (every scan again: counts doubled, each flagged scan twice on
    the worklist) and scored `.tmp-X.jpeg`, a transfer's temporary name, under which the night's worklist named a
    file gone by morning. Hidden names are left as a glob leaves them, and said; a hidden folder named as the input
    is walked."""
    import logging

    from helpers import textured

    root = tmp_path / "incoming"
    for folder in (root / "NORMAL", root / ".snapshot" / "hourly.0" / "NORMAL", root / ".Trash-1000"):
        folder.mkdir(parents=True)
        textured((64, 64), 120).save(folder / "scan.png")
    textured((64, 64), 120).save(root / "NORMAL" / ".tmp-next.png")
    (root / "NORMAL" / "._scan.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a Mac's metadata: not said
    (root / "NORMAL" / ".DS_Store").write_bytes(b"\x00" * 8)  # not an image: not said either
    (root / "NORMAL" / ".IM000001").write_bytes(bytes(128) + b"DICM" + bytes(64))  # DICOM by content: said (QA)
    textured((64, 64), 120).save(root / "NORMAL" / ".next.png.Ab12Cd", format="PNG")  # rsync's temporary name: said
    caplog.set_level(logging.DEBUG, logger="batch_job")
    assert [os.path.relpath(p, root) for _, p in iter_images([str(root)])] == ["NORMAL/scan.png"]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert said == [("INFO", f"2 hidden folder(s) under {root} not entered (a name starting with '.': snapshots, "
                             "trash; --log-level DEBUG names them): name one as --input to score what it holds"),
                    ("WARNING", f"3 hidden image file(s) under {root} not listed (a name starting with '.': files "
                                "still being transferred; --log-level DEBUG names them): name one as --input to score "
                                "it")]  # review: a `.git` beside the scans would have warned every night
    named = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "hidden" in r.getMessage()]
    assert named == [f"hidden folders, not entered: {root / '.Trash-1000'}, {root / '.snapshot'}",
                     f"hidden image files, not listed: {root / 'NORMAL' / '.IM000001'}, "
                     f"{root / 'NORMAL' / '.next.png.Ab12Cd'}, {root / 'NORMAL' / '.tmp-next.png'}"]
    caplog.clear()  # a glob: hidden names inside the folders it matches are said, not those it passes by (QA)
    assert [os.path.relpath(p, root) for _, p in iter_images([f"{root}/N*"])] == ["NORMAL/scan.png"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0].startswith(
        "3 hidden image file(s)")
    assert not [r for r in caplog.records if "hidden folder" in r.getMessage() and r.levelno == logging.INFO]
    caplog.clear()
    assert [os.path.relpath(p, root) for _, p in iter_images([f"{root}/*/*.png"])] == ["NORMAL/scan.png"]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "hidden" in r.getMessage()]
    caplog.clear()
    snapshot = root / ".snapshot" / "hourly.0"
    assert [os.path.relpath(p, snapshot) for _, p in iter_images([str(snapshot)])] == ["NORMAL/scan.png"]
    assert [os.path.basename(p) for _, p in iter_images([str(root / "NORMAL" / ".tmp-next.png")])] == [
        ".tmp-next.png"]  # a file the user names is always a row
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_file_named_as_input_is_a_row_whatever_its_extension(tmp_path, tiny_package, capsys):
    """QA: `--input scan.tif` (or .gif, .jpe) was `scored 0/0`, exit 0: a file the user named vanished without a row.
    Named, it is read by its content: a JPEG named .jpe is scored, a TIFF is an error row that says what it is.
    In a folder too (QA, 2026-12-02: a folder of TIFF exports was a quiet night, exit 0, not a word)."""
    from helpers import textured

    (tmp_path / "in").mkdir()
    textured((64, 64), 120).save(tmp_path / "in" / "scan.tif")
    textured((64, 64), 120).save(tmp_path / "in" / "scan.jpe", format="JPEG")
    tiff = "unsupported image format TIFF (JPEG, PNG and DICOM are read: convert it)"
    for name, status, error in (("scan.tif", "error", tiff), ("scan.jpe", "ok", "")):
        out = tmp_path / f"out-{name}"
        assert main(small_run(str(tmp_path / "in" / name), tiny_package, out)) == 0
        row = read_predictions(str(out))[str(tmp_path / "in" / name)]
        assert (row["status"], row["error"]) == (status, error)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert [os.path.basename(path) for _, path in iter_images([str(tmp_path / "in")])] == ["scan.jpe", "scan.tif"]
    out = tmp_path / "out-folder"
    assert main(small_run(str(tmp_path / "in"), tiny_package, out)) == 0
    rows = read_predictions(str(out))
    assert [(rows[str(tmp_path / "in" / n)]["status"], rows[str(tmp_path / "in" / n)]["error"])
            for n in ("scan.jpe", "scan.tif")] == [("ok", ""), ("error", tiff)] and len(rows) == 2


def test_an_empty_ledger_option_is_refused(labelled_tree, tiny_package, tmp_path, capsys):
    """QA: `--ledger "$LEDGER"` with the variable unset ran without a ledger: every image scored again, nothing
    recorded, and the summary said `0 skipped as already in the ledger`."""
    root, _ = labelled_tree
    assert_one_line_error(capsys, main(small_run(root, tiny_package, tmp_path / "out", "--ledger", "")),
                          "--ledger is empty")
    assert os.listdir(tmp_path) == []


def test_a_uri_that_cannot_be_listed_is_refused(tiny_package, tmp_path, monkeypatch, capsys):
    """QA: an s3:// input without credentials failed with Beam's BeamIOError, exit 1; other schemes were exit 2."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    def no_credentials(patterns):
        raise BeamIOError("List operation failed", {"s3://b/x/": ValueError("Must provide one of client or options")})

    monkeypatch.setattr(FileSystems, "match", staticmethod(no_credentials))
    assert_one_line_error(capsys, main(small_run("s3://b/x", tiny_package, tmp_path / "out")),
                          "cannot list s3://b/x: List operation failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("case", ["no_input", "no_glob_root", "no_images", "model_missing", "model_corrupt",
                                  "unwritable", "bad_threshold"])
def test_job_level_failures_exit_2_and_write_nothing(case, labelled_tree, tiny_package, tmp_path, capsys):
    root, _ = labelled_tree
    args = {"--input": root, "--model": tiny_package, "--output": str(tmp_path / "out")}
    extra = []
    if case == "no_input":
        args["--input"] = str(tmp_path / "nope")
    elif case == "no_glob_root":  # a glob whose folders do not exist is a missing input, not a quiet night
        args["--input"] = str(tmp_path / "nope" / "*" / "*.png")
    elif case == "no_images":  # only with --fail-if-empty: otherwise a quiet night (test_nightly.py)
        (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
        (tmp_path / "empty" / "NORMAL" / "notes.txt").write_text("x")
        args["--input"] = str(tmp_path / "empty")
        extra = ["--fail-if-empty"]
    elif case == "model_missing":
        args["--model"] = str(tmp_path / "serving" / "nothing")
    elif case == "model_corrupt":
        vdir = write_package(str(tmp_path / "serving"))
        data = bytearray(open(os.path.join(vdir, "model.onnx"), "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(os.path.join(vdir, "model.onnx"), "wb").write(bytes(data))
        args["--model"] = vdir
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        args["--output"] = str(tmp_path / "afile" / "out")
    elif case == "bad_threshold":
        extra = ["--threshold", "1.5"]
    argv = [x for kv in args.items() for x in kv] + extra + ["--direct_running_mode=in_memory"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not os.path.exists(tmp_path / "out")
    assert not glob.glob(str(tmp_path / "out.tmp-*"))


def test_lost_shard_fails_reconciliation(labelled_tree, tiny_package, tmp_path, monkeypatch, capsys):
    """A shard that never arrives (as DaskRunner's dropped outputs would) is a job failure, not a gap."""
    root, _ = labelled_tree
    real = shards.write_shard

    def drop_first_shard(out_dir, shard_id, rows):
        if shard_id == 0:
            return None
        return real(out_dir, shard_id, rows)

    monkeypatch.setattr(shards, "write_shard", drop_first_shard)
    out = str(tmp_path / "out")
    rc = main(["--input", root, "--model", tiny_package, "--output", out, "--shard-size", "16",
               "--direct_running_mode=in_memory"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "missing 16" in err
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*")


def test_a_shard_without_its_summary_fails_reconciliation(labelled_tree, tiny_package, tmp_path, monkeypatch,
                                                          capsys):
    from batch_job import shard_result

    root, _ = labelled_tree
    real = shard_result.write

    def lose_first_summary(scratch, shard_id, summary):
        if shard_id:
            real(scratch, shard_id, summary)

    monkeypatch.setattr(shard_result, "write", lose_first_summary)
    out = str(tmp_path / "out")
    rc = main(["--input", root, "--model", tiny_package, "--output", out, "--shard-size", "16",
               "--direct_running_mode=in_memory"])
    assert_one_line_error(capsys, rc, "shard 0 has a CSV but no summary", "not published", code=1)
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*")


def test_temp_dirs_of_jobs_before_the_scratch_folder_are_recognised():
    from batch_job.leftovers import JOB_FILES

    for name in ("scratch", "predictions-00003.csv", "_listing.jsonl", "_ledger-00001.jsonl", "_drift-00002.npz",
                 "_heatmaps-00000.jsonl", ".x.tmp"):
        assert JOB_FILES.match(name), name
    assert not JOB_FILES.match("notes.txt") and not JOB_FILES.match("_listing.jsonl.bak")


def test_a_probability_at_the_threshold_is_flagged_as_positive_count_counts_it():
    """Mutation QA: `>` for `>=` survived; the CSV would say NORMAL where positive_count counts it as flagged."""
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.625)
    assert make_row("/x/a.png", "", spec, 0.625).prediction == "PNEUMONIA"
    assert make_row("/x/b.png", "", spec, 0.625 - 1e-6).prediction == "NORMAL"


def test_report_md_summary_row_has_each_count_in_its_column():
    """Mutation QA: failed and out-of-scope swapped in the summary row passed, the assertion matching the per-input
    row instead."""
    from batch_job.reconcile import Reconciliation
    from batch_job.report import report_markdown
    from helpers import run_result

    counts = Reconciliation(20, 12, 3, 1, 0, 0, 0, [], {"/data": {"found": 20, "scored": 12, "failed": 3,
                                                                  "skipped": 1, "out_of_scope": 4}},
                            np.linspace(0.1, 0.9, 12), [""] * 12, out_of_scope=4)
    text = report_markdown(run_result(counts=counts))
    rows = [line for line in text.splitlines() if line.startswith("| 20 |")]
    assert rows == ["| 20 | 12 | 3 | 4 | 1 | 6 | 0.5000 |"], rows


def test_reconcile_counts_duplicates_and_strays(tmp_path):
    listing = str(tmp_path / shards.LISTING_FILE)
    shards.write_listing(listing, [(0, f"/x/{i}.png", "") for i in range(5)])
    cut = shards.cut_listing(listing, 2)
    assert cut == [(0, 0, 2), (1, cut[1][1], 2), (2, cut[2][1], 1)]
    spec = ScoringSpec("m.onnx", "m/1", {}, 0.5)

    def rows(*paths):
        return [make_row(p, "", spec, 0.5) for p in paths]

    shards.write_shard(str(tmp_path), 0, rows("/x/0.png", "/x/1.png"))
    shards.write_shard(str(tmp_path), 1, rows("/x/2.png", "/x/2.png", "/x/3.png"))
    shards.write_shard(str(tmp_path), 7, rows("/x/4.png"))
    r = reconcile(str(tmp_path), listing, cut, ["/x"])
    assert (r.found, r.scored, r.missing, r.duplicated) == (5, 4, 1, 1)


@pytest.mark.slow
def test_killed_job_leaves_no_output_and_rerun_completes(labelled_tree, tiny_package, tmp_path):
    root, _ = labelled_tree
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "batch_job", "--input", root, "--model", tiny_package, "--output", out,
           "--shard-size", "1", "--batch-size", "1", "--direct_num_workers=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(out + ".tmp-*/predictions-*.csv"):
        time.sleep(0.05)
    assert glob.glob(out + ".tmp-*/predictions-*.csv"), "the job never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    (left,) = glob.glob(out + ".tmp-*")  # the killed run's temp dir is still there (named as README says)...
    assert re.fullmatch(rf"out\.tmp-{proc.pid}@[^/]+-\w+", os.path.basename(left)), left
    proc = subprocess.run(cmd[:-5] + ["--direct_num_workers=1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not glob.glob(out + ".tmp-*")  # ...and the successful rerun removed it
    assert set(read_predictions(out)) == all_image_paths(root)


@pytest.mark.slow
def test_command_line_job_gives_the_in_process_outputs(labelled_tree, tiny_package, tmp_path):
    """The installed `pneumonia-batch` command (= `python -m batch_job`) writes what the in-process job writes."""
    script = os.path.join(os.path.dirname(sys.executable), "pneumonia-batch")
    if not os.path.exists(script):
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    root, _ = labelled_tree
    common = ["--input", root, "--model", tiny_package, "--direct_running_mode=in_memory"]
    cli_out, here_out = str(tmp_path / "cli"), str(tmp_path / "here")
    proc = subprocess.run([script, *common, "--output", cli_out], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.match(rf"scored \d+/{len(all_image_paths(root))} images", proc.stdout) and " INFO listed " in proc.stderr
    assert main([*common, "--output", here_out], started=time.perf_counter() - 50) == 0
    assert json.load(open(os.path.join(here_out, "metrics.json")))["timings"]["setup_seconds"] >= 50
    volatile = ("timings", "wall_seconds", "images_per_second", "run_id")
    cli, here = (json.load(open(os.path.join(d, "metrics.json"))) for d in (cli_out, here_out))
    assert {k: v for k, v in cli.items() if k not in volatile} == {k: v for k, v in here.items() if k not in volatile}
    assert read_predictions(cli_out) == read_predictions(here_out)
    assert cli["accuracy"] is not None and os.path.getsize(os.path.join(cli_out, "histogram.png")) > 1000


@pytest.mark.slow
def test_ctrl_c_stops_the_job_with_one_line_and_nothing_published(tmp_path):
    root = str(tmp_path / "in")
    make_tree(root, per_class=150, size=256, seed=1)  # 300 images, one per work unit: a job of several seconds
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "batch_job", "--input", root, "--model", os.path.join(REPO, "serving_models",
           "pneumonia"), "--output", out, "--shard-size", "1", "--batch-size", "1",
           "--direct_running_mode=multi_threading"]  # the default on up to 4 cores, whatever this machine has
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(out + ".tmp-*/predictions-*.csv"):
        time.sleep(0.05)
    assert glob.glob(out + ".tmp-*/predictions-*.csv"), "the job never started writing"
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    # the job's line, once (worker threads still running may log their failures on the removed temp dir)
    assert err.splitlines().count("error: interrupted; nothing published") == 1, err[-3000:]
    assert stdout == ""
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*")


# ------------------------------------------------------------------ OUT_DIR, inputs and ledger stay apart

def snapshot(folder: str) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("case", ["output_is_input", "output_inside_input", "input_inside_output",
                                  "output_is_a_link_to_input", "output_inside_glob_root", "ledger_inside_input",
                                  "ledger_inside_output", "input_is_a_file_in_output"])
def test_output_and_ledger_never_overlap_an_input(case, tiny_package, tmp_path, capsys):
    """Refused before anything is read or written: exit 2, one line, every file as it was, nothing created."""
    data = tmp_path / "data"
    make_tree(str(data / "in"), per_class=2, size=64, seed=6)
    inp, out, ledger = str(data / "in"), str(tmp_path / "scores"), None
    if case == "output_is_input":
        out = inp
    elif case == "output_inside_input":
        out = os.path.join(inp, "scores")
    elif case == "input_inside_output":
        out = str(data)
    elif case == "output_is_a_link_to_input":
        os.symlink(inp, tmp_path / "link")
        out = str(tmp_path / "link")
    elif case == "output_inside_glob_root":
        inp, out = str(data / "*" / "NORMAL" / "*.jpeg"), str(data / "scores")
    elif case == "ledger_inside_input":
        ledger = os.path.join(inp, "ledger.sqlite")
    elif case == "ledger_inside_output":
        ledger = os.path.join(out, "ledger.sqlite")
    elif case == "input_is_a_file_in_output":
        inp, out = glob.glob(str(data / "in" / "NORMAL" / "*"))[0], str(data / "in")
    before, listing = snapshot(str(tmp_path)), sorted(os.listdir(tmp_path))
    argv = ["--input", inp, "--model", tiny_package, "--output", out, "--overwrite", "--direct_running_mode=in_memory"]
    line = assert_one_line_error(capsys, main(argv + (["--ledger", ledger] if ledger else [])))
    assert ("overlap" if ledger is None else "lies inside") in line
    assert snapshot(str(tmp_path)) == before and sorted(os.listdir(tmp_path)) == listing


def test_an_output_inside_the_model_package_is_refused_when_the_model_is_named_by_a_symlink(tiny_package, tmp_path,
                                                                                           capsys):
    """QA: --model given as a symlink to a version folder let OUT_DIR be written inside the real serving folder
    (the same command naming the real path was refused)."""
    from xray_core.package import resolve_version_dir

    version = resolve_version_dir(tiny_package)
    os.symlink(version, tmp_path / "link")
    make_tree(str(tmp_path / "in"), per_class=2, size=64, seed=6)
    out = os.path.join(os.path.dirname(version), "scores")  # inside <serving>/<name>, beside the versions
    line = assert_one_line_error(capsys, main(["--input", str(tmp_path / "in"), "--model", str(tmp_path / "link"),
                                               "--output", out, "--direct_running_mode=in_memory"]))
    assert "overlap" in line and not os.path.exists(out)


# ----------------------------------------------------------------------- arguments, refusals, vanished inputs

def test_parked_output_is_restored_before_the_emptiness_check(labelled_tree, tiny_package, tmp_path, capsys):
    """An OUT_DIR parked by an --overwrite of ours killed between its two renames (its lock file free) comes
    back first; the job then refuses at once (exit 2), instead of scoring everything and failing at publish."""
    root, _ = labelled_tree
    out = tmp_path / "out"
    parked = tmp_path / "out.old-x1y2z3ab" / "old"  # as xray_core.files.publish_dir names it
    parked.mkdir(parents=True)
    hold_lock(str(parked.parent)).close()  # the killed job's lock file, no longer held
    (parked / "predictions-00000.csv").write_text("last night's\n")
    assert not out.exists()
    rc = main(["--input", root, "--model", tiny_package, "--output", str(out), "--direct_running_mode=in_memory"])
    assert_one_line_error(capsys, rc, "not empty")
    assert (out / "predictions-00000.csv").read_text() == "last night's\n"  # restored, untouched
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no parked dir, no temp dir


def test_model_sessions_per_worker_are_bounded(tmp_path):
    """A long-lived worker that sees one model version after another keeps only the last few sessions."""
    import gc
    import weakref

    from batch_job.scoring import get_session

    paths = [os.path.join(write_package(str(tmp_path / "serving"), version=v), "model.onnx") for v in range(1, 9)]
    first = get_session(paths[0], 1)
    assert get_session(paths[0], 1) is first  # reused while in use
    refs = [weakref.ref(get_session(p, 1)) for p in paths]
    del first
    gc.collect()
    alive = [r() is not None for r in refs]
    assert alive[-1] and sum(alive) <= 4, alive


def test_uri_inputs_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    """The 1 GiB limit applies to URI inputs too (read through Beam's FileSystems, here a test scheme)."""
    from apache_beam.io.localfilesystem import LocalFileSystem

    from batch_job import scoring
    from xray_core.preprocessing import ImageError

    class PrefixFileSystem(LocalFileSystem):  # testfs:///x is the local file /x
        @classmethod
        def scheme(cls):
            return "testfs"

        def open(self, path, *args, **kwargs):
            return super().open(path[len("testfs://"):], *args, **kwargs)

    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"x" * 101)
    monkeypatch.setattr(scoring, "MAX_FILE_BYTES", 100)
    assert scoring.read_input(f"testfs://{small}") == b"x" * 100
    with pytest.raises(ImageError, match="file too large"):
        scoring.read_input(f"testfs://{big}")
    with pytest.raises(ImageError, match="file too large"):
        scoring.read_input(str(big))  # as for local files


# --------------------------------------------------------------------------- refusals and one-line errors
def small_run(inp: str, model: str, out, *extra: str) -> list[str]:
    return ["--input", inp, "--model", model, "--output", str(out), *extra, "--direct_running_mode=in_memory"]


@pytest.mark.parametrize("extra", [["stray"], ["--treshold", "0.99"], ["--direct_num_workrs=2"]])
def test_arguments_neither_the_job_nor_beam_knows_are_refused(extra, tiny_package, tmp_path, capsys):
    """Review defect 3: `--input a b --treshold 0.99` scored only `a` at the default threshold, exit 0."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    argv = ["--input", str(inp), *extra, "--model", tiny_package, "--output", str(tmp_path / "out"),
            "--direct_running_mode=in_memory"]
    assert_one_line_error(capsys, main(argv), "unrecognized arguments", extra[0])
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("case", ["empty", "working_dir", "holds_working_dir", "link_to_empty_folder", "file",
                                  "name_too_long", "path_too_long"])
def test_an_output_the_job_cannot_replace_is_refused_before_anything_is_written(case, tiny_package, tmp_path,
                                                                                monkeypatch, capsys):
    """QA defects: `--output ""` (an unset variable) with --overwrite replaced the working directory, and `--output .`
    published there, then both failed with a traceback and exit 1; a link to an empty folder was scored, then failed;
    --overwrite replaced a file named as --output; a refused --output left the parent folders it had created."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sentinel.txt").write_text("keep")
    os.mkdir(tmp_path / "empty")
    os.symlink(tmp_path / "empty", work / "link")
    monkeypatch.chdir(work / "sub" if case == "holds_working_dir" else work)
    out, fragment = {"empty": ("", "--output is empty"), "working_dir": (".", "current directory"),
                     "holds_working_dir": ("..", "current directory"),
                     "link_to_empty_folder": ("link", "symbolic link"),
                     "file": ("sentinel.txt", "not a folder"),
                     "name_too_long": (os.path.join("new", "a", "x" * 300), "not writable"),
                     "path_too_long": (os.path.join(*["y" * 250] * 20), "output dir")}[case]  # over PATH_MAX
    before = snapshot(str(tmp_path))
    folders = sorted(d for d, _, _ in os.walk(tmp_path))
    assert_one_line_error(capsys, main(small_run(str(inp), tiny_package, out, "--overwrite")), fragment)
    assert snapshot(str(tmp_path)) == before and sorted(d for d, _, _ in os.walk(tmp_path)) == folders
    assert os.path.islink(work / "link")


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions hold: nothing for a user, setpriv without the capabilities that
    let root ignore them for root (CI runs as root)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.slow
@pytest.mark.parametrize("locked", ["out", "out/heatmaps"])
def test_an_output_dir_it_may_not_delete_is_refused_before_any_work(locked, tiny_package, tmp_path):
    """QA: --overwrite of an OUT_DIR whose folder (or a folder in it) the user may not write scored the whole night,
    then failed to move it aside (exit 1, nothing published)."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    (tmp_path / "out" / "heatmaps").mkdir(parents=True)
    (tmp_path / "out" / "heatmaps" / "old.png").write_bytes(b"last night")
    os.chmod(tmp_path / locked, 0o555)
    try:
        proc = subprocess.run([*_without_root_powers(), sys.executable, "-m", "batch_job",
                               *small_run(str(inp), tiny_package, tmp_path / "out", "--overwrite")],
                              capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__))))
    finally:
        os.chmod(tmp_path / locked, 0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: output dir {tmp_path / 'out'} cannot be replaced: this user may not delete what {tmp_path / locked} "
        "holds (it needs read, write and search permission there)")
    assert "listed" not in proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert (tmp_path / "out" / "heatmaps" / "old.png").read_bytes() == b"last night"


@pytest.mark.parametrize("seen_by", ["ismount", "mountinfo"])
def test_an_output_dir_holding_a_mount_point_is_not_overwritten(seen_by, tiny_package, tmp_path, capsys,
                                                                monkeypatch):
    """QA: --overwrite of an OUT_DIR with a filesystem mounted inside deleted that filesystem's files, then left the
    folder parked beside OUT_DIR for good, with exit 0; so did a bind mount of a folder of the same filesystem, which
    os.path.ismount does not see (QA, the same day: a user's file outside OUT_DIR deleted). The mount is simulated:
    os.path.ismount says so of it, or /proc/self/mountinfo lists it (batch_job.outdir.mount_points)."""
    from batch_job import outdir

    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    (tmp_path / "out" / "mnt").mkdir(parents=True)
    (tmp_path / "out" / "mnt" / "other.txt").write_text("another filesystem's")
    mounted = str(tmp_path / "out" / "mnt")
    real = os.path.ismount
    if seen_by == "ismount":
        monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == mounted or real(path))
    else:
        monkeypatch.setattr(outdir, "mount_points", lambda: {"/", os.path.realpath(mounted)})
    before = snapshot(str(tmp_path / "out"))
    assert_one_line_error(capsys, main(small_run(str(inp), tiny_package, tmp_path / "out", "--overwrite")),
                          f"output dir {tmp_path / 'out'} cannot be replaced: {mounted} is a mount point: the job "
                          "never deletes another filesystem's files")
    assert snapshot(str(tmp_path / "out")) == before and sorted(os.listdir(tmp_path)) == ["in", "out"]


@pytest.mark.parametrize("name, fragment", [("NoSuchRunner", "Unexpected pipeline runner"),
                                            ("os.Nothing", "AttributeError"), ("builtins.int", "AttributeError")])
def test_an_unknown_runner_is_refused_before_any_work(name, fragment, tiny_package, tmp_path, capsys):
    """QA defect: `--runner NoSuchRunner` listed the inputs, then failed in Beam with exit 1 (review: so did a
    misspelt class of a real module, or a class that is no runner)."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    argv = ["--input", str(inp), "--model", tiny_package, "--output", str(tmp_path / "out"), "--runner", name]
    assert_one_line_error(capsys, main(argv), f"--runner {name}", fragment)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_resolving_another_runner_leaves_no_temp_folder(tmp_path, monkeypatch):
    """Review: the Pipeline built to resolve a runner by name made a temp folder that only run() removes."""
    import tempfile

    from batch_job.runner import choose_runner

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = choose_runner(["--runner", "PortableRunner"])
    assert type(runner.runner).__name__ == "PortableRunner" and os.listdir(tmp_path) == []


def test_beam_options_still_pass_through(monkeypatch):
    from batch_job import runner
    from batch_job.dask_probe import SchedulerCheck
    from batch_job.runner import beam_leftovers, choose_runner

    probed = []
    monkeypatch.setattr(runner, "check_scheduler",  # none at h:8786 (test_dask_probe)
                        lambda *a: probed.append(a) or SchedulerCheck(2))

    assert beam_leftovers(["--runner=DirectRunner", "--job_name", "j", "--experiments=a", "--experiments=b",
                           "--direct_num_workers", "2", "--save_main_session"]) == []
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = choose_runner(["--runner", "DaskRunner", "--dask_client_address=tcp://h:8786", "--dask_npartitions=3"])
    assert (dask.options.view_as(DaskOptions).address, dask.options.view_as(DaskOptions).npartitions) == (
        "tcp://h:8786", 3)
    assert probed == [("tcp://h:8786", None, None)]  # checked before anything is listed (no timeout given: 30 s)


def test_zero_direct_workers_means_one_per_core(tiny_package, tmp_path):
    """Review defect 4: --direct_num_workers=0 (Beam: all cores) divided by zero."""
    from batch_job.runner import choose_runner, default_workers

    assert choose_runner(["--direct_num_workers=0"]).workers == default_workers()
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    assert main(["--input", str(inp), "--model", tiny_package, "--output", str(tmp_path / "out"),
                 "--direct_num_workers=0"]) == 0
    assert len(read_predictions(str(tmp_path / "out"))) == 4


def test_an_input_gone_when_listing_starts_is_refused(tiny_package, tmp_path, monkeypatch, capsys):
    """Review defect 7: 'RuntimeError: generator raised StopIteration', exit 1."""
    from batch_job import pipeline
    from batch_job.errors import InputError

    gone = str(tmp_path / "gone")
    for arg in (gone, os.path.join(gone, "*.png")):  # a glob's folder gone too: not a quiet night
        with pytest.raises(InputError, match="input path not found"):
            list(iter_images([arg]))
    monkeypatch.setattr(pipeline, "check_inputs", lambda *a: None)  # as if removed just after the check
    for arg in (gone, os.path.join(gone, "*.png")):
        assert_one_line_error(capsys, main(small_run(arg, tiny_package, tmp_path / "out")), "input path not found")
        assert os.listdir(tmp_path) == []


def permission_denied(monkeypatch, folders=(), files=()) -> None:
    """Listing these folders and opening these files fails as for a user without the right (the tests may run as
    root, whom permissions do not stop)."""
    import builtins

    folders, files = {os.fspath(f) for f in folders}, {os.fspath(f) for f in files}
    real_scandir, real_open = os.scandir, builtins.open

    def refused(path, names) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path) in names

    def scandir(path="."):
        if refused(path, folders):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def opener(file, *args, **kwargs):
        if refused(file, files):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", opener)


def test_what_the_job_cannot_read_is_a_row_not_a_silence(tiny_package, tmp_path, monkeypatch, capsys):
    """QA defect: a subfolder the job's user could not list, and an extension-less file it could not open (a DICOM
    named by its UID, say), were left out without a word: no row, exit 0, every night. An unlistable --input was a
    quiet night. Now the folder and the file each get an error row, and an unlistable --input is refused. (The
    tests may run as root, whom permissions do not stop: the system's refusals are simulated.)"""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    locked, sealed = inp / "locked", inp / "b" / "1.2.840.99.1"
    make_tree(str(locked), per_class=1, size=64, seed=5)
    sealed.parent.mkdir()
    sealed.write_bytes(b"\0" * 200)
    permission_denied(monkeypatch, folders=[locked, tmp_path / "in2"], files=[sealed])
    assert main(small_run(str(inp), tiny_package, tmp_path / "out")) == 0
    rows = read_predictions(str(tmp_path / "out"))
    assert rows[str(locked)]["status"] == "error"
    assert rows[str(locked)]["error"] == ("folder could not be listed (permission denied): the images in it were "
                                          "not scored")
    assert (rows[str(sealed)]["status"], rows[str(sealed)]["error"]) == ("error", "permission denied")
    assert sum(r["status"] == "ok" for r in rows.values()) == 4 and len(rows) == 6
    (tmp_path / "in2").mkdir()
    assert_one_line_error(capsys, main(small_run(str(tmp_path / "in2"), tiny_package, tmp_path / "out2")),
                          f"input folder cannot be listed: {tmp_path / 'in2'}: Permission denied")
    assert not (tmp_path / "out2").exists()
    os.mkfifo(tmp_path / "pipe")  # named as an input: refused as what it is, not "not found"
    assert_one_line_error(capsys, main(small_run(str(tmp_path / "pipe"), tiny_package, tmp_path / "out3")),
                          f"input is neither a folder nor a regular file: {tmp_path / 'pipe'}")
    assert not (tmp_path / "out3").exists()


def test_an_unlistable_folder_is_a_row_only_where_inputs_could_be(tmp_path, monkeypatch):
    """Review defects: a glob's walk reported every folder it could not list, also those the pattern can never
    match, and a mount root's lost+found (root's alone) would have been an error row every night. Training and
    calibration still leave unreadable files out (their folders are curated; a training example must be read)."""
    from batch_job.listing import may_hold
    from xray_core.input_files import is_input_file

    assert may_hold("/d/PNEUMONIA*/*.png", "/d/PNEUMONIA_2")
    assert not may_hold("/d/PNEUMONIA*/*.png", "/d/private")
    assert not may_hold("/d/PNEUMONIA*/*.png", "/d/PNEUMONIA_2/deeper")  # `*` stays within a folder
    assert may_hold("/d/**/x/*.dcm", "/d/a/b/c") and may_hold("/d/*/*.dcm", "/d/any")
    assert not may_hold("/d/*", "/d/.Trash-1000") and not may_hold("/d/*/*.png", "/d/.snapshot")  # hidden (review)
    assert may_hold("/d/[^a]*/x.png", "/d/bcd") and not may_hold("/d/[^a]*/x.png", "/d/abc")  # as glob_regex
    root = tmp_path / "d"
    for name in ("PNEUMONIA_1", "PNEUMONIA_2", "private", "lost+found"):
        (root / name).mkdir(parents=True)
    (root / "PNEUMONIA_1" / "a.png").write_bytes(b"x")
    sealed = root / "PNEUMONIA_1" / "1.2.3"
    sealed.write_bytes(b"\0" * 200)
    permission_denied(monkeypatch, folders=[root / n for n in ("PNEUMONIA_2", "private", "lost+found")],
                      files=[sealed])
    assert [p for _, p in iter_images([str(root / "PNEUMONIA*" / "*.png")])] == [
        str(root / "PNEUMONIA_1" / "a.png"), str(root / "PNEUMONIA_2")]
    assert [p for _, p in iter_images([str(root)])] == [
        str(root / "PNEUMONIA_1" / "1.2.3"), str(root / "PNEUMONIA_1" / "a.png"), str(root / "PNEUMONIA_2"),
        str(root / "private")]  # lost+found left out
    assert is_input_file(str(sealed), unreadable=True) and not is_input_file(str(sealed))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_that_publishes_nothing_leaves_no_new_ledger(stop, tiny_package, tmp_path, monkeypatch, capsys):
    """QA finding: a run stopped (Ctrl-C, SIGTERM) or failed after it had created its ledger left an empty ledger
    behind, although it published nothing; a ledger that existed before stays as it was."""
    from batch_job import pipeline

    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    ledger = tmp_path / "books" / "ledger.sqlite"
    assert main(small_run(str(inp), tiny_package, tmp_path / "night1", "--ledger", str(ledger))) == 0
    used, kept = ledger.read_bytes(), sorted(os.listdir(tmp_path / "books"))

    def broken(*args, **kwargs):
        raise stop("stopped while scoring")

    monkeypatch.setattr(pipeline, "score", broken)
    code = {KeyboardInterrupt: 130, RuntimeError: 1}[stop]
    fresh = tmp_path / "new" / "ledger.sqlite"
    assert main(small_run(str(inp), tiny_package, tmp_path / "night2", "--ledger", str(fresh))) == code
    assert not (tmp_path / "new").exists() and not (tmp_path / "night2").exists()
    assert main(small_run(str(inp), tiny_package, tmp_path / "night3", "--ledger", str(ledger))) == code
    assert ledger.read_bytes() == used and sorted(os.listdir(tmp_path / "books")) == kept


def test_errors_are_one_line_whatever_the_paths_hold(tiny_package, tmp_path, capsys):
    """Review nit: a JobError's message was printed as it was; a path with a newline made two lines."""
    missing = str(tmp_path / "no\nsuch")
    assert_one_line_error(capsys, main(small_run(missing, tiny_package, tmp_path / "out")), "input path not found")


def test_folders_named_like_the_jobs_own_but_not_made_by_it_are_never_touched(tiny_package, tmp_path):
    """Review defect 1: `<OUT>.old-*` folders of the user's (one of them the input) were deleted, and an
    `old/` in one became OUT_DIR. Only exact names with the job's free lock file and nothing else are ours."""
    jan = tmp_path / "scores.old-jan"
    make_tree(str(jan), per_class=2, size=64, seed=3)
    (tmp_path / "scores.old-2024").mkdir()
    (tmp_path / "scores.old-20240101" / "old").mkdir(parents=True)  # a parked folder's exact name and shape
    (tmp_path / "scores.old-20240101" / "old" / "notes.txt").write_text("mine")
    (tmp_path / "scores.tmp-1@elsewhere-abcd1234").mkdir()  # a temp dir's exact name, without the lock file
    (tmp_path / "scores.tmp-1@elsewhere-abcd1234" / "predictions-00000.csv").write_text("mine")
    before, names = snapshot(str(tmp_path)), sorted(os.listdir(tmp_path))
    assert main(small_run(str(jan), tiny_package, tmp_path / "scores")) == 0
    assert len(read_predictions(str(tmp_path / "scores"))) == 4
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["scores"])
    assert {k: v for k, v in snapshot(str(tmp_path)).items() if not k.startswith("scores/")} == before


@pytest.mark.parametrize("kind", ["alive", "not_ours", "more_than_ours"])
def test_a_parked_output_is_restored_only_when_its_job_is_gone(kind, tiny_package, tmp_path):
    """Review defect 1: a concurrent job could 'restore' another job's OUT_DIR parked mid-publish. Restored
    only with the job's lock file there and free (its job is dead), and nothing else in the parked folder."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    trash = tmp_path / "out.old-abcd1234"
    (trash / "old").mkdir(parents=True)
    (trash / "old" / "predictions-00000.csv").write_text("last night's\n")
    lock = None
    if kind == "alive":
        lock = hold_lock(str(trash))  # the job publishing it is still running
    elif kind == "more_than_ours":
        hold_lock(str(trash)).close()
        (trash / "notes.txt").write_text("mine")
    before = snapshot(str(trash))
    try:
        assert main(small_run(str(inp), tiny_package, tmp_path / "out")) == 0  # OUT_DIR was free: published
    finally:
        if lock is not None:
            lock.close()
    assert snapshot(str(trash)) == before
    assert len(read_predictions(str(tmp_path / "out"))) == 4


@pytest.mark.parametrize("name", ["out.old-abcd1234", "out.tmp-12@host-abcd1234", "yesterday.tmp-12@host-abcd1234"])
def test_an_input_inside_a_folder_the_job_keeps_beside_its_output_is_refused(name, tiny_package, tmp_path, capsys):
    """Review defect 1: the cleanup must never reach an input: one in a folder named like the job's temp folders
    (for any OUT_DIR in the same parent) or this OUT_DIR's parked folders is refused before anything is written."""
    inp = tmp_path / name / "old"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    before = snapshot(str(tmp_path))
    assert_one_line_error(capsys, main(small_run(str(inp), tiny_package, tmp_path / "out")), "temporary or parked")
    assert snapshot(str(tmp_path)) == before and sorted(os.listdir(tmp_path)) == [name]


def test_overlap_is_found_by_file_identity(tiny_package, tmp_path, monkeypatch):
    """Review defect 5: a bind mount or another letter case on a case-insensitive file system names the same
    folder by another path, which real paths do not reveal; (st_dev, st_ino) of the existing ancestors do.
    Simulated: real paths left unresolved, so the link below is such a second name."""
    from batch_job import outdir
    from batch_job.errors import InputError

    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    os.symlink(inp, tmp_path / "alias")
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    package = os.path.dirname(tiny_package)
    with pytest.raises(InputError, match="overlap"):
        outdir.refuse_overlaps([str(inp)], str(tmp_path / "alias" / "scores"), None, package)
    with pytest.raises(InputError, match="overlap"):
        outdir.refuse_overlaps([str(tmp_path / "alias" / "NORMAL")], str(inp), None, package)
    with pytest.raises(InputError, match="lies inside"):
        outdir.refuse_overlaps([str(inp)], str(tmp_path / "out"), str(tmp_path / "alias" / "l.sqlite"), package)
    outdir.refuse_overlaps([str(inp)], str(tmp_path / "out"), str(tmp_path / "l.sqlite"), package)  # apart


def test_output_on_a_bind_mount_of_the_input_is_refused(tiny_package, tmp_path):
    """Review defect 5, for real where this machine lets an unprivileged user namespace bind-mount."""
    import shlex
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces with mounts here")
    inp, mnt = tmp_path / "in", tmp_path / "mnt"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    mnt.mkdir()
    before = snapshot(str(inp))
    job = shlex.join([sys.executable, "-m", "batch_job", *small_run(str(inp), tiny_package, mnt / "scores")])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {shlex.quote(str(inp))} "
                           f"{shlex.quote(str(mnt))} && {job}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "overlap" in proc.stderr, proc.stderr[-2000:]
    assert snapshot(str(inp)) == before and not os.path.exists(inp / "scores")


@pytest.mark.parametrize("where", ["package", "version", "serving"])
def test_output_never_overlaps_the_model(where, tmp_path, capsys):
    """Review nit: `--output serving_models/pneumonia --overwrite` replaced the model's folder."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    version = write_package(str(tmp_path / "serving"))
    out = {"package": os.path.dirname(version), "version": version, "serving": str(tmp_path / "serving")}[where]
    before = snapshot(str(tmp_path))
    line = assert_one_line_error(capsys, main(small_run(str(inp), version, out, "--overwrite")), "overlap")
    assert "--model" in line and snapshot(str(tmp_path)) == before


# ------------------------------------------------------------------ --help, --log-level

def test_help_lists_exit_codes_runners_beam_options_and_log_level(capsys):
    from batch_job.cli import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    codes = [line.split()[0] for line in text.split("exit codes:")[1].splitlines() if re.match(r"  \d", line)]
    assert codes == ["0", "1", "2", "3", "4", "130", "143"]
    assert "runners (--runner):" in text and "DirectRunner" in text and "DaskRunner" in text
    assert "Beam pipeline options:" in text and "untouched" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text and "PNEUMONIA_MODEL" in text


@pytest.mark.parametrize("level, shown", [("warning", False), ("INFO", True)])
def test_log_level_sets_the_jobs_own_lines(level, shown, tiny_package, tmp_path, job_log):
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    assert main(["--input", str(inp), "--model", tiny_package, "--output", str(tmp_path / "out"),
                 "--direct_running_mode=in_memory", "--log-level", level]) == 0
    assert ("listed 4 images" in job_log.text) is shown


# ------------------------------------------------------------------ which model: --model, $PNEUMONIA_MODEL, shipped

def test_without_model_the_job_uses_the_environment_then_the_shipped_model(tiny_package, tmp_path, monkeypatch,
                                                                            capsys):
    from batch_job.model import MODEL_ENV

    inp = tmp_path / "in"
    make_tree(str(inp), per_class=2, size=64, seed=4)
    common = ["--input", str(inp), "--direct_running_mode=in_memory"]

    def model_of(out) -> str:
        return json.load(open(os.path.join(out, "metrics.json")))["model"]

    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert main(common + ["--output", str(tmp_path / "shipped")]) == 0
    assert model_of(tmp_path / "shipped") == "pneumonia/9"  # the newest shipped version
    monkeypatch.setenv(MODEL_ENV, tiny_package)
    assert main(common + ["--output", str(tmp_path / "env")]) == 0
    assert model_of(tmp_path / "env") == "pneumonia/1"
    onnx_file = os.path.join(REPO, "serving_models", "pneumonia", "2", "model.onnx")
    assert main(common + ["--output", str(tmp_path / "file"), "--model", onnx_file]) == 0  # --model wins
    assert model_of(tmp_path / "file") == "pneumonia/2"
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    assert_one_line_error(capsys, main(common + ["--output", str(tmp_path / "bad")]),
                          "no --model given and $PNEUMONIA_MODEL cannot be used: model not found: ")
    assert not os.path.exists(tmp_path / "bad")


def test_one_label_reads_n_a_where_undefined_and_the_summary_lists_every_figure(tiny_package, tmp_path, capsys):
    """QA defects: a folder of NORMAL scans printed "recall 0.0000" (undefined without a PNEUMONIA image) beside ROC
    AUC n/a; and the summary's "outputs in" left out confusion.png and roc.png, which were written."""
    normal = tmp_path / "in" / "NORMAL"
    normal.mkdir(parents=True)
    make_tree(str(tmp_path / "both"), per_class=6, size=64, seed=5)
    for path in (tmp_path / "both" / "NORMAL").iterdir():
        shutil.copy(path, normal / path.name)
    for folder, figures in ((tmp_path / "in", ["confusion.png"]), (tmp_path / "both", ["confusion.png", "roc.png"])):
        out = str(tmp_path / f"out_{folder.name}")
        assert main(["--input", str(folder), "--model", tiny_package, "--output", out,
                     "--direct_running_mode=in_memory"]) == 0
        said = capsys.readouterr().out
        listed = said.split("outputs in ", 1)[1]
        m = json.load(open(os.path.join(out, "metrics.json")))
        for name in ("confusion.png", "roc.png"):
            assert (name in listed) == (name in figures) == os.path.exists(os.path.join(out, name)), name
        if folder.name == "in":
            assert m["recall"] is None and m["roc_auc"] is None and m["specificity"] is not None
            assert "recall n/a" in said and "recall 0.0000" not in said
        else:
            assert m["recall"] is not None and m["roc_auc"] is not None


@pytest.mark.slow
def test_a_local_dask_runner_logs_no_info_lines_at_warning(tiny_package, tmp_path):
    """QA defect: a DaskRunner without a scheduler address (Beam starts a local cluster) printed 33 INFO lines of
    dask.distributed's scheduler, nanny and workers at `--log-level WARNING`; the docs say Beam and Dask log
    warnings and errors."""
    make_tree(str(tmp_path / "in"), per_class=3, size=64, seed=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    done = subprocess.run([sys.executable, "-m", "batch_job", "--input", str(tmp_path / "in"), "--model", tiny_package,
                           "--output", str(tmp_path / "o"), "--runner", "DaskRunner", "--log-level", "WARNING"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("scored 6/6 images")
    assert [line for line in done.stderr.splitlines() if " INFO " in line or "INFO - " in line] == []


def test_an_output_disk_full_at_the_start_is_exit_2_and_leaves_nothing(small_tree_for_full, tmp_path, monkeypatch,
                                                                       capsys):
    """QA defect: OUT_DIR's disk already full gave exit 1 "job failed (OSError): [Errno 39] Directory not empty" and
    left `<out>.tmp-*` holding a staged lock file for good: closing the lock file (a flush) failed as its write had,
    and its removal was skipped."""
    import errno

    from xray_core import files

    real_open = open

    class Full:  # a full disk for the lock file only
        def __new__(cls, path, mode="r", *args, **kwargs):
            if files.LOCK_FILE not in os.path.basename(path):
                return real_open(path, mode, *args, **kwargs)
            return super().__new__(cls)

        def __init__(self, path, mode="r", *args, **kwargs):
            self.f = real_open(path, mode)

        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        close = flush

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(files, "open", Full, raising=False)
    parent = tmp_path / "scores"
    rc = main(["--input", small_tree_for_full, "--model", write_package(str(tmp_path / "serving")), "--output",
               str(parent / "night1"), "--direct_running_mode=in_memory"])
    assert rc == 2
    assert capsys.readouterr().err.strip().endswith("is not writable: No space left on device")
    assert not parent.exists()


@pytest.fixture()
def small_tree_for_full(tmp_path):
    make_tree(str(tmp_path / "in"), per_class=2, size=48, seed=1)
    return str(tmp_path / "in")


def test_a_failed_job_removes_the_parent_folder_it_made(small_tree_for_full, tiny_package, tmp_path, monkeypatch,
                                                        capsys):
    """QA defect: a job that failed after it had started (exit 1) left the empty parent folder of OUT_DIR it had
    made; one that was there before stays."""
    from batch_job import pipeline

    def failing(*args):
        raise RuntimeError("drift check failed")

    monkeypatch.setattr(pipeline, "check_drift", failing)
    for parent in (tmp_path / "new" / "scores", tmp_path / "kept"):
        if parent.name == "kept":
            parent.mkdir()
        assert main(["--input", small_tree_for_full, "--model", tiny_package, "--output", str(parent / "night"),
                     "--direct_running_mode=in_memory"]) == 1
        assert "drift check failed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in", "kept"] and os.listdir(tmp_path / "kept") == []


def test_a_full_disk_in_a_worker_names_where_the_outputs_are_written(small_tree_for_full, tiny_package, tmp_path,
                                                                     monkeypatch, capsys):
    """QA defect: OUT_DIR's disk filling while the workers wrote their shards ended in "job failed (RuntimeError):
    RuntimeError: OSError: [Errno 28] No space left on device [while running 'DecodeScoreWrite']", which does not
    say which disk."""
    import errno

    from batch_job import shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_shard", full)
    out = tmp_path / "scores" / "night"
    assert main(["--input", small_tree_for_full, "--model", tiny_package, "--output", str(out),
                 "--direct_running_mode=in_memory"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: job failed (") and "No space left on device" in line
    assert line.endswith(f"; the outputs are written in {out.parent} (OUT_DIR's parent) before they are published: "
                         "if that disk is full, free space there and rerun; nothing published")
    assert not (tmp_path / "scores").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_dir_that_is_a_mount_point_is_refused_before_scoring(small_tree_for_full, tiny_package, tmp_path,
                                                                       monkeypatch, capsys, overwrite):
    """QA defect: an OUT_DIR that is a mount point (an empty volume mounted there) failed only after the whole night
    was scored, exit 1 "[Errno 16] Device or resource busy"; it cannot be renamed into place or replaced."""
    from batch_job import outdir

    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(outdir.os.path, "ismount", lambda path: os.path.abspath(path) == str(out))
    rc = main(["--input", small_tree_for_full, "--model", tiny_package, "--output", str(out),
               "--direct_running_mode=in_memory", *(["--overwrite"] if overwrite else [])])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (f"error: output dir {out} is a mount point; the job replaces OUT_DIR "
                                                "as a whole by renaming: name a folder inside it")
    assert sorted(os.listdir(tmp_path)) == ["in", "volume"] and os.listdir(out) == []


@pytest.mark.slow
def test_a_worker_failure_is_one_line_on_stderr(tmp_path, tiny_package):
    """QA: one full disk in a worker printed 444 lines with 16 tracebacks at --log-level WARNING, most of them
    Beam's ERROR log lines repeating the failure the job states in its last line; then still ~100 lines: the
    traceback Beam's SDK harness prints on stderr itself, which in DirectRunner's worker threads was the job's own
    stderr (and may name files). Only the job's line now (ERROR: the tiny package's no-gate warning aside); --log-level
    DEBUG keeps the traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import errno\nfrom batch_job import shards\n\n\ndef full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n\n\nshards.write_shard = full\n")
    make_tree(str(tmp_path / "in"), per_class=3, size=64, seed=2)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}

    def job(level: str, out: str):
        return subprocess.run([sys.executable, "-m", "batch_job", "--input", str(tmp_path / "in"), "--model",
                               tiny_package, "--output", str(tmp_path / out), "--log-level", level,
                               "--direct_running_mode=multi_threading", "--direct_num_workers=2"],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=300)

    done = job("ERROR", "o")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: job failed (RuntimeError): OSError: [Errno 28] No space left on device")
    assert line.endswith(f"; the outputs are written in {tmp_path} (OUT_DIR's parent) before they are published: "
                         "if that disk is full, free space there and rerun; nothing published")
    debug = job("DEBUG", "o2")
    assert debug.returncode == 1 and debug.stderr.count("Traceback (most recent call last)") >= 2
    assert sorted(os.listdir(tmp_path)) == ["in", "site"]


def test_an_output_name_too_long_for_the_temporary_folder_says_so(tiny_package, tmp_path, capsys):
    """QA: a legal 240-character OUT_DIR name was refused as "not writable: File name too long": the job's own
    temporary folder beside it (`.tmp-PID@HOST-XXXXXXXX`) was what went past the file system's 255 bytes."""
    from helpers import textured

    textured((64, 64), 120).save(tmp_path / "scan.png")
    out = tmp_path / ("n" * 240)
    assert main(["--input", str(tmp_path / "scan.png"), "--model", tiny_package, "--output", str(out)]) == 2
    assert_one_line_error(capsys, 2, f"output dir name '{'n' * 240}' is too long: the job's temporary folder beside "
                                     "it adds", "give a shorter --output")
    assert sorted(os.listdir(tmp_path)) == ["scan.png"]
    for long_path in (tmp_path / ("p" * 300) / "night", tmp_path / "/".join(["q" * 200] * 21) / "night"):
        capsys.readouterr()  # too long elsewhere (a folder's name, the whole path): not the temporary folder's fault
        assert main(["--input", str(tmp_path / "scan.png"), "--model", tiny_package, "--output", str(long_path)]) == 2
        line = assert_one_line_error(capsys, 2, "error: output dir ")  # a 4,000-character path is cut in the middle
        assert "temporary folder" not in line and line.endswith("File name too long")
    assert sorted(os.listdir(tmp_path)) == ["scan.png"]


def test_a_listed_file_replaced_by_a_folder_is_a_row_that_says_what_may_have_happened(tmp_path):
    """QA: a file replaced by an empty folder between listing and scoring read "folder could not be listed (it can
    be now: rerun)", of a folder that had never failed to list."""
    from batch_job.scoring import read_input
    from xray_core.preprocessing import ImageError

    (tmp_path / "scan.png").mkdir()
    with pytest.raises(ImageError) as caught:
        read_input(str(tmp_path / "scan.png"))
    assert str(caught.value) == ("folder could not be listed (it can be listed now: its permissions changed, or it "
                                 "took a listed file's place since: rerun): the images in it were not scored")


def test_an_error_line_cut_to_its_length_keeps_its_reason():
    """Review: the 1,000-character cap cut the end, where the reason is, off a line naming a 4,000-character path."""
    from xray_core.errors import middle_cut

    line = middle_cut("output dir /" + "q" * 4000 + "/night is not writable: File name too long", 1000)
    assert len(line) <= 1000 and line.startswith("output dir /qqq") and line.endswith("File name too long")
    assert middle_cut("short", 1000) == "short"


def test_a_night_started_with_stderr_closed_is_published(tiny_package, tmp_path):
    """QA: a job started `2>&-` (a daemon, a cron line) failed with exit 1 and no word, nothing published: the
    start-up-line filter flushed the worker threads' stderr wrapper around None."""
    import subprocess
    import sys

    from helpers import textured

    (tmp_path / "in").mkdir()
    textured((64, 64), 120).save(tmp_path / "in" / "scan.png")
    done = subprocess.run([sys.executable, "-m", "batch_job", "--input", str(tmp_path / "in"), "--model", tiny_package,
                           "--output", str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          preexec_fn=lambda: os.close(2))
    assert done.returncode == 0 and done.stdout.startswith("scored 1/1 images")
    assert os.path.isfile(tmp_path / "out" / "metrics.json")


@pytest.mark.parametrize("level, kept", [("INFO", "0"), ("WARNING", "0"), ("DEBUG", "1")])
def test_rust_backtraces_are_off_unless_debugging(level, kept, monkeypatch):
    """QA: with RUST_BACKTRACE=1 (these machines set it) each decoder panic built a ~150-line backtrace that the
    job then dropped: 83 ms a corrupt RLE file. Off for the job and its workers, but at --log-level DEBUG."""
    from batch_job.runner import quiet_rust_backtraces

    monkeypatch.setenv("RUST_BACKTRACE", "1")
    quiet_rust_backtraces(level)
    assert os.environ["RUST_BACKTRACE"] == kept


def test_a_non_empty_output_is_refused_counting_what_the_job_did_not_write_and_overwrite_says_it_deletes_them(
        labelled_tree, tiny_package, tmp_path, capsys, caplog):
    """QA (2026-12-02): the refusal said "pass --overwrite", and doing so deleted a colleague's notes in OUT_DIR
    without a word. Now the refusal counts them (names at DEBUG: a name may be a patient's) and --overwrite warns."""
    out = tmp_path / "out"
    assert main(small_run(labelled_tree[0], tiny_package, out)) == 0
    capsys.readouterr()
    assert main(small_run(labelled_tree[0], tiny_package, out)) == 2  # only the job's own outputs: the plain refusal
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("exists and is not empty (pass --overwrite to "
                                                                      "replace it)")
    (out / "notes_dr_x.txt").write_text("read")
    (out / "heatmaps").mkdir(exist_ok=True)
    (out / "heatmaps" / "circled.png").write_bytes(b"png")
    assert main(small_run(labelled_tree[0], tiny_package, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds 2 file(s) or folder(s) the job did not write" in last and "notes_dr_x" not in last
    from batch_job.outdir import refuse_existing

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="batch_job"):
        refuse_existing(str(out), overwrite=True)
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(level == logging.WARNING and "--overwrite" in m and "holds 2 file(s) or folder(s) the job did not "
               "write" in m and "deleted with the rest" in m for level, m in said)
    assert (logging.DEBUG, f"in {out}, not written by the job: notes_dr_x.txt, heatmaps/circled.png") in said
    assert main(small_run(labelled_tree[0], tiny_package, out) + ["--overwrite"]) == 0
    assert not (out / "notes_dr_x.txt").exists() and (out / "metrics.json").exists()
