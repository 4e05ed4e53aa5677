"""Analysis layer: metric values on hand-made inputs, figures written as real PNGs, the Markdown report."""

import math

import numpy as np
import pytest

from ensemble import figures
from ensemble.markdown import render_report_md
from ensemble.bootstrap import bootstrap_counts, member_seeds
from ensemble.scores.metrics import (brier, calibration_bins, disagreement, ece, nll, oob_scores, oob_vote,
                              predictive_entropy, size_curve, summary_metrics)
from ensemble.scores.vote import accuracy, hard_vote, soft_vote

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _binary(p_class1) -> np.ndarray:
    """(..., n) probabilities of class 1 -> (..., n, 2) distributions."""
    p = np.asarray(p_class1, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=-1)


def _random_members(members=5, n=300, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(classes), size=(members, n)), rng.integers(0, classes, size=n)


# --- NLL, Brier, entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 4, 100])
def test_nll_brier_entropy_of_one_hot_correct_and_uniform(classes):
    labels = np.arange(12) % classes
    one_hot = np.eye(classes)[labels]
    uniform = np.full((12, classes), 1.0 / classes)
    assert nll(one_hot, labels) == 0.0
    assert brier(one_hot, labels) == 0.0
    np.testing.assert_allclose(predictive_entropy(one_hot), np.zeros(12), atol=0)
    assert nll(uniform, labels) == pytest.approx(math.log(classes), rel=1e-12)
    assert brier(uniform, labels) == pytest.approx(1.0 - 1.0 / classes, rel=1e-12)
    np.testing.assert_allclose(predictive_entropy(uniform), np.full(12, math.log(classes)), rtol=1e-12)


def test_nll_hand_computed_and_clipped_at_1e12():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])
    labels = np.array([0, 1, 2])  # the last row gives the true class probability 0
    expected = -(math.log(0.5) + math.log(0.9) + math.log(1e-12)) / 3
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-12)


def test_brier_hand_computed():
    probs = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    # row 0: 0.25 + 0.0625 + 0.0625; row 1 (wrong, confident): 1 + 0 + 1
    assert brier(probs, [0, 1]) == pytest.approx((0.375 + 2.0) / 2, rel=1e-12)


def test_nll_and_brier_agree_with_scikit_learn():
    from sklearn.metrics import brier_score_loss, log_loss

    (probs, *_), labels = _random_members(members=1, n=500, classes=5, seed=3)
    assert nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(5)), rel=1e-9)
    assert brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=range(5)), rel=1e-9)


def test_entropy_hand_computed():
    probs = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(predictive_entropy(probs), [math.log(2), math.log(4), 0.0], rtol=1e-12, atol=0)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="probs \\(n, classes\\) and labels \\(n,\\)"):
        nll(np.full((3, 2), 0.5), [0, 1])
    with pytest.raises(ValueError, match="labels must lie in"):
        brier(np.full((2, 2), 0.5), [0, 2])


# --- ECE --------------------------------------------------------------------------------------

def test_ece_is_zero_when_accuracy_equals_confidence_in_every_bin():
    # 10 rows at confidence 0.8 with 8 right, 5 at 0.6 with 3 right, 4 at 1.0 all right
    probs = _binary([0.8] * 10 + [0.6] * 5 + [1.0] * 4)
    labels = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 2 + [1] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_near_zero_when_labels_are_drawn_from_the_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.5), size=200_000)
    labels = (rng.random((200_000, 1)) > probs.cumsum(axis=1)).sum(axis=1)  # one draw per row
    labels = np.minimum(labels, 4)  # cumsum can end at 1 - 1e-16
    assert ece(probs, labels) < 0.01


def test_ece_of_over_confident_predictions_hand_computed():
    # one bin: confidence 0.9, half right -> |0.5 - 0.9| = 0.4
    assert ece(_binary([0.9] * 10), [1] * 5 + [0] * 5) == pytest.approx(0.4, abs=1e-12)
    # two bins: 4 rows at 0.95 with 2 right, 6 rows at 0.7 with 3 right
    probs = _binary([0.95] * 4 + [0.7] * 6)
    labels = [1, 1, 0, 0] + [1, 1, 1, 0, 0, 0]
    assert ece(probs, labels) == pytest.approx(0.4 * 0.45 + 0.6 * 0.2, abs=1e-12)


def test_calibration_bins_use_right_closed_equal_width_bins():
    probs = _binary([0.95, 0.7, 0.7, 0.55])  # confidences 0.95, 0.7, 0.7, 0.55
    cal = calibration_bins(probs, [1, 1, 0, 0], bins=15)
    np.testing.assert_allclose(cal["edges"], np.linspace(0, 1, 16))
    expected_count = np.zeros(15, dtype=int)
    expected_count[[14, 10, 8]] = [1, 2, 1]  # 0.95 in (14/15, 1], 0.7 in (10/15, 11/15], 0.55 in (8/15, 9/15]
    np.testing.assert_array_equal(cal["count"], expected_count)
    assert cal["accuracy"][10] == 0.5 and cal["accuracy"][8] == 0.0
    assert cal["confidence"][10] == pytest.approx(0.7)
    assert np.isnan(cal["accuracy"][0])
    # 1.0 lands in the last bin, not past it
    assert calibration_bins(_binary([1.0]), [1], bins=15)["count"][14] == 1


# --- disagreement, hard vote --------------------------------------------------------------------

def test_disagreement_hand_made():
    member_probs = np.array([
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2]],
        [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]],
        [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7]],
    ])
    # soft vote: class 0 (all agree), class 1 (member 1 says 2), class 2 (members 0, 1 say 0, 1)
    np.testing.assert_allclose(disagreement(member_probs), [0.0, 1 / 3, 2 / 3], atol=1e-12)


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
    member_probs, _ = _random_members(members=5, n=200, classes=2, seed=1)
    tops = member_probs.argmax(axis=2)
    np.testing.assert_array_equal(hard_vote(member_probs), (tops.sum(axis=0) >= 3).astype(int))


# --- ensemble size curve ----------------------------------------------------------------------

def test_size_curve_end_points_match_members_and_full_soft_vote():
    member_probs, labels = _random_members(members=5, n=300, classes=4, seed=2)
    curve = size_curve(member_probs, labels, n_orders=7, seed=11)
    assert curve["k"] == [1, 2, 3, 4, 5]
    full = soft_vote(member_probs)
    assert curve["accuracy"][0] == accuracy(member_probs[0], labels)
    assert curve["nll"][0] == pytest.approx(nll(member_probs[0], labels), rel=1e-12)
    assert curve["accuracy"][1] == accuracy(member_probs[:2].mean(axis=0), labels)
    assert curve["accuracy"][-1] == accuracy(full, labels)
    assert curve["nll"][-1] == pytest.approx(nll(full, labels), rel=1e-12)
    # every random order ends on the same full vote
    assert curve["accuracy_mean"][-1] == pytest.approx(accuracy(full, labels), abs=1e-12)
    assert curve["nll_mean"][-1] == pytest.approx(nll(full, labels), rel=1e-9)
    assert curve["accuracy_std"][-1] == pytest.approx(0.0, abs=1e-12)


def test_size_curve_random_orders_are_the_seeded_permutations():
    member_probs, labels = _random_members(members=4, n=200, classes=3, seed=4)
    curve = size_curve(member_probs, labels, n_orders=6, seed=5)
    rng = np.random.default_rng(5)
    firsts = [rng.permutation(4)[0] for _ in range(6)]
    member_acc = [accuracy(p, labels) for p in member_probs]
    assert curve["accuracy_mean"][0] == pytest.approx(np.mean([member_acc[i] for i in firsts]), abs=1e-12)
    assert size_curve(member_probs, labels, n_orders=6, seed=5) == curve


# --- out-of-bag scores ------------------------------------------------------------------------

# 3 members, 5 training rows, 2 classes; members' probability of class 1:
OOB_P1 = np.array([
    [0.9, 0.2, 0.3, 0.6, 0.5],
    [0.1, 0.7, 0.8, 0.2, 0.5],
    [0.4, 0.6, 0.1, 0.4, 0.5],
])
OOB_COUNTS = np.array([
    [0, 1, 2, 0, 1],   # member 0 never drew rows 0, 3
    [1, 0, 0, 0, 2],   # member 1: rows 1, 2, 3
    [2, 1, 0, 0, 1],   # member 2: rows 2, 3; every member drew row 4
])
OOB_LABELS = np.array([1, 1, 0, 1, 0])


def test_oob_vote_averages_exactly_the_members_that_never_drew_the_row():
    probs, n_oob = oob_vote(_binary(OOB_P1), OOB_COUNTS)
    np.testing.assert_array_equal(n_oob, [1, 1, 2, 3, 0])
    np.testing.assert_allclose(probs[:4, 1], [0.9, 0.7, (0.8 + 0.1) / 2, (0.6 + 0.2 + 0.4) / 3], atol=1e-12)
    np.testing.assert_allclose(probs[:4].sum(axis=1), np.ones(4), atol=1e-12)
    assert np.isnan(probs[4]).all()


def test_oob_scores_hand_made():
    out = oob_scores(_binary(OOB_P1), OOB_COUNTS, OOB_LABELS)
    # OOB votes 0.9, 0.7, 0.45, 0.4 -> right, right, right, wrong (the all-member vote gets rows 0, 1 wrong)
    assert out["acc"] == 0.75
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.55) + math.log(0.4)) / 4)
    assert out["n_rows_scored"] == 4
    assert out["n_rows_without_oob"] == 1
    assert out["member_n_oob"] == [2, 3, 2]
    # member 0 on rows 0, 3: both right; member 1 on rows 1, 2, 3: one right; member 2 on rows 2, 3: one
    np.testing.assert_allclose(out["member_acc"], [1.0, 1 / 3, 0.5], atol=1e-12)


def test_oob_scores_rows_scored_are_rows_out_of_bag_for_some_member():
    n_train, members = 40, 3
    counts = np.stack([bootstrap_counts(s, n_train, n_train) for s in member_seeds(7, members)])
    member_probs, labels = _random_members(members=members, n=n_train, classes=3, seed=8)
    has_oob = (counts == 0).any(axis=0)
    assert 0 < has_oob.sum() < n_train  # the seed gives both kinds of row
    out = oob_scores(member_probs, counts, labels)
    assert out["n_rows_scored"] == has_oob.sum()
    assert out["n_rows_without_oob"] == n_train - has_oob.sum()
    probs, _ = oob_vote(member_probs, counts)
    assert out["acc"] == accuracy(probs[has_oob], labels[has_oob])


def test_oob_scores_without_any_out_of_bag_row_are_nan():
    out = oob_scores(_binary(OOB_P1), np.ones((3, 5), dtype=int), OOB_LABELS)
    assert out["n_rows_scored"] == 0 and out["n_rows_without_oob"] == 5
    assert math.isnan(out["acc"]) and all(math.isnan(a) for a in out["member_acc"])


def test_oob_counts_shape_must_match():
    with pytest.raises(ValueError, match="counts must be \\(members, n_train\\)"):
        oob_vote(_binary(OOB_P1), OOB_COUNTS[:, :4])


def test_summary_metrics_values():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    labels = np.array([0, 1, 1])
    out = summary_metrics(probs, labels)
    assert out == {"accuracy": 2 / 3, "nll": nll(probs, labels), "ece": ece(probs, labels),
                   "brier": brier(probs, labels)}
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.3)) / 3)


# --- figures ----------------------------------------------------------------------------------

def _check_png(path, *, min_side=300, max_side=3000):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    image = imread(path)
    height, width = image.shape[:2]
    assert min_side <= height <= max_side and min_side <= width <= max_side, image.shape
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return image


def test_figures_write_png_files(tmp_path):
    histories = [[{"epoch": e, "train_loss": 2.0 / e + 0.1 * m, "train_acc": 1 - 0.5 / e,
                   "val_loss": 2.2 / e, "val_acc": 0.9 - 0.5 / e} for e in range(1, 6)] for m in range(3)]
    member_probs, labels = _random_members(members=4, n=400, classes=5, seed=9)
    ensemble = soft_vote(member_probs)
    paths = [
        figures.training_curves(histories, str(tmp_path / "figs" / "training_curves.png")),
        figures.size_curve_plot(size_curve(member_probs, labels, n_orders=5), str(tmp_path / "size.png")),
        figures.reliability_diagram(ensemble, labels, str(tmp_path / "reliability.png")),
        figures.confusion_matrix_plot(labels, ensemble.argmax(axis=1), [f"class_{i}" for i in range(5)],
                                      str(tmp_path / "confusion_5.png")),
    ]
    assert paths[0] == str(tmp_path / "figs" / "training_curves.png")
    for path in paths:
        _check_png(path)


def test_reliability_diagram_with_scaled_probabilities_draws_them_beside_the_vote(tmp_path):
    from ensemble.scores.calibration import scale_probs

    member_probs, labels = _random_members(members=4, n=400, classes=5, seed=9)
    vote = soft_vote(member_probs)
    one = _check_png(figures.reliability_diagram(vote, labels, str(tmp_path / "one.png")))
    two = _check_png(figures.reliability_diagram(vote, labels, str(tmp_path / "two.png"),
                                                 scaled=scale_probs(vote, 0.5), temperature=0.5))
    assert two.shape[0] == one.shape[0] and two.shape[1] == 2 * one.shape[1]


def test_report_scaled_probs_are_what_val_after_scores():
    from ensemble.scores.scoring import report_scaled_probs, score_run

    val_member_probs, val_labels = _disagreeing_members(600, seed=1)
    train_member_probs, train_labels = _disagreeing_members(800, seed=2)
    counts = np.stack([bootstrap_counts(s, 800, 800) for s in member_seeds(3, 6)])
    vote = soft_vote(val_member_probs)
    for calibrate_on in ("val", "oob"):
        cal = score_run(val_member_probs, val_labels, rule="soft", seed=5, train_member_probs=train_member_probs,
                        train_labels=train_labels, counts=counts, calibrate_on=calibrate_on)["ensemble"]["calibration"]
        assert cal["fitted_on"] == calibrate_on
        assert summary_metrics(report_scaled_probs(cal, vote, val_labels, seed=5), val_labels) == cal["val_after"]


def test_confusion_matrix_plot_with_100_classes(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 100, size=3000)
    preds = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 100, size=3000))
    names = [f"n{i:03d}_some_long_wordnet_class_name" for i in range(100)]
    image = _check_png(figures.confusion_matrix_plot(labels, preds, names, str(tmp_path / "cm100.png")),
                       min_side=1000)
    assert image.shape[0] <= 2100 and image.shape[1] <= 2300


# --- Markdown report --------------------------------------------------------------------------

def _report():
    members = [{"member": i, "seed": 1000 + i, "val_acc": acc, "best_epoch": 3 + i,
                "metrics": {"accuracy": acc, "nll": 0.5 + i / 10, "ece": 0.05, "brier": 0.3},
                "oob_acc": acc - 0.01} for i, acc in enumerate([0.8, 0.82, 0.84])]
    return {
        "members": members,
        "ensemble": {"val_acc": 0.9, "metrics": {"accuracy": 0.9, "nll": 0.35, "ece": 0.02, "brier": 0.2},
                     "oob": {"acc": 0.88, "n_rows_scored": 950, "n_rows_without_oob": 50},
                     "size_curve": {"k": [1, 2, 3], "accuracy": [0.8, 0.86, 0.9]},
                     "vote": "soft", "bagging": "bootstrap"},
        "config": {"members": 3, "arch": "resnet18", "lr": 0.002, "output": None, "data": "a|b"},
        "seconds": {"train": 125.0, "vote": 4.25, "total": 3725.0},
    }


def test_render_report_md_tables_figures_config_and_times():
    md = render_report_md(_report(), {"training_curves": "training_curves.png",
                                      "confusion_matrix": "figures/confusion.png"})
    lines = md.splitlines()
    assert lines[0] == "# Ensemble report"
    assert "| member 0 | 1000 | 3 | 0.8000 | 0.5000 | 0.0500 | 0.3000 | 0.7900 |" in lines
    assert "| member 2 | 1002 | 5 | 0.8400 | 0.7000 | 0.0500 | 0.3000 | 0.8300 |" in lines
    assert "| mean of members |  |  | 0.8200 | 0.6000 | 0.0500 | 0.3000 | 0.8100 |" in lines
    assert ("| **ensemble (soft vote)** |  |  | **0.9000** | **0.3500** | **0.0200** | **0.2000** | **0.8800** |"
            in lines)
    assert "![Training curves](training_curves.png)" in lines
    assert "![Confusion matrix (ensemble)](figures/confusion.png)" in lines
    assert "+8.0 points" in md and "950 training rows" in md and "50 rows" in md
    assert "0.8000 → 0.8600 → 0.9000" in md
    assert "| members | `3` | arch | `resnet18` |" in lines
    assert "| lr | `0.002` | output | – |" in lines
    assert "| data | `a\\|b` |  |  |" in lines
    assert "| train | 2 min 05 s |" in lines and "| vote | 4.2 s |" in lines and "| total | 1 h 02 min 05 s |" in lines


def test_render_report_md_skips_missing_optional_parts():
    report = {"members": [{"member": 0, "seed": 5, "val_acc": 0.7, "best_epoch": 1},
                          {"member": 1, "seed": 6, "val_acc": 0.75, "best_epoch": 2}],
              "ensemble": {"val_acc": 0.78}}
    md = render_report_md(report, {})
    lines = md.splitlines()
    assert "| member 1 | 6 | 2 | 0.7500 | – | – | – |" in lines
    assert "| **ensemble (soft vote)** |  |  | **0.7800** | **–** | **–** | **–** |" in lines
    assert "OOB" not in md and "## Figures" not in md and "## Config" not in md and "## Time" not in md


def test_report_md_has_the_size_curve_table():
    from ensemble.markdown import render_report_md

    curve = {"k": [1, 2], "accuracy": [0.5, 0.75], "nll": [1.0, 0.5], "accuracy_mean": [0.6, 0.75],
             "nll_mean": [0.9, 0.5]}
    md = render_report_md({"members": [], "ensemble": {"val_acc": 0.75, "size_curve": curve}}, {})
    assert "| 1 | 0.5000 | 1.0000 | 0.6000 | 0.9000 |" in md
    assert "| 2 | 0.7500 | 0.5000 | 0.7500 | 0.5000 |" in md


# --- score_run: temperature scaling and ensemble selection ------------------------------------

NOISE_AT = 2  # index of the pure-noise member in _disagreeing_members


def _disagreeing_members(n, seed, good=5, classes=4):
    """Five members, each 90% confident and right 80% of the time (independently), and one pure-noise
    member at NOISE_AT. Their average is right more often than it says: under-confident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    right = rng.random((good, n)) < 0.8
    wrong = (labels + rng.integers(1, classes, size=(good, n))) % classes
    member_probs = np.full((good, n, classes), 0.1 / (classes - 1))
    np.put_along_axis(member_probs, np.where(right, labels, wrong)[:, :, None], 0.9, axis=2)
    noise = rng.dirichlet(np.ones(classes), size=n)[None]
    return np.concatenate([member_probs[:NOISE_AT], noise, member_probs[NOISE_AT:]]), labels


def _check_calibration_and_selection(ensemble, val_member_probs, val_labels, seed=0):
    """What holds wherever the temperature and the selection were fitted."""
    from ensemble.scores.calibration import fit_temperature, scale_probs
    from ensemble.scores.scoring import cross_fitted_scaling
    from ensemble.scores.selection import weighted_vote

    cal, sel = ensemble["calibration"], ensemble["selection"]
    vote = soft_vote(val_member_probs)
    assert isinstance(cal["temperature"], float) and cal["temperature"] < 1.0  # under-confident -> sharpen
    assert cal["at_bound"] is False and sel["at_bound"] is False
    assert cal["val_before"] == ensemble["metrics"] == summary_metrics(vote, val_labels)
    if cal["fitted_on"] == "val":  # scored cross-fitted: no row by a temperature that saw it
        scaled, folds = cross_fitted_scaling(vote, val_labels, seed=seed)
        assert cal["folds"] == folds == 5 and cal["val_after"] == summary_metrics(scaled, val_labels)
    else:
        assert "folds" not in cal
        assert cal["val_after"] == summary_metrics(scale_probs(vote, cal["temperature"]), val_labels)
    np.testing.assert_array_equal(scale_probs(vote, cal["temperature"]).argmax(axis=1), vote.argmax(axis=1))
    assert cal["val_after"]["accuracy"] == cal["val_before"]["accuracy"]
    assert cal["val_after"]["ece"] < cal["val_before"]["ece"]
    assert cal["val_after"]["nll"] < cal["val_before"]["nll"]
    assert isinstance(sel["weights"], list) and len(sel["weights"]) == val_member_probs.shape[0]
    assert sum(sel["weights"]) == pytest.approx(1.0, abs=1e-12)
    assert sel["weights"][NOISE_AT] == 0.0 and NOISE_AT not in sel["selected"]
    assert sel["selected"] == [m for m, w in enumerate(sel["weights"]) if w > 0] == sorted(set(sel["order"]))
    assert sel["n_members"] == len(sel["selected"])
    chosen = weighted_vote(val_member_probs, sel["weights"])
    assert sel["val"] == summary_metrics(chosen, val_labels)
    # the selected vote's own temperature, fitted on val, its scores cross-fitted like the full vote's
    assert sel["temperature"] == fit_temperature(chosen, val_labels) < 1.0
    assert sel["val_after"] == summary_metrics(cross_fitted_scaling(chosen, val_labels, seed=seed)[0], val_labels)
    assert sel["val_after"]["nll"] < sel["val"]["nll"]


def test_score_run_without_counts_fits_temperature_and_selection_on_val():
    from ensemble.scores.calibration import fit_temperature
    from ensemble.scores.scoring import score_run
    from ensemble.scores.selection import greedy_selection

    member_probs, labels = _disagreeing_members(2000, seed=0)
    ensemble = score_run(member_probs, labels, rule="soft", seed=0)["ensemble"]
    cal, sel = ensemble["calibration"], ensemble["selection"]
    assert (cal["fitted_on"], cal["n_rows"]) == ("val", 2000)
    assert (sel["fitted_on"], sel["n_rows"]) == ("val", 2000)
    assert cal["temperature"] == fit_temperature(soft_vote(member_probs), labels)
    assert sel["weights"] == greedy_selection(member_probs, labels)["weights"].tolist()
    _check_calibration_and_selection(ensemble, member_probs, labels)
    # even scored cross-fitted, the temperature nearly removes the calibration error
    assert ensemble["calibration"]["val_after"]["ece"] < 0.03 < 0.25 < ensemble["calibration"]["val_before"]["ece"]
    assert "oob" not in ensemble


def test_score_run_with_counts_fits_the_temperature_on_val_and_the_selection_on_out_of_bag_rows():
    from ensemble.scores.calibration import fit_temperature
    from ensemble.scores.scoring import score_run

    val_member_probs, val_labels = _disagreeing_members(1500, seed=1)
    train_member_probs, train_labels = _disagreeing_members(2000, seed=2)
    counts = np.stack([bootstrap_counts(s, 2000, 2000) for s in member_seeds(3, 6)])  # (6, 2000)
    ensemble = score_run(val_member_probs, val_labels, rule="soft", seed=3, train_member_probs=train_member_probs,
                         train_labels=train_labels, counts=counts)["ensemble"]
    cal, sel = ensemble["calibration"], ensemble["selection"]
    has_oob = (counts == 0).any(axis=0)
    assert (cal["fitted_on"], cal["n_rows"]) == ("val", 1500)
    assert cal["temperature"] == fit_temperature(soft_vote(val_member_probs), val_labels)
    assert (sel["fitted_on"], sel["n_rows"]) == ("oob", int(has_oob.sum()))
    _check_calibration_and_selection(ensemble, val_member_probs, val_labels, seed=3)


def test_score_run_calibrate_on_oob_fits_on_out_of_bag_rows():
    from ensemble.scores.calibration import fit_temperature
    from ensemble.scores.scoring import score_run
    from ensemble.scores.selection import greedy_selection

    val_member_probs, val_labels = _disagreeing_members(1500, seed=1)
    train_member_probs, train_labels = _disagreeing_members(2000, seed=2)
    counts = np.stack([bootstrap_counts(s, 2000, 2000) for s in member_seeds(3, 6)])  # (6, 2000)
    out = score_run(val_member_probs, val_labels, rule="hard", seed=0, train_member_probs=train_member_probs,
                    train_labels=train_labels, counts=counts, calibrate_on="oob")
    ensemble = out["ensemble"]
    cal, sel = ensemble["calibration"], ensemble["selection"]
    has_oob = (counts == 0).any(axis=0)
    assert 0 < has_oob.sum() < 2000
    assert (cal["fitted_on"], cal["n_rows"]) == ("oob", int(has_oob.sum()))
    assert (sel["fitted_on"], sel["n_rows"]) == ("oob", int(has_oob.sum()))
    oob_probs, _ = oob_vote(train_member_probs, counts)
    assert cal["temperature"] == fit_temperature(oob_probs[has_oob], train_labels[has_oob])
    chosen = greedy_selection(train_member_probs, train_labels, mask=counts == 0)
    assert sel["weights"] == chosen["weights"].tolist() and sel["order"] == chosen["order"]
    # the hard vote's labels are not what is calibrated: the soft vote's probabilities are
    _check_calibration_and_selection(ensemble, val_member_probs, val_labels)
    assert ensemble["oob"]["n_rows_scored"] == has_oob.sum()


def test_score_run_calibrate_on_oob_falls_back_to_val_when_no_row_is_out_of_bag():
    from ensemble.scores.scoring import score_run

    val_member_probs, val_labels = _disagreeing_members(800, seed=4)
    train_member_probs, train_labels = _disagreeing_members(50, seed=5)
    ensemble = score_run(val_member_probs, val_labels, rule="soft", seed=0, train_member_probs=train_member_probs,
                         train_labels=train_labels, counts=np.ones((6, 50), dtype=np.int64),
                         calibrate_on="oob")["ensemble"]
    assert (ensemble["calibration"]["fitted_on"], ensemble["calibration"]["n_rows"]) == ("val", 800)
    assert ensemble["calibration"]["folds"] == 5
    assert (ensemble["selection"]["fitted_on"], ensemble["selection"]["n_rows"]) == ("val", 800)
    assert ensemble["oob"]["n_rows_scored"] == 0


def test_cross_fitted_scaling_scales_each_fold_by_the_temperature_of_the_others():
    from ensemble.scores.calibration import fit_temperature, scale_probs, usable_temperature
    from ensemble.scores.scoring import cross_fitted_scaling

    member_probs, labels = _disagreeing_members(103, seed=6)
    vote = soft_vote(member_probs)
    scaled, folds = cross_fitted_scaling(vote, labels, seed=9)
    assert folds == 5 and scaled.shape == vote.shape
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(scaled.argmax(axis=1), vote.argmax(axis=1))
    # the folds: a seeded permutation dealt round-robin, sizes 21/21/21/20/20
    fold = np.empty(103, dtype=np.int64)
    fold[np.random.default_rng(9).permutation(103)] = np.arange(103) % 5
    assert sorted(np.bincount(fold)) == [20, 20, 21, 21, 21]
    for f in range(5):
        t, at_bound = usable_temperature(vote[fold != f], labels[fold != f])
        assert not at_bound and t == fit_temperature(vote[fold != f], labels[fold != f])
        np.testing.assert_array_equal(scaled[fold == f], scale_probs(vote[fold == f], t))
    # a row's own label never reaches its scaling: change it, and that row's output stays the same
    row = 17
    flipped = labels.copy()
    flipped[row] = (labels[row] + 1) % 4
    again, _ = cross_fitted_scaling(vote, flipped, seed=9)
    np.testing.assert_array_equal(again[row], scaled[row])
    assert not np.array_equal(again[fold != fold[row]], scaled[fold != fold[row]])
    # one row: its own temperature, one fold; two rows: two folds of one
    one, k = cross_fitted_scaling(vote[:1], labels[:1], seed=0)
    assert k == 1 and np.array_equal(one, scale_probs(vote[:1], usable_temperature(vote[:1], labels[:1])[0]))
    assert cross_fitted_scaling(vote[:2], labels[:2], seed=0)[1] == 2


def test_a_vote_of_fewer_members_is_less_under_confident():
    """Why the temperature is fitted on val by default: an out-of-bag row votes with only the
    members that never drew it (about 37% of them), and the fewer members vote, the less the
    average under-states its accuracy, so a temperature fitted on such votes sharpens the vote of
    all members too little."""
    from ensemble.scores.calibration import fit_temperature

    member_probs, labels = _disagreeing_members(4000, seed=7, good=9)
    member_probs = np.delete(member_probs, NOISE_AT, axis=0)  # nine good members
    temperatures = [fit_temperature(soft_vote(member_probs[:k]), labels) for k in (1, 3, 9)]
    assert temperatures[0] > temperatures[1] > temperatures[2]
    assert temperatures[1] > 1.2 * temperatures[2]


def test_score_run_result_is_strict_json():
    import json

    from ensemble.scores.scoring import score_run
    from ensemble.report import json_safe

    member_probs, labels = _disagreeing_members(300, seed=6)
    ensemble = score_run(member_probs, labels, rule="soft", seed=0)["ensemble"]
    for key in ("calibration", "selection"):
        assert json.loads(json.dumps(ensemble[key], allow_nan=False)) == ensemble[key]  # no numpy inside
    json.dumps(json_safe(ensemble), allow_nan=False)


def test_check_labels():
    from ensemble.scores.metrics import check_labels

    out = check_labels(np.array([0, 2, 1], dtype=np.int32), 3, 3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]
    for bad, match in (([0.0, 1.0, 1.0], "integer"), ([0, 1], "\\(3,\\)"), ([0, 1, 3], "\\[0, 3\\)"),
                       ([-1, 0, 0], "\\[0, 3\\)")):
        with pytest.raises(ValueError, match=match):
            check_labels(np.asarray(bad), 3, 3)
