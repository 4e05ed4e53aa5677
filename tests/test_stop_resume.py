"""A stopped driver loses no finished work: Ctrl-C (SIGINT) and `ray job stop` (SIGTERM, as `kill`
sends: the driver handles both in one handler) stop the members, exit 130 and print the resume
command; SIGKILL just dies. Each rerun of the same command loads the finished members and resumes
the others from their checkpoints.

One run, stopped three times in a row: submitted as a job and stopped with `ray job stop`, rerun
and stopped with SIGINT, rerun and SIGKILLed, then resubmitted as a job with the repository as its
working dir, which completes. Every stop lands while a
member trains (the test waits for a member to commit an epoch the previous stop had not seen,
never for a time), and every member must resume after exactly the epochs it had committed.

The drivers join a `ray start --head` cluster of 2 CPUs of the test's own, with one CPU per
member: two members train at once on any machine, and member 2 waits for a slot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from tests.helpers import RAY_CLI, RECIPE_FLAGS, RayHead, free_port, ray_env, write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME_LINE = "To resume, run the same command with the same --output"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits_tree(tmp_path_factory.mktemp("stop_digits"), per_class_train=40, per_class_val=6,
                             n_test=20, classes=4)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ens-", dir="/tmp") as short:  # Ray's socket paths stay short
        port, dashboard = free_port(), free_port()
        env = ray_env(os.path.join(short, "home"))
        cluster = RayHead([f"--port={port}", "--num-cpus=2", f"--dashboard-port={dashboard}",
                           "--dashboard-host=127.0.0.1"], env, temp_dir=os.path.join(short, "ray"),
                          log_path=str(tmp_path_factory.mktemp("head") / "head.log"))
        try:
            cluster.wait_ready()
            yield {"address": f"127.0.0.1:{port}", "jobs": f"http://127.0.0.1:{dashboard}", "env": env,
                   "cluster": cluster}
        finally:
            cluster.stop()


EPOCHS = 20  # room for four stops, each after one more committed epoch: an epoch of 160 images takes
             # under a second, and a stop can land two or three epochs after the commit it saw (with 10
             # epochs a member can resume after epoch 7 and finish before the stop meant for it)
LEFT = 3     # a stop lands while the member it waited for has at least this many epochs to go: members
             # keep training for the second or so a stop takes to reach them (with fewer to go, one can
             # finish before its stop lands)


def _driver_args(data, output, address):
    return ["-m", "ensemble.driver", "--data", data, "--output", str(output), "--address", address,
            "--members", "3", "--epochs", str(EPOCHS), "--image-size", "16", "--batch-size", "16", "--seed", "3",
            "--cpus-per-member", "1", "--cpus-per-infer-actor", "1", "--infer-actors", "1", *RECIPE_FLAGS]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _member_done(output, i) -> bool:
    return (output / "members" / f"member-{i}" / "member.json").exists()


def _checkpoint_epoch(output, i):
    try:
        return json.loads((output / "members" / f"member-{i}" / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError):
        return None


def _committed(output) -> dict:
    """Member -> its committed epoch (EPOCHS once finished; 0 before its first checkpoint)."""
    return {i: EPOCHS if _member_done(output, i) else (_checkpoint_epoch(output, i) or 0) for i in range(3)}


def _moved_on(output, before: dict):
    """A member still training has committed an epoch past ``before`` (a stop now lands mid-training)."""
    def check():
        now = _committed(output)
        return any(before[i] < now[i] <= EPOCHS - LEFT for i in now)
    return check


def _trainers_alive(head) -> list[int]:
    """The test cluster's member processes (Ray titles them ray::MemberTrainer...) still alive."""
    return head["cluster"].processes(b"ray::MemberTrainer")


def _stopped_cleanly(returncode: int, err: str) -> None:
    assert returncode == 130, err[-3000:]
    assert "interrupted: members stopped" in err and RESUME_LINE in err, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]


def _job(head, *args, check=False, timeout=120):
    proc = subprocess.run([RAY_CLI, "job", *args[:1], "--address", head["jobs"], *args[1:]], capture_output=True,
                          text=True, env=head["env"], cwd=REPO, timeout=timeout)
    assert not check or proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture
def other_trainer():
    """A process titled as a member is, outside the test's cluster (another module's leftover or a
    parallel job's): waits for this cluster's members must not wait for it."""
    proc = subprocess.Popen(["bash", "-c", "exec -a ray::MemberTrainer.train sleep 600"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_every_stop_keeps_finished_work_and_reruns_resume(head, data, tmp_path, other_trainer):
    output = tmp_path / "out"
    deadline = time.time() + 10  # bash has replaced itself with the titled sleep
    while not open(f"/proc/{other_trainer}/cmdline", "rb").read().startswith(b"ray::MemberTrainer"):
        assert time.time() < deadline, "the titled process did not start"
        time.sleep(0.02)
    assert other_trainer not in _trainers_alive(head)
    driver = [sys.executable, *_driver_args(data, output, head["address"])]
    # member -> the epochs it must resume after: what each stop left committed (a member stopped
    # again before its next commit resumes after the same epoch once more, recorded once)
    resumes = {i: [] for i in range(3)}

    def note_stop(what: str) -> dict:
        _wait_for(lambda: not _trainers_alive(head), 60, f"the members to end after {what}")
        committed = _committed(output)  # the stopped driver's members are gone: these no longer change
        for i, epoch in committed.items():
            if 0 < epoch < EPOCHS and epoch not in resumes[i]:
                resumes[i].append(epoch)
        assert not (output / "predictions.csv").exists(), what
        return committed

    # 1. `ray job stop` (SIGTERM to the job's driver) once member 0 is done and member 2 has a checkpoint.
    job = f"ensemble-stop-{os.getpid()}"
    for _ in range(30):  # the head's job agent may still be registering: Ray answers "try again later"
        submitted = _job(head, "submit", "--submission-id", job, "--no-wait", "--", *driver)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    _wait_for(lambda: _member_done(output, 0) and bool(_checkpoint_epoch(output, 2)), 400,
              "member 0 done + member 2 checkpointed")
    _job(head, "stop", job, check=True)
    _wait_for(lambda: "STOPPED" in _job(head, "status", job, timeout=60).stdout.upper(), 120, "the job to stop")
    logs = _job(head, "logs", job, timeout=60).stdout
    assert "interrupted: members stopped" in logs and RESUME_LINE in logs, logs[-3000:]
    assert "SIGTERM received" not in logs
    seen = note_stop("ray job stop")

    # 2-3. The same command, stopped by SIGINT, then SIGKILL, once a member has moved on.
    for how in ("SIGINT", "SIGKILL"):
        proc = subprocess.Popen(driver, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=head["env"],
                                cwd=REPO, start_new_session=True)
        try:
            _wait_for(lambda: proc.poll() is not None or _moved_on(output, seen)(), 400,
                      f"a member to commit an epoch past {seen} ({how})")
            assert proc.poll() is None, f"driver exited early: {proc.communicate()[1][-2000:]}"
            proc.send_signal(getattr(signal, how))
            out, err = proc.communicate(timeout=120)
        finally:
            try:  # whatever this driver left in its session
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert "member 0: finished earlier" in err, err[-3000:]  # a rerun loads what is finished
        if how == "SIGKILL":
            assert proc.returncode == -signal.SIGKILL
        else:
            _stopped_cleanly(proc.returncode, err)
        seen = note_stop(how)

    # 4. Resubmitted as a job with the repository as its working dir (as the README says): it completes.
    again = job + "-again"
    done = _job(head, "submit", "--submission-id", again, "--working-dir", REPO, "--", "python", *driver[1:],
                timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in _job(head, "status", again, timeout=60).stdout.lower()
    assert "outputs in" in log and "member 0: finished earlier" in log  # the driver's lines reached the job's log
    assert "%|" not in log and "Running Dataset" not in log  # piped: no progress bars
    report = json.loads((output / "report.json").read_text())
    assert [m["member"] for m in report["members"]] == [0, 1, 2]
    assert report["members"][0]["resumed_after_epochs"] == []
    assert sum(map(len, resumes.values())) >= 3, resumes  # every stop caught a member mid-training
    for i, member in enumerate(report["members"]):  # no committed epoch trained again
        assert member["resumed_after_epochs"] == resumes[i], (i, member["resumed_after_epochs"], resumes)
        assert [h["epoch"] for h in member["history"]] == list(range(1, EPOCHS + 1))
    assert (output / "predictions.csv").read_text().count("\n") == 21
    for name in ("probabilities.parquet", "report.json", "report.md"):
        assert (output / name).is_file(), name
