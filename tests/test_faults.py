"""A damaged member is trained again alone; an incompatible run folder is refused (or, with
--fresh, replaced); a member that cannot write its files stops the run with one line. Killed
members, a lost node and a torn checkpoint, with the same predictions as an undisturbed run of the
same seed: test_storm.py. Stopping the driver itself: test_stop_resume.py."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from tests.helpers import finished_tiny_run, tiny_run_config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tiny_digits):
    return tiny_digits


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clean_run(cluster, data, tiny_run_cache, tmp_path_factory):
    """(report, output) of the session's finished run (helpers.finished_tiny_run): tests copy it."""
    _, report, output = finished_tiny_run(tiny_run_cache, data, tmp_path_factory)
    return report, output


def test_a_damaged_member_is_trained_again_and_the_others_reused(cluster, data, clean_run, tmp_path, caplog):
    """After a power loss member 1's committed model.pt is empty: the rerun logs it in one line and
    trains member 1 alone again (members 0 and 2 are loaded); with the same seed it predicts what
    the undisturbed run did. The rerun adds --mlflow, which changes no member's fingerprint. The
    driver holds the folder's lock for the run and removes it after."""
    import json
    import shutil
    import threading

    from ensemble.driver import run

    clean_report, clean_output = clean_run
    copy = tmp_path / "copy"
    shutil.copytree(clean_output, copy)
    (copy / "members" / "member-1" / "model.pt").write_bytes(b"")
    holders, done = [], threading.Event()

    def watch_lock():  # who holds run.lock while the driver runs
        while not done.wait(0.2):
            try:
                holders.append(json.loads((copy / "run.lock").read_text())["pid"])
            except (OSError, ValueError):
                pass

    watcher = threading.Thread(target=watch_lock)
    watcher.start()
    try:
        report = run(tiny_run_config(data, copy, mlflow=True))  # tracking added: the run still resumes
    finally:
        done.set()
        watcher.join()
    damaged = [r.getMessage() for r in caplog.records if "training member 1 again" in r.getMessage()]
    assert len(damaged) == 1 and "model.pt: sha256 differs" in damaged[0] and "empty" in damaged[0]
    finished = [m["finished"] for m in report["members"]]
    before = [m["finished"] for m in clean_report["members"]]
    assert finished[0] == before[0] and finished[2] == before[2] and finished[1] > before[1]
    assert (copy / "predictions.csv").read_bytes() == open(os.path.join(clean_output, "predictions.csv"), "rb").read()
    assert holders and set(holders) == {os.getpid()} and not (copy / "run.lock").exists()


def test_a_member_that_cannot_write_stops_the_run_in_one_line(cluster, tmp_path, capsys):
    """A checkpoint write failing in a member's process (a storage stub raising ENOSPC there) reaches
    the driver as one line naming the member, the file and the errno's words (exit 1), not as a
    member that failed after restarts; any other error names itself, with no restarts claimed."""
    from ensemble.errors import run_cli
    from ensemble.train_stage import MemberFailed, _gather

    @ray.remote
    def member_writing_on_a_full_disk(output: str):
        import errno

        import torch

        from ensemble import storage
        from ensemble.member_files import MemberFiles

        def full(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        storage._write_local = full
        MemberFiles(output, 2, {}).save_checkpoint({"epoch": 1, "model": {"w": torch.zeros(1)}})

    @ray.remote
    def member_with_a_bug():
        raise ValueError("boom")

    output = str(tmp_path)
    assert run_cli(lambda: _gather(member_writing_on_a_full_disk.remote(output), 2, output)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: member 2: could not write {output}/members/member-2/checkpoint-e1.pt: No space left on device "
        f"(ENOSPC); finished members and committed epochs are kept in {output}: once it can be written, rerun "
        f"the same command to resume"]
    with pytest.raises(MemberFailed, match=r"^member 2 failed: ValueError: boom; finished members are saved") as info:
        _gather(member_with_a_bug.remote(), 2, output)
    assert "restarts" not in str(info.value)


def test_rerun_with_other_config_is_refused_unless_fresh(cluster, data, clean_run, tmp_path):
    import shutil

    from ensemble.config import ConfigError
    from ensemble.driver import run

    _, clean_output = clean_run
    shutil.copytree(clean_output, tmp_path / "copy")
    with pytest.raises(ConfigError, match=r"another config \(lr differ\).*--fresh"):
        run(tiny_run_config(data, tmp_path / "copy", lr=5e-3))
    report = run(tiny_run_config(data, tmp_path / "copy", lr=5e-3, epochs=1, members=1, arch="resnet18", recipes=None),
                 fresh=True)
    assert report["config"]["lr"] == 5e-3
    assert sorted(os.listdir(tmp_path / "copy" / "members")) == ["member-0"]
