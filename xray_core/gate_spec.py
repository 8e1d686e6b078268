"""metadata.json's `gate`: the input gate's statistic, limits and how they were derived, checked as it is read (no
TensorFlow). The figures must be what the derivation in xray_core/gate.py gives: the fixed percentile and margin,
the limit their product with the held-out quantile, the layout check's rows those of the content check's images
(times the copies its method names), so that a limit loosened by hand, with a margin edited to match, is refused
here and not only by `export --verify`'s re-derivation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from xray_core import orientation as orient

STATISTIC = "mahalanobis_ledoit_wolf"  # version 5: fitted on the reference rows, k-fold limit
TRAINING_SPLIT = "mahalanobis_ledoit_wolf_training_split"  # fitted on the training split, limit from validation
PERCENTILE = 99.5
MARGIN = 1.2
FOLDS = 5
SEED = 0
MIN_ROWS = 50  # fewer reference rows give no usable covariance or percentile
LAYOUT_FIGURES = ("method", "limit", "percentile", "margin", "held_out_quantile", "rows", "held_out_rows")
# The methods as published, word for word (literals: a package's method names what its rows are, whatever the
# orientation check's constants become later) and the rows each counts per image.
LAYOUT_METHOD = ("Mahalanobis distance (Ledoit-Wolf) of the model input's 16x16 block means to the training "
                 "split's")  # version 8: the images as they are
LAYOUT_METHOD_TILTED = ("Mahalanobis distance (Ledoit-Wolf) of the model input's 16x16 block means, each image as it "
                        "is, mirrored and in 3 tilted copies (the orientation check's: turned by up to 20 degrees, "
                        "cropped to 80%-100%), to the training split's")  # from version 9: orientation.upright_variants
LAYOUT_COPIES = {LAYOUT_METHOD: 1, LAYOUT_METHOD_TILTED: 5}


class GateError(ValueError):
    """The gate cannot be derived or used; the message is one line."""


def _number(value) -> bool:
    """A finite real number as JSON gives one (not a string, not a boolean, not an integer past a float's range)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # review: 10**400 crashed --verify
        return False


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= MIN_ROWS


def _derived(limit, percentile, margin, quantile) -> bool:
    """The figures the derivation gives: real numbers, the fixed percentile and margin, limit = quantile x margin."""
    return (all(_number(x) for x in (limit, percentile, margin, quantile)) and limit > 0
            and percentile == PERCENTILE and margin == MARGIN and math.isclose(limit, quantile * margin, rel_tol=1e-9))


@dataclass(frozen=True)
class GateSpec:
    """metadata.json's `gate`: the statistic, the limit, and how the limit was derived."""

    statistic: str
    limit: float
    percentile: float
    margin: float
    held_out_quantile: float  # the PERCENTILE-th percentile of the held-out distances, before the margin
    folds: int
    rows: int
    seed: int
    source: str = "reference.npz embeddings (the training run's validation split)"
    file: str = ""  # TRAINING_SPLIT: the fit's file in the package, and its sha256
    sha256: str = ""
    held_out_rows: int = 0  # TRAINING_SPLIT: the validation rows whose distances give the limit
    # TRAINING_SPLIT from 2026-12-02: the orientation check's figures (None: no check); compared but not hashed (a
    # dict), so a spec with the check and one without are two keys of a cache keyed by the spec (batch_job/scoring.py)
    orientation: dict | None = field(default=None, hash=False)
    layout: dict | None = field(default=None, hash=False)  # TRAINING_SPLIT from version 8: LAYOUT_FIGURES

    def to_dict(self) -> dict:
        """metadata.json's `gate`; without `orientation` or `layout` where there is no such check (as before they
        existed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("orientation", "layout") or v is not None}

    def layout_copies(self) -> int:
        """The layout check's rows per image (1: the images as they are; from version 9 also their copies)."""
        return LAYOUT_COPIES[self.layout["method"]]

    def line(self) -> str:
        if self.statistic == TRAINING_SPLIT:
            turned = "" if not self.orientation else (
                f"; upside down when P > {self.orientation['limit']} (held out: refuses "
                f"{self.orientation['held_out_upside_down_refused']:.1%} of scans turned 180 degrees or flipped top to "
                f"bottom, {self.orientation['held_out_upright_refused']:.1%} of upright ones)")
            copies = "" if not self.layout or self.layout_copies() == 1 else ", each image with its tilted copies"
            laid = "" if not self.layout else (
                f"; layout limit {self.layout['limit']:.1f} = the same rule on the {orient.GRID}x{orient.GRID} block "
                f"means{copies} ({self.layout['held_out_quantile']:.1f} x {self.layout['margin']})")
            return (f"{self.statistic} limit {self.limit:.1f} = the {self.percentile}th percentile of the distances "
                    f"of {self.held_out_rows} validation rows ({self.held_out_quantile:.1f}) to the fit on "
                    f"{self.rows} training rows x margin {self.margin}{turned}{laid}")
        return (f"{self.statistic} limit {self.limit:.1f} = the {self.percentile}th percentile of {self.rows} "
                f"held-out reference distances ({self.held_out_quantile:.1f}) x margin {self.margin}")

    @classmethod
    def from_dict(cls, data: dict) -> "GateSpec":
        try:
            spec = cls(**data)
        except TypeError as exc:
            raise GateError(f"metadata gate is malformed: {exc}") from None
        try:  # a figure of a type no check above foresaw is malformed too, never a traceback (review)
            problem = spec._problem()
            turned = spec.orientation is None or (set(spec.orientation) == set(orient.FIGURES)
                                                  and spec.orientation["limit"] == orient.LIMIT
                                                  and orient.usable(spec.orientation))
        except (TypeError, ValueError, OverflowError) as exc:
            raise GateError(f"metadata gate is malformed: {type(exc).__name__}: {str(exc)[:200]}") from None
        if problem:
            raise GateError(f"metadata gate is malformed: {problem}")
        if not turned:
            raise GateError(f"metadata gate orientation is unusable: {spec.orientation!r:.200} (its limit must be "
                            f"{orient.LIMIT}, its held-out figures within the gate's targets)")
        if spec.statistic not in (STATISTIC, TRAINING_SPLIT) \
                or (spec.statistic != TRAINING_SPLIT and (spec.orientation is not None or spec.layout is not None)) \
                or (spec.statistic == TRAINING_SPLIT and not spec.file):
            raise GateError(f"metadata gate is unusable: statistic {spec.statistic!r}, limit {spec.limit!r}")
        return spec

    def _problem(self) -> str:
        """What is wrong with the figures as recorded, "" when nothing."""
        if not _derived(self.limit, self.percentile, self.margin, self.held_out_quantile) or not _count(self.rows) \
                or (self.statistic == TRAINING_SPLIT and not _count(self.held_out_rows)):
            return (f"limit {self.limit!r} must be the held-out quantile times margin {MARGIN} at percentile "
                    f"{PERCENTILE}, from >= {MIN_ROWS} rows")
        if not all(isinstance(x, str) for x in (self.file, self.sha256, self.source)):
            return "file, sha256 and source must be strings"
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (self.folds, self.seed)):
            return f"folds {self.folds!r} and seed {self.seed!r} must be whole numbers"
        if self.orientation is not None and not isinstance(self.orientation, dict):
            return "orientation must be an object"
        if self.layout is None:
            return ""
        lo = self.layout
        if not isinstance(lo, dict) or set(lo) != set(LAYOUT_FIGURES) or not isinstance(lo["method"], str) \
                or lo["method"] not in LAYOUT_COPIES \
                or not _derived(lo["limit"], lo["percentile"], lo["margin"], lo["held_out_quantile"]):
            return (f"layout must hold {', '.join(LAYOUT_FIGURES)} (a known method, the limit its held-out quantile "
                    f"times margin {MARGIN} at percentile {PERCENTILE})")
        copies = LAYOUT_COPIES[lo["method"]]
        if not (_count(lo["rows"]) and _count(lo["held_out_rows"])) or lo["rows"] != self.rows * copies \
                or lo["held_out_rows"] != self.held_out_rows * copies:
            return (f"layout rows {lo['rows']!r} and {lo['held_out_rows']!r} must be the gate's {self.rows} and "
                    f"{self.held_out_rows} times {copies}")
        return ""
