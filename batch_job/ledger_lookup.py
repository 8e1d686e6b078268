"""The worker side of the ledger (batch_job/ledger.py): what an earlier night recorded for a file, through one
read-only connection per worker process."""
from __future__ import annotations

import functools
import os
import pathlib
import sqlite3
from dataclasses import dataclass

from xray_core.dicom_header import DEFAULT_MODALITIES, refusal_holds


def read_only(path: str) -> sqlite3.Connection:
    uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"  # escapes '#', '?', '%' in the path
    return sqlite3.connect(uri, uri=True, check_same_thread=False)


READERS_KEPT = 4  # per worker process; a long-lived Dask worker sees one ledger after another


@functools.lru_cache(maxsize=READERS_KEPT)
def _reader(path: str, device: int, inode: int) -> sqlite3.Connection:
    """A read-only connection, shared by the worker threads of a process; the READERS_KEPT most recently
    used are kept (one dropped from the cache is closed when garbage-collected, after any thread using it)."""
    return read_only(path)


def printable(path: str) -> str:
    """A path as tables scored and out_of_scope store it: bytes that are not valid UTF-8 as U+FFFD (informational)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Earlier:
    """What an earlier night recorded for these bytes and this model: a probability, or why it was out of scope."""

    sha256: str
    probability: float | None
    reason: str = ""
    path: str = ""  # the path the night that scored or refused them recorded
    run_id: str = ""  # that night's run


def _earlier(conn, sha256: str, model: str, modalities: tuple[str, ...]) -> Earlier | None:
    row = conn.execute("SELECT probability, path, run_id FROM scored WHERE sha256 = ? AND model = ?",
                       (sha256, model)).fetchone()
    if row:
        return Earlier(sha256, float(row[0]), path=row[1], run_id=row[2])
    row = conn.execute("SELECT reason, path, run_id FROM out_of_scope WHERE sha256 = ? AND model = ?",
                       (sha256, model)).fetchone()
    if not row:
        return None
    return Earlier(sha256, None, row[0], row[1], row[2]) if refusal_holds(row[0], modalities) else None


def lookup_unchanged(path: str, file_path: str, found: tuple[int, int, int], model: str,
                     modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> Earlier | None:
    """Worker side: what an earlier night recorded when the file's (size, mtime_ns, ctime_ns) as `found` now are
    what it recorded under its path and this model scored or refused those bytes (under these allowed
    modalities, for a refusal by Modality); else None."""
    st = os.stat(path)
    conn = _reader(path, st.st_dev, st.st_ino)
    row = conn.execute("SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
                       (os.fsencode(file_path), *found)).fetchone()
    return _earlier(conn, row[0], model, modalities) if row else None


def known_path(path: str, file_path: str, earlier: Earlier) -> bool:
    """Worker side: has the ledger seen the bytes `earlier` found at `file_path` (table ``files``, or the path
    recorded with those bytes: ledgers from before that table)? A skipped file for which it has not is a new name for
    bytes an earlier night read: a copy sent again (also under a name once used for other bytes: exports that
    recycle IM000001), a file moved or renamed."""
    if printable(file_path) == earlier.path:  # as stored (review: a name not UTF-8 never matched)
        return True
    st = os.stat(path)
    conn = _reader(path, st.st_dev, st.st_ino)
    return conn.execute("SELECT 1 FROM files WHERE path = ? AND sha256 = ?",
                        (os.fsencode(file_path), earlier.sha256)).fetchone() is not None


def lookup(path: str, sha256: str, model: str, modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> Earlier | None:
    """Worker side: an earlier night's score or refusal of these bytes by this model (a refusal by Modality: under
    these allowed modalities), or None."""
    st = os.stat(path)  # a ledger file replaced at the same path gets a new reader
    return _earlier(_reader(path, st.st_dev, st.st_ino), sha256, model, modalities)
