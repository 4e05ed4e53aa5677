"""A tampered or incompatible run folder is refused (or, with --fresh, replaced). Killed members,
a lost node and a torn checkpoint, with the same predictions as an undisturbed run of the same
seed: test_storm.py. Stopping the driver itself: test_stop_resume.py."""

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
        run(tiny_run_config(data, tmp_path / "copy"))


def test_rerun_with_other_config_is_refused_unless_fresh(cluster, data, clean_run, tmp_path):
    import shutil

    from ensemble.config import ConfigError
    from ensemble.driver import run

    _, clean_output = clean_run
    shutil.copytree(clean_output, tmp_path / "copy")
    with pytest.raises(ConfigError, match=r"another config \(lr differ\).*--fresh"):
        run(tiny_run_config(data, tmp_path / "copy", lr=5e-3))
    report = run(tiny_run_config(data, tmp_path / "copy", lr=5e-3, epochs=1, members=1), fresh=True)
    assert report["config"]["lr"] == 5e-3
    assert sorted(os.listdir(tmp_path / "copy" / "members")) == ["member-0"]
