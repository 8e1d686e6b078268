"""train.data: patient ids, finding images, the patient-grouped split, CSV, loading.

No TensorFlow: everything here is pure Python / numpy / Pillow on files written by the tests.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from train.data import (
    DataError,
    Example,
    find_examples,
    limit_per_class,
    other_folders,
    patient_id,
    read_split_csv,
    read_split_digests,
    split_examples,
    write_split_csv,
)
from train.loading import load_images
from xray_core.preprocessing import PreprocessConfig, preprocess_image


def _touch(path, content: bytes | None = None) -> str:
    """A file whose bytes are unique (its own path) unless `content` is given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if content is not None else str(path).encode())
    return str(path)


def test_a_dcm_file_without_the_preamble_gives_its_patient_id(tmp_path):
    """Review: once such files were scored as DICOM, their patient still came from the file name (a UID), so one
    patient's images could fall into different splits."""
    from train.data import patient_of

    path = _dicom_of(tmp_path / "NORMAL" / "1.2.3.4.dcm", "P-77", seed=1)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[132:])  # no preamble, no 'DICM'
    assert patient_of(path) == "P-77"


def _gray(path, size=40, value=0, fmt=None, mode="L"):
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size, size), dtype=np.uint8)
    img = Image.fromarray(arr, mode="L")
    if mode != "L":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)
    return str(path)


# ---------------------------------------------------------------- patient_id


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person1234_bacteria_5678.jpeg", "person1234"),
        ("person12_virus_3.jpeg", "person12"),
        ("person1_virus_6.jpeg", "person1"),
        ("IM-0011-0001-0002.jpeg", "IM-0011"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        # a directory part is ignored
        ("/data/train/PNEUMONIA/person7_bacteria_29.jpeg", "person7"),
        # anything else is its own patient: the stem
        ("scan_001.png", "scan_001"),
        ("chest.xray.v2.JPG", "chest.xray.v2"),
        ("personA_bacteria_1.jpeg", "personA_bacteria_1"),
        ("IM-abc-0001.jpeg", "IM-abc-0001"),
        ("/some/dir/IM-0011.jpeg", "IM-0011"),  # no '-' after the number: not the Kaggle pattern
    ],
)
def test_patient_id(name, expected):
    assert patient_id(name) == expected


# ------------------------------------------------------------- find_examples


def test_find_examples_kaggle_layout(tmp_path):
    root = tmp_path / "chest_xray"
    expected = {
        _touch(root / "train" / "NORMAL" / "IM-0001-0001.jpeg"): ("NORMAL", "IM-0001"),
        _touch(root / "train" / "NORMAL" / "NORMAL2-IM-0007-0001.JPEG"): ("NORMAL", "NORMAL2-IM-0007"),
        _touch(root / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg"): ("PNEUMONIA", "person1"),
        _touch(root / "val" / "NORMAL" / "IM-0002-0001.Jpg"): ("NORMAL", "IM-0002"),
        _touch(root / "val" / "PNEUMONIA" / "person2_virus_4.PNG"): ("PNEUMONIA", "person2"),
        _touch(root / "test" / "NORMAL" / "IM-0003-0001.png"): ("NORMAL", "IM-0003"),
        _touch(root / "test" / "PNEUMONIA" / "person1_bacteria_2.jpg"): ("PNEUMONIA", "person1"),
    }
    # not images: ignored
    _touch(root / "train" / "NORMAL" / "notes.txt")
    _touch(root / "train" / "PNEUMONIA" / "anim.gif")
    _touch(root / "test" / "PNEUMONIA" / ".DS_Store")
    _touch(root / "README.txt")

    examples = find_examples(root)

    assert [e.path for e in examples] == sorted(expected)
    assert {e.path: (e.label, e.patient) for e in examples} == expected
    assert all(isinstance(e, Example) for e in examples)


def test_find_examples_flat_layout_and_nested_subfolders(tmp_path):
    root = tmp_path / "flat"
    expected = {
        _touch(root / "NORMAL" / "IM-0101-0001.jpeg"): "NORMAL",
        _touch(root / "NORMAL" / "a.PNG"): "NORMAL",
        _touch(root / "NORMAL" / "batch1" / "b.JpEg"): "NORMAL",
        _touch(root / "PNEUMONIA" / "person9_virus_1.jpg"): "PNEUMONIA",
        _touch(root / "PNEUMONIA" / "deep" / "er" / "c.png"): "PNEUMONIA",
    }
    _touch(root / "PNEUMONIA" / "x.gif")
    _touch(root / "PNEUMONIA" / "x.jpeg.txt")
    _touch(root / "OTHER" / "IM-0999-0001.jpeg")  # not a class folder

    examples = find_examples(str(root))
    assert {e.path: e.label for e in examples} == expected
    assert [e.path for e in examples] == sorted(expected)
    assert other_folders(str(root)) == [str(root / "OTHER")]  # said, not silently skipped (QA: a COVID folder)


def test_class_and_split_folders_in_any_case_as_the_job_reads_them(tmp_path):
    """QA: `normal/` and `Pneumonia/` were "no images" for train, but NORMAL and PNEUMONIA for calibration and the
    batch job (xray_core.labels: any case)."""
    root = tmp_path / "site"
    expected = {
        _touch(root / "Train" / "normal" / "IM-0001-0001.jpeg"): "NORMAL",
        _touch(root / "Train" / "Pneumonia" / "person1_bacteria_1.jpeg"): "PNEUMONIA",
        _touch(root / "val" / "NORMAL" / "IM-0002-0001.jpeg"): "NORMAL",
        _touch(root / "val" / "pneumonia" / "person2_virus_4.png"): "PNEUMONIA",
    }
    _touch(root / "Train" / "COVID" / "x.jpeg")
    assert {e.path: e.label for e in find_examples(root)} == expected
    assert other_folders(root) == [str(root / "Train" / "COVID")]


def test_find_examples_missing_dir(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        find_examples(tmp_path / "nope")


def test_find_examples_no_images(tmp_path):
    _touch(tmp_path / "NORMAL" / "a.txt")
    _touch(tmp_path / "PNEUMONIA" / "b.gif")
    with pytest.raises(DataError, match="no images") as info:
        find_examples(tmp_path)
    assert "\n" not in str(info.value)


def test_find_examples_empty_dir(tmp_path):
    with pytest.raises(DataError, match="no images"):
        find_examples(tmp_path)


@pytest.mark.parametrize("missing", ["NORMAL", "PNEUMONIA"])
def test_find_examples_empty_class(tmp_path, missing):
    present = "PNEUMONIA" if missing == "NORMAL" else "NORMAL"
    _touch(tmp_path / present / "a.jpeg")
    os.makedirs(tmp_path / missing)
    _touch(tmp_path / missing / "readme.txt")
    with pytest.raises(DataError, match=f"class {missing} has no images"):
        find_examples(tmp_path)


# ------------------------------------------------------------ split_examples


def _patients_tree(root, n_normal_patients, n_pneu_patients, per_patient=2):
    """Flat tree, `per_patient` distinct files per patient; returns find_examples(root)."""
    for p in range(n_normal_patients):
        for k in range(per_patient):
            _touch(root / "NORMAL" / f"IM-{p:04d}-{k + 1:04d}.jpeg")
    for p in range(n_pneu_patients):
        for k in range(per_patient):
            _touch(root / "PNEUMONIA" / f"person{p}_bacteria_{p * 10 + k}.jpeg")
    return find_examples(root)


@pytest.fixture(scope="module")
def two_hundred(tmp_path_factory):
    """200 images, 2 per patient: 30 NORMAL patients (60 images), 70 PNEUMONIA (140)."""
    examples = _patients_tree(tmp_path_factory.mktemp("split200"), 30, 70)
    assert len(examples) == 200
    return examples


def test_split_no_patient_in_two_splits(two_hundred):
    for seed in range(5):
        splits = split_examples(two_hundred, seed=seed)
        by_patient = defaultdict(set)
        for ex, s in zip(two_hundred, splits):
            by_patient[ex.patient].add(s)
        assert len(by_patient) == 100
        assert all(len(s) == 1 for s in by_patient.values()), seed


def test_split_fractions_and_stratification(two_hundred):
    splits = split_examples(two_hundred, (0.70, 0.15, 0.15), seed=42)
    assert set(splits) == {"train", "val", "test"}
    n = Counter(splits)
    assert sum(n.values()) == 200
    for name, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(n[name] / 200 - frac) <= 0.03, (name, n)
    overall = 140 / 200
    for name in ("train", "val", "test"):
        labels = [ex.label for ex, s in zip(two_hundred, splits) if s == name]
        frac_pneu = labels.count("PNEUMONIA") / len(labels)
        assert abs(frac_pneu - overall) <= 0.05, (name, frac_pneu)
    # per class, each split is within one patient (2 images) of its target, e.g. PNEUMONIA 98/21/21
    for label, total in (("NORMAL", 60), ("PNEUMONIA", 140)):
        for name, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            count = sum(1 for ex, s in zip(two_hundred, splits) if s == name and ex.label == label)
            assert abs(count - frac * total) <= 2, (label, name, count)


def test_split_other_fractions(two_hundred):
    splits = split_examples(two_hundred, (0.5, 0.25, 0.25), seed=3)
    n = Counter(splits)
    assert n["train"] == 100 and n["val"] + n["test"] == 100
    assert abs(n["val"] - 50) <= 4 and abs(n["test"] - 50) <= 4


def test_split_deterministic_per_seed(two_hundred):
    a = split_examples(two_hundred, seed=7)
    b = split_examples(list(two_hundred), seed=7)
    c = split_examples(two_hundred, seed=8)
    assert a == b
    assert a != c
    # same counts per split either way (the algorithm fills to targets)
    assert Counter(a)["train"] == Counter(c)["train"] == 140


def test_split_digests_argument_equals_reading_files(two_hundred):
    # the files' contents are unique, so giving unique digests is the same grouping
    digests = [f"d{i}" for i in range(len(two_hundred))]
    assert split_examples(two_hundred, seed=5, digests=digests) == split_examples(two_hundred, seed=5)


def test_split_byte_identical_files_of_different_patients_share_a_split(tmp_path):
    root = tmp_path / "dups"
    examples = _patients_tree(root, 20, 20)  # 80 unique images
    same = b"exactly the same bytes"
    chain = b"another shared image"
    a = _touch(root / "PNEUMONIA" / "person500_bacteria_1.jpeg", same)
    b = _touch(root / "PNEUMONIA" / "person501_virus_2.jpeg", same)
    # transitivity: 501 shares a second image with 502, so 500, 501 and 502 are one group
    b2 = _touch(root / "PNEUMONIA" / "person501_virus_3.jpeg", chain)
    c = _touch(root / "NORMAL" / "IM-0777-0001.jpeg", chain)
    examples = find_examples(root)
    assert len(examples) == 84
    idx = {e.path: i for i, e in enumerate(examples)}
    landed = set()
    for seed in range(20):
        splits = split_examples(examples, seed=seed)
        group = {splits[idx[p]] for p in (a, b, b2, c)}
        assert len(group) == 1, (seed, group)
        landed |= group
    # the group is really moved around by the seed (not pinned to one split)
    assert len(landed) >= 2


def test_split_identical_files_within_a_patient_are_harmless(tmp_path):
    root = tmp_path / "selfdup"
    _patients_tree(root, 10, 10)
    _touch(root / "NORMAL" / "IM-0000-0003.jpeg", (root / "NORMAL" / "IM-0000-0001.jpeg").read_bytes())
    examples = find_examples(root)
    splits = split_examples(examples, seed=1)
    assert len({s for e, s in zip(examples, splits) if e.patient == "IM-0000"}) == 1


@pytest.mark.parametrize(
    "fractions",
    [(0.5, 0.3, 0.3), (0.7, 0.15, 0.1), (0.7, 0.3), (0.5, 0.25, 0.15, 0.1), (1.2, -0.1, -0.1)],
)
def test_split_bad_fractions(two_hundred, fractions):
    with pytest.raises(DataError, match="fractions summing to 1"):
        split_examples(two_hundred, fractions, seed=0)


# ----------------------------------------------------------- limit_per_class


def _fake_examples(n_normal, n_pneu):
    out = [Example(f"/x/NORMAL/IM-{i:04d}-0001.jpeg", "NORMAL", f"IM-{i:04d}") for i in range(n_normal)]
    out += [Example(f"/x/PNEUMONIA/person{i}_virus_{i}.jpeg", "PNEUMONIA", f"person{i}") for i in range(n_pneu)]
    return out


def test_limit_per_class():
    examples = _fake_examples(10, 30)
    a = limit_per_class(examples, 5, seed=0)
    b = limit_per_class(list(examples), 5, seed=0)
    assert a == b
    assert Counter(e.label for e in a) == {"NORMAL": 5, "PNEUMONIA": 5}
    assert set(a) <= set(examples)
    assert [e.path for e in a] == sorted(e.path for e in a)
    assert limit_per_class(examples, 5, seed=1) != a

    c = limit_per_class(examples, 15, seed=0)
    assert Counter(e.label for e in c) == {"NORMAL": 10, "PNEUMONIA": 15}
    assert {e for e in c if e.label == "NORMAL"} == {e for e in examples if e.label == "NORMAL"}

    assert sorted(limit_per_class(examples, 100, seed=0), key=lambda e: e.path) == sorted(
        examples, key=lambda e: e.path
    )


# --------------------------------------------------------------- split csv


def test_split_csv_round_trip(tmp_path):
    examples = [
        Example("/data/NORMAL/IM-0001-0001.jpeg", "NORMAL", "IM-0001"),
        Example("/data/PNEUMONIA/person3_virus_1.jpeg", "PNEUMONIA", "person3"),
        Example('/data/odd, "quoted" name/PNEUMONIA/x y.png', "PNEUMONIA", "x y"),
    ]
    splits = ["train", "val", "test"]
    path = tmp_path / "split.csv"
    write_split_csv(path, examples, splits)

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "split", "patient"]
    assert rows[1] == ["/data/NORMAL/IM-0001-0001.jpeg", "NORMAL", "train", "IM-0001"]
    assert len(rows) == 4
    assert read_split_csv(path) == list(zip(examples, splits))
    assert read_split_digests(path) == {}  # written without contents, as runs before 2026-12-02: nothing to check

    write_split_csv(path, examples, splits, ["a" * 64, "b" * 64, "c" * 64])
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["path", "label", "split", "patient", "sha256"]
    assert read_split_csv(path) == list(zip(examples, splits))  # the column changes nothing for its readers
    assert read_split_digests(path) == {ex.path: d * 64 for ex, d in zip(examples, "abc")}


# --------------------------------------------------------------- load_images


def test_load_images_skips_undecodable(tmp_path):
    config = PreprocessConfig(image_size=32)
    good = [
        _gray(tmp_path / "a.png", size=40, value=1),
        _gray(tmp_path / "b.jpeg", size=64, value=2, fmt="JPEG"),
        _gray(tmp_path / "d.png", size=50, value=3, mode="RGB"),
    ]
    bad = _touch(tmp_path / "c.jpg", b"this is text, not a JPEG\n")
    paths = [good[0], good[1], bad, good[2]]

    images, ok, failed = load_images(paths, config, workers=1)

    assert ok == [0, 1, 3]
    assert failed == [(bad, "not a decodable image")]
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.float32
    for row, i in enumerate(ok):
        np.testing.assert_array_equal(images[row], preprocess_image(paths[i], config))
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_load_images_all_bad_gives_empty_array(tmp_path):
    bad = _touch(tmp_path / "x.png", b"nope")
    images, ok, failed = load_images([bad], PreprocessConfig(image_size=32), workers=1)
    assert images.shape == (0, 32, 32, 1)
    assert ok == [] and failed == [(bad, "not a decodable image")]


@pytest.mark.skipif(sys.platform == "win32", reason="process pool start-up cost")
def test_load_images_parallel_equals_serial(tmp_path):
    # > 64 paths and workers > 1 takes the process-pool path
    config = PreprocessConfig(image_size=32)
    paths = [_gray(tmp_path / f"{i:03d}.png", size=33, value=i) for i in range(70)]
    paths[5] = _touch(tmp_path / "005.jpg", b"text")
    paths[66] = _touch(tmp_path / "066.jpeg", b"")
    serial = load_images(paths, config, workers=1)
    parallel = load_images(paths, config, workers=2)
    np.testing.assert_array_equal(serial[0], parallel[0])
    assert serial[1] == parallel[1] == [i for i in range(70) if i not in (5, 66)]
    assert serial[2] == parallel[2]
    assert [p for p, _ in serial[2]] == [paths[5], paths[66]]


def test_training_finds_and_decodes_dicom(tmp_path):
    """Training accepts .dcm like the batch job, through the same decoder."""
    from batch_job.synthetic import make_tree
    from dicom_factory import dicom_bytes
    from train.data import find_examples
    from train.loading import load_images

    make_tree(str(tmp_path), per_class=2, size=48, seed=0)
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    (tmp_path / "NORMAL" / "IM-0999-0001.dcm").write_bytes(dicom_bytes(pixels, bits_stored=12))
    examples = find_examples(str(tmp_path))
    dcm = [e for e in examples if e.path.endswith(".dcm")]
    assert [(e.label, e.patient) for e in dcm] == [("NORMAL", "IM-0999")]
    images, ok, failed = load_images([e.path for e in dcm], PreprocessConfig(image_size=32))
    assert failed == [] and images.shape == (1, 32, 32, 1)
    assert images.max() > 0.95 and images.min() < 0.05  # min..max stretched to the full range


def test_training_and_calibration_list_dicom_files_named_by_uid_as_the_job_does(tmp_path):
    """QA defect: `export --recalibrate` (and training) listed files by extension only, so DICOM files named by their
    SOP Instance UID, which the batch job scores, were left out without a word. One listing rule for all three."""
    from batch_job.listing import iter_images
    from batch_job.synthetic import make_tree
    from dicom_factory import dicom_bytes
    from export.calibrate import list_labelled
    from train.data import find_examples

    make_tree(str(tmp_path), per_class=2, size=48, seed=0)
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    uid_named = tmp_path / "PNEUMONIA" / "1.2.826.0.1.3680043.8.498.1"
    uid_named.write_bytes(dicom_bytes(pixels, bits_stored=12))
    (tmp_path / "NORMAL" / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "NORMAL" / "pipe")  # never opened: it would block
    job = sorted(path for _, path in iter_images([str(tmp_path)]))
    assert str(uid_named) in job and len(job) == 5
    assert sorted(path for path, _ in list_labelled(str(tmp_path))) == job
    assert sorted(e.path for e in find_examples(str(tmp_path))) == job


# ---------------------------------------------------------------- patients from DICOM headers


def _dicom_of(path, patient: str | None, seed: int) -> str:
    """A small DICOM file named by `path`, with PatientID `patient` (None: no PatientID element)."""
    import io

    import pydicom

    from dicom_factory import dicom_bytes

    pixels = np.random.default_rng(seed).integers(0, 4096, (40, 40), dtype=np.uint16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, bits_stored=12)))
    if patient is not None:
        ds.PatientID = patient
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_dicom_files_of_one_patient_end_up_in_the_same_split(tmp_path):
    """Hospital files named by UID: the PatientID in the header groups them, whatever the names say."""
    from pydicom.uid import generate_uid

    files = {}  # patient -> its two files
    for label in ("NORMAL", "PNEUMONIA"):
        for k in range(12):
            patient = f"{label[0]}-{k:03d}"
            files[patient] = [_dicom_of(tmp_path / label / f"{generate_uid()}.dcm", patient, seed=len(files) * 2 + i)
                              for i in range(2)]
    examples = find_examples(tmp_path)
    assert {e.path: e.patient for e in examples} == {p: pid for pid, paths in files.items() for p in paths}
    for seed in (0, 1, 2):
        split_of = dict(zip((e.path for e in examples), split_examples(examples, seed=seed)))
        assert len(set(split_of.values())) == 3  # the files are spread over all splits ...
        for patient, (a, b) in files.items():  # ... and a patient's two files never apart
            assert split_of[a] == split_of[b], (patient, seed)


def test_files_without_a_usable_patient_id_fall_back_to_the_name_rules(tmp_path):
    from train.data import dicom_patient_id, patient_of

    no_id = _dicom_of(tmp_path / "IM-0010-0001.dcm", None, seed=0)
    empty = _dicom_of(tmp_path / "person77_virus_1.dcm", "  ", seed=1)
    corrupt = _touch(tmp_path / "IM-0011-0002.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 40)
    jpeg_named_dcm = _gray(tmp_path / "person5_bacteria_9.dcm", fmt="JPEG")
    with_id = _dicom_of(tmp_path / "1.2.840.113619.2.55.3.dcm", "PAT-42", seed=2)
    assert [dicom_patient_id(p) for p in (no_id, empty, corrupt, jpeg_named_dcm, with_id)] == \
        [None, None, None, None, "PAT-42"]
    assert [patient_of(p) for p in (no_id, empty, corrupt, jpeg_named_dcm, with_id)] == \
        ["IM-0010", "person77", "IM-0011", "person5", "PAT-42"]
    # the rules of the name still hold for a DICOM file named like Kaggle's, when its header has no patient
    assert patient_of(_dicom_of(tmp_path / "IM-0012-0001.dcm", "", seed=3)) == "IM-0012"


def test_training_reads_dicom_of_the_modalities_it_is_given(tmp_path):
    """Review: training read DICOM with the job's default modalities only (CR, DX); `train --modalities` is the job's
    option, recorded in run.json and, through export, in the package's training_data (its reference and gate follow
    it)."""
    from dicom_factory import dicom_bytes, xray_like
    from train.__main__ import parse_args
    from train.loading import load_images
    from xray_core.training_data import TrainingData

    paths = []
    for i, modality in enumerate(("CR", "OT")):
        paths.append(str(tmp_path / f"{i}.dcm"))
        with open(paths[-1], "wb") as f:
            f.write(dicom_bytes(xray_like(64, 64, seed=i), modality=modality))
    config = PreprocessConfig(image_size=32)
    _, ok, failed = load_images(paths, config)
    assert ok == [0] and failed == [(paths[1], "out of scope: Modality OT not allowed (allowed: CR, DX)")]
    _, ok, failed = load_images(paths, config, modalities=("CR", "DX", "OT"))
    assert ok == [0, 1] and failed == []
    assert parse_args(["--data-dir", "d", "--output-dir", "o"]).modalities == ("CR", "DX")
    assert parse_args(["--data-dir", "d", "--output-dir", "o", "--modalities", "cr, ot"]).modalities == ("CR", "OT")
    with pytest.raises(SystemExit):
        parse_args(["--data-dir", "d", "--output-dir", "o", "--modalities", ","])
    data = TrainingData.from_dict({"source": "x", "data_dir": "/d", "modalities": ["CR", "OT"]})
    assert data.modalities == ("CR", "OT") and TrainingData.from_dict(data.to_dict()) == data
    assert "modalities" not in TrainingData.from_dict({"source": "x", "data_dir": "/d"}).to_dict()  # shipped ones


def test_decode_workers_die_with_the_process_that_started_them(tmp_path):
    """QA: a training (or export) killed outright, by SIGKILL or the out-of-memory killer, left its decode worker
    processes waiting for work for good. They now ask the kernel to kill them when their parent dies."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from batch_job.synthetic import make_tree
    from helpers import REPO

    make_tree(str(tmp_path / "data"), per_class=200, size=48, seed=3)  # > 64 images: the parallel path
    script = ("import sys, time\n"
              "from train.data import find_examples\n"
              "from train.loading import load_images\n"
              "from xray_core.preprocessing import PreprocessConfig\n"
              "paths = [e.path for e in find_examples(sys.argv[1])] * 50\n"
              "load_images(paths, PreprocessConfig(image_size=32), workers=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 60
    while time.time() < deadline and len([c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]) < 2:
        time.sleep(0.05)
    workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2, "the decode workers never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for orphan in alive:  # not left behind by a failing run of this test
        orphan.kill()
    assert not alive, [p.pid for p in alive]
