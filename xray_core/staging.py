"""A version's staging folder in the serving folder: built there, verified, then published by rename (export/).

Each export locks its staging folder (LOCK_FILE, xray_core/files.py) until it is published or discarded; a staging
folder whose lock no process holds was left by an export that was killed (SIGKILL, a crash), and the next export of
that model name removes it. Only folders named as staging folders are touched.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from xray_core.files import (
    held_by_a_process,
    hold_lock,
    make_folders,
    remove_abandoned,
    remove_dir,
    remove_folders,
    temp_dir_beside,
)
from xray_core.package import PackageError

PUBLISHED: list[str] = []  # the versions this process published: what export's last line says after a late signal

STAGING = re.compile(r"\d+\.tmp-[a-z0-9_]{8}\Z")  # an export's staging folder (temp_dir_beside's name for a version)
_staging_locks: dict[str, Any] = {}  # staging folder -> its lock file, while this process's export uses it
_made_for: dict[str, list[str]] = {}  # staging folder -> the folders made for it (serving, name), removed if unused


def staging_dir(final: str, serving_dir: str) -> str:
    """An empty temporary folder beside `final` (its name folder made if needed), locked by this process until
    :func:`release_staging`. Staging folders of exports that were killed (their lock free) are removed first.
    The serving and name folders this call makes are removed again by :func:`discard_staging` while empty: a
    refused export leaves nothing. PackageError (one line) when the serving folder cannot be written, or when a
    running export is staging the same version (:func:`refuse_live_staging`)."""
    made: list[str] = []
    staging = ""
    try:
        made = make_folders(os.path.dirname(final))
        remove_abandoned_staging(os.path.dirname(final))
        refuse_live_staging(final)
        staging = temp_dir_beside(final)
        _staging_locks[staging] = hold_lock(staging)
        _made_for[staging] = made
        return staging
    except OSError as exc:  # a full disk: the lock file could not be written
        if staging:
            with contextlib.suppress(OSError):
                os.rmdir(staging)
        remove_folders(made)
        raise PackageError(f"cannot write to serving dir {serving_dir}: {exc.strerror}") from None


def refuse_live_staging(final: str) -> None:
    """PackageError (one line) when a running export holds a staging folder of `final`'s version (QA: the second of
    two exports to one name did all its work, then failed as the first had published that version). A staging folder
    without a lock, or whose lock is free, does not count (review: a lockless leftover blocked the version for good)."""
    name_dir = os.path.dirname(final)
    prefix = os.path.basename(final) + ".tmp-"
    for entry in sorted(os.listdir(name_dir)) if os.path.isdir(name_dir) else []:
        path = os.path.join(name_dir, entry)
        if STAGING.match(entry) and entry.startswith(prefix) and not os.path.islink(path) and held_by_a_process(path):
            raise PackageError(f"another export is publishing {final} (its staging folder {entry} is held by a "
                               "running process): wait for it, or give another --version; nothing published")


def remove_abandoned_staging(name_dir: str) -> None:
    """Remove the staging folders in a model's folder whose export is gone (SIGKILL, a crash): only folders named
    as staging folders, holding a lock no process holds."""
    remove_abandoned(name_dir, STAGING)


def release_staging(staging: str) -> None:
    """Let go of a staging folder's lock: once it is published (renamed) or removed."""
    _made_for.pop(staging, None)
    lock = _staging_locks.pop(staging, None)
    if lock is not None:
        lock.close()


def discard_staging(staging: str) -> None:
    """Remove a staging folder that will not be published (its lock file last) and release it, then the folders
    made for it where they are still empty."""
    made = _made_for.get(staging, [])
    remove_dir(staging)
    release_staging(staging)
    remove_folders(made)
