"""Scores for members and the ensemble: accuracy, NLL, calibration, diversity, ensemble size, OOB.

Pure numpy, no Ray and no torch. Every function takes class probabilities as arrays:
``probs`` is (n, classes), ``member_probs`` is (members, n, classes), ``labels`` is (n,) class
indices. Results are plain Python floats, ints and lists, so they go straight into report.json.
"""

from __future__ import annotations

import numpy as np

from ensemble.scores.vote import accuracy, check_member_probs, soft_vote, vote_labels

PROB_FLOOR = 1e-12  # NLL clips probabilities here so a confident miss costs log(1e12) ~ 27.6, not inf


def _probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"expected probs (n, classes) and labels (n,), got {probs.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    return probs, labels.astype(np.int64)


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true class, in nats.

    probs: (n, classes); labels: (n,). Probabilities are clipped below at 1e-12.
    NaN when n == 0.
    """
    probs, labels = _probs_labels(probs, labels)
    if labels.size == 0:
        return float("nan")
    p_true = probs[np.arange(labels.size), labels]  # (n,)
    return float(-np.log(np.clip(p_true, PROB_FLOOR, None)).mean())


def calibration_bins(probs, labels, bins: int = 15) -> dict:
    """Per-bin counts, mean confidence and accuracy: what ECE and the reliability diagram use.

    probs: (n, classes); labels: (n,). Confidence is the top probability of each row; bin m
    holds confidences in ((m-1)/bins, m/bins] (Guo et al. 2017), a confidence of 0 falls in
    the first bin. Returns numpy arrays: "edges" (bins + 1,), and "count", "confidence",
    "accuracy" (bins,); confidence and accuracy are NaN for empty bins.
    """
    probs, labels = _probs_labels(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = probs.max(axis=1)  # (n,)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)  # (n,)
    # right=True: edges[m-1] < conf <= edges[m]; conf above 1 by rounding lands in the last bin
    bin_of = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)  # (n,)
    count = np.bincount(bin_of, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(bin_of, weights=conf, minlength=bins) / count
        acc = np.bincount(bin_of, weights=correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": acc}


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): sum_m |B_m|/n * |acc(B_m) - conf(B_m)|.

    probs: (n, classes); labels: (n,). Confidence = top probability; ``bins`` equal-width
    bins over [0, 1]. 0 for a perfectly calibrated model, up to 1. NaN when n == 0.
    """
    cal = calibration_bins(probs, labels, bins)
    n = cal["count"].sum()
    if n == 0:
        return float("nan")
    used = cal["count"] > 0
    gaps = np.abs(cal["accuracy"][used] - cal["confidence"][used])
    return float((cal["count"][used] / n * gaps).sum())


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over rows of sum over classes of (p - onehot(label))^2.

    probs: (n, classes); labels: (n,). 0 for confident correct predictions, 1 - 1/classes for
    the uniform prediction, at most 2. NaN when n == 0.
    """
    probs, labels = _probs_labels(probs, labels)
    if labels.size == 0:
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(labels.size), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def predictive_entropy(probs) -> np.ndarray:
    """Entropy of each row's predicted distribution, in nats: (n, classes) -> (n,).

    0 for a one-hot row, log(classes) for the uniform row (0 * log 0 counts as 0).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected probs (n, classes), got shape {probs.shape}")
    logp = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logp).sum(axis=1)


def disagreement(member_probs, ensemble_top=None) -> np.ndarray:
    """Per row, the fraction of members whose top-1 class differs from the soft vote's top-1
    (or from ``ensemble_top`` (n,), the ensemble's labels under another vote, when given).

    member_probs: (members, n, classes) -> (n,) floats in [0, 1]. Ties go to the lowest class
    index, for members and for the vote alike.
    """
    member_probs = check_member_probs(member_probs)
    if ensemble_top is None:
        ensemble_top = vote_labels(soft_vote(member_probs))  # (n,)
    member_top = member_probs.argmax(axis=2)  # (members, n)
    return (member_top != ensemble_top[None, :]).mean(axis=0)


def summary_metrics(probs, labels) -> dict:
    """{"accuracy", "nll", "ece", "brier"} of (n, classes) probabilities against (n,) labels."""
    probs, labels = _probs_labels(probs, labels)
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": ece(probs, labels), "brier": brier(probs, labels)}


def size_curve(member_probs, labels, *, n_orders: int = 20, seed: int = 0) -> dict:
    """Accuracy and NLL of the soft vote of the first k members, for k = 1..members.

    member_probs: (members, n, classes); labels: (n,). Returns lists of length members:
      "k"                              1..members
      "accuracy", "nll"                the first k members in member order (0, 1, 2, ...)
      "accuracy_mean", "nll_mean"      mean over ``n_orders`` random member orders
      "accuracy_std", "nll_std"        their standard deviation over those orders
    plus "n_orders" and "seed" (the orders are ``np.random.default_rng(seed).permutation``).
    In member order, k = members is exactly ``soft_vote(member_probs)``.
    """
    member_probs = check_member_probs(member_probs)
    _probs_labels(member_probs[0], labels)
    if n_orders < 1:
        raise ValueError(f"n_orders must be >= 1, got {n_orders}")
    members = member_probs.shape[0]
    rng = np.random.default_rng(seed)
    orders = [np.arange(members)] + [rng.permutation(members) for _ in range(n_orders)]
    acc = np.empty((len(orders), members))
    loss = np.empty((len(orders), members))
    for o, order in enumerate(orders):
        running = np.zeros(member_probs.shape[1:])  # (n, classes): sum of the first k members
        for k, member in enumerate(order, start=1):
            running += member_probs[member]
            vote = running / k
            acc[o, k - 1] = accuracy(vote, labels)
            loss[o, k - 1] = nll(vote, labels)
    return {
        "k": list(range(1, members + 1)),
        "accuracy": acc[0].tolist(), "nll": loss[0].tolist(),
        "accuracy_mean": acc[1:].mean(axis=0).tolist(), "nll_mean": loss[1:].mean(axis=0).tolist(),
        "accuracy_std": acc[1:].std(axis=0).tolist(), "nll_std": loss[1:].std(axis=0).tolist(),
        "n_orders": int(n_orders), "seed": int(seed),
    }


def oob_vote(member_train_probs, counts) -> tuple[np.ndarray, np.ndarray]:
    """Each training row soft-voted only by the members that did not draw it (count 0).

    member_train_probs: (members, n_train, classes), every member's probabilities on every
    training row; counts: (members, n_train), how often each member drew each row (the
    bootstrap counts). Returns (probs (n_train, classes), n_oob_members (n_train,)); rows that
    every member drew have no out-of-bag member and get NaN probabilities.
    """
    member_train_probs = check_member_probs(member_train_probs)
    counts = np.asarray(counts)
    if counts.shape != member_train_probs.shape[:2]:
        raise ValueError(f"counts must be (members, n_train) = {member_train_probs.shape[:2]}, "
                         f"got {counts.shape}")
    out_of_bag = (counts == 0).astype(np.float64)  # (members, n_train)
    n_oob = out_of_bag.sum(axis=0)  # (n_train,)
    summed = np.einsum("mn,mnc->nc", out_of_bag, member_train_probs)  # (n_train, classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = summed / n_oob[:, None]
    return probs, n_oob.astype(np.int64)


def oob_scores(member_train_probs, counts, labels) -> dict:
    """Out-of-bag accuracy per member and of the ensemble (scikit-learn's oob_score semantics).

    member_train_probs: (members, n_train, classes); counts: (members, n_train) bootstrap
    counts; labels: (n_train,). A member is scored on the rows it never drew; the ensemble on
    each row soft-voted by exactly the members that never drew it (``oob_vote``). Rows that
    every member drew are left out, not guessed. Returns
      "member_acc"          list (members,), NaN for a member that drew every row
      "member_n_oob"        list (members,), rows out of bag for that member
      "acc", "nll"          the ensemble's OOB accuracy and NLL over the scored rows (NaN if none)
      "n_rows_scored"       rows with at least one out-of-bag member
      "n_rows_without_oob"  rows drawn by every member, excluded
    """
    member_train_probs = check_member_probs(member_train_probs)
    _probs_labels(member_train_probs[0], labels)
    labels = np.asarray(labels, dtype=np.int64)
    probs, n_oob = oob_vote(member_train_probs, counts)
    out_of_bag = np.asarray(counts) == 0  # (members, n_train)
    scored = n_oob > 0
    return {
        "member_acc": [accuracy(p[mask], labels[mask]) for p, mask in zip(member_train_probs, out_of_bag)],
        "member_n_oob": out_of_bag.sum(axis=1).astype(int).tolist(),
        "acc": accuracy(probs[scored], labels[scored]),
        "nll": nll(probs[scored], labels[scored]),
        "n_rows_scored": int(scored.sum()),
        "n_rows_without_oob": int((~scored).sum()),
    }


def check_labels(labels, n: int, classes: int) -> np.ndarray:
    """``labels`` as (n,) int64 class indices in [0, classes), or a ValueError saying what is wrong."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected integer labels ({n},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)
