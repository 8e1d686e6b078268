"""--calibrate-dir: choose the package's decision threshold on a labelled sample of new scans, and estimate
what a threshold chosen that way does on scans it did not see.

The sample is labelled by the batch job's folder rule (xray_core.labels). Its metrics are reported at 0.5, at the
validation split's threshold and at the calibrated threshold. The calibrated threshold's own metrics are
optimistic (it was chosen on those images), so a 2-fold estimate is added: patients are split into two halves
(stratified by class), the threshold is chosen on one half and measured on the other, then the other way round;
the pooled out-of-half decisions give recall, specificity and accuracy with Wilson 95% intervals, and ROC AUC
comes with a patient-level bootstrap 95% interval. Patients are DICOM PatientIDs where the files have them, else
the Kaggle file-name rules (train.data.patient_of).

Nothing here needs Keras: `python -m export --run-dir` calibrates the session of the model it just converted,
`--recalibrate` (export/republish.py) that of a published package's model.onnx.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, mannwhitneyu
from sklearn.model_selection import StratifiedGroupKFold

from train.data import Example, label_conflicts, layout, patient_groups, patient_of
from xray_core.dicom_header import DEFAULT_MODALITIES
from xray_core.files import content_key, inside
from xray_core.input_files import is_input_file
from xray_core.labels import CLASSES, label_from_path
from xray_core.metrics import choose_threshold, operating_point, without_report
from xray_core.package import score as run_model
from xray_core.preprocessing import ImageError, PreprocessConfig, read_model_input

SEED = 0
BOOTSTRAP = 2000


class CalibrationError(ValueError):
    """A calibration folder that cannot be used; the message is one line."""


def require_per_class(labels, minimum: int, cal_dir: str, what: str = "images") -> None:
    """CalibrationError unless `labels` hold at least `minimum` of each class."""
    counts = Counter(labels)
    if any(counts[c] < minimum for c in CLASSES):
        raise CalibrationError(f"calibration dir {cal_dir} has {counts['NORMAL']} NORMAL and {counts['PNEUMONIA']} "
                               f"PNEUMONIA {what}; at least {minimum} of each class are needed")


# Fewer images per class leave the estimate too loose to set a threshold by: already with 30 positives, a recall of
# 29/30 has the Wilson 95% interval 0.83-0.99. For --run-dir too since 2026-12-02 (QA: 5 a class published a
# package whose card showed a 2-fold ROC AUC of 0.400).
MIN_PER_CLASS = 30


def list_labelled(cal_dir: str, min_per_class: int = 1) -> list[tuple[str, str]]:
    """(path, label) for every image under cal_dir with a NORMAL/PNEUMONIA folder at or below cal_dir;
    CalibrationError when a class has none or fewer than min_per_class."""
    if not os.path.isdir(cal_dir):
        raise CalibrationError(f"calibration dir not found: {cal_dir}")
    found = []
    for dirpath, dirs, files in os.walk(cal_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            label = label_from_path(os.path.abspath(path), os.path.abspath(cal_dir))
            if label and is_input_file(path):
                found.append((path, label))
    missing = [c for c in CLASSES if not any(label == c for _, label in found)]
    if missing:
        raise CalibrationError(f"calibration dir {cal_dir} has no images under a folder named {' or '.join(missing)}")
    require_per_class([label for _, label in found], min_per_class, cal_dir)
    return found


def training_folders(data_dir: str) -> list[str]:
    """data_dir and the split and class folders train reads in it (train.data.layout: links followed there, as train
    follows them; nothing it does not read): where the training images really lie."""
    try:
        classes = [folder for folder, _ in layout(Path(data_dir))[0]]
    except OSError:  # missing, or not readable by this user: the folder itself, as recorded
        return [data_dir]
    return [data_dir] + sorted({str(f.parent) for f in classes}) + [str(f) for f in classes]


def refuse_training_folder(cal_dir: str, data_dir: str | None) -> None:
    """CalibrationError when cal_dir is the folder the model was trained on (as its run recorded it), lies inside it or
    holds it, or holds or lies in one of its class folders that is a link to elsewhere (QA: a NORMAL linked to the
    shared training folder let that folder calibrate the model): a threshold chosen on the model's own training
    images is chosen in-sample, and so is its estimate."""
    if not (data_dir and os.path.isdir(cal_dir)):
        return
    for folder in training_folders(data_dir):
        if inside(cal_dir, folder) or inside(folder, cal_dir):
            raise CalibrationError(f"calibration dir {cal_dir} overlaps {data_dir}, the folder the model was trained "
                                   "on: calibrate on labelled scans it never saw")


def score(session, paths: list[str], config: PreprocessConfig, modalities: tuple[str, ...] = DEFAULT_MODALITIES):
    """-> (probabilities of the images in scope (DICOM `modalities`), the images, their indices, [(path, error)])."""
    images, ok, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(read_model_input(path, config, modalities))
            ok.append(i)
        except ImageError as exc:
            failed.append((path, str(exc)))
    if not images:
        raise CalibrationError("no calibration image could be decoded and is in scope for the batch job")
    x = np.stack(images)
    return run_model(session, x).probability.astype(np.float64), x, ok, failed


def wilson(k: int, n: int) -> list[float]:
    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic over the pairs (ties count half): the number roc_auc_score gives,
    at a third of its cost (the bootstrap computes it 2,000 times)."""
    pos = y == 1
    return float(mannwhitneyu(p[pos], p[~pos], method="asymptotic").statistic / (pos.sum() * (~pos).sum()))


def auc_interval(y, p, groups, seed: int = SEED, n: int = BOOTSTRAP) -> list[float]:
    """Percentile bootstrap over patients (a patient's images stay together)."""
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    rows = {g: np.flatnonzero(groups == g) for g in patients}
    aucs = []
    for _ in range(n):
        idx = np.concatenate([rows[g] for g in rng.choice(patients, size=len(patients), replace=True)])
        if 0 < y[idx].sum() < len(idx):
            aucs.append(auc(y[idx], p[idx]))
    return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


def two_fold(y, p, groups, target_recall: float, seed: int = SEED) -> dict:
    """Threshold chosen on one half of the patients, measured on the other; pooled over both halves."""
    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    decided = np.zeros(len(y), dtype=int)
    thresholds = []
    for fit_idx, eval_idx in folds.split(np.zeros(len(y)), y, groups):
        thr = choose_threshold(y[fit_idx], p[fit_idx], target_recall)
        thresholds.append({"threshold": thr, "fit_images": int(len(fit_idx)), "eval_images": int(len(eval_idx))})
        decided[eval_idx] = (p[eval_idx] >= thr).astype(int)
    pos, neg = y == 1, y == 0
    tp, tn = int((decided[pos] == 1).sum()), int((decided[neg] == 0).sum())
    correct = tp + tn
    return {
        "method": "2-fold by patient (StratifiedGroupKFold, seed 0): threshold chosen on one half, measured on the "
                  "other",
        "folds": thresholds,
        "roc_auc": operating_point(y, p, 0.5)["roc_auc"],
        "roc_auc_ci95": auc_interval(y, p, groups, seed),
        "recall": tp / int(pos.sum()), "recall_ci95": wilson(tp, pos.sum()),
        "specificity": tn / int(neg.sum()), "specificity_ci95": wilson(tn, neg.sum()),
        "accuracy": correct / len(y), "accuracy_ci95": wilson(correct, len(y)),
    }


def calibrate(session, cal_dir: str, config: PreprocessConfig, val_threshold: float, target_recall: float,
              log=print, min_per_class: int = 1, previous_threshold: float | None = None,
              modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> tuple[dict, np.ndarray]:
    """-> (the `site_calibration` block of metadata.json, the decoded images). Its `threshold` becomes the
    package's decision threshold. CalibrationError when fewer than min_per_class images of a class are found or
    decoded. With previous_threshold (a recalibrated package's), the block also holds the sample's metrics at it
    (`at_previous_threshold`)."""
    found = [Example(path, label, patient_of(path)) for path, label in list_labelled(cal_dir, min_per_class)]
    digests = [content_key(ex.path) for ex in found]
    keep, conflicts = label_conflicts(found, digests)  # as training: which label is right cannot be known
    found, digests = [found[i] for i in keep], [digests[i] for i in keep]
    log(f"calibration: scoring {len(found)} labelled images of {cal_dir}")
    p, images, ok, failed = score(session, [ex.path for ex in found], config, modalities)
    failed = conflicts + failed
    for path, err in failed:
        log(f"calibration: skipped {path}: {err}")
    kept, digests = [found[i] for i in ok], [digests[i] for i in ok]
    unique = {digest: ex.label for ex, digest in zip(kept, digests)}  # a byte-identical copy counts once
    require_per_class(list(unique.values()), max(min_per_class, 1), cal_dir, "decodable images")
    y = np.asarray([CLASSES.index(ex.label) for ex in kept])
    groups = np.asarray(patient_groups(kept, digests))  # copies are one patient: never on both sides of the split
    few = [name for label, name in enumerate(CLASSES) if len(np.unique(groups[y == label])) < 2]
    if few:
        raise CalibrationError(f"calibration dir {cal_dir} has images of fewer than 2 patients of {', '.join(few)}: "
                               "the 2-fold estimate splits the patients in two")
    threshold = choose_threshold(y, p, target_recall)
    result = {
        "dir": os.path.abspath(cal_dir),
        "images": int(len(y)), "normal": int((y == 0).sum()), "pneumonia": int(y.sum()),
        "patients": int(len(np.unique(groups))), "skipped": [{"path": a, "error": b} for a, b in failed],
        "target_recall": float(target_recall),
        "modalities": list(modalities),  # the job's --modalities these images were read with
        "threshold": threshold,
        "at_0.5": without_report(operating_point(y, p, 0.5)),
        "at_validation_threshold": without_report(operating_point(y, p, val_threshold)),
        "at_calibrated_threshold": without_report(operating_point(y, p, threshold)),
        "two_fold": two_fold(y, p, groups, target_recall),
    }
    if previous_threshold is not None:
        result["at_previous_threshold"] = without_report(operating_point(y, p, previous_threshold))
    est = result["two_fold"]
    log(f"calibrated on {len(y)} images of {cal_dir}: threshold {threshold:.4f}; 2-fold estimate ROC AUC "
        f"{est['roc_auc']:.4f}, recall {est['recall']:.4f}, specificity {est['specificity']:.4f}, "
        f"accuracy {est['accuracy']:.4f}")
    return result, images
