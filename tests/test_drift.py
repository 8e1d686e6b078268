"""batch_job.drift on synthetic embeddings and probabilities."""
from __future__ import annotations

import os

import numpy as np
import pytest

from batch_job.drift import (
    COMPONENTS,
    DOMAIN_AUC_LIMIT,
    MIN_IMAGES,
    PSI_LIMIT,
    domain_auc,
    drift_figures,
    failed,
    histogram_shares,
    no_reference,
    null_aucs,
    psi,
    psi_limit_for,
    psi_null_limit,
    sample_rows,
    summary_line,
)

D = 32


def _embeddings(n, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n, D))
    x[:, :4] += shift  # a shift in a few feature directions, as a new scanner would cause
    return x


def _probs(n, positive_share=0.6, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.random(n) < positive_share
    return np.where(pos, rng.beta(8, 1.5, n), rng.beta(1.5, 8, n))


def test_psi_of_identical_histograms_is_zero_and_grows_with_the_shift():
    ref = histogram_shares(_probs(5000))
    assert psi(ref, ref) == 0.0
    assert psi(ref, histogram_shares(_probs(5000, seed=1))) < 0.02  # another sample, same distribution
    small, large = (psi(ref, histogram_shares(_probs(5000, share, seed=2))) for share in (0.7, 0.9))
    assert 0.02 < small < large


def test_psi_by_hand():
    # two bins: 0.5/0.5 against 0.8/0.2 -> 0.3 ln(1.6) + (-0.3) ln(0.4)
    assert psi(np.array([0.5, 0.5]), np.array([0.8, 0.2])) == pytest.approx(0.3 * np.log(1.6) - 0.3 * np.log(0.4))
    # an empty bin is floored, not infinite
    assert np.isfinite(psi(np.array([1.0, 0.0]), np.array([0.5, 0.5])))


def test_psis_default_limit_holds_small_runs_of_an_unchanged_distribution_to_one_false_alarm_in_a_thousand():
    """QA (2026-12-02): nights of 100-200 ordinary scans crossed the fixed 0.20 (one empty bin adds ~0.13). Fresh
    references and runs drawn from one distribution: the fixed line is crossed often at 100-150 images, the limit by
    the run's size about as rarely as its quantile says."""
    rng = np.random.default_rng(7)

    def draw(n):
        pos = rng.random(n) < 0.68
        return np.where(pos, rng.beta(6, 1.2, n), rng.beta(1.2, 6, n))

    reference = draw(782)
    for n, fixed_rate in ((100, 0.10), (150, 0.015)):
        limit = psi_limit_for(reference, n)
        trials = np.asarray([psi(histogram_shares(draw(782)), histogram_shares(draw(n))) for _ in range(2000)])
        assert np.mean(trials > PSI_LIMIT) > fixed_rate  # the fixed line: 16% and 2.6% of unchanged nights
        assert np.mean(trials > limit) < 0.004  # 0.001 by construction (measured: 0.001 at both sizes)


def test_psis_default_limit_falls_with_the_runs_size_to_the_usual_line_and_a_given_limit_stays():
    reference = _probs(782)
    limits = [psi_limit_for(reference, n) for n in (100, 200, 400, 5000)]
    assert limits[0] > limits[1] > PSI_LIMIT and limits[-1] == PSI_LIMIT
    assert psi_null_limit(reference, 150) == psi_null_limit(reference, 150)  # seeded: the same night, the same limit
    assert psi_limit_for(reference, 100, given=0.2) == 0.2 and psi_limit_for(reference, 5000, given=0.05) == 0.05


def test_a_small_run_is_judged_against_its_sized_limit_and_a_real_shift_still_shows():
    ref_e, ref_p = _embeddings(800), _probs(800)
    rng = np.random.default_rng(3)
    # 120 images of the reference's distribution with its 0.4-0.6 bins left empty: PSI over 0.20 by noise alone
    pool = _probs(4000, seed=5)
    quiet = rng.choice(pool[(pool < 0.4) | (pool >= 0.6)], 120, replace=False)
    sized = drift_figures(ref_e, ref_p, _embeddings(120, seed=4), quiet, threshold=0.5)
    fixed = drift_figures(ref_e, ref_p, _embeddings(120, seed=4), quiet, threshold=0.5, psi_limit=PSI_LIMIT)
    assert fixed.psi == sized.psi > PSI_LIMIT and fixed.detected and fixed.psi_limit == PSI_LIMIT
    assert not sized.detected and sized.psi_limit > sized.psi and sized.psi_limit_sized and not fixed.psi_limit_sized
    few = drift_figures(ref_e, ref_p, _embeddings(50, seed=4), quiet[:50], threshold=0.5)
    assert (few.state, few.psi_limit, few.psi_limit_sized) == ("too_few", PSI_LIMIT, False)  # no limit applied
    fewer = drift_figures(ref_e, ref_p, _embeddings(120, seed=4), _probs(120, positive_share=0.1, seed=6), 0.5)
    assert fewer.detected and fewer.psi > fewer.psi_limit > PSI_LIMIT


def test_domain_auc_tells_no_drift_from_a_shifted_mean():
    ref = _embeddings(600, seed=0)
    same = domain_auc(ref, _embeddings(300, seed=1))
    shifted = domain_auc(ref, _embeddings(300, shift=0.5, seed=1))
    assert 0.40 < same < DOMAIN_AUC_LIMIT
    # 0.5 SD in 4 directions: Mahalanobis distance 1.0, so the best possible AUC is Phi(1 / sqrt 2) = 0.76
    assert DOMAIN_AUC_LIMIT < 0.65 < shifted <= 0.77


def test_domain_auc_is_seeded_and_bounded():
    ref, cur = _embeddings(3000, seed=0), _embeddings(2500, shift=0.2, seed=1)
    assert domain_auc(ref, cur, seed=3, max_rows=500) == domain_auc(ref, cur, seed=3, max_rows=500)
    rng = np.random.default_rng(0)
    assert len(sample_rows(cur, 500, rng)) == 500 and len(sample_rows(cur[:10], 500, rng)) == 10
    # the classifier sees exactly max_rows a side: the seeded draw, then nothing more
    rng = np.random.default_rng(3)
    drawn = sample_rows(ref, 500, rng), sample_rows(cur, 500, rng)
    assert domain_auc(*drawn, seed=3, max_rows=500) == domain_auc(ref, cur, seed=3, max_rows=500)
    assert domain_auc(ref, cur, seed=3, max_rows=500) != domain_auc(ref, cur, seed=3, max_rows=600)


def test_drift_figures_and_summary_lines():
    ref_e, ref_p = _embeddings(600), _probs(600)
    none = drift_figures(ref_e, ref_p, _embeddings(300, seed=1), _probs(300, seed=1), threshold=0.5)
    assert none.judged and not none.detected
    assert summary_line(none).startswith("drift: none (domain AUC ")
    found = drift_figures(ref_e, ref_p, _embeddings(300, shift=0.8, seed=1), _probs(300, seed=1), threshold=0.5)
    assert found.detected and found.domain_auc > found.domain_auc_limit
    assert summary_line(found).startswith("drift: DETECTED (")
    # a prevalence change alone moves PSI: the positive rate is reported beside it
    prevalence = drift_figures(ref_e, ref_p, _embeddings(300, seed=1), _probs(300, 0.95, seed=1), threshold=0.5)
    assert prevalence.psi > prevalence.psi_limit and prevalence.positive_rate > 0.9
    assert abs(prevalence.reference_positive_rate - 0.6) < 0.06


def test_too_few_images_to_judge():
    few = drift_figures(_embeddings(600), _probs(600), _embeddings(MIN_IMAGES - 1, shift=3.0),
                        _probs(MIN_IMAGES - 1), threshold=0.5)
    assert few.judged is False and few.detected is False and few.domain_auc is None
    assert summary_line(few) == (f"drift: too few images to judge ({MIN_IMAGES - 1} scored in this run, "
                                 f"need {MIN_IMAGES})")


def test_no_reference_is_not_judged_and_says_so():
    block = no_reference(250)
    assert block.reference is False and block.judged is False and block.detected is False
    assert summary_line(block) == "drift: not checked, the model has no drift reference (exported before drift checks)"


@pytest.mark.parametrize("n", [100, 300])
def test_null_auc_stays_under_the_limit_at_the_shipped_models_width(n):
    """768 features (version 4's embedding) and 782 reference rows, as shipped: more features than a fold's
    rows, yet a same-distribution run stays under the limit (over 6 seeds: 0.46-0.58 at 100 images, 0.48-0.56
    at 300; README, Drift)."""
    rng = np.random.default_rng(n)
    ref, cur = rng.normal(size=(782, 768)), rng.normal(size=(n, 768))
    assert 0.40 < domain_auc(ref, cur) < DOMAIN_AUC_LIMIT


def test_a_change_in_prevalence_alone_moves_the_domain_auc():
    """Where the embeddings separate the classes, a case-mix change alone reads as about 0.5 + |Δ rate| / 2:
    why the positive rate is reported beside the figures (README, Drift)."""
    rng = np.random.default_rng(0)

    def mix(n, rate):
        y = rng.random(n) < rate
        x = rng.normal(size=(n, D))
        x[:, 0] += np.where(y, 3.0, -3.0)  # two well separated classes
        return x

    same = domain_auc(mix(800, 0.67), mix(400, 0.67))
    fewer = domain_auc(mix(800, 0.67), mix(400, 0.20))
    assert same < DOMAIN_AUC_LIMIT < fewer and abs(fewer - (0.5 + 0.47 / 2)) < 0.05


def test_the_drift_blocks_keys_keep_their_order_in_every_state():
    """metrics.json's `drift` block, as the job has always written it, state by state (psi_limit_sized added
    2026-12-02, after psi_limit)."""
    ref_e, ref_p = _embeddings(600), _probs(600)
    head = ["reference", "images", "sampled", "reference_images", "reference_sampled", "positive_rate",
            "reference_positive_rate", "domain_auc_limit", "psi_limit", "psi_limit_sized", "seed", "histogram"]
    judged = drift_figures(ref_e, ref_p, _embeddings(300, seed=1), _probs(300, seed=1), threshold=0.5)
    assert list(judged.to_json()) == head + ["judged", "domain_auc", "psi", "detected", "figures"]
    few = drift_figures(ref_e, ref_p, _embeddings(20), _probs(20), threshold=0.5)
    assert list(few.to_json()) == head + ["detected", "judged", "note", "figures"]
    assert list(no_reference(5).to_json()) == ["reference", "images", "domain_auc_limit", "psi_limit",
                                               "psi_limit_sized", "judged", "detected", "note", "figures"]
    broken = failed(5, 0.6, 0.2, "ValueError: x")
    assert broken.to_json()["note"] == "check failed (ValueError: x)" and broken.to_json()["reference"] is True


def test_the_null_distribution_stays_under_the_limit_on_synthetic_and_shipped_references():
    """The limit's derivation (README, Drift): half the reference's rows against the other half."""
    rng = np.random.default_rng(5)
    synthetic = null_aucs(rng.normal(size=(600, 768)).astype(np.float32), splits=5)
    assert len(synthetic) == 5 and synthetic.max() < DOMAIN_AUC_LIMIT and abs(synthetic.mean() - 0.5) < 0.05
    from xray_core import reference

    shipped = os.path.join(os.path.dirname(__file__), "..", "serving_models", "pneumonia", "4", "reference.npz")
    null = null_aucs(reference.load(shipped).embeddings.astype(np.float32), splits=20)
    assert null.max() < DOMAIN_AUC_LIMIT - 0.06  # 0.533 on version 4
    assert null.mean() + 3.5 * null.std(ddof=1) < DOMAIN_AUC_LIMIT  # mean 0.499, sd 0.026: 3.9 sd below the limit


def test_the_classifier_sees_at_most_the_components_asked_for(monkeypatch):
    from batch_job import drift

    seen = []
    real = drift.principal_components

    def spy(x, k):
        seen.append((x.shape, k))
        return real(x, k)

    monkeypatch.setattr(drift, "principal_components", spy)
    rng = np.random.default_rng(6)
    auc = domain_auc(rng.normal(size=(300, 768)), rng.normal(size=(200, 768)) + 1.0)
    assert seen == [((500, 768), COMPONENTS)] and auc > 0.95  # both sides' rows, no labels
    seen.clear()
    domain_auc(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)))
    assert seen == [((40, 8), 8)]  # never more components than features or rows


def test_the_principal_components_are_scikit_learns_exact_pca():
    """The same projection as sklearn's PCA with the covariance solver, up to each component's sign."""
    from sklearn.decomposition import PCA

    from batch_job.drift import principal_components

    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64))  # correlated features
    ours = principal_components(x, 10)
    theirs = PCA(n_components=10, svd_solver="covariance_eigh").fit_transform(x)
    assert ours.shape == (400, 10)
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-8)
    assert np.all(np.diff(ours.var(axis=0)) < 0)  # largest variance first


def test_a_change_in_spread_alone_is_seen():
    """A run whose embeddings keep the reference's mean but not its spread (fainter or noisier scans) reads as
    drift: the classifier models each class's variance, not only its mean."""
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(782, 64))
    same, wider = rng.normal(size=(500, 64)), rng.normal(size=(500, 64))
    wider[:, :8] *= 1.6
    assert domain_auc(ref, same) < DOMAIN_AUC_LIMIT < domain_auc(ref, wider)


def test_rows_that_are_all_the_same_read_as_no_drift():
    """Review defect: identical rows on both sides left the classifier no variance to fit (NaN, check failed)."""
    assert domain_auc(np.ones((200, 16)), np.ones((150, 16))) == 0.5
