"""Label-free drift statistics: is tonight's folder what the model was validated on?

Pure functions on arrays (scikit-learn and scipy, imported on first use, + numpy). The reference is the model package's
`reference.npz` (the validation split's probabilities and a sample of its embeddings, xray_core/reference.py); the
run's side is every probability scored in this run and a seeded sample of its embeddings (drift_check.py). Two
figures, each with a documented default limit:

* **domain-classifier ROC AUC** of the pooled embeddings: projected on the COMPONENTS principal components of
  both sides' rows together (no labels used), a Gaussian naive Bayes classifier tries to tell the run's images from
  the reference's (stratified k-fold, out-of-fold probabilities). 0.5 means it cannot. Its work is fixed by
  construction whatever the data: at most MAX_ROWS rows a side, an exact PCA (the top COMPONENTS eigenvectors of the
  D x D covariance matrix, scipy's eigh), and a classifier fitted in closed form (a mean and a variance per class and
  component: no iterations). It treats the components as independent within each side, which they need not be
  (they are only uncorrelated over the pooled rows); the AUC is judged against its own null distribution, so that
  can cost power, not false alarms. It sees a change in a component's spread as well as in its mean.
  The default limit 0.60 comes from the statistic's own null distribution (:func:`null_aucs`: the reference's
  rows against held-out reference rows) and lies about four of its standard deviations above its mean on version
  4's reference, six on version 6's (docs/drift.md).
* **PSI** (population stability index) of the probability histogram over 10 equal-width bins of [0, 1]. The usual
  line for a significant shift, 0.2, assumes a large sample: a run of 100 images drawn from the reference itself
  crosses it about one time in four (QA: a night of 132 ordinary scans read 0.212, one empty bin adding 0.133). So
  the default limit is the larger of 0.2 and the PSI's own null distribution at this run's size (:func:`psi_null_limit`:
  the PSI that 99.9% of runs of as many images, drawn with the reference, stay under), unless a limit is given.

The positive rate is reported beside them: a change in prevalence alone also moves both figures (where the
embeddings separate the classes well, the domain AUC of a pure case-mix change is about 0.5 + |Δ rate| / 2).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Rows a side the domain classifier sees at most (a seeded sample): its cost stays bounded however large the run. The
# AUC's standard error with 782 reference rows is 0.014 at 1,000 run rows against 0.012 at 2,000, far inside the
# 0.1 between the null distribution's mean and the limit.
MAX_ROWS = 1000

DOMAIN_AUC_LIMIT = 0.60
COMPONENTS = 32  # principal components the classifier sees (docs/drift.md: why 32)
PSI_LIMIT = 0.20  # the usual line for a significant shift: the default limit's floor
PSI_NULL_QUANTILE = 0.999  # the default limit: a false alarm on about one night in 1,000 where nothing changed
PSI_NULL_DRAWS = 10_000  # simulated runs a side: a fixed ~35 ms, whatever the run's size
MIN_IMAGES = 100
BINS = 10
_EPS = 1e-4  # floor for an empty bin's share (PSI's log would be infinite)


def histogram_shares(probs: np.ndarray, bins: int = BINS) -> np.ndarray:
    counts, _ = np.histogram(np.clip(probs, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return counts / max(counts.sum(), 1)


def psi(reference_shares: np.ndarray, shares: np.ndarray) -> float | np.ndarray:
    """sum((p - q) * ln(p / q)) over bins (the last axis), empty bins floored at 1e-4."""
    p = np.maximum(np.asarray(shares, float), _EPS)
    q = np.maximum(np.asarray(reference_shares, float), _EPS)
    out = np.sum((p - q) * np.log(p / q), axis=-1)
    return float(out) if out.ndim == 0 else out


def psi_null_limit(reference_probs: np.ndarray, images: int, quantile: float = PSI_NULL_QUANTILE,
                   draws: int = PSI_NULL_DRAWS, seed: int = 0) -> float:
    """The PSI that `quantile` of runs of `images` images stay under when nothing changed: `draws` seeded pairs of a
    reference of the reference's size and a run of `images`, both drawn from the reference's histogram (so the
    reference's own sampling noise counts too). Large for small runs (an empty bin alone adds ~0.13), small for
    large ones."""
    shares = histogram_shares(np.asarray(reference_probs, np.float64))
    rng = np.random.default_rng(seed)
    size = len(reference_probs)
    null = psi(rng.multinomial(size, shares, size=draws) / size,
               rng.multinomial(images, shares, size=draws) / images)
    return float(np.quantile(null, quantile))


def psi_limit_for(reference_probs: np.ndarray, images: int, given: float | None = None) -> float:
    """A run's PSI limit: `given` (--drift-psi-limit) as it is, else the larger of PSI_LIMIT and the null limit at
    this run's size."""
    return given if given is not None else max(PSI_LIMIT, psi_null_limit(reference_probs, images))


def sample_rows(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` rows of x, drawn without replacement (all of them when fewer)."""
    return x if len(x) <= limit else x[np.sort(rng.choice(len(x), size=limit, replace=False))]


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """x centred and projected on its k principal components (the top k eigenvectors of its covariance matrix): an
    exact PCA whose work, O(rows * D^2 + D^3), does not depend on the data. (scikit-learn's PCA computes the same with
    svd_solver="covariance_eigh", but importing sklearn.decomposition costs the job 0.09 s, a third of the step.)"""
    from scipy.linalg import eigh

    centred = x - x.mean(axis=0)
    d = x.shape[1]
    _, vectors = eigh(centred.T @ centred, subset_by_index=[d - k, d - 1])  # ascending: the largest k
    return centred @ vectors[:, ::-1]


def domain_auc(reference: np.ndarray, current: np.ndarray, folds: int = 5, seed: int = 0,
               max_rows: int = MAX_ROWS, components: int = COMPONENTS) -> float:
    """Out-of-fold ROC AUC of a classifier telling `current` embeddings from `reference` ones, on their principal
    components; at most max_rows a side."""
    import sklearn
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.naive_bayes import GaussianNB

    rng = np.random.default_rng(seed)
    a, b = sample_rows(reference, max_rows, rng), sample_rows(current, max_rows, rng)
    a, b = a.astype(np.float64), b.astype(np.float64)
    x = np.concatenate([a, b])  # components of both sides together (no labels): neither side's noise is favoured
    y = np.concatenate([np.zeros(len(a), int), np.ones(len(b), int)])
    x = principal_components(x, min(components, len(x) - 1, x.shape[1]))
    if not np.ptp(x, axis=0).any():  # every row the same: nothing tells the sides apart (and no variance to fit)
        return 0.5
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # The rows are finite (drift_figures drops the rest) and the parameters fixed: scikit-learn's checks of both,
    # repeated for every fold's estimator, are skipped.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        p = cross_val_predict(GaussianNB(), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def null_aucs(reference: np.ndarray, splits: int = 20, seed: int = 0) -> np.ndarray:
    """The domain AUC's null distribution on a reference: one random half of its rows against the other half,
    `splits` seeded times (how high the statistic goes when nothing has changed)."""
    rng = np.random.default_rng(seed)
    half = len(reference) // 2
    out = []
    for i in range(splits):
        order = rng.permutation(len(reference))
        out.append(domain_auc(reference[order[:half]], reference[order[half:2 * half]], seed=i))
    return np.asarray(out)


NO_REFERENCE, TOO_FEW, TOO_FEW_REFERENCE, FAILED, JUDGED = "no_reference", "too_few", "too_few_reference", "failed", \
    "judged"
NOTES = {NO_REFERENCE: "no drift reference", TOO_FEW: "too few images to judge",
         TOO_FEW_REFERENCE: "the model's reference is too small to judge"}


@dataclass(frozen=True)
class DriftResult:
    """The run's drift check. `state`: JUDGED (figures against limits), or why not: NO_REFERENCE (the package
    has none), TOO_FEW (images scored in this run), TOO_FEW_REFERENCE, FAILED (`note` says why)."""

    state: str
    images: int  # probabilities scored in this run
    domain_auc_limit: float
    psi_limit: float  # this run's: given, or by its size (psi_limit_sized); PSI_LIMIT for a run not judged, given none
    psi_limit_sized: bool = False  # only for a judged run
    detected: bool = False
    domain_auc: float | None = None
    psi: float | None = None
    sampled: int | None = None  # embeddings of this run used (None: no reference)
    reference_images: int | None = None
    reference_sampled: int | None = None
    positive_rate: float | None = None
    reference_positive_rate: float | None = None
    seed: int | None = None
    histogram: dict | None = None  # bin_edges, shares, reference_shares
    note: str = ""  # why it was not judged, for FAILED
    figures: tuple[str, ...] = ()  # the drift figures written into OUT_DIR (drift_report.py)

    @property
    def reference(self) -> bool:
        return self.state != NO_REFERENCE

    @property
    def judged(self) -> bool:
        return self.state == JUDGED

    def to_json(self) -> dict:
        """metrics.json's `drift` block."""
        out = {"reference": self.reference, "images": self.images}
        if self.histogram is not None:
            out.update(sampled=self.sampled, reference_images=self.reference_images,
                       reference_sampled=self.reference_sampled, positive_rate=self.positive_rate,
                       reference_positive_rate=self.reference_positive_rate)
        out.update(domain_auc_limit=self.domain_auc_limit, psi_limit=self.psi_limit,
                   psi_limit_sized=self.psi_limit_sized)
        if self.histogram is not None:
            out.update(seed=self.seed, histogram=self.histogram)
        if self.state in (TOO_FEW, TOO_FEW_REFERENCE):  # the key order metrics.json has always had
            out.update(detected=self.detected, judged=self.judged)
        else:
            out.update(judged=self.judged)
            if self.judged:
                out.update(domain_auc=self.domain_auc, psi=self.psi)
            out.update(detected=self.detected)
        if not self.judged:
            out.update(note=self.note or NOTES[self.state])
        out.update(figures=list(self.figures))
        return out


def drift_figures(reference_embeddings: np.ndarray, reference_probs: np.ndarray, embeddings: np.ndarray,
                  probs: np.ndarray, threshold: float, auc_limit: float = DOMAIN_AUC_LIMIT,
                  psi_limit: float | None = None, seed: int = 0) -> DriftResult:
    """The drift check: `probs` are every probability scored in this run, `embeddings` a sample of their
    embeddings (at most MAX_ROWS are used); rows that are not finite are left out. `psi_limit` None: the default
    (:func:`psi_limit_for`, by this run's size)."""
    probs = np.asarray(probs, np.float64)
    probs = probs[np.isfinite(probs)]
    embeddings = embeddings[np.isfinite(embeddings).all(axis=1)] if len(embeddings) else embeddings
    base = DriftResult(
        JUDGED, int(len(probs)), auc_limit, PSI_LIMIT if psi_limit is None else psi_limit,
        sampled=int(min(len(embeddings), MAX_ROWS)),
        reference_images=int(len(reference_probs)), reference_sampled=int(min(len(reference_embeddings), MAX_ROWS)),
        positive_rate=float(np.mean(probs >= threshold)) if len(probs) else None,
        reference_positive_rate=float(np.mean(reference_probs >= threshold)), seed=seed,
        histogram={"bin_edges": np.linspace(0.0, 1.0, BINS + 1).round(2).tolist(),
                   "shares": histogram_shares(probs).round(6).tolist(),
                   "reference_shares": histogram_shares(reference_probs).round(6).tolist()})
    if len(probs) < MIN_IMAGES or len(embeddings) < MIN_IMAGES:
        return replace(base, state=TOO_FEW)
    if len(reference_probs) < MIN_IMAGES or len(reference_embeddings) < MIN_IMAGES:
        return replace(base, state=TOO_FEW_REFERENCE)
    auc = domain_auc(reference_embeddings, embeddings, seed=seed)
    shift = psi(histogram_shares(reference_probs), histogram_shares(probs))
    limit = psi_limit_for(reference_probs, len(probs), psi_limit)
    return replace(base, domain_auc=auc, psi=shift, psi_limit=limit, psi_limit_sized=psi_limit is None,
                   detected=bool(auc > auc_limit or shift > limit))


def no_reference(images: int, auc_limit: float = DOMAIN_AUC_LIMIT, psi_limit: float | None = None) -> DriftResult:
    """The check of a model package without reference.npz (exported before drift checks)."""
    return DriftResult(NO_REFERENCE, int(images), auc_limit, PSI_LIMIT if psi_limit is None else psi_limit)


def failed(images: int, auc_limit: float, psi_limit: float | None, reason: str) -> DriftResult:
    """A check that raised: said so, not judged (the night's scores are published all the same)."""
    return DriftResult(FAILED, int(images), auc_limit, PSI_LIMIT if psi_limit is None else psi_limit,
                       note=f"check failed ({reason})")


def summary_line(drift: DriftResult) -> str:
    """The job's drift line: `drift: none (...)`, `drift: DETECTED (...)`, or why it was not judged."""
    if drift.state == NO_REFERENCE:
        return "drift: not checked, the model has no drift reference (exported before drift checks)"
    if drift.state == TOO_FEW_REFERENCE:
        rows = min(drift.reference_images, drift.reference_sampled)
        return f"drift: {NOTES[drift.state]} ({rows} reference images, need {MIN_IMAGES})"
    if drift.state == TOO_FEW:
        return f"drift: {NOTES[drift.state]} ({drift.images} scored in this run, need {MIN_IMAGES})"
    if drift.state == FAILED:
        return f"drift: not judged, {drift.note}"
    figures = (f"domain AUC {drift.domain_auc:.3f} (limit {drift.domain_auc_limit:.2f}), PSI {drift.psi:.3f} "
               f"(limit {drift.psi_limit:.2f}), positive rate {drift.positive_rate:.3f} vs "
               f"{drift.reference_positive_rate:.3f}")
    return f"drift: DETECTED ({figures})" if drift.detected else f"drift: none ({figures})"
