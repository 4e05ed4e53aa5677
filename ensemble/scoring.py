"""A run's scores as data: members vs ensemble on val, the size curve, out-of-bag scores, the
ensemble's temperature and its greedy member selection (numpy only; report.py lays them out)."""

from __future__ import annotations

import numpy as np

from ensemble.calibration import calibration_report, fit_temperature
from ensemble.metrics import oob_scores, oob_vote, size_curve, summary_metrics
from ensemble.selection import greedy_selection, weighted_vote
from ensemble.vote import check_member_probs, ensemble_labels, ensemble_probs


def score_run(val_member_probs, val_labels, *, rule: str, seed: int, train_member_probs=None, train_labels=None,
              counts=None) -> dict:
    """Members vs ensemble on val (accuracy under ``rule``, NLL, ECE, Brier), the size curve,
    temperature scaling and greedy ensemble selection and, with the members' probabilities on the
    training rows and their bootstrap ``counts`` (members, n_train), out-of-bag scores. With counts,
    the temperature and the selection are fitted on out-of-bag rows, so val stays unseen by both;
    without (full bagging) they are fitted on val. Data only: report.py lays it out.

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
                "calibration": calibration_scores(val_member_probs, val_labels, **held_out),
                "selection": selection_scores(val_member_probs, val_labels, **held_out)}
    members = [{"metrics": summary_metrics(p, val_labels)} for p in val_member_probs]
    if counts is not None:
        ensemble["oob"] = oob_scores(train_member_probs, counts, train_labels)
        for m, acc in zip(members, ensemble["oob"]["member_acc"]):
            m["oob_acc"] = acc
    return {"ensemble": ensemble, "members": members}


def calibration_scores(val_member_probs, val_labels, *, train_member_probs=None, train_labels=None,
                       counts=None) -> dict:
    """One temperature for the ensemble's soft vote (``calibration``), scored on val.

    With bootstrap ``counts`` (members, n_train) the temperature is fitted on the training rows'
    out-of-bag votes (``oob_vote``; rows with at least one out-of-bag member). Without counts (full
    bagging: every member trained on every row), or when no row is out of bag, it is fitted on val
    itself, and "val_after" is then optimistic. Scaling keeps each row's argmax, so accuracy is
    the same before and after. Returns
      "fitted_on"                "oob" | "val"
      "n_rows"                   rows the temperature was fitted on
      "temperature"              T: T < 1 sharpens an under-confident vote, T > 1 softens
      "val_before", "val_after"  ``summary_metrics`` of the val soft vote before and after scaling
    """
    val_probs = ensemble_probs(val_member_probs)  # (n_val, classes)
    fit_probs, fit_labels, fitted_on = val_probs, val_labels, "val"
    if counts is not None:
        oob_probs, n_oob = oob_vote(train_member_probs, counts)
        scored = n_oob > 0  # rows every member drew have NaN votes
        if scored.any():
            fit_probs, fit_labels, fitted_on = oob_probs[scored], np.asarray(train_labels)[scored], "oob"
    temperature = fit_temperature(fit_probs, fit_labels)
    report = calibration_report(val_probs, val_labels, temperature)
    return {"fitted_on": fitted_on, "n_rows": int(len(fit_probs)), "temperature": report["temperature"],
            "val_before": report["before"], "val_after": report["after"]}


def selection_scores(val_member_probs, val_labels, *, train_member_probs=None, train_labels=None,
                     counts=None) -> dict:
    """Caruana greedy ensemble selection (``selection.greedy_selection``), scored on val.

    With bootstrap ``counts`` (members, n_train) members are chosen on out-of-bag rows (mask
    ``counts == 0``); without counts, or when no row is out of bag, on val itself (then "val" is
    optimistic). Returns
      "fitted_on"  "oob" | "val"
      "n_rows"     rows the selection was scored on
      "weights"    list (members,), sums to 1; 0 for members left out
      "selected"   sorted member indices with weight > 0;  "n_members": how many
      "order"      member indices in the order the greedy rounds added them (repeats allowed)
      "val"        ``summary_metrics`` of the weighted soft vote on val
    """
    if counts is not None and (np.asarray(counts) == 0).any():
        chosen, fitted_on = greedy_selection(train_member_probs, train_labels, mask=np.asarray(counts) == 0), "oob"
    else:
        chosen, fitted_on = greedy_selection(val_member_probs, val_labels), "val"
    return {"fitted_on": fitted_on, "n_rows": chosen["n_rows_scored"],
            "weights": chosen["weights"].tolist(), "selected": chosen["selected"],
            "order": list(chosen["order"]), "n_members": len(chosen["selected"]),
            "val": summary_metrics(weighted_vote(val_member_probs, chosen["weights"]), val_labels)}
