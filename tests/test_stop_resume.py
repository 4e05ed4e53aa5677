"""A stopped driver loses no finished work: Ctrl-C (SIGINT), SIGTERM (`kill`) and `ray job stop`
stop the members, exit 130 and print the resume command; SIGKILL just dies. The same command then
loads the finished members, resumes the others from their checkpoints and reruns inference
(after `ray job stop`, as a `ray job submit` with the repository as working dir, which succeeds).

The drivers join a `ray start --head` cluster of 2 CPUs of the test's own, with one CPU per
member: two members train at once on any machine, so member 2 is still training when the stop
lands (the test waits for that state, never for a time).
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

from tests.conftest import RAY_CLI, RECIPE_FLAGS, RayHead, free_port, ray_env, write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME_LINE = "To resume, run the same command with the same --output"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits_tree(tmp_path_factory.mktemp("stop_digits"), per_class_train=24, per_class_val=6,
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
            yield {"address": f"127.0.0.1:{port}", "jobs": f"http://127.0.0.1:{dashboard}", "env": env}
        finally:
            cluster.stop()


def _driver_args(data, output, address):
    return ["-m", "ensemble.driver", "--data", data, "--output", str(output), "--address", address,
            "--members", "3", "--epochs", "4", "--image-size", "16", "--batch-size", "16", "--seed", "3",
            "--cpus-per-member", "1", "--cpus-per-infer-actor", "1", *RECIPE_FLAGS]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _member_done(output, i) -> bool:
    return (output / "members" / f"member-{i}" / "member.json").exists()


def _checkpoint_epoch(output, i):
    try:
        return json.loads((output / "members" / f"member-{i}" / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError):
        return None


def _mid_run(output) -> bool:
    """Member 0 finished and member 2 (the third, waiting for a slot) has a checkpoint of its own."""
    return _member_done(output, 0) and bool(_checkpoint_epoch(output, 2))


def _check_resumed_rerun(data, output, head, *, as_job: str = ""):
    """The same command (or, with ``as_job``, the same `ray job submit` with the repository as its
    working dir, as the README says): member 0 loaded, members stopped mid-training resumed, all
    predictions written."""
    resumable = [i for i in (1, 2) if _checkpoint_epoch(output, i) and not _member_done(output, i)]
    assert resumable, "no member was stopped mid-training"
    command = [sys.executable, *_driver_args(data, output, head["address"])]
    if as_job:
        command = [RAY_CLI, "job", "submit", "--address", head["jobs"], "--submission-id", as_job,
                   "--working-dir", REPO, "--", "python", *command[1:]]
    again = subprocess.run(command, capture_output=True, text=True, env=head["env"], cwd=REPO, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    if as_job:
        status = subprocess.run([RAY_CLI, "job", "status", "--address", head["jobs"], as_job], capture_output=True,
                                text=True, env=head["env"], timeout=120)
        assert "succeeded" in status.stdout, status.stdout + status.stderr
        assert "outputs in" in log  # the driver's last line reached the job's log
    assert "member 0: finished earlier" in log
    assert "%|" not in log and "Running Dataset" not in log  # piped: no progress bars
    report = json.loads((output / "report.json").read_text())
    assert [m["member"] for m in report["members"]] == [0, 1, 2]
    assert report["members"][0]["resumed_after_epochs"] == []
    for i in resumable:  # no finished epoch trained again
        assert report["members"][i]["resumed_after_epochs"], f"member {i} restarted from epoch 0"
        assert [h["epoch"] for h in report["members"][i]["history"]] == [1, 2, 3, 4]
    assert (output / "predictions.csv").read_text().count("\n") == 21


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_stopped_driver_rerun_resumes(head, data, tmp_path, how):
    output = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *_driver_args(data, output, head["address"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=head["env"], cwd=REPO, start_new_session=True)
    try:
        _wait_for(lambda: proc.poll() is not None or _mid_run(output), 400, "member 0 done + member 2 checkpointed")
        assert proc.poll() is None, f"driver exited early: {proc.communicate()[1][-2000:]}"
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=120)
    finally:
        try:  # whatever this driver left in its session
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err[-3000:]
        assert "interrupted: members stopped" in err and RESUME_LINE in err
        assert "Traceback" not in err and "SIGTERM received" not in err
    assert not (output / "predictions.csv").exists()
    _check_resumed_rerun(data, output, head)


def test_ray_job_stop_is_a_clean_stop(head, data, tmp_path):
    """`ray job stop` sends the driver SIGTERM: the job ends STOPPED, its log has the resume line."""
    output = tmp_path / "out"
    job = f"ensemble-stop-{os.getpid()}"
    ray_job = [RAY_CLI, "job"]
    submit = [*ray_job, "submit", "--address", head["jobs"], "--submission-id", job, "--no-wait",
              "--", sys.executable, *_driver_args(data, output, head["address"])]
    for _ in range(30):  # the head's job agent may still be registering: Ray answers "try again later"
        submitted = subprocess.run(submit, capture_output=True, text=True, env=head["env"], cwd=REPO, timeout=120)
        if submitted.returncode == 0 or "No available agent" not in submitted.stderr:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    _wait_for(lambda: _mid_run(output), 400, "member 0 done + member 2 checkpointed")
    stop = subprocess.run([*ray_job, "stop", "--address", head["jobs"], job], capture_output=True, text=True,
                          env=head["env"], timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr

    def status():
        return subprocess.run([*ray_job, "status", "--address", head["jobs"], job], capture_output=True, text=True,
                              env=head["env"], timeout=60).stdout

    _wait_for(lambda: "STOPPED" in status() or "stopped" in status(), 120, "the job to stop")
    logs = subprocess.run([*ray_job, "logs", "--address", head["jobs"], job], capture_output=True, text=True,
                          env=head["env"], timeout=60).stdout
    assert "interrupted: members stopped" in logs and RESUME_LINE in logs, logs[-3000:]
    assert "SIGTERM received" not in logs
    assert not (output / "predictions.csv").exists()
    _check_resumed_rerun(data, output, head, as_job=job + "-again")
    for name in ("predictions.csv", "probabilities.parquet", "report.json", "report.md"):
        assert (output / name).is_file(), name
