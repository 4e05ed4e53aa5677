"""score_run: the ensemble's temperature and member selection as the report records them, fitted on
val or on out-of-bag rows, and the cross-fitted scaling that scores a temperature fitted on val."""

import numpy as np
import pytest

from ensemble.bootstrap import bootstrap_counts, member_seeds
from ensemble.scores.metrics import oob_vote, summary_metrics
from ensemble.scores.vote import soft_vote
from tests.helpers import NOISE_AT, disagreeing_members


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


def test_report_scaled_probs_are_what_val_after_scores():
    from ensemble.scores.scoring import report_scaled_probs, score_run

    val_member_probs, val_labels = disagreeing_members(600, seed=1)
    train_member_probs, train_labels = disagreeing_members(800, seed=2)
    counts = np.stack([bootstrap_counts(s, 800, 800) for s in member_seeds(3, 6)])
    vote = soft_vote(val_member_probs)
    for calibrate_on in ("val", "oob"):
        cal = score_run(val_member_probs, val_labels, rule="soft", seed=5, train_member_probs=train_member_probs,
                        train_labels=train_labels, counts=counts, calibrate_on=calibrate_on)["ensemble"]["calibration"]
        assert cal["fitted_on"] == calibrate_on
        assert summary_metrics(report_scaled_probs(cal, vote, val_labels, seed=5), val_labels) == cal["val_after"]


def test_score_run_without_counts_fits_temperature_and_selection_on_val():
    from ensemble.scores.calibration import fit_temperature
    from ensemble.scores.scoring import score_run
    from ensemble.scores.selection import greedy_selection

    member_probs, labels = disagreeing_members(2000, seed=0)
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

    val_member_probs, val_labels = disagreeing_members(1500, seed=1)
    train_member_probs, train_labels = disagreeing_members(2000, seed=2)
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

    val_member_probs, val_labels = disagreeing_members(1500, seed=1)
    train_member_probs, train_labels = disagreeing_members(2000, seed=2)
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

    val_member_probs, val_labels = disagreeing_members(800, seed=4)
    train_member_probs, train_labels = disagreeing_members(50, seed=5)
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

    member_probs, labels = disagreeing_members(103, seed=6)
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


def test_score_run_result_is_strict_json():
    import json

    from ensemble.scores.scoring import score_run
    from ensemble.report import json_safe

    member_probs, labels = disagreeing_members(300, seed=6)
    ensemble = score_run(member_probs, labels, rule="soft", seed=0)["ensemble"]
    for key in ("calibration", "selection"):
        assert json.loads(json.dumps(ensemble[key], allow_nan=False)) == ensemble[key]  # no numpy inside
    json.dumps(json_safe(ensemble), allow_nan=False)
