"""Greedy forward ensemble selection with replacement (Caruana et al. 2004), minimising NLL.

Start from an empty ensemble; each round add the member (repeats allowed) whose addition gives
the lowest NLL of the weighted mean; keep the best prefix seen. Repeats turn counts into
weights, so the result is a weighted soft vote (``weighted_vote``) that predict/serve can use.

Scoring with a mask (out-of-bag rows)
-------------------------------------
``mask[m, r]`` says member m may be used for row r (out of bag: member m never drew row r).
A selection's prediction on row r is its weighted vote over the *selected members usable on r*,
renormalised over those members: the out-of-bag analogue of the weighted vote, exactly as
``metrics.oob_vote`` is the out-of-bag analogue of the soft vote. When no selected member is
usable on r, the row gets the uniform distribution (1 / classes): the selection has nothing to
say about it. Why:
  * every candidate in every round is scored on the same rows (those with any usable member,
    the rows ``metrics.oob_scores`` scores), so the NLLs compared are comparable;
  * no row is ever predicted by a member that trained on it;
  * the selection is used on new images with all its members, so rows its members cannot
    score must count against it, not for it. (Scoring such rows with the full ensemble's
    out-of-bag vote instead lets one member plus that strong fallback beat every larger
    selection: on the demo that rule keeps 1 of 9 members and loses 5 points of val
    accuracy.) Dropping the rows instead would compare candidates on different rows;
  * with ``mask=None`` it is exactly Caruana's rule on a validation split.
Rows that no member may use are dropped and counted (``n_rows_dropped``).

Pure numpy, no Ray, no torch: ``member_probs`` is (members, n, classes), ``labels`` is (n,).
"""

from __future__ import annotations

import numpy as np

from ensemble.scores.metrics import PROB_FLOOR, check_labels
from ensemble.scores.vote import check_member_probs

_TIE_RTOL = 1e-12  # prefixes whose NLLs differ by less than this (relative) count as equally good


def _checked_member_probs(member_probs) -> np.ndarray:
    member_probs = check_member_probs(member_probs)  # (members, n, classes) float64
    if 0 in member_probs.shape:
        raise ValueError(f"expected non-empty member_probs (members, n, classes), got shape {member_probs.shape}")
    if not np.isfinite(member_probs).all() or (member_probs < 0).any():
        raise ValueError("member_probs must be finite and >= 0")
    return member_probs


def greedy_selection(member_probs, labels, *, mask=None, rounds: int | None = None) -> dict:
    """Caruana greedy selection with replacement over ``rounds`` rounds (default 2 * members).

    member_probs: (members, n, classes); labels: (n,); mask: optional bool (members, n), True
    where member m may be used for row r (pass ``counts == 0`` for out-of-bag rows); None means
    every member is usable on every row (a validation split). Ties between candidates go to the
    lowest member index, ties between prefixes (within 1e-12 relative) to the shortest, so the
    result is deterministic. Not guaranteed to beat the uniform average, though it usually does. Returns
      "weights"         (members,) float64, counts / total, sums to 1
      "counts"          (members,) int64, times each member was added in the chosen prefix
      "order"           list of member indices in the order added (the chosen prefix)
      "nll"             NLL of the chosen prefix (lowest seen over the rounds)
      "nll_curve"       list (rounds,), NLL after each round
      "selected"        sorted member indices with weight > 0
      "n_rows_scored"   rows with at least one usable member
      "n_rows_dropped"  rows no member may use, left out of every score
    """
    member_probs = _checked_member_probs(member_probs)
    members, n, classes = member_probs.shape
    labels = check_labels(labels, n, classes)
    rounds = 2 * members if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if mask is None:
        usable = np.ones((members, n), dtype=bool)
    else:
        usable = np.asarray(mask)
        if usable.dtype != np.bool_ or usable.shape != (members, n):
            raise ValueError(f"mask must be bool (members, n) = {(members, n)}, got {usable.dtype} "
                             f"{usable.shape}; for out-of-bag rows pass bootstrap counts == 0")
    covered = usable.any(axis=0)  # (n,)
    if not covered.any():
        raise ValueError("mask leaves no row with a usable member; nothing to score")
    rows = np.flatnonzero(covered)
    # NLL needs only the true class's probability, so work on (members, rows) not (.., classes)
    p_true = member_probs[:, rows, labels[rows]]  # (members, rows)
    use = usable[:, rows].astype(np.float64)  # (members, rows)
    fallback = np.full(rows.size, 1.0 / classes)  # (rows,) uncovered rows: the uniform distribution
    num = np.zeros(rows.size)  # sum over the selection of count * usable * p_true
    den = np.zeros(rows.size)  # sum over the selection of count * usable
    order, curve = [], []
    for _ in range(rounds):
        cand_num, cand_den = num + use * p_true, den + use  # (members, rows): each member added
        pred = np.broadcast_to(fallback, cand_num.shape).copy()
        np.divide(cand_num, cand_den, out=pred, where=cand_den > 0)
        scores = -np.log(np.clip(pred, PROB_FLOOR, None)).mean(axis=1)  # (members,) as metrics.nll
        best = int(np.argmin(scores))  # first minimum: lowest member index wins ties
        num, den = cand_num[best], cand_den[best]
        order.append(best)
        curve.append(float(scores[best]))
    # shortest prefix with the lowest NLL; gains below rounding noise (k*p/k != p in floats) are ties
    k = int(np.argmax(np.asarray(curve) <= min(curve) + _TIE_RTOL * abs(min(curve)))) + 1
    counts = np.bincount(order[:k], minlength=members).astype(np.int64)
    return {
        "weights": counts / counts.sum(),
        "counts": counts,
        "order": order[:k],
        "nll": curve[k - 1],
        "nll_curve": curve,
        "selected": np.flatnonzero(counts).tolist(),
        "n_rows_scored": int(rows.size),
        "n_rows_dropped": int(n - rows.size),
    }


def weighted_vote(member_probs, weights) -> np.ndarray:
    """sum_m w_m p_m / sum_m w_m: (members, n, classes) and (members,) -> (n, classes) float64.

    Weights must be finite, >= 0 and not all zero; uniform weights give ``vote.soft_vote``.
    """
    member_probs = _checked_member_probs(member_probs)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != member_probs.shape[:1]:
        raise ValueError(f"weights must be (members,) = ({member_probs.shape[0]},), got {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights.tolist()}")
    return np.einsum("m,mnc->nc", weights, member_probs) / weights.sum()
