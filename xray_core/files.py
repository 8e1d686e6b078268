"""Atomic directory publishing shared by train, export and batch_job (no TensorFlow)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Callable


def temp_dir_beside(final: str, tag: str = "tmp") -> str:
    """A new empty directory next to `final` (same filesystem, so a rename publishes it).

    mkdtemp makes 0700; the directory gets the permissions a plain mkdir would (umask).
    """
    final = os.path.abspath(final)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(final)}.{tag}-", dir=os.path.dirname(final))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_dir(tmp: str, final: str, replace: bool = False) -> None:
    """Rename `tmp` to `final`. With `replace`, an existing `final` is swapped out, then deleted."""
    final = os.path.abspath(final)
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)  # an empty directory stands in for nothing
    if os.path.exists(final):
        if not replace:
            raise FileExistsError(final)
        trash = tempfile.mkdtemp(prefix=f"{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(trash, "old"))
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def sha256_file(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str, write: Callable[[IO[str]], object]) -> None:
    """Write a text file via a temp file beside it and rename: readers see all of it or nothing.

    Text is UTF-8; undecodable file names (surrogate escapes from os.walk) are written back as their bytes.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
