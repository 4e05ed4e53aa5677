"""The command line: bad flags, and what the package opens to the network. (The bundled demo end to
end, as a user types it on a terminal: tests/test_installed_cluster.py.)"""

from __future__ import annotations

import os
import subprocess
import sys


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


def test_val_fraction_without_data_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ensemble.driver", "--val-fraction", "0.2", "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --val-fraction 0.2: needs --data; the bundled digits come with their own val split"]
    assert not (tmp_path / "o").exists()
