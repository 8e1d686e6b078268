"""Stopping the job: SIGTERM (kill, docker stop, systemd, Kubernetes) is handled like Ctrl-C on every runner,
and reaches the job as PID 1 of a container. Real subprocesses; SIGKILL and Ctrl-C: test_nightly.py and
test_batch_job.py."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from batch_job.cli import main
from batch_job.synthetic import make_tree
from helpers import REPO
from xray_core.files import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def ledger_rows(path: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT sha256, model, probability, path FROM scored ORDER BY path").fetchall()


SHIPPED = os.path.join(REPO, "serving_models", "pneumonia")
KILLED = "; -9 is SIGKILL, e.g. the out-of-memory killer"
GRACE_SECONDS = 10  # docker stop's default: SIGKILL follows SIGTERM after it


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> str:
    """300 images of 256 px scored one per work unit by the shipped model: a job of several seconds."""
    root = str(tmp_path_factory.mktemp("slow") / "in")
    make_tree(root, per_class=150, size=256, seed=1)
    return root


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory) -> str:
    """1,200 images of 256 px: a job of ~15 s one per work unit."""
    root = str(tmp_path_factory.mktemp("long") / "in")
    make_tree(root, per_class=600, size=256, seed=2)
    return root


def file_state(path: str) -> tuple:
    st = os.stat(path)
    return sha256_file(path), st.st_size, st.st_mtime_ns


def first_shard_written(out: str):
    return lambda proc: bool(glob.glob(out + ".tmp-*/predictions-*.csv"))


def worker_processes_started(proc) -> bool:
    import psutil

    return sum("batch_job.beam_worker" in " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children()) >= 2


def terminate_mid_run(cmd: list[str], out: str, target=None, group_signal: int = 0, ready=None
                      ) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    """Start `cmd`, send SIGTERM to the job's own process once its first shard is written (`ready(proc)` when given)
    (to `target(proc)`'s pid when given: the job inside a PID namespace; `group_signal` to its whole process group
    instead, as a terminal's Ctrl-C and systemd's stop do) -> (the finished process, seconds from the signal to its
    exit, the pids of the job's process tree at that moment)."""
    import psutil

    ready = ready or first_shard_written(out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ready(proc):
            time.sleep(0.05)
        assert ready(proc), "the job never got to the point of the signal"
        pid = target(proc) if target else proc.pid
        tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        t0 = time.time()
        if group_signal:
            os.killpg(proc.pid, group_signal)
        else:
            os.kill(pid, signal.SIGTERM)  # the job's process only, as docker stop and kill -TERM do
        stdout, stderr = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.time() - t0, tree
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def assert_terminated_cleanly(done, seconds: float, tree: list[int], out: str, ledger: str, before: tuple) -> None:
    import psutil

    assert done.returncode == 143, done.stderr[-3000:]
    # the job's line, once (worker threads still running may log their failure on the removed temp dir)
    assert done.stderr.splitlines().count("error: terminated (SIGTERM); nothing published") == 1, done.stderr[-3000:]
    assert done.stdout == "" and seconds < GRACE_SECONDS
    time.sleep(1)  # a worker still finishing a task must not bring anything back
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*") and not glob.glob(out + ".old-*")
    assert file_state(ledger) == before  # the ledger untouched
    deadline = time.time() + GRACE_SECONDS
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.fixture
def night_one(tmp_path) -> str:
    """A ledger that already holds a night's rows (the shipped model, 4 images)."""
    inp, ledger = tmp_path / "night1-in", str(tmp_path / "ledger.sqlite")
    make_tree(str(inp), per_class=2, size=64, seed=4)
    assert main(["--input", str(inp), "--model", SHIPPED, "--output", str(tmp_path / "night1"), "--ledger", ledger,
                 "--direct_running_mode=in_memory"]) == 0
    with sqlite3.connect(ledger) as conn:  # synthetic images: the shipped model's gate refuses some of them
        refused = conn.execute("SELECT COUNT(*) FROM out_of_scope").fetchone()[0]
    assert len(ledger_rows(ledger)) + refused == 4
    return ledger


@pytest.mark.slow
@pytest.mark.parametrize("mode, when", [("multi_threading", "mid-run"), ("multi_processing", "mid-run"),
                                        ("multi_processing", "as the workers start")])
def test_sigterm_stops_the_job_like_ctrl_c(mode, when, slow_tree, night_one, tmp_path):
    """SIGTERM mid-run on DirectRunner (worker threads, the default on up to 4 cores; worker processes, beyond):
    exit 143 within docker stop's grace period, nothing published, no temp folder, the ledger as it was, no
    worker process left. Review: a SIGTERM to the job alone (docker stop, `kill PID`) within half a second of its
    worker processes' start left it waiting for good (15 runs of 15) for a worker busy with a bundle whose input never
    came; the job now kills its workers when a signal stops it."""
    out, before = str(tmp_path / "night2"), file_state(night_one)
    cmd = [sys.executable, "-m", "batch_job", "--input", slow_tree, "--model", SHIPPED, "--output", out,
           "--ledger", night_one, "--shard-size", "1", "--batch-size", "1", f"--direct_running_mode={mode}",
           "--direct_num_workers=2"]
    ready = worker_processes_started if when == "as the workers start" else None
    assert_terminated_cleanly(*terminate_mid_run(cmd, out, ready=ready), out, night_one, before)


@pytest.mark.slow
@pytest.mark.parametrize("signum, said, when", [
    (signal.SIGTERM, "terminated (SIGTERM)", "mid-run"),
    (signal.SIGTERM, "terminated (SIGTERM)", "as the workers start"),
    (signal.SIGINT, "interrupted", "mid-run"), (signal.SIGINT, "interrupted", "as the workers start"),
    (signal.SIGHUP, "terminated (SIGHUP)", "mid-run"), (signal.SIGHUP, "terminated (SIGHUP)", "as the workers start")])
def test_a_signal_to_the_whole_group_stops_worker_processes_without_a_traceback(signum, said, when, slow_tree,
                                                                                  night_one, tmp_path):
    """QA: a Ctrl-C in a terminal, or systemd's stop, signals every process of the job's group. Beam's worker
    processes died of it, and the job's threads printed a traceback for each (62 lines after SIGTERM, 13 after
    Ctrl-C, with a worker's gRPC abort). The workers leave it to the job first: its line is the last, exit 143 or
    130, nothing published, no worker left. Review: a worker that ignored the signal and had not yet connected when
    it came kept the job waiting for good (11 runs of 11); it now ends 2 s after the signal."""
    out, before = str(tmp_path / "night2"), file_state(night_one)
    cmd = [sys.executable, "-m", "batch_job", "--input", slow_tree, "--model", SHIPPED, "--output", out,
           "--ledger", night_one, "--shard-size", "1", "--batch-size", "1", "--direct_running_mode=multi_processing",
           "--direct_num_workers=2"]
    ready = worker_processes_started if when == "as the workers start" else None
    done, seconds, tree = terminate_mid_run(cmd, out, group_signal=signum, ready=ready)
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: {said}; nothing published", done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr, done.stderr[-3000:]
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*") and file_state(night_one) == before
    assert seconds < GRACE_SECONDS and len(tree) >= 3  # the job and its 2 workers
    import psutil

    deadline = time.time() + GRACE_SECONDS
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_a_closed_terminal_stops_the_job_like_ctrl_c_but_nohup_still_holds(tmp_path, night_one):
    """QA: SIGHUP (the ssh session of a run by hand dropped) ended the job with 129 and no line, and left its temp
    folder (partial prediction CSVs: patient data) until the next run. It is now handled as SIGTERM: exit 129, one
    line, nothing left, the ledger untouched. Under `nohup` (SIGHUP ignored) the job runs on to the end."""
    inp = tmp_path / "in"
    make_tree(str(inp), per_class=6, size=64, seed=6)
    out, before = str(tmp_path / "night2"), file_state(night_one)
    cmd = [sys.executable, "-m", "batch_job", "--input", str(inp), "--model", SHIPPED, "--output", out, "--ledger",
           night_one, "--shard-size", "1", "--batch-size", "1", "--direct_running_mode=in_memory"]
    done, _, _ = terminate_mid_run(cmd, out, group_signal=signal.SIGHUP)
    assert done.returncode == 129, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "error: terminated (SIGHUP); nothing published"
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*") and file_state(night_one) == before
    done, _, _ = terminate_mid_run(["nohup", *cmd], out, group_signal=signal.SIGHUP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isdir(out) and file_state(night_one) != before


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, why, when", [
    (signal.SIGKILL, -9, KILLED, "mid-run"), (signal.SIGTERM, 143, "", "mid-run"),
    (signal.SIGKILL, -9, KILLED, "as it starts"), (signal.SIGSEGV, -11, "", "as it starts"),
    (signal.SIGKILL, -9, KILLED, "mid-run, SIGINT ignored")])
def test_a_worker_process_killed_mid_run_fails_the_job_instead_of_hanging(signum, code, why, when, slow_tree,
                                                                          night_one, tmp_path, request):
    """QA: a DirectRunner worker process killed mid-run (SIGKILL: the kernel's out-of-memory killer) left the job
    waiting for its results for good, with Beam's own worker command as with batch_job.beam_worker: a nightly job
    that never ends. It now fails within seconds, exit 1, one line saying why (Beam's threads that read the worker's
    streams said it first, with two tracebacks: review), nothing published, the ledger as it was, no worker left.
    Review: a SIGTERM to one worker alone ended it with exit code 0 after its grace, and the job waited for good.
    Review: a worker killed (SIGKILL, SIGSEGV) within a second of its start left the job waiting for good for the
    other worker, busy with a bundle whose input never came: the job now kills its other workers first.
    QA: a job a script started with `&` (SIGINT ignored, as the shell does) waited for good: the job woke itself
    with SIGINT; it uses SIGUSR1 now."""
    import psutil

    out, before = str(tmp_path / "night2"), file_state(night_one)
    # a SIGTERM'd worker works on for its 2 s of grace (batch_job/beam_worker.py): a job long enough to outlast it
    tree = slow_tree if signum == signal.SIGKILL else request.getfixturevalue("long_tree")
    cmd = [sys.executable, "-m", "batch_job", "--input", tree, "--model", SHIPPED, "--output", out,
           "--ledger", night_one, "--shard-size", "1", "--batch-size", "1", "--direct_running_mode=multi_processing",
           "--direct_num_workers=2"]
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if "SIGINT ignored" in when else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=ignore_sigint)
    try:
        deadline = time.time() + 120
        started = worker_processes_started if when == "as it starts" else first_shard_written(out)
        while time.time() < deadline and not started(proc):
            time.sleep(0.02)
        workers = [p for p in psutil.Process(proc.pid).children() if "batch_job.beam_worker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[0].send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: job failed: a worker process ended while scoring (Worker subprocess exited with return code {code}"
        f"{why}); nothing published"), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not os.path.exists(out) and not glob.glob(out + ".tmp-*") and file_state(night_one) == before
    deadline = time.time() + GRACE_SECONDS
    while time.time() < deadline and psutil.pid_exists(workers[1].pid) and workers[1].status() != "zombie":
        time.sleep(0.2)
    assert not psutil.pid_exists(workers[1].pid) or workers[1].status() == "zombie"


@pytest.mark.slow
def test_sigterm_stops_the_job_on_dask_runner(slow_tree, night_one, tmp_path, dask_cluster):
    """The driver's SIGTERM on DaskRunner: the same, and the cluster's tasks write nothing back afterwards."""
    out, before = str(tmp_path / "night2"), file_state(night_one)
    cmd = [sys.executable, "-m", "batch_job", "--input", slow_tree, "--model", SHIPPED, "--output", out,
           "--ledger", night_one, "--shard-size", "1", "--batch-size", "1", "--runner", "DaskRunner",
           f"--dask_client_address={dask_cluster}"]
    done, seconds, _ = terminate_mid_run(cmd, out)  # the driver's tree: the cluster's workers are not its own
    assert_terminated_cleanly(done, seconds, [], out, night_one, before)
    time.sleep(3)
    assert sorted(os.listdir(tmp_path)) == ["ledger.sqlite", "ledger.sqlite.lock", "night1", "night1-in"]


def pid_namespace_available() -> bool:
    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-rpf", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not pid_namespace_available(), reason="unshare cannot create a PID namespace here")
def test_sigterm_reaches_the_job_as_pid_1_as_in_docker_stop(slow_tree, night_one, tmp_path):
    """docker stop sends SIGTERM to the container's PID 1 (the Dockerfile's exec-form ENTRYPOINT: Python itself),
    then SIGKILL after its grace period. The kernel drops a signal sent to a namespace's PID 1 that has no handler
    for it: a bare Python there ignores SIGTERM (checked first, so this test can tell), the job must not."""
    import psutil

    def pid_1(proc) -> int:  # unshare --fork: its child is PID 1 inside
        return psutil.Process(proc.pid).children()[0].pid

    sleeper = subprocess.Popen(["unshare", "-rpf", "--mount-proc", sys.executable, "-c", "import time; "
                                "time.sleep(60)"], start_new_session=True)
    try:
        time.sleep(1)
        os.kill(pid_1(sleeper), signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            sleeper.wait(timeout=2)  # PID 1 without a handler: SIGTERM ignored
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
    out, before = str(tmp_path / "night2"), file_state(night_one)
    cmd = ["unshare", "-rpf", "--mount-proc", sys.executable, "-m", "batch_job", "--input", slow_tree, "--model",
           SHIPPED, "--output", out, "--ledger", night_one, "--shard-size", "1", "--batch-size", "1"]
    assert_terminated_cleanly(*terminate_mid_run(cmd, out, target=pid_1), out, night_one, before)


@pytest.mark.parametrize("command", ["batch_job", "export"])
def test_a_signal_after_the_command_succeeded_does_not_make_it_say_nothing_was_published(command):
    """QA: a SIGTERM in the exit after export printed "published" (TensorFlow's teardown, ~1.2 s), or after the job
    published (~60 ms), ended the process with 143, which means "nothing published". Once the command is done and
    published, it holds the signal and exits 0. The command here is the real entry point with its work replaced by
    "published, exit 0", then SIGTERM and Ctrl-C sent to the process as it returns."""
    work = {"batch_job": "import batch_job.cli as c; c.main = lambda started=None: 0",
            "export": "import export.__main__ as e; e._main = lambda argv=None: 0"}[command]
    entry = {"batch_job": "from batch_job.__main__ import main\ncode = main()",
             "export": "from export.__main__ import main\ncode = main()"}[command]
    script = (f"import os, signal, sys\n{work}\n{entry}\n"
              "os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGINT)\nsys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["batch_job", "export"])
def test_signals_all_through_the_interpreters_exit_after_success_do_not_make_it_say_nothing_was_published(command):
    """QA: SIGTERM sent 0-30 ms after the job's last line gave exit 143 in 5 of 5 runs, the night published and the
    ledger committed: the interpreter's exit puts back the default handler of each signal with a Python handler,
    and the next SIGTERM killed it. Here a shell sends SIGTERM without pause from the moment the command returned
    until the process is gone."""
    work = {"batch_job": "import batch_job.cli as c; c.main = lambda started=None: 0",
            "export": "import export.__main__ as e; e._main = lambda argv=None: 0"}[command]
    script = (f"import os, subprocess, sys\n{work}\nfrom {command}.__main__ import main\n"
              "code = main()\n"
              "subprocess.Popen(['sh', '-c', f'while kill -TERM {os.getpid()} 2>/dev/null; do :; done'],\n"
              "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\n"
              "sys.exit(code)\n")
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("command", ["export", pytest.param("train", marks=pytest.mark.slow)])
def test_a_signal_as_a_command_that_succeeded_lets_go_of_its_handlers_is_held(command):
    """QA: a SIGTERM just after export printed "published" (or train "run written"), as the command put back the
    handlers it replaced, met Python's default handler for an instant: exit 143 without a line, the version
    published. Here the signal comes exactly then (from the call that takes the held signal, just after)."""
    work = {"export": "import export.__main__ as e; e._main = lambda argv=None: 0",
            "train": "import train.run as r; r.run = lambda args: 0"}[command]
    argv = ["--verify", "x"] if command == "export" else ["--data-dir", ".", "--output-dir", "x"]
    script = (f"import os, signal, sys\n{work}\n"
              "from xray_core.interrupts import GATE\n"
              "take = GATE.take_pending\n"
              "def late():\n    os.kill(os.getpid(), signal.SIGTERM)\n    return take()\n"
              "GATE.take_pending = late\n"
              f"from {command}.__main__ import main\n"
              f"sys.argv = ['{command}'] + {argv!r}\n"
              "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "export", "batch_job"])
@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_an_interrupt_an_extension_turned_into_its_own_error_is_still_an_interrupt(command, signum, code, said,
                                                                                 tmp_path, monkeypatch, capsys):
    """QA (full suite): a SIGTERM that landed while TensorFlow built the model came out of its C code as a TypeError;
    train exited 1 with a traceback, not 143 "RUN_DIR not published". Any command's failure after its handler raised
    is the interrupt it was."""
    from xray_core.interrupts import GATE

    def interrupted_inside_c_code(*args, **kwargs):
        try:
            GATE.handler(signum, None)
        except KeyboardInterrupt:
            raise TypeError("<unknown>") from None  # what a pybind11 extension makes of it

    if command == "train":
        import train.run
        from train.__main__ import main as command_main

        monkeypatch.setattr(train.run, "run", interrupted_inside_c_code)
        argv = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    elif command == "export":
        import export.__main__ as export_main_module

        monkeypatch.setattr(export_main_module, "_main", interrupted_inside_c_code)
        command_main, argv = export_main_module.main, ["--verify", str(tmp_path)]
    else:
        import batch_job.cli

        monkeypatch.setattr(batch_job.cli, "run", interrupted_inside_c_code)
        command_main, argv = main, ["--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert command_main(argv) == code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {said}; ")
    GATE.raised = 0


def test_a_signal_tensorflow_swallowed_still_stops_training_before_it_publishes(tmp_path, monkeypatch, capsys):
    """QA (full suite): a SIGTERM that landed while TensorFlow imported a module inside its C code was swallowed
    there; training ran on and published its run, exit 0. The interrupt is raised again at the next batch
    (train.fit.StopOnSignal) and before publishing."""
    import train.run
    from train.__main__ import main as train_main
    from train.fit import StopOnSignal
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    def swallowed(tmp, *args):
        try:
            GATE.handler(signal.SIGTERM, None)
        except Terminated:
            pass  # what TensorFlow's C code did with it
        (tmp_path / "marker").write_text("trained on")

    make_tree(str(tmp_path / "data"), per_class=6, size=48, seed=1)
    monkeypatch.setattr(train.run, "_run_into", swallowed)
    assert train_main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                       "--image-size", "32"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: terminated (SIGTERM); RUN_DIR not published"
    assert sorted(os.listdir(tmp_path)) == ["data", "marker"]
    with pytest.raises(Terminated):
        StopOnSignal().on_train_batch_end(0)  # the same after any batch while training
    GATE.raised = 0
    StopOnSignal().on_train_batch_end(1)  # no signal: nothing


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_signal_python_dropped_inside_a_finaliser_still_stops_the_job_before_it_publishes(signum, code, said,
                                                                                          tmp_path):
    """QA (docs audit): a SIGTERM or Ctrl-C 2-3 s into the quickstart job, in its report phase, was lost in 3 runs of
    13: exit 0, outputs published. The handler's interrupt was raised inside a finaliser the garbage collector ran
    (a weakref callback), where Python prints "Exception ignored in ..." and drops it. The job checks for such a
    signal before it publishes. Here a real signal is handled inside a __del__ while the report is written."""
    out = str(tmp_path / "out")
    script = (
        "import os, sys\nfrom batch_job import html_report\nreal = html_report.write_html\n"
        "class Finaliser:\n    def __del__(self):\n"
        f"        os.kill(os.getpid(), {int(signum)})\n        for _ in range(1000): pass\n"
        "def write_html(*args):\n    Finaliser()\n    return real(*args)\n"
        "html_report.write_html = write_html\nfrom batch_job.__main__ import main\nsys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", script, "--input", os.path.join(REPO, "examples", "xrays"),
                           "--output", out], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {said}; nothing published"
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_a_signal_python_dropped_stops_export_before_it_renames_the_version(tmp_path):
    """The same for export: publish_version raises the interrupt again before anything is renamed."""
    from export.republish import publish_version
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    staging = tmp_path / "pneumonia" / ".staging-1"
    staging.mkdir(parents=True)
    GATE.raised = signal.SIGTERM  # the handler ran; its Terminated was dropped
    try:
        with pytest.raises(Terminated):
            publish_version(str(staging), str(tmp_path / "pneumonia" / "1"))
    finally:
        GATE.raised = 0
    assert sorted(os.listdir(tmp_path / "pneumonia")) == [".staging-1"]  # the caller discards it


@pytest.mark.parametrize("command", ["export", "batch_job"])
def test_a_signal_just_as_the_temporary_folder_is_made_leaves_no_folder(command, tmp_path, monkeypatch, capsys):
    """Full suite (once): a SIGTERM that export received just after its staging folder was made, before the code that
    discards it on failure had its name, left `<version>.tmp-XXXXXXXX` beside the versions. The folder is made with
    signals held (GATE.held); the signal is raised once the cleanup knows the folder. The job's temp dir alike."""
    from helpers import write_package
    from xray_core.interrupts import GATE

    def signalled(make):
        def made_then_signalled(*args):
            folder = make(*args)
            GATE.handler(signal.SIGTERM, None)  # the signal lands as the call returns
            return folder
        return made_then_signalled

    vdir = write_package(str(tmp_path / "serving"))
    try:
        if command == "export":
            import export.republish as republish
            from xray_core.errors import Terminated

            monkeypatch.setattr(republish, "staging_dir", signalled(republish.staging_dir))
            with pytest.raises(Terminated):
                republish.republish(vdir, None, None, lambda meta, staging: meta)
        else:
            import batch_job.pipeline as pipeline

            monkeypatch.setattr(pipeline.outdir, "prepare", signalled(pipeline.outdir.prepare))
            make_tree(str(tmp_path / "in"), per_class=2, size=48, seed=1)
            assert main(["--input", str(tmp_path / "in"), "--model", vdir, "--output", str(tmp_path / "out"),
                         "--direct_running_mode=in_memory"]) == 143
            assert capsys.readouterr().err.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing published"
    finally:
        GATE.raised = 0
    assert sorted(os.listdir(tmp_path / "serving" / "pneumonia")) == ["1", "config.pbtxt"]
    assert sorted(os.listdir(tmp_path)) == (["in", "serving"] if command == "batch_job" else ["serving"])


def test_held_raises_a_signal_that_came_meanwhile_also_when_its_statements_failed():
    """Review: a signal held while the statements raised was lost (the job exited 2 for a refusal and never said it
    was told to stop; a later publish then reported it)."""
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    try:
        with pytest.raises(Terminated) as raised:
            with GATE.held():
                GATE.handler(signal.SIGTERM, None)
                raise ValueError("refused")
        assert isinstance(raised.value.__context__, ValueError) and GATE.pending == 0
    finally:
        GATE.raised = GATE.pending = 0


def test_the_unraisable_hook_goes_back_with_the_signal_handlers():
    """Review: install() replaced sys.unraisablehook for good, without passing other exceptions to the hook it
    replaced."""
    import sys as system

    from xray_core.interrupts import GATE

    seen = []
    before = system.unraisablehook
    system.unraisablehook = seen.append
    try:
        previous = GATE.install()
        GATE.raised = signal.SIGTERM
        GATE.unraisable(type("U", (), {"exc_value": KeyboardInterrupt()})())  # ours: hidden
        other = type("U", (), {"exc_value": ValueError("x")})()
        GATE.unraisable(other)
        assert seen == [other]
        GATE.uninstall(previous)
        assert system.unraisablehook == seen.append
    finally:
        GATE.raised = 0
        system.unraisablehook = before


def test_held_raises_a_signal_that_came_meanwhile_at_its_end():
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    done = []
    try:
        with pytest.raises(Terminated):
            with GATE.held():
                GATE.handler(signal.SIGTERM, None)  # held: no exception here
                done.append("the rest of the block")
        assert done == ["the rest of the block"] and GATE.raised == signal.SIGTERM and GATE.pending == 0
        GATE.raised = 0
        with GATE.deferred():  # inside a publishing section, the signal stays pending for it
            with GATE.held():
                GATE.handler(signal.SIGINT, None)
            assert GATE.pending == signal.SIGINT
        assert GATE.take_pending() == "Ctrl-C"
        with GATE.held():
            pass  # no signal: nothing
    finally:
        GATE.raised = GATE.pending = 0


def test_the_first_signal_says_how_the_command_ended():
    """QA: SIGTERM, then a SIGHUP 200 ms into the clean-up, ended the night with 129 "terminated (SIGHUP)"; the
    first signal decides, a later one still interrupts (a second Ctrl-C), as the first. Held ones too."""
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    try:
        with pytest.raises(Terminated) as first:
            GATE.handler(signal.SIGTERM, None)
        with pytest.raises(Terminated) as later:
            GATE.handler(signal.SIGHUP, None)
        assert first.value.code == later.value.code == 143 and GATE.raised == signal.SIGTERM
        GATE.raised = 0
        with GATE.deferred():
            GATE.handler(signal.SIGINT, None)
            GATE.handler(signal.SIGTERM, None)
        assert GATE.take_pending() == "Ctrl-C"
    finally:
        GATE.raised = GATE.pending = 0


@pytest.mark.parametrize("command", ["train", "export"])
@pytest.mark.parametrize("code", [143, 130])
def test_after_a_signal_the_error_line_stays_the_last_line(command, code):
    """CI (full suite, once): after `python -m train` printed "error: terminated (SIGTERM); RUN_DIR not published"
    and returned 143, the interpreter's exit ran a finaliser of TensorFlow's that the signal had stopped midway and
    printed a `TypeError: 'NoneType' object is not iterable` traceback below that line. After a signal the process
    ends with the command's code and its last line; a command that did its work still runs its exit hooks."""
    hook = ("import atexit, sys\n"
            "atexit.register(lambda: print('Traceback (most recent call last):\\nTypeError: late', file=sys.stderr))\n")
    stopped = (f"import {command}.__main__ as m\n"
               f"def stopped(argv=None):\n    print('error: stopped; nothing published', file=sys.stderr)\n"
               f"    return {code}\n"
               "m.main = stopped\nm.cli()\n")
    proc = subprocess.run([sys.executable, "-c", hook + stopped], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code
    assert proc.stderr.strip().splitlines()[-1] == "error: stopped; nothing published", proc.stderr[-2000:]
    done = (f"import {command}.__main__ as m\nm.main = lambda argv=None: 0\nm.cli()\n")
    proc = subprocess.run([sys.executable, "-c", hook + done], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines()[-1] == "TypeError: late"  # exit hooks run as usual


@pytest.mark.parametrize("code, raised, expected", [
    ("-2", signal.SIGINT, "interrupted"), ("-15", signal.SIGTERM, "SIGTERM"), ("-1", signal.SIGHUP, "SIGHUP"),
    ("-2", 0, "lost"),  # no signal reached the job: the worker is lost
    ("-9", signal.SIGINT, "lost")])  # the OOM killer's SIGKILL, then a Ctrl-C: the worker's end is the news
def test_a_worker_ended_by_the_groups_signal_stops_the_job_for_that_signal(code, raised, expected, monkeypatch):
    """The full suite under load: a group Ctrl-C as the worker processes started ended the job with 1, "a worker
    process ended while scoring (... return code -2)", once in four runs: the worker thread waited its 3 s for the
    job's handler, then counted the worker as lost. When the job's handler has run for a signal that ends a worker so,
    the job stops for that signal."""
    from batch_job import runner
    from batch_job.errors import WORKER_EXITED, WorkerLost, lost_workers
    from xray_core.errors import Terminated
    from xray_core.interrupts import GATE

    class Interrupted:  # a pipeline whose wait the WAKE signal ended
        def run(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(GATE, "raised", raised)
    monkeypatch.setattr(runner, "death_reason", lambda *args: "")
    lost_workers[:] = [f"{WORKER_EXITED} {code}"]
    try:
        with pytest.raises((KeyboardInterrupt, WorkerLost)) as caught:
            runner.execute(Interrupted())
        if expected == "lost":
            assert isinstance(caught.value, WorkerLost) and lost_workers
        elif expected == "interrupted":
            assert type(caught.value) is KeyboardInterrupt and not lost_workers
        else:
            assert isinstance(caught.value, Terminated) and caught.value.code == 128 + raised and not lost_workers
    finally:
        lost_workers.clear()
