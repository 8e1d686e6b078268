"""The run's result, typed: what every report writer (metrics.json, report.md, report.html, the summary lines) and
the ledger commit read. Built once by the driver (pipeline.py) after scoring; metrics.json is :meth:`RunResult.
metrics`, whose keys are the documented ones (README, "Outputs")."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from batch_job import earlier_nights
from batch_job.drift import DriftResult
from batch_job.earlier_nights import EarlierNight
from batch_job.figures import labelled
from batch_job.reconcile import Reconciliation
from batch_job.shard_result import Flagged
from batch_job.worklist import WorklistSummary
from xray_core.occlusion import HeatmapMethod
from xray_core.training_data import TrainingData

SCORE_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


@dataclass(frozen=True)
class LabelMetrics:
    """The scored images with a folder label, at the run's threshold (xray_core.metrics.operating_point)."""

    images: int
    scores: dict[str, float | None]  # SCORE_KEYS -> value (None where undefined)
    confusion_matrix: dict[str, int]  # tn, fp, fn, tp
    figures: tuple[str, ...] = ()  # the figures written against the labels (batch_job/figures.py)


@dataclass(frozen=True)
class Timings:
    setup: float  # arguments, model verification, listing
    scoring: float  # the Beam pipeline, worker start included
    report: float  # reconciliation, heatmap overlays, drift, metrics and figures
    heatmaps: float  # drawing the heatmaps, within report (beside the figures and the drift check)
    drift: float  # the drift check's part of report


@dataclass(frozen=True)
class HeatmapSummary:
    requested: int
    model_has_heatmaps: bool
    map_hw: tuple[int, int] | None = None  # (h, w) cells of the model's maps
    method: HeatmapMethod = HeatmapMethod()  # what the overlays show: the graph's map or occlusion maps


@dataclass(frozen=True)
class RunResult:
    run_id: str
    model: str  # <name>/<version>
    threshold: float
    runner: str
    ledger: str | None
    counts: Reconciliation
    labelled: LabelMetrics | None
    flagged: list[Flagged]  # the run's top flagged images, highest first (with overlays where drawn)
    heatmaps: HeatmapSummary
    drift: DriftResult
    timings: Timings
    worklist: WorklistSummary = field(default_factory=WorklistSummary)  # worklist.csv's length and first rows
    thumbnails: dict[str, str] = field(default_factory=dict)  # out-of-scope path -> its thumbnail under OUT_DIR
    model_card: str = ""  # the package's model card, copied into OUT_DIR ("" when the package has none)
    package_threshold: float | None = None  # the package's calibrated threshold, where --threshold set another
    trained_on: str = TrainingData().population()  # what the model was trained on, for report.html
    below_floor: str = ""  # the model below the quality floor: what it misses, how it was published (model.py)
    earlier_nights: tuple[EarlierNight, ...] = ()  # the nights whose worklists hold the skipped images to read
    runner_mode: str = ""  # DirectRunner's running mode (runner.for_night may have chosen processes); "" for others

    @property
    def skipped_flagged(self) -> int:
        """Of the images skipped through the ledger: flagged at this run's threshold (counted by earlier night)."""
        return sum(n.flagged for n in self.earlier_nights)

    @property
    def skipped_unscreened(self) -> int:
        """Of the images skipped through the ledger: not screened on an earlier night."""
        return sum(n.unscreened for n in self.earlier_nights)

    @property
    def skipped_to_read(self) -> str:
        """report.md's and report.html's sentence on the skipped images flagged or not screened on earlier nights,
        which are on those nights' worklists, not this one ("" if none); earlier_lines() says which nights."""
        if not (self.skipped_flagged or self.skipped_unscreened):
            return ""
        return (f"Not on this worklist: {self.skipped_flagged} images flagged PNEUMONIA at this threshold and "
                f"{self.skipped_unscreened} not screened on earlier nights, skipped tonight as already in the ledger "
                "(the predictions CSVs list them with status skipped).")

    def earlier_lines(self) -> list[str]:
        """The earlier nights whose worklists hold them, a line each (earlier_nights.lines)."""
        return earlier_nights.lines(self.earlier_nights, self.threshold) if self.skipped_to_read else []

    def threshold_text(self, digits: int = 4) -> str:
        """The run's threshold, and where --threshold set it, that it did and the package's own."""
        shown = f"{self.threshold:.{digits}f}"
        if self.package_threshold is None:
            return shown
        return f"{shown} (set by --threshold; the package's calibrated threshold is {self.package_threshold:.4f})"

    @property
    def positive_count(self) -> int:
        return int(np.sum(self.counts.probabilities >= self.threshold))

    @property
    def positive_rate(self) -> float | None:
        """None when no image was scored: a rate of nothing is undefined (null in metrics.json, n/a in reports)."""
        n = len(self.counts.probabilities)
        return self.positive_count / n if n else None

    @property
    def wall_seconds(self) -> float:
        return self.timings.setup + self.timings.scoring + self.timings.report

    @property
    def images_per_second(self) -> float | None:
        return round(self.counts.found / self.wall_seconds, 2) if self.wall_seconds > 0 else None

    def probability_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, bin edges) of the probabilities over 10 equal bins of [0, 1]."""
        return np.histogram(self.counts.probabilities, bins=10, range=(0.0, 1.0))

    @property
    def overlays_written(self) -> int:
        return sum(bool(f.png) for f in self.flagged)

    def metrics(self) -> dict:
        """metrics.json's content."""
        c, t = self.counts, self.timings
        hist, edges = self.probability_histogram()
        out = {
            "images_found": c.found, "images_scored": c.scored, "images_failed": c.failed,
            "images_skipped": c.skipped, "images_skipped_new_name": c.skipped_new_name,
            "images_skipped_flagged": self.skipped_flagged, "images_skipped_unscreened": self.skipped_unscreened,
            "images_out_of_scope": c.out_of_scope, "images_unscreened": c.unscreened,
            "positive_count": self.positive_count, "positive_rate": self.positive_rate,
            "probability_histogram": {"bin_edges": [round(float(e), 2) for e in edges], "counts": hist.tolist()},
            "per_input": c.per_input, "model": self.model, "threshold": self.threshold, "runner": self.runner,
            "runner_mode": self.runner_mode or None,
            "model_below_quality_floor": self.below_floor or None,  # what it misses, how it was published (export.md)
        }
        if self.package_threshold is not None:
            out["package_threshold"] = self.package_threshold  # --threshold overrode it
        if self.labelled is not None:
            out["labelled_images"] = self.labelled.images
            out.update(self.labelled.scores)
            out["confusion_matrix"] = self.labelled.confusion_matrix
        out["run_id"] = self.run_id
        if self.ledger is not None:
            out["ledger"] = self.ledger
        out["heatmaps"] = {"requested": self.heatmaps.requested, "model_has_heatmaps": self.heatmaps.model_has_heatmaps,
                           "flagged_listed": len(self.flagged), "written": self.overlays_written}
        out["drift"] = self.drift.to_json()
        out["wall_seconds"] = round(self.wall_seconds, 3)
        out["images_per_second"] = self.images_per_second
        out["timings"] = {"setup_seconds": round(t.setup, 3), "scoring_seconds": round(t.scoring, 3),
                          "report_seconds": round(t.report, 3), "heatmaps_seconds": round(t.heatmaps, 3),
                          "scoring_images_per_second": round(c.found / t.scoring, 2) if t.scoring > 0 else None,
                          "drift_seconds": round(t.drift, 3)}
        return out


def label_metrics(counts: Reconciliation, threshold: float, figures: tuple[str, ...] = ()) -> LabelMetrics | None:
    """Metrics against folder labels (scikit-learn) when any scored image has one."""
    from xray_core.metrics import operating_point  # scikit-learn, on first use

    y, p = labelled(counts)
    if not len(y):
        return None
    point = operating_point(y, p, threshold)
    return LabelMetrics(int(len(y)), {k: point[k] for k in SCORE_KEYS}, point["confusion_matrix"], figures)
