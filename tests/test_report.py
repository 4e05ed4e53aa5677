"""report.json carries the calibration and selection scores (pure, no Ray)."""

import json
from types import SimpleNamespace

from ensemble.config import EnsembleConfig
from ensemble.member_files import MemberSummary
from ensemble.report import build_report, json_safe
from tests.helpers import CALIBRATION, SELECTION


def test_build_report_carries_calibration_and_selection_into_report_json():
    scores = {"ensemble": {"val_acc": 0.9, "calibration": CALIBRATION, "selection": SELECTION},
              "members": [{"metrics": {"accuracy": 0.8}} for _ in range(4)]}
    summaries = [MemberSummary(member=i, seed=i, best_epoch=1, val_acc=0.8, val_loss=0.5, history=[],
                               resumed_after_epochs=[], node="n", device="cpu", gpu_ids=[], seconds=1.0, started=0.0,
                               finished=1.0, files={"model.pt": "ab"}) for i in range(4)]
    index = SimpleNamespace(root="/data", classes=["a", "b"], sizes=lambda: {"train": 10, "val": 4, "test": 2})
    report = build_report(EnsembleConfig(members=4), summaries=summaries, scores=scores, params={}, index=index,
                          skipped=[], seeds=[0, 1, 2, 3], fingerprint={}, versions={}, seconds={})
    assert report["members"][2] == {**summaries[2].to_dict(), "arch": "resnext101_64x4d", "metrics": {"accuracy": 0.8}}
    assert report["ensemble"]["mean_member_val_acc"] == 0.8
    assert report["ensemble"]["calibration"] == CALIBRATION
    assert report["ensemble"]["selection"] == SELECTION
    assert json.loads(json.dumps(json_safe(report), allow_nan=False))["ensemble"]["selection"] == SELECTION


def test_predictions_csv_cells_a_spreadsheet_would_run_are_text_and_read_back_as_named():
    """Image names and labels starting with = + - @ get a leading ' (spreadsheets show the cell as
    text, not a formula); csv readers get the other cells as written; ensemble.api reads every name back."""
    import csv
    import io

    import numpy as np

    from ensemble.api import _unneutralised
    from ensemble.report import predictions_csv

    names = ['=HYPERLINK("http://x","y")', "+1", "-2+3", "@SUM(A1)", "'=quoted", "plain,comma", "ok"]
    classes = ["cat", "=cmd|' /C calc'!A0"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8]] * 3 + [[0.6, 0.4]])
    rows = list(csv.reader(io.StringIO(predictions_csv(names, probs, classes))))[1:]
    assert [r[0] for r in rows] == ["'" + n for n in names[:5]] + ["plain,comma", "ok"]
    assert rows[1][1] == "'=cmd|' /C calc'!A0" and rows[0][1] == "cat"
    assert [_unneutralised(r[0]) for r in rows] == names and _unneutralised(rows[1][1]) == classes[1]
