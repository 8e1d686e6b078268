"""The input gate's content check: is an image like the X-rays the model was validated on? (no TensorFlow)

The statistic is the Mahalanobis distance of the image's `embedding` to the X-rays the model was trained and
validated on, with scikit-learn's Ledoit-Wolf covariance (well-conditioned in 512 dimensions). Two versions:

* ``mahalanobis_ledoit_wolf_training_split`` (packages from version 6): the mean and covariance are fitted on the
  training split's embeddings (3,651 rows for the shipped model) and stored in the package's ``gate.npz``
  (location and precision, plain arrays); the limit is the PERCENTILE-th percentile of the distances of the
  validation split's rows (reference.npz: held out from both the network's training and this fit) times MARGIN.
  Nearly five times the rows of the validation split alone estimate the covariance's small directions better,
  and those are where a photograph differs from an X-ray (docs/gate.md).
* ``mahalanobis_ledoit_wolf`` (version 5): fitted on the reference rows (the validation split) at scoring time;
  the limit is the PERCENTILE-th percentile of FOLDS-fold held-out reference distances times MARGIN.

From version 8 a layout check rides along (``layout``): the same statistic and limit rule on the model input's
16x16 block means (xray_core/orientation.py's `layout`) instead of the embedding, fitted on the training split's
images, its limit from the validation split's; gate.npz keeps the validation rows so that the limit can be derived
again. From version 9 both splits count each image as it is, mirrored and in the orientation check's tilted and
cropped copies: fitted on the images as they are, it refused 2-14% of site scans tilted by 10-15 degrees (QA).
The embedding places gray photographs (a cat, a stained slide, a cameraman) within half a unit of the content check's
limit; their layout is far from a chest film's, which the embedding of the upright scans barely encodes.

The margin is there because the training collection is not tonight's: scans from another time or machine sit a
little further out without being anything else (a rotated or inverted X-ray, a photograph, a blank export and a
CT slice sit far further: docs/gate.md). No limit is ever fitted on the images it is checked on. A package holds
numbers only (metadata.json `gate`, gate.npz), never a pickled estimator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from xray_core import orientation as orient
from xray_core.files import sha256_file
from xray_core.gate_spec import (  # noqa: F401 - the gate's spec and figures, read as gate.GateSpec ... by its users
    FOLDS,
    LAYOUT_COPIES,
    LAYOUT_FIGURES,
    LAYOUT_METHOD,
    LAYOUT_METHOD_TILTED,
    MARGIN,
    MIN_ROWS,
    PERCENTILE,
    SEED,
    STATISTIC,
    TRAINING_SPLIT,
    GateError,
    GateSpec,
)

FIT_FILE = "gate.npz"
REASON = "not like the chest X-rays the model knows"  # how a refusal by the content check begins
LAYOUT_REASON = "not laid out like the chest X-rays the model knows"  # ... and one by the layout check


@dataclass(frozen=True)
class Gate:
    """A fitted content check: distances of embeddings to the reference, and its limit; the orientation check
    (xray_core/orientation.py) and the layout check (a Gate over the model inputs' block means) where the package has
    them."""

    location: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    limit: float
    orientation: orient.Orientation | None = None
    layout: "Gate | None" = None

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distances (not squared)."""
        d = np.asarray(embeddings, np.float64) - self.location
        # one matrix product (BLAS), then a row-wise dot: a three-operand einsum would loop in numpy instead
        return np.sqrt(np.maximum(np.einsum("nd,nd->n", d @ self.precision, d), 0.0))

    def reasons(self, embeddings: np.ndarray, arrays) -> list[str | None]:
        """Why each image is out of scope (its embedding's distance, then its orientation, then its layout), None
        where it is not; `arrays`: the (S, S, 1) model inputs the embeddings are of."""
        distances = self.distances(embeddings)
        blocks = orient.layout(np.stack(arrays)) if self.orientation is not None or self.layout is not None else None
        turned = self.orientation.probability_of(blocks) if self.orientation is not None else None
        laid = self.layout.distances(blocks) if self.layout is not None else None
        return [self.reason(float(d))
                or (None if turned is None else self.orientation.reason(float(turned[j])))
                or (None if laid is None else past(float(laid[j]), self.layout.limit, LAYOUT_REASON, "layout distance"))
                for j, d in enumerate(distances)]

    def reason(self, distance: float) -> str | None:
        """One line when the embedding's distance is past the limit, else None (:func:`past`)."""
        return past(distance, self.limit, REASON, "distance")


def past(distance: float, limit: float, reason: str, what: str) -> str | None:
    """One line when the distance is past the limit, else None. Both are shown with one decimal, or as many as it
    takes (up to 4) for the distance to read as past the limit."""
    if distance > limit:
        digits = next((d for d in range(1, 4) if round(distance, d) > round(limit, d)), 4)
        return f"{reason} ({what} {distance:.{digits}f} > limit {limit:.{digits}f})"
    return None


def _fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    # The shrunk covariance is positive definite: its plain inverse (LU) equals the pseudo-inverse scikit-learn's
    # store_precision would compute (eigendecomposition), to 1e-11, at a quarter of the cost.
    lw = LedoitWolf(store_precision=False).fit(np.asarray(rows, np.float64))
    return lw.location_, np.linalg.inv(lw.covariance_)


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


def held_out_quantile(fitted: Gate, validation: np.ndarray, percentile: float) -> float:
    """TRAINING_SPLIT: the percentile of the validation rows' distances to the fit (the limit before its margin)."""
    return float(np.percentile(fitted.distances(validation), percentile))


def derive_from_split(training: np.ndarray, validation: np.ndarray, percentile: float = PERCENTILE,
                      margin: float = MARGIN) -> tuple[GateSpec, Gate]:
    """TRAINING_SPLIT: the fit on the training split's embeddings, its limit from the validation split's distances
    (rows the fit never saw) -> (the spec, without its file's name and digest, and the fitted gate)."""
    if len(training) < MIN_ROWS or len(validation) < MIN_ROWS:
        raise GateError(f"the gate needs >= {MIN_ROWS} training and validation rows, got {len(training)} and "
                        f"{len(validation)}")
    location, precision = _fit(training)
    quantile = held_out_quantile(Gate(location, precision, np.inf), validation, percentile)
    spec = GateSpec(TRAINING_SPLIT, quantile * margin, percentile, margin, quantile, 0, int(len(training)), SEED,
                    source="fit: the training split's embeddings; limit: reference.npz (the validation split)",
                    held_out_rows=int(len(validation)))
    return spec, Gate(location, precision, spec.limit)


def derive_layout(training: np.ndarray, validation: np.ndarray, tilted: bool = True) -> tuple[dict, Gate, np.ndarray]:
    """The layout check: derive_from_split on the block means of the (N, S, S, 1) model inputs of the training and
    the validation split, each image as it is, mirrored and in the orientation check's tilted copies (`tilted`;
    version 8: as they are only) -> (its figures, metadata.json's gate `layout`; the fitted check; the validation
    rows its limit comes from, for gate.npz)."""
    def rows(images: np.ndarray, seed: int) -> np.ndarray:
        return orient.layout(orient.upright_variants(images, np.random.default_rng(seed)) if tilted else images)

    validation_rows = rows(validation, SEED + 1)
    spec, fitted = derive_from_split(rows(training, SEED), validation_rows)
    figures = dict(method=LAYOUT_METHOD_TILTED if tilted else LAYOUT_METHOD, limit=spec.limit,
                   percentile=spec.percentile, margin=spec.margin, held_out_quantile=spec.held_out_quantile,
                   rows=spec.rows, held_out_rows=spec.held_out_rows)
    return figures, fitted, validation_rows


def write_fit(path: str, fitted: Gate, layout_validation: np.ndarray | None = None) -> None:
    """gate.npz: the fit's location (D,) and precision (D, D), float64; the orientation check's coefficients
    (GRID * GRID,) and intercept (1,) where there is one; the layout check's location and precision, and the
    validation split's block means its limit comes from (float32), where there is one."""
    turned = {} if fitted.orientation is None else {
        "orientation_coef": fitted.orientation.coef, "orientation_intercept": np.array([fitted.orientation.intercept])}
    laid = {} if fitted.layout is None else {
        "layout_location": fitted.layout.location, "layout_precision": fitted.layout.precision,
        "layout_validation": np.asarray(layout_validation, np.float32)}
    np.savez(path, location=fitted.location, precision=fitted.precision, **turned, **laid)


def read_layout_validation(path: str) -> np.ndarray:
    """gate.npz's validation block means (N, GRID * GRID), float64, N >= MIN_ROWS and finite: what `export --verify`
    derives the layout limit from again."""
    try:
        with np.load(path, allow_pickle=False) as z:
            rows = np.asarray(z["layout_validation"], np.float64)
    except Exception as exc:  # noqa: BLE001 - as read_fit
        raise GateError(f"{os.path.basename(path)} is unreadable: {type(exc).__name__}") from None
    if rows.ndim != 2 or rows.shape[1] != orient.GRID ** 2 or len(rows) < MIN_ROWS or not np.isfinite(rows).all():
        raise GateError(f"{os.path.basename(path)} is malformed: layout validation rows {rows.shape}")
    return rows


def read_fit(path: str, limit: float, orientation: bool = False, layout_limit: float | None = None) -> Gate:
    """gate.npz -> the fitted gate, with its orientation check when `orientation` and its layout check when
    `layout_limit` is given; GateError (one line) when it is missing, unreadable or malformed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            location, precision = np.asarray(z["location"], np.float64), np.asarray(z["precision"], np.float64)
            coef, intercept = ((np.asarray(z["orientation_coef"], np.float64),
                                np.asarray(z["orientation_intercept"], np.float64)) if orientation else (None, None))
            laid = None if layout_limit is None else (np.asarray(z["layout_location"], np.float64),
                                                      np.asarray(z["layout_precision"], np.float64))
            unrecorded = [check for check, key, recorded in (("an orientation", "orientation_coef", orientation),
                                                             ("a layout", "layout_location", layout_limit is not None))
                          if not recorded and key in z.files]
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not an npz, a key missing, pickled arrays
        raise GateError(f"{os.path.basename(path)} is unreadable: {type(exc).__name__}") from None
    cells = orient.GRID ** 2
    if laid is not None and (laid[0].shape != (cells,) or laid[1].shape != (cells, cells)
                             or not (np.isfinite(laid[0]).all() and np.isfinite(laid[1]).all())):
        raise GateError(f"{os.path.basename(path)} is malformed: layout {laid[0].shape}, {laid[1].shape}")
    layout = None if laid is None else Gate(laid[0], laid[1], float(layout_limit))
    d = len(location) if location.ndim == 1 else -1
    if d < 1 or precision.shape != (d, d) or not (np.isfinite(location).all() and np.isfinite(precision).all()):
        raise GateError(f"{os.path.basename(path)} is malformed: location {location.shape}, precision "
                        f"{precision.shape}")
    if unrecorded:  # metadata.json edited so that a check is off: its file says it had one
        raise GateError(f"{os.path.basename(path)} holds {unrecorded[0]} check that metadata.json does not record")
    if not orientation:
        return Gate(location, precision, float(limit), layout=layout)
    if coef.shape != (cells,) or intercept.shape != (1,) or not np.isfinite(coef).all() \
            or not np.isfinite(intercept).all():
        raise GateError(f"{os.path.basename(path)} is malformed: orientation {coef.shape}, {intercept.shape}")
    return Gate(location, precision, float(limit), orient.Orientation(coef, float(intercept[0])), layout)


def package_gate(spec: GateSpec, package_dir: str, reference_rows=None) -> Gate:
    """The fitted content check of the package in package_dir: read from its gate.npz (TRAINING_SPLIT) or fitted
    on its reference rows (`reference_rows()`, called only then)."""
    if spec.statistic == TRAINING_SPLIT:
        path = os.path.join(package_dir, spec.file)
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise GateError(f"{spec.file} is unreadable: {exc.strerror}") from None
        if digest != spec.sha256:
            raise GateError(f"{spec.file} sha256 != metadata {spec.sha256[:16]}… (not the file its package recorded)")
        return read_fit(path, spec.limit, orientation=spec.orientation is not None,
                        layout_limit=float(spec.layout["limit"]) if spec.layout else None)
    return fit(reference_rows(), spec.limit)
