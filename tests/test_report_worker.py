"""The report helper process: same report as in-process, falls back when it dies, never outlives the job."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import numpy as np

from batch_job.report_worker import Reporter, make_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_reconciliation(n: int = 60) -> dict:
    rng = np.random.default_rng(7)
    labels = ["PNEUMONIA" if i % 3 else "NORMAL" for i in range(n - 5)] + [""] * 5
    probs = np.clip(np.asarray([0.7 if lab == "PNEUMONIA" else 0.3 for lab in labels]) + rng.normal(0, 0.25, n), 0, 1)
    return {"images_found": n + 2, "images_scored": n, "images_failed": 2, "images_skipped": 0,
            "per_input": {"/in": {"found": n + 2, "scored": n, "failed": 2, "skipped": 0}},
            "probabilities": probs, "labels": labels}


def test_helper_makes_the_same_report_as_the_job_process(tmp_path, caplog, monkeypatch):
    from batch_job import report_worker

    monkeypatch.setattr(report_worker, "READY_WAIT", 300.0)  # a loaded CI machine must not make it fall back
    rec = fake_reconciliation()
    expected = make_report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "here.png"))
    reporter = Reporter()
    try:
        assert reporter.proc is not None and reporter.proc.is_alive()
        with caplog.at_level(logging.WARNING, logger="batch_job"):
            got = reporter.report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "helper.png"))
    finally:
        reporter.close()
    assert "report helper failed" not in caplog.text  # the helper made it
    assert got == expected
    assert expected["labelled_images"] == 55 and 0.5 < expected["roc_auc"] <= 1.0
    assert (tmp_path / "helper.png").read_bytes() == (tmp_path / "here.png").read_bytes()


def test_a_dead_helper_means_the_report_is_made_in_process(tmp_path, caplog):
    rec = fake_reconciliation()
    reporter = Reporter()
    reporter.proc.kill()
    reporter.proc.join()
    with caplog.at_level(logging.WARNING, logger="batch_job"):
        got = reporter.report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "h.png"))
    reporter.close()
    assert got == make_report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "h2.png"))
    assert (tmp_path / "h.png").is_file()
    assert "report helper failed" in caplog.text


def test_a_stalled_helper_means_the_report_is_made_in_process(tmp_path, caplog, monkeypatch):
    import signal

    from batch_job import report_worker

    monkeypatch.setattr(report_worker, "READY_WAIT", 0.5)
    rec = fake_reconciliation()
    reporter = Reporter()
    os.kill(reporter.proc.pid, signal.SIGSTOP)  # e.g. starved of CPU on a busy host
    proc = reporter.proc
    with caplog.at_level(logging.WARNING, logger="batch_job"):
        got = reporter.report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "h.png"))
    assert got == make_report(rec, 0.5, "pneumonia/9", "DirectRunner", str(tmp_path / "h2.png"))
    assert "not ready after" in caplog.text
    proc.join(10)
    assert not proc.is_alive()  # report() gave up on it and ended it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_helper_exits_when_the_job_is_killed():
    code = ("import os, signal; from batch_job.report_worker import Reporter\n"
            "r = Reporter(); print(r.proc.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9
    helper = int(proc.stdout.split()[0])
    deadline = time.time() + 30  # it finishes its imports (lowest priority), then sees the pipe closed
    while _alive(helper) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(helper)
