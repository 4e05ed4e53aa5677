"""How members are combined: the one place that decides (numpy only, no Ray, no torch).

Every consumer (scores, figures, the printed table, predictions) asks ``ensemble_probs`` /
``ensemble_labels`` with the run's rule, so a new rule (weights, say) is added here once.
Shapes: ``member_probs`` is (members, n, classes), ``probs`` is (n, classes).
"""

from __future__ import annotations

import numpy as np

RULES = ("soft", "hard")


def check_member_probs(member_probs) -> np.ndarray:
    member_probs = np.asarray(member_probs, dtype=np.float64)
    if member_probs.ndim != 3 or member_probs.shape[0] < 1:
        raise ValueError(f"expected member_probs (members, n, classes), got shape {member_probs.shape}")
    return member_probs


def soft_vote(member_probs: np.ndarray) -> np.ndarray:
    """Average the members' class probabilities: (members, n, classes) -> (n, classes).

    Each row sums to 1 when the inputs' rows do.
    """
    return check_member_probs(member_probs).mean(axis=0)


def hard_vote(member_probs) -> np.ndarray:
    """Majority vote of the members' top-1 classes: (members, n, classes) -> (n,) labels.

    A tie between classes with the same number of votes goes to the tied class with the larger
    probability summed over all members, then to the lowest class index.
    """
    member_probs = check_member_probs(member_probs)
    classes = member_probs.shape[2]
    member_top = member_probs.argmax(axis=2)  # (members, n)
    votes = (member_top[:, :, None] == np.arange(classes)).sum(axis=0)  # (n, classes)
    tied = votes == votes.max(axis=1, keepdims=True)  # (n, classes)
    summed = member_probs.sum(axis=0)  # (n, classes)
    return np.where(tied, summed, -np.inf).argmax(axis=1)  # argmax: first (lowest) index on ties


def ensemble_probs(member_probs) -> np.ndarray:
    """The ensemble's probabilities under any rule: the soft vote (a hard vote has no
    probabilities of its own, so its report scores NLL/ECE/Brier on the soft vote's)."""
    return soft_vote(member_probs)


def ensemble_labels(member_probs, rule: str) -> np.ndarray:
    """The ensemble's predicted class per row under ``rule`` (soft | hard): (n,) int64."""
    if rule == "soft":
        return vote_labels(soft_vote(member_probs))
    if rule == "hard":
        return hard_vote(member_probs)
    raise ValueError(f"vote rule {rule!r}: choose one of {', '.join(RULES)}")


def rule_title(rule: str) -> str:
    """How tables and reports name the ensemble: ``ensemble (soft vote)``."""
    return f"ensemble ({rule} vote)"


def vote_labels(probs: np.ndarray) -> np.ndarray:
    """Predicted class index per row of (n, classes) probabilities (ties: lowest index)."""
    return np.asarray(probs).argmax(axis=1)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float((vote_labels(probs) == labels).mean())


def vote_outputs(member_probs, rule: str, temperature: float = 1.0, weights=None) -> dict:
    """What a run says about each image, from its members' probabilities (members, n, classes):
      "probs"        (n, classes) the vote's probabilities scaled by ``temperature`` (rows sum to 1)
      "label"        (n,) class index under the vote ``rule`` (scaling never changes a row's top class)
      "entropy"      (n,) predictive entropy of "probs", in nats
      "disagreement" (n,) fraction of members whose top-1 class differs from the vote's
    With ``weights`` (members,) the vote is the weighted soft vote of a member selection
    (``selection.weighted_vote``; report.json's ``ensemble.selection``), labelled by its argmax
    whatever ``rule``, and disagreement counts members against that label. predictions.csv,
    probabilities.parquet (``write_predictions``) and the HTTP server (serve.py) all use this."""
    # imported here: calibration, metrics and selection import this module
    from ensemble.scores.calibration import scale_probs
    from ensemble.scores.metrics import disagreement, predictive_entropy
    from ensemble.scores.selection import weighted_vote

    if weights is None:
        vote, label, top = ensemble_probs(member_probs), ensemble_labels(member_probs, rule), None
    else:
        vote = weighted_vote(member_probs, weights)
        label = top = vote_labels(vote)
    probs = scale_probs(vote, temperature)  # (n, classes)
    return {"probs": probs, "label": label, "entropy": predictive_entropy(probs),
            "disagreement": disagreement(member_probs, top)}
