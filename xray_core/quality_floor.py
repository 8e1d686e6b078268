"""The quality floor: what a model version's estimate of new scans must reach for export to publish it.

A published version becomes the batch job's default as soon as it is the newest of its folder, so a broken retrain
(QA: a run on too little data, site ROC AUC 0.644) would have screened the next night. Export now refuses to
publish a version below the floor unless told `--publish-below-floor`; metadata.json records the check
(`quality_floor`), the model card says it, and the batch job warns at start when the version it scores is below.

The floor catches a broken model, not a weaker one (docs/export.md, "Quality floor"):

* **ROC AUC >= 0.95.** The study's models, which this product replaced because they did not hold on new scans,
  scored 0.91-0.93 on the site sample; every model of the shift-robust recipe trained since scored 0.974-0.991, single
  members included (train/EXPERIMENTS.md).
  With the smallest calibration sample export accepts (30 images a class) a ROC AUC of 0.985 has a standard error of
  about 0.016 (Hanley and McNeil): a good model reads below 0.95 about 1.5% of the time there; at the site
  sample's size (117 and 196), 0.008.
* **Recall >= 0.90** at the version's threshold. The product is a screen: calibration targets recall 0.97 by
  default, and a version whose threshold gives less than 0.90 on scans it was not chosen on is not one. A model
  whose recall on new scans is really 0.97 reads below 0.90 in 1.2% of 30-scan samples, and practically never at
  the site sample's 196.

The figures judged are the calibration's 2-fold estimate (out of sample) when the version was calibrated on a labelled
sample of new scans, else the internal test split at the validation threshold. The second comes from the training
collection: it catches a broken run, not a model that fails on new scans.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_ROC_AUC = 0.95
MIN_RECALL = 0.90
SITE = "site calibration, 2-fold estimate"
INTERNAL = "internal test split"


@dataclass(frozen=True)
class QualityFloor:
    """One version's figures against the floor. `met` is derived from the figures, never read from a file."""

    estimate: str  # SITE or INTERNAL: what the figures are
    roc_auc: float
    recall: float
    min_roc_auc: float = MIN_ROC_AUC
    min_recall: float = MIN_RECALL

    @property
    def shortfalls(self) -> tuple[str, ...]:
        """What misses the floor, as text; a figure that is not a number (NaN) misses it too."""
        out = []
        if not self.roc_auc >= self.min_roc_auc:
            out.append(f"ROC AUC {self.roc_auc:.3f} < {self.min_roc_auc:.2f}")
        if not self.recall >= self.min_recall:
            out.append(f"recall {self.recall:.3f} < {self.min_recall:.2f}")
        return tuple(out)

    @property
    def met(self) -> bool:
        return not self.shortfalls

    def line(self) -> str:
        """`<estimate>: ROC AUC 0.988, recall 0.980: above the quality floor (ROC AUC 0.95, recall 0.90)`, or what
        misses it."""
        floor = f"ROC AUC {self.min_roc_auc:.2f}, recall {self.min_recall:.2f}"
        if self.met:
            return (f"{self.estimate}: ROC AUC {self.roc_auc:.3f}, recall {self.recall:.3f}: above the quality floor "
                    f"({floor})")
        return f"{self.estimate}: {', '.join(self.shortfalls)}: below the quality floor ({floor})"

    def to_dict(self) -> dict:
        """metadata.json's `quality_floor` (`met` for a reader; :meth:`from_dict` derives it again)."""
        return {"estimate": self.estimate, "roc_auc": self.roc_auc, "recall": self.recall,
                "min_roc_auc": self.min_roc_auc, "min_recall": self.min_recall, "met": self.met}

    @classmethod
    def from_dict(cls, data: dict) -> "QualityFloor":
        """The check as export recorded it, against the floor of that day."""
        return cls(str(data["estimate"]), float(data["roc_auc"]), float(data["recall"]), float(data["min_roc_auc"]),
                   float(data["min_recall"]))


def measured(site_calibration: dict | None, test_metrics: dict | None) -> QualityFloor | None:
    """The floor check of a version from its metadata's figures: the site calibration's 2-fold estimate where it
    has one, else the internal test split at the validation threshold; None where neither is recorded as numbers."""
    try:
        if site_calibration and site_calibration.get("two_fold"):
            est = site_calibration["two_fold"]
            return QualityFloor(SITE, float(est["roc_auc"]), float(est["recall"]))
        at = (test_metrics or {}).get("at_chosen")
        if at:
            return QualityFloor(INTERNAL, float(at["roc_auc"]), float(at["recall"]))
    except (AttributeError, KeyError, TypeError, ValueError):  # figures recorded otherwise: nothing to judge
        return None
    return None
