"""What tests share besides fixtures: small real-image data sets (scikit-learn digits written as
PNG/JPEG files), the shared tiny run's config, and a `ray start` cluster of a test's own.

Imported as ``tests.helpers`` (pyproject.toml puts the repository root on sys.path, so a bare
``pytest`` imports it as ``python -m pytest`` does); conftest.py holds only fixtures and hooks.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np

# The CPU preset's recipe as flags: a run with --data gets no preset, so tests that run the
# driver on their own small data pass these to stay quick and offline (no pretrained weights).
RECIPE_FLAGS = ["--arch", "resnet18", "--weights", "none", "--freeze", "none", "--augment", "light", "--lr", "2e-3"]


def write_digits_tree(root, *, per_class_train: int, per_class_val: int, n_test: int,
                      classes: int = 10, fmt: str = "png") -> str:
    """A study-layout folder of real digit scans: train/<c>/, val/<c>/, flat test/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    root = str(root)
    used = set()
    for c in range(classes):
        idx = np.flatnonzero(digits.target == c)
        for split, part in (("train", idx[:per_class_train]),
                            ("val", idx[per_class_train:per_class_train + per_class_val])):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").resize((16, 16)).convert("RGB").save(
                    os.path.join(folder, f"img{i:04d}.{fmt}"))
                used.add(int(i))
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    rest = [i for i in range(len(images)) if i not in used and digits.target[i] < classes][:n_test]
    for i in rest:
        Image.fromarray(images[i], mode="L").save(os.path.join(root, "test", f"t{i:04d}.png"))
    return root


def tiny_run_values(**overrides) -> dict:
    """The shared finished run's settings as the driver's flags (keyword names): 3 members, 2 epochs,
    16 px; two architectures, resnet18 (members 0 and 2) and resnet34 (member 1, its own learning
    rate), so everything that reads the run (predict, serve, export, distill, resume) takes mixed
    members.

    Its temperature is fitted on the out-of-bag rows: on its 20 val rows a fit runs to the lower
    bound (T = 1 is kept), and the tests that follow the temperature into probabilities.parquet,
    predict and serve need one that changes the numbers."""
    from ensemble.config import CPU_PRESET

    return {**CPU_PRESET, "image_size": 16, "epochs": 2, "members": 3, "batch_size": 16, "gpus_per_member": 0,
            "gpus_per_infer_actor": 0, "infer_batch_size": 16, "seed": 7, "calibrate_on": "oob",
            "arch": "resnet18,resnet34", "recipes": {"resnet34": {"lr": 2e-3}}, **overrides}


def tiny_run_config(data, output, **overrides):
    """The shared run's config (``tiny_run_values``) on ``data`` into ``output``."""
    from ensemble.config import build_config

    return build_config(flag_values={"data": data, "output": str(output), **tiny_run_values(**overrides)})


def finished_tiny_run(cache: dict, data: str, tmp_path_factory):
    """(config, report, output) of one finished run of ``tiny_run_values`` on ``data``, made once per
    session by ``ensemble.train`` (the Python API) on the Ray cluster of the first module that asks
    (each such module starts its own and calls this from a fixture that depends on it). Readers
    copy it before they change anything."""
    if "run" not in cache:
        import ensemble

        output = tmp_path_factory.mktemp("tiny_run")
        run = ensemble.train(data=data, output=output, **tiny_run_values())
        assert run.path == str(output)
        cache["run"] = (tiny_run_config(data, output), run.report, str(output))
    return cache["run"]


RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")


def ray_env(home: str, **extra) -> dict:
    """A HOME of the test's own with a fresh token (`ray get-auth-token --generate`, as the README says)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CI")}
    # Job entrypoints run `python`: this venv's, as on a node where the project is installed.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # matplotlib keeps its font list under HOME: the real one's, not rebuilt (~5 s) by every driver
    env["MPLCONFIGDIR"] = env.get("MPLCONFIGDIR") or os.path.join(os.path.expanduser("~"), ".cache", "matplotlib")
    env = {**env, "HOME": home, "RAY_AUTH_MODE": "token", **extra}
    os.makedirs(home, exist_ok=True)
    subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert os.path.isfile(os.path.join(home, ".ray", "auth_token"))
    return env


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (a dead child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A `ray start --head --block` cluster of the test's own, and its end.

    Everything it starts lives in its own process session and under its own temp dir, so the
    test stops exactly those processes (never `ray stop`, which would stop every cluster here).
    ``join``: the head's address, to start a worker node of that cluster instead (its own temp
    dir, stopped on its own). ``cli``: the `ray` command (another environment's); ``prefix``: a
    command it runs under (``unshare -m ...``); ``cwd``: the nodes' working directory.
    """

    def __init__(self, args: list, env: dict, *, temp_dir: str, log_path: str, join: Optional[str] = None,
                 cli: str = RAY_CLI, prefix: Sequence[str] = (), cwd: Optional[str] = None):
        import subprocess

        self.temp_dir, self.log_path = temp_dir, log_path
        self.mark = f"ENSEMBLE_TEST_CLUSTER={temp_dir}".encode()
        # Every process of the cluster inherits this mark, also workers whose process title no
        # longer names the temp dir (a fake autoscaler node's voters): stop() finds them by it.
        env = {**env, "ENSEMBLE_TEST_CLUSTER": temp_dir}
        role = ["--head"] if join is None else [f"--address={join}"]
        # The dashboard agent's HTTP port (where `ray job submit` lands) is a free one, not the fixed
        # default 52365 that another cluster on this machine may already hold.
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([*prefix, cli, "start", *role, "--block", f"--temp-dir={temp_dir}",
                                          "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                                          *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         cwd=cwd)

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def wait_ready(self, timeout_s: float = 120) -> None:
        import time

        deadline = time.time() + timeout_s
        while "Ray runtime started" not in self.log():
            assert self.proc.poll() is None, f"ray start exited:\n{self.log()[-3000:]}"
            assert time.time() < deadline, "ray start did not come up"
            time.sleep(0.5)
        time.sleep(2)  # `ray start --block` reports a process that died right after the start (the autoscaler)
        log = self.log()
        assert self.proc.poll() is None and "exited unexpectedly" not in log, log[-3000:]

    def _ours(self, pid: str) -> bool:
        """Whether process ``pid`` is this cluster's: its command line names the temp dir, or its
        environment carries the cluster's mark."""
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if self.temp_dir.encode() in fh.read():
                return True
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return self.mark in fh.read().split(b"\0")

    def processes(self, title: bytes = b"") -> list[int]:
        """Processes of this cluster still alive whose command line starts with ``title`` (Ray titles
        its workers ``ray::<class or task>``); another cluster's or job's are never among them."""
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    titled = fh.read().startswith(title)
                ours = titled and self._ours(pid)
            except OSError:
                continue
            if ours and process_alive(int(pid)):
                pids.append(int(pid))
        return pids

    def _leftovers(self) -> list[int]:
        return self.processes()

    def stop(self) -> None:
        import signal
        import time

        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            for pid in self._leftovers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            while (self.proc.poll() is None or self._leftovers()) and time.time() < deadline:
                time.sleep(0.2)
            if self.proc.poll() is not None and not self._leftovers():
                return


def random_members(members=5, n=300, classes=4, seed=0):
    """(members, n, classes) Dirichlet probabilities and (n,) uniform labels, seeded."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(classes), size=(members, n)), rng.integers(0, classes, size=n)


NOISE_AT = 2  # index of the pure-noise member in disagreeing_members


def disagreeing_members(n, seed, good=5, classes=4):
    """Five members, each 90% confident and right 80% of the time (independently), and one pure-noise
    member at NOISE_AT. Their average is right more often than it says: under-confident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    right = rng.random((good, n)) < 0.8
    wrong = (labels + rng.integers(1, classes, size=(good, n))) % classes
    member_probs = np.full((good, n, classes), 0.1 / (classes - 1))
    np.put_along_axis(member_probs, np.where(right, labels, wrong)[:, :, None], 0.9, axis=2)
    noise = rng.dirichlet(np.ones(classes), size=n)[None]
    return np.concatenate([member_probs[:NOISE_AT], noise, member_probs[NOISE_AT:]]), labels


# A report's calibration and selection sections as score_run writes them (fitted on out-of-bag rows).
CALIBRATION = {"fitted_on": "oob", "n_rows": 950, "temperature": 0.8125,
               "val_before": {"accuracy": 0.9, "nll": 0.35, "ece": 0.08, "brier": 0.2},
               "val_after": {"accuracy": 0.9, "nll": 0.3012, "ece": 0.0215, "brier": 0.1875}}
SELECTION = {"fitted_on": "oob", "n_rows": 950, "weights": [0.5, 0.0, 0.25, 0.25], "selected": [0, 2, 3],
             "order": [0, 2, 0, 3], "n_members": 3,
             "val": {"accuracy": 0.91, "nll": 0.33, "ece": 0.05, "brier": 0.19}, "temperature": 0.75,
             "val_after": {"accuracy": 0.91, "nll": 0.29, "ece": 0.03, "brier": 0.17}}


def run_on_a_terminal(cmd, env: dict, *, cwd: str, timeout_s: float = 300) -> str:
    """Run ``cmd`` with a 120x40 pseudo-terminal as stdin/stdout/stderr (as a user's shell does: tqdm
    draws its bars); AssertionError unless it exits 0; return what it wrote."""
    import fcntl
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm sizes bars to it
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True)
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


def fail_reads(monkeypatch, name: str, code: int) -> list:
    """Make ``storage.read_bytes`` raise OSError(``code``) for every path ending with ``name`` (a
    storage that times out, a stale NFS handle, a permission), with no pause between its retries;
    other paths read as usual. Returns the list of the failed reads' paths, as they happen."""
    from ensemble import storage

    failed: list = []

    def read(path):
        if path.endswith(name):
            failed.append(path)
            raise OSError(code, os.strerror(code))
        return REAL_READ(path)

    monkeypatch.setattr(storage, "READ_RETRY_S", (0.0, 0.0))
    monkeypatch.setattr(storage, "read_bytes", read)
    return failed


def _real_read():
    from ensemble import storage

    return storage.read_bytes


REAL_READ = _real_read()  # storage.read_bytes itself: what a test puts back once storage answers again


def processes_marked(name: str, value: str, title: bytes = b"") -> list[int]:
    """Live processes whose environment holds ``name=value``: everything a command started with
    that mark started in turn, Ray's workers included (their process titles no longer name it).
    ``title``: only those whose command line starts with it (``b"ray::MemberTrainer"``)."""
    mark = f"{name}={value}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().startswith(title):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                marked = mark in fh.read().split(b"\0")
        except OSError:
            continue
        if marked and process_alive(int(pid)):
            pids.append(int(pid))
    return pids


# ---------------------------------------------------------------- a checkpoint write held open

HOLD_WRITES = "ENSEMBLE_TEST_HOLD_WRITES"  # a folder: where hold requests and held writes meet


def checkpoint_write_holder():
    """A Ray ``worker_process_setup_hook`` (test_storm.py), made here so that Ray ships it by value
    (workers cannot import ``tests``): where ``$ENSEMBLE_TEST_HOLD_WRITES`` names a folder, a
    member's checkpoint write (storage's local write of a ``checkpoint-e*.pt``) can be held at its
    temporary file, its bytes written and synced, before the rename. A write holds when
    ``FOLDER/hold`` lists its member folder (``["member-2", ...]``): the first such write takes the
    request (renamed, so one write holds), records ``held.json`` (its pid, member and temporary
    file) and waits there until its process is killed (at most 300 s)."""

    def hold_checkpoint_writes() -> None:
        import json
        import time

        control = os.environ.get(HOLD_WRITES)
        if not control:
            return
        from ensemble import storage

        real = storage.os

        class HeldOs:  # what storage.py calls os: the real module, but for the fsync of a checkpoint's temporary file
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def fsync(fd: int) -> None:
                real.fsync(fd)
                path = real.readlink(f"/proc/self/fd/{fd}")
                name, member = real.path.basename(path), real.path.basename(real.path.dirname(path))
                if not (name.startswith("checkpoint-e") and ".pt.tmp-" in name):
                    return
                request = real.path.join(control, "hold")
                try:
                    with open(request) as fh:
                        wanted = json.load(fh)
                    if member not in wanted:
                        return
                    real.rename(request, real.path.join(control, f"taken-{real.getpid()}"))  # one write takes it
                except (OSError, ValueError):
                    return
                with open(real.path.join(control, "held.json.tmp"), "w") as fh:
                    json.dump({"pid": real.getpid(), "member": member, "tmp": path}, fh)
                real.replace(real.path.join(control, "held.json.tmp"), real.path.join(control, "held.json"))
                deadline = time.time() + 300
                while time.time() < deadline:  # the test kills this process here
                    time.sleep(0.05)

        storage.os = HeldOs()

    return hold_checkpoint_writes


# ---------------------------------------------------------------- a full disk, a process that dies

STORAGE_FAULTS = "ENSEMBLE_TEST_STORAGE_FAULTS"  # a folder: which writes fail, and how


def storage_fault_injector():
    """A Ray ``worker_process_setup_hook`` (test_faults.py), shipped by value like
    ``checkpoint_write_holder``: where ``$ENSEMBLE_TEST_STORAGE_FAULTS`` names a folder, a local
    write (storage's ``_write_local``) under the path written in ``FOLDER/enospc`` raises ENOSPC, as
    a full disk does, and one under the path in ``FOLDER/die`` ends its process at once (exit 1),
    as a preempted or OOM-killed worker does, in every process it starts, restarts included (each
    death's pid is a line of ``FOLDER/died``)."""

    def inject_storage_faults() -> None:
        import errno

        control = os.environ.get(STORAGE_FAULTS)
        if not control:
            return
        from ensemble import storage

        real = storage._write_local

        def under(name: str, path: str) -> bool:
            try:
                with open(os.path.join(control, name)) as fh:
                    prefix = fh.read()
            except OSError:
                return False
            return bool(prefix) and path.startswith(prefix)

        def write(path: str, data: bytes) -> None:
            if under("die", path):
                with open(os.path.join(control, "died"), "a") as fh:  # one line per death: the test counts them
                    fh.write(f"{os.getpid()}\n")
                os._exit(1)
            if under("enospc", path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(path, data)

        storage._write_local = write

    return inject_storage_faults
