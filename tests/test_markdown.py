"""The Markdown report: tables, figures, config and times, the calibration and selection sections,
and what it leaves out when absent."""

import numpy as np

from ensemble.markdown import render_report_md
from ensemble.report import json_safe
from tests.helpers import CALIBRATION, SELECTION


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
    curve = {"k": [1, 2], "accuracy": [0.5, 0.75], "nll": [1.0, 0.5], "accuracy_mean": [0.6, 0.75],
             "nll_mean": [0.9, 0.5]}
    md = render_report_md({"members": [], "ensemble": {"val_acc": 0.75, "size_curve": curve}}, {})
    assert "| 1 | 0.5000 | 1.0000 | 0.6000 | 0.9000 |" in md
    assert "| 2 | 0.7500 | 0.5000 | 0.7500 | 0.5000 |" in md


# --- calibration and ensemble selection sections -------------------------------------------------

def _scored_report(**ensemble):
    members = [{"member": i, "seed": 100 + i, "val_acc": 0.8, "best_epoch": 2} for i in range(4)]
    return {"members": members,
            "ensemble": {"val_acc": 0.9, "metrics": {"accuracy": 0.9, "nll": 0.35, "ece": 0.08, "brier": 0.2},
                         **ensemble}}


def _section(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_markdown_calibration_table_has_the_values():
    md = render_report_md(_scored_report(calibration=CALIBRATION), {})
    section = _section(md, "Calibration")
    assert "**T = 0.8125**" in section[2] and "950 out-of-bag training rows" in section[2]
    assert "under-confident" in section[2]
    assert section[4:] == ["| validation | NLL | ECE | Brier |", "|---|---:|---:|---:|",
                           "| before (soft vote) | 0.3500 | 0.0800 | 0.2000 |",
                           "| after (T = 0.8125) | 0.3012 | 0.0215 | 0.1875 |"]
    assert "## Ensemble selection" not in md


def test_markdown_calibration_fitted_on_val_says_it_is_optimistic_and_t_above_one_softens():
    md = render_report_md(_scored_report(calibration={**CALIBRATION, "fitted_on": "val", "n_rows": 40,
                                                      "temperature": 1.5}), {})
    text = _section(md, "Calibration")[2]
    assert "the 40 validation rows" in text and "optimistic" in text and "over-confident" in text


def test_markdown_calibration_fitted_on_val_with_folds_says_its_scores_are_cross_fitted():
    md = render_report_md(_scored_report(calibration={**CALIBRATION, "fitted_on": "val", "n_rows": 40,
                                                      "folds": 5}), {})
    text = _section(md, "Calibration")[2]
    assert "the vote of all members on the 40 validation rows" in text
    assert "cross-fitted (5 folds, each scaled by a T fitted on the others)" in text
    assert "optimistic" not in text and "under-confident" in text


def test_markdown_calibration_and_selection_say_when_a_fit_ran_to_the_lower_bound():
    md = render_report_md(_scored_report(calibration={**CALIBRATION, "fitted_on": "val", "folds": 5,
                                                      "temperature": 1.0, "at_bound": True},
                                         selection={**SELECTION, "temperature": 1.0, "at_bound": True}), {})
    text = _section(md, "Calibration")[2]
    assert "**T = 1.0000**" in text and "ran to the lower end of its range" in text
    assert "left as they are (T = 1)" in text and "already calibrated" not in text
    assert "leaves the selected members' vote unscaled (T = 1)" in _section(md, "Ensemble selection")[-1]


def test_markdown_selection_lists_kept_members_and_compares_with_all_members():
    md = render_report_md(_scored_report(selection=SELECTION), {})
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
    md = render_report_md(_scored_report(selection=SELECTION, calibration=CALIBRATION), {})
    assert "| all members (soft vote) | 4 | 0.9000 | 0.3500 | 0.3012 | 0.0215 |" in _section(md, "Ensemble selection")


def test_markdown_without_the_keys_renders_neither_section():
    for ensemble in ({}, {"calibration": None, "selection": None}, {"selection": {"weights": []}}):
        md = render_report_md(_scored_report(**ensemble), {})
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
    report = json_safe(_scored_report(**scores["ensemble"]))
    report["members"] = report["members"][:3]
    md = render_report_md(report, {})
    t = scores["ensemble"]["calibration"]["temperature"]
    assert f"| after (T = {t:.4f}) |" in md
    assert f"| selected (weighted soft vote) | {scores['ensemble']['selection']['n_members']} |" in md
