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

from xray_core.files import hold_lock, make_folders, remove_abandoned, remove_dir, remove_folders, temp_dir_beside
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
    live export is staging the same version (QA: the second of two exports to one name did all its work, then
    failed as the first had published that version)."""
    made: list[str] = []
    staging = ""
    try:
        made = make_folders(os.path.dirname(final))
        remove_abandoned_staging(os.path.dirname(final))
        busy = live_staging(final)
        if busy:
            raise PackageError(f"another export is publishing {final} (its staging folder {busy} is held by a "
                               "running process): wait for it, or give another --version; nothing published")
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


def live_staging(final: str) -> str:
    """The name of a staging folder of `final`'s version that a running export holds ('' if none): after
    :func:`remove_abandoned_staging`, every staging folder left is held."""
    prefix = os.path.basename(final) + ".tmp-"
    held = [e for e in sorted(os.listdir(os.path.dirname(final))) if STAGING.match(e) and e.startswith(prefix)]
    return held[0] if held else ""


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
