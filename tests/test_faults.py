"""Faults lose no finished work: a killed member resumes from its last epoch, a tampered or
incompatible run is refused, and the same seed gives the same predictions on CPU. (Stopping
the driver itself: test_stop_resume.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ensemble.config import CPU_PRESET, build_config  # noqa: E402
from tests.conftest import write_digits_tree  # noqa: E402

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
