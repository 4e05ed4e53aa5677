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
from tests.helpers import REAL_READ, fail_reads


@pytest.fixture(autouse=True)
def no_settling(monkeypatch):
    monkeypatch.setattr(run_lock, "SETTLE_S", 0.0)


def _leave_lock(folder, **holder) -> None:
    folder.mkdir(exist_ok=True)
    content = {"token": "earlier", **run_lock.machine(), "pid": 1, "started": time.time(),
               "heartbeat": time.time(), **holder}
    (folder / "run.lock").write_text(json.dumps(content))


def test_a_second_driver_gets_one_line_naming_the_holder(tmp_path):
    import os

    out = tmp_path / "run"
    with RunLock(str(out)):
        with pytest.raises(RunFolderBusy) as info:
            RunLock(str(out)).acquire()
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"--output {out} is in use by another process")
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
    assert f"its heartbeat is {run_lock.STALE_S + 5:.0f} s old" in caplog.text


def test_default_output_folders_differ_within_a_second():
    names = {default_output() for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"runs/\d{8}-\d{6}-[0-9a-f]{6}", name) for name in names)


def test_a_holder_that_loses_its_lock_stops_at_once_in_one_line(tmp_path, monkeypatch):
    """Another token appears in run.lock while the holder works in its main thread: the holder is
    interrupted at its next tick and its block ends with LockLost (one line, exit 2), not later on a
    write; the other's lock is left as it is."""
    monkeypatch.setattr(run_lock, "TICK_S", 0.05)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    out = tmp_path / "run"
    started = time.time()
    with pytest.raises(run_lock.LockLost) as info:
        with RunLock(str(out)):
            _leave_lock(out, token="other", pid=4242)
            for _ in range(200):  # the work: 20 s unless interrupted
                time.sleep(0.1)
    assert time.time() - started < 5
    line = str(info.value)
    assert "\n" not in line and info.value.exit_code == 2
    assert line == (f"{out}: another process took over this run folder's lock (pid 4242 on {socket.gethostname()}); "
                    f"this one stopped before writing again")
    assert json.loads((out / "run.lock").read_text())["token"] == "other"


def test_an_unreadable_lock_is_not_a_free_one(tmp_path, monkeypatch, caplog):
    """A read of run.lock that fails (EIO) is retried, then one line; the holder's lock stays. Bytes
    that are not JSON: busy while recent, taken over once older than STALE_S."""
    import errno
    import os

    from ensemble import storage
    from ensemble.errors import StorageError

    out = tmp_path / "run"
    with RunLock(str(out)) as holder:
        fail_reads(monkeypatch, "run.lock", errno.EIO)
        with pytest.raises(StorageError, match=r"could not read .*run.lock: Input/output error \(EIO\) \(tried 3 times\)"):
            RunLock(str(out)).acquire()
        monkeypatch.setattr(storage, "read_bytes", REAL_READ)
        assert json.loads((out / "run.lock").read_text())["token"] == holder.token

    out.mkdir(exist_ok=True)
    (out / "run.lock").write_text('{"token": "torn')
    with pytest.raises(RunFolderBusy, match="is not JSON and was written less than"):
        RunLock(str(out)).acquire()
    old = time.time() - run_lock.STALE_S - 10
    os.utime(out / "run.lock", (old, old))
    with RunLock(str(out)):
        pass
    assert "it is not JSON and" in caplog.text


def test_same_host_name_is_not_same_machine_and_a_stopped_holder_keeps_its_lock(tmp_path):
    """A lock from another container or cloned VM (same host name, another boot id or pid
    namespace) whose pid is not running here is not taken over while it beats; a holder on this
    machine that is stopped (SIGSTOP: Ctrl-Z, a laptop asleep) keeps its lock however old its beat."""
    import os
    import signal

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _leave_lock(out, pid=dead.pid, boot="another-boot")
    with pytest.raises(RunFolderBusy, match=f"pid {dead.pid} on {socket.gethostname()}"):
        RunLock(str(out)).acquire()

    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        _leave_lock(out, pid=stopped.pid, pid_start=run_lock._pid_start(stopped.pid),
                    heartbeat=time.time() - 10 * run_lock.STALE_S)
        with pytest.raises(RunFolderBusy, match=f"pid {stopped.pid} "):
            RunLock(str(out)).acquire()
        _leave_lock(out, pid=stopped.pid, pid_start="1")  # its pid, another process's start: reused
        with RunLock(str(out)):
            pass
    finally:
        stopped.kill()
        stopped.wait()


def test_a_held_folder_is_refused_before_the_cluster_and_a_new_folder_left_empty_goes(tmp_path):
    """The driver takes the lock before it starts Ray or checks an image: a folder another process
    holds is refused at once (no cluster started); a lock taken on a new folder and released by a
    run that wrote nothing leaves no folder behind."""
    import ray

    from ensemble.config import EnsembleConfig
    from ensemble.driver import run

    out = tmp_path / "held"
    data = tmp_path / "data"
    for folder in ("train/a", "train/b", "val/a", "val/b", "test"):
        (data / folder).mkdir(parents=True)
        (data / folder / "x.png").write_bytes(b"not an image")
    with RunLock(str(out)):
        with pytest.raises(RunFolderBusy):
            run(EnsembleConfig(data=str(data), output=str(out), epochs=1, members=1, arch="resnet18", weights="none"))
    assert not ray.is_initialized()
    with RunLock(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()


def test_a_holder_whose_lock_is_garbled_or_removed_writes_it_again_and_goes_on(tmp_path, monkeypatch):
    """Not JSON, or removed, while its process runs: the holder (alive, and the only one that
    writes it) writes its own content again at its next beat instead of stopping, so a second
    driver started then still finds the folder held."""
    monkeypatch.setattr(run_lock, "TICK_S", 0.05)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    out = tmp_path / "run"
    with RunLock(str(out)) as lock:
        for damage in (lambda: (out / "run.lock").write_text("garbled"), lambda: (out / "run.lock").unlink()):
            damage()
            deadline = time.time() + 5
            while time.time() < deadline:
                try:
                    if json.loads((out / "run.lock").read_text())["token"] == lock.token:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.05)
            assert json.loads((out / "run.lock").read_text())["token"] == lock.token and not lock.lost
        with pytest.raises(RunFolderBusy):
            RunLock(str(out)).acquire()
