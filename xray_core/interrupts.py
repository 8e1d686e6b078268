"""Ctrl-C and SIGTERM for a command: stop at once, except while its outputs are being published.

`python -m batch_job` and `python -m export` install GATE.handler for SIGINT (Ctrl-C) and SIGTERM (what
`docker stop`, systemd and Kubernetes send). Outside GATE.deferred() the signal raises KeyboardInterrupt, or
Terminated for SIGTERM: the command removes its temp or staging folder, publishes nothing (the job leaves the ledger
as it was) and exits 130 or 143. Inside it (the job publishing OUT_DIR and committing its ledger; export renaming
its staging folder to the version and rewriting config.pbtxt) the signal is held until the section ends, so nothing
is left half-done; the command then says the signal arrived, and export's last line after a signal says whether
the version was published. Once a command has done its work and published it, GATE.hold() holds every later
signal for good: the interpreter's exit that follows (a second, with TensorFlow loaded) must not turn a command
that succeeded into exit 130 or 143, which mean "nothing published".
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from xray_core.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: a closed terminal, unless ignored (nohup)


class InterruptGate:
    def __init__(self):
        self.depth = 0
        self.pending = 0  # the signal held while publishing; 0: none
        self.raised = 0  # the signal the handler last raised for; 0: none
        self.on_interrupt: list = []  # called with the signal number before the handler raises (batch_job/runner.py)
        self._unraisable = sys.unraisablehook  # the hook install() replaced

    def handler(self, signum, frame):
        if self.depth:
            self.pending = self.pending or signum
            return
        signum = self.raised or signum  # the first signal says how the command ended (QA: SIGTERM, then a SIGHUP
        self.raised = signum  # 200 ms into its clean-up, ended it with 129 "terminated (SIGHUP)")
        for call in list(self.on_interrupt):
            call(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    def install(self) -> dict:
        """-> the handlers it replaced (signal number -> handler), for :meth:`uninstall`. Also keeps Python from
        printing "Exception ignored in ..." with a traceback for an interrupt this handler raised inside a finaliser
        (check() raises it again where the command can stop cleanly); any other goes to the hook it replaced."""
        self.raised = 0
        if sys.unraisablehook != self.unraisable:
            self._unraisable = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        return {signum: signal.signal(signum, self.handler) for signum in SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}  # nohup's ignored SIGHUP stays ignored

    def uninstall(self, previous: dict) -> None:
        """Put back the signal handlers install() replaced (`previous`), and the unraisable hook."""
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be set back
                signal.signal(signum, handler)
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = self._unraisable

    def finish(self, previous: dict, exiting: bool) -> str:
        """A command's end: for the process's own command that succeeded (`exiting`), hold every later signal through
        the interpreter's exit (TensorFlow's teardown, a second), which would otherwise say 130/143, "nothing
        published" (putting back the default handler first left an instant for exit 143 without a line); else put
        back the handlers it replaced. -> the name of a signal held while publishing ("" when none)."""
        if exiting:
            self.hold()
        else:
            self.uninstall(previous)
        return self.take_pending()

    def unraisable(self, unraisable) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and self.raised):
            self._unraisable(unraisable)

    def check(self) -> None:
        """Raise again the interrupt the handler raised, if any: an extension may have swallowed it inside its C code
        (TensorFlow importing a module while training ran on), and Python drops one raised inside a finaliser (a
        `__del__` or weakref callback the garbage collector runs: "Exception ignored in ..."), so long work checks at
        safe points, and always before it publishes."""
        if self.raised:
            raise KeyboardInterrupt if self.raised == signal.SIGINT else Terminated(self.raised)

    def as_interrupt(self, exc: BaseException) -> KeyboardInterrupt | None:
        """`exc` as the interrupt it stands for: itself for a KeyboardInterrupt (Terminated too); for another
        exception raised after the handler raised (an extension that turned the interrupt raised inside its C code
        into its own error: TensorFlow gives a TypeError), the interrupt; else None, a failure of its own."""
        if isinstance(exc, KeyboardInterrupt):
            return exc
        if not self.raised:
            return None
        return KeyboardInterrupt() if self.raised == signal.SIGINT else Terminated(self.raised)

    def wait_raised(self, seconds: float) -> bool:
        """Whether the handler raises for a signal within `seconds` (from another thread: the main thread runs the
        handler as soon as it can)."""
        deadline = time.monotonic() + seconds
        while not self.raised and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(self.raised)

    def take_pending(self) -> str:
        """The name of the signal held while publishing ("" when none), forgotten once taken."""
        held, self.pending = self.pending, 0
        return "" if not held else "Ctrl-C" if held == signal.SIGINT else signal.Signals(held).name

    def hold(self) -> None:
        """Hold every signal from now on (the command's outputs are published; the process is about to exit). In the
        main thread the signals are ignored from here: the interpreter's exit puts back the default handler of every
        signal that has a Python handler, and a SIGTERM in the rest of that exit then ended a night that was
        published and committed with 143, "nothing published" (QA: 5 of 5 sent within 30 ms of the last line)."""
        self.depth += 1
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    @contextlib.contextmanager
    def held(self):
        """Hold a signal for a few statements that must not be split, such as making a temporary folder and naming it
        where the caller's cleanup will find it; one that came meanwhile is raised at the end, as if it came then,
        also when the statements raised (it then takes the place of their error: the command was told to stop)."""
        try:
            with self.deferred():
                yield
        finally:
            if not self.depth and self.pending:
                self.raised, self.pending = self.pending, 0
                self.check()


GATE = InterruptGate()

INTERRUPTED = (130, 143, 129)  # the exit codes of a command stopped by Ctrl-C, SIGTERM or SIGHUP: nothing published


def exit_with(code: int):
    """End the process with a command's exit code. After a signal (130, 143) the command has already removed what it
    started and said so on its last line; the interpreter's own exit is skipped, because it then runs exit hooks and
    finalisers of libraries the signal stopped midway (TensorFlow's left a stray `TypeError` traceback after that line
    in CI, once in hundreds of runs). `python -m batch_job` does the same for every failure (batch_job/__main__.py)."""
    if code in INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
