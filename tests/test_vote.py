"""Soft and hard voting maths."""

import math

import numpy as np
import pytest

from ensemble.scores.vote import accuracy, hard_vote, soft_vote, vote_labels
from tests.helpers import random_members

# 3 members, 4 rows, 3 classes
MEMBER_PROBS = np.array([
    [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]],
    [[0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]],
    [[0.0, 0.0, 1.0], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0], [0.1, 0.1, 0.8]],
])
EXPECTED_MEAN = np.array([
    [0.3, 0.3, 0.4],
    [0.7 / 3, 1.4 / 3, 0.3],
    [1 / 3, 1 / 3, 1 / 3],
    [0.3, 0.3, 0.4],
])


def test_soft_vote_is_mean_over_members():
    out = soft_vote(MEMBER_PROBS)
    assert out.shape == (4, 3)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, EXPECTED_MEAN, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out, MEMBER_PROBS.mean(axis=0), rtol=0, atol=1e-15)


def test_soft_vote_single_member_is_identity():
    np.testing.assert_allclose(soft_vote(MEMBER_PROBS[:1]), MEMBER_PROBS[0], rtol=0, atol=0)


def test_soft_vote_accepts_lists():
    np.testing.assert_allclose(soft_vote(MEMBER_PROBS.tolist()), EXPECTED_MEAN, atol=1e-12)


def test_soft_vote_rows_sum_to_one_for_dirichlet_inputs():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=(7, 200))  # (members, n, classes)
    out = soft_vote(probs.astype(np.float32))
    assert out.shape == (200, 10)
    np.testing.assert_allclose(out.sum(axis=1), np.ones(200), atol=1e-6)
    assert (out >= 0).all()


def test_vote_labels_argmax():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.0, 0.1, 0.9]])
    np.testing.assert_array_equal(vote_labels(probs), [1, 0, 2])


def test_vote_labels_ties_go_to_lowest_index():
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_array_equal(vote_labels(probs), [0, 1, 0])


def test_soft_vote_disagrees_with_majority_of_member_argmaxes():
    # Two members lean weakly to class 0, one is very confident in class 1.
    member = np.array([
        [[0.55, 0.45]],
        [[0.55, 0.45]],
        [[0.00, 1.00]],
    ])
    per_member = member.argmax(axis=2)[:, 0]
    majority = np.bincount(per_member, minlength=2).argmax()
    assert majority == 0
    avg = soft_vote(member)
    np.testing.assert_allclose(avg, [[1.1 / 3, 1.9 / 3]], atol=1e-12)
    assert vote_labels(avg).tolist() == [1]  # soft vote, not hard majority


def test_vote_labels_on_hand_made_ensemble():
    # EXPECTED_MEAN rows: class 2, class 1, tie -> 0, class 2
    np.testing.assert_array_equal(vote_labels(soft_vote(MEMBER_PROBS)), [2, 1, 0, 2])


def test_accuracy():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(probs, np.array([0, 1, 1, 1])) == 0.75
    assert accuracy(probs, [0, 1, 0, 1]) == 1.0
    assert accuracy(probs, [1, 0, 1, 0]) == 0.0
    assert isinstance(accuracy(probs, [0, 1, 0, 1]), float)


def test_accuracy_empty_is_nan():
    assert math.isnan(accuracy(np.zeros((0, 3)), np.zeros((0,), dtype=int)))


@pytest.mark.parametrize("shape", [(4, 3), (3,), (2, 3, 4, 5), (0, 4, 3)])
def test_soft_vote_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match="members, n, classes"):
        soft_vote(np.zeros(shape))


# --- hard vote -----------------------------------------------------------------------------------

def test_hard_vote_majority_then_summed_probability_then_lowest_index():
    member_probs = np.array([  # 4 members, 4 rows, 3 classes
        [[0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.0, 0.75, 0.25], [0.2, 0.2, 0.6]],
        [[0.4, 0.3, 0.3], [0.5, 0.4, 0.1], [0.0, 0.25, 0.75], [0.2, 0.2, 0.6]],
        [[0.0, 1.0, 0.0], [0.1, 0.9, 0.0], [0.0, 0.625, 0.375], [0.2, 0.2, 0.6]],
        [[0.1, 0.2, 0.7], [0.0, 0.8, 0.2], [0.0, 0.375, 0.625], [0.2, 0.2, 0.6]],
    ])
    # row 0: votes 2-1-1 -> class 0, although the soft vote picks class 1
    # row 1: votes 2-2 between 0 and 1; summed probabilities 1.2 vs 2.4 -> class 1
    # row 2: votes 2-2 between 1 and 2; summed probabilities 2.0 == 2.0 -> lowest index, class 1
    # row 3: unanimous -> class 2
    np.testing.assert_array_equal(hard_vote(member_probs), [0, 1, 1, 2])
    assert soft_vote(member_probs)[0].argmax() == 1


def test_hard_vote_is_plain_majority_without_ties():
    member_probs, _ = random_members(members=5, n=200, classes=2, seed=1)
    tops = member_probs.argmax(axis=2)
    np.testing.assert_array_equal(hard_vote(member_probs), (tops.sum(axis=0) >= 3).astype(int))
