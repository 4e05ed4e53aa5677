"""The command a user types, on a terminal: no arguments but the size (the bundled digits demo),
end to end, with progress bars for each member's epoch (Ray's distributed tqdm) and the soft vote
(Ray Data's bar). (With output piped, as in CI logs, it shows none: the resubmitted job of
tests/test_stop_resume.py checks that.)"""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CI", "ENSEMBLE_PROGRESS")}


def _run_on_a_terminal(cmd, env, timeout_s=300) -> str:
    """Run ``cmd`` with a 120x40 pseudo-terminal as stdin/stdout/stderr; return what it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm sizes bars to it
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout_s
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, b"".join(chunks)[-3000:].decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).decode(errors="replace")


def test_bundled_default_end_to_end_on_a_terminal(tmp_path):
    env = {**_env(), "ENSEMBLE_CACHE": str(tmp_path / "cache")}
    output = tmp_path / "out"
    shown = _run_on_a_terminal([sys.executable, "-m", "ensemble.driver", "--members", "2", "--epochs", "2",
                                "--output", str(output)], env)
    assert "ensemble (soft vote)" in shown and "mean of members" in shown, shown[-3000:]
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
    assert "Ray dashboard: http://127.0.0.1:" in shown
    # The bars: each member's epochs (one that reached its end). The images fit the cache, so each
    # member votes as it finishes: no voter pool starts, and no dataset's bar is drawn.
    for member in (0, 1):
        assert f"member {member} epoch 2/2: 100%|" in shown, shown[-3000:]
    assert "batch/s" in shown
    assert "soft vote        each member as it finishes" in shown and "Running Dataset" not in shown
    assert "outputs in" in shown
