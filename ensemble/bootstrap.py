"""Bootstrap sampling as pure functions of seeds (no Ray here).

Member i's shard is fully determined by ``(member_seeds(seed, n)[i], n_rows, n_samples)``, so
it can be regenerated anywhere (on a restarted actor, for out-of-bag rows) without storing it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ensemble.errors import ConfigError

MAX_BOOTSTRAP_RATIO = 10  # rows drawn per member at most this many times the train split


def member_seeds(seed: int, members: int) -> list[int]:
    """One independent 32-bit seed per member, derived once from the run's seed."""
    children = np.random.SeedSequence(seed).spawn(members)
    return [int(child.generate_state(1, dtype=np.uint32)[0]) for child in children]


def bootstrap_counts(seed: int, n_rows: int, n_samples: int) -> np.ndarray:
    """How often each of ``n_rows`` rows is drawn in ``n_samples`` draws with replacement.

    Returns an int64 array of shape (n_rows,) that sums to ``n_samples``.
    """
    if n_rows < 1 or n_samples < 1:
        raise ValueError(f"bootstrap needs n_rows >= 1 and n_samples >= 1, got {n_rows}, {n_samples}")
    draws = np.random.default_rng(seed).integers(0, n_rows, size=n_samples)
    return np.bincount(draws, minlength=n_rows).astype(np.int64)


def epoch_seed(member_seed: int, epoch: int) -> int:
    """Seed for one member's epoch (shuffle order, augmentation draws)."""
    return int(np.random.SeedSequence([member_seed, epoch]).generate_state(1, dtype=np.uint32)[0])


def epoch_rows(counts: np.ndarray, seed: int) -> np.ndarray:
    """The shard's rows for one epoch, in training order: row ``i`` appears ``counts[i]`` times.

    A seeded permutation of ``np.repeat(arange(n_rows), counts)``, so a restarted member sees
    the same order. Returns int64 row ids, shape (counts.sum(),).
    """
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return np.random.default_rng(seed).permutation(rows)


def member_counts(bagging: str, seed: int, n_train: int, n_samples: int) -> np.ndarray:
    """How often the member draws each training row: its bootstrap counts, or all ones for ``full``."""
    if bagging == "full":
        return np.ones(n_train, dtype=np.int64)
    return bootstrap_counts(seed, n_train, n_samples)


def check_bootstrap_size(bootstrap_size: Optional[int], n_train: int) -> None:
    """ConfigError when ``--bootstrap-size`` asks more than MAX_BOOTSTRAP_RATIO x the train rows
    (each member would hold that many row ids per epoch; the recipe draws n_train)."""
    if bootstrap_size is not None and bootstrap_size > MAX_BOOTSTRAP_RATIO * n_train:
        raise ConfigError(f"--bootstrap-size {bootstrap_size}: at most {MAX_BOOTSTRAP_RATIO} x the train split's "
                          f"{n_train} images ({MAX_BOOTSTRAP_RATIO * n_train}); the default draws {n_train}")
