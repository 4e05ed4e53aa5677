"""What a node reports when it cannot see the run folder or the data, and the one line it becomes
(the probe itself, on a node that really cannot see them: test_installed_cluster.py)."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pytest

from ensemble import shared_storage
from ensemble.errors import ConfigError
from ensemble.shared_storage import NodeStorage, node_storage, refusal

TOKEN = b"0123456789abcdef"


@pytest.fixture
def seen(tmp_path):
    """A run folder holding the driver's marker, and one 7-byte training image."""
    out, image = tmp_path / "out", tmp_path / "data" / "train" / "a" / "0.png"
    out.mkdir()
    image.parent.mkdir(parents=True)
    image.write_bytes(b"pngdata")
    (out / "marker").write_bytes(TOKEN)
    needs = NodeStorage(output=str(out), data=str(tmp_path / "data"), data_file=(str(image), 7))
    return needs, str(out / "marker"), image


def test_a_node_that_sees_both_reports_nothing(seen):
    needs, marker, _ = seen
    assert needs.problems(marker, TOKEN) == {}


def test_each_thing_a_node_cannot_see_is_named(seen, tmp_path):
    needs, marker, image = seen
    assert needs.problems(str(tmp_path / "out" / "gone"), TOKEN) == {
        "output": "the file the driver just wrote in it is not there"}
    # the same folder name on another disk: a marker of another run, or of none
    assert needs.problems(marker, b"another token") == {"output": "the file the driver just wrote in it holds "
                                                                  "other bytes there"}
    # a read that fails is not a missing file: its reason is kept
    assert needs.problems(str(tmp_path / "out"), TOKEN)["output"].startswith(
        "cannot read the file the driver just wrote in it there (")
    image.write_bytes(b"png")  # another copy of the data, or one still syncing
    assert needs.problems(marker, TOKEN) == {"data": f"{image} there has 3 bytes, not 7"}
    image.unlink()
    assert needs.problems(marker, TOKEN) == {"data": f"{image} is not there"}


def test_a_trainer_checks_the_runs_own_file_by_name(seen, tmp_path):
    needs, _, _ = seen
    assert needs.problems(str(tmp_path / "out" / "run.json")) == {"output": "run.json is not there"}
    (tmp_path / "out" / "run.json").write_text("{}")
    assert needs.problems(str(tmp_path / "out" / "run.json")) == {}


def test_the_bundled_digits_are_written_on_the_node_not_looked_for(tmp_path, monkeypatch):
    import ensemble.digits

    written = []
    monkeypatch.setattr(ensemble.digits, "ensure_digits", written.append)
    needs = NodeStorage(output=str(tmp_path), data=str(tmp_path / "digits"), data_file=None, bundled=True)
    (tmp_path / "run.json").write_text("{}")
    assert needs.problems(str(tmp_path / "run.json")) == {} and written == [str(tmp_path / "digits")]

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ensemble.digits, "ensure_digits", full_disk)
    assert needs.problems(str(tmp_path / "run.json")) == {
        "data": f"the bundled digits could not be written at {tmp_path / 'digits'} "
                f"([Errno 28] No space left on device)"}


def test_the_refusal_is_one_line_naming_paths_node_reasons_and_the_fix(seen):
    needs, _, image = seen
    both = str(refusal(needs, {"data": "D", "output": "O"}, "node 10.0.0.7 (id 1234abcd)"))
    assert both == (f"--output {needs.output} and --data {needs.data} are not visible from node 10.0.0.7 "
                    f"(id 1234abcd): O; D (members there would keep their files on that node's own disk); "
                    f"use s3://BUCKET/PREFIX, or a folder that every node mounts at the same path")
    data_only = str(refusal(needs, {"data": "D"}, "node X"))
    assert data_only.startswith(f"--data {needs.data} is not visible from node X: D; use s3://")
    assert "\n" not in both + data_only


def test_the_output_is_made_absolute_and_the_first_training_image_measured(tmp_path, monkeypatch):
    image = tmp_path / "data" / "train" / "a" / "0.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"12345")

    class Index:
        train = pa.table({"path": [str(image), "/elsewhere/never-read.png"]})

    monkeypatch.chdir(tmp_path)
    needs = node_storage("runs/r1", str(tmp_path / "data"), Index, bundled=False)
    assert needs.output == str(tmp_path / "runs" / "r1")  # members resolve it against their own cwd
    assert needs.data_file == (str(image), 5)
    assert node_storage("s3://bucket/runs/r1", "s3://bucket/data", type("E", (), {"train": pa.table(
        {"path": pa.array([], pa.string())})}), bundled=False) == NodeStorage("s3://bucket/runs/r1",
                                                                               "s3://bucket/data", None)


def test_the_folders_made_for_the_marker_are_removed_again_only_while_empty(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    made = shared_storage._missing_folders(str(out))
    assert made == [str(out), str(out.parent), str(out.parent.parent)] and out.is_dir()
    (out / "m").write_text("x")
    (tmp_path / "a" / "keep").write_text("another's file")
    shared_storage._remove(str(out / "m"), made)
    assert sorted(os.listdir(tmp_path / "a")) == ["keep"]  # b/out and b removed, a holds a file: kept
    assert shared_storage._missing_folders(str(tmp_path)) == []


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=re.escape(f"--output {tmp_path}/file/out: cannot create it (")):
        shared_storage._missing_folders(str(tmp_path / "file" / "out"))
