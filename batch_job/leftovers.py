"""What killed jobs leave beside OUT_DIR, and in it: the temp dirs of jobs that were killed (on any OUT_DIR in the
same parent) are removed, an OUT_DIR parked by an --overwrite killed between its two renames is restored, and an OUT_DIR
published by a run killed before its ledger commit is recognised (:func:`orphaned`). Only folders named exactly so,
holding LOCK_FILE with its lock free, and nothing but what the job writes (outdir.py's module doc).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
from typing import IO

from batch_job.errors import InputError
from batch_job.ledger import publishing
from batch_job.ledger_lookup import read_only
from xray_core.files import LOCK_FILE, remove_dir, take_abandoned_lock

LOG = logging.getLogger("batch_job")
RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's suffix
ANY_TEMP = re.compile(rf".+\.tmp-\d+@[^@/]+-{RANDOM}(\.discarded)?\Z")  # a job's temp dir, for any OUT_DIR
# What a published OUT_DIR holds at its top (README "Outputs"), with the lock file a kill may leave there
PUBLISHED = (r"\.owner\.lock|predictions-\d+\.csv|metrics\.json|report\.(md|html)|worklist\.csv|model_card\.md|"
             r"(histogram|confusion|roc|drift|drift_trend)\.png|heatmaps|out_of_scope")
# What a temp dir holds: that, the job's scratch folder, half-written ``.*.tmp`` files, and what jobs before the
# scratch folder kept beside the outputs (a temp dir they left when killed), figures of earlier versions included
JOB_FILES = re.compile(rf"({PUBLISHED}|scratch|\w+\.png|\..+\.tmp|_listing\.jsonl|_(ledger|heatmaps)-\d+\.jsonl|"
                       r"_drift-\d+\.npz)\Z")
PARKED_FILES = (LOCK_FILE, "old")
# What a published OUT_DIR holds, by folder: the only names a rerun may replace without --overwrite
RANKED_PNG = r"\d{4,}-[0-9a-f]{12}\.png"  # heatmaps.png_name (ranks past 9,999: five digits)
OUTPUTS = {"": re.compile(rf"({PUBLISHED})\Z"), "heatmaps": re.compile(rf"({RANKED_PNG}|index\.csv)\Z"),
           "out_of_scope": re.compile(rf"{RANKED_PNG}\Z")}


def parked_name(base: str) -> re.Pattern:
    return re.compile(re.escape(base) + rf"\.old-{RANDOM}\Z")


def clean_leftovers(out: str) -> None:
    """Remove the temp dirs of killed jobs in OUT_DIR's parent (on any OUT_DIR) and restore an OUT_DIR parked by
    an --overwrite killed between its two renames: only folders of exactly those names whose lock is free
    (module doc)."""
    parent, base = os.path.split(out)
    parked = parked_name(base)
    try:
        names = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        for name in names:
            path = os.path.join(parent, name)
            if ANY_TEMP.match(name):
                _remove_abandoned(path)
            elif parked.match(name):
                _restore_abandoned(path, out)
    except OSError as exc:
        raise InputError(f"output dir {out} is not writable: {exc.strerror}") from None


def _abandoned(path: str, allowed) -> IO | None:
    """The free lock of a folder of ours (now held here) that holds only names `allowed` accepts; else None."""
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    lock = take_abandoned_lock(path)
    if lock is not None and not all(allowed(name) for name in os.listdir(path)):
        LOG.warning("left %s as it is: it holds files that batch jobs do not write", path)
        lock.close()
        return None
    return lock


def _remove_abandoned(path: str) -> None:
    lock = _abandoned(path, JOB_FILES.match)
    if lock is not None:
        with lock:
            remove_dir(path)
        LOG.info("removed %s, left by a job that was killed", path)


def _restore_abandoned(path: str, out: str) -> None:
    lock = _abandoned(path, PARKED_FILES.__contains__)
    if lock is None:
        return
    with lock:
        old = os.path.join(path, "old")
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # an empty directory stands in for nothing
        if os.path.isdir(old) and not os.path.lexists(out):
            os.rename(old, out)
            LOG.warning("restored %s: an --overwrite was killed while replacing it", out)
        remove_dir(path)  # with an OUT_DIR in place, what remains was already replaced


def foreign(out: str, limit: int | None = None) -> list[str]:
    """The names in OUT_DIR (relative to it; the first `limit`) that the job does not write (OUTPUTS), in its folders
    too: a reviewer's notes, an annotated image."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        folder = os.path.relpath(dirpath, out)
        rule = OUTPUTS.get("" if folder == "." else folder)
        if rule is None:  # a folder of someone else's, named where it was found: not walked
            dirnames[:] = []
            continue
        found += [os.path.normpath(os.path.join(folder, name)) for name in sorted(dirnames + filenames)
                  if not rule.match(name)]
        if limit is not None and len(found) >= limit:
            break
    return found[:limit]


def only_outputs(out: str) -> bool:
    """OUT_DIR holds nothing but names the job writes (OUTPUTS), in its folders too: a file someone added (a
    reviewer's notes, an annotated image) is never deleted by a rerun without --overwrite."""
    return not foreign(out, 1)


def _recorded(out: str, key: str):
    """What OUT_DIR's metrics.json records under `key`, or None (no such file, not JSON, no such key)."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m.get(key) if isinstance(m, dict) else None


def recorded(out: str, key: str) -> str:
    """What OUT_DIR's metrics.json records under `key` (its run id, its ledger), or "" (none, or not a string)."""
    value = _recorded(out, key)
    return value if isinstance(value, str) else ""


def recorded_count(out: str, key: str) -> int:
    """What OUT_DIR's metrics.json records under `key` as a count, or 0 (none, or not a count)."""
    value = _recorded(out, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def orphaned(out: str, ledger: str) -> bool:
    """OUT_DIR was published by a job on this ledger that was killed before its ledger commit: the ledger holds that
    run's publishing row for this OUT_DIR (ledger.py), and OUT_DIR holds only what the job writes."""
    book, run_id = recorded(out, "ledger"), recorded(out, "run_id")
    if not (book and run_id) or not only_outputs(out) or os.path.realpath(book) != os.path.realpath(ledger):
        return False
    claimed = publishing(ledger, run_id)
    return claimed is not None and os.path.realpath(claimed) == os.path.realpath(out)


# the images a committed run recorded (scored or refused) that `model` has rows for: skipped if it ran again
_SEEN = ("SELECT 1 FROM {night} a JOIN {seen} b ON a.sha256 = b.sha256 WHERE a.run_id = ? AND b.model = ? LIMIT 1")


def seen_before(conn, run_id: str, model: str) -> bool:
    """Whether `model` has ledger rows (scored or out of scope) for any image that run `run_id` recorded."""
    return any(conn.execute(_SEEN.format(night=night, seen=seen), (run_id, model)).fetchone()
               for night in ("scored", "out_of_scope") for seen in ("scored", "out_of_scope"))


def refuse_rerun(out: str, ledger: str, model: str) -> None:
    """Refuse (InputError) an --overwrite of an OUT_DIR that holds a night this ledger committed, with a model the
    ledger holds rows of that night's images for: rerun so, those images are skipped, and the night's reading list
    would be replaced by one without them (QA: the worklist of 14 flagged scans and their heatmaps, gone; then the
    same with version 6 rolled back to over a version 7 night whose images it had scored on earlier nights). A model
    that has not seen them (a new version; a rollback over a night of other images) rescores the night whole. The
    night is known by its folder's path, or by the run id its metrics.json records: a path the ledger knows under
    another name (a bind mount, a container's /data for the host's /srv) is the same night (QA)."""
    if not (os.path.isdir(out) and os.listdir(out) and os.path.exists(ledger)):
        return
    with contextlib.closing(read_only(ledger)) as conn:
        try:
            rows = conn.execute("SELECT run_id, out_dir, finished_utc, model FROM runs WHERE images_new >= 0 "
                                "ORDER BY finished_utc DESC").fetchall()  # a folder's latest night first
            run_id = recorded(out, "run_id")
            night = next((r for r in rows if r[0] == run_id), None) or next(
                (r for r in rows if os.path.realpath(r[1]) == os.path.realpath(out)), None)
            if night is None:
                return
            seen = seen_before(conn, night[0], model)
            # a night that said which files came under new names: rerun, they are known names and it says none
            new_names = recorded_count(out, "images_skipped_new_name") if night[3] == model else 0
            if not (seen or new_names):
                return
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a new ledger: no night of it to lose
                return
            raise
    if night[3] == model and not seen:
        raise InputError(f"output dir {out} holds night {night[0]} of ledger {ledger} by {model} (committed "
                         f"{night[2]}), which said {new_names} files came under names new to the ledger: run again, "
                         "they are known names and --overwrite would replace that note; give another --output")
    if night[3] == model:
        raise InputError(f"output dir {out} holds night {night[0]} of ledger {ledger} by {model} (committed "
                         f"{night[2]}): run again with this ledger and model, all its images would be skipped and "
                         "--overwrite would replace its reading list with one without them; give another --output")
    raise InputError(f"output dir {out} holds night {night[0]} of ledger {ledger} by {night[3]} (committed "
                     f"{night[2]}), and {model} has scored images of it on other nights: they would be skipped and "
                     "--overwrite would replace the night's reading list with one without them; give another "
                     "--output")
