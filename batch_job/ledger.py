"""The SQLite ledger of images already scored, for incremental nightly runs.

Keyed by (sha256 of the file's bytes, model `<name>/<version>`). Table `files` remembers each file's sha256 under
its path, size, mtime and ctime, so that a file unchanged since an earlier night is not read again (unchanged.py).
Workers only read it
(one read-only connection per process); the driver holds an exclusive lock file for
the whole run and writes the new entries in one transaction after OUT_DIR is published.
Each run records its run id in table `runs` twice: just before it publishes OUT_DIR, as publishing (images_new
PUBLISHING, -1), then in its commit, which replaces that row. A rerun finding OUT_DIR's run still publishing in the
ledger knows that run was killed between the two, and may replace it (leftovers.orphaned); a ledger without that row
(deleted and made again, or restored from a backup) gives no such evidence. A run whose model has a
drift reference also records its drift figures (table `drift`, one row per run) and the limits they were judged
against (table `drift_limits`, from 2026-12-02: the PSI's default limit depends on the run's size), for report.html's
trend. Table
`models` holds the sha256 of the model.onnx each model id first committed with, `packages` that of what decides a row
besides the image (model.onnx, the preprocessing, the input gate: batch_job/model.py scoring_identity): a package
published again under an id the ledger knows (a version number reused in a new serving folder) is refused, never
handed the other's scores or refusals.
Tables are created if missing: a ledger written before a table existed opens and commits as before.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import stat
from datetime import datetime, timezone
from typing import Iterable

from batch_job.errors import InputError
from batch_job.ledger_lookup import printable, read_only
from batch_job.ledger_schema import SCHEMA, damage, schema_problem, tables
from xray_core.errors import one_line
from xray_core.files import blocking_ancestor, make_folders

LOG = logging.getLogger("batch_job")

FileKey = tuple[str, int, int, int, str]  # (path, size, mtime_ns, ctime_ns, sha256 of the bytes)
PUBLISHING = -1  # runs.images_new of a run that is publishing its OUT_DIR; its commit replaces the row
DRIFT_COLUMNS = ("run_id", "finished_utc", "images", "judged", "detected", "domain_auc", "psi", "positive_rate")
LIMIT_COLUMNS = ("domain_auc_limit", "psi_limit")  # table drift_limits; None in a run's history where it has no row


class LedgerError(InputError):
    """The ledger cannot be used (exit 2); one line."""


class LedgerBusy(LedgerError):
    """Another batch job holds the ledger."""


def check_usable(path: str) -> None:
    """Refuse, creating nothing, what Ledger(path) would refuse or could not commit to: an existing file that is
    not SQLite, another application's database (:func:`schema_problem`), one this process cannot write, a lock
    held by another job, a new ledger whose folder cannot be created."""
    path = os.path.realpath(path)  # one ledger, one lock, whatever the name it is given by (a symlink)
    hot = False  # a journal left by a commit that was killed: only a writer can roll it back
    if os.path.lexists(path):
        problem = None
        try:
            with contextlib.closing(read_only(path)) as conn:
                problem = schema_problem(tables(conn))
        except sqlite3.Error as exc:
            hot = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY_ROLLBACK
            if not hot:
                raise LedgerError(f"ledger {path} is not a usable SQLite ledger: {one_line(exc)}") from None
        if problem:
            raise LedgerError(f"ledger {path} is not a batch job ledger: {problem}; name another --ledger")
        if not os.access(path, os.W_OK):  # also for root: a read-only mount, an immutable file
            raise LedgerError(f"ledger {path} is not writable: each run commits to it")
        names = os.stat(path).st_nlink
        if names > 1:  # the lock is a file beside the name: two nights through two names both ran (QA)
            raise LedgerError(f"ledger {path} has {names} names (hard links): a job started under another name "
                              "would not see this one's lock; keep one name and remove the others")
    try:
        fd = os.open(path + ".lock", os.O_RDWR)
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc.strerror}") from None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if hot:  # while no job writes it: the read-only checks that follow (check_model, ...) can then read it
            _roll_back(path)
        elif os.path.lexists(path):  # read whole only once no other job holds it (QA: 50 s cold on 4 GB)
            _check_pages(path)
    except BlockingIOError:
        raise LedgerBusy(f"ledger {path} is in use by another batch job; run again when it has finished") from None
    finally:
        if fd is not None:
            os.close(fd)
    blocked = blocking_ancestor(path)
    if blocked:
        raise LedgerError(f"cannot open ledger {path}: {blocked} is not a writable folder")


def damaged(path: str, found: str) -> LedgerError:
    return LedgerError(f"ledger {path} is damaged (SQLite quick_check: {found}): restore it from a backup, or name a "
                       "new --ledger (whose first night scores every image again)")


def _check_pages(path: str) -> None:
    try:
        with contextlib.closing(read_only(path)) as conn:
            broken = damage(conn)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path} is not a usable SQLite ledger: {one_line(exc)}") from None
    if broken:
        raise damaged(path, broken)


def _roll_back(path: str) -> None:
    """Roll back the journal a killed commit left (as the job's own connection would), and check the ledger then."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            problem = schema_problem(tables(conn))
            broken = None if problem else damage(conn)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path} is not a usable SQLite ledger: {one_line(exc)}") from None
    if problem:
        raise LedgerError(f"ledger {path} is not a batch job ledger: {problem}; name another --ledger")
    if broken:
        raise damaged(path, broken)


def publishing(path: str, run_id: str) -> str | None:
    """The OUT_DIR that run `run_id` was publishing when it was killed, before its commit (read-only; None when the
    ledger, or its row, is not there: the run was committed, or never got that far)."""
    if not os.path.exists(path):
        return None
    with contextlib.closing(read_only(path)) as conn:
        try:
            row = conn.execute("SELECT out_dir FROM runs WHERE run_id = ? AND images_new = ?",
                               (run_id, PUBLISHING)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
    return row[0] if row else None


class Ledger:
    """Driver side: create, lock, and commit."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)  # a symlink to the ledger takes the same lock as its real name
        self._lock_file = None
        self._created: list[str] | None = None  # what opening created (the ledger was new), for remove_if_new

    def __enter__(self) -> "Ledger":
        try:
            new = not os.path.lexists(self.path) and not os.path.lexists(self.path + ".lock")
            made = make_folders(os.path.dirname(self.path))
            self._created = [*made, self.path + ".lock", self.path] if new else None
            self._lock_file = open(self.path + ".lock", "a+")
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise LedgerBusy(f"ledger {self.path} is in use by another batch job; run again when it has "
                             "finished") from None
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                problem = schema_problem(tables(conn))  # again: a killed commit's journal is rolled back by now
                if not problem:
                    conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            if self._created is not None:  # a new ledger that could not be made (a full disk): nothing left of it
                self.remove_if_new()
                self.__exit__()
                raise LedgerError(f"cannot create ledger {self.path}: {one_line(exc)}") from None
            self.__exit__()
            raise LedgerError(f"ledger {self.path} is not a usable SQLite ledger: {one_line(exc)}") from None
        if problem:
            self.__exit__()
            raise LedgerError(f"ledger {self.path} is not a batch job ledger: {problem}; name another --ledger")
        _owner_and_group_only(self.path)
        return self

    def remove_if_new(self) -> None:
        """Remove the ledger, its lock file and the folders that opening it created, if it was new: for a run refused
        after the ledger was opened (README: a refused run creates nothing). Call while it is open."""
        for path in reversed(self._created or []):  # the ledger, its lock, then its new folders deepest first
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.remove(path)
        self._created = None

    def __exit__(self, *exc) -> None:
        if self._lock_file:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def mark_publishing(self, run_id: str, out_dir: str, model: str) -> None:
        """Record, just before OUT_DIR is published, that this run is publishing it (a `runs` row, images_new
        PUBLISHING): what a rerun needs to know this run was killed before its commit. Best effort: a ledger that
        cannot take it (a full disk) only loses that evidence, and the commit after publishing reports its own
        failure (exit 3)."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                             (run_id, out_dir, model, PUBLISHING, now))
        except sqlite3.Error as exc:
            LOG.warning("ledger %s: could not record that run %s is publishing (%s)", self.path, run_id, one_line(exc))

    def unmark_publishing(self, run_id: str) -> bool:
        """Forget mark_publishing's row of a run that did not publish, or whose commit failed (exit 3: its OUT_DIR
        is complete, no rerun may take it for a killed run's); -> whether that worked (best effort)."""
        try:
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                conn.execute("DELETE FROM runs WHERE run_id = ? AND images_new = ?", (run_id, PUBLISHING))
        except sqlite3.Error:
            return False
        return True

    def commit(self, run_id: str, out_dir: str, model: str, entries: Iterable[tuple[str, float, str]],
               drift=None, files: Iterable[FileKey] = (), refused: Iterable[tuple[str, str, str]] = (),
               onnx_sha256: str = "", scoring_sha256: str = "") -> int:
        """Insert (sha256, probability, path) entries, (sha256, reason, path) of the images the input gate refused,
        the run, the file keys of the files read in this run, the model's model.onnx sha256 and its package's scoring
        sha256 where the ledger does not know the model yet and, given the run's DriftResult for a model with a drift
        reference, the run's drift figures: in one transaction. -> the scored entries added."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        conn = sqlite3.connect(self.path)
        try:
            with conn:  # one transaction: all or nothing
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO scored (sha256, model, probability, scored_utc, path, run_id) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    ((sha, model, prob, now, printable(path), run_id) for sha, prob, path in entries),
                )
                added = conn.total_changes - before
                conn.executemany(  # REPLACE: a refusal judged again (other --modalities) keeps its newest reason
                    "INSERT OR REPLACE INTO out_of_scope (sha256, model, reason, scored_utc, path, run_id) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    ((sha, model, reason, now, printable(path), run_id) for sha, reason, path in refused),
                )
                conn.execute("DELETE FROM runs WHERE out_dir = ? AND images_new = ?", (out_dir, PUBLISHING))  # and
                conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",  # a killed run's it replaced
                             (run_id, out_dir, model, added, now))
                if onnx_sha256:
                    conn.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (model, onnx_sha256, now))
                if scoring_sha256:
                    conn.execute("INSERT OR IGNORE INTO packages VALUES (?, ?, ?)", (model, scoring_sha256, now))
                conn.executemany("INSERT OR REPLACE INTO files (path, size, mtime_ns, ctime_ns, sha256) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 ((os.fsencode(key[0]), *key[1:]) for key in files))
                if drift is not None and drift.reference:
                    conn.execute(f"INSERT INTO drift (model, {', '.join(DRIFT_COLUMNS)}) VALUES (?{', ?' * 8})",
                                 (model, run_id, now, drift.images, int(drift.judged), int(drift.detected),
                                  drift.domain_auc, drift.psi, drift.positive_rate))
                    conn.execute("INSERT INTO drift_limits VALUES (?, ?, ?)",
                                 (run_id, drift.domain_auc_limit, drift.psi_limit))
        finally:
            conn.close()
        return added

    def drift_history(self, model: str, limit: int) -> list[dict]:
        """The drift figures of the last `limit` committed runs of `model` (`<name>/<version>`), oldest first:
        dicts with DRIFT_COLUMNS' and LIMIT_COLUMNS' keys (judged and detected as bools; domain_auc, psi None when not
        judged; the limits None for a run committed before table drift_limits)."""
        columns = [f"drift.{c}" for c in DRIFT_COLUMNS] + [f"drift_limits.{c}" for c in LIMIT_COLUMNS]
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM drift LEFT JOIN drift_limits USING (run_id) "
                                "WHERE model = ? ORDER BY drift.rowid DESC LIMIT ?", (model, max(limit, 0))).fetchall()
        history = [dict(zip(DRIFT_COLUMNS + LIMIT_COLUMNS, row)) for row in reversed(rows)]
        for h in history:
            h["judged"], h["detected"] = bool(h["judged"]), bool(h["detected"])
        return history


def _owner_and_group_only(path: str) -> None:
    """A ledger made readable to others (by an earlier version, or by hand) holds patients' file names: made
    owner-and-group-only, with a warning (what the job creates already is: xray_core.files.private_umask)."""
    for name in (path, path + ".lock"):
        mode = os.stat(name).st_mode
        if mode & 0o007:
            try:
                os.chmod(name, stat.S_IMODE(mode) & ~0o027)
                LOG.warning("%s was readable or writable by others: now by its owner and group only", name)
            except OSError as exc:
                LOG.warning("%s is readable or writable by others and could not be changed: %s", name,
                            exc.strerror)

