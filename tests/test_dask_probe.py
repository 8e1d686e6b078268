"""A DaskRunner night's scheduler is checked before anything is listed (batch_job/dask_probe.py): QA found a wrong
--dask_client_address hanging for good (a web server's port), failing as a MemoryError (a service that sends a
banner), or after 30 s of "0/N images scored" lines (a refused port)."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from batch_job import dask_probe
from batch_job.cli import main
from helpers import assert_one_line_error


@pytest.fixture
def listener():
    """A TCP port that accepts connections and then sends `banner` (b"": nothing) and never answers more."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held, banner = [], {"bytes": b""}

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if banner["bytes"]:
                conn.sendall(banner["bytes"])

    threading.Thread(target=serve, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}", banner
    server.close()
    for conn in held:
        conn.close()


def test_a_port_that_never_answers_is_refused_within_the_timeout(listener):
    address, _ = listener
    started = time.monotonic()
    with pytest.raises(dask_probe.InputError, match=r"no Dask scheduler answered within 4 s"):
        dask_probe.check_scheduler(address, timeout=2)
    assert time.monotonic() - started < 2 + 2 + 2


def test_a_service_that_sends_a_banner_is_no_scheduler(listener):
    address, banner = listener
    banner["bytes"] = b"SSH-2.0-OpenSSH_9.6\r\n" * 4
    with pytest.raises(dask_probe.InputError, match=f"--dask_client_address {address}: no Dask scheduler"):
        dask_probe.check_scheduler(address, timeout=2)


def test_odd_options_are_one_line_refusals_not_tracebacks(tmp_path):
    """Review: a missing --dask_scheduler_file was waited for (distributed waits for it to appear), and a
    --dask_connection_timeout Beam could not parse (dask's no_default) was a TypeError, exit 1."""
    with pytest.raises(dask_probe.InputError, match=r"--dask_scheduler_file .*nope.json: no such file; nothing scored"):
        dask_probe.check_scheduler(scheduler_file=str(tmp_path / "nope.json"), timeout=object())


def test_a_scheduler_file_is_checked_too(listener, tmp_path):
    """Review: a stale --dask_scheduler_file (its scheduler gone) was not checked at all."""
    import json

    address, _ = listener
    (tmp_path / "scheduler.json").write_text(json.dumps({"address": address, "type": "Scheduler"}))
    with pytest.raises(dask_probe.InputError, match=f"--dask_scheduler_file {tmp_path / 'scheduler.json'}: no Dask "
                                                    "scheduler answered within 4 s"):
        dask_probe.check_scheduler(scheduler_file=str(tmp_path / "scheduler.json"), timeout=2)


def test_a_refused_port_is_refused_in_one_line_before_anything_is_listed(tmp_path, tiny_package, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(dask_probe, "CONNECT_SECONDS", 2)  # distributed retries a refused port for all of it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    (tmp_path / "in").mkdir()
    rc = main(["--input", str(tmp_path / "in"), "--model", tiny_package, "--output", str(tmp_path / "out"),
               "--runner", "DaskRunner", f"--dask_client_address=tcp://127.0.0.1:{port}"])
    assert_one_line_error(capsys, rc, f"--dask_client_address tcp://127.0.0.1:{port}: no Dask scheduler there (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("processes", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_scheduler_whose_workers_import_the_job_passes_and_one_that_cannot_is_refused(monkeypatch, processes):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None) as cluster:
        assert dask_probe.check_scheduler(cluster.scheduler_address, timeout=10) == 2
        monkeypatch.setattr(dask_probe, "IMPORTS_THE_JOB", "__import__('batch_job_not_installed') and None")
        with pytest.raises(dask_probe.InputError, match=r"a Dask worker cannot import the job \(ModuleNotFoundError: "
                                                        r"No module named 'batch_job_not_installed'\); install"):
            dask_probe.check_scheduler(cluster.scheduler_address, timeout=10)


def test_a_scheduler_lost_while_scoring_fails_the_night_in_one_line(tmp_path, tiny_package, capsys, monkeypatch):
    """QA: with the scheduler killed mid-run, Beam's DaskRunner reported the pipeline DONE, and the job failed its
    reconciliation ("missing 180") after a 36-line traceback. A client that is no longer running after the pipeline
    is a lost scheduler: one line, nothing published."""
    from batch_job import pipeline, runner
    from batch_job.errors import SchedulerLost
    from batch_job.synthetic import make_tree

    class Client:
        closed = False

        def close(self):
            Client.closed = True

    class Future:
        def __init__(self, status):
            self.status = status

    class Result:  # Beam's DaskRunnerResult after its scheduler went away: DONE, its futures cancelled
        client = Client()
        futures = [Future("cancelled")]  # Beam keeps the last leaf's

        def wait_until_finish(self):
            return "DONE"

    class Pipeline:
        def run(self):
            return Result()

    with pytest.raises(SchedulerLost, match=r"lost the Dask scheduler while scoring \(the pipeline cancelled\)"):
        runner.execute(Pipeline())
    assert Client.closed
    Result.futures = [Future("finished")]
    runner.execute(Pipeline())  # every task finished: the pipeline's own outcome stands

    def lost(*args, **kwargs):
        raise SchedulerLost("lost the Dask scheduler while scoring: nothing published; restart the cluster (its "
                            "workers end with the scheduler) and rerun")

    monkeypatch.setattr(pipeline, "execute", lost)
    make_tree(str(tmp_path / "in"), per_class=2, size=48, seed=1)
    rc = main(["--input", str(tmp_path / "in"), "--model", tiny_package, "--output", str(tmp_path / "out"),
               "--direct_running_mode=in_memory"])
    assert_one_line_error(capsys, rc, "error: lost the Dask scheduler while scoring: nothing published", code=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
