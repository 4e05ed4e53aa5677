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
