"""report.json carries the calibration and selection scores; report.md lays them out (pure, no Ray)."""

import json
from types import SimpleNamespace

import numpy as np

from ensemble.config import EnsembleConfig
from ensemble.markdown import render_report_md
from ensemble.member_files import MemberSummary
from ensemble.report import build_report, json_safe

CALIBRATION = {"fitted_on": "oob", "n_rows": 950, "temperature": 0.8125,
               "val_before": {"accuracy": 0.9, "nll": 0.35, "ece": 0.08, "brier": 0.2},
               "val_after": {"accuracy": 0.9, "nll": 0.3012, "ece": 0.0215, "brier": 0.1875}}
SELECTION = {"fitted_on": "oob", "n_rows": 950, "weights": [0.5, 0.0, 0.25, 0.25], "selected": [0, 2, 3],
             "order": [0, 2, 0, 3], "n_members": 3,
             "val": {"accuracy": 0.91, "nll": 0.33, "ece": 0.05, "brier": 0.19}, "temperature": 0.75,
             "val_after": {"accuracy": 0.91, "nll": 0.29, "ece": 0.03, "brier": 0.17}}


def _report(**ensemble):
    members = [{"member": i, "seed": 100 + i, "val_acc": 0.8, "best_epoch": 2} for i in range(4)]
    return {"members": members,
            "ensemble": {"val_acc": 0.9, "metrics": {"accuracy": 0.9, "nll": 0.35, "ece": 0.08, "brier": 0.2},
                         **ensemble}}


def _section(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_build_report_carries_calibration_and_selection_into_report_json():
    scores = {"ensemble": {"val_acc": 0.9, "calibration": CALIBRATION, "selection": SELECTION},
              "members": [{"metrics": {"accuracy": 0.8}} for _ in range(4)]}
    summaries = [MemberSummary(member=i, seed=i, best_epoch=1, val_acc=0.8, val_loss=0.5, history=[],
                               resumed_after_epochs=[], node="n", device="cpu", gpu_ids=[], seconds=1.0, started=0.0,
                               finished=1.0, files={"model.pt": "ab"}) for i in range(4)]
    index = SimpleNamespace(root="/data", classes=["a", "b"], sizes=lambda: {"train": 10, "val": 4, "test": 2})
    report = build_report(EnsembleConfig(members=4), summaries=summaries, scores=scores, params={}, index=index,
                          skipped=[], seeds=[0, 1, 2, 3], fingerprint={}, versions={}, seconds={})
    assert report["members"][2] == {**summaries[2].to_dict(), "metrics": {"accuracy": 0.8}}
    assert report["ensemble"]["mean_member_val_acc"] == 0.8
    assert report["ensemble"]["calibration"] == CALIBRATION
    assert report["ensemble"]["selection"] == SELECTION
    assert json.loads(json.dumps(json_safe(report), allow_nan=False))["ensemble"]["selection"] == SELECTION


def test_markdown_calibration_table_has_the_values():
    md = render_report_md(_report(calibration=CALIBRATION), {})
    section = _section(md, "Calibration")
    assert "**T = 0.8125**" in section[2] and "950 out-of-bag training rows" in section[2]
    assert "under-confident" in section[2]
    assert section[4:] == ["| validation | NLL | ECE | Brier |", "|---|---:|---:|---:|",
                           "| before (soft vote) | 0.3500 | 0.0800 | 0.2000 |",
                           "| after (T = 0.8125) | 0.3012 | 0.0215 | 0.1875 |"]
    assert "## Ensemble selection" not in md


def test_markdown_calibration_fitted_on_val_says_it_is_optimistic_and_t_above_one_softens():
    md = render_report_md(_report(calibration={**CALIBRATION, "fitted_on": "val", "n_rows": 40,
                                               "temperature": 1.5}), {})
    text = _section(md, "Calibration")[2]
    assert "the 40 validation rows" in text and "optimistic" in text and "over-confident" in text


def test_markdown_calibration_fitted_on_val_with_folds_says_its_scores_are_cross_fitted():
    md = render_report_md(_report(calibration={**CALIBRATION, "fitted_on": "val", "n_rows": 40, "folds": 5}), {})
    text = _section(md, "Calibration")[2]
    assert "the vote of all members on the 40 validation rows" in text
    assert "cross-fitted (5 folds, each scaled by a T fitted on the others)" in text
    assert "optimistic" not in text and "under-confident" in text


def test_markdown_calibration_and_selection_say_when_a_fit_ran_to_the_lower_bound():
    md = render_report_md(_report(calibration={**CALIBRATION, "fitted_on": "val", "folds": 5, "temperature": 1.0,
                                               "at_bound": True},
                                  selection={**SELECTION, "temperature": 1.0, "at_bound": True}), {})
    text = _section(md, "Calibration")[2]
    assert "**T = 1.0000**" in text and "ran to the lower end of its range" in text
    assert "left as they are (T = 1)" in text and "already calibrated" not in text
    assert "leaves the selected members' vote unscaled (T = 1)" in _section(md, "Ensemble selection")[-1]


def test_markdown_selection_lists_kept_members_and_compares_with_all_members():
    md = render_report_md(_report(selection=SELECTION), {})
    section = _section(md, "Ensemble selection")
    assert "keeps **3 of 4 members** (1 fewer to run at prediction time)" in section[2]
    assert "950 out-of-bag training rows" in section[2]
    assert section[4:9] == ["| member | weight |", "|---|---:|", "| member 0 | 0.5000 |", "| member 2 | 0.2500 |",
                            "| member 3 | 0.2500 |"]
    assert "| selected (weighted soft vote) | 3 | 0.9100 | 0.3300 | 0.2900 | 0.0300 |" in section
    assert "| all members (soft vote) | 4 | 0.9000 | 0.3500 | – | – |" in section  # no calibration in this report
    assert "`--members selected` scales the selected members' vote by their own T = 0.7500" in section[-1]
    assert "## Calibration" not in md
    # with the full vote's calibration, its scaled scores stand beside the selection's
    md = render_report_md(_report(selection=SELECTION, calibration=CALIBRATION), {})
    assert "| all members (soft vote) | 4 | 0.9000 | 0.3500 | 0.3012 | 0.0215 |" in _section(md, "Ensemble selection")


def test_markdown_without_the_keys_renders_neither_section():
    for ensemble in ({}, {"calibration": None, "selection": None}, {"selection": {"weights": []}}):
        md = render_report_md(_report(**ensemble), {})
        assert "## Calibration" not in md and "## Ensemble selection" not in md
        assert "| **ensemble (soft vote)** |  |  | **0.9000** | **0.3500** | **0.0800** | **0.2000** |" in md


def test_markdown_from_score_run_output():
    from ensemble.scores.scoring import score_run

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=200)
    member_probs = rng.dirichlet(np.ones(3), size=(3, 200))
    member_probs[:, np.arange(200), labels] += 1.0
    member_probs /= member_probs.sum(axis=2, keepdims=True)
    scores = score_run(member_probs, labels, rule="soft", seed=0)
    report = json_safe(_report(**scores["ensemble"]))
    report["members"] = report["members"][:3]
    md = render_report_md(report, {})
    t = scores["ensemble"]["calibration"]["temperature"]
    assert f"| after (T = {t:.4f}) |" in md
    assert f"| selected (weighted soft vote) | {scores['ensemble']['selection']['n_members']} |" in md
