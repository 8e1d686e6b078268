"""Atomic directory publishing shared by train, export and batch_job (no TensorFlow)."""
from __future__ import annotations

import os
import shutil
import tempfile


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
    if os.path.exists(final):
        if not replace:
            raise FileExistsError(final)
        trash = tempfile.mkdtemp(prefix=f"{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(trash, "old"))
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
