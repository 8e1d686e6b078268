"""report.html: one self-contained page (Jinja2, autoescaped; no script, no network) whose images are the PNGs
beside it in OUT_DIR, linked relatively: the run's summary, the probability histogram, the drift check (its
line, figures, drift.png and drift_trend.png as drift_report.py wrote them), with folder labels the
confusion matrix and ROC curve, the flagged images with their heatmaps (highest first) and the error rows.

File names are shown as text whatever they hold: markup and quotes are escaped, bytes that are not UTF-8 are
shown as \\xNN. The page stays under MAX_BYTES: long names are shortened in the middle, and the tiles and
error rows shown are capped (the CSVs hold them all).
"""
from __future__ import annotations

import datetime
import functools
import os
import pathlib
import urllib.parse

from batch_job import drift_report, figures
from batch_job.drift import DriftResult, summary_line
from batch_job.reconcile import Reconciliation
from batch_job.result import RunResult
from batch_job.scoring import read_before_as
from batch_job.worklist import Entry, WorklistSummary
from xray_core.errors import middle_cut

TEMPLATE = "report.html.j2"
REPORT_FILE = "report.html"
MAX_BYTES = 1_000_000
MAX_TEXT = 200  # characters shown of a path or an error
CAPS = (500, 500)  # tiles, error rows shown at most (halved until the page fits MAX_BYTES)
MAX_FLAGGED_ROWS = 2000  # flagged images listed in the worklist table (the rest: worklist.csv)
# an image two inputs reach (overlapping folders, a glob and a folder) is one row (listing.iter_images)
PER_INPUT_NOTE = "An image that several inputs reach is listed and counted once, under the first of them."
OUT_OF_SCOPE_SHOWN = 8  # out-of-scope images shown with a thumbnail and their reason


def new_name_note(c: Reconciliation) -> str:
    """report.md's and report.html's sentence on the skipped images under a path new to the ledger ("" if none)."""
    n = c.skipped_new_name
    if not n:
        return ""
    return (f"{n} of the {c.skipped} skipped images came under a name new to the ledger: the same bytes as an image "
            "an earlier night read under another path (a copy sent again, a file moved or renamed); "
            f"{c.skipped_new_name_flagged} of them flagged PNEUMONIA at this threshold. They are not scored again and "
            "are not on this worklist; their rows in the predictions CSVs (status skipped) name that path in the "
            "error column.")


@functools.lru_cache(maxsize=1)
def environment():
    import jinja2

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(folder), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def display(text: str, limit: int = MAX_TEXT) -> str:
    """Text to show: valid UTF-8 (undecodable name bytes, kept as surrogate escapes, become \\xNN), characters that
    do not print (a newline or a tab in a file name, which a page shows as a space) as their escapes (\\n, \\t), at
    most `limit` characters (the middle cut out)."""
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not shown.isprintable():
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in shown)
    return middle_cut(shown, limit)


def error_rows(summary: WorklistSummary, out_dir: str, cap: int) -> list[dict]:
    """The first `cap` errors in worklist order, with their rank and a DICOM's identifiers (QA: a truncated study
    was shown by its file name alone, its patient only in worklist.csv)."""
    return [{"rank": rank, "path": display(e.path), "error": display(e.reason, 2 * MAX_TEXT),
             "href": file_link(e.path, out_dir), "ids": identifiers(e)} for rank, e in summary.errors[:cap]]


def new_name_rows(c: Reconciliation, out_dir: str) -> list[dict]:
    """The skipped rows under names new to the ledger that reconciliation kept (flagged first), as the page shows
    them: the path, its probability and prediction, and the path its bytes were read under."""
    return [{"path": display(row["path"]), "href": file_link(row["path"], out_dir),
             "probability": probability(float(row["probability"])) if row["probability"] else "",
             "prediction": row["prediction"] or "out of scope",
             "before": display(read_before_as(row))} for row in c.new_name_rows]


def map_limits(cells: str) -> str:
    """What a heatmap can and cannot show (report.html and report.md)."""
    return (f"What a map can show: where in the image the model found its evidence, in {cells} over the whole "
            "image. What it cannot: a lesion's outline, which finding it is, or that the finding is real. One model's "
            "maps often peak in the same place from image to image: a hot spot is where the model looked, not a "
            "lesion there.")


def map_cells(r: RunResult) -> str:
    method = r.heatmaps.method
    if method.name == "occlusion":
        return f"{method.grid}×{method.grid} cells"
    return f"{r.heatmaps.map_hw[0]}×{r.heatmaps.map_hw[1]} cells" if r.heatmaps.map_hw else "coarse cells"


def flagged_note(r: RunResult, shown: int) -> str:
    if r.heatmaps.requested == 0:
        return "Heatmaps are turned off (--heatmaps 0); the flagged images are the PNEUMONIA rows of the CSVs."
    if not shown:
        return "No image scored in this run was flagged."
    if not r.heatmaps.model_has_heatmaps:
        return (f"The model {r.model} has no heatmap output. The {shown} flagged images scored in this run with "
                f"the highest probability (of {r.positive_count} flagged), without heatmaps:")
    method = r.heatmaps.method
    if method.name == "occlusion":
        what = (f"its occlusion map: how much P(pneumonia) falls when each of {method.grid}×{method.grid} cells of "
                "the image is blanked, scaled per image (red: the cells the score depends on most, blue: least)")
    else:
        what = ("the model's class-activation map for pneumonia, scaled per image (red: where the image holds the "
                "most evidence, blue: the least)")
    images = "The flagged image" if shown == 1 else f"The {shown} flagged images"
    return (f"{images} scored in this run with the highest probability (of {r.positive_count} "
            f"flagged), each under {what}. Click a map for its full size, a name for the original. "
            f"{map_limits(map_cells(r))} How specific to each image the maps are is measured at export and stated in "
            "the model card (model_card.md, docs/export.md).")


def labelled_section(r: RunResult, out_dir: str) -> dict | None:
    if r.labelled is None:
        return None
    names = {figures.CONFUSION_FILE: "confusion matrix", figures.ROC_FILE: "ROC curve"}
    scores = r.labelled.scores
    return {"count": r.labelled.images,
            "scores": [(name, "n/a" if scores[k] is None else f"{scores[k]:.4f}") for k, name in
                       (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"),
                        ("specificity", "specificity"), ("f1", "F1"), ("roc_auc", "ROC AUC"))],
            "figures": [{"src": f, "alt": alt} for f, alt in names.items() if os.path.exists(os.path.join(out_dir, f))]}


def drift_state(drift: DriftResult) -> str:
    """The drift card's value, also the banner's style: "DETECTED", "none" or "not judged"."""
    return "DETECTED" if drift.detected else "none" if drift.judged else "not judged"


def drift_section(drift: DriftResult, out_dir: str) -> dict:
    """The "Drift" section: its line and state, the figures' cells, the images drift_report wrote."""
    names = {drift_report.DRIFT_FILE: "probability histograms: this run vs the validation split",
             drift_report.TREND_FILE: "domain AUC and PSI over the last runs"}
    shown = [f for f in drift.figures if f in names and os.path.exists(os.path.join(out_dir, f))]
    state = drift_state(drift)
    return {"line": summary_line(drift), "state": state,
            "css": {"DETECTED": "detected", "none": "none"}.get(state, "unjudged"),
            "row": drift_report.figures_row(drift) if drift.reference else None,
            "over_auc": drift.domain_auc is not None and drift.domain_auc > drift.domain_auc_limit,
            "over_psi": drift.psi is not None and drift.psi > drift.psi_limit,
            "explanation": drift_report.explanation(drift) if drift.reference else "",
            "figures": [{"src": f, "alt": names[f]} for f in shown],
            "width": drift_report.PIXELS[0], "height": drift_report.PIXELS[1]}


def probability(p: float) -> str:
    """Four decimals; "> 0.9999" rather than a rounded 1.0000."""
    return "> 0.9999" if 0.99995 <= p < 1.0 else f"{p:.4f}"


def identifiers(e: Entry | None) -> str:
    """A DICOM's patient ID, accession number, study date and view as the page shows them ("" without): QA, a DICOM
    named by its UID could not be found in the PACS from the page, and an AP (portable) film or an old study could not
    be told from the page (2026-12-02)."""
    if e is None:
        return ""
    date = e.study_date
    if len(date) == 8 and date.isdigit():  # DICOM's DA, YYYYMMDD
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    shown = [f"{what}{display(value, MAX_TEXT // 4)}" for what, value in (
        ("patient ", e.patient_id), ("accession ", e.accession_number), ("study ", date), ("", e.view_position),
        ("same study as #", e.same_study_as)) if value]
    return " · ".join(shown)


def tile(rank: int, item, out_dir: str, listed: dict[str, Entry]) -> dict:
    """A flagged image's tile: its overlay (click: full size), its name linked to the original (QA: the most urgent
    reads were the only ones without a link to the film itself), and a DICOM's identifiers."""
    folder, name = os.path.split(item.path)
    return {"rank": rank, "src": item.png, "probability": probability(item.probability), "label": item.label,
            "name": display(name, MAX_TEXT // 2), "folder": display(folder), "no_overlay": display(item.no_overlay),
            "href": file_link(item.path, out_dir), "ids": identifiers(listed.get(item.path))}


def file_link(path: str, out_dir: str) -> str:
    """A link to an original image, relative to the page (it opens where OUT_DIR and the inputs are mounted alike;
    the page names no scheme and reaches no network); "" for a URI input. Every byte of the name but letters,
    digits and "/_.-~" is percent-encoded, so that the link opens that file and no other: "%20", "#", "?", a tab
    or bytes that are not UTF-8 in a name are part of it, not a URL's escape, fragment, query or whitespace."""
    if "://" in path:
        return ""
    return urllib.parse.quote(os.fsencode(pathlib.PurePath(os.path.relpath(path, out_dir)).as_posix()))


def worklist_rows(r: RunResult, out_dir: str, after_rank: int, cap: int) -> list[dict]:
    """The flagged rows of the worklist past the tiles (rank > after_rank), at most cap."""
    return [{"rank": rank, "probability": probability(float(e.probability)), "name": display(e.path),
             "href": file_link(e.path, out_dir), "overlay": e.heatmap, "ids": identifiers(e)}
            for rank, e in r.worklist.flagged if rank > after_rank][:cap]


def intended_use(r: RunResult) -> dict:
    return {"model": display(r.model), "threshold": r.threshold_text(), "card": r.model_card,
            "trained_on": display(r.trained_on, 3 * MAX_TEXT), "below_floor": r.below_floor}


def out_of_scope_section(r: RunResult, out_dir: str) -> dict:
    """The first out-of-scope images: thumbnail, name linked to the original (QA: they need a read, and only the
    worklist named them), reason, a DICOM's identifiers."""
    return {"count": r.counts.out_of_scope, "unscreened": r.counts.unscreened,
            "shown": [{"rank": rank, "name": display(e.path, MAX_TEXT // 2), "reason": display(e.reason),
                       "src": r.thumbnails.get(e.path, ""), "ids": identifiers(e), "href": file_link(e.path, out_dir)}
                      for rank, e in r.worklist.out_of_scope]}


def context(r: RunResult, out_dir: str, errors: list[dict], tiles_cap: int, rows_cap: int = MAX_FLAGGED_ROWS,
            new_names: list[dict] = ()) -> dict:
    """Everything the template shows; every string from outside (paths, reasons) already through display()."""
    c = r.counts
    state = drift_state(r.drift)
    after = min(len(r.flagged), tiles_cap)
    rows = worklist_rows(r, out_dir, after, rows_cap)
    listed = {e.path: e for _, e in r.worklist.flagged}  # the tiles' worklist rows: their DICOM identifiers
    cards = [("found", c.found, ""), ("scored", c.scored, ""), ("failed", c.failed, "fail"),
             ("out of scope", c.out_of_scope, "fail"), ("skipped (ledger)", c.skipped, ""),
             ("flagged PNEUMONIA", r.positive_count, "flag"),
             ("positive rate", "n/a" if r.positive_rate is None else f"{r.positive_rate:.1%}", ""),
             ("drift", state, {"DETECTED": "flag word", "none": "word", "not judged": "muted word"}[state])]
    return {
        "model": display(r.model), "threshold": f"{r.threshold:.4f}", "runner": r.runner,
        "wall": f"{r.wall_seconds:.1f} s", "rate": f"{r.images_per_second} images/s", "run_id": r.run_id,
        "finished": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cards": [{"key": k, "value": v, "css": css} for k, v, css in cards],
        "per_input": [{"input": display(k), **v} for k, v in c.per_input.items()],
        "per_input_note": PER_INPUT_NOTE,
        "histogram": "histogram.png", "drift": drift_section(r.drift, out_dir),
        "labelled": labelled_section(r, out_dir), "flagged_note": flagged_note(r, len(r.flagged)),
        "tiles": [tile(rank, item, out_dir, listed) for rank, item in enumerate(r.flagged[:tiles_cap], 1)],
        "tiles_left": max(0, len(r.flagged) - tiles_cap),
        "rows": rows, "worklist_rows": r.worklist.rows, "row_overlays": any(row["overlay"] for row in rows),
        "rows_left": r.positive_count - after - len(rows),  # the worklist summary keeps only the first flagged rows
        "flagged_total": r.positive_count, "use": intended_use(r), "out_of_scope": out_of_scope_section(r, out_dir),
        "index_csv": any(f.heatmap is not None or f.png for f in r.flagged),  # heatmaps/index.csv was written
        "errors": errors, "error_total": c.failed, "skipped": c.skipped, "new_name_note": new_name_note(c),
        "new_names": new_names, "new_names_total": c.skipped_new_name,
        "new_names_flagged": c.skipped_new_name_flagged, "skipped_to_read": display(r.skipped_to_read, 2 * MAX_TEXT),
        "earlier_nights": [display(line, 2 * MAX_TEXT) for line in r.earlier_lines()],
    }


def render(ctx: dict) -> str:
    return environment().get_template(TEMPLATE).render(**ctx)


def write_html(out_dir: str, result: RunResult) -> int:
    """Write out_dir/report.html (UTF-8, under MAX_BYTES); -> its size in bytes."""
    tiles_cap, errors_cap = CAPS
    rows_cap = MAX_FLAGGED_ROWS
    errors = error_rows(result.worklist, out_dir, errors_cap)
    new_names = new_name_rows(result.counts, out_dir)
    while True:
        page = render(context(result, out_dir, errors[:errors_cap], tiles_cap, rows_cap, new_names)).encode("utf-8")
        if len(page) < MAX_BYTES or (tiles_cap == 0 and errors_cap == 0 and rows_cap == 0):
            break
        tiles_cap, errors_cap, rows_cap = tiles_cap // 2, errors_cap // 2, rows_cap // 2
    with open(os.path.join(out_dir, REPORT_FILE), "wb") as f:
        f.write(page)
    return len(page)
