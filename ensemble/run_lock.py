"""One driver per run folder: ``OUTPUT/run.lock``, held from the first write until the run ends.

The lock is a small JSON file (an object on s3://): who holds it (host, pid, the command) and a
heartbeat the holder rewrites every ``HEARTBEAT_S`` seconds. A second driver on the same folder
stops with one line naming the holder. A lock whose driver is gone does not block the folder:

- its holder ran on this host and that process no longer runs (killed, crashed): taken over at once;
- its heartbeat is older than ``STALE_S`` (a driver on another host that died, or a pid reused
  by another process): taken over then. A driver stopped for longer than that (a suspended
  laptop) finds on waking that another took over; it logs so and no longer heartbeats.

Local folders get the lock by an atomic exclusive create. Object stores have no conditional
create through pyarrow: the lock object is written, then read back after ``SETTLE_S`` seconds,
and only a driver that still finds its own token there goes on (two that raced within the same
instant: the later write wins). A stale lock is taken over the same way everywhere. No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from ensemble import storage
from ensemble.errors import ConfigError, RunError

log = logging.getLogger("ensemble.run_lock")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0   # how often the holder rewrites its heartbeat
STALE_S = 120.0      # a heartbeat older than this is a driver that is gone
SETTLE_S = 1.0       # object stores, and any takeover: the pause before reading the lock back


class RunFolderBusy(RunError):
    """Another driver holds the run folder's lock (exit 2: wait for it, or use another --output)."""


def lock_path(output: str) -> str:
    return storage.join(output, LOCK_NAME)


def _pid_runs(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def holder_gone(holder: dict, *, now: Optional[float] = None) -> str:
    """Why the driver named in lock content ``holder`` no longer holds it ("" while it does)."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old"
    if holder.get("host") == socket.gethostname() and not _pid_runs(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} no longer runs on this host"
    return ""


class RunLock:
    """The lock on one run folder; ``with RunLock(output):`` holds it for the block."""

    def __init__(self, output: str):
        self.output, self.path = output, lock_path(output)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _content(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "heartbeat": time.time(),
                           "command": " ".join(sys.argv)[:500]}, indent=2).encode()

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: a lock torn by a crash (or a write in flight)
            return {}

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunFolderBusy naming its holder. Creates the folder."""
        try:
            created = storage.create_new(self.path, self._content())
        except OSError as exc:
            raise ConfigError(f"--output {self.output}: cannot create it ({str(exc).splitlines()[0][:200]}); "
                              f"pick another folder") from None
        settle = not created or not storage.is_local(self.output)
        if not created:
            holder = self._read()
            if holder is None:  # released between our create and read: try once more
                return self.acquire()
            gone = holder_gone(holder) if holder else "it is unreadable"
            if not gone:
                raise RunFolderBusy(self._busy_line(holder))
            log.warning("%s: taking over the lock of an earlier driver (%s)", self.path, gone)
            storage.write_bytes(self.path, self._content())
        if settle:  # a takeover, or an object store's unconditional create: read it back
            time.sleep(SETTLE_S)
            holder = self._read()
            if not holder or holder.get("token") != self.token:
                raise RunFolderBusy(self._busy_line(holder or {}))
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _busy_line(self, holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        beat = time.time() - float(holder.get("heartbeat", 0))
        return (f"--output {self.output} is in use by another driver (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {started}, last heartbeat {beat:.0f} s ago; lock "
                f"{self.path}); wait for it to end or use another --output (a lock whose driver is gone is "
                f"taken over: at once on the same host, after {STALE_S:.0f} s without a heartbeat from another)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self._read()
                if holder is not None and holder.get("token") not in (None, self.token):
                    log.error("%s: another driver took over this run folder's lock (pid %s on %s); this "
                              "driver no longer holds it", self.path, holder.get("pid"), holder.get("host"))
                    return
                storage.write_bytes(self.path, self._content())
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("%s: could not renew the lock's heartbeat (%s)", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
            self._thread = None
        try:
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                storage.remove(self.path)
        except OSError as exc:
            log.warning("%s: could not remove the lock (%s); the next driver takes it over", self.path, exc)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
