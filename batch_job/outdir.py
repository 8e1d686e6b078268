"""OUT_DIR: kept apart from the inputs and the ledger, built as a temp dir beside it, published by rename.

The temp dir is ``OUT_DIR.tmp-<pid>@<host>-<random>``; a failed job's is renamed ``....discarded`` and
removed; one left by a killed job is removed by the next job on the same OUT_DIR, and an OUT_DIR parked
as ``OUT_DIR.old-<random>/old`` by an --overwrite killed between its two renames is restored.
"""
from __future__ import annotations

import json
import os
import shutil
import socket

from batch_job.errors import InputError
from batch_job.listing import input_root, is_uri
from xray_core.files import publish_dir, temp_dir_beside


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlaps(inputs: list[str], output: str, ledger: str | None) -> None:
    """InputError unless OUT_DIR and every local input (its root: :func:`input_root`) are disjoint, and the
    ledger lies inside neither. Real paths: symlinks resolved. Nothing is read or written."""
    out = os.path.realpath(output)
    roots = [(arg, os.path.realpath(input_root(arg))) for arg in inputs if not is_uri(arg)]
    for arg, root in roots:
        if _within(out, root) or _within(root, out):
            raise InputError(f"--output {output} and --input {arg} overlap (one contains the other); "
                             "the job never writes where it reads")
    if ledger:
        book = os.path.realpath(ledger)
        for arg, root in roots:
            if _within(book, root):
                raise InputError(f"--ledger {ledger} lies inside --input {arg}; keep it outside the inputs")
        if _within(book, out):
            raise InputError(f"--ledger {ledger} lies inside --output {output}; keep it outside the output")


def clean_leftovers(out: str) -> None:
    """Remove the temp dirs of killed jobs on this OUT_DIR (their process on this host is gone) and
    restore an OUT_DIR parked by an --overwrite killed between its two renames."""
    parent, base = os.path.dirname(out), os.path.basename(out)
    try:
        names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        for name in names:
            path = os.path.join(parent, name)
            if name.startswith(base + ".tmp-"):
                pid, _, host = name[len(base) + 5:].rsplit("-", 1)[0].partition("@")
                if pid.isdigit() and host == socket.gethostname() and not _alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(base + ".old-"):
                parked = os.path.join(path, "old")
                if os.path.isdir(parked) and not os.path.exists(out):
                    os.rename(parked, out)
                shutil.rmtree(path, ignore_errors=True)
    except OSError as exc:
        raise InputError(f"output dir {out} is not writable: {exc.strerror}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned(out: str, book) -> bool:
    """OUT_DIR was published by a job on this ledger that was killed before its ledger commit."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return m.get("ledger") == book.path and bool(m.get("run_id")) and not book.knows_run(m["run_id"])


def prepare(out: str, overwrite: bool) -> str:
    """Refuse a non-empty OUT_DIR (unless overwrite); -> a new temp dir beside it."""
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"output dir {out} exists and is not empty (pass --overwrite to replace it)")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        return temp_dir_beside(out, f"tmp-{os.getpid()}@{socket.gethostname()}")
    except OSError as exc:
        raise InputError(f"output dir {out} is not writable: {exc.strerror}") from None


def publish(tmp: str, out: str, overwrite: bool) -> None:
    """Rename the temp dir to OUT_DIR (replacing it with overwrite); on failure the temp dir is discarded."""
    try:
        publish_dir(tmp, out, replace=overwrite)
    except OSError as exc:
        discard(tmp)
        if isinstance(exc, FileExistsError):
            raise InputError(f"output dir {out} was created by someone else during the run; "
                             "nothing published (rerun with another --output or --overwrite)") from None
        raise


def discard(tmp: str) -> None:
    """Remove a failed job's temp dir. Renamed first: workers still running (threads after Ctrl-C,
    Dask tasks after a driver failure) then fail to create files in it instead of racing rmtree.
    The new name keeps the temp dir's prefix, so a later job cleans up what remains."""
    gone = tmp + ".discarded"
    try:
        os.rename(tmp, gone)
    except OSError:
        gone = tmp
    shutil.rmtree(gone, ignore_errors=True)
