"""Caruana greedy ensemble selection and the weighted vote: hand-computed answers and invariants."""

import math

import numpy as np
import pytest

from ensemble.scores.metrics import nll
from ensemble.scores.selection import greedy_selection, weighted_vote
from ensemble.scores.vote import soft_vote


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _members(noise_scales, n=2000, classes=5, seed=0):
    """Labels drawn from softmax(z) and one member per scale: softmax(z + scale * N(0, 1))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, classes))
    labels = (rng.random(n)[:, None] > np.cumsum(_softmax(z), axis=1)).sum(axis=1)
    member_probs = np.stack([_softmax(z + s * rng.normal(size=z.shape)) for s in noise_scales])
    return member_probs, labels


def _binary(p_class0):
    """(members, n) probabilities of class 0 -> (members, n, 2)."""
    p = np.asarray(p_class0, dtype=np.float64)
    return np.stack([p, 1.0 - p], axis=-1)


# --- greedy_selection without a mask ----------------------------------------------------------

def test_weights_sum_to_one_and_match_counts_and_order():
    member_probs, labels = _members([0.8, 1.0, 1.2, 1.5])
    out = greedy_selection(member_probs, labels)
    assert out["weights"].dtype == np.float64 and out["counts"].dtype == np.int64
    assert out["weights"].sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(out["counts"], np.bincount(out["order"], minlength=4))
    np.testing.assert_allclose(out["weights"], out["counts"] / len(out["order"]), rtol=0, atol=0)
    assert out["selected"] == sorted(set(out["order"]))
    assert len(out["nll_curve"]) == 8  # default rounds = 2 * members
    assert out["nll"] == out["nll_curve"][len(out["order"]) - 1] == pytest.approx(min(out["nll_curve"]), rel=1e-12)
    assert out["n_rows_scored"] == 2000 and out["n_rows_dropped"] == 0
    # the reported NLL is the NLL of the weighted vote it returns
    assert out["nll"] == pytest.approx(nll(weighted_vote(member_probs, out["weights"]), labels), rel=1e-12)


def test_deterministic():
    member_probs, labels = _members([0.5, 1.0, 1.0, 2.0], seed=1)
    a, b = greedy_selection(member_probs, labels), greedy_selection(member_probs.copy(), labels.copy())
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise_at", [0, 2])
def test_pure_noise_member_is_never_selected(seed, noise_at):
    member_probs, labels = _members([0.7, 1.0, 1.3], seed=seed)
    noise = np.random.default_rng(100 + seed).dirichlet(np.ones(5), size=member_probs.shape[1])
    member_probs = np.insert(member_probs, noise_at, noise, axis=0)  # (4, n, classes)
    out = greedy_selection(member_probs, labels, rounds=20)
    assert out["counts"][noise_at] == 0
    assert noise_at not in out["selected"]


def test_strictly_best_member_is_selected_first():
    member_probs, labels = _members([1.5, 1.5, 0.3, 1.5], seed=3)
    alone = [nll(p, labels) for p in member_probs]
    assert int(np.argmin(alone)) == 2
    out = greedy_selection(member_probs, labels)
    assert out["order"][0] == 2
    assert out["nll_curve"][0] == pytest.approx(alone[2], rel=1e-12)


def test_identical_members_lowest_index_wins_and_shortest_prefix_is_kept():
    member_probs, labels = _members([1.0], seed=4)
    out = greedy_selection(np.repeat(member_probs, 3, axis=0), labels)
    # every round ties across the three copies and re-adding member 0 leaves the NLL unchanged
    assert out["order"] == [0]
    np.testing.assert_array_equal(out["weights"], [1.0, 0.0, 0.0])
    assert out["selected"] == [0]
    np.testing.assert_allclose(out["nll_curve"], [nll(member_probs[0], labels)] * 6, rtol=1e-12)


def test_beats_or_matches_uniform_average():
    for seed in range(4):
        member_probs, labels = _members([0.6, 0.9, 1.4, 2.0, 3.0], seed=seed)
        out = greedy_selection(member_probs, labels)
        assert out["nll"] <= nll(soft_vote(member_probs), labels)


# --- greedy_selection with a mask (out-of-bag rows) -------------------------------------------

# True class is 0 on every row; entries are the probability of class 0. Members not usable on a
# row get values that would change the answer if they leaked in (0.99 / 0.01).
HAND_P0 = np.array([
    #  row0  row1  row2  row3
    [0.8, 0.99, 0.7, 0.5],   # member 0: usable on rows 0, 2
    [0.4, 0.9, 0.01, 0.5],   # member 1: usable on rows 0, 1
    [0.6, 0.3, 0.01, 0.5],   # member 2: usable on rows 0, 1
])
HAND_MASK = np.array([
    [True, False, True, False],
    [True, True, False, False],
    [True, True, False, False],
])


def test_mask_hand_computed():
    # Fallback for rows no selected member may score: uniform, 0.5 (two classes); row3 has no
    # usable member at all: dropped.
    # Round 1, product of true-class probs on rows 0..2 (NLL = -log(product) / 3):
    #   +m0: 0.8 * 0.5(fallback) * 0.7 = 0.28  <- best
    #   +m1: 0.4 * 0.9 * 0.5(fallback) = 0.18;  +m2: 0.6 * 0.3 * 0.5 = 0.09
    # Round 2 ({m0}): +m0 0.28; +m1: (0.8+0.4)/2 * 0.9 * 0.7 = 0.378 <- best; +m2: 0.7*0.3*0.7
    # Round 3 ({m0, m1}): +m0: (1.6+0.4)/3 * 0.9 * (0.7+0.7)/2 = 0.42 <- best
    #   +m1: (0.8+0.8)/3 * 0.9 * 0.7 = 0.336;  +m2: 1.8/3 * (0.9+0.3)/2 * 0.7 = 0.252
    out = greedy_selection(_binary(HAND_P0), np.zeros(4, dtype=int), mask=HAND_MASK, rounds=3)
    assert out["order"] == [0, 1, 0]
    np.testing.assert_array_equal(out["counts"], [2, 1, 0])
    np.testing.assert_allclose(out["weights"], [2 / 3, 1 / 3, 0.0], rtol=1e-15)
    np.testing.assert_allclose(out["nll_curve"], [-math.log(p) / 3 for p in (0.28, 0.378, 0.42)], rtol=1e-12)
    assert out["nll"] == pytest.approx(-math.log(0.42) / 3, rel=1e-12)
    assert out["selected"] == [0, 1]
    assert (out["n_rows_scored"], out["n_rows_dropped"]) == (3, 1)


def test_mask_all_true_equals_no_mask():
    member_probs, labels = _members([0.8, 1.0, 1.5], seed=5)
    a = greedy_selection(member_probs, labels)
    b = greedy_selection(member_probs, labels, mask=np.ones(member_probs.shape[:2], dtype=bool))
    assert a["order"] == b["order"] and a["nll_curve"] == b["nll_curve"]


# --- weighted_vote ----------------------------------------------------------------------------

def test_weighted_vote_hand_values_and_uniform_is_soft_vote():
    member_probs = _binary([[0.8, 0.2], [0.2, 0.6]])  # (2 members, 2 rows, 2 classes)
    np.testing.assert_allclose(weighted_vote(member_probs, [3, 1]),
                               [[0.65, 0.35], [0.3, 0.7]], rtol=1e-12)
    np.testing.assert_allclose(weighted_vote(member_probs, [1.0, 0.0]), member_probs[0], rtol=0, atol=0)
    np.testing.assert_allclose(weighted_vote(member_probs, [0.5, 0.5]), soft_vote(member_probs), atol=1e-15)


# --- errors -----------------------------------------------------------------------------------

def test_shape_and_value_errors():
    member_probs = _binary(HAND_P0)  # (3, 4, 2)
    labels = np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="labels"):
        greedy_selection(member_probs, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="member_probs"):
        greedy_selection(member_probs[0], labels)
    with pytest.raises(ValueError, match="mask"):
        greedy_selection(member_probs, labels, mask=HAND_MASK[:, :3])
    with pytest.raises(ValueError, match="counts == 0"):
        greedy_selection(member_probs, labels, mask=HAND_MASK.astype(int))  # counts, not a mask
    with pytest.raises(ValueError, match="no row"):
        greedy_selection(member_probs, labels, mask=np.zeros((3, 4), dtype=bool))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rounds"):
            greedy_selection(member_probs, labels, rounds=bad)
    with pytest.raises(ValueError, match="finite"):
        greedy_selection(np.full((2, 4, 2), np.nan), labels)
    with pytest.raises(ValueError, match="weights"):
        weighted_vote(member_probs, [1.0, 1.0])
    for bad in ([0.0, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, np.nan, 1.0]):
        with pytest.raises(ValueError, match="weights"):
            weighted_vote(member_probs, bad)
