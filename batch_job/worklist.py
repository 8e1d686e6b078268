"""worklist.csv: every image this run scored, found out of scope or failed, one row each, in reading order.

Ranked: flagged images first by probability (highest first), then the other scored images by probability, then
out-of-scope images, then errors; ties by path. Images skipped through the ledger are counted in the summary, not
listed. People open the file in a spreadsheet, so a cell that would start a formula (`=`, `+`, `-`, `@`, or a tab or
carriage return that some programs strip first) is written with a leading apostrophe, the escape spreadsheets
show as text (OWASP "CSV injection"); probabilities and ranks are written by this module and never need it.
"""
from __future__ import annotations

import csv
from dataclasses import astuple, dataclass, fields

IDENTIFIERS = ("patient_id", "accession_number", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
               "study_date", "view_position")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ORDER = {"flagged": 0, "ok": 1, "out_of_scope": 2, "error": 3}


@dataclass(frozen=True)
class Entry:
    """One image of the worklist (before ranking)."""

    path: str
    status: str  # ok, out_of_scope or error
    probability: str  # as in the shard CSV; "" unless scored
    prediction: str  # PNEUMONIA, NORMAL or ""
    reason: str = ""  # why out of scope, or the error
    heatmap: str = ""  # the overlay's path under OUT_DIR, for the top-N flagged images
    patient_id: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    study_date: str = ""
    view_position: str = ""


COLUMNS = ("rank",) + tuple(f.name for f in fields(Entry))


def group(entry: Entry) -> int:
    if entry.status == "ok":
        return _ORDER["flagged"] if entry.prediction == "PNEUMONIA" else _ORDER["ok"]
    return _ORDER.get(entry.status, _ORDER["error"])


def rank_key(entry: Entry) -> tuple[int, float, str]:
    return group(entry), -float(entry.probability) if entry.probability else 0.0, entry.path


def ranked(entries: list[Entry]) -> list[Entry]:
    """Skipped images are not listed; the rest in reading order."""
    return sorted((e for e in entries if e.status != "skipped"), key=rank_key)


def safe_cell(text: str) -> str:
    """A cell a spreadsheet shows as the text it is."""
    return "'" + text if text.startswith(FORMULA_START) else text


def write(f, entries: list[Entry]) -> int:
    """Write the ranked worklist to the open text file f; -> rows written."""
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    rows = ranked(entries)
    for i, entry in enumerate(rows, start=1):
        writer.writerow([str(i)] + [safe_cell(v) for v in astuple(entry)])
    return len(rows)
