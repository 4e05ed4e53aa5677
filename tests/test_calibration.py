"""Temperature scaling after averaging: exact optima, recovery of a known temperature, invariants."""

import math

import numpy as np
import pytest

from ensemble.scores.calibration import calibration_report, fit_temperature, scale_probs
from ensemble.scores.metrics import ece, nll, summary_metrics
from ensemble.scores.vote import soft_vote
from tests.helpers import NOISE_AT, disagreeing_members


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(n=20000, classes=5, seed=0):
    """Logits z (n, classes) and labels drawn from softmax(z): softmax(z) is calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, classes))
    p = _softmax(z)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, labels


# --- scale_probs ------------------------------------------------------------------------------

def test_scale_probs_at_t1_is_identity_and_rows_sum_to_one():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), size=50)
    out = scale_probs(p.astype(np.float32), 1.0)
    assert out.dtype == np.float64 and out.shape == (50, 6)
    np.testing.assert_allclose(out, p, rtol=1e-6)
    np.testing.assert_allclose(scale_probs(p, 1.0), p, rtol=1e-12, atol=0)
    for t in (0.1, 0.7, 3.0, 20.0):
        np.testing.assert_allclose(scale_probs(p, t).sum(axis=1), np.ones(50), atol=1e-12)


def test_scale_probs_hand_values():
    # [0.8, 0.2] at T=2 -> softmax(log p / 2) = sqrt(p) / sum sqrt(p) = [2/3, 1/3]
    np.testing.assert_allclose(scale_probs([[0.8, 0.2]], 2.0), [[2 / 3, 1 / 3]], rtol=1e-12)
    # T=0.5 squares: [0.64, 0.04] / 0.68
    np.testing.assert_allclose(scale_probs([[0.8, 0.2]], 0.5), [[0.64 / 0.68, 0.04 / 0.68]], rtol=1e-12)


def test_argmax_never_changes():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.full(10, 0.3), size=2000)
    for t in (0.05, 0.5, 1.0, 2.0, 20.0):
        np.testing.assert_array_equal(scale_probs(p, t).argmax(axis=1), p.argmax(axis=1))


# --- fit_temperature --------------------------------------------------------------------------

def test_fit_binary_constant_prediction_has_closed_form_answer():
    # Every row says [0.8, 0.2]; 9 of 10 labels are class 0. The NLL-optimal constant prediction
    # is the empirical frequency 0.9, so sigmoid(log(4) / T) = 0.9, i.e. T = log 4 / log 9.
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 9 + [1])
    t = fit_temperature(probs, labels)
    assert isinstance(t, float)
    assert t == pytest.approx(math.log(4) / math.log(9), rel=1e-8)
    np.testing.assert_allclose(scale_probs(probs, t)[0], [0.9, 0.1], rtol=1e-8)


@pytest.mark.parametrize("factor", [0.4, 0.8, 2.0, 3.0])
def test_fit_recovers_known_temperature(factor):
    # softmax(z) is calibrated for these labels; the fitter sees softmax(z * factor), which is
    # over-confident for factor > 1 and under-confident below 1. Dividing log-probs by T = factor
    # gives back softmax(z), so the fitted T should be ~factor (n = 20000 rows).
    z, labels = _synthetic(seed=3)
    probs = _softmax(z * factor)
    t = fit_temperature(probs, labels)
    assert t == pytest.approx(factor, rel=0.02)  # fitted ~0.5% off at this n
    assert (t > 1) == (factor > 1)


def test_fitted_temperature_is_a_minimum():
    z, labels = _synthetic(n=5000, seed=4)
    probs = _softmax(1.7 * z)
    t = fit_temperature(probs, labels)
    best = nll(scale_probs(probs, t), labels)
    assert best < nll(probs, labels)  # T = 1
    for other in (t * 1.05, t / 1.05, t * 1.001, t / 1.001):
        assert best <= nll(scale_probs(probs, other), labels)


def test_fit_is_deterministic_and_stops_at_bounds():
    z, labels = _synthetic(n=3000, seed=5)
    probs = _softmax(4.0 * z)
    assert fit_temperature(probs, labels) == fit_temperature(probs, labels)
    # the optimum (~4) lies above the bounds: the fitter returns the upper bound
    assert fit_temperature(probs, labels, bounds=(0.5, 2.0)) == pytest.approx(2.0, rel=1e-9)
    # all predictions correct: sharper is always better, so the lower bound
    p = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert fit_temperature(p, [0, 1], bounds=(0.1, 10.0)) == pytest.approx(0.1, rel=1e-9)


def test_underconfident_average_of_disagreeing_members_gets_t_below_one():
    # Five members, each 90% confident and right 80% of the time (independently): averaging
    # confident members that disagree gives an ensemble that is right more often than it says.
    rng = np.random.default_rng(6)
    members, n, classes = 5, 4000, 4
    labels = rng.integers(0, classes, size=n)
    right = rng.random((members, n)) < 0.8
    wrong = (labels + rng.integers(1, classes, size=(members, n))) % classes
    picks = np.where(right, labels, wrong)  # (members, n)
    member_probs = np.full((members, n, classes), 0.1 / (classes - 1))
    np.put_along_axis(member_probs, picks[:, :, None], 0.9, axis=2)
    avg = soft_vote(member_probs)
    fit_rows, test_rows = np.arange(n) < n // 2, np.arange(n) >= n // 2
    t = fit_temperature(avg[fit_rows], labels[fit_rows])
    assert t < 1.0
    report = calibration_report(avg[test_rows], labels[test_rows], t)
    assert report["temperature"] == t
    assert report["before"] == summary_metrics(avg[test_rows], labels[test_rows])
    assert report["after"]["accuracy"] == report["before"]["accuracy"]
    assert report["after"]["ece"] < report["before"]["ece"]
    assert report["after"]["nll"] < report["before"]["nll"]
    assert report["after"]["ece"] == pytest.approx(ece(scale_probs(avg[test_rows], t), labels[test_rows]))


def test_a_vote_of_fewer_members_is_less_under_confident():
    """Why the temperature is fitted on val by default: an out-of-bag row votes with only the
    members that never drew it (about 37% of them), and the fewer members vote, the less the
    average under-states its accuracy, so a temperature fitted on such votes sharpens the vote of
    all members too little."""
    member_probs, labels = disagreeing_members(4000, seed=7, good=9)
    member_probs = np.delete(member_probs, NOISE_AT, axis=0)  # nine good members
    temperatures = [fit_temperature(soft_vote(member_probs[:k]), labels) for k in (1, 3, 9)]
    assert temperatures[0] > temperatures[1] > temperatures[2]
    assert temperatures[1] > 1.2 * temperatures[2]


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("probs, labels", [
    (np.zeros((0, 3)), np.zeros(0, dtype=int)),  # empty
    (np.array([0.5, 0.5]), np.array([0])),  # 1-D probs
    (np.full((4, 2), 0.5), np.zeros(3, dtype=int)),  # label count mismatch
    (np.full((4, 2), 0.5), np.array([0, 1, 2, 0])),  # label out of range
    (np.array([[np.nan, np.nan], [0.5, 0.5]]), np.array([0, 1])),  # NaN row from oob_vote
    (np.array([[-0.1, 1.1], [0.5, 0.5]]), np.array([0, 1])),  # negative probability
])
def test_fit_rejects_bad_input(probs, labels):
    with pytest.raises(ValueError):
        fit_temperature(probs, labels)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0, 1.0), (0.1, float("inf")), (1.0,)])
def test_fit_rejects_bad_bounds(bounds):
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(np.full((2, 2), 0.5), [0, 1], bounds=bounds)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(t):
    with pytest.raises(ValueError, match="temperature"):
        scale_probs(np.full((2, 2), 0.5), t)
    with pytest.raises(ValueError, match="temperature"):
        calibration_report(np.full((2, 2), 0.5), [0, 1], t)


def test_usable_temperature_leaves_a_fit_that_ran_to_the_lower_bound_unscaled():
    from ensemble.scores.calibration import DEFAULT_BOUNDS, usable_temperature

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    # every row right with some room: the NLL keeps falling as T -> 0, the fit stops at the bound
    right = np.full((60, 4), 0.1)
    right[np.arange(60), labels] = 0.7
    assert fit_temperature(right, labels) == pytest.approx(DEFAULT_BOUNDS[0], rel=1e-6)
    assert usable_temperature(right, labels) == (1.0, True)
    # one confident mistake among them: a finite optimum inside the range, kept as fitted
    mixed = right.copy()
    mixed[0] = np.roll(mixed[0], 1)
    t = fit_temperature(mixed, labels)
    assert DEFAULT_BOUNDS[0] * 1.01 < t < 1.0 and usable_temperature(mixed, labels) == (t, False)
    # every row confidently wrong: the fit runs to the upper bound (near uniform), which is kept
    wrong = np.roll(right, 1, axis=1)
    assert usable_temperature(wrong, labels) == (fit_temperature(wrong, labels), False)
    assert fit_temperature(wrong, labels) == pytest.approx(DEFAULT_BOUNDS[1], rel=1e-6)
