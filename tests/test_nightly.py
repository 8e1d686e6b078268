"""Nightly operation: the ledger, crash safety at every kill point, DICOM input, and the fault corpus."""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from batch_job import html_report
from batch_job.cli import main
from batch_job.ledger import Ledger, LedgerBusy
from batch_job.listing import iter_images
from batch_job.synthetic import make_tree
from dicom_factory import dicom_bytes
from helpers import (
    REPO,
    assert_one_line_error,
    job,
    parse,
    read_predictions,
    snapshot,
    textured,
    write_bad_inputs,
    write_package,
)
from xray_core.files import sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def ledger_rows(path: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT sha256, model, probability, path FROM scored ORDER BY path").fetchall()


@pytest.fixture
def small_tree(tmp_path):
    root = str(tmp_path / "in")
    make_tree(root, per_class=10, size=64, seed=5)
    return root


# ------------------------------------------------------------------ ledger

def test_another_package_under_a_known_model_id_is_refused_not_handed_its_scores(small_tree, tmp_path, capsys):
    """QA: a package published again as pneumonia/1 in another serving folder (export --recalibrate run elsewhere)
    met a ledger that knew pneumonia/1: every image was skipped with the other model's probability. The ledger now
    keeps each model id's model.onnx sha256 and refuses another package under it, before anything is written."""
    first = write_package(str(tmp_path / "a"), threshold=0.5)
    other = write_package(str(tmp_path / "b"), threshold=0.5, offset=0.2)  # another network, the same id
    ledger = str(tmp_path / "ledger.sqlite")
    assert main(["--input", small_tree, "--model", first, "--output", str(tmp_path / "o1"), "--ledger", ledger,
                 "--direct_running_mode=in_memory"]) == 0
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("SELECT model, onnx_sha256 FROM models").fetchall() == [
            ("pneumonia/1", sha256_file(os.path.join(first, "model.onnx")))]
    capsys.readouterr()
    before = open(ledger, "rb").read()
    line = assert_one_line_error(capsys, main(["--input", small_tree, "--model", other, "--output",
                                               str(tmp_path / "o2"), "--ledger", ledger,
                                               "--direct_running_mode=in_memory"]))
    assert "holds the scores of another pneumonia/1" in line and "publish this model as a new version" in line
    assert open(ledger, "rb").read() == before and not os.path.exists(tmp_path / "o2")
    assert main(["--input", small_tree, "--model", first, "--output", str(tmp_path / "o3"), "--ledger", ledger,
                 "--direct_running_mode=in_memory"]) == 0  # the same package: its earlier scores are reused
    assert json.load(open(tmp_path / "o3" / "metrics.json"))["images_skipped"] == 20


def test_the_same_network_behind_another_gate_or_preprocessing_under_a_known_id_is_refused(small_tree, tmp_path,
                                                                                             capsys):
    """QA: versions 6 and 7 (one model.onnx, version 7 with the orientation check) recalibrated in two serving
    folders, both as pneumonia/8, met one ledger: the second skipped 30 upside-down scans that the first had scored,
    with its probabilities, instead of refusing them. The ledger also keeps the sha256 of what decides a row besides
    the image (table packages): the same model.onnx with another preprocessing or gate is another package."""
    first = write_package(str(tmp_path / "a"), threshold=0.5)
    other = str(tmp_path / "b" / "pneumonia" / "1")
    shutil.copytree(first, other)
    meta = json.load(open(os.path.join(other, "metadata.json")))
    meta["preprocessing"]["jpeg_draft"] = not meta["preprocessing"].get("jpeg_draft", True)
    meta["decision_threshold"] = 0.6  # the threshold alone would not make another package
    json.dump(meta, open(os.path.join(other, "metadata.json"), "w"))
    ledger = str(tmp_path / "ledger.sqlite")
    args = ["--input", small_tree, "--ledger", ledger, "--direct_running_mode=in_memory"]
    assert main(args + ["--model", first, "--output", str(tmp_path / "o1")]) == 0
    capsys.readouterr()
    before = open(ledger, "rb").read()
    line = assert_one_line_error(capsys, main(args + ["--model", other, "--output", str(tmp_path / "o2")]))
    assert line.startswith(f"error: ledger {ledger} holds the scores of another pneumonia/1: the same model.onnx "
                           "behind another input gate or preprocessing (package ")
    assert open(ledger, "rb").read() == before and not os.path.exists(tmp_path / "o2")
    threshold_only = str(tmp_path / "c" / "pneumonia" / "1")
    shutil.copytree(first, threshold_only)
    meta = json.load(open(os.path.join(first, "metadata.json")))
    meta["decision_threshold"] = 0.6
    json.dump(meta, open(os.path.join(threshold_only, "metadata.json"), "w"))
    assert main(args + ["--model", threshold_only, "--output", str(tmp_path / "o3")]) == 0
    assert json.load(open(tmp_path / "o3" / "metrics.json"))["images_skipped"] == 20
    with contextlib.closing(sqlite3.connect(ledger)) as conn:  # a ledger from before the table learns it too
        conn.execute("DROP TABLE packages")
    assert main(args + ["--model", other, "--output", str(tmp_path / "o4")]) == 0
    line = assert_one_line_error(capsys, main(args + ["--model", first, "--output", str(tmp_path / "o5")]))
    assert "the same model.onnx behind another input gate or preprocessing" in line


def test_the_ledger_line_says_when_copies_were_recorded_once(small_tree, tmp_path, caplog):
    """QA: "242 new images recorded" after "scored 244" with nothing to explain it: two files were byte-identical
    copies of others, which the ledger (keyed by content) records once."""
    import logging

    first = sorted(glob.glob(os.path.join(small_tree, "*", "*.png")))[0]
    shutil.copyfile(first, os.path.join(small_tree, "copy.png"))
    caplog.set_level(logging.INFO, logger="batch_job")
    ledger = str(tmp_path / "ledger.sqlite")
    assert main(["--input", small_tree, "--model", write_package(str(tmp_path / "s")), "--output",
                 str(tmp_path / "o"), "--ledger", ledger, "--direct_running_mode=in_memory"]) == 0
    assert json.load(open(tmp_path / "o" / "metrics.json"))["images_scored"] == 21
    assert [r.getMessage() for r in caplog.records if "new images recorded" in r.getMessage()] == [
        f"ledger {ledger}: 20 new images recorded, 0 out of scope (1 byte-identical copy of files of this run, "
        "recorded once)"]


def test_an_empty_input_is_a_quiet_night(tiny_package, tmp_path, capsys):
    """Exit 0 with a summary of 0 images and the outputs published (one header-only shard); the ledger records
    the run. --fail-if-empty keeps the old refusal (test_a_refused_run_with_a_ledger_creates_nothing)."""
    inp, ledger, out = tmp_path / "incoming", str(tmp_path / "ledger.sqlite"), tmp_path / "scores" / "night1"
    (inp / "NORMAL").mkdir(parents=True)
    (inp / "NORMAL" / "notes.txt").write_text("not an image")
    rc = main(["--input", str(inp), "--model", tiny_package, "--output", str(out), "--ledger", ledger,
               "--direct_running_mode=in_memory"])
    stdout, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert stdout.startswith("scored 0/0 images (0 failed, 0 out of scope, 0 skipped as already in the ledger)")
    assert "0 flagged PNEUMONIA" in stdout
    m = json.load(open(out / "metrics.json"))
    assert (m["images_found"], m["images_scored"], m["images_failed"], m["images_skipped"]) == (0, 0, 0, 0)
    assert m["per_input"] == {str(inp): {"found": 0, "scored": 0, "failed": 0, "skipped": 0, "out_of_scope": 0}}
    assert m["positive_count"] == 0 and sum(m["probability_histogram"]["counts"]) == 0
    assert open(out / "predictions-00000.csv").read().strip() == ",".join(
        ["path", "status", "probability", "prediction", "threshold", "label", "model", "error"])
    assert {"report.html", "report.md", "histogram.png"} <= set(os.listdir(out))
    assert sorted(os.listdir(tmp_path / "scores")) == ["night1"]  # no temporary folder left
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT run_id, images_new FROM runs").fetchall() == [(m["run_id"], 0)]



def test_ledger_skips_known_images_and_new_version_rescores(small_tree, tiny_package, tmp_path, capsys):

    ledger = str(tmp_path / "ledger.sqlite")
    base = ["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--direct_running_mode=in_memory"]
    assert main(base + ["--output", str(tmp_path / "night1")]) == 0
    first = read_predictions(str(tmp_path / "night1"))
    assert {r["status"] for r in first.values()} == {"ok"} and len(first) == 20
    assert len(ledger_rows(ledger)) == 20
    # night 2: two new images (one a byte-copy of a known image under a new name) plus a broken one
    shutil.copy(next(iter(first)), os.path.join(small_tree, "NORMAL", "copy_of_known.jpeg"))
    textured((64, 64), 200).save(os.path.join(small_tree, "NORMAL", "new.png"))
    open(os.path.join(small_tree, "NORMAL", "broken.jpeg"), "wb").close()
    capsys.readouterr()
    assert main(base + ["--output", str(tmp_path / "night2")]) == 0
    second = read_predictions(str(tmp_path / "night2"))
    earlier = sum(r["status"] == "skipped" and r["prediction"] == "PNEUMONIA" for r in second.values())
    assert earlier == sum(r["prediction"] == "PNEUMONIA" for r in first.values()) + (
        first[next(iter(first))]["prediction"] == "PNEUMONIA") > 0  # the copy of a known one is skipped too
    assert capsys.readouterr().out.startswith(
        "scored 1/23 images (1 failed, 0 out of scope, 21 skipped as already in the ledger, 1 of them under a name new "
        f"to it; {earlier} flagged, 0 not screened on earlier nights) with pneumonia/1")
    # QA: the reader of night 2 saw "21 skipped" and nothing of night 1's flagged scans, on no worklist of tonight's
    said = (f"Not on this worklist: {earlier} images flagged PNEUMONIA at this threshold and 0 not screened on earlier "
            "nights, skipped tonight as already in the ledger (the predictions CSVs list them with status skipped). "
            f"Their worklists, the latest first: {tmp_path / 'night1'} (finished ")
    assert said in open(tmp_path / "night2" / "report.md").read()
    assert said in " ".join(parse(str(tmp_path / "night2" / "report.html"))[1].split())
    assert f" UTC): {earlier} flagged, 0 not screened." in open(tmp_path / "night2" / "report.md").read()
    night2 = json.load(open(tmp_path / "night2" / "metrics.json"))
    assert (night2["images_skipped_flagged"], night2["images_skipped_unscreened"]) == (earlier, 0)
    statuses = {os.path.basename(p): r["status"] for p, r in second.items()}
    assert statuses.pop("copy_of_known.jpeg") == "skipped"  # same bytes, same model
    assert statuses.pop("new.png") == "ok" and statuses.pop("broken.jpeg") == "error"
    assert set(statuses.values()) == {"skipped"}
    for path, row in first.items():  # earlier probability and prediction carried over
        assert second[path]["probability"] == row["probability"] and second[path]["prediction"] == row["prediction"]
    m = json.load(open(tmp_path / "night2" / "metrics.json"))
    assert (m["images_found"], m["images_scored"], m["images_failed"], m["images_skipped"]) == (23, 1, 1, 21)
    # every figure is the night's: new.png alone (bright, in NORMAL: flagged), not the 21 skipped images
    new_p = float(second[os.path.join(small_tree, "NORMAL", "new.png")]["probability"])
    assert new_p >= 0.5 and m["positive_count"] == 1 and m["positive_rate"] == 1.0
    assert m["probability_histogram"]["counts"] == [int(i == min(int(new_p * 10), 9)) for i in range(10)]
    assert m["labelled_images"] == 1 and m["confusion_matrix"]["matrix"] == [[0, 1], [0, 0]]
    assert m["per_input"] == {small_tree: {"found": 23, "scored": 1, "failed": 1, "skipped": 21, "out_of_scope": 0}}
    night1 = json.load(open(tmp_path / "night1" / "metrics.json"))
    assert night1["positive_count"] == sum(r["prediction"] == "PNEUMONIA" for r in first.values()) > 0
    published = sorted(os.listdir(tmp_path / "night2"))  # what README "Outputs" lists, and nothing else
    shards = [name for name in published if name.startswith("predictions-")]
    assert shards == [f"predictions-{i:05d}.csv" for i in range(len(shards))] and len(shards) > 1  # 4 a worker
    assert [name for name in published if name not in shards] == [
        "confusion.png", "histogram.png", "metrics.json", "report.html", "report.md", "worklist.csv"]  # no roc.png:
    # tonight's one labelled image has one label
    with sqlite3.connect(ledger) as conn:  # the night's one new image, recorded from the shard summaries
        rows = conn.execute("SELECT sha256, path, run_id FROM scored WHERE run_id = ?", (m["run_id"],)).fetchall()
    assert [(len(sha), os.path.basename(path)) for sha, path, _ in rows] == [(64, "new.png")]
    rows = ledger_rows(ledger)
    assert len(rows) == 21 and len({(r[0], r[1]) for r in rows}) == 21  # no duplicates; failures not recorded
    # a new model version rescores everything, and the job says so (QA: no line did)
    from batch_job.ledger_identity import other_models

    assert other_models(ledger, "pneumonia/1") == [] and other_models(str(tmp_path / "none.sqlite"), "x/1") == []
    assert other_models(ledger, "pneumonia/2") == ["pneumonia/1"]
    with sqlite3.connect(ledger) as conn:  # a run of pneumonia/2 killed before its commit: no night of it (review)
        conn.execute("INSERT INTO runs VALUES ('killed', '/out/k', 'pneumonia/2', -1, 'now')")
    assert other_models(ledger, "pneumonia/2") == ["pneumonia/1"]
    with sqlite3.connect(ledger) as conn:
        conn.execute("DELETE FROM runs WHERE run_id = 'killed'")
    serving = str(tmp_path / "serving")
    write_package(serving, version=2)
    assert main(["--input", small_tree, "--model", os.path.join(serving, "pneumonia"), "--ledger", ledger,
                 "--direct_running_mode=in_memory", "--output", str(tmp_path / "night3")]) == 0
    third = read_predictions(str(tmp_path / "night3"))
    assert {r["status"] for r in third.values()} == {"ok", "error"}
    with sqlite3.connect(ledger) as conn:
        # 22 ok rows, two share bytes
        assert conn.execute("SELECT COUNT(*) FROM scored WHERE model = 'pneumonia/2'").fetchone()[0] == 21


def file_keys(ledger: str) -> dict[str, tuple]:
    with sqlite3.connect(ledger) as conn:
        return {os.fsdecode(p): rest for p, *rest in
                conn.execute("SELECT path, size, mtime_ns, ctime_ns, sha256 FROM files").fetchall()}


def test_unchanged_files_are_not_read_again(small_tree, tiny_package, tmp_path, monkeypatch):
    """A ledger of the version before the `files` table: the first night reads and hashes every file (skipped by
    its bytes) and records its key; the next night opens none. A touched file, a copy under a new name and a file
    rewritten in place with its size and mtime kept are read again; only the rewritten one is scored."""
    from batch_job import scoring

    ledger = str(tmp_path / "ledger.sqlite")
    base = ["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--direct_running_mode=in_memory"]
    assert main(base + ["--output", str(tmp_path / "night1")]) == 0
    with sqlite3.connect(ledger) as conn:
        conn.execute("DROP TABLE files")  # now exactly what the version before wrote
    read: list[str] = []
    real_read = scoring.read_input
    monkeypatch.setattr(scoring, "read_input", lambda path: read.append(path) or real_read(path))

    def night(n: int) -> dict[str, dict]:
        read.clear()
        assert main(base + ["--output", str(tmp_path / f"night{n}")]) == 0
        return read_predictions(str(tmp_path / f"night{n}"))

    paths = sorted(read_predictions(str(tmp_path / "night1")))
    rows = night(2)
    assert sorted(read) == paths and {r["status"] for r in rows.values()} == {"skipped"}  # hashed once more
    assert json.load(open(tmp_path / "night2" / "metrics.json"))["images_skipped_new_name"] == 0  # scored.path's
    keys = file_keys(ledger)
    assert sorted(keys) == paths
    for path, (size, mtime_ns, ctime_ns, sha) in keys.items():
        st = os.stat(path)
        assert (size, mtime_ns, ctime_ns, sha) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256_file(path))
    rows = night(3)
    assert read == [] and {r["status"] for r in rows.values()} == {"skipped"}  # nothing opened
    m = json.load(open(tmp_path / "night3" / "metrics.json"))
    assert (m["images_found"], m["images_scored"], m["images_skipped"], m["positive_count"]) == (20, 0, 20, 0)

    touched, rewritten = paths[0], paths[1]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    copy = os.path.join(small_tree, "NORMAL", "copy.jpeg")
    shutil.copy2(paths[2], copy)  # same bytes and mtime, a new path
    st = os.stat(rewritten)
    data = bytearray(open(rewritten, "rb").read())
    textured((64, 64), 7).save(rewritten, format="JPEG")  # another image...
    with open(rewritten, "r+b") as f:  # ...padded to the old size, the old mtime put back
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * (len(data) - f.tell()))
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(rewritten) == st.st_size and os.stat(rewritten).st_mtime_ns == st.st_mtime_ns
    rows = night(4)
    assert sorted(read) == sorted([touched, rewritten, copy])
    assert rows[touched]["status"] == rows[copy]["status"] == "skipped" and rows[rewritten]["status"] == "ok"
    assert rows[copy]["probability"] == rows[paths[2]]["probability"]
    assert rows[copy]["error"] == f"{scoring.NEW_NAME} {paths[2]}" and rows[touched]["error"] == ""
    assert json.load(open(tmp_path / "night4" / "metrics.json"))["images_skipped_new_name"] == 1
    assert set(file_keys(ledger)) == set(paths) | {copy}
    assert night(5) and read == []
    assert json.load(open(tmp_path / "night5" / "metrics.json"))["images_skipped_new_name"] == 0  # said once


@pytest.mark.parametrize("runner", ["direct", pytest.param("dask", marks=pytest.mark.slow)])
def test_bytes_read_on_an_earlier_night_under_a_new_name_are_said_and_named(runner, small_tree, tiny_package,
                                                                             tmp_path, capsys, request):
    """QA: a flagged scan sent again under another name, and a copy of an out-of-scope file, were only counted among
    "469 skipped as already in the ledger": nothing said new files had come. They stay skipped (the same bytes, read
    before) and off the worklist, and the night says how many came under a name new to the ledger; each row names
    the path the bytes were read under. The next night they are known names."""
    from batch_job.scoring import NEW_NAME

    Image.new("L", (64, 64), 128).save(os.path.join(small_tree, "blank.png"))  # out of scope: near-constant
    ledger = str(tmp_path / "ledger.sqlite")
    extra = ["--runner", "DaskRunner", f"--dask_client_address={request.getfixturevalue('dask_cluster')}",
             "--shard-size", "4"] if runner == "dask" else ["--direct_running_mode=in_memory"]
    base = ["--input", small_tree, "--model", tiny_package, "--ledger", ledger, *extra]
    assert main(base + ["--output", str(tmp_path / "night1")]) == 0
    first = read_predictions(str(tmp_path / "night1"))
    top = max((p for p, r in first.items() if r["status"] == "ok"), key=lambda p: float(first[p]["probability"]))
    blank = os.path.join(small_tree, "blank.png")
    assert first[blank]["status"] == "out_of_scope"
    resent, blank_copy = os.path.join(small_tree, "resent.png"), os.path.join(small_tree, "blank copy.png")
    shutil.copyfile(top, resent)
    shutil.copyfile(blank, blank_copy)
    chmodded = sorted(first)[0]
    os.chmod(chmodded, 0o644)  # a known name whose ctime changed: hashed again, not a new name
    capsys.readouterr()
    assert main(base + ["--output", str(tmp_path / "night2")]) == 0
    out = capsys.readouterr().out
    rows = read_predictions(str(tmp_path / "night2"))
    assert rows[resent]["status"] == "skipped" and rows[resent]["probability"] == first[top]["probability"]
    assert rows[resent]["error"] == f"{NEW_NAME} {top}"
    assert rows[blank_copy]["status"] == "skipped"
    assert rows[blank_copy]["error"] == f"{first[blank]['error']}; {NEW_NAME} {blank}"
    assert sum(NEW_NAME in r["error"] for r in rows.values()) == 2 and rows[chmodded]["error"] == ""
    m = json.load(open(tmp_path / "night2" / "metrics.json"))
    assert (m["images_found"], m["images_skipped"], m["images_skipped_new_name"]) == (23, 23, 2)
    flagged = sum(r["prediction"] == "PNEUMONIA" for r in rows.values())
    assert "23 skipped as already in the ledger, 2 of them under a name new to it; " \
           f"{flagged} flagged, 0 not screened on earlier nights)" in out
    assert first[top]["prediction"] == "PNEUMONIA"  # the resent one was flagged: the note says how many were
    note = ("2 of the 23 skipped images came under a name new to the ledger: the same bytes as an image an earlier "
            "night read under another path (a copy sent again, a file moved or renamed); 1 of them flagged PNEUMONIA "
            "at this threshold.")
    assert note in open(tmp_path / "night2" / "report.md").read()
    page, text = parse(str(tmp_path / "night2" / "report.html"))
    assert note in " ".join(text.split())
    assert "out of scope, 0 · under new names, 2 (1 flagged) · counts" in " ".join(text.split())
    assert {"#new-names", "new-names"} <= {a.get("href") for _, a in page.tags} | {a.get("id") for _, a in page.tags}
    table = " ".join(text[text.index("its bytes read before as"):].split())  # the flagged one first (review)
    shown = html_report.probability(float(first[top]["probability"]))
    assert table.startswith(f"its bytes read before as {resent} {shown} PNEUMONIA {top} "
                            f"{blank_copy} out of scope {blank}")
    with open(tmp_path / "night2" / "worklist.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []  # skipped: read before, not listed
    # run again into its folder, the night would say no new name: refused like a night whose reading list it empties
    assert main(base + ["--output", str(tmp_path / "night2"), "--overwrite"]) == 2
    assert "which said 2 files came under names new to the ledger" in capsys.readouterr().err
    assert json.load(open(tmp_path / "night2" / "metrics.json"))["images_skipped_new_name"] == 2
    assert main(base + ["--output", str(tmp_path / "night3")]) == 0
    m = json.load(open(tmp_path / "night3" / "metrics.json"))
    assert (m["images_skipped"], m["images_skipped_new_name"]) == (23, 0)
    assert "under a name new" not in capsys.readouterr().out
    # a name once used for other bytes (exports that recycle IM000001) now holding a scan read before (review)
    other = next(p for p in sorted(first) if first[p]["status"] == "ok" and p not in (top, chmodded))
    shutil.copyfile(top, other)
    assert main(base + ["--output", str(tmp_path / "night4")]) == 0
    rows = read_predictions(str(tmp_path / "night4"))
    assert rows[other]["status"] == "skipped" and rows[other]["error"] == f"{NEW_NAME} {top}"
    assert json.load(open(tmp_path / "night4" / "metrics.json"))["images_skipped_new_name"] == 1


@pytest.mark.slow
def test_unchanged_files_on_dask_runner(small_tree, tiny_package, tmp_path, dask_cluster):
    """The file keys travel from Dask workers through the shard summaries into the ledger."""
    ledger = str(tmp_path / "ledger.sqlite")
    base = ["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--shard-size", "4",
            "--runner", "DaskRunner", f"--dask_client_address={dask_cluster}"]
    assert main(base + ["--output", str(tmp_path / "night1")]) == 0
    paths = sorted(read_predictions(str(tmp_path / "night1")))
    assert sorted(file_keys(ledger)) == paths
    assert main(base + ["--output", str(tmp_path / "night2")]) == 0
    assert {r["status"] for r in read_predictions(str(tmp_path / "night2")).values()} == {"skipped"}
    m = json.load(open(tmp_path / "night2" / "metrics.json"))
    assert (m["images_found"], m["images_scored"], m["images_skipped"]) == (20, 0, 20)


def test_output_of_a_run_without_this_ledger_is_not_replaced(small_tree, tiny_package, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--input", small_tree, "--model", tiny_package, "--output", out, "--direct_running_mode=in_memory"]
    assert main(common) == 0
    before = read_predictions(out)
    assert main(common + ["--ledger", str(tmp_path / "l.sqlite")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert read_predictions(out) == before


def test_only_an_output_of_a_run_killed_before_this_ledgers_commit_is_replaced(small_tree, tiny_package, tmp_path,
                                                                               capsys, caplog):
    """QA and review: with the ledger deleted and made again, or restored from a backup, a finished night's OUT_DIR
    (with a file a radiologist had put in it) was deleted and replaced without --overwrite, as if its run had been
    killed before its commit: the evidence was a run the ledger did not know. Now it is the run's own publishing row,
    written just before OUT_DIR is published and replaced by its commit."""
    out, ledger = tmp_path / "out", str(tmp_path / "ledger.sqlite")
    normal, pneumonia = os.path.join(small_tree, "NORMAL"), os.path.join(small_tree, "PNEUMONIA")

    def night(folder: str) -> int:
        return main(["--input", folder, "--model", tiny_package, "--output", str(out), "--ledger", ledger,
                     "--direct_running_mode=in_memory"])

    def runs(sql: str = "SELECT run_id, images_new FROM runs") -> list:
        with contextlib.closing(sqlite3.connect(ledger)) as conn, conn:
            return conn.execute(sql).fetchall()

    assert night(normal) == 0
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    assert runs() == [(run_id, 10)]  # the publishing row, replaced by the commit
    first = read_predictions(str(out))
    os.remove(ledger)
    os.remove(ledger + ".lock")
    capsys.readouterr()
    assert_one_line_error(capsys, night(pneumonia), "exists and is not empty")  # no ledger: not its run
    assert not os.path.exists(ledger)  # a refusal creates nothing
    assert main(["--input", normal, "--model", tiny_package, "--output", str(tmp_path / "other"), "--ledger", ledger,
                 "--direct_running_mode=in_memory"]) == 0  # a new ledger at the same path
    capsys.readouterr()
    assert_one_line_error(capsys, night(pneumonia), "exists and is not empty")  # it does not know that run
    assert read_predictions(str(out)) == first
    shutil.rmtree(out)
    assert night(normal) == 0
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]
    capsys.readouterr()
    assert_one_line_error(capsys, night(pneumonia), "exists and is not empty")  # committed
    runs(f"DELETE FROM runs WHERE run_id = '{run_id}'")  # a backup from before that night, restored
    assert_one_line_error(capsys, night(pneumonia), "exists and is not empty")
    runs(f"INSERT INTO runs VALUES ('{run_id}', '{out}', 'pneumonia/1', -1, 'now')")  # killed before its commit
    for extra in ("reviewed.txt", "annotated_by_dr_x.png"):  # files the job did not write
        (out / extra).write_text("read by Dr X")
        assert_one_line_error(capsys, night(pneumonia), "holds 1 file(s) or folder(s) the job did not write")
        (out / extra).unlink()
    caplog.clear()
    assert night(pneumonia) == 0  # killed before its commit, on this ledger: replaced
    assert "killed before its ledger commit: replacing it" in caplog.text
    assert {r["label"] for r in read_predictions(str(out)).values()} == {"PNEUMONIA"}
    assert [n for _, n in runs()] == [10, 10]  # the killed run's publishing row went with the commit that replaced it


def test_a_journal_left_by_a_killed_commit_is_rolled_back_before_the_checks_read_the_ledger(small_tree, tiny_package,
                                                                                           tmp_path, capsys):
    """Review: a commit killed mid-transaction left a hot journal; the read-only checks before the run (the model's
    id, the orphan check) then failed with "attempt to write a readonly database", exit 1, every night after."""
    ledger = str(tmp_path / "ledger.sqlite")

    def night(name: str) -> int:
        return main(["--input", small_tree, "--model", tiny_package, "--output", str(tmp_path / name), "--ledger",
                     ledger, "--direct_running_mode=in_memory"])

    assert night("n1") == 0
    before = ledger_rows(ledger)
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal, sqlite3
conn = sqlite3.connect({ledger!r})
conn.execute("PRAGMA cache_size=1")
conn.execute("BEGIN")
for i in range(20000):
    conn.execute("INSERT INTO files VALUES (?, 1, 1, 1, 'x')", (str(i).encode() * 20,))
os.kill(os.getpid(), signal.SIGKILL)
"""])
    assert killed.returncode == -signal.SIGKILL and os.path.exists(ledger + "-journal")
    assert night("n2") == 0, capsys.readouterr().err
    assert not os.path.exists(ledger + "-journal") and ledger_rows(ledger) == before
    m = json.loads((tmp_path / "n2" / "metrics.json").read_text())
    assert (m["images_scored"], m["images_skipped"]) == (0, 20)


def test_unusable_ledger_file_is_one_line_exit_2(small_tree, tiny_package, tmp_path, capsys):
    bad = tmp_path / "not_a_db.sqlite"
    bad.write_text("this is not sqlite " * 100)
    assert main(["--input", small_tree, "--model", tiny_package, "--output", str(tmp_path / "o"),
                 "--ledger", str(bad), "--direct_running_mode=in_memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a usable SQLite ledger" in err[0]
    assert not os.path.exists(tmp_path / "o")


def test_second_job_on_a_busy_ledger_fails_clearly(small_tree, tiny_package, tmp_path, capsys):
    ledger = str(tmp_path / "ledger.sqlite")
    with Ledger(ledger):
        with pytest.raises(LedgerBusy):
            Ledger(ledger).__enter__()
        rc = main(["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--output",
                   str(tmp_path / "o"), "--direct_running_mode=in_memory"])
    assert rc == 2
    assert "in use by another batch job" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT COUNT(*) FROM scored").fetchone()[0] == 0


def test_a_ledger_named_through_a_symlink_takes_the_same_lock(small_tree, tiny_package, tmp_path, capsys):
    """QA defect: the lock was per name, so a job naming the ledger through a symlink ran beside one naming its real
    path, both scoring and committing the same night."""
    ledger = str(tmp_path / "ledger.sqlite")
    with Ledger(ledger):
        pass
    os.symlink(ledger, tmp_path / "link.sqlite")
    with Ledger(str(tmp_path / "link.sqlite")) as held:
        assert held.path == ledger
        rc = main(["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--output",
                   str(tmp_path / "o"), "--direct_running_mode=in_memory"])
    assert rc == 2 and "in use by another batch job" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "link.sqlite.lock")


def test_a_ledger_with_a_second_name_by_hard_link_is_refused(small_tree, tiny_package, tmp_path, capsys):
    """QA: `ln ledger.sqlite other.sqlite`, then two nights, one under each name, 0.3 s apart: both ran (the lock is a
    file beside the name), both scored and committed the same 318 images. Refused under either name, nothing made."""
    ledger = str(tmp_path / "ledger.sqlite")
    base = ["--input", small_tree, "--model", tiny_package, "--direct_running_mode=in_memory"]
    assert main(base + ["--ledger", ledger, "--output", str(tmp_path / "night1")]) == 0
    os.link(ledger, tmp_path / "other.sqlite")
    for name in (ledger, str(tmp_path / "other.sqlite")):
        capsys.readouterr()
        assert main(base + ["--ledger", name, "--output", str(tmp_path / "night2")]) == 2
        assert_one_line_error(capsys, 2, f"ledger {name} has 2 names (hard links): a job started under another "
                                         "name would not see this one's lock; keep one name and remove the others")
        assert not os.path.exists(tmp_path / "night2") and not os.path.exists(tmp_path / "other.sqlite.lock")
    os.remove(tmp_path / "other.sqlite")
    assert main(base + ["--ledger", ledger, "--output", str(tmp_path / "night2")]) == 0


def test_a_new_ledger_that_cannot_be_made_leaves_nothing(tmp_path, monkeypatch):
    """QA defect: a new --ledger on a full disk left a half-made ledger.sqlite (some tables) and its lock, and said
    "is not a usable SQLite ledger: database or disk is full"."""
    from batch_job import ledger as ledger_module
    from batch_job.ledger import LedgerError

    real = sqlite3.connect

    class Full:
        def __init__(self, path):
            self.conn = real(path)

        def executescript(self, script):
            self.conn.execute("CREATE TABLE half (x)")
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.conn.__exit__(*exc)

    monkeypatch.setattr(ledger_module.sqlite3, "connect", lambda path, *a, **k: Full(path))
    path = tmp_path / "new" / "ledger.sqlite"
    with pytest.raises(LedgerError, match=r"^cannot create ledger .*ledger\.sqlite: database or disk is full$"):
        Ledger(str(path)).__enter__()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["listed", "scored", "written", "published"])
def test_sigkill_at_each_point_then_rerun_completes(point, small_tree, tiny_package, tmp_path):
    ledger, out = str(tmp_path / "ledger.sqlite"), str(tmp_path / "out")
    args = ["--input", small_tree, "--model", tiny_package, "--output", out, "--ledger", ledger,
            "--direct_num_workers=2", "--shard-size", "4"]
    killed = job(args, env_kill=point)
    assert killed.returncode == -signal.SIGKILL
    if point != "published":
        assert not os.path.exists(out)
    assert ledger_rows(ledger) == []  # the ledger is as if the run had never started
    rerun = job(args)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    rows = read_predictions(out)
    assert set(rows) == {p for _, p in iter_images([small_tree])}
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert not glob.glob(out + ".tmp-*") and not glob.glob(out + ".old-*")
    entries = ledger_rows(ledger)
    assert len(entries) == 20 and len({e[0] for e in entries}) == 20


@pytest.mark.slow
def test_sigkill_while_scoring_then_the_next_night_cleans_up(small_tree, tiny_package, tmp_path):
    """As cron runs it: a new dated OUT_DIR each night. The killed night's temp folder goes with the next night,
    whose OUT_DIR is another folder in the same parent."""
    ledger, scores = str(tmp_path / "ledger.sqlite"), tmp_path / "scores"

    def args(night: str) -> list[str]:
        return ["--input", small_tree, "--model", tiny_package, "--output", str(scores / night), "--ledger", ledger,
                "--direct_num_workers=1", "--shard-size", "1", "--batch-size", "1"]

    proc = subprocess.Popen([sys.executable, "-m", "batch_job", *args("2026-11-25")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(scores / "2026-11-25.tmp-*/predictions-*.csv")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.listdir(scores) == [os.path.basename(glob.glob(str(scores / "2026-11-25.tmp-*"))[0])]
    assert ledger_rows(ledger) == []
    assert job(args("2026-11-26")).returncode == 0
    assert os.listdir(scores) == ["2026-11-26"]  # the killed night's temp folder is gone
    assert len(read_predictions(str(scores / "2026-11-26"))) == 20 and len(ledger_rows(ledger)) == 20


@pytest.mark.slow
def test_dask_worker_killed_mid_run_job_still_accounts_for_every_image(tiny_package, tmp_path):
    from distributed import Client, LocalCluster

    root = str(tmp_path / "in")
    make_tree(root, per_class=40, size=64, seed=9)
    out = str(tmp_path / "out")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster.scheduler_address) as client:
            worker_pids = list(client.run(os.getpid).values())
        result = {}
        t = threading.Thread(target=lambda: result.update(rc=main([
            "--input", root, "--model", tiny_package, "--output", out, "--shard-size", "1", "--batch-size", "1",
            "--runner", "DaskRunner", f"--dask_client_address={cluster.scheduler_address}"])))
        t.start()
        deadline = time.time() + 60
        while time.time() < deadline and len(glob.glob(out + ".tmp-*/predictions-*.csv")) < 3:
            time.sleep(0.01)
        os.kill(worker_pids[0], signal.SIGKILL)
        t.join(120)
    assert result.get("rc") == 0
    rows = read_predictions(out)
    assert set(rows) == {p for _, p in iter_images([root])} and len(rows) == 80


# ------------------------------------------------------------------- DICOM

def test_dicom_decoding_rules():
    from xray_core.preprocessing import ImageError, PreprocessConfig, preprocess_image

    cfg = PreprocessConfig(image_size=32)
    ramp12 = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    mono2 = preprocess_image(dicom_bytes(ramp12, bits_stored=12), cfg)
    assert mono2[0, 0, 0] < 0.05 and mono2[0, -1, 0] > 0.95  # 12-bit range mapped to 0..1
    mono1 = preprocess_image(dicom_bytes(ramp12, bits_stored=12, photometric="MONOCHROME1"), cfg)
    assert np.allclose(mono1, 1.0 - mono2, atol=1 / 255)  # MONOCHROME1 inverted
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    assert np.allclose(preprocess_image(dicom_bytes(ramp16), cfg), mono2, atol=2 / 255)
    ramp8 = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    assert np.allclose(preprocess_image(dicom_bytes(ramp8), cfg), mono2, atol=2 / 255)
    # a window of centre 1024, width 1024 saturates everything above 1536 and below 512
    windowed = preprocess_image(dicom_bytes(ramp12, bits_stored=12, window=(1024, 1024)), cfg)
    assert windowed[0, -4, 0] == 1.0 and windowed[0, 2, 0] == 0.0
    # rescale slope/intercept (modality LUT) is linear: the same picture after min..max mapping
    assert np.allclose(preprocess_image(dicom_bytes(ramp12, bits_stored=12, slope=2.0, intercept=-1024), cfg),
                       mono2, atol=1 / 255)
    multi = preprocess_image(dicom_bytes(np.stack([ramp12, ramp12[:, ::-1]]), bits_stored=12), cfg)
    assert np.allclose(multi, mono2, atol=1 / 255)  # first frame
    with pytest.raises(ImageError, match=r"\(JPEG-LS Lossless Image Compression\): its codestream holds no frame "
                                         r"header"):  # a frame without one is refused before any decoder runs
        preprocess_image(dicom_bytes(ramp12, compressed_junk=True), cfg)
    with pytest.raises(ImageError, match="DICOM"):
        preprocess_image(dicom_bytes(ramp12)[:600], cfg)


# ------------------------------------------------------------ fault corpus

def write_big_png(path: str, side: int) -> None:
    """A real side x side 8-bit grayscale PNG, streamed so making it needs no side*side memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def build_fault_corpus(root: str, outside: str) -> dict[str, str]:
    """-> {path: 'ok' or an expected error fragment}; symlink loops and links are added too."""
    expect = {}
    bad = write_bad_inputs(os.path.join(root, "bad"))
    expect.update(bad)
    if os.geteuid() == 0:  # root reads a chmod-0 file: it is scored
        expect[os.path.join(root, "bad", "no_permission.jpeg")] = "ok"
    for name in ("with space.png", "ünïcødé 名前.png", "comma, and \"quote\".png", "semi;colon.png"):
        p = os.path.join(root, "names", name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        textured((48, 48), 90).save(p)
        expect[p] = "ok"
    tiny = os.path.join(root, "tiny")
    os.makedirs(tiny)
    for i in range(10_000):
        p = os.path.join(tiny, f"t{i:05d}.png")
        textured((32, 32), i % 256).save(p)
        expect[p] = "ok"
    write_big_png(os.path.join(root, "huge_20000.png"), 20_000)
    expect[os.path.join(root, "huge_20000.png")] = "decompression bomb"
    odd = os.path.join(root, "odd")
    os.makedirs(odd)
    arr = np.random.default_rng(3).integers(0, 60, (40, 80), dtype=np.uint8)  # texture: not a two-level image
    arr[:, :40] += 190
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(os.path.join(odd, "exif_rotated.jpg"), exif=exif.tobytes())
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(os.path.join(odd, "sixteen_bit.png"))
    Image.new("RGB", (64, 64), (10, 200, 30)).convert("CMYK").save(os.path.join(odd, "cmyk.jpg"))
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(os.path.join(odd, "palette_transparent.png"), transparency=0)
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    with open(os.path.join(odd, "scan.dcm"), "wb") as f:
        f.write(dicom_bytes(ramp, bits_stored=12))
    with open(os.path.join(odd, "no_extension_dicom"), "wb") as f:
        f.write(dicom_bytes(ramp, bits_stored=12, photometric="MONOCHROME1"))
    for name in ("exif_rotated.jpg", "sixteen_bit.png", "cmyk.jpg", "palette_transparent.png", "scan.dcm",
                 "no_extension_dicom"):
        expect[os.path.join(odd, name)] = "ok"
    with open(os.path.join(odd, "corrupt.dcm"), "wb") as f:
        f.write(dicom_bytes(ramp)[:700])
    expect[os.path.join(odd, "corrupt.dcm")] = "DICOM"
    latin1 = os.path.join(os.fsencode(root), b"names", b"latin1_\xe9t\xe9.png")  # not valid UTF-8
    textured((48, 48), 70).save(latin1, format="PNG")
    expect[os.fsdecode(latin1)] = "ok"
    os.mkfifo(os.path.join(root, "names", "fifo.png"))  # would block a naive open()
    expect[os.path.join(root, "names", "fifo.png")] = "not a regular file"
    os.mkfifo(os.path.join(root, "names", "fifo_no_extension"))  # not sniffed, not listed
    os.makedirs(os.path.join(root, "loop"))
    os.symlink(root, os.path.join(root, "loop", "back_to_root"))  # a symlink loop: not followed
    os.makedirs(outside, exist_ok=True)
    target = os.path.join(outside, "outside.png")
    textured((48, 48), 30).save(target)
    os.symlink(target, os.path.join(root, "link_to_outside.png"))  # a linked file: scored under its link path
    expect[os.path.join(root, "link_to_outside.png")] = "ok"
    return expect


@pytest.mark.slow
def test_fault_corpus(tmp_path):

    serving = str(tmp_path / "serving")
    write_package(serving)
    root = str(tmp_path / "corpus")
    expect = build_fault_corpus(root, str(tmp_path / "elsewhere"))
    out = str(tmp_path / "out")
    peak: list[int] = []
    proc = job(["--input", root, "--model", os.path.join(serving, "pneumonia"), "--output", out,
                "--ledger", str(tmp_path / "ledger #1?.sqlite"), "--direct_num_workers=2"], timeout=300, peak=peak)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_predictions(out)  # parses every CSV shard; asserts the header and no duplicate path
    assert set(rows) == set(expect)  # every path exactly once; the loop added nothing
    for path, want in expect.items():
        if want == "ok":  # decoded; flat or two-level odd images are then out of scope (the gate), never errors
            assert rows[path]["status"] in ("ok", "out_of_scope"), (path, rows[path]["error"])
        else:
            assert rows[path]["status"] == "error" and want in rows[path]["error"], (path, rows[path])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["images_found"] == m["images_scored"] + m["images_failed"] + m["images_out_of_scope"] == len(expect)
    assert len(expect) >= 10_020
    from xray_core.files import sha256_file

    distinct = {sha256_file(p) for p, r in rows.items() if r["status"] == "ok"}  # 10,000 tiny files: 256 contents
    assert {r[0] for r in ledger_rows(str(tmp_path / "ledger #1?.sqlite"))} == distinct
    # a glob through the symlink loop lists each file once, and only what the pattern matches
    globbed = [p for _, p in iter_images([os.path.join(root, "**", "*.dcm")])]
    assert sorted(os.path.basename(p) for p in globbed) == ["corrupt.dcm", "scan.dcm"]
    assert 0 < peak[0] < 1.5e9  # driver + 2 workers together stayed under 1.5 GB (the 20k x 20k PNG is not decoded)



@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_while_publishing_is_held_until_the_ledger_commit(signum, name, small_tree, tiny_package, tmp_path,
                                                                   monkeypatch, job_log):
    """The command's SIGINT and SIGTERM handler (xray_core/interrupts.py) holds a signal that arrives while OUT_DIR
    is published and the ledger committed: the job completes, both are consistent, and it says so."""
    from batch_job import outdir
    from xray_core.interrupts import GATE

    ledger, out = str(tmp_path / "ledger.sqlite"), str(tmp_path / "out")
    real_publish = outdir.publish_dir

    def publish_with_ctrl_c(*a, **k):
        os.kill(os.getpid(), signum)  # handled (held) before the rename below
        real_publish(*a, **k)

    monkeypatch.setattr(outdir, "publish_dir", publish_with_ctrl_c)
    previous = signal.signal(signum, GATE.handler)
    try:
        rc = main(["--input", small_tree, "--model", tiny_package, "--output", out, "--ledger", ledger,
                   "--direct_running_mode=in_memory"])
    finally:
        signal.signal(signum, previous)
    assert rc == 0 and not GATE.pending and GATE.depth == 0
    assert f"{name} arrived while the outputs were being published; the job completed first" in job_log.text
    assert len(read_predictions(out)) == 20 and len(ledger_rows(ledger)) == 20


def test_failed_ledger_commit_says_outputs_were_published_and_exits_3(small_tree, tiny_package, tmp_path,
                                                                       monkeypatch, capsys):
    """OUT_DIR is published, the ledger commit fails: the line says so (not "nothing published"), exit 3,
    and the next run with the same ledger rescores those images."""
    ledger, out = str(tmp_path / "ledger.sqlite"), str(tmp_path / "night1")

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Ledger, "commit", locked)
    common = ["--input", small_tree, "--model", tiny_package, "--ledger", ledger, "--direct_running_mode=in_memory"]
    line = assert_one_line_error(capsys, main(common + ["--output", out]), f"outputs published in {out}",
                                 "not updated", "database is locked", "rescores", code=3)
    assert "nothing published" not in line and "stays marked" not in line
    assert len(read_predictions(out)) == 20 and ledger_rows(ledger) == []
    monkeypatch.undo()
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)  # no publishing row left (review)
    capsys.readouterr()
    assert_one_line_error(capsys, main(common + ["--output", out]), "exists and is not empty")  # a complete night
    assert main(common + ["--output", str(tmp_path / "night2")]) == 0
    assert {r["status"] for r in read_predictions(str(tmp_path / "night2")).values()} == {"ok"}  # rescored
    assert len(ledger_rows(ledger)) == 20


def test_ledger_readers_per_worker_are_bounded(tmp_path):
    """A long-lived worker that sees one ledger after another keeps only the last few open."""
    import gc

    from batch_job.ledger_lookup import lookup

    paths = []
    for i in range(8):
        path = str(tmp_path / f"ledger{i}.sqlite")
        with Ledger(path) as book:
            book.commit(f"run{i}", "/out", "m/1", [("ab" * 32, 0.25, "/x.png")])
        paths.append(os.path.realpath(path))
    assert [lookup(p, "ab" * 32, "m/1").probability for p in paths] == [0.25] * 8

    def open_ledgers() -> set[str]:
        gc.collect()  # a connection is closed when collected (it is in a reference cycle with its statement cache)
        fds = os.listdir("/proc/self/fd")
        return {t for t in (os.path.realpath(f"/proc/self/fd/{fd}") for fd in fds) if t in paths}

    assert len(open_ledgers()) <= 4 and paths[-1] in open_ledgers()


# ------------------------------------------------------------------------- temp dirs, locks, publishing
def test_publish_puts_the_old_output_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    """Review defect 8: the old OUT_DIR stayed parked when renaming the new one into place failed."""
    from xray_core import files

    final, new = tmp_path / "out", tmp_path / "new"
    final.mkdir()
    (final / "a.csv").write_text("old")
    new.mkdir()
    (new / "a.csv").write_text("new")
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.fspath(src) == str(new):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space"):
        files.publish_dir(str(new), str(final), replace=True)
    monkeypatch.undo()
    assert (final / "a.csv").read_text() == "old" and (new / "a.csv").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["new", "out"]  # no parked folder left


def test_temp_dirs_go_when_their_job_is_dead_whatever_its_host_and_stay_while_it_runs(small_tree, tiny_package,
                                                                                       tmp_path):
    """Review defect 2: in Docker every job is PID 1 on a new hostname, so pid@host never matched and temp
    dirs of killed jobs stayed; and a live job whose pid is not visible here lost its temp dir. The owner's
    lock on the temp dir's lock file decides."""
    import socket

    from xray_core.files import hold_lock

    def temp_dir(name: str, *files: str) -> str:
        path = tmp_path / name
        path.mkdir()
        for f in files:
            (path / f).write_text("x")
        return str(path)

    dead = temp_dir("out.tmp-1@0f3c2a9b7d1e-abcd1234", "scratch", "predictions-00000.csv")
    hold_lock(dead).close()  # a killed container's job: its lock is free
    half_removed = temp_dir("out.tmp-1@0f3c2a9b7d1e-efgh5678.discarded")
    hold_lock(half_removed).close()
    running = temp_dir(f"out.tmp-999999999@{socket.gethostname()}-ijkl9012", "scratch")
    lock = hold_lock(running)  # a job in another PID namespace: its pid means nothing here
    try:
        assert main(["--input", small_tree, "--model", tiny_package, "--output", str(tmp_path / "out"),
                     "--direct_running_mode=in_memory"]) == 0
    finally:
        lock.close()
    assert sorted(os.listdir(tmp_path)) == ["in", "out", os.path.basename(running)]


def test_a_killed_jobs_temp_dir_goes_with_the_next_job_in_the_same_parent_whatever_its_output(
        small_tree, tiny_package, tmp_path):
    """Only folders named exactly as the job names them, holding its lock file with the lock free, and nothing
    else than what the job writes; a running job's temp dir stays, and so does anything a user made."""
    import socket

    from xray_core.files import hold_lock

    scores = tmp_path / "scores"

    def folder(name: str, *files: str, lock: bool = True) -> str:
        path = scores / name
        path.mkdir(parents=True)
        for f in files:
            (path / f).write_text("x")
        if lock:
            hold_lock(str(path)).close()  # its job is dead
        return name

    dead = folder("2026-11-24.tmp-7@0f3c2a9b7d1e-abcd1234", "scratch", "predictions-00000.csv")
    folder("other name.tmp-8@host-efgh5678.discarded")
    kept = [folder("2026-11-23.tmp-9@host-ijkl9012", "scratch", lock=False),  # no lock file: not the job's
            folder("2026-11-22.tmp-9@host-mnop3456", "notes.txt"),  # holds what the job never writes
            folder("2026-11-21.tmp-x@host-qrst7890", "scratch"),  # not the job's name
            folder(f"2026-11-20.tmp-999999999@{socket.gethostname()}-uvwx1234", "scratch", lock=False)]
    running = hold_lock(str(scores / kept[-1]))  # a job still running
    try:
        assert main(["--input", small_tree, "--model", tiny_package, "--output", str(scores / "2026-11-26"),
                     "--direct_running_mode=in_memory"]) == 0
    finally:
        running.close()
    assert sorted(os.listdir(scores)) == sorted(kept + ["2026-11-26"]) and dead not in os.listdir(scores)


def all_paths(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files)


@pytest.mark.parametrize("case", ["output_not_empty", "ledger_unusable", "ledger_busy", "output_unwritable",
                                  "no_images", "foreign_database", "foreign_table_of_our_name",
                                  "ledger_read_only", "output_over_path_max"])
def test_a_refused_run_with_a_ledger_creates_nothing(case, small_tree, tiny_package, tmp_path, monkeypatch, capsys):
    """Review defect 6: refused runs created the ledger file, its lock and its folders first. QA defects: another
    application's SQLite file was given the ledger's tables, scored against and then failed to commit (exit 3, every
    night); so did a ledger the job cannot write (a read-only mount). Both are refused before any work now."""
    ledger, out = str(tmp_path / "books" / "ledger.sqlite"), tmp_path / "scores" / "night1"
    held, inp = None, small_tree
    if case == "output_not_empty":
        out.mkdir(parents=True)
        (out / "theirs.txt").write_text("x")
    elif case == "ledger_unusable":
        ledger = str(tmp_path / "not_a_db.sqlite")
        open(ledger, "w").write("this is not sqlite " * 100)
    elif case in ("foreign_database", "foreign_table_of_our_name"):
        ledger = str(tmp_path / "app.sqlite")
        with contextlib.closing(sqlite3.connect(ledger)) as conn, conn:
            conn.execute("CREATE TABLE scored (x INTEGER)" if case == "foreign_table_of_our_name"
                         else "CREATE TABLE invoices (id INTEGER)")
    elif case == "ledger_read_only":
        with Ledger(ledger):  # a real ledger, then the process may not write it (root ignores chmod: os.access)
            pass
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == ledger and mode & os.W_OK
                            else real_access(p, mode, **kw))
    elif case == "output_over_path_max":  # refused only when its folders are made, after the ledger was opened
        out = tmp_path / "scores" / os.path.join(*["y" * 250] * 20)
    elif case == "ledger_busy":
        held = Ledger(ledger).__enter__()
    elif case == "output_unwritable":
        (tmp_path / "scores").write_text("a file where a folder should be")
    else:
        inp = str(tmp_path / "empty")
        os.makedirs(os.path.join(inp, "NORMAL"))
    before = all_paths(tmp_path)
    try:
        rc = main(["--input", inp, "--model", tiny_package, "--output", str(out), "--ledger", ledger,
                   "--direct_running_mode=in_memory"] + (["--fail-if-empty"] if case == "no_images" else []))
    finally:
        if held is not None:
            held.__exit__()
    line = assert_one_line_error(capsys, rc)
    assert all_paths(tmp_path) == before
    fragment = {"foreign_database": "tables a ledger never has (invoices)",
                "foreign_table_of_our_name": "table scored lacks the columns", "ledger_read_only": "not writable"}
    assert fragment.get(case, "") in line
    if case.startswith("foreign"):
        with contextlib.closing(sqlite3.connect(ledger)) as conn:
            assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == [
                "scored" if case == "foreign_table_of_our_name" else "invoices"]  # untouched


def test_a_ledger_whose_commit_was_killed_is_rolled_back_and_used(tmp_path):
    """Review: a commit killed half-way leaves a hot journal; the read-only pre-flight check could not read the
    ledger and refused it (exit 2) every night. The writer's open rolls the journal back; the committed rows stay."""
    from batch_job.ledger import check_usable

    path = str(tmp_path / "ledger.sqlite")
    with Ledger(path) as book:
        book.commit("r1", "/o", "pneumonia/6", [("a" * 64, 0.5, "/x.png")])
    killed = ("import os, sqlite3\n"
              f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
              "c.execute('PRAGMA cache_size=1')\n"  # the transaction spills into the file: the journal is hot
              "c.execute('BEGIN')\n"
              "for i in range(3000):\n"
              "    c.execute(\"INSERT INTO scored VALUES (?, 'm', 0.1, 'now', '/p', 'r2')\", (f'{i:064d}',))\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", killed], check=True)
    assert os.path.exists(path + "-journal")
    check_usable(path)
    with Ledger(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*), MIN(run_id) FROM scored").fetchone() == (1, "r1")


def test_output_made_by_someone_else_during_the_run_is_a_job_failure(small_tree, tiny_package, tmp_path,
                                                                      monkeypatch, capsys):
    """Review nit: this exited 2, 'refused before starting', after all the scoring. Now exit 1, and says so."""
    from batch_job import pipeline

    out = tmp_path / "out"
    real_check = pipeline.check

    def check_then_someone_writes(rec):
        real_check(rec)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(pipeline, "check", check_then_someone_writes)
    rc = main(["--input", small_tree, "--model", tiny_package, "--output", str(out), "--direct_running_mode=in_memory"])
    assert_one_line_error(capsys, rc, "created by someone else while the job ran", "nothing published", code=1)
    assert os.listdir(out) == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_publishing_keeps_the_lock_until_the_rename_so_a_kill_leaves_nothing_unrecognised(tmp_path, monkeypatch):
    """QA defect: publish deleted the temp dir's lock file before renaming it to OUT_DIR; a job killed in between
    (a power cut) left a complete copy of the night, patients' names included, without a lock, which no later run
    recognised as a killed job's. The lock file now goes with the rename and is deleted from OUT_DIR after it."""
    from batch_job import leftovers, outdir
    from xray_core.files import LOCK_FILE

    out = str(tmp_path / "night")
    tmp = outdir.prepare(out, overwrite=False)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        f.write("{}")
    seen = []
    renaming = outdir.publish_dir

    def rename(src, dst, replace=False):
        seen.append(sorted(os.listdir(src)))  # what a kill at this moment would leave
        renaming(src, dst, replace=replace)

    monkeypatch.setattr(outdir, "publish_dir", rename)
    outdir.publish(tmp, out, overwrite=False)
    assert seen == [[LOCK_FILE, "metrics.json"]]
    assert os.listdir(out) == ["metrics.json"] and sorted(os.listdir(tmp_path)) == ["night"]
    left = outdir.prepare(str(tmp_path / "night2"), overwrite=False)  # a killed job's temp dir, lock free ...
    outdir._held.pop(left).close()
    leftovers.clean_leftovers(str(tmp_path / "night3"))  # ... goes with the next run into the same parent
    assert sorted(os.listdir(tmp_path)) == ["night"]


@pytest.mark.parametrize("stdout", ["full disk", "closed pipe"])
def test_a_log_that_cannot_be_written_after_the_night_is_published_does_not_fail_it(small_tree, tmp_path, stdout):
    """QA: with the cron recipe's log on a full disk (or stdout a pipe whose reader had gone), the summary line
    failed after OUT_DIR was published and the ledger committed: exit 1, which means "nothing published". Here
    stdout and stderr are /dev/full (every write: ENOSPC), or a pipe closed before the job starts."""
    serving = str(tmp_path / "serving")
    write_package(serving)
    out, book = str(tmp_path / "night"), str(tmp_path / "ledger.sqlite")
    cmd = [sys.executable, "-m", "batch_job", "--input", small_tree, "--model", os.path.join(serving, "pneumonia"),
           "--output", out, "--ledger", book, "--direct_running_mode=in_memory"]
    if stdout == "full disk":
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, cwd=REPO, stdout=full, stderr=full, timeout=120)
    else:
        read, write = os.pipe()
        os.close(read)
        proc = subprocess.run(cmd, cwd=REPO, stdout=write, stderr=subprocess.DEVNULL, timeout=120)
        os.close(write)
    assert proc.returncode == 0
    assert len(read_predictions(out)) == 20 and len(ledger_rows(book)) == 20


def test_a_ledger_with_a_damaged_page_is_refused_before_any_image_is_read(tmp_path, small_tree):
    """QA: random bytes over one 4 KB page of a ledger gave, by page, a Beam traceback and exit 1, exit 3 every night,
    or exit 0 committing into a file that fails SQLite's integrity check. Now every damage SQLite's quick_check
    sees is refused up front: exit 2, one line naming the ledger, nothing written."""
    from batch_job.ledger import LedgerError, check_usable

    good = str(tmp_path / "good.sqlite")
    with Ledger(good) as book:
        book.commit("r1", "/o", "pneumonia/1", [(f"{i:064x}", 0.5, f"/data/{i}.png") for i in range(3000)])
    data = open(good, "rb").read()
    pages, refused = len(data) // 4096, []
    rng = np.random.default_rng(0)
    for page in range(1, pages):
        path = str(tmp_path / f"p{page}.sqlite")
        with open(path, "wb") as f:
            f.write(data[:page * 4096] + rng.bytes(4096) + data[(page + 1) * 4096:])
        try:
            check_usable(path)
        except LedgerError as exc:
            assert "\n" not in str(exc)
            refused.append((page, str(exc)))
    assert pages >= 20 and len(refused) == pages - 1  # every damaged page: none of it is free space here
    assert sum("is damaged (SQLite quick_check: " in line for _, line in refused) >= pages // 4  # measured: 79 of 188
    ledger = str(tmp_path / "p3.sqlite")
    before = sha256_file(ledger)
    serving = str(tmp_path / "serving")
    write_package(serving)
    rc = main(["--input", small_tree, "--model", os.path.join(serving, "pneumonia"), "--output",
               str(tmp_path / "night"), "--ledger", ledger])
    assert rc == 2 and not os.path.exists(tmp_path / "night") and sha256_file(ledger) == before


def test_overwriting_a_night_this_ledger_committed_is_refused_not_emptied(small_tree, tmp_path, capsys):
    """QA: the same night run again with --overwrite and the same ledger skipped all its images (the ledger knows
    them) and replaced its worklist of flagged scans, and their heatmaps, with an empty one. It is refused (exit 2,
    nothing touched); another --output, or another ledger, runs."""
    serving = str(tmp_path / "serving")
    write_package(serving)
    out, book = str(tmp_path / "night"), str(tmp_path / "ledger.sqlite")
    args = ["--input", small_tree, "--model", os.path.join(serving, "pneumonia"), "--ledger", book,
            "--direct_running_mode=in_memory"]
    assert main(args + ["--output", out]) == 0
    before, ledger_before = snapshot(out), sha256_file(book)
    capsys.readouterr()
    rc = main(args + ["--output", out, "--overwrite"])
    assert_one_line_error(capsys, rc, f"output dir {out} holds night ", f"of ledger {book} by pneumonia/1 (committed ",
                          "all its images would be skipped and --overwrite would replace its reading list")
    assert snapshot(out) == before and sha256_file(book) == ledger_before
    alias = tmp_path / "alias"  # the same night under a name the ledger does not know (QA: a bind mount of OUT_DIR's
    shutil.copytree(out, alias)  # parent): known by the run id its metrics.json records
    capsys.readouterr()
    rc = main(args + ["--output", str(alias), "--overwrite"])
    assert_one_line_error(capsys, rc, f"output dir {alias} holds night ")
    assert main(args + ["--output", str(tmp_path / "again")]) == 0  # its images skipped, into another folder
    write_package(serving, version=2)  # a new version skips none of them: its rerun replaces the night, whole
    newer = ["--model", os.path.join(serving, "pneumonia", "2")]
    assert main(args + newer + ["--output", out, "--overwrite"]) == 0
    assert {r["model"] for r in read_predictions(out).values()} == {"pneumonia/2"} and len(read_predictions(out)) == 20
    # QA: rolled back, version 1 (which scored these images on its own nights) skipped them all and emptied version
    # 2's night: a model the ledger has seen is refused on a night it did not score too
    newest = str(tmp_path / "newest")  # a folder only version 3 wrote
    write_package(serving, version=3)
    assert main(args + ["--output", newest]) == 0
    before = snapshot(newest)
    capsys.readouterr()
    rc = main(args + ["--model", os.path.join(serving, "pneumonia", "1"), "--output", newest, "--overwrite"])
    assert_one_line_error(capsys, rc, f"output dir {newest} holds night ",
                          f"of ledger {book} by pneumonia/3 (committed ",
                          "and pneumonia/1 has scored images of it on other nights: they would be skipped")
    assert snapshot(newest) == before
    other = str(tmp_path / "other_in")  # review: a rollback over a night of images it never saw loses nothing
    make_tree(other, per_class=3, size=64, seed=11)
    fresh = str(tmp_path / "fresh")
    assert main(args[:1] + [other] + args[2:] + ["--output", fresh]) == 0  # version 3
    assert main(args[:1] + [other] + args[2:] + ["--model", os.path.join(serving, "pneumonia", "1"), "--output",
                                                 fresh, "--overwrite"]) == 0
    rescored = read_predictions(fresh)
    assert {r["model"] for r in rescored.values()} == {"pneumonia/1"} and len(rescored) == 6
    assert main(args[:4] + ["--output", out, "--overwrite", "--direct_running_mode=in_memory"]) == 0  # no ledger


def test_a_name_that_is_not_utf8_is_known_as_an_old_ledger_stored_it():
    """Review: tables scored and out_of_scope store a path with U+FFFD for bytes that are not UTF-8, so before table
    files such a name never matched and was called new once."""
    from batch_job.ledger_lookup import Earlier, known_path, printable

    name = os.fsdecode(b"/data/caf\xe9.png")
    assert known_path("/unused.sqlite", name, Earlier("ab" * 32, 0.9, path=printable(name)))


def test_a_night_names_the_earlier_nights_whose_worklists_hold_what_it_skips(tmp_path, tiny_package, capsys):
    """Review: naming only the latest night sent the reader of night 3 to night 2, which held 6 of its 30 skipped
    images. Each earlier night is named with its own counts, the latest first; a night that read nothing new is
    not; a night that scored images tonight does not skip is not."""
    from batch_job.earlier_nights import SHOWN

    folder = tmp_path / "in"
    folder.mkdir()
    ledger = str(tmp_path / "ledger.sqlite")
    base = ["--input", str(folder), "--model", tiny_package, "--ledger", ledger, "--direct_running_mode=in_memory"]
    for night, means in enumerate(((200, 210, 60), (220, 70, 80, 90), ()), start=1):  # 2 + 1 flagged, then 0
        for i, mean in enumerate(means):
            textured((64, 64), mean, seed=night * 10 + i).save(folder / f"n{night}_{i}.png")
        assert main(base + ["--output", str(tmp_path / f"night{night}")]) == 0
    Image.new("L", (64, 64), 250).save(folder / "blank.png")  # out of scope, no chest film: not "not screened"
    assert main(base + ["--output", str(tmp_path / "night4")]) == 0
    md = open(tmp_path / "night4" / "report.md").read()
    m = json.load(open(tmp_path / "night4" / "metrics.json"))
    assert (m["images_skipped"], m["images_skipped_flagged"], m["images_skipped_unscreened"]) == (7, 3, 0)
    named = re.findall(r"night(\d) \(finished [0-9-]+ [0-9:]+ UTC\): (\d) flagged, 0 not screened", md)
    assert named == [("2", "1"), ("1", "2")]  # the latest first; night 3 read nothing new
    assert SHOWN == 3 and "older nights" not in md
    html_text = " ".join(parse(str(tmp_path / "night4" / "report.html"))[1].split())
    assert "Their worklists, the latest first: " + str(tmp_path / "night2") in html_text  # a list item a night
    # review: counted at tonight's threshold, which the earlier worklist may not have used; a folder deleted since
    shutil.rmtree(tmp_path / "night1")
    assert main(base + ["--output", str(tmp_path / "night5"), "--threshold", "0.3"]) == 0
    md = open(tmp_path / "night5" / "report.md").read()
    assert re.search(r"night2 \(finished [^)]*\): \d flagged, 0 not screened \(its worklist flagged at 0\.5000, not "
                     r"0\.3000\);", md), md
    assert re.search(r"night1 \(finished [^)]*\): \d flagged, 0 not screened \(its folder is no longer there\)", md)
