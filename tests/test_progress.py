"""Progress bars: on a terminal the driver shows each member's epoch (Ray's distributed tqdm) and
the soft vote (Ray Data's bar). (With output piped, as in CI logs, it shows none: the driver runs
of tests/test_faults.py check that.)"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import RECIPE_FLAGS

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(data, output):
    return [sys.executable, "-m", "ensemble.driver", "--data", data, "--output", str(output), "--members", "2",
            "--epochs", "1", "--image-size", "16", "--batch-size", "4", *RECIPE_FLAGS, "--cpus-per-member", "0.5",
            "--infer-batch-size", "8"]


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


def test_bars_on_a_terminal(tiny_digits, tmp_path):
    shown = _run_on_a_terminal(_cmd(tiny_digits, tmp_path / "tty"), _env())
    for member in (0, 1):
        assert f"member {member} epoch 1/1: 100%|" in shown, shown[-3000:]  # a bar that reached its end
    assert "batch/s" in shown
    assert "Running Dataset" in shown  # the soft vote's bar
    assert "outputs in" in shown
