"""The input gate's content check: is an image like the X-rays the model was validated on? (no TensorFlow)

The statistic is the Mahalanobis distance of the image's `embedding` to the package's reference rows
(reference.npz: the validation split's embeddings), with scikit-learn's Ledoit-Wolf covariance, which stays
well-conditioned with fewer rows than twice the dimension.

The limit comes from the training side alone, from the same reference rows: each row's distance to a fit on the
other folds (FOLDS-fold, seeded) is a held-out, in-distribution distance; the limit is their PERCENTILE-th
percentile times MARGIN. The margin is there because the reference is the training collection: scans from
another time or machine sit a little further out without being anything else (a rotated or inverted X-ray, a
photograph, a blank export and a CT slice sit far further: docs/gate.md). No limit is ever fitted on the images
it is checked on.

At scoring time the covariance is fitted again on all reference rows (deterministic, milliseconds), so a package
holds only numbers in metadata.json (`gate`) and no pickled estimator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

STATISTIC = "mahalanobis_ledoit_wolf"
PERCENTILE = 99.5
MARGIN = 1.2
FOLDS = 5
SEED = 0
MIN_ROWS = 50  # fewer reference rows give no usable covariance or percentile


class GateError(ValueError):
    """The gate cannot be derived or used; the message is one line."""


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

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.statistic} limit {self.limit:.1f} = the {self.percentile}th percentile of {self.rows} "
                f"held-out reference distances ({self.held_out_quantile:.1f}) x margin {self.margin}")

    @classmethod
    def from_dict(cls, data: dict) -> "GateSpec":
        try:
            spec = cls(**data)
        except TypeError as exc:
            raise GateError(f"metadata gate is malformed: {exc}") from None
        if spec.statistic != STATISTIC or not np.isfinite(spec.limit) or spec.limit <= 0:
            raise GateError(f"metadata gate is unusable: statistic {spec.statistic!r}, limit {spec.limit!r}")
        return spec


@dataclass(frozen=True)
class Gate:
    """A fitted content check: distances of embeddings to the reference, and its limit."""

    location: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    limit: float

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distances (not squared)."""
        d = np.asarray(embeddings, np.float64) - self.location
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0.0))

    def reason(self, distance: float) -> str | None:
        """One line when the distance is past the limit, else None."""
        if distance > self.limit:
            return f"not like the chest X-rays the model knows (distance {distance:.0f} > limit {self.limit:.0f})"
        return None


def _fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(np.asarray(rows, np.float64))
    return lw.location_, lw.precision_


def fit(embeddings: np.ndarray, limit: float) -> Gate:
    """The gate of a package: its reference rows and its metadata's limit."""
    if len(embeddings) < MIN_ROWS:
        raise GateError(f"the reference has {len(embeddings)} embedding rows; the gate needs >= {MIN_ROWS}")
    location, precision = _fit(embeddings)
    return Gate(location, precision, float(limit))


def held_out_distances(embeddings: np.ndarray, folds: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """Each row's distance to the Ledoit-Wolf fit on the other folds (seeded fold assignment)."""
    from sklearn.model_selection import KFold

    rows = np.asarray(embeddings, np.float64)
    out = np.empty(len(rows))
    for fit_idx, held_idx in KFold(folds, shuffle=True, random_state=seed).split(rows):
        location, precision = _fit(rows[fit_idx])
        out[held_idx] = Gate(location, precision, np.inf).distances(rows[held_idx])
    return out


def derive(embeddings: np.ndarray, percentile: float = PERCENTILE, margin: float = MARGIN) -> GateSpec:
    """The gate's spec from a package's reference rows alone."""
    if len(embeddings) < MIN_ROWS:
        raise GateError(f"the reference has {len(embeddings)} embedding rows; the gate needs >= {MIN_ROWS}")
    quantile = float(np.percentile(held_out_distances(embeddings), percentile))
    return GateSpec(STATISTIC, quantile * margin, percentile, margin, quantile, FOLDS, int(len(embeddings)), SEED)
