"""The Markdown report: tables, figures, config and times, and what it leaves out when absent."""

from ensemble.markdown import render_report_md


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
