"""One process per run folder: ``OUTPUT/run.lock``, held from the first write until the command ends.

The lock is a small JSON file (an object on s3://): who holds it (host, pid, the command) and a
heartbeat the holder rewrites every ``HEARTBEAT_S`` seconds. A second process on the same folder
(a driver, or a distill, predict or tune writing there) stops with one line naming the holder. A
lock whose process is gone does not block the folder:

- its holder ran on this machine (the same host name, kernel boot and pid namespace: containers
  and cloned VMs that share a host name are other machines) and that process no longer runs, or
  its pid is another process now: taken over at once. A holder that runs is never taken over here,
  however old its heartbeat (a process stopped with Ctrl-Z, a laptop that slept);
- its holder ran on another machine and its heartbeat is older than ``STALE_S``: taken over then.

A holder that finds another token in its lock, or that could not renew it for most of
``STALE_S``, has lost it: it logs one line and interrupts its main thread, which ends with that
line (``LockLost``) before it writes again. A lock that cannot be read (a timeout, ``ESTALE``) is
not a free one: the reader retries, then stops in one line; one whose bytes are not JSON is taken
over only once it is older than ``STALE_S``.

Local folders get the lock by an atomic exclusive create. Object stores have no conditional
create through pyarrow: the lock object is written, then read back after ``SETTLE_S`` seconds,
and only a process that still finds its own token there goes on. Two that raced within the same
seconds, one of whose writes became visible late: the one whose write lands last keeps the
folder, and the other finds out at its next check (every ``TICK_S``, and ``check()`` before
each stage) and stops in one line. No Ray here.
"""

from __future__ import annotations

import _thread
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
from ensemble.errors import ConfigError, RunError, redact

log = logging.getLogger("ensemble.run_lock")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0   # how often the holder rewrites its heartbeat
STALE_S = 300.0      # another machine's heartbeat older than this is a process that is gone
SETTLE_S = 1.0       # object stores, and any takeover: the pause before reading the lock back
TICK_S = 5.0         # how often the holder reads its lock (a takeover, or a wake from sleep, is seen within it)


class RunFolderBusy(RunError):
    """Another process holds the run folder's lock (exit 2: wait for it, or use another --output)."""


class LockLost(RunError):
    """This process held the run folder's lock and lost it (another took it over, or it could not
    be renewed): it stops before writing again (exit 2)."""


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


def _first_line(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); "" without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def machine() -> dict:
    """What makes a pid name one process: the host name, the kernel's boot id and the pid namespace."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": _first_line("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _same_machine(holder: dict) -> bool:
    here = machine()
    return all(holder.get(k) == here[k] for k in ("host", "boot", "pidns")) and bool(here["boot"] or here["pidns"])


def holder_gone(holder: dict, *, now: Optional[float] = None) -> str:
    """Why the process named in lock content ``holder`` no longer holds it ("" while it does)."""
    now = time.time() if now is None else now
    if _same_machine(holder):  # the pid decides; a stopped process (Ctrl-Z) still holds it
        pid = int(holder.get("pid", -1))
        if not _pid_runs(pid):
            return f"process {pid} no longer runs on this host"
        if holder.get("pid_start") and _pid_start(pid) not in ("", holder["pid_start"]):
            return f"process {pid} on this host is another process now"
        return ""
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old"
    return ""


class RunLock:
    """The lock on one run folder; ``with RunLock(output):`` holds it for the block.

    ``check()`` raises LockLost once it is lost; a lock lost while the block runs in the main
    thread interrupts it, and the block ends with LockLost instead of KeyboardInterrupt."""

    def __init__(self, output: str, *, name: str = LOCK_NAME):
        self.output, self.path = output, storage.join(output, name)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost: str = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._made_folder = False
        self._main = False
        self._renewed = 0.0

    def _content(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"token": self.token, **machine(), "pid": pid, "pid_start": _pid_start(pid),
                           "started": self.started, "heartbeat": time.time(),
                           "command": redact(" ".join(sys.argv))[:500]}, indent=2).encode()

    def _read(self) -> Optional[dict]:
        """The lock's content; None when there is none; {} when its bytes are not a JSON object.
        A read that fails raises StorageError after its retries (storage.read_stored)."""
        data = storage.read_stored(self.path)
        if data is None:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _not_json_gone(self) -> str:
        """Why a lock whose bytes are not JSON is free ("" while it may be a live one)."""
        try:
            fs, inner = storage.resolve(self.path)
            mtime_ns = fs.get_file_info(inner).mtime_ns or 0
        except OSError:
            return ""
        age = time.time() - mtime_ns / 1e9
        return f"it is not JSON and {age:.0f} s old" if mtime_ns > 0 and age > STALE_S else ""

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunFolderBusy naming its holder. Creates the folder (and
        removes it on release when it was made here and nothing else was written)."""
        if storage.is_local(self.output):
            self._made_folder = not os.path.exists(self.output)
        try:
            created = storage.create_new(self.path, self._content())
        except OSError as exc:
            self._remove_made_folder()
            raise ConfigError(f"--output {self.output}: cannot create it ({str(exc).splitlines()[0][:200]}); "
                              f"pick another folder") from None
        try:
            self._take(created)
        except BaseException:
            self._remove_made_folder()
            raise
        self._main = threading.current_thread() is threading.main_thread()
        self._renewed = time.time()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _take(self, created: bool) -> None:
        settle = not created or not storage.is_local(self.output)
        if not created:
            holder = self._read()
            if holder is None:  # released between our create and read: try once more
                return self._take(storage.create_new(self.path, self._content()))
            gone = holder_gone(holder) if holder else self._not_json_gone()
            if not gone:
                raise RunFolderBusy(self._busy_line(holder))
            log.warning("%s: taking over the lock of an earlier process (%s)", self.path, gone)
            storage.write_bytes(self.path, self._content())
        if settle:  # a takeover, or an object store's unconditional create: read it back
            time.sleep(SETTLE_S)
            holder = self._read()
            if not holder or holder.get("token") != self.token:
                raise RunFolderBusy(self._busy_line(holder or {}))

    def _busy_line(self, holder: dict) -> str:
        if not holder:
            return (f"--output {self.output}: its lock {self.path} is not JSON and was written less than "
                    f"{STALE_S:.0f} s ago (a process may be writing it); wait, or if no process uses the folder "
                    f"remove {self.path} and rerun")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        beat = time.time() - float(holder.get("heartbeat", 0))
        return (f"--output {self.output} is in use by another process (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {started}, last heartbeat {beat:.0f} s ago; lock "
                f"{self.path}); wait for it to end or use another --output (a lock whose process is gone is "
                f"taken over: at once on the same machine, after {STALE_S:.0f} s without a heartbeat from another)")

    def _beat(self) -> None:
        """Every TICK_S: read the lock (another token: lost, at once); every HEARTBEAT_S: rewrite it."""
        warned = 0.0
        while not self._stop.wait(TICK_S):
            try:
                holder = self._read()
                due = time.time() - self._renewed >= HEARTBEAT_S
                if holder is None and storage.create_new(self.path, self._content()):
                    log.warning("%s: the lock was removed while this process held it; written again", self.path)
                    holder, due = {"token": self.token}, True
                elif holder is None:  # removed, and another process created it since
                    holder = self._read() or {"token": None}
                if holder == {}:  # not JSON: no process writes that (writes are atomic); ours again
                    log.warning("%s: the lock's bytes are not JSON while this process holds it; written again",
                                self.path)
                    due = True
                elif holder.get("token") != self.token:
                    self._lose(f"{self.output}: another process took over this run folder's lock (pid "
                               f"{holder.get('pid', '?')} on {holder.get('host', '?')}); this one stopped before "
                               f"writing again")
                    return
                if due:
                    storage.write_bytes(self.path, self._content())
                    self._renewed = time.time()
            except OSError as exc:  # a storage hiccup: the next tick tries again, within limits
                silent = time.time() - self._renewed
                if time.time() - warned > HEARTBEAT_S:
                    warned = time.time()
                    log.warning("%s: could not renew the lock's heartbeat for %.0f s (%s)", self.path, silent, exc)
                if silent > 0.8 * STALE_S:
                    self._lose(f"{self.output}: could not renew this run folder's lock {self.path} for {silent:.0f} s "
                               f"({exc}), so another process may take it over; this one stopped before writing "
                               f"again. Rerun the same command once storage answers")
                    return

    def _lose(self, line: str) -> None:
        self.lost = line
        if self._main and not self._stop.is_set():
            _thread.interrupt_main()  # the block ends at once, with LockLost (__exit__): its line is the error
        else:
            log.error(line)

    def check(self) -> None:
        """LockLost if this lock was lost; on an object store, also reads it back now."""
        if not self.lost and self._thread is not None and not storage.is_local(self.output):
            holder = self._read()
            if not holder or holder.get("token") != self.token:
                self.lost = (f"{self.output}: another process took over this run folder's lock; this one "
                             f"stopped before writing again")
        if self.lost:
            raise LockLost(self.lost)

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
                self._remove_made_folder()
        except OSError as exc:
            log.warning("%s: could not remove the lock (%s); the next process takes it over", self.path, exc)

    def _remove_made_folder(self) -> None:
        if self._made_folder:
            try:
                os.rmdir(self.output)  # only when empty: a command that wrote nothing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()
        if self.lost and (exc_type is None or issubclass(exc_type, (KeyboardInterrupt, OSError))):
            raise LockLost(self.lost) from exc
