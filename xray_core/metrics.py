"""Metrics at an operating point and threshold selection (scikit-learn, no TensorFlow)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from xray_core.labels import CLASSES


def choose_threshold(y_true, y_prob, target_recall: float = 0.95) -> float:
    """The threshold with the highest specificity among those reaching `target_recall`.

    Decision rule everywhere: PNEUMONIA when probability >= threshold. Among equally
    specific thresholds the highest is taken, then moved halfway down to the next
    lower validation score (halfway to 0 when it is the lowest: every image flagged, a weak
    model's or a small split's case, QA): the validation operating point is unchanged, and no
    validation probability sits exactly on the threshold (so float noise of ~1e-7,
    e.g. Keras vs ONNX, cannot flip a decision there).
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.min() == y_true.max():
        raise ValueError("threshold selection needs both classes in the validation split")
    fpr, tpr, thresholds = skm.roc_curve(y_true, y_prob, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target_recall - 1e-12)
    best = ok[np.lexsort((-thresholds[ok], fpr[ok]))[0]]  # min fpr, then max threshold
    chosen = float(min(thresholds[best], 1.0))
    below = y_prob[y_prob < chosen]
    if below.size:
        return float((chosen + below.max()) / 2)
    return chosen / 2 if chosen >= 2e-6 else 0.0  # a margin the ~1e-7 float noise cannot cross (review)


def operating_point(y_true, y_prob, threshold: float) -> dict:
    """All metrics at one threshold, plus the threshold-free ones."""
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    y_pred = (y_prob >= threshold).astype(int)
    cm = skm.confusion_matrix(y_true, y_pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    both = 0 < y_true.sum() < len(y_true)
    return {
        "threshold": float(threshold),
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": _defined(skm.precision_score(y_true, y_pred, zero_division=np.nan)),
        "recall": _defined(skm.recall_score(y_true, y_pred, zero_division=np.nan)),
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "f1": _defined(skm.f1_score(y_true, y_pred, zero_division=np.nan)),
        "roc_auc": float(skm.roc_auc_score(y_true, y_prob)) if both else None,
        "pr_auc": float(skm.average_precision_score(y_true, y_prob)) if both else None,
        "confusion_matrix": {"labels": list(CLASSES), "matrix": cm.tolist(), "tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "classification_report": skm.classification_report(
            y_true, y_pred, labels=[0, 1], target_names=list(CLASSES), output_dict=True, zero_division=0
        ),
    }


def _defined(value) -> float | None:
    """A metric as a float; None where it is undefined (recall without positives, precision without a positive
    prediction, ...): "n/a" in every report, never a 0 that reads as a measurement."""
    return None if np.isnan(value) else float(value)


def without_report(point: dict) -> dict:
    """An operating point without its classification report (the form metadata.json records)."""
    return {k: v for k, v in point.items() if k != "classification_report"}


def evaluate(y_val, p_val, y_test, p_test, target_recall: float) -> dict:
    """Both operating points on the test split; the tuned threshold comes from validation."""
    chosen = choose_threshold(y_val, p_val, target_recall)
    return {
        "target_recall": float(target_recall),
        "chosen_threshold": chosen,
        "val_roc_auc": float(skm.roc_auc_score(y_val, p_val)),
        "val_at_chosen": operating_point(y_val, p_val, chosen),
        "test_at_0.5": operating_point(y_test, p_test, 0.5),
        "test_at_chosen": operating_point(y_test, p_test, chosen),
    }
