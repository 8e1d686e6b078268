"""The model-package contract (xray_core/package.py, verify.py, reference.py) on the shipped packages and the
tests' tiny ONNX models: metadata as a typed schema, score() in batches, verification, the drift reference."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from export.card import model_card
from export.triton import triton_config
from helpers import REPO, write_package
from xray_core import reference
from xray_core.package import (
    EMBEDDING_NAME,
    HEATMAP_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    Metadata,
    PackageError,
    TensorSpec,
    load_metadata,
    open_session,
    resolve_version_dir,
    score,
)
from xray_core.verify import verify_package

SHIPPED = os.path.join(REPO, "serving_models", "pneumonia")


@pytest.mark.parametrize("version", ["1", "2", "3", "4", "5", "6", "7", "8", "9"])
def test_shipped_metadata_round_trips_through_the_schema(version):
    path = os.path.join(SHIPPED, version, "metadata.json")
    raw = json.load(open(path))
    meta = load_metadata(os.path.dirname(path))
    assert meta.to_dict() == raw and list(meta.to_dict()) == list(raw)  # every key, in the file's order
    assert meta.model_id == f"pneumonia/{version}" and meta.image_size == raw["preprocessing"]["image_size"]
    assert meta.heatmap_hw == ((8, 8) if version in ("3", "4", "5", "6", "7", "8", "9") else None)
    assert meta.embedding_dim == {"4": 768, "5": 512, "6": 512, "7": 512, "8": 512, "9": 512}.get(version)


def test_the_newest_version_is_the_default():
    assert resolve_version_dir(SHIPPED) == os.path.join(SHIPPED, "9")


def test_model_may_be_named_by_its_serving_folder_name_version_or_model_file(tmp_path):
    serving = str(tmp_path / "serving")
    v1, v2 = write_package(serving, version=1), write_package(serving, version=2)
    assert resolve_version_dir(os.path.join(v1, "model.onnx")) == v1
    assert resolve_version_dir(v1) == v1
    assert resolve_version_dir(os.path.dirname(v1)) == v2  # a model name: its newest version
    assert resolve_version_dir(serving) == v2  # a serving folder holding one model name
    assert resolve_version_dir(os.path.join(REPO, "serving_models")) == os.path.join(SHIPPED, "9")


@pytest.mark.parametrize("case, message", [
    ("missing", "model not found: "),
    ("two_models", "holds 2 models (other, pneumonia); name one: "),
    ("other_file", "is a file but not a package's model.onnx; --model takes serving_models (holding one model)"),
    ("empty_folder", "no published model under "),
])
def test_what_is_not_a_model_is_one_clear_line(case, message, tmp_path):
    serving = str(tmp_path / "serving")
    vdir = write_package(serving)
    path = {"missing": str(tmp_path / "nope"), "two_models": serving, "empty_folder": str(tmp_path / "empty"),
            "other_file": os.path.join(vdir, "metadata.json")}[case]
    if case == "two_models":
        write_package(serving, name="other")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(PackageError) as info:
        resolve_version_dir(path)
    line = str(info.value)
    assert message in line and path in line and "\n" not in line


def test_metadata_without_contract_keys_or_with_unusable_values_is_refused():
    raw = json.load(open(os.path.join(SHIPPED, "4", "metadata.json")))
    with pytest.raises(PackageError, match="lacks sha256, decision_threshold"):
        Metadata.from_dict({k: v for k, v in raw.items() if k not in ("sha256", "decision_threshold")}, "m.json")
    with pytest.raises(PackageError, match="unusable values"):
        Metadata.from_dict({**raw, "decision_threshold": "high"})
    with pytest.raises(PackageError, match="unusable values"):
        Metadata.from_dict({**raw, "preprocessing": {**raw["preprocessing"], "resize_filter": "magic"}})
    assert TensorSpec.from_json({"name": "x", "dtype": "float32", "shape": [-1, 3]}).shape == (None, 3)


def test_the_model_card_is_a_function_of_the_metadata():
    """The newest shipped version's MODEL_CARD.md is exactly what export's card writer makes of its metadata.json
    (older versions keep the cards they were published with: a published version is never rewritten)."""
    from xray_core.package import versions

    vdir = os.path.join(SHIPPED, str(versions(SHIPPED)[-1]))
    assert model_card(load_metadata(vdir).to_dict()) == open(os.path.join(vdir, "MODEL_CARD.md")).read()


def test_whether_the_model_was_chosen_on_its_calibration_sample_is_decided_at_each_publish(tmp_path):
    """Review: --recalibrate onto another sample kept the flag export had set, and its card said the model was picked
    "on these same images"."""
    from export.metadata import chosen_on

    site, other = tmp_path / "site", tmp_path / "other"
    site.mkdir()
    other.mkdir()
    os.symlink(site, tmp_path / "link")
    assert chosen_on(str(site), {"dir": str(tmp_path / "link")}) and not chosen_on(str(site), {"dir": str(other)})
    assert not chosen_on(None, {"dir": str(site)}) and not chosen_on(str(site), None)


def test_the_card_says_when_the_model_was_chosen_on_its_calibration_sample_or_trained_on_a_subset():
    """QA: a run that picked its model among several by ROC AUC on the site sample, then calibrated on it, got a card
    that presented the 2-fold estimate without a word of that choice; a --limit-per-class run read as trained on its
    whole folder."""
    meta = load_metadata(os.path.join(SHIPPED, "7")).to_dict()
    assert "Chosen on this sample too" not in model_card(meta) and "--limit-per-class" not in model_card(meta)
    site_dir = meta["site_calibration"]["dir"]
    meta["source"].update(selected_by="site_roc_auc", candidates=["resnet_aug", "augmented_cnn"], site_dir=site_dir,
                          selected_on_calibration_sample=True, limit_per_class=60)
    card = " ".join(model_card(meta).split())
    assert ("**Chosen on this sample too:** the training run picked this model among 2 (resnet_aug, augmented_cnn) "
            "by their ROC AUC on these same images") in card
    assert "(at most 60 images of each class: `--limit-per-class 60`)" in card
    for other in ({"selected_by": "val_roc_auc"}, {"candidates": ["resnet_aug"]},
                  {"selected_on_calibration_sample": False}):
        assert "Chosen on this sample too" not in model_card(dict(meta, source=dict(meta["source"], **other)))


def test_the_card_says_the_internal_split_overestimates_only_where_it_does():
    """QA: every card said "The internal test split overestimates", also where its site ROC AUC was the higher, and
    quoted the shipped models' figures for any model."""
    meta = load_metadata(os.path.join(SHIPPED, "7")).to_dict()
    card = model_card(meta)
    assert "The internal test split overestimates: ROC AUC 0.9951 there against 0.9875 on" in card
    assert "## Internal test split (same collection as training; overestimates)" in card
    site = dict(meta["site_calibration"], **{"at_0.5": dict(meta["site_calibration"]["at_0.5"], roc_auc=0.999)})
    card = model_card({**meta, "site_calibration": site})
    assert "overestimates" not in card and "0.998 against 0.92" not in card
    assert "ROC AUC 0.9951 on the internal test split, 0.9990 on the site sample. Judge this model" in card
    other = model_card({**meta, "training_data": {"source": "adult scans", "data_dir": "/d"}})
    assert "overestimates: ROC AUC 0.9951" in other and "0.998 against 0.92" not in other


def card_trained_on(tmp_path, training_data: dict | None) -> str:
    meta = load_metadata(write_package(str(tmp_path / "serving"))).to_dict()
    return model_card({**meta, "training_data": training_data} if training_data is not None else meta)


def test_the_model_card_states_the_licence_of_the_weights_and_of_their_training_data(tmp_path):
    card = card_trained_on(tmp_path, {"source": "kermany2018", "data_dir": "/data/train"})
    licence = card[card.index("## Licence"):]
    assert card.rstrip().endswith(licence.rstrip())  # the last section
    for fragment in ("weights are released under [CC BY 4.0]", "Kermany", "(2018)", "doi:10.17632/rscbjbr9sj.2",
                     "Apache License 2.0"):
        assert fragment in licence, fragment
    assert "Pediatric patients (1 to 5 years old) from one hospital" in card


@pytest.mark.parametrize("source", [None, "adult chest X-rays, St Mary's PACS 2019-2024, internal use only"])
def test_a_model_trained_on_other_data_never_claims_the_shipped_data_or_its_licence(tmp_path, source):
    """Weights trained on other images: the card names their folder and the user's words for them (or says they were
    not recorded); neither the Kermany set, its population nor its CC BY licence (a package without the field too)."""
    for i, training_data in enumerate(({"source": source, "data_dir": "/data/stmary/cxr"}, None)):
        card = card_trained_on(tmp_path / str(i), training_data)
        assert "Kermany" not in card and "CC BY" not in card and "Pediatric" not in card
        licence = card[card.index("## Licence"):]
        assert "that data's licence and terms of use govern" in licence and "Apache License 2.0" in licence
        if source and training_data:
            assert "(adult chest X-rays, St Mary's PACS 2019-2024, internal use only), re-split" in card
            assert f"- Trained on {source}; patients, sites and scanners unlike these are out of" in card
        else:  # the option not given, or a package exported before the field
            assert "source was not recorded: `train --data-source`" in card
            assert "state them here before sharing this card" in card
        if training_data:
            assert "The images under `/data/stmary/cxr`" in card


def test_the_users_words_fit_into_the_card_as_given(tmp_path):
    """Review: a source ending in "." gave "2024.; patients" and "2024. (as its training run described them)"; a
    backquote in the folder's name broke its code span."""
    from xray_core.training_data import TrainingData

    card = card_trained_on(tmp_path, {"source": " adults, 2019-2024. ", "data_dir": "/data/st`marys"})
    assert "- Trained on adults, 2019-2024; patients" in card and 'The images under "/data/st`marys" (adults' in card
    assert TrainingData.from_dict({"source": "adults, 2019-2024."}).population().startswith("adults, 2019-2024 (as")


def test_every_shipped_version_records_its_training_data():
    from xray_core.package import versions
    from xray_core.training_data import KERMANY_POPULATION, TrainingData

    for v in versions(SHIPPED):
        data = TrainingData.from_dict(load_metadata(os.path.join(SHIPPED, str(v))).training_data)
        assert data.kermany and data.population() == KERMANY_POPULATION, v


def test_score_in_batches_equals_one_run_of_the_graph(tmp_path):
    vdir = write_package(str(tmp_path / "serving"), heatmap_hw=(4, 4), embedding_grid=4)
    session = open_session(os.path.join(vdir, "model.onnx"))
    x = np.random.default_rng(0).uniform(0, 1, (70, 32, 32, 1)).astype(np.float32)
    whole = session.run([OUTPUT_NAME, HEATMAP_NAME, EMBEDDING_NAME], {INPUT_NAME: x})
    got = score(session, x, heatmap=True, embedding=True, batch_size=16)
    assert got.probability.shape == (70,) and got.heatmap.shape == (70, 4, 4) and got.embedding.shape == (70, 16)
    np.testing.assert_allclose(got.probability, whole[0].reshape(-1), atol=1e-7)
    np.testing.assert_allclose(got.heatmap, whole[1], atol=1e-7)
    np.testing.assert_allclose(got.embedding, whole[2], atol=1e-7)
    plain = score(session, x[:3])
    assert plain.heatmap is None and plain.embedding is None and plain.probability.dtype == np.float32
    assert score(session, x[:0]).probability.shape == (0,)


def test_verify_passes_a_good_package_and_names_the_first_broken_contract(tmp_path):
    vdir = write_package(str(tmp_path / "serving"), heatmap_hw=(4, 4),
                         reference_images=np.random.default_rng(1).uniform(0, 1, (40, 32, 32, 1)).astype(np.float32))
    checks = verify_package(vdir)
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert [c.name for c in checks][-2:] == ["zero batch", "drift reference"]
    path = os.path.join(vdir, "metadata.json")
    raw = json.load(open(path))
    raw["heatmap_output"]["shape"] = [-1, 2, 2]  # the graph's map is 4x4
    json.dump(raw, open(path, "w"))
    failed = [c for c in verify_package(vdir) if not c.ok]
    assert [c.name for c in failed] == ["heatmap contract"]


def test_a_version_folder_holding_another_versions_metadata_fails_verification(tmp_path, capsys):
    """QA: folder 7 with its metadata.json's version edited to 6 passed verification and was scored, and recorded
    in the ledger, as pneumonia/6. A folder named by a number must hold that version; other names are not checked
    (a package kept outside a serving folder), nor is the parent folder's (a copy kept elsewhere)."""
    import shutil

    from batch_job.cli import main as job_main
    from batch_job.synthetic import make_tree

    vdir = write_package(str(tmp_path / "serving"))
    copy = tmp_path / "serving" / "pneumonia" / "2"
    shutil.copytree(vdir, copy)
    failed = [c for c in verify_package(str(copy)) if not c.ok]
    assert [c.line() for c in failed] == [f"FAIL metadata: {copy} holds the metadata of pneumonia/1, version 1 in a "
                                          "folder named 2: a package copied or renamed by hand; publish it with "
                                          "`python -m export` instead"]
    make_tree(str(tmp_path / "in"), per_class=1, size=40, seed=1)
    capsys.readouterr()
    assert job_main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
                     str(tmp_path / "serving" / "pneumonia"), "--direct_running_mode=in_memory"]) == 2  # the newest
    assert capsys.readouterr().err.startswith(f"error: model {copy} failed verification: FAIL metadata: ")
    for elsewhere in (tmp_path / "kept" / "1", tmp_path / "pkg"):
        shutil.copytree(vdir, elsewhere)
        assert all(c.ok for c in verify_package(str(elsewhere)))
    (tmp_path / "triton" / "pneumonia").mkdir(parents=True)  # review: a link named by another number is its target
    os.symlink(vdir, tmp_path / "triton" / "pneumonia" / "3")
    assert all(c.ok for c in verify_package(str(tmp_path / "triton" / "pneumonia" / "3")))


def test_the_reference_round_trips_and_verify_catches_a_changed_one(tmp_path):
    images = np.random.default_rng(2).uniform(0, 1, (30, 32, 32, 1)).astype(np.float32)
    vdir = write_package(str(tmp_path / "serving"), reference_images=images)
    ref = reference.load(os.path.join(vdir, reference.REFERENCE_FILE))
    assert ref.probabilities.dtype == np.float32 and ref.probabilities.shape == (30,)
    assert ref.embeddings.dtype == np.float16 and ref.embeddings.shape == (30, 16)
    session = open_session(os.path.join(vdir, "model.onnx"))
    np.testing.assert_array_equal(ref.probabilities, score(session, images).probability)
    reference.write(os.path.join(vdir, reference.REFERENCE_FILE),
                    reference.Reference(ref.probabilities * 0.5, ref.embeddings))
    (check,) = [c for c in verify_package(vdir) if c.name == "drift reference"]
    assert not check.ok and "sha256 differs from the metadata" in check.detail


def test_triton_config_lists_every_output_of_the_contract():
    text = triton_config("pneumonia", 64, heatmap=(8, 8), embedding=512)
    assert 'name: "image" data_type: TYPE_FP32 dims: [ 64, 64, 1 ]' in text
    assert 'name: "heatmap" data_type: TYPE_FP32 dims: [ 8, 8 ]' in text
    assert 'name: "embedding" data_type: TYPE_FP32 dims: [ 512 ]' in text
    assert open(os.path.join(SHIPPED, "config.pbtxt")).read() == text


def test_a_dynamic_map_or_embedding_size_is_refused_as_a_package_error():
    raw = json.load(open(os.path.join(SHIPPED, "4", "metadata.json")))
    for key, shape in (("heatmap_output", [-1, -1, 8]), ("embedding_output", [-1, -1])):
        with pytest.raises(PackageError, match=f"{key} has a dynamic dimension"):
            Metadata.from_dict({**raw, key: {**raw[key], "shape": shape}})


def test_the_card_never_prints_a_negative_zero_drop():
    """QA defect: a tiny model's faithfulness read "mean drop 0.000 against -0.000"."""
    from export.card_checks import _verdict

    faith = dict(share_top_beats_random=0.5, flagged=3, source="site calibration", threshold=0.5, passed=False,
                 mean_drop_top=-0.0001, mean_drop_random=0.0123, share_own_beats_average=0.3,
                 mean_drop_average=-0.0004, required_share_vs_average=0.7, about_each_image=False)
    text = _verdict(faith)
    assert "-0.000" not in text
    assert "mean drop 0.000 against 0.012)" in text and "(mean drop 0.000 against 0.000;" in text


def test_an_unreadable_model_file_fails_verification_in_one_line(tmp_path, monkeypatch, capsys):
    """QA: a model.onnx the job's user may not read (mode 000) ended the job with exit 1 and "job failed
    (PermissionError)" instead of exit 2, failed verification, as an unreadable gate.npz or metadata.json did."""
    import xray_core.verify
    from batch_job.cli import main as batch_main

    vdir = write_package(str(tmp_path / "serving"))

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(xray_core.verify, "sha256_file", unreadable)
    checks = verify_package(vdir)
    assert [c.line() for c in checks if not c.ok] == [
        f"FAIL sha256: {os.path.join(vdir, 'model.onnx')} is unreadable: Permission denied"]
    (tmp_path / "in").mkdir()
    rc = batch_main(["--input", str(tmp_path / "in"), "--model", vdir, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"error: model {vdir} failed verification: FAIL sha256: "
                                   f"{os.path.join(vdir, 'model.onnx')} is unreadable: Permission denied")


def test_the_card_says_when_the_model_cuts_edge_bands_first():
    meta = load_metadata(os.path.join(SHIPPED, "7")).to_dict()
    assert "Edge bands" not in model_card(meta)
    card = model_card({**meta, "preprocessing": {**meta["preprocessing"], "crop_bands": True}})
    assert ("- Edge bands of constant grey (a border, a pillarbox, a scanner's black edge) are cut off first "
            "(`crop_bands`). Images are squashed to 64x64 grayscale;") in card
