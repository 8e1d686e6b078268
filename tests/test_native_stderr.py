"""xray_core.native_stderr.dropped: the lines native code writes straight to file descriptor 2 while a library
loads are dropped when they match the pattern, every other line still shows (also one printed as the process
aborts), and stderr is the command's own again afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from xray_core.native_stderr import dropped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = r"^I0000 .*cudart_stub\.cc"


def test_matching_lines_are_dropped_and_the_others_pass(capfd):
    with dropped(NOISE):
        os.write(2, b"I0000 00:00:17.9 8713 cudart_stub.cc:31] Could not find cuda drivers\n")
        os.write(2, b"W0000 a warning the user should see\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "W0000 a warning the user should see\nafter\n"


def test_an_exception_in_the_block_propagates_after_the_lines_it_printed(capfd):
    with pytest.raises(ImportError, match="libcudnn"):
        with dropped(NOISE):
            os.write(2, b"E0000 dso_loader: could not load libcudnn.so.9\n")
            raise ImportError("libcudnn.so.9: cannot open shared object file")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "E0000 dso_loader: could not load libcudnn.so.9\nafter\n"


def test_other_threads_lines_pass_too(capfd):
    """A process-wide redirection: what another thread writes meanwhile is not lost (review)."""
    with dropped(NOISE):
        t = threading.Thread(target=lambda: os.write(2, b"heartbeat\n"))
        t.start()
        t.join()
    assert capfd.readouterr().err == "heartbeat\n"


def _run(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_in_a_process_pythons_own_writes_to_stderr_are_filtered_too():
    """sys.stderr is file descriptor 2 in a command (pytest's capture replaces it, hence a process)."""
    done = _run("import sys; from xray_core.native_stderr import dropped\n"
                f"with dropped({NOISE!r}):\n"
                "    print('I0000 00:00:1.2 7 cudart_stub.cc:31] noise', file=sys.stderr)\n"
                "    print('a deprecation warning', file=sys.stderr)\n"
                "print('error: one line', file=sys.stderr)")
    assert (done.returncode, done.stderr) == (0, "a deprecation warning\nerror: one line\n")


def test_what_native_code_prints_as_it_aborts_the_process_still_arrives():
    """A fatal check or a CPU without the library's instructions ends the process inside the block: the filter, a
    process of its own, still passes the last line on (a temporary file the process held lost it: review)."""
    done = _run("import os; from xray_core.native_stderr import dropped\n"
                f"with dropped({NOISE!r}):\n"
                "    os.write(2, b'I0000 00:00:1.2 7 cudart_stub.cc:31] noise\\n')\n"
                "    os.write(2, b'F0000 00:00:1.3 7 port.cc:1] Check failed: AVX not available\\n')\n"
                "    os.abort()")
    assert done.returncode == -6
    assert done.stderr == "F0000 00:00:1.3 7 port.cc:1] Check failed: AVX not available\n"


def test_no_descriptor_or_process_is_left():
    """In a process of its own: a test worker's other threads open and close descriptors meanwhile."""
    done = _run("import os; from xray_core.native_stderr import dropped\n"
                "before = sorted(os.listdir('/proc/self/fd'))\n"
                "for _ in range(3):\n"
                f"    with dropped({NOISE!r}):\n"
                "        os.write(2, b'I0000 00:00:1.2 7 cudart_stub.cc:31] x\\n')\n"
                "after = sorted(os.listdir('/proc/self/fd'))\n"
                "children = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
                "print(before == after, children)")
    assert (done.returncode, done.stdout, done.stderr) == (0, "True []\n", "")


def test_a_process_without_stderr_runs_the_block_as_it_is():
    """Started with file descriptor 2 closed (some daemons are): the block runs, nothing is redirected."""
    done = subprocess.run([sys.executable, "-c", "from xray_core.native_stderr import dropped\n"
                           "with dropped('x'):\n    print('inside')\nprint('after')"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60, cwd=ROOT,
                          preexec_fn=lambda: os.close(2))
    assert (done.returncode, done.stdout) == (0, "inside\nafter\n")


@pytest.mark.slow
def test_tensorflow_starts_without_a_line_on_stderr():
    """train.tf_start.start() in a fresh process: TensorFlow 2.21 prints 7 lines there as it loads and looks for
    devices (absl, oneDNN, CUDA) whatever TF_CPP_MIN_LOG_LEVEL says; dropped, none reach the command's stderr."""
    done = _run("from train import tf_start; tf_start.start(); import tensorflow as tf; print(tf.__version__)",
                timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2.")
    assert done.stderr == ""


def test_a_signal_to_the_commands_group_does_not_reach_the_filter():
    """Review: Ctrl-C reaches a terminal's whole process group; the filter, until it ignored SIGINT a few ms into
    its start, would have died of it with a traceback and taken the block's later lines with it. It runs in a
    session of its own."""
    code = ("import os, signal, time; from xray_core.native_stderr import dropped\n"
            "signal.signal(signal.SIGINT, lambda *args: None)  # the command's own handler\n"
            f"with dropped({NOISE!r}):\n"
            "    os.killpg(0, signal.SIGINT)\n"
            "    time.sleep(0.3)\n"
            "    os.write(2, b'after the signal\\n')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          start_new_session=True)
    assert (done.returncode, done.stderr) == (0, "after the signal\n")

