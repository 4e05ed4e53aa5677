"""A damaged member is trained again alone; an incompatible run folder is refused (or, with
--fresh, replaced); a member that cannot write its files stops the run with one line. Killed
members, a lost node and a torn checkpoint, with the same predictions as an undisturbed run of the
same seed: test_storm.py. Stopping the driver itself: test_stop_resume.py."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray")

from tests.helpers import (STORAGE_FAULTS, finished_tiny_run, processes_marked, storage_fault_injector,  # noqa: E402
                           tiny_run_config)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tiny_digits):
    return tiny_digits


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The folder where a test says which writes of the members fail (helpers.storage_fault_injector)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(faults):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": storage_fault_injector(),
                          "env_vars": {STORAGE_FAULTS: str(faults)}})
    yield
    ray.shutdown()


def _trainers(faults) -> list[int]:
    """This cluster's member processes still alive (its workers carry the faults folder's mark)."""
    return processes_marked(STORAGE_FAULTS, str(faults), b"ray::MemberTrainer")


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    import time

    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.05)


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


def _run_with_member_1_failing(faults, fault: str, cfg) -> int:
    """The driver's exit code for a run of ``cfg`` whose member 1 meets ``fault`` (``enospc`` or
    ``die``, helpers.storage_fault_injector) at every write under its folder."""
    from ensemble.driver import run
    from ensemble.errors import run_cli

    (faults / fault).write_text(f"{cfg.output}/members/member-1/")
    try:
        return run_cli(lambda: run(cfg))
    finally:
        (faults / fault).unlink()


def test_a_member_on_a_full_disk_stops_the_run_in_one_line_and_the_others_at_once(cluster, data, faults, tmp_path,
                                                                                  capsys):
    """A real run whose member 1 cannot write (every write under its folder raises ENOSPC in its
    process, as a full disk does): exit 1 and the README's one line naming the member, the file and
    the errno's words; member 0, still training (6 epochs to member 1's first), is stopped at once:
    its process ends, it never finishes, and the epochs it committed stay loadable."""
    from ensemble.member_files import MemberFiles

    output = tmp_path / "out"
    cfg = tiny_run_config(data, output, members=2, epochs=6, arch="resnet18", recipes=None)
    assert _run_with_member_1_failing(faults, "enospc", cfg) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: member 1: could not write {output}/members/member-1/checkpoint-e1.pt: No space left on device "
        f"(ENOSPC); finished members and committed epochs are kept in {output}: once it can be written, rerun "
        f"the same command to resume")
    _wait_until(lambda: not _trainers(faults), 30, "the members' processes to end")
    assert not (output / "members" / "member-0" / "member.json").exists()  # stopped, not left to finish
    record = json.loads((output / "run.json").read_text())
    saved = MemberFiles(str(output), 0, record["fingerprint"]).load_checkpoint()
    assert saved is None or 1 <= saved["epoch"] < cfg.epochs


def test_a_member_whose_process_keeps_dying_fails_the_run_after_its_restarts(cluster, data, faults, tmp_path,
                                                                             capsys):
    """A real run whose member 1's process dies at its first checkpoint write, in every process
    Ray restarts it in: once its restarts are spent the run stops with one line, exit 1; member 0,
    finished meanwhile, is kept."""
    from ensemble.train_stage import MEMBER_RESTARTS

    output = tmp_path / "out"
    cfg = tiny_run_config(data, output, members=2, arch="resnet18", recipes=None)
    assert _run_with_member_1_failing(faults, "die", cfg) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: member 1 failed after {MEMBER_RESTARTS} restarts (ActorDiedError); finished members are saved in "
        f"{output}: rerun the same command to resume")
    died = (faults / "died").read_text().split()
    (faults / "died").unlink()
    assert len(set(died)) == len(died) == MEMBER_RESTARTS + 1  # its first process, then each restart's
    assert (output / "members" / "member-0" / "member.json").exists()
    assert not (output / "members" / "member-1" / "member.json").exists()
    _wait_until(lambda: not _trainers(faults), 30, "the members' processes to end")


def test_a_member_that_raises_names_its_error_and_claims_no_restarts(cluster, tmp_path):
    from ensemble.train_stage import MemberFailed, _gather

    @ray.remote
    def member_with_a_bug():
        raise ValueError("boom")

    with pytest.raises(MemberFailed, match=r"^member 2 failed: ValueError: boom; finished members are saved") as info:
        _gather(member_with_a_bug.remote(), 2, str(tmp_path))
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
