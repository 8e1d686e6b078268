"""Atomic directory publishing shared by train, export and batch_job (no TensorFlow), and whether one path lies
inside another (:func:`inside`), which each uses to keep its outputs apart from what it reads.

A folder that a process works in beside its final place (a temp dir, or an old output parked during a
replace) can hold LOCK_FILE: created already flock'ed by that process and naming it (pid@host). The lock
ends when the process does, however it ends, so a later process can tell a dead owner's folder (the lock
can be taken) from a live one's, on any host and in containers where every process is PID 1.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import uuid
from typing import IO, Callable

LOCK_FILE = ".owner.lock"
PRIVATE = 0o027  # no write for the group, nothing for others


@contextlib.contextmanager
def private_umask():
    """While a command runs, whatever it creates (the job's OUT_DIR and ledger, train's RUN_DIR) is readable by its
    owner and group only: umask 027 added to the one it was given. They hold patient data (paths, identifiers)."""
    old = os.umask(PRIVATE)
    os.umask(old | PRIVATE)
    try:
        yield
    finally:
        os.umask(old)


def temp_dir_beside(final: str, tag: str = "tmp") -> str:
    """A new empty directory next to `final` (same filesystem, so a rename publishes it).

    mkdtemp makes 0700; the directory gets the permissions a plain mkdir would (umask), and keeps the setgid bit
    it inherits from a setgid parent (so files made in it keep the parent's group).
    """
    final = os.path.abspath(final)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(final)}.{tag}-", dir=os.path.dirname(final))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (os.stat(tmp).st_mode & stat.S_ISGID) | (0o777 & ~umask))
    return tmp


def publish_dir(tmp: str, final: str, replace: bool = False) -> None:
    """Rename `tmp` to `final` (:func:`_rename_into`), then delete the LOCK_FILE `tmp` held, which travels with the
    rename: a process killed before the rename leaves a temp folder with its lock, which the next run recognises as
    a killed one's (a lockless complete copy no run would ever remove); killed just after, `final` keeps the file.
    The lock itself is held by the open file until the caller releases it."""
    _rename_into(tmp, final, replace)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(final, LOCK_FILE))  # no part of the output


def _rename_into(tmp: str, final: str, replace: bool) -> None:
    """Rename `tmp` to `final`. With `replace`, an existing `final` is parked as ``final.old-XXXXXXXX/old``
    (a folder holding this process's LOCK_FILE), `tmp` takes its place, then the parked one is deleted. If
    that second rename fails, the parked one is put back. Only a process killed between the two renames
    leaves it parked: batch_job/outdir.py restores it."""
    final = os.path.abspath(final)
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)  # an empty directory stands in for nothing
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    if not replace:
        raise FileExistsError(final)
    trash = tempfile.mkdtemp(prefix=f"{os.path.basename(final)}.old-", dir=os.path.dirname(final))
    parked, lock = os.path.join(trash, "old"), None
    try:
        lock = hold_lock(trash)
        os.rename(final, parked)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(parked, final)  # the old one back in its place
            raise
    finally:
        if os.path.exists(final) or not os.path.lexists(parked):  # never delete the only copy
            remove_dir(trash)
        if lock is not None:
            lock.close()


def hold_lock(folder: str) -> IO[str]:
    """Create folder/LOCK_FILE, naming this process (pid@host), already flock'ed (it appears under its name
    only once locked). Keep the returned file open while the folder is in use: closing it, or the process
    ending, releases the lock."""
    staged = os.path.join(folder, f"{LOCK_FILE}.{uuid.uuid4().hex}")
    f = open(staged, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}@{socket.gethostname()}\n")
        f.flush()
        os.rename(staged, os.path.join(folder, LOCK_FILE))
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, and fails as the write did on a full disk
            f.close()
        with contextlib.suppress(OSError):
            os.remove(staged)
        raise
    return f


def held_by_a_process(folder: str) -> bool:
    """Whether folder/LOCK_FILE is a regular file that a running process holds (a free, missing or odd one: False)."""
    path = os.path.join(folder, LOCK_FILE)
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    lock = take_abandoned_lock(folder)  # None: held (or gone this instant)
    if lock is None:
        return True
    lock.close()
    return False


def take_abandoned_lock(folder: str) -> IO | None:
    """folder/LOCK_FILE, now flock'ed by this process, if no process holds it (its owner is gone);
    None if it is held, missing, or not a regular file. Close it when done with the folder."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    f = os.fdopen(fd, "r+")
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
    except OSError:
        pass
    f.close()
    return None


def remove_abandoned(parent: str, name: re.Pattern) -> list[str]:
    """Remove the folders in `parent` whose name matches `name` (temp folders of one kind) and whose LOCK_FILE no
    process holds (their process was killed: SIGKILL, a crash); -> their names. A folder without a lock file, or a
    link, is left alone."""
    removed = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if name.match(entry) and os.path.isdir(path) and not os.path.islink(path):
            lock = take_abandoned_lock(path)
            if lock is not None:
                with lock:
                    remove_dir(path)
                removed.append(entry)
    return removed


def remove_dir(path: str) -> None:
    """Delete a temp or parked folder, its LOCK_FILE last, so one left half-deleted by a killed process is
    still recognisable by its lock. Best effort: what cannot be deleted stays."""
    try:
        names = sorted(os.listdir(path), key=lambda name: name == LOCK_FILE)
    except OSError:
        return
    for name in names:
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(entry)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def sha256_file(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_key(path: str) -> str:
    """A file's sha256, or its path when it is no regular file or cannot be read (what reads it then says why): a
    key that groups byte-identical files and never fails (calibration's copies, the training split's digest)."""
    try:
        return sha256_file(path) if os.path.isfile(path) else path
    except OSError:
        return path


def atomic_write(path: str, write: Callable[[IO], object], binary: bool = False) -> None:
    """Write a file via a temp file beside it and rename: readers see all of it or nothing.

    Text is UTF-8; undecodable file names (surrogate escapes from os.walk) are written back as their bytes.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with (open(tmp, "wb") if binary else
              open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape")) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def blocking_ancestor(path: str) -> str | None:
    """None when `path` can be created (its nearest existing ancestor is a writable folder), else that
    ancestor, for the error message."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) else folder


def make_folders(folder: str) -> list[str]:
    """Create `folder` and its missing ancestors (as os.makedirs); -> the folders this call created, parents
    first, so that a later refusal can remove them again (:func:`remove_folders`). If it fails itself (a path
    over PATH_MAX, a full disk), it removes what it created before raising."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    made = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:  # made meanwhile by someone else: theirs
                continue
            made.append(path)
    except BaseException:
        remove_folders(made)
        raise
    return made


def remove_folders(made: list[str]) -> None:
    """Remove what make_folders created, deepest first, where still empty."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it, as the paths are written (:func:`inside` resolves them first)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _identities(path: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of `path` and of each of its ancestors that exists."""
    found = set()
    while True:
        try:
            st = os.stat(path)
            found.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return found
        path = parent


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it: as real paths (symlinks resolved), or because `folder` is the
    same file as `path` or one of its existing ancestors (bind mounts, case-insensitive file systems)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    if within(path, folder):
        return True
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _identities(path)
