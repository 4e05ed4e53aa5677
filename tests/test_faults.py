"""Faults lose no finished work: a killed member resumes from its last epoch, a rerun driver
reuses finished members, and the same seed gives the same predictions on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ensemble.config import CPU_PRESET, build_config  # noqa: E402
from tests.conftest import RECIPE_FLAGS, write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Big enough that an epoch lasts a few seconds (room to kill a member inside epoch 2).
    return write_digits_tree(tmp_path_factory.mktemp("fault_digits"), per_class_train=40,
                             per_class_val=8, n_test=20, classes=4)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _config(data, output, **overrides):
    values = {**CPU_PRESET, "image_size": 48, "epochs": 3, "members": 2, "batch_size": 16,
              "infer_batch_size": 32, "seed": 3, **overrides}
    return build_config(flag_values={"data": data, "output": str(output), **values})


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoint_epoch(output, member):
    path = os.path.join(output, "members", f"member-{member}", "checkpoint.json")
    try:
        return json.load(open(path))["epoch"]
    except (OSError, ValueError):
        return None


def _checkpoint_record(output, member):
    path = os.path.join(output, "members", f"member-{member}", "checkpoint.json")
    return json.load(open(path))


@pytest.fixture(scope="module")
def clean_run(cluster, data, tmp_path_factory):
    from ensemble.driver import run

    output = tmp_path_factory.mktemp("clean")
    return run(_config(data, output)), str(output)


def test_same_seed_same_predictions(cluster, data, clean_run, tmp_path):
    from ensemble.driver import run

    report, output = clean_run
    again = run(_config(data, tmp_path))
    assert open(os.path.join(output, "predictions.csv")).read() == open(tmp_path / "predictions.csv").read()
    assert [m["val_acc"] for m in again["members"]] == [m["val_acc"] for m in report["members"]]


def test_killed_member_resumes_from_its_last_epoch(cluster, data, clean_run, tmp_path):
    """SIGKILL member 0's process during epoch 2 of 3: Ray restarts it and it resumes after epoch 1."""
    from ensemble.driver import run

    result = {}
    thread = threading.Thread(target=lambda: result.update(report=run(_config(data, tmp_path))), daemon=True)
    thread.start()
    _wait_for(lambda: _checkpoint_epoch(str(tmp_path), 0) == 1, 240, "member 0 to finish epoch 1")
    os.kill(_checkpoint_record(str(tmp_path), 0)["pid"], signal.SIGKILL)  # the member's own process
    thread.join(timeout=400)
    assert not thread.is_alive()
    report = result["report"]
    assert [m["member"] for m in report["members"]] == [0, 1]
    member0 = report["members"][0]
    assert member0["resumed_after_epochs"] == [1]
    assert [h["epoch"] for h in member0["history"]] == [1, 2, 3]
    assert report["members"][1]["resumed_after_epochs"] == []
    # Resuming restored model, optimizer and RNG state: the result equals the uninterrupted run's.
    clean_report, clean_output = clean_run
    assert member0["val_acc"] == clean_report["members"][0]["val_acc"]
    assert (tmp_path / "predictions.csv").read_text() == open(os.path.join(clean_output, "predictions.csv")).read()
    # No checkpoint files are left once a member is done.
    assert sorted(os.listdir(tmp_path / "members" / "member-0")) == ["member.json", "model.pt", "val_probs.npz"]


def test_tampered_member_file_is_refused(cluster, data, clean_run, tmp_path):
    """A finished member whose model.pt changed after it was written is not reused."""
    import shutil

    from ensemble.checkpoint import CheckpointError
    from ensemble.driver import run

    _, clean_output = clean_run
    shutil.copytree(clean_output, tmp_path / "copy")
    with open(tmp_path / "copy" / "members" / "member-1" / "model.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        run(_config(data, tmp_path / "copy"))


def test_rerun_with_other_config_is_refused_unless_fresh(cluster, data, clean_run, tmp_path):
    import shutil

    from ensemble.config import ConfigError
    from ensemble.driver import run

    _, clean_output = clean_run
    shutil.copytree(clean_output, tmp_path / "copy")
    with pytest.raises(ConfigError, match=r"another config \(lr differ\).*--fresh"):
        run(_config(data, tmp_path / "copy", lr=1e-3))
    report = run(_config(data, tmp_path / "copy", lr=1e-3, epochs=1, members=1), fresh=True)
    assert report["config"]["lr"] == 1e-3
    assert sorted(os.listdir(tmp_path / "copy" / "members")) == ["member-0"]


def _driver_cmd(data, output, *extra):
    return [sys.executable, "-m", "ensemble.driver", "--data", data, "--output", str(output), "--members", "3",
            "--epochs", "3", "--image-size", "48", "--batch-size", "16", "--seed", "3", *RECIPE_FLAGS,
            "--cpus-per-member", "0.5", *extra]


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_killed_driver_rerun_resumes(data, tmp_path, how):
    """Stop the driver (Ctrl-C, or SIGKILL) once member 0 is done and another has a checkpoint;
    the same command then loads member 0, resumes the rest, and reruns inference."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    output = tmp_path / "out"
    proc = subprocess.Popen(_driver_cmd(data, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        def ready():
            assert proc.poll() is None, f"driver exited early: {proc.communicate()[1][-2000:]}"
            return ((output / "members" / "member-0" / "member.json").exists()
                    and any(_checkpoint_epoch(str(output), i) for i in (1, 2)))

        _wait_for(ready, 400, "member 0 done + a checkpoint")
        if how == "SIGINT":
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 130
            assert "To resume, run the same command with the same --output" in err
            assert "Traceback" not in err
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    finally:
        try:  # the Ray processes this driver started live in its session: end exactly those
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (output / "predictions.csv").exists()
    # Members stopped mid-training (a checkpoint, and not finished: a kill can land between
    # writing member.json and removing checkpoint.json) must resume, not restart.
    resumed = [i for i in (1, 2) if _checkpoint_epoch(str(output), i)
               and not (output / "members" / f"member-{i}" / "member.json").exists()]

    again = subprocess.run(_driver_cmd(data, output), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "member 0: finished earlier" in again.stderr
    assert "%|" not in again.stderr and "Running Dataset" not in again.stderr  # piped: no progress bars
    report = json.loads((output / "report.json").read_text())
    assert [m["member"] for m in report["members"]] == [0, 1, 2]
    for i in resumed:
        assert report["members"][i]["resumed_after_epochs"], f"member {i} restarted from epoch 0"
    assert (output / "predictions.csv").read_text().count("\n") == 21
