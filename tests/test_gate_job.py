"""The input gate in the batch job, on both runners: DICOM header rules, the cheap checks and the package's content
check give status out_of_scope (reason, no probability); such images are counted, never flagged or in the night's
figures, and the ledger remembers them."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from batch_job.cli import main
from dicom_factory import dicom_bytes
from export.republish import add_gate
from helpers import parse, read_predictions, write_package


def _like_the_reference(rng, mean):
    """32 px, noise around `mean`: what the tiny model's reference was made of (its embedding: 4x4 cell means)."""
    return np.clip(mean + rng.normal(0, 0.15, (32, 32)), 0, 1)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """The tiny model (P rises with the mean grey; embedding = 4x4 cell means), its reference of 150 noisy images
    of mean 0.3-0.7, and version 2 with the gate derived from that reference."""
    base = tmp_path_factory.mktemp("gated")
    rng = np.random.default_rng(0)
    ref = np.stack([_like_the_reference(rng, m) for m in rng.uniform(0.3, 0.7, 150)])[..., None].astype(np.float32)
    v1 = write_package(str(base / "serving"), reference_images=ref)
    v2 = add_gate(v1, str(base / "serving"), "pneumonia", log=lambda _: None)
    return base, v2


@pytest.fixture(scope="module")
def gated_on_training_split(gated):
    """Version 3: the same model with the gate fitted on a training folder of 200 images like the reference."""
    base, v2 = gated
    rng = np.random.default_rng(7)
    for label in ("NORMAL", "PNEUMONIA"):  # a training folder has both classes (training refuses one without)
        os.makedirs(base / "train" / label)
    for i, m in enumerate(rng.uniform(0.3, 0.7, 200)):
        label = "PNEUMONIA" if m > 0.5 else "NORMAL"
        Image.fromarray((_like_the_reference(rng, m) * 255).astype(np.uint8), "L").save(
            base / "train" / label / f"t{i:03d}.png")
    v3 = add_gate(v2, str(base / "serving"), "pneumonia", training_dir=str(base / "train"), log=lambda _: None)
    return base, v3


def _inputs(folder):
    rng = np.random.default_rng(1)
    os.makedirs(folder)
    names = {}
    for i, m in enumerate((0.35, 0.5, 0.65, 0.68)):  # like the reference: scored (the brightest ones flagged)
        names[f"scan{i}.png"] = "ok"
        Image.fromarray((_like_the_reference(rng, m) * 255).astype(np.uint8), "L").resize((64, 64)).save(
            os.path.join(folder, f"scan{i}.png"))
    half = np.zeros((64, 64))
    half[:, 32:] = 1.0  # black left, white right: mean 0.5 but cells unlike any reference image
    Image.fromarray((np.clip(half * 0.9 + 0.05 + rng.normal(0, 0.05, (64, 64)), 0, 1) * 255).astype(np.uint8),
                    "L").save(os.path.join(folder, "split.png"))
    names["split.png"] = "not like the chest X-rays the model knows (distance "
    Image.new("L", (64, 64), 250).save(os.path.join(folder, "blank.png"))  # bright: flagged if it were scored
    names["blank.png"] = "near-constant image"
    gray = (_like_the_reference(rng, 0.6) * 255).astype(np.uint8)
    Image.fromarray(np.stack([gray, 255 - gray, gray // 3], axis=-1), "RGB").resize((64, 64)).save(
        os.path.join(folder, "photo.png"))
    names["photo.png"] = "colour image"
    ct = (_like_the_reference(rng, 0.6) * 4000).astype(np.uint16)
    with open(os.path.join(folder, "slice.dcm"), "wb") as f:
        f.write(dicom_bytes(ct, bits_stored=12, modality="CT", PatientID="P1"))
    names["slice.dcm"] = "Modality CT not allowed (allowed: CR, DX)"
    return names


@pytest.mark.parametrize("runner, fit", [("direct", "reference"), ("direct", "training split"),
                                         pytest.param("dask", "training split", marks=pytest.mark.slow)])
def test_out_of_scope_images_are_never_scored_and_the_ledger_remembers_them(tmp_path, runner, fit, request, caplog):
    base, package = request.getfixturevalue("gated" if fit == "reference" else "gated_on_training_split")
    spec = json.load(open(os.path.join(package, "metadata.json")))["gate"]
    assert spec["statistic"] == {"reference": "mahalanobis_ledoit_wolf",
                                 "training split": "mahalanobis_ledoit_wolf_training_split"}[fit]
    assert "orientation" not in spec  # noise has no top or bottom: no orientation check (tests/test_orientation.py)
    names = _inputs(str(tmp_path / "in"))
    extra = ["--runner", "DaskRunner", f"--dask_client_address={request.getfixturevalue('dask_cluster')}"] \
        if runner == "dask" else ["--direct_running_mode=in_memory"]
    args = ["--input", str(tmp_path / "in"), "--model", package, "--ledger", str(tmp_path / "ledger.sqlite"),
            *extra]
    assert main(args + ["--output", str(tmp_path / "night1")]) == 0
    rows = {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / "night1")).items()}
    for name, want in names.items():
        if want == "ok":
            assert rows[name]["status"] == "ok" and rows[name]["probability"], name
        else:
            r = rows[name]
            assert (r["status"], r["probability"], r["prediction"]) == ("out_of_scope", "", ""), name
            assert r["error"].startswith(want), (name, r["error"])
    m = json.load(open(tmp_path / "night1" / "metrics.json"))
    assert (m["images_found"], m["images_scored"], m["images_out_of_scope"], m["images_failed"]) == (8, 4, 4, 0)
    assert m["positive_count"] == sum(r["prediction"] == "PNEUMONIA" for r in rows.values()) >= 1
    assert m["drift"]["images"] == 4  # only the scored images are compared with the reference
    with open(tmp_path / "night1" / "worklist.csv", newline="") as f:  # reading order: the content check's refusal
        order = [(os.path.basename(r["path"]), r["prediction"]) for r in csv.DictReader(f)]  # before the normals
    flagged = sum(p == "PNEUMONIA" for _, p in order)
    assert [p for _, p in order[:flagged]] == ["PNEUMONIA"] * flagged and order[flagged] == ("split.png", "")
    assert [p for _, p in order[flagged + 1:-3]] == ["NORMAL"] * (4 - flagged), order
    assert [n for n, _ in order[-3:]] == ["blank.png", "photo.png", "slice.dcm"]
    page = open(tmp_path / "night1" / "report.html", encoding="utf-8").read()  # each linked to its original (QA)
    assert all(f'href="../in/{name}"' in page for name in ("split.png", "blank.png", "photo.png", "slice.dcm"))
    assert page.index('href="../in/split.png"') < page.index('href="../in/blank.png"')  # in reading order
    text = " ".join(parse(str(tmp_path / "night1" / "report.html"))[1].split())
    assert "On this page: worklist, " in text
    assert "out of scope, 4 (not screened: 1, each needs a read) · counts" in text
    m = json.load(open(tmp_path / "night1" / "metrics.json"))
    assert (m["images_out_of_scope"], m["images_unscreened"]) == (4, 1)  # split.png; the others are no chest film
    logged = [r.getMessage() for r in caplog.records if "new images recorded" in r.getMessage()]
    assert logged == [f"ledger {tmp_path / 'ledger.sqlite'}: 4 new images recorded, 4 out of scope"]  # audit: was "4"
    # the second night reads nothing new: the refused images are skipped like the scored ones
    caplog.clear()
    assert main(args + ["--output", str(tmp_path / "night2")]) == 0
    assert [r.getMessage() for r in caplog.records if "new images recorded" in r.getMessage()] == [
        f"ledger {tmp_path / 'ledger.sqlite'}: 0 new images recorded, 0 out of scope"]
    m2 = json.load(open(tmp_path / "night2" / "metrics.json"))
    assert (m2["images_skipped"], m2["images_scored"], m2["images_out_of_scope"]) == (8, 0, 0)
    skipped = {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / "night2")).items()}
    assert skipped["blank.png"]["error"].startswith("near-constant image") and skipped["blank.png"]["probability"] == ""


def test_a_package_without_a_gate_runs_the_header_and_cheap_checks_only(gated, tmp_path, caplog):
    base, _ = gated
    names = _inputs(str(tmp_path / "in"))
    v1 = str(base / "serving" / "pneumonia" / "1")
    assert main(["--input", str(tmp_path / "in"), "--model", v1, "--output", str(tmp_path / "o"),
                 "--direct_running_mode=in_memory"]) == 0
    rows = {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / "o")).items()}
    assert rows["split.png"]["status"] == "ok"  # no content check without the package's limit
    assert {n for n, r in rows.items() if r["status"] == "out_of_scope"} == {"blank.png", "photo.png", "slice.dcm"}
    assert [r.levelname for r in caplog.records if "records no input gate: only the DICOM header rules and the "
            "cheap checks" in r.getMessage() and "non-X-rays can be scored" in r.getMessage()] == ["WARNING"]
    assert len(names) == 8


def test_modalities_widen_the_header_rule(gated, tmp_path):
    _, package = gated
    _inputs(str(tmp_path / "in"))
    assert main(["--input", str(tmp_path / "in" / "slice.dcm"), "--model", package, "--output", str(tmp_path / "o"),
                 "--modalities", "CR,DX,CT", "--direct_running_mode=in_memory"]) == 0
    (row,) = read_predictions(str(tmp_path / "o")).values()
    assert not row["error"].startswith("Modality")  # past the header rule: scored, or refused by its content


def test_a_refusal_by_modality_holds_only_under_the_modalities_it_was_decided_under(gated, tmp_path):
    """QA defect: with --ledger, a CT file refused on a night with the default modalities stayed `skipped` (its old
    reason, "allowed: CR, DX") on a later night with --modalities CR,DX,CT: never scored, never on the worklist.
    Such a refusal names the modalities it was decided under, and holds only under those; a refusal by the content
    check (the same model, whatever --modalities) and a score hold as before."""
    from xray_core.dicom_header import modalities_named

    assert modalities_named("Modality CT not allowed (allowed: CR, DX)") == {"CR", "DX"}
    assert modalities_named("DICOM without Modality (allowed: DX)") == {"DX"}
    assert modalities_named("BodyPartExamined HAND is not a chest") is None
    assert modalities_named("near-constant image") is None
    _, package = gated
    _inputs(str(tmp_path / "in"))
    args = ["--input", str(tmp_path / "in"), "--model", package, "--ledger", str(tmp_path / "ledger.sqlite"),
            "--direct_running_mode=in_memory"]

    def night(name, *extra):
        assert main(args + ["--output", str(tmp_path / name), *extra]) == 0
        return {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / name)).items()}

    assert night("night1")["slice.dcm"]["status"] == "out_of_scope"
    same = night("night2", "--modalities", "dx, cr")  # the same set, written otherwise: the refusal holds
    assert (same["slice.dcm"]["status"], same["slice.dcm"]["error"]) == (
        "skipped", "Modality CT not allowed (allowed: CR, DX)")
    widened = night("night3", "--modalities", "CR,DX,CT")
    ct = widened["slice.dcm"]
    assert ct["status"] != "skipped" and not ct["error"].startswith("Modality"), ct  # judged again
    assert {n: r["status"] for n, r in widened.items() if n != "slice.dcm"} == {
        "scan0.png": "skipped", "scan1.png": "skipped", "scan2.png": "skipped", "scan3.png": "skipped",
        "split.png": "skipped", "blank.png": "skipped", "photo.png": "skipped"}
    # narrowed on another ledger: judged again once, then the new refusal is the one kept and skipped
    args[args.index("--ledger") + 1] = str(tmp_path / "other.sqlite")
    assert night("a")["slice.dcm"]["error"] == "Modality CT not allowed (allowed: CR, DX)"
    assert (night("b", "--modalities", "CR")["slice.dcm"]["status"], night("c", "--modalities", "CR")["slice.dcm"][
        "status"]) == ("out_of_scope", "skipped")
    assert night("d", "--modalities", "CR")["slice.dcm"]["error"] == "Modality CT not allowed (allowed: CR)"


def test_a_refusal_by_body_part_holds_only_while_the_rule_refuses_that_value(gated, tmp_path):
    """QA, 2026-12-03: portable and paediatric chest films sent BodyPartExamined PORT CHEST, CXR, CHEST (PA) ... and
    were refused as "not a chest". The rule takes them now; a ledger that recorded such a refusal on an earlier
    night must not skip the film for ever: it is judged again, while a refusal the rule still gives (HAND) holds."""
    import sqlite3

    from xray_core.body_part import still_refused

    assert still_refused("BodyPartExamined HAND is not a chest") and still_refused("near-constant image")
    assert not still_refused("BodyPartExamined PORT CHEST is not a chest")
    _, package = gated
    rng = np.random.default_rng(2)
    os.makedirs(tmp_path / "in")
    for name, part in (("port.dcm", "PORT CHEST"), ("hand.dcm", "HAND")):
        with open(tmp_path / "in" / name, "wb") as f:
            f.write(dicom_bytes((_like_the_reference(rng, 0.5) * 4000).astype(np.uint16), bits_stored=12,
                                BodyPartExamined=part))
    ledger = str(tmp_path / "ledger.sqlite")
    args = ["--input", str(tmp_path / "in"), "--model", package, "--ledger", ledger, "--direct_running_mode=in_memory"]

    def night(name):
        assert main(args + ["--output", str(tmp_path / name)]) == 0
        return {os.path.basename(p): r for p, r in read_predictions(str(tmp_path / name)).items()}

    first = night("night1")
    assert first["port.dcm"]["status"] == "ok" and first["hand.dcm"]["error"] == "BodyPartExamined HAND is not a chest"
    with sqlite3.connect(ledger) as conn:  # as an earlier version of the rule recorded PORT CHEST
        moved = conn.execute("INSERT INTO out_of_scope SELECT sha256, model, 'BodyPartExamined PORT CHEST is not a "
                             "chest', scored_utc, path, run_id FROM scored").rowcount
        conn.execute("DELETE FROM scored")
    assert moved == 1
    again = night("night2")
    assert again["port.dcm"]["status"] != "skipped"  # judged again under today's rule
    assert (again["hand.dcm"]["status"], again["hand.dcm"]["error"]) == ("skipped",
                                                                         "BodyPartExamined HAND is not a chest")
