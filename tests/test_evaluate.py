"""xray_core.metrics: threshold choice and operating-point metrics against hand-computed numbers."""
from __future__ import annotations

import numpy as np
import pytest

from xray_core.metrics import choose_threshold, evaluate, operating_point

# Validation case A (5 NORMAL, 5 PNEUMONIA), scores sorted per class:
#   NORMAL    0.1 0.2 0.3 0.4 0.6
#   PNEUMONIA 0.5 0.7 0.8 0.9 0.95
Y_A = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
P_A = [0.1, 0.2, 0.3, 0.4, 0.6, 0.5, 0.7, 0.8, 0.9, 0.95]

# Case B, built so several thresholds share the best specificity:
#   NORMAL    0.1 0.2 0.6
#   PNEUMONIA 0.3 0.4 0.5 0.7
Y_B = [0, 0, 1, 1, 1, 0, 1]
P_B = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def _recall_spec(y, p, t):
    y = np.asarray(y)
    pred = np.asarray(p) >= t
    return (pred & (y == 1)).sum() / (y == 1).sum(), (~pred & (y == 0)).sum() / (y == 0).sum()


def _assert_optimal(y, p, target, chosen):
    """Recall >= target at `chosen`, and no threshold (higher or not) beats its specificity."""
    recall, spec = _recall_spec(y, p, chosen)
    assert recall >= target
    if min(p) < chosen:  # never exactly on a validation score, unless it is the lowest one
        assert chosen not in set(np.asarray(p, dtype=float))
    scores = np.unique(p)
    candidates = np.concatenate([scores, (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-3]])
    for t in candidates:
        r, s = _recall_spec(y, p, t)
        if r >= target:
            assert s <= spec, (t, r, s, chosen, spec)
            if t > chosen:
                # a higher threshold may tie, but never with strictly better specificity
                assert not s > spec


@pytest.mark.parametrize(
    "y, p, target, expected",
    [
        # A, target 0.8: 4 of 5 positives needed. Threshold 0.7 catches 0.7/0.8/0.9/0.95
        # (recall 0.8) and no negative (the top negative is 0.6): specificity 1.0, the best
        # possible; 0.8 would give recall 0.6. Next lower score below 0.7 is 0.6 -> (0.7+0.6)/2.
        (Y_A, P_A, 0.8, 0.65),
        # A, target 0.7: still needs 4 of 5 (3/5 = 0.6 < 0.7) -> same 0.65.
        (Y_A, P_A, 0.7, 0.65),
        # A, target 0.6: 3 of 5 -> threshold 0.8 (spec 1.0); next lower score 0.7 -> 0.75.
        (Y_A, P_A, 0.6, 0.75),
        # A, target 0.95 or 1.0: all positives -> threshold 0.5 (the lowest positive),
        # which lets the 0.6 negative through (spec 0.8); next lower score 0.4 -> 0.45.
        (Y_A, P_A, 0.95, 0.45),
        (Y_A, P_A, 1.0, 0.45),
        # B, target 0.5: thresholds 0.5, 0.4 and 0.3 all reach recall >= 0.5 with the same
        # specificity 2/3 (only the 0.6 negative is above them); the highest, 0.5, is taken,
        # then halfway down to 0.4 -> 0.45 (taking the lowest tie would give 0.25).
        (Y_B, P_B, 0.5, 0.45),
        # B, target 1.0: threshold 0.3 (recall 1, spec 2/3); next lower score 0.2 -> 0.25.
        (Y_B, P_B, 1.0, 0.25),
        # B, target 0.25: threshold 0.7 (one positive, no negative); next lower 0.6 -> 0.65.
        (Y_B, P_B, 0.25, 0.65),
        # The lowest score is a positive: threshold 0.1 and nothing below it -> halfway to 0, 0.05 (QA: the score
        # itself sat on the threshold, and a 6e-8 Keras/ONNX difference failed the export's parity check).
        ([1, 0, 1], [0.1, 0.5, 0.9], 1.0, 0.05),
        ([0, 0, 1, 1], [0.4, 0.6, 0.3, 0.7], 0.95, 0.15),
        ([0, 1], [0.5, 1e-9], 1.0, 0.0),  # a lowest score within float noise of 0: 0 itself (review)
        # Scores of exactly 1.0: threshold 1.0, halfway down to 0.2 -> 0.6.
        ([0, 1, 1], [0.2, 1.0, 1.0], 1.0, 0.6),
    ],
)
def test_choose_threshold_by_hand(y, p, target, expected):
    chosen = choose_threshold(y, p, target)
    assert chosen == pytest.approx(expected, abs=1e-12)
    _assert_optimal(y, p, target, chosen)


def test_choose_threshold_operating_point_by_hand():
    # A at target 0.8: recall 4/5, specificity 5/5 at the chosen 0.65
    chosen = choose_threshold(Y_A, P_A, 0.8)
    assert _recall_spec(Y_A, P_A, chosen) == (0.8, 1.0)
    # ... and at 0.45 (target 1.0): recall 5/5, specificity 4/5
    assert _recall_spec(Y_A, P_A, choose_threshold(Y_A, P_A, 1.0)) == (1.0, 0.8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_is_optimal_on_random_scores(seed, target):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 120)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(3)  # rounding makes ties
    chosen = choose_threshold(y, p, target)
    _assert_optimal(y, p, target, chosen)


def test_choose_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])


# Test case for operating_point: 6 PNEUMONIA, 4 NORMAL.
Y_T = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
P_T = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.65, 0.2, 0.1, 0.45]


def test_operating_point_at_half_by_hand():
    m = operating_point(Y_T, P_T, 0.5)
    # predicted PNEUMONIA (p >= 0.5): positives 0.9 0.8 0.7 0.6 -> TP 4, FN 2 (0.4, 0.3);
    # negatives 0.65 -> FP 1; 0.2 0.1 0.45 -> TN 3.
    cm = m["confusion_matrix"]
    assert (cm["tn"], cm["fp"], cm["fn"], cm["tp"]) == (3, 1, 2, 4)
    assert cm["matrix"] == [[3, 1], [2, 4]]
    assert cm["labels"] == ["NORMAL", "PNEUMONIA"]
    assert m["threshold"] == 0.5 and m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # 8/11
    # ROC AUC = concordant (pos > neg) pairs / (6 * 4):
    #   0.9, 0.8, 0.7 beat all 4 negatives -> 12; 0.6 beats 0.45 0.2 0.1 -> 3;
    #   0.4 beats 0.2 0.1 -> 2; 0.3 beats 0.2 0.1 -> 2. Total 19 / 24.
    assert m["roc_auc"] == pytest.approx(19 / 24)
    # average precision, ranking 0.9P 0.8P 0.7P 0.65N 0.6P 0.45N 0.4P 0.3P 0.2N 0.1N:
    #   precision at each positive: 1/1 2/2 3/3 4/5 5/7 6/8
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 4 / 5 + 5 / 7 + 6 / 8) / 6)
    report = m["classification_report"]
    assert report["PNEUMONIA"]["support"] == 6 and report["NORMAL"]["support"] == 4
    assert report["NORMAL"]["recall"] == pytest.approx(3 / 4)


def test_operating_point_threshold_is_inclusive():
    # at 0.65 the NORMAL scored exactly 0.65 counts as predicted PNEUMONIA (p >= threshold)
    m = operating_point(Y_T, P_T, 0.65)
    cm = m["confusion_matrix"]
    assert (cm["tn"], cm["fp"], cm["fn"], cm["tp"]) == (3, 1, 3, 3)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(6 / (6 + 1 + 3))
    assert m["roc_auc"] == pytest.approx(19 / 24)  # threshold-free


def test_operating_point_auc_counts_ties_as_half():
    # pairs: (0.6 vs 0.3) 1, (0.6 vs 0.6) 1/2, (0.9 vs 0.3) 1, (0.9 vs 0.6) 1 -> 3.5 / 4
    m = operating_point([0, 0, 1, 1], [0.3, 0.6, 0.6, 0.9], 0.5)
    assert m["roc_auc"] == pytest.approx(0.875)


def test_operating_point_degenerate_cases():
    # only positives: no AUCs, and no specificity (no negatives): None ("n/a"), not 0.0 (QA defect: a folder of
    # one class printed "specificity 0.0000" or "recall 0.0000" beside ROC AUC n/a)
    m = operating_point([1, 1, 1], [0.2, 0.6, 0.9], 0.5)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["recall"] == pytest.approx(2 / 3) and m["specificity"] is None
    assert m["confusion_matrix"]["matrix"] == [[0, 0], [1, 2]]
    # only negatives, none flagged: no recall, no precision, no F1
    m = operating_point([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert (m["precision"], m["recall"], m["specificity"], m["f1"], m["accuracy"]) == (None, None, 1.0, None, 1.0)
    # nothing predicted positive: precision undefined, recall 0 (measured: 2 positives missed), specificity 1
    m = operating_point([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.9)
    assert (m["precision"], m["recall"], m["specificity"], m["f1"]) == (None, 0.0, 1.0, 0.0)
    assert m["roc_auc"] == pytest.approx(0.75)


def test_evaluate_returns_both_operating_points():
    out = evaluate(Y_A, P_A, Y_T, P_T, target_recall=0.8)
    assert set(out) == {"target_recall", "chosen_threshold", "val_roc_auc", "val_at_chosen",
                        "test_at_0.5", "test_at_chosen"}
    assert out["target_recall"] == 0.8
    assert out["chosen_threshold"] == pytest.approx(0.65)  # from validation case A, see above
    # val AUC of A: 0.5 beats 4 negatives, the other 4 positives beat all 5 -> 24 / 25
    assert out["val_roc_auc"] == pytest.approx(24 / 25)
    assert (out["val_at_chosen"]["recall"], out["val_at_chosen"]["specificity"]) == (0.8, 1.0)
    assert out["test_at_0.5"]["threshold"] == 0.5
    assert out["test_at_0.5"]["confusion_matrix"]["matrix"] == [[3, 1], [2, 4]]
    assert out["test_at_chosen"]["threshold"] == out["chosen_threshold"]
    assert out["test_at_chosen"]["confusion_matrix"]["matrix"] == [[3, 1], [3, 3]]
    assert out["test_at_chosen"]["recall"] == pytest.approx(0.5)
    assert out["test_at_chosen"] == operating_point(Y_T, P_T, out["chosen_threshold"])
