"""xray_core.native_stderr.held_back: what native code writes straight to file descriptor 2 while a library loads
is dropped when the load succeeds and shown when it fails; stderr is the command's own again afterwards."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xray_core.native_stderr import held_back

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lines_written_to_fd_2_during_a_block_that_succeeds_are_dropped(capfd):
    with held_back():
        os.write(2, b"I0000 cudart_stub.cc:31] Could not find cuda drivers\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_in_a_process_pythons_own_writes_to_stderr_are_held_back_too():
    """sys.stderr is file descriptor 2 in a command (pytest's capture replaces it, hence a process)."""
    code = ("import sys; from xray_core.native_stderr import held_back\n"
            "with held_back():\n    print('a deprecation warning', file=sys.stderr)\n"
            "print('error: one line', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stderr) == (0, "error: one line\n")


def test_lines_written_during_a_block_that_fails_are_shown_before_the_error_propagates(capfd):
    with pytest.raises(ImportError, match="libcudnn"):
        with held_back():
            os.write(2, b"E0000 dso_loader: could not load libcudnn.so.9\n")
            raise ImportError("libcudnn.so.9: cannot open shared object file")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "E0000 dso_loader: could not load libcudnn.so.9\nafter\n"


def test_an_interrupt_during_the_block_drops_the_lines_and_still_propagates(capfd):
    with pytest.raises(KeyboardInterrupt):
        with held_back():
            os.write(2, b"noise\n")
            raise KeyboardInterrupt
    assert capfd.readouterr().err == ""


def test_no_descriptor_is_left_open():
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with held_back():
            os.write(2, b"x\n")
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.slow
def test_tensorflow_starts_without_a_line_on_stderr():
    """train.tf_start.start() in a fresh process: TensorFlow 2.21 prints 7 lines there as it loads and looks for
    devices (absl, oneDNN, CUDA) whatever TF_CPP_MIN_LOG_LEVEL says; held back, none reach the command's stderr."""
    code = "from train import tf_start; tf_start.start(); import tensorflow as tf; print(tf.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2.")
    assert done.stderr == ""


def test_a_process_without_stderr_runs_the_block_as_it_is():
    """Started with file descriptor 2 closed (some daemons are): the block runs, nothing is redirected."""
    code = ("import os; from xray_core.native_stderr import held_back\n"
            "with held_back():\n    print('inside')\n"
            "print('after')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=False, stdout=subprocess.PIPE, text=True,
                          timeout=60, cwd=ROOT, stderr=subprocess.DEVNULL, pass_fds=(), close_fds=True,
                          preexec_fn=lambda: os.close(2))
    assert (done.returncode, done.stdout) == (0, "inside\nafter\n")
