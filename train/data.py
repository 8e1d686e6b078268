"""Find labelled X-rays, derive patient ids, and split train/val/test grouped by patient.

A file's patient is its DICOM PatientID when it is a DICOM file that has one, else the Kaggle file-name rules.

No TensorFlow here: the functions are pure and cheap to test.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from xray_core.dicom_header import DICOM_MAGIC_OFFSET, is_dicom, pydicom_reader
from xray_core.files import atomic_write, sha256_file
from xray_core.input_files import is_input_file
from xray_core.labels import CLASSES

SPLITS = ("train", "val", "test")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)


class DataError(ValueError):
    """Bad data directory; the message is one line for the user."""


@dataclass(frozen=True)
class Example:
    path: str
    label: str  # NORMAL or PNEUMONIA
    patient: str


def patient_id(filename: str) -> str:
    """Kaggle file name -> patient id; any other name is its own patient."""
    name = os.path.basename(filename)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return os.path.splitext(name)[0]


def dicom_patient_id(path: str) -> str | None:
    """The PatientID of a DICOM file (its header only, the pixel data is not read); None for a file that is not
    DICOM (dicom_header.is_dicom, as the shared preprocessing decides), has no or an empty PatientID, or
    whose header cannot be read (loading the image reports that file later), and for what is no regular file (a
    FIFO named .jpeg blocked open() for good: reading it reports it)."""
    try:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            if not is_dicom(f.read(DICOM_MAGIC_OFFSET + 4)):
                return None
            pydicom = pydicom_reader()
            f.seek(0)
            with warnings.catch_warnings():  # a damaged header is reported when the image is loaded
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"], force=True)
        value = str(ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - pydicom raises many types for corrupt headers; the name rules apply then
        return None
    return value or None


def patient_of(path: str) -> str:
    """A file's patient: the DICOM PatientID where there is one (hospital files are often named by UID, which
    says nothing about the patient), else :func:`patient_id` of its name."""
    return dicom_patient_id(path) or patient_id(path)


def _folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []


def layout(root: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(class folders with their label, other folders) of ROOT/{train,val,test}/{NORMAL,PNEUMONIA} or
    ROOT/{NORMAL,PNEUMONIA}, names in any case as the batch job's folder rule reads them (QA: `normal/` was "no
    images" in train and NORMAL in calibration and the job)."""
    parents = [root] + [p for p in _folders(root) if p.name.lower() in SPLITS]
    classes, other = [], []
    for parent in parents:
        for folder in _folders(parent):
            if folder.name.upper() in CLASSES:
                classes.append((folder, folder.name.upper()))
            elif not (parent == root and folder.name.lower() in SPLITS):
                other.append(folder)
    return classes, other


def other_folders(data_dir: str | os.PathLike) -> list[str]:
    """The folders beside the class folders that train reads nothing from (a third class, say: QA, a COVID folder
    of 31 images was skipped without a word)."""
    return [str(p) for p in layout(Path(os.path.abspath(data_dir)))[1]]


def find_examples(data_dir: str | os.PathLike) -> list[Example]:
    """Kaggle layout ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/* or flat ROOT/{NORMAL,PNEUMONIA}/*."""
    root = Path(os.path.abspath(data_dir))
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    examples = []
    for class_dir, label in layout(root)[0]:
        for dirpath, _dirs, files in os.walk(class_dir):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if is_input_file(path):
                    examples.append(Example(path, label, patient_of(path)))
    if not examples:
        raise DataError(f"no images (.jpeg/.jpg/.png/.dcm) under {root}/[train|val|test/]NORMAL|PNEUMONIA")
    counts = Counter(e.label for e in examples)
    for label in CLASSES:
        if counts[label] == 0:
            raise DataError(f"class {label} has no images under {root}")
    return sorted(examples, key=lambda e: e.path)


def limit_per_class(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """A deterministic random subset of at most `limit` images per class."""
    rng = np.random.default_rng(seed)
    out = []
    for label in CLASSES:
        members = [e for e in examples if e.label == label]
        if len(members) > limit:
            keep = sorted(rng.choice(len(members), size=limit, replace=False))
            members = [members[i] for i in keep]
        out.extend(members)
    return sorted(out, key=lambda e: e.path)


def patient_groups(examples: Sequence[Example], digests: Sequence[str]) -> list[int]:
    """Union patients that share a byte-identical file (training's split and calibration's 2-fold estimate keep them
    on one side); returns a group index per example."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_patient_of_digest: dict[str, str] = {}
    for ex, digest in zip(examples, digests):
        find("p:" + ex.patient)
        other = first_patient_of_digest.setdefault(digest, ex.patient)
        parent[find("p:" + ex.patient)] = find("p:" + other)
    roots = [find("p:" + ex.patient) for ex in examples]
    index = {r: i for i, r in enumerate(sorted(set(roots)))}
    return [index[r] for r in roots]


def split_examples(
    examples: Sequence[Example],
    fractions: Sequence[float] = (0.70, 0.15, 0.15),
    seed: int = 42,
    digests: Sequence[str] | None = None,
) -> list[str]:
    """Assign each example to train/val/test, stratified by class, grouped by patient.

    Groups are patients, merged when they share a byte-identical image. Each group
    takes its majority label; per label, groups are shuffled with `seed` and each is
    given to the split furthest below its target image count (largest deficit).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"--split must be three non-negative fractions summing to 1, got {list(fractions)}")
    if digests is None:
        digests = [sha256_file(e.path) for e in examples]
    group_of = patient_groups(examples, digests)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)
    group_label = {
        g: Counter(examples[i].label for i in idx).most_common(1)[0][0] for g, idx in members.items()
    }
    rng = np.random.default_rng(seed)
    assignment = [""] * len(examples)
    for label in CLASSES:
        groups = sorted(g for g, lab in group_label.items() if lab == label)
        rng.shuffle(groups)
        total = sum(len(members[g]) for g in groups)
        targets = np.asarray(fractions, dtype=float) * total
        filled = np.zeros(3)
        for g in groups:
            k = int(np.argmax(targets - filled))
            filled[k] += len(members[g])
            for i in members[g]:
                assignment[i] = SPLITS[k]
    return assignment


def write_split_csv(path: str | os.PathLike, examples: Sequence[Example], splits: Sequence[str],
                    digests: Sequence[str] | None = None) -> None:
    """split.csv: each image's path, label, split and patient, and with digests its content's sha256 (what export
    checks the images against before it builds the package from them)."""
    contents = [[d] for d in digests] if digests is not None else [[]] * len(examples)

    def write(f):
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "patient"] + ["sha256"] * (digests is not None))
        for ex, split, content in zip(examples, splits, contents, strict=True):
            writer.writerow([ex.path, ex.label, split, ex.patient, *content])

    atomic_write(str(path), write)


def read_split_csv(path: str | os.PathLike) -> list[tuple[Example, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return [(Example(r["path"], r["label"], r["patient"]), r["split"]) for r in csv.DictReader(f)]


def read_split_digests(path: str | os.PathLike) -> dict[str, str]:
    """path -> the sha256 train recorded for it in split.csv ({} for a run from before that column)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return {r["path"]: r["sha256"] for r in csv.DictReader(f) if r.get("sha256")}


def labels_to_array(labels: Iterable[str]) -> np.ndarray:
    return np.asarray([CLASSES.index(label) for label in labels], dtype=np.float32)


def refuse_site_images(site_dir: str, data_dir: str, examples, digests) -> None:
    """DataError (exit 2) when a file of the site sample is also in the training folder, under any name (the same
    bytes): the site sample is never trained on, and its figures would be of images the model saw."""
    site = {sha256_file(e.path): e.path for e in find_examples(site_dir) if os.path.isfile(e.path)}  # not a FIFO
    shared = [(ex.path, site[d]) for ex, d in zip(examples, digests) if d in site]
    if shared:
        raise DataError(f"{len(shared)} images of --site-dir {site_dir} are also in --data-dir {data_dir} (the same "
                        f"bytes, e.g. {shared[0][1]} as {shared[0][0]}): the site sample is never trained on")


def label_conflicts(examples, digests) -> tuple[list[int], list[tuple[str, str]]]:
    """Files whose bytes are filed under both labels cannot be trained on: -> (the indices kept, (path, why) of
    every copy left out)."""
    labels: dict[str, set[str]] = {}
    for ex, d in zip(examples, digests):
        labels.setdefault(d, set()).add(ex.label)
    keep = [i for i, d in enumerate(digests) if len(labels[d]) == 1]
    left = [(ex.path, "the same bytes are filed under both NORMAL and PNEUMONIA")
            for ex, d in zip(examples, digests) if len(labels[d]) > 1]
    return keep, left


def check_patients_per_class(examples, limited: bool = False) -> None:
    """DataError (exit 2) for a class whose decodable images come from fewer than 3 patients: train, val and test
    each need one, and no --split can change that (QA: the message named the split)."""
    for label in CLASSES:
        patients = {ex.patient for ex in examples if ex.label == label}
        if len(patients) < 3:
            images = sum(ex.label == label for ex in examples)
            raise DataError(f"class {label} has {images} decodable images of {len(patients)} patient(s); train, val "
                            "and test each need one patient of each class: at least 3 patients a class"
                            + (" (--limit-per-class samples images, not patients: raise it)" if limited else ""))
