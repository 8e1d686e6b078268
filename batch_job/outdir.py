"""OUT_DIR: kept apart from the inputs, the ledger and the model, built as a temp dir beside it, published by rename.

The temp dir is ``OUT_DIR.tmp-<pid>@<host>-XXXXXXXX``; the job holds a lock on a file in it (LOCK_FILE,
xray_core/files.py) until it is published or discarded. A failed job renames its own ``....discarded`` and
removes it. The next job writing into the same parent folder removes every temp dir there whose lock is free (its
job was killed), whatever OUT_DIR it was for (nightly jobs write a new dated OUT_DIR each night), and the next
job on the same OUT_DIR restores an OUT_DIR that an --overwrite killed between its two renames left parked as
``OUT_DIR.old-XXXXXXXX/old``. It touches nothing else: only folders in OUT_DIR's parent named exactly so, holding
LOCK_FILE, its lock free, and nothing but what the job writes there (batch_job/leftovers.py).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import stat
from typing import IO

from batch_job.errors import InputError, JobError
from batch_job.leftovers import ANY_TEMP, foreign, parked_name
from batch_job.listing import input_root, is_uri
from xray_core.files import (
    PRIVATE,
    blocking_ancestor,
    hold_lock,
    inside,
    make_folders,
    publish_dir,
    remove_dir,
    remove_folders,
    temp_dir_beside,
    within,
)

LOG = logging.getLogger("batch_job")
# OUT_DIR and the ledger name patients' files (and their DICOM fields): readable by the owner and the group only
# (docs/operations.md, "Who reads OUT_DIR"), never writable by the group
_held: dict[str, IO] = {}  # temp dir -> its lock file, while this process's job uses it
_made: dict[str, list[str]] = {}  # temp dir -> the parent folders prepare() made for it, removed with it if unused


def _kept_folder(path: str, out: str) -> str | None:
    """The temp dir (of a job on any OUT_DIR) or this OUT_DIR's parked folder in OUT_DIR's parent that `path` is
    or lies in, if any: the job's cleanup may remove them."""
    path, out = os.path.realpath(path), os.path.realpath(out)
    parent, base = os.path.split(out)
    if path == parent or not within(path, parent):
        return None
    first = os.path.relpath(path, parent).split(os.sep)[0]
    ours = ANY_TEMP.match(first) or parked_name(base).match(first)
    return os.path.join(parent, first) if ours else None


def refuse_overlaps(inputs: list[str], output: str, ledger: str | None, model_dir: str) -> None:
    """InputError unless OUT_DIR and every local input (its root: :func:`input_root`) and the model package
    are disjoint, the ledger lies inside none of them, and no input or ledger lies in one of the folders the
    job keeps beside OUT_DIR (its later cleanup must never reach them). Nothing is written."""
    read = [(f"--input {arg}", input_root(arg)) for arg in inputs if not is_uri(arg)]
    read.append((f"--model (package {model_dir})", model_dir))
    for what, root in read:
        if inside(output, root) or inside(root, output):
            raise InputError(f"--output {output} and {what} overlap (one contains the other); "
                             "the job never writes where it reads")
    kept = read[:-1] + ([(f"--ledger {ledger}", ledger)] if ledger else [])
    for what, path in kept:
        folder = _kept_folder(path, output)
        if folder:
            raise InputError(f"{what} lies in {folder}, a temporary or parked folder of batch jobs beside "
                             f"--output {output}; move it or choose another --output")
    if ledger:
        for what, root in read + [(f"--output {output}", output)]:
            if inside(ledger, root):
                raise InputError(f"--ledger {ledger} lies inside {what}; keep it outside the inputs, the model "
                                 "and the output")


def _holds_working_dir(out: str) -> bool:
    try:
        return inside(os.getcwd(), out)
    except OSError:  # the working directory is gone
        return False


def _is_empty(folder: str) -> bool:
    try:
        return not os.listdir(folder)
    except OSError:  # unreadable: it may hold anything
        return False


def _unremovable(out: str) -> tuple[str, str] | None:
    """The first folder at or below OUT_DIR that the job may not empty, and why, else None: publishing moves an
    existing OUT_DIR into a folder beside it (which needs write permission on OUT_DIR itself) and deletes it. One this
    user lacks read, write or search permission on; or a mount point, whose files are another filesystem's (QA: an
    --overwrite deleted them, then left the folder behind for good). Folders only; an OUT_DIR holds a few."""
    lacking = "this user may not delete what {} holds (it needs read, write and search permission there)"
    mounted = "{} is a mount point: the job never deletes another filesystem's files"
    if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        return out, lacking
    real = os.path.realpath(out)
    inside = sorted(m for m in mount_points() if m.startswith(real + os.sep))
    if inside:  # a bind mount of a folder of the same filesystem too, which os.path.ismount does not see (QA)
        return inside[0], mounted
    for dirpath, dirnames, _ in os.walk(out):
        for path in (os.path.join(dirpath, name) for name in dirnames):
            if os.path.islink(path):
                continue
            if os.path.ismount(path):
                return path, mounted
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                return path, lacking
    return None


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace (Linux's /proc/self/mountinfo: bind mounts included);
    empty where it cannot be read (the walk's os.path.ismount still sees mounts of other filesystems)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ") for line in f]
    except OSError:
        return set()
    # the fifth field, with spaces, tabs, newlines and backslashes written as octal escapes (\040 ...)
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4]) for f in fields if len(f) > 4}


def refuse_existing(out: str, overwrite: bool) -> None:
    """Refuse an OUT_DIR the job cannot replace as a whole (the working directory or a folder holding it, a
    symbolic link, anything but a folder), a non-empty one (unless overwrite) and one that cannot be created.
    Nothing is written."""
    if _holds_working_dir(out):
        raise InputError(f"output dir {out} is the current directory or holds it; the job replaces OUT_DIR as a "
                         "whole: name a folder of its own")
    if os.path.islink(out):
        raise InputError(f"output dir {out} is a symbolic link; the job replaces OUT_DIR as a whole: name the "
                         "folder itself")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"output dir {out} exists and is not a folder; the job never replaces a file")
    if os.path.ismount(out):  # it failed (EBUSY) only after the whole night was scored
        raise InputError(f"output dir {out} is a mount point; the job replaces OUT_DIR as a whole by renaming: name "
                         "a folder inside it")
    filled = os.path.isdir(out) and not _is_empty(out)  # an empty one stands in for nothing: it is just removed
    # QA: "pass --overwrite" deleted a colleague's notes without a word. Counted, named at DEBUG (a name may be a
    # patient's: a scan copied in)
    others = foreign(out) if filled else []
    what = f"{len(others)} file(s) or folder(s) the job did not write (--log-level DEBUG names them)"
    if others:
        LOG.debug("in %s, not written by the job: %s", out, ", ".join(others))
    if filled and not overwrite:
        raise InputError(f"output dir {out} exists and holds {what}: name another folder (--overwrite would "
                         "delete them with the rest)" if others else
                         f"output dir {out} exists and is not empty (pass --overwrite to replace it)")
    if others:
        LOG.warning("--overwrite: %s holds %s; they are deleted with the rest when this night's outputs are "
                    "published", out, what)
    locked = _unremovable(out) if filled else None
    if locked:  # it failed only after the whole night was scored (moving OUT_DIR aside needs write permission on it)
        raise InputError(f"output dir {out} cannot be replaced: {locked[1].format(locked[0])}")
    blocked = blocking_ancestor(out)
    if blocked:
        raise InputError(f"output dir {out} is not writable: {blocked} is not a writable folder")


NAME_MAX = 255  # bytes of one file name (ext4, xfs, btrfs, tmpfs)


def prepare(out: str, overwrite: bool) -> str:
    """Refuse an OUT_DIR it cannot use (:func:`refuse_existing`); -> a new temp dir beside it, locked by this
    job. A refusal leaves no folder behind."""
    refuse_existing(out, overwrite)
    made: list[str] = []
    tmp = ""
    try:
        made = make_folders(os.path.dirname(out))
        tmp = temp_dir_beside(out, f"tmp-{os.getpid()}@{socket.gethostname()}")
        _held[tmp] = hold_lock(tmp)
    except BaseException as exc:  # an OSError: not writable, or a full disk that the lock file could not be written to
        if tmp:
            with contextlib.suppress(OSError):
                os.rmdir(tmp)
        remove_folders(made)
        name = len(os.fsencode(os.path.basename(os.path.abspath(out))))
        suffix = f".tmp-{os.getpid()}@{socket.gethostname()}-XXXXXXXX"  # temp_dir_beside's name (QA)
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG and name <= NAME_MAX < name + len(suffix):
            raise InputError(f"output dir name {os.path.basename(out)!r} is too long: the job's temporary folder "
                             f"beside it adds {len(suffix)} characters ({suffix}) to a name the file system allows "
                             f"{NAME_MAX} bytes of; give a shorter --output") from None
        if isinstance(exc, OSError):
            raise InputError(f"output dir {out} is not writable: {exc.strerror}") from None
        raise
    _made[tmp] = made
    return tmp


def make_private(folder: str) -> None:
    """`folder` and everything under it readable by the owner and group only: files that workers elsewhere (a
    Dask cluster) wrote follow their own umask. Setgid bits stay (a group-owned parent's group is kept)."""
    for dirpath, _, filenames in os.walk(folder):
        for path in [dirpath] + [os.path.join(dirpath, name) for name in filenames]:
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & PRIVATE:
                os.chmod(path, stat.S_IMODE(mode) & ~PRIVATE)


def remove_scratch(scratch: str) -> None:
    """The job's scratch folder, once the driver has read it: nothing of it is published."""
    shutil.rmtree(scratch)


def _release(tmp: str) -> None:
    lock = _held.pop(tmp, None)
    if lock is not None:
        lock.close()


def publish(tmp: str, out: str, overwrite: bool) -> None:
    """Rename the temp dir to OUT_DIR (replacing it with overwrite; its lock file goes with the rename and is then
    deleted: xray_core.files.publish_dir); on failure the temp dir is discarded."""
    try:
        make_private(tmp)
        publish_dir(tmp, out, replace=overwrite)
    except OSError as exc:
        discard(tmp)
        if isinstance(exc, FileExistsError):
            raise JobError(f"output dir {out} was created by someone else while the job ran; the scores were "
                           "discarded, nothing published (rerun with another --output, or --overwrite)") from None
        raise
    else:
        _made.pop(tmp, None)
    finally:
        _release(tmp)


def discard(tmp: str) -> None:
    """Remove a failed job's temp dir. Renamed first: workers still running (threads after Ctrl-C,
    Dask tasks after a driver failure) then fail to create files in it instead of racing the removal.
    The lock file goes last, so a later job still cleans up what a kill in between leaves."""
    gone = tmp + ".discarded"
    try:
        os.rename(tmp, gone)
    except OSError:
        gone = tmp
    remove_dir(gone)
    _release(tmp)
    remove_folders(_made.pop(tmp, []))  # a parent the job made, where still empty: a failed job leaves nothing
