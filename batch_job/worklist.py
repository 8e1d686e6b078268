"""worklist.csv: every image this run scored, found out of scope or failed, one row each, in reading order.

Each worker writes its shard's rows, already ranked, as ``scratch/worklist-NNNNN.csv`` beside the shard's summary;
the driver merges the sorted parts (heapq.merge: memory holds one row per shard, and the first rank of each study of
the night's DICOM rows), adds the rank, each study's first rank on its later rows and the overlay paths of the top-N
flagged images, and keeps the first flagged rows for report.html.

Ranked: flagged images first by probability (highest first); then the images the model-side checks of the input gate
refused (too far from the X-rays the model knows, upside down, or not laid out like a chest film) and padded scans
(content.PADDED): often chest films exported oddly, of unknown risk, not screened; then the other scored images by
probability, the ones the model judged least likely to show pneumonia last among them; then the other out-of-scope
images (DICOM header rules: another modality or body part, a lateral view, raw data; blank, colour, elongated or drawn
images); then errors; ties by path. (Before 2026-12-02 every out-of-scope image came after the scored ones: a reader
stopping where the normal scans began never reached an upside-down chest film, QA.) The `section` column names each
row's group (flagged, not screened, not flagged, out of scope, error: QA, 2026-12-02, only a row's position told the
two groups of out-of-scope rows apart). Images skipped through the ledger are counted in the summary, not listed.

People open the file in a spreadsheet, so a cell that would start a formula (`=`, `+`, `-`, `@`, or a tab or carriage
return that some programs strip first) is written with a leading apostrophe, the escape spreadsheets show as text
(OWASP "CSV injection"), unless it is a plain number (a patient ID -4812006); probabilities and ranks are written by
this module and never need it.
"""
from __future__ import annotations

import csv
import heapq
import os
import re
from dataclasses import dataclass, field, fields, replace

from xray_core import content, gate, orientation
from xray_core.files import atomic_write

IDENTIFIERS = ("patient_id", "accession_number", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
               "study_date", "view_position")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ORDER = {"flagged": 0, "unscreened": 1, "ok": 2, "out_of_scope": 3, "error": 4}
SECTIONS = ("flagged", "not screened", "not flagged", "out of scope", "error")  # the `section` column, by _ORDER
# refusals of chest films: the model-side checks', and a padded scan's (QA: a padded film ranked after every scored
# normal); read before the scored normals
UNSCREENED = (gate.REASON, gate.LAYOUT_REASON, orientation.REASON, content.PADDED)
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


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
    same_study_as: str = ""  # the rank of its study's first row, on the study's later rows (merge)


# `section` last: the columns before it keep the places they had (scripts that read a column by its place, review)
COLUMNS = ("rank",) + tuple(f.name for f in fields(Entry)) + ("section",)
WORKLIST_FILE = "worklist.csv"


def unscreened(reason: str) -> bool:
    """An out-of-scope reason that may refuse a chest film (not screened: it still needs a read), not a file that is
    no chest film the job can read."""
    return reason.startswith(UNSCREENED)


def group(entry: Entry) -> int:
    if entry.status == "ok":
        return _ORDER["flagged"] if entry.prediction == "PNEUMONIA" else _ORDER["ok"]
    if entry.status == "out_of_scope" and unscreened(entry.reason):
        return _ORDER["unscreened"]
    return _ORDER.get(entry.status, _ORDER["error"])


def rank_key(entry: Entry) -> tuple[int, float, str]:
    return group(entry), -float(entry.probability) if entry.probability else 0.0, entry.path


def ranked(entries: list[Entry]) -> list[Entry]:
    """Skipped images are not listed; the rest in reading order."""
    return sorted((e for e in entries if e.status != "skipped"), key=rank_key)


def safe_cell(text: str) -> str:
    """A cell a spreadsheet shows as the text it is. A plain number (a patient ID -4812006) is no formula and stays
    as it is (QA: escaped, it failed as a PACS search)."""
    return "'" + text if text.startswith(FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text) else text


def study_of(e: Entry) -> tuple[str, ...] | None:
    """A DICOM row's study: its patient ID and Study Instance UID (mandatory in DICOM, though exports without a RIS
    may leave the accession empty, review; with the patient ID, as a device that writes one fixed UID cannot join two
    patients), else its patient ID and accession number; None for a row without either (JPEG, PNG)."""
    if e.study_instance_uid:
        return ("uid", e.patient_id, e.study_instance_uid)
    return ("accession", e.patient_id, e.accession_number) if e.accession_number else None


def with_study(e: Entry, rank: int, first_ranks: dict[tuple[str, ...], int]) -> Entry:
    """The entry, its `same_study_as` set where an earlier row (a better rank) of tonight's was of the same study
    (study_of): a study is read once, at its first row (QA: a PA flagged at rank 48 and its lateral at 179 read as
    two studies). `first_ranks` holds one rank per study of the night's DICOM rows (a few MB at 20,000)."""
    study = study_of(e)
    if study is None:
        return e
    first = first_ranks.setdefault(study, rank)
    return e if first == rank else replace(e, same_study_as=str(first))


def row_cells(rank: int, e: Entry) -> list[str]:
    """A worklist.csv row: rank, the entry's fields as a spreadsheet shows them, section."""
    return [str(rank)] + [safe_cell(v) for v in cells(e)] + [SECTIONS[group(e)]]


def entry(row) -> Entry:
    """A scored row (batch_job.scoring.Row) as the worklist shows it."""
    header = row.header
    ids = {name: getattr(header, name) for name in IDENTIFIERS} if header is not None else {}
    return Entry(row.path, row.status, row.probability, row.prediction, row.error, **ids)


PART_COLUMNS = tuple(f.name for f in fields(Entry))


def cells(e: Entry) -> list[str]:
    """The entry's fields in column order (dataclasses.astuple deep-copies each: 18 us a row, 20 times this)."""
    return [getattr(e, name) for name in PART_COLUMNS]


def part_name(shard_id: int) -> str:
    return f"worklist-{shard_id:05d}.csv"


def write_part(scratch: str, shard_id: int, rows) -> None:
    """A shard's rows (skipped ones left out), ranked, into scratch (atomically: a retried task rewrites it)."""
    def write_rows(f):
        writer = csv.writer(f)
        writer.writerow(PART_COLUMNS)
        writer.writerows(cells(e) for e in ranked([entry(r) for r in rows]))

    atomic_write(os.path.join(scratch, part_name(shard_id)), write_rows)


def _read_part(path: str):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            yield Entry(**row)


@dataclass
class WorklistSummary:
    """What report.html shows of the worklist: its length and its first flagged rows (rank, entry)."""

    rows: int = 0
    flagged: list[tuple[int, Entry]] = field(default_factory=list)
    out_of_scope: list[tuple[int, Entry]] = field(default_factory=list)
    errors: list[tuple[int, Entry]] = field(default_factory=list)  # the first ones, with a DICOM's identifiers


def merge(scratch: str, shard_ids, out_path: str, overlays: dict[str, str], keep_flagged: int,
          keep_out_of_scope: int, keep_errors: int = 0) -> WorklistSummary:
    """worklist.csv from the shards' sorted parts; -> its summary."""
    parts = [_read_part(os.path.join(scratch, part_name(s))) for s in shard_ids]
    summary = WorklistSummary()
    first_ranks: dict[tuple[str, ...], int] = {}

    def write_rows(f):
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for rank, e in enumerate(heapq.merge(*parts, key=rank_key), start=1):
            if e.path in overlays:
                e = replace(e, heatmap=overlays[e.path])
            e = with_study(e, rank, first_ranks)
            writer.writerow(row_cells(rank, e))
            summary.rows = rank
            if group(e) == _ORDER["flagged"] and len(summary.flagged) < keep_flagged:
                summary.flagged.append((rank, e))
            elif e.status == "out_of_scope" and len(summary.out_of_scope) < keep_out_of_scope:
                summary.out_of_scope.append((rank, e))
            elif e.status == "error" and len(summary.errors) < keep_errors:
                summary.errors.append((rank, e))

    atomic_write(out_path, write_rows)
    return summary


def write(f, entries: list[Entry]) -> int:
    """Write the ranked worklist to the open text file f; -> rows written."""
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    rows = ranked(entries)
    first_ranks: dict[tuple[str, ...], int] = {}
    for i, entry in enumerate(rows, start=1):
        writer.writerow(row_cells(i, with_study(entry, i, first_ranks)))
    return len(rows)
