"""The quality floor: what a model version's estimate of new scans must reach for export to publish it.

A published version becomes the batch job's default as soon as it is the newest of its folder, so a broken retrain
(QA: a run on too little data, site ROC AUC 0.644) would have screened the next night. Export refuses to publish a
version below the floor unless told `--publish-below-floor` (with --run-dir, --recalibrate and --add-gate);
metadata.json records the check (`quality_floor`), the model card says it, and the batch job warns at start, and says
so in its reports and metrics.json, when the version it scores is below.

The floor catches a broken model, not a weaker one (docs/export.md, "The quality floor"):

* **ROC AUC >= 0.95.** The study's models, which this product replaced because they did not hold on new scans,
  scored 0.91-0.93 on the site sample; every model of the shift-robust recipe trained since scored 0.974-0.991, single
  members included (train/EXPERIMENTS.md). With the smallest calibration sample export accepts (30 images a class) a
  ROC AUC of 0.985 has a standard error of about 0.016 (Hanley and McNeil): a good model reads below 0.95 about 1.5%
  of the time there; at the site sample's size (196 and 117) the standard error is about 0.006.
* **Recall >= 0.90** at the version's threshold. The product is a screen: the shipped versions' thresholds target recall
  0.97 (train's default target 0.95), and a version whose threshold gives less than 0.90 on scans it was not chosen
  on is not one. In the 2-fold estimate each half's threshold is chosen on half the positives, so at 30 a class a
  good model (ROC AUC 0.985) reads below 0.90 in about 3.5% of samples (2,000 simulated); at the site sample's size
  practically never.

The figures judged, the first recorded of: the calibration's 2-fold estimate (out of sample) when the version was
calibrated on a labelled sample of new scans; the training run's own site sample (`train --site-dir`) at the validation
threshold; the internal test split at the validation threshold. The last comes from the training collection: it
catches a broken run, not a model that fails on new scans.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_ROC_AUC = 0.95
MIN_RECALL = 0.90
SITE = "site calibration, 2-fold estimate"
RUN_SITE = "the training run's site sample, at the validation threshold"
INTERNAL = "internal test split"
OVERRIDDEN = "published with --publish-below-floor"
BEFORE = "published before export had a quality floor (2026-12-02)"


@dataclass(frozen=True)
class QualityFloor:
    """One version's figures against the floor. `met` is derived from the figures, never read from a file."""

    estimate: str  # SITE, RUN_SITE or INTERNAL: what the figures are
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
        misses it (export's lines)."""
        floor = f"ROC AUC {self.min_roc_auc:.2f}, recall {self.min_recall:.2f}"
        if self.met:
            return (f"{self.estimate}: ROC AUC {self.roc_auc:.3f}, recall {self.recall:.3f}: above the quality floor "
                    f"({floor})")
        return f"{self.estimate}: {', '.join(self.shortfalls)}: below the quality floor ({floor})"

    def below(self, how: str) -> str:
        """What a version below the floor is, in the words the job's log, reports and metrics.json and the model card
        share: `<estimate>: ROC AUC 0.644 < 0.95 (floor: ROC AUC 0.95, recall 0.90); <how it was published>`."""
        return (f"{self.estimate}: {', '.join(self.shortfalls)} (floor: ROC AUC {self.min_roc_auc:.2f}, recall "
                f"{self.min_recall:.2f}); {how}")

    def to_dict(self) -> dict:
        """metadata.json's `quality_floor` (`met` for a reader; :meth:`from_dict` derives it again)."""
        return {"estimate": self.estimate, "roc_auc": self.roc_auc, "recall": self.recall,
                "min_roc_auc": self.min_roc_auc, "min_recall": self.min_recall, "met": self.met}

    @classmethod
    def from_dict(cls, data: dict) -> "QualityFloor":
        """The check as export recorded it, judged against its day's floor or today's, whichever is higher (review: a
        limit lowered by hand in metadata.json passed --add-gate and silenced the job). ValueError (or KeyError,
        TypeError) for a record that is not figures."""
        return cls(str(data["estimate"]), _figure(data["roc_auc"]), _figure(data["recall"]),
                   max(_figure(data["min_roc_auc"]), MIN_ROC_AUC), max(_figure(data["min_recall"]), MIN_RECALL))


def _figure(value) -> float:
    """A recorded figure: a JSON number (NaN judged below anything), never a string, a boolean or an infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a figure: {value!r}")
    return float(value)


def measured(site_calibration: dict | None, test_metrics: dict | None,
             run_site: dict | None = None) -> QualityFloor | None:
    """The floor check of a version from its figures, the first recorded as numbers of: the site calibration's 2-fold
    estimate, the training run's site sample at the validation threshold (metrics.json `site_at_chosen`), the internal
    test split at the validation threshold; None where none is."""
    for estimate, figures in ((SITE, (site_calibration or {}).get("two_fold")), (RUN_SITE, run_site),
                              (INTERNAL, (test_metrics or {}).get("at_chosen"))):
        try:
            return QualityFloor(estimate, _figure(figures["roc_auc"]), _figure(figures["recall"]))
        except (AttributeError, KeyError, TypeError, ValueError):  # not recorded, or not as numbers: the next
            continue
    return None


def judged(recorded: dict | None, site_calibration: dict | None, test_metrics: dict | None) -> tuple[
        QualityFloor | None, str]:
    """A published version's check and how it was published: what export recorded (`quality_floor`; OVERRIDDEN when
    below), else, for a version from before the floor or whose record is not figures, its recorded figures (BEFORE)."""
    if recorded:
        try:
            return QualityFloor.from_dict(recorded), OVERRIDDEN
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
    return measured(site_calibration, test_metrics), BEFORE


def below_floor(recorded: dict | None, site_calibration: dict | None, test_metrics: dict | None) -> str:
    """A published version's :meth:`QualityFloor.below` text where it is below the floor, else "" (:func:`judged`)."""
    floor, how = judged(recorded, site_calibration, test_metrics)
    return floor.below(how) if floor is not None and not floor.met else ""
