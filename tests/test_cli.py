"""The command a user types: no arguments (the bundled digits demo), shrunk by flags to stay quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_bundled_default_end_to_end(tmp_path):
    env = {**os.environ, "ENSEMBLE_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    output = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble.driver", "--members", "2", "--epochs", "2", "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble (soft vote)" in proc.stdout and "mean of members" in proc.stdout
    report = json.loads((output / "report.json").read_text())
    assert report["config"]["arch"] == "resnet18" and report["config"]["members"] == 2
    assert report["data"]["class_names"] == [str(c) for c in range(10)]
    assert (report["data"]["train"], report["data"]["val"], report["data"]["test"]) == (1078, 359, 360)
    # Real learning happened: ten classes, two epochs, far above chance (0.1).
    assert report["ensemble"]["val_acc"] > 0.3
    lines = (output / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image_name,pred_label" and len(lines) == 361
    assert (tmp_path / "cache" / "digits-v1" / "DONE").exists()
    # The dashboard of the cluster the driver started listens on loopback only.
    assert "Ray dashboard: http://127.0.0.1:" in proc.stderr


def test_project_opens_nothing_to_all_interfaces():
    """No dashboard_host / 0.0.0.0 anywhere in the package: Ray's loopback default stands."""
    import ensemble

    root = os.path.dirname(ensemble.__file__)
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "0.0.0.0" not in text and "dashboard_host" not in text, name


def test_bad_flag_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ensemble.driver", "--lr", "-1", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --lr -1.0: must be > 0"]
    assert not (tmp_path / "o").exists()
