"""worklist.csv's order and its spreadsheet-safe cells (batch_job/worklist.py)."""
from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from batch_job.cli import main
from batch_job.worklist import COLUMNS, Entry, ranked, safe_cell, write
from dicom_factory import dicom_bytes
from helpers import parse, textured, write_package


def _e(path, status="ok", p="", pred="", **kw):
    return Entry(path, status, p, pred, **kw)


def test_flagged_then_unscreened_then_scored_then_out_of_scope_then_errors():
    """QA: the images the model-side checks refused (upside-down chest films, scans too far from the ones it knows)
    came after every scan the model judged normal: a reader stopping where the normals began never reached them.
    They come after the flagged ones now; the header rules' and the cheap checks' refusals stay after the scored."""
    from batch_job.worklist import group
    from xray_core.gate import Gate
    from xray_core.orientation import Orientation

    upside_down = Orientation.reason(0.9)  # the reasons as the checks write them
    too_far = Gate(np.zeros(2), np.eye(2), 10.0).reason(12.5)
    entries = [
        _e("err.png", "error", reason="decode failed"),
        _e("n_low.png", "ok", "0.10000000", "NORMAL"),
        _e("oos.png", "out_of_scope", reason="colour image (mean channel spread 51.2 > 8)"),
        _e("ct.dcm", "out_of_scope", reason="Modality CT not allowed (allowed: CR, DX)"),
        _e("turned.png", "out_of_scope", reason=upside_down),
        _e("far.png", "out_of_scope", reason=too_far),
        _e("f_mid.png", "ok", "0.80000000", "PNEUMONIA"),
        _e("skip.png", "skipped", "0.99000000", "PNEUMONIA"),
        _e("n_high.png", "ok", "0.40000000", "NORMAL"),
        _e("f_top.png", "ok", "0.95000000", "PNEUMONIA"),
        _e("b_tie.png", "ok", "0.80000000", "PNEUMONIA"),
    ]
    assert [e.path for e in ranked(entries)] == ["f_top.png", "b_tie.png", "f_mid.png", "far.png", "turned.png",
                                                "n_high.png", "n_low.png", "ct.dcm", "oos.png", "err.png"]
    assert upside_down.startswith("looks upside down or inverted (P 0.90")
    assert group(entries[4]) == group(entries[5]) == 1
    assert too_far == "not like the chest X-rays the model knows (distance 12.5 > limit 10.0)"
    from xray_core.gate import LAYOUT_REASON, past

    odd = past(40.2, 36.1, LAYOUT_REASON, "layout distance")  # version 8's layout check: a read, before the normals
    assert odd == "not laid out like the chest X-rays the model knows (layout distance 40.2 > limit 36.1)"
    assert group(_e("odd.png", "out_of_scope", reason=odd)) == 1


def test_written_with_rank_and_every_column():
    f = io.StringIO()
    assert write(f, [_e("b.png", "ok", "0.2", "NORMAL"), _e("a.png", "ok", "0.9", "PNEUMONIA",
                                                            patient_id="P1", heatmap="heatmaps/0001.png")]) == 2
    rows = list(csv.DictReader(io.StringIO(f.getvalue())))
    assert tuple(rows[0]) == COLUMNS
    assert COLUMNS[:8] == ("rank", "path", "status", "probability", "prediction", "reason", "heatmap", "patient_id")
    assert COLUMNS[-2:] == ("same_study_as", "section")  # new columns last: the others keep their places
    assert [(r["rank"], r["section"], r["path"], r["patient_id"], r["heatmap"]) for r in rows] == \
        [("1", "flagged", "a.png", "P1", "heatmaps/0001.png"), ("2", "not flagged", "b.png", "", "")]


def test_cells_that_would_run_as_formulas_are_text():
    for text in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "-1-cmd", "@SUM(A1)", "\t=1", "\r=1", "-1e3", "+1 "):
        assert safe_cell(text) == "'" + text
    # a plain number is no formula: QA, a patient ID -4812006 written '-4812006 failed as a PACS search
    for text in ("person1_bacteria_1.jpeg", "1.2.840.113619", "", "0.5", "-4812006", "+1", "-0.25"):
        assert safe_cell(text) == text
    f = io.StringIO()
    write(f, [_e("=cmd|' /C calc'!A0.png", "error", reason="-decode failed", patient_id="@evil")])
    row = next(csv.DictReader(io.StringIO(f.getvalue())))
    assert (row["path"], row["reason"], row["patient_id"]) == ("'=cmd|' /C calc'!A0.png", "'-decode failed", "'@evil")


# ------------------------------------------------------------------ in the job, on both runners

@pytest.mark.parametrize("runner", ["direct", pytest.param("dask", marks=pytest.mark.slow)])
def test_the_job_writes_the_ranked_worklist(tmp_path, runner, request):
    package = write_package(str(tmp_path / "serving"), threshold=0.5)
    inp = tmp_path / "in"
    inp.mkdir()
    for name, mean in (("a_dark.png", 60), ("b_bright.png", 200), ("c_mid.png", 130), ("d_brighter.png", 230)):
        textured((64, 64), mean, seed=len(name)).save(inp / name)
    Image.new("L", (64, 64), 250).save(inp / "e_blank.png")  # out of scope
    (inp / "f_broken.png").write_bytes(b"not an image")
    pixels = np.clip(np.random.default_rng(0).normal(3000, 400, (64, 64)), 0, 4095).astype(np.uint16)
    (inp / "g_study.dcm").write_bytes(dicom_bytes(pixels, bits_stored=12, modality="DX", PatientID="=1+1",
                                                  AccessionNumber="ACC7", StudyDate="20261130", ViewPosition="PA"))
    cut = dicom_bytes(pixels, bits_stored=12, modality="DX", PatientID="P-42", AccessionNumber="ACC8")
    (inp / "h_cut.dcm").write_bytes(cut[:-2000])  # pixel data cut short: an error row, still the patient's
    (inp / "j_lateral.dcm").write_bytes(dicom_bytes(pixels, bits_stored=12, modality="DX", PatientID="=1+1",
                                                    AccessionNumber="ACC7", ViewPosition="LATERAL"))  # g's study
    film = np.asarray(textured((64, 64), 60, seed=9))
    Image.fromarray(np.pad(film, ((0, 0), (16, 16)))).save(inp / "i_padded.png")  # a chest film pillarboxed: 33%
    extra = ["--runner", "DaskRunner", f"--dask_client_address={request.getfixturevalue('dask_cluster')}"] \
        if runner == "dask" else ["--direct_running_mode=in_memory"]
    assert main(["--input", str(inp), "--model", package, "--output", str(tmp_path / "o"), "--shard-size", "2",
                 *extra]) == 0
    with open(tmp_path / "o" / "worklist.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [os.path.basename(r["path"]) for r in rows]
    probs = {os.path.basename(r["path"]): r["probability"] for r in rows}
    flagged = [n for n in names if probs[n] and float(probs[n]) >= 0.5]
    assert names[:len(flagged)] == sorted(flagged, key=lambda n: -float(probs[n]))  # flagged first, highest first
    # QA: a padded chest film ranked after every scored normal; it is not screened, read right after the flagged
    assert names[len(flagged)] == "i_padded.png" and rows[len(flagged)]["reason"].startswith("padded: ")
    assert names[-4:] == ["e_blank.png", "j_lateral.dcm", "f_broken.png", "h_cut.dcm"]  # out of scope, errors
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 11)]
    assert [r["status"] for r in rows[-4:]] == ["out_of_scope", "out_of_scope", "error", "error"]
    assert [r["section"] for r in rows] == ["flagged"] * len(flagged) + ["not screened"] + ["not flagged"] * (
        5 - len(flagged)) + ["out of scope"] * 2 + ["error"] * 2  # QA: only a row's position told them apart
    lateral = rows[names.index("j_lateral.dcm")]  # QA: a lateral of a flagged study read as a study of its own
    assert lateral["same_study_as"] == rows[names.index("g_study.dcm")]["rank"] and rows[0]["same_study_as"] == ""
    # QA defect: an error row lost the identifiers its header gave, so a failed study could not be followed up
    assert (rows[-1]["patient_id"], rows[-1]["accession_number"]) == ("P-42", "ACC8")
    dcm = rows[names.index("g_study.dcm")]
    assert (dcm["patient_id"], dcm["accession_number"], dcm["study_date"], dcm["view_position"]) == \
        ("'=1+1", "ACC7", "20261130", "PA")  # a formula-looking ID is text
    assert rows[names.index("a_dark.png")]["patient_id"] == ""
    # QA: report.html showed no DICOM identifiers: a file named by its UID could not be found in the PACS from it
    page = open(tmp_path / "o" / "report.html", encoding="utf-8").read()
    assert dcm["prediction"] == "PNEUMONIA" and "patient =1+1 · accession ACC7 · study 2026-11-30 · PA" in page
    # its tile (as text; with its study's date and view), and the error row of the study cut short (QA: by its file
    # name alone)
    assert re.findall(r"patient [^<]* · accession [^<]*", page) == [
        "patient =1+1 · accession ACC7 · study 2026-11-30 · PA",
        f"patient =1+1 · accession ACC7 · LATERAL · same study as #{dcm['rank']}", "patient P-42 · accession ACC8"]
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert (m["images_out_of_scope"], m["images_unscreened"]) == (3, 1)
    assert f"· LATERAL · same study as #{lateral['same_study_as']}" in page
    text = " ".join(parse(str(tmp_path / "o" / "report.html"))[1].split())
    assert "out of scope, 3 (not screened: 1, each needs a read)" in text
    assert "Not screened: 1 images too far from the X-rays" in text
    assert "Other files: 2, which the job does not screen" in text


def test_later_rows_of_a_study_name_its_first_rank():
    """QA: a PA flagged at rank 48 and its lateral at rank 179 read as two studies; two frontals of one accession as
    two reads. A study is a patient's accession number; rows without one stand alone."""
    f = io.StringIO()
    write(f, [_e("pa.dcm", "ok", "0.9", "PNEUMONIA", patient_id="P1", accession_number="A1"),
              _e("lat.dcm", "out_of_scope", reason="lateral view", patient_id="P1", accession_number="A1"),
              _e("ap.dcm", "ok", "0.7", "PNEUMONIA", patient_id="P1", accession_number="A1"),
              _e("other.dcm", "ok", "0.8", "PNEUMONIA", patient_id="P2", accession_number="A1"),  # another patient's
              _e("a.png", "ok", "0.95", "PNEUMONIA"), _e("b.png", "ok", "0.1", "NORMAL"),
              # review: exports without a RIS leave the accession empty; the Study Instance UID is mandatory
              _e("u1.dcm", "ok", "0.6", "NORMAL", study_instance_uid="1.2.3"),
              _e("u2.dcm", "ok", "0.5", "NORMAL", study_instance_uid="1.2.3"),
              _e("fixed_uid.dcm", "ok", "0.45", "NORMAL", patient_id="P9", study_instance_uid="1.2.3"),  # another
              # patient under a UID a device writes for every study (review): not joined
              _e("u3.dcm", "ok", "0.4", "NORMAL", accession_number="A1", study_instance_uid="1.2.4"),
              _e("no_patient.dcm", "ok", "0.3", "NORMAL", accession_number="A9"),
              _e("no_patient2.dcm", "ok", "0.2", "NORMAL", accession_number="A9")])
    rows = [(r["path"], r["same_study_as"]) for r in csv.DictReader(io.StringIO(f.getvalue()))]
    assert rows == [("a.png", ""), ("pa.dcm", ""), ("other.dcm", ""), ("ap.dcm", "2"), ("u1.dcm", ""),
                    ("u2.dcm", "5"), ("fixed_uid.dcm", ""), ("u3.dcm", ""), ("no_patient.dcm", ""),
                    ("no_patient2.dcm", "9"), ("b.png", ""), ("lat.dcm", "2")]
