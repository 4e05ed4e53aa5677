"""Metric values on hand-made inputs: NLL, Brier, entropy, ECE, disagreement, the size curve and
out-of-bag scores."""

import math

import numpy as np
import pytest

from ensemble.bootstrap import bootstrap_counts, member_seeds
from ensemble.scores.metrics import (brier, calibration_bins, disagreement, ece, nll, oob_scores, oob_vote,
                                     predictive_entropy, size_curve, summary_metrics)
from ensemble.scores.vote import accuracy, soft_vote
from tests.helpers import random_members


def _binary(p_class1) -> np.ndarray:
    """(..., n) probabilities of class 1 -> (..., n, 2) distributions."""
    p = np.asarray(p_class1, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=-1)


# --- NLL, Brier, entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 4, 100])
def test_nll_brier_entropy_of_one_hot_correct_and_uniform(classes):
    labels = np.arange(12) % classes
    one_hot = np.eye(classes)[labels]
    uniform = np.full((12, classes), 1.0 / classes)
    assert nll(one_hot, labels) == 0.0
    assert brier(one_hot, labels) == 0.0
    np.testing.assert_allclose(predictive_entropy(one_hot), np.zeros(12), atol=0)
    assert nll(uniform, labels) == pytest.approx(math.log(classes), rel=1e-12)
    assert brier(uniform, labels) == pytest.approx(1.0 - 1.0 / classes, rel=1e-12)
    np.testing.assert_allclose(predictive_entropy(uniform), np.full(12, math.log(classes)), rtol=1e-12)


def test_nll_hand_computed_and_clipped_at_1e12():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])
    labels = np.array([0, 1, 2])  # the last row gives the true class probability 0
    expected = -(math.log(0.5) + math.log(0.9) + math.log(1e-12)) / 3
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-12)


def test_brier_hand_computed():
    probs = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    # row 0: 0.25 + 0.0625 + 0.0625; row 1 (wrong, confident): 1 + 0 + 1
    assert brier(probs, [0, 1]) == pytest.approx((0.375 + 2.0) / 2, rel=1e-12)


def test_nll_and_brier_agree_with_scikit_learn():
    from sklearn.metrics import brier_score_loss, log_loss

    (probs, *_), labels = random_members(members=1, n=500, classes=5, seed=3)
    assert nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(5)), rel=1e-9)
    assert brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=range(5)), rel=1e-9)


def test_entropy_hand_computed():
    probs = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(predictive_entropy(probs), [math.log(2), math.log(4), 0.0], rtol=1e-12, atol=0)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="probs \\(n, classes\\) and labels \\(n,\\)"):
        nll(np.full((3, 2), 0.5), [0, 1])
    with pytest.raises(ValueError, match="labels must lie in"):
        brier(np.full((2, 2), 0.5), [0, 2])


# --- ECE -----------------------------------------------------------------------------------------

def test_ece_is_zero_when_accuracy_equals_confidence_in_every_bin():
    # 10 rows at confidence 0.8 with 8 right, 5 at 0.6 with 3 right, 4 at 1.0 all right
    probs = _binary([0.8] * 10 + [0.6] * 5 + [1.0] * 4)
    labels = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 2 + [1] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_near_zero_when_labels_are_drawn_from_the_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.5), size=200_000)
    labels = (rng.random((200_000, 1)) > probs.cumsum(axis=1)).sum(axis=1)  # one draw per row
    labels = np.minimum(labels, 4)  # cumsum can end at 1 - 1e-16
    assert ece(probs, labels) < 0.01


def test_ece_of_over_confident_predictions_hand_computed():
    # one bin: confidence 0.9, half right -> |0.5 - 0.9| = 0.4
    assert ece(_binary([0.9] * 10), [1] * 5 + [0] * 5) == pytest.approx(0.4, abs=1e-12)
    # two bins: 4 rows at 0.95 with 2 right, 6 rows at 0.7 with 3 right
    probs = _binary([0.95] * 4 + [0.7] * 6)
    labels = [1, 1, 0, 0] + [1, 1, 1, 0, 0, 0]
    assert ece(probs, labels) == pytest.approx(0.4 * 0.45 + 0.6 * 0.2, abs=1e-12)


def test_calibration_bins_use_right_closed_equal_width_bins():
    probs = _binary([0.95, 0.7, 0.7, 0.55])  # confidences 0.95, 0.7, 0.7, 0.55
    cal = calibration_bins(probs, [1, 1, 0, 0], bins=15)
    np.testing.assert_allclose(cal["edges"], np.linspace(0, 1, 16))
    expected_count = np.zeros(15, dtype=int)
    expected_count[[14, 10, 8]] = [1, 2, 1]  # 0.95 in (14/15, 1], 0.7 in (10/15, 11/15], 0.55 in (8/15, 9/15]
    np.testing.assert_array_equal(cal["count"], expected_count)
    assert cal["accuracy"][10] == 0.5 and cal["accuracy"][8] == 0.0
    assert cal["confidence"][10] == pytest.approx(0.7)
    assert np.isnan(cal["accuracy"][0])
    # 1.0 lands in the last bin, not past it
    assert calibration_bins(_binary([1.0]), [1], bins=15)["count"][14] == 1


# --- disagreement --------------------------------------------------------------------------------

def test_disagreement_hand_made():
    member_probs = np.array([
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2]],
        [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]],
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7]],
    ])
    # soft vote: class 0 (all agree), class 1 (member 1 says 2), class 2 (members 0, 1 say 0, 1)
    np.testing.assert_allclose(disagreement(member_probs), [0.0, 1 / 3, 2 / 3], atol=1e-12)


# --- ensemble size curve -------------------------------------------------------------------------

def test_size_curve_end_points_match_members_and_full_soft_vote():
    member_probs, labels = random_members(members=5, n=300, classes=4, seed=2)
    curve = size_curve(member_probs, labels, n_orders=7, seed=11)
    assert curve["k"] == [1, 2, 3, 4, 5]
    full = soft_vote(member_probs)
    assert curve["accuracy"][0] == accuracy(member_probs[0], labels)
    assert curve["nll"][0] == pytest.approx(nll(member_probs[0], labels), rel=1e-12)
    assert curve["accuracy"][1] == accuracy(member_probs[:2].mean(axis=0), labels)
    assert curve["accuracy"][-1] == accuracy(full, labels)
    assert curve["nll"][-1] == pytest.approx(nll(full, labels), rel=1e-12)
    # every random order ends on the same full vote
    assert curve["accuracy_mean"][-1] == pytest.approx(accuracy(full, labels), abs=1e-12)
    assert curve["nll_mean"][-1] == pytest.approx(nll(full, labels), rel=1e-9)
    assert curve["accuracy_std"][-1] == pytest.approx(0.0, abs=1e-12)


def test_size_curve_random_orders_are_the_seeded_permutations():
    member_probs, labels = random_members(members=4, n=200, classes=3, seed=4)
    curve = size_curve(member_probs, labels, n_orders=6, seed=5)
    rng = np.random.default_rng(5)
    firsts = [rng.permutation(4)[0] for _ in range(6)]
    member_acc = [accuracy(p, labels) for p in member_probs]
    assert curve["accuracy_mean"][0] == pytest.approx(np.mean([member_acc[i] for i in firsts]), abs=1e-12)
    assert size_curve(member_probs, labels, n_orders=6, seed=5) == curve


# --- out-of-bag scores ---------------------------------------------------------------------------

# 3 members, 5 training rows, 2 classes; members' probability of class 1:
OOB_P1 = np.array([
    [0.9, 0.2, 0.3, 0.6, 0.5],
    [0.1, 0.7, 0.8, 0.2, 0.5],
    [0.4, 0.6, 0.1, 0.4, 0.5],
])
OOB_COUNTS = np.array([
    [0, 1, 2, 0, 1],   # member 0 never drew rows 0, 3
    [1, 0, 0, 0, 2],   # member 1: rows 1, 2, 3
    [2, 1, 0, 0, 1],   # member 2: rows 2, 3; every member drew row 4
])
OOB_LABELS = np.array([1, 1, 0, 1, 0])


def test_oob_vote_averages_exactly_the_members_that_never_drew_the_row():
    probs, n_oob = oob_vote(_binary(OOB_P1), OOB_COUNTS)
    np.testing.assert_array_equal(n_oob, [1, 1, 2, 3, 0])
    np.testing.assert_allclose(probs[:4, 1], [0.9, 0.7, (0.8 + 0.1) / 2, (0.6 + 0.2 + 0.4) / 3], atol=1e-12)
    np.testing.assert_allclose(probs[:4].sum(axis=1), np.ones(4), atol=1e-12)
    assert np.isnan(probs[4]).all()


def test_oob_scores_hand_made():
    out = oob_scores(_binary(OOB_P1), OOB_COUNTS, OOB_LABELS)
    # OOB votes 0.9, 0.7, 0.45, 0.4 -> right, right, right, wrong (the all-member vote gets rows 0, 1 wrong)
    assert out["acc"] == 0.75
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.55) + math.log(0.4)) / 4)
    assert out["n_rows_scored"] == 4
    assert out["n_rows_without_oob"] == 1
    assert out["member_n_oob"] == [2, 3, 2]
    # member 0 on rows 0, 3: both right; member 1 on rows 1, 2, 3: one right; member 2 on rows 2, 3: one
    np.testing.assert_allclose(out["member_acc"], [1.0, 1 / 3, 0.5], atol=1e-12)


def test_oob_scores_rows_scored_are_rows_out_of_bag_for_some_member():
    n_train, members = 40, 3
    counts = np.stack([bootstrap_counts(s, n_train, n_train) for s in member_seeds(7, members)])
    member_probs, labels = random_members(members=members, n=n_train, classes=3, seed=8)
    has_oob = (counts == 0).any(axis=0)
    assert 0 < has_oob.sum() < n_train  # the seed gives both kinds of row
    out = oob_scores(member_probs, counts, labels)
    assert out["n_rows_scored"] == has_oob.sum()
    assert out["n_rows_without_oob"] == n_train - has_oob.sum()
    probs, _ = oob_vote(member_probs, counts)
    assert out["acc"] == accuracy(probs[has_oob], labels[has_oob])


def test_oob_scores_without_any_out_of_bag_row_are_nan():
    out = oob_scores(_binary(OOB_P1), np.ones((3, 5), dtype=int), OOB_LABELS)
    assert out["n_rows_scored"] == 0 and out["n_rows_without_oob"] == 5
    assert math.isnan(out["acc"]) and all(math.isnan(a) for a in out["member_acc"])


def test_oob_counts_shape_must_match():
    with pytest.raises(ValueError, match="counts must be \\(members, n_train\\)"):
        oob_vote(_binary(OOB_P1), OOB_COUNTS[:, :4])


def test_summary_metrics_values():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    labels = np.array([0, 1, 1])
    out = summary_metrics(probs, labels)
    assert out == {"accuracy": 2 / 3, "nll": nll(probs, labels), "ece": ece(probs, labels),
                   "brier": brier(probs, labels)}
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3)


def test_check_labels():
    from ensemble.scores.metrics import check_labels

    out = check_labels(np.array([0, 2, 1], dtype=np.int32), 3, 3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]
    for bad, match in (([0.0, 1.0, 1.0], "integer"), ([0, 1], "\\(3,\\)"), ([0, 1, 3], "\\[0, 3\\)"),
                       ([-1, 0, 0], "\\[0, 3\\)")):
        with pytest.raises(ValueError, match=match):
            check_labels(np.asarray(bad), 3, 3)
