"""Temperature scaling of the ensemble after averaging (Rahaman & Thiery 2021).

Averaging calibrated members gives an under-confident ensemble, and averaging over-confident
members may still be over-confident; one temperature fitted on held-out rows fixes either
without changing any predicted class. The temperature acts on the *averaged* probabilities:
``scaled = softmax(log(max(p, PROB_FLOOR)) / T)``, T > 1 softens, T < 1 sharpens.

Pure numpy, no Ray, no torch, no scipy: ``probs`` is (n, classes), ``labels`` is (n,).
"""

from __future__ import annotations

import math

import numpy as np

from ensemble.scores.metrics import PROB_FLOOR, check_labels, summary_metrics

DEFAULT_BOUNDS = (0.05, 20.0)  # search range for T; real ensembles land well inside it
_LOG_T_TOL = 1e-10  # bisection stops when the log-T bracket is this narrow (~1e-10 relative in T)


def _log_probs(probs) -> np.ndarray:
    """(n, classes) probabilities -> (n, classes) clipped log-probabilities, checked finite and >= 0."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 1:
        raise ValueError(f"expected non-empty probs (n, classes), got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        # NaN rows come from oob_vote on rows every member drew: drop them before calibrating
        raise ValueError("probs must be finite and >= 0; drop rows without out-of-bag members first")
    return np.log(np.maximum(probs, PROB_FLOOR))  # same floor as metrics.nll


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)  # max-shift: exp never overflows
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def scale_probs(probs, temperature: float) -> np.ndarray:
    """Temperature-scale averaged probabilities: (n, classes) -> (n, classes) float64.

    Rows of the result sum to 1. T = 1 returns the input renormalised (and floored at
    PROB_FLOOR). Dividing log-probabilities by T > 0 keeps their order, so the argmax of every
    row is unchanged (up to exact floating-point ties between near-equal classes).
    """
    return _softmax(_log_probs(probs) / _check_temperature(temperature))


def fit_temperature(probs, labels, *, bounds: tuple[float, float] = DEFAULT_BOUNDS) -> float:
    """The temperature T in ``bounds`` minimising the NLL of ``scale_probs(probs, T)``.

    probs: (n, classes) averaged ensemble probabilities on held-out rows; labels: (n,).
    With b = 1/T the NLL is mean(logsumexp(b * l) - b * l_y) for l = log p: convex in b, with
    derivative mean(E_softmax(b l)[l] - l_y), which is non-decreasing in b. We bisect on the sign
    of that derivative over log T: deterministic, no step size to tune, and it converges to a
    bound when the optimum lies outside ``bounds``. Returns a Python float.
    """
    if len(bounds) != 2 or not all(math.isfinite(float(b)) for b in bounds) \
            or not 0 < float(bounds[0]) < float(bounds[1]):
        raise ValueError(f"bounds must be (low, high) with 0 < low < high, both finite, got {bounds!r}")
    logp = _log_probs(probs)  # (n, classes)
    labels = check_labels(labels, *logp.shape)
    logp_true = logp[np.arange(labels.size), labels]  # (n,)

    def slope(log_t: float) -> float:  # d NLL / d(1/T) at T = exp(log_t)
        q = _softmax(logp * math.exp(-log_t))
        return float(((q * logp).sum(axis=1) - logp_true).mean())

    lo, hi = math.log(float(bounds[0])), math.log(float(bounds[1]))
    while hi - lo > _LOG_T_TOL:
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:  # NLL still falls as 1/T falls: the optimum has a larger T
            lo = mid
        else:
            hi = mid
    return float(math.exp(0.5 * (lo + hi)))


def usable_temperature(probs, labels) -> tuple[float, bool]:
    """(T, ran to the lower bound): ``fit_temperature``, except that a fit that ran to the lower
    end of ``DEFAULT_BOUNDS`` gives T = 1 (probabilities left as they are).

    The NLL keeps falling as T -> 0 when the rows are classified without an error a temperature
    could weigh (a small or easy validation split): the fit then stops at the bound, and scaling
    by it would make every later prediction, right or wrong, near certain. A fit that runs to
    the upper bound is kept: it softens the vote towards uniform, which errs on the safe side."""
    t = fit_temperature(probs, labels)
    if t <= DEFAULT_BOUNDS[0] * (1 + 1e-6):
        return 1.0, True
    return t, False


def calibration_report(probs, labels, temperature: float) -> dict:
    """{"temperature": T, "before": summary_metrics(probs), "after": summary_metrics(scaled)}.

    probs: (n, classes); labels: (n,). Both summaries are computed on the same rows, so pass
    rows the temperature was *not* fitted on to get an honest "after".
    """
    temperature = _check_temperature(temperature)
    return {"temperature": temperature,
            "before": summary_metrics(probs, labels),
            "after": summary_metrics(scale_probs(probs, temperature), labels)}
