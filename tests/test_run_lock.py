"""run_lock.py: one driver per run folder; a lock whose driver is gone is taken over.
(On S3: test_s3.py; the driver holding it for a whole run: test_faults.py.)"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from ensemble import run_lock
from ensemble.run_folder import default_output
from ensemble.run_lock import RunFolderBusy, RunLock


@pytest.fixture(autouse=True)
def no_settling(monkeypatch):
    monkeypatch.setattr(run_lock, "SETTLE_S", 0.0)


def _leave_lock(folder, **holder) -> None:
    folder.mkdir(exist_ok=True)
    content = {"token": "earlier", "host": socket.gethostname(), "pid": 1, "started": time.time(),
               "heartbeat": time.time(), **holder}
    (folder / "run.lock").write_text(json.dumps(content))


def test_a_second_driver_gets_one_line_naming_the_holder(tmp_path):
    import os

    out = tmp_path / "run"
    with RunLock(str(out)):
        with pytest.raises(RunFolderBusy) as info:
            RunLock(str(out)).acquire()
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"--output {out} is in use by another driver")
        assert f"pid {os.getpid()} on {socket.gethostname()}" in line and "use another --output" in line
        assert info.value.exit_code == 2
    assert not (out / "run.lock").exists()  # released at the end of the run
    with RunLock(str(out)):  # and free for the next one
        pass


def test_of_drivers_started_together_one_gets_the_folder(tmp_path):
    out, held, busy = str(tmp_path / "run"), [], []
    start = threading.Barrier(6)

    def driver() -> None:
        start.wait()
        try:
            held.append(RunLock(out).acquire())
        except RunFolderBusy:
            busy.append(1)

    threads = [threading.Thread(target=driver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 1 and len(busy) == 5
    held[0].release()


def test_a_lock_left_by_a_dead_driver_is_taken_over(tmp_path, caplog):
    """Same host: its pid no longer runs, so at once; another host: once its heartbeat is stale."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _leave_lock(out, pid=dead.pid)
    with RunLock(str(out)) as lock:
        assert json.loads((out / "run.lock").read_text())["token"] == lock.token
    assert f"process {dead.pid} no longer runs on this host" in caplog.text

    _leave_lock(out, host="elsewhere", pid=dead.pid)  # its pid says nothing here
    with pytest.raises(RunFolderBusy, match="pid .* on elsewhere"):
        RunLock(str(out)).acquire()
    _leave_lock(out, host="elsewhere", heartbeat=time.time() - run_lock.STALE_S - 5)
    with RunLock(str(out)):
        pass
    assert re.search(r"its heartbeat is 12\d s old", caplog.text)


def test_default_output_folders_differ_within_a_second():
    names = {default_output() for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"runs/\d{8}-\d{6}-[0-9a-f]{6}", name) for name in names)
