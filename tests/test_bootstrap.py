"""Bootstrap sampling: pure functions of seeds."""

import math

import numpy as np
import pytest

from ensemble.bootstrap import bootstrap_counts, epoch_seed, member_seeds


# ------------------------------------------------------------------ bootstrap_counts

def test_bootstrap_counts_same_args_give_identical_array():
    a = bootstrap_counts(123, 500, 500)
    b = bootstrap_counts(123, 500, 500)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_rows,n_samples", [(1, 1), (10, 10), (1000, 1000), (7, 50), (1000, 3)])
def test_bootstrap_counts_shape_and_sum(n_rows, n_samples):
    counts = bootstrap_counts(5, n_rows, n_samples)
    assert counts.shape == (n_rows,)
    assert counts.sum() == n_samples
    assert (counts >= 0).all()


def test_bootstrap_counts_different_member_seeds_differ():
    s0, s1 = member_seeds(0, 2)
    a = bootstrap_counts(s0, 1000, 1000)
    b = bootstrap_counts(s1, 1000, 1000)
    assert not np.array_equal(a, b)
    # both are valid bootstrap samples of the same size
    assert a.sum() == b.sum() == 1000


@pytest.mark.parametrize("seed", member_seeds(0, 3))
def test_bootstrap_counts_in_bag_fraction_is_one_minus_one_over_e(seed):
    n = 20000
    counts = bootstrap_counts(seed, n, n)
    frac = float((counts > 0).mean())
    assert abs(frac - (1.0 - 1.0 / math.e)) < 0.01


def test_bootstrap_counts_single_row_takes_every_draw():
    np.testing.assert_array_equal(bootstrap_counts(9, 1, 17), np.array([17]))


def test_bootstrap_size_smaller_than_rows():
    counts = bootstrap_counts(1, 100, 10)
    assert counts.shape == (100,)
    assert counts.sum() == 10
    assert (counts > 0).sum() <= 10


def test_bootstrap_size_larger_than_rows():
    counts = bootstrap_counts(1, 10, 1000)
    assert counts.shape == (10,)
    assert counts.sum() == 1000
    # 100 draws per row on average: every row is drawn
    assert (counts > 0).all()


@pytest.mark.parametrize("n_rows,n_samples", [(0, 10), (10, 0), (-1, 10), (10, -5), (0, 0)])
def test_bootstrap_counts_bad_args_raise(n_rows, n_samples):
    with pytest.raises(ValueError):
        bootstrap_counts(0, n_rows, n_samples)


# ------------------------------------------------------------------ member_seeds

def test_member_seeds_deterministic():
    assert member_seeds(42, 9) == member_seeds(42, 9)


def test_member_seeds_distinct_ints():
    seeds = member_seeds(0, 50)
    assert len(seeds) == 50
    assert len(set(seeds)) == 50
    assert all(type(s) is int for s in seeds)
    assert all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize("seed,n", [(0, 9), (7, 3), (2**31, 5)])
def test_member_seeds_match_seedsequence_spawn(seed, n):
    expected = [int(np.random.SeedSequence(seed).spawn(n)[i].generate_state(1, dtype=np.uint32)[0])
                for i in range(n)]
    assert member_seeds(seed, n) == expected


def test_member_seeds_differ_across_run_seeds():
    a, b = member_seeds(0, 9), member_seeds(1, 9)
    assert a != b
    assert not set(a) & set(b)


@pytest.mark.parametrize("k,n", [(1, 9), (3, 9), (5, 20)])
def test_member_seeds_prefix_stable(k, n):
    assert member_seeds(0, n)[:k] == member_seeds(0, k)


def test_member_seeds_zero_members_is_empty():
    assert member_seeds(0, 0) == []


# ------------------------------------------------------------------ epoch_seed

def test_epoch_seed_deterministic():
    assert epoch_seed(12345, 3) == epoch_seed(12345, 3)
    assert epoch_seed(12345, 3) == int(
        np.random.SeedSequence([12345, 3]).generate_state(1, dtype=np.uint32)[0])


def test_epoch_seed_differs_across_epochs_and_members():
    per_epoch = [epoch_seed(12345, e) for e in range(20)]
    assert len(set(per_epoch)) == 20
    assert epoch_seed(1, 0) != epoch_seed(2, 0)
    assert all(type(s) is int and 0 <= s < 2**32 for s in per_epoch)
