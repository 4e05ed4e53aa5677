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
        with pytest.raises(StorageError,
                           match=r"could not read .*run.lock: Input/output error \(EIO\) \(tried 3 times\)"):
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


def _wait_for(what: str, reached, *, timeout_s: float = 5.0, state=lambda: "") -> None:
    """Poll ``reached()`` until it is true; past ``timeout_s`` fail naming ``what`` and ``state()``."""
    deadline = time.monotonic() + timeout_s
    while not reached():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s ({state()})", pytrace=False)
        time.sleep(0.01)


def _held_from_a_thread(out) -> RunLock:
    """A lock taken outside the main thread (as a Tune trial or a serve replica would): one it loses
    is logged and kept in ``lost``, nothing is interrupted."""
    box: list = []
    taker = threading.Thread(target=lambda: box.append(RunLock(str(out)).acquire()))
    taker.start()
    taker.join()
    assert box, "the first driver did not get the folder"
    return box[0]


def test_the_heartbeat_advances_the_locks_time_while_it_is_held(tmp_path, monkeypatch):
    """The holder rewrites run.lock with a later heartbeat every HEARTBEAT_S (not every TICK_S), its
    token, pid and start time kept."""
    monkeypatch.setattr(run_lock, "TICK_S", 0.01)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    with RunLock(str(out)) as lock:
        first = json.loads((out / "run.lock").read_text())
        beats = [first["heartbeat"]]

        def beat_seen() -> bool:
            now = json.loads((out / "run.lock").read_text())["heartbeat"]
            if now != beats[-1]:
                beats.append(now)
            return len(beats) > 3

        _wait_for("three heartbeats written to run.lock", beat_seen,
                  state=lambda: f"heartbeats seen {beats}, held for {time.time() - lock.started:.1f} s")
        last = json.loads((out / "run.lock").read_text())
        assert {k: last[k] for k in ("token", "pid", "started")} == {k: first[k] for k in ("token", "pid", "started")}
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert all(gap >= run_lock.HEARTBEAT_S for gap in gaps), gaps  # later each time, one a HEARTBEAT_S
        assert not lock.lost


def test_a_beating_holder_is_refused_long_past_the_stale_timeout_and_taken_over_once_it_stops(
        tmp_path, monkeypatch, caplog):
    """Seen from another machine only the heartbeat says the holder lives: while it beats, a second
    driver gets the one busy line however long the first has held the folder (3 x STALE_S here);
    once its beats stop for STALE_S the folder is taken over (so it was the beats that kept it)."""
    monkeypatch.setattr(run_lock, "TICK_S", 0.01)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(run_lock, "STALE_S", 0.5)
    monkeypatch.setattr(run_lock, "_same_machine", lambda holder: False)  # the second driver runs elsewhere
    out = tmp_path / "run"

    def second_driver() -> str:
        """The busy line a second driver gets; a failure when it takes the folder instead."""
        other = RunLock(str(out))
        try:
            other.acquire()
        except RunFolderBusy as exc:
            return str(exc)
        held_s = time.time() - holder.started
        other.release()
        pytest.fail(f"a second driver took over {out} {held_s:.2f} s after the first took it, while the first "
                    f"still held it", pytrace=False)

    holder = _held_from_a_thread(out)
    try:
        lines = [second_driver()]
        while time.time() - holder.started < 3 * run_lock.STALE_S:
            lines.append(second_driver())
            time.sleep(run_lock.TICK_S)
        assert len(lines) > 3, lines
        for line in lines:
            assert "\n" not in line and line.startswith(f"--output {out} is in use by another process (pid ")
            assert "last heartbeat 0 s ago" in line, line
        assert not holder.lost

        monkeypatch.setattr(run_lock, "HEARTBEAT_S", 3600.0)  # its beats stop (a machine gone), its reads go on
        _wait_for("the stopped holder's heartbeat to be older than STALE_S",
                  lambda: time.time() - json.loads((out / "run.lock").read_text())["heartbeat"] > run_lock.STALE_S)
        with RunLock(str(out)) as taker:
            assert "taking over the lock of an earlier process (its heartbeat is" in caplog.text
            _wait_for("the first holder to notice the takeover", lambda: holder.lost)
            assert json.loads((out / "run.lock").read_text())["token"] == taker.token
    finally:
        holder.release()


def test_a_holder_that_finds_another_token_stops_beating_and_leaves_the_others_lock(tmp_path, monkeypatch, caplog):
    """Held outside the main thread (nothing to interrupt): another token in run.lock is noticed at
    the next tick, logged once, and check() raises LockLost with that one line; the heartbeat ends
    without writing the other's lock again, release leaves it, and the block ends with LockLost."""
    import logging

    monkeypatch.setattr(run_lock, "TICK_S", 0.01)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    lock = _held_from_a_thread(out)
    lock.check()  # held: nothing to say
    beat = lock._thread
    _leave_lock(out, token="other", pid=4242)
    theirs = (out / "run.lock").read_bytes()
    _wait_for("the holder to notice another token in run.lock", lambda: lock.lost,
              state=lambda: f"run.lock's token is {json.loads((out / 'run.lock').read_text())['token']!r}")
    line = (f"{out}: another process took over this run folder's lock (pid 4242 on {socket.gethostname()}); "
            f"this one stopped before writing again")
    with pytest.raises(run_lock.LockLost) as info:
        lock.check()
    assert str(info.value) == line and info.value.exit_code == 2
    _wait_for("the heartbeat thread to end", lambda: not beat.is_alive())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [line]
    assert (out / "run.lock").read_bytes() == theirs  # never written again
    with pytest.raises(run_lock.LockLost, match="another process took over"):
        lock.__exit__(None, None, None)  # the end of `with RunLock(...)`: release, then the line
    assert (out / "run.lock").read_bytes() == theirs
