"""A run's scores as data: members vs ensemble on val, the size curve, out-of-bag scores, the
ensemble's temperature and its greedy member selection (numpy only; report.py lays them out)."""

from __future__ import annotations

import numpy as np

from ensemble.scores.calibration import calibration_report, scale_probs, usable_temperature
from ensemble.scores.metrics import oob_scores, oob_vote, size_curve, summary_metrics
from ensemble.scores.selection import greedy_selection, weighted_vote
from ensemble.scores.vote import check_member_probs, ensemble_labels, ensemble_probs


def score_run(val_member_probs, val_labels, *, rule: str, seed: int, train_member_probs=None, train_labels=None,
              counts=None, calibrate_on: str = "val", archs=None) -> dict:
    """Members vs ensemble on val (accuracy under ``rule``, NLL, ECE, Brier), the size curve,
    temperature scaling and greedy ensemble selection and, with the members' probabilities on the
    training rows and their bootstrap ``counts`` (members, n_train), out-of-bag scores. The
    temperature is fitted where ``calibrate_on`` says (``calibration_scores``); with counts the
    selection is fitted on out-of-bag rows, so val stays unseen by it; without (full bagging) on
    val. Data only: report.py lays it out. ``archs``: each member's architecture; with several,
    ``ensemble.by_arch`` scores each one's members (``arch_scores``).

    val_member_probs: (members, n_val, classes); val_labels: (n_val,). Returns
      "ensemble": val_acc, metrics (on the vote's probabilities), size_curve, calibration
                  (``calibration_scores``), selection (``selection_scores``), oob (if counts)
      "members":  per member, metrics and (if counts) oob_acc
    """
    val_member_probs = check_member_probs(val_member_probs)
    if counts is not None:
        train_member_probs = check_member_probs(train_member_probs)  # float64 once, shared by the three below
    probs = ensemble_probs(val_member_probs)
    labels = ensemble_labels(val_member_probs, rule)
    held_out = {"train_member_probs": train_member_probs, "train_labels": train_labels, "counts": counts}
    ensemble = {"val_acc": float((labels == np.asarray(val_labels)).mean()),
                "metrics": summary_metrics(probs, val_labels),
                "size_curve": size_curve(val_member_probs, val_labels, seed=seed),
                "calibration": calibration_scores(val_member_probs, val_labels, fit_on=calibrate_on, seed=seed,
                                                  **held_out),
                "selection": selection_scores(val_member_probs, val_labels, seed=seed, **held_out)}
    members = [{"metrics": summary_metrics(p, val_labels)} for p in val_member_probs]
    if archs is not None and len(set(archs)) > 1:
        ensemble["by_arch"] = arch_scores(val_member_probs, val_labels, archs, rule=rule)
    if counts is not None:
        ensemble["oob"] = oob_scores(train_member_probs, counts, train_labels)
        for m, acc in zip(members, ensemble["oob"]["member_acc"]):
            m["oob_acc"] = acc
    return {"ensemble": ensemble, "members": members}


def arch_scores(val_member_probs, val_labels, archs, *, rule: str) -> dict:
    """Per architecture, in first-member order: its members, their mean val accuracy, and the
    architecture's own sub-ensemble under ``rule`` (val_acc, and metrics on its averaged
    probabilities). val_member_probs: (members, n_val, classes); archs: (members,) names."""
    val_member_probs, labels = check_member_probs(val_member_probs), np.asarray(val_labels)
    out = {}
    for arch in dict.fromkeys(archs):
        idx = [i for i, a in enumerate(archs) if a == arch]
        sub = val_member_probs[idx]
        out[arch] = {"members": idx,
                     "mean_member_val_acc": float(np.mean([(p.argmax(1) == labels).mean() for p in sub])),
                     "val_acc": float((ensemble_labels(sub, rule) == labels).mean()),
                     "metrics": summary_metrics(ensemble_probs(sub), labels)}
    return out


CROSS_FIT_FOLDS = 5  # val rows are split this many ways to score a temperature fitted on val


def calibration_scores(val_member_probs, val_labels, *, fit_on: str = "val", seed: int = 0, train_member_probs=None,
                       train_labels=None, counts=None) -> dict:
    """One temperature for the ensemble's soft vote (``calibration``), scored on val.

    ``fit_on="val"`` (the default): T is fitted on the vote of all members over every val row:
    the vote it will scale. Its val scores are cross-fitted, so they are not scored on rows their
    T saw: val is split into ``CROSS_FIT_FOLDS`` seeded folds, each scaled by a T fitted on the
    others.
    ``fit_on="oob"``: T is fitted on the training rows' out-of-bag votes (``oob_vote``; rows with
    at least one out-of-bag member) and scored on val as is. Such a row votes with only the
    members that never drew it (about 37% of them), and a vote of fewer members is less
    under-confident, so this T sharpens the full vote too little. Without counts (full bagging),
    or when no row is out of bag, it falls back to val.
    Scaling keeps each row's argmax, so accuracy is the same before and after. Returns
      "fitted_on"                "oob" | "val"
      "n_rows"                   rows the temperature was fitted on
      "temperature"              T: T < 1 sharpens an under-confident vote, T > 1 softens; 1 when
                                 the fit ran to its lower bound (``calibration.usable_temperature``)
      "at_bound"                 whether it did
      "val_before", "val_after"  ``summary_metrics`` of the val soft vote before and after scaling
      "folds"                    (fitted on val) how many folds "val_after" was cross-fitted over;
                                 1 = a single val row, scored in-sample
    """
    if fit_on not in ("val", "oob"):
        raise ValueError(f"fit_on must be 'val' or 'oob', got {fit_on!r}")
    val_probs = ensemble_probs(val_member_probs)  # (n_val, classes)
    val_labels = np.asarray(val_labels)
    if fit_on == "oob" and counts is not None:
        oob_probs, n_oob = oob_vote(train_member_probs, counts)
        scored = n_oob > 0  # rows every member drew have NaN votes
        if scored.any():
            fit_probs, fit_labels = oob_probs[scored], np.asarray(train_labels)[scored]
            temperature, at_bound = usable_temperature(fit_probs, fit_labels)
            report = calibration_report(val_probs, val_labels, temperature)
            return {"fitted_on": "oob", "n_rows": int(len(fit_probs)), "temperature": report["temperature"],
                    "at_bound": at_bound, "val_before": report["before"], "val_after": report["after"]}
    return {"fitted_on": "val", "n_rows": int(len(val_probs)), "val_before": summary_metrics(val_probs, val_labels),
            **_fit_on_val(val_probs, val_labels, seed=seed)}


def _fit_on_val(vote, labels, *, seed: int) -> dict:
    """A vote's temperature fitted on val and its cross-fitted scores: "temperature", "at_bound"
    (``usable_temperature``), "val_after" (``summary_metrics``), "folds" (``cross_fitted_scaling``)."""
    temperature, at_bound = usable_temperature(vote, labels)
    scaled, folds = cross_fitted_scaling(vote, labels, seed=seed)
    return {"temperature": temperature, "at_bound": at_bound, "val_after": summary_metrics(scaled, labels),
            "folds": folds}


def report_scaled_probs(calibration: dict, probs, labels, *, seed: int) -> np.ndarray:
    """The val soft vote ``probs`` (n, classes) as ``calibration`` (``calibration_scores``) scored
    them in "val_after": cross-fitted when it was fitted on val, else scaled by its temperature."""
    if calibration.get("fitted_on") == "val" and "folds" in calibration:
        return cross_fitted_scaling(probs, labels, seed=seed)[0]
    return scale_probs(probs, calibration["temperature"])


def cross_fitted_scaling(probs, labels, *, seed: int, folds: int = CROSS_FIT_FOLDS) -> tuple[np.ndarray, int]:
    """Each row of ``probs`` (n, classes) scaled by a temperature fitted on the other folds' rows.

    Rows are dealt to min(folds, n) folds in a permutation seeded by ``seed``; each fold's
    temperature is ``usable_temperature``'s, as the one deployed is. Returns
    (scaled (n, classes), the number of folds); with one row, its own temperature (1 fold).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    n = len(probs)
    k = min(folds, n)
    if k < 2:
        return scale_probs(probs, usable_temperature(probs, labels)[0]), 1
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    scaled = np.empty_like(probs)
    for f in range(k):
        rest = fold != f
        scaled[~rest] = scale_probs(probs[~rest], usable_temperature(probs[rest], labels[rest])[0])
    return scaled, k


def selection_scores(val_member_probs, val_labels, *, seed: int = 0, train_member_probs=None, train_labels=None,
                     counts=None) -> dict:
    """Caruana greedy ensemble selection (``selection.greedy_selection``), scored on val, with a
    temperature of its own for its weighted vote (what ``--members selected`` predicts with).

    With bootstrap ``counts`` (members, n_train) members are chosen on out-of-bag rows (mask
    ``counts == 0``); without counts, or when no row is out of bag, on val itself (then "val" is
    optimistic). Its temperature is fitted on val like the full vote's (``calibration_scores``),
    its "val_after" cross-fitted the same way. Returns
      "fitted_on"    "oob" | "val"
      "n_rows"       rows the selection was scored on
      "weights"      list (members,), sums to 1; 0 for members left out
      "selected"     sorted member indices with weight > 0;  "n_members": how many
      "order"        member indices in the order the greedy rounds added them (repeats allowed)
      "val"          ``summary_metrics`` of the weighted soft vote on val
      "temperature"  T for the weighted soft vote, fitted on val (``usable_temperature``);
                     "at_bound": whether that fit ran to its lower bound (then T = 1)
      "val_after"    ``summary_metrics`` of the weighted vote scaled, cross-fitted over val
    """
    if counts is not None and (np.asarray(counts) == 0).any():
        chosen, fitted_on = greedy_selection(train_member_probs, train_labels, mask=np.asarray(counts) == 0), "oob"
    else:
        chosen, fitted_on = greedy_selection(val_member_probs, val_labels), "val"
    vote = weighted_vote(val_member_probs, chosen["weights"])
    scaled = _fit_on_val(vote, val_labels, seed=seed)
    return {"fitted_on": fitted_on, "n_rows": chosen["n_rows_scored"],
            "weights": chosen["weights"].tolist(), "selected": chosen["selected"],
            "order": list(chosen["order"]), "n_members": len(chosen["selected"]),
            "val": summary_metrics(vote, val_labels), "temperature": scaled["temperature"],
            "at_bound": scaled["at_bound"], "val_after": scaled["val_after"]}
