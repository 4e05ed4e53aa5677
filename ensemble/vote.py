"""Soft voting: the maths of combining members (numpy only, no Ray, no torch)."""

from __future__ import annotations

import numpy as np


def soft_vote(member_probs: np.ndarray) -> np.ndarray:
    """Average the members' class probabilities.

    member_probs: (members, n, classes), each row a probability distribution.
    Returns (n, classes); each row sums to 1 when the inputs' rows do.
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"soft_vote expects (members, n, classes), got shape {probs.shape}")
    return probs.mean(axis=0)


def vote_labels(probs: np.ndarray) -> np.ndarray:
    """Predicted class index per row of (n, classes) probabilities (ties: lowest index)."""
    return np.asarray(probs).argmax(axis=1)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float((vote_labels(probs) == labels).mean())
