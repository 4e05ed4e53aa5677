"""member_files.py: a write that fails keeps the committed epoch; a damaged member (or checkpoint)
is trained again alone. (The driver doing so on a real run: test_faults.py.)"""

from __future__ import annotations

import errno
import json
import logging
import os

import numpy as np
import pytest
import torch

from ensemble import storage
from ensemble.checkpoint import DamagedFile
from ensemble.errors import StorageError
from ensemble.member_files import MemberFiles, MemberSummary, load_finished_member, reusable_member
from tests.helpers import REAL_READ, fail_reads

FINGERPRINT = {"lr": 0.002, "files_sha256": "abc"}


def _snapshot(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}


def _finish(output: str, member: int) -> None:
    summary = MemberSummary(member=member, seed=member, best_epoch=1, val_acc=0.5, val_loss=1.0, history=[],
                            resumed_after_epochs=[], node="n", device="cpu", gpu_ids=[], seconds=1.0, started=0.0,
                            finished=1.0)
    MemberFiles(output, member, FINGERPRINT).save_final(summary, {"w": torch.ones(2) * member}, np.arange(3),
                                                        np.full((3, 2), 0.5), config={})


def test_a_checkpoint_write_that_fails_keeps_the_committed_epoch(tmp_path, monkeypatch):
    """ENOSPC while epoch 2's checkpoint is written (a storage stub): one line naming that file and
    the reason; epoch 1 stays the committed one, and the member resumes after it."""
    files = MemberFiles(str(tmp_path), 3, FINGERPRINT)
    files.save_checkpoint(_snapshot(1))

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "_write_local", full_disk)
    with pytest.raises(StorageError) as info:
        files.save_checkpoint(_snapshot(2))
    assert str(info.value) == (f"could not write {tmp_path}/members/member-3/checkpoint-e2.pt: "
                               f"No space left on device (ENOSPC)")
    monkeypatch.undo()
    assert files.load_checkpoint()["epoch"] == 1


def test_a_damaged_finished_member_is_trained_again_and_the_others_kept(tmp_path, caplog):
    """After a power loss member 1's committed model.pt is empty: predict refuses it (DamagedFile);
    the driver logs one line and trains member 1 again (its member.json goes), member 0 is reused."""
    output = str(tmp_path)
    for member in (0, 1):
        _finish(output, member)
    model = tmp_path / "members" / "member-1" / "model.pt"
    model.write_bytes(b"")
    with pytest.raises(DamagedFile, match="sha256 differs .* empty"):
        load_finished_member(output, 1, FINGERPRINT)
    with caplog.at_level(logging.WARNING, logger="ensemble.member"):
        assert reusable_member(output, 1, FINGERPRINT) is None
        summary, state = reusable_member(output, 0, FINGERPRINT)
    assert summary.member == 0 and torch.equal(state["w"], torch.zeros(2))
    assert not (tmp_path / "members" / "member-1" / "member.json").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"member 1: {model}: sha256 differs from the one recorded in {model.parent / 'member.json'} "
                     f"(the file is empty since it was written); training member 1 again (the other members are kept)"]


def test_a_damaged_checkpoint_starts_its_member_again_from_epoch_0(tmp_path, caplog):
    files = MemberFiles(str(tmp_path), 2, FINGERPRINT)
    files.save_checkpoint(_snapshot(1))
    record = json.loads((tmp_path / "members" / "member-2" / "checkpoint.json").read_text())
    (tmp_path / "members" / "member-2" / record["file"]).write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="ensemble.member"):
        assert files.load_checkpoint() is None
    assert "member 2: " in caplog.text and "it trains again from epoch 0" in caplog.text
    assert not (tmp_path / "members" / "member-2" / "checkpoint.json").exists()


def test_a_read_that_fails_deletes_nothing_and_is_one_line_after_its_retries(tmp_path, monkeypatch):
    """NFS ESTALE on model.pt while resuming, EMFILE on checkpoint.json: each read is tried three
    times, then StorageError in one line; member.json and checkpoint.json stay, and once storage
    answers again the finished member is reused and the checkpoint resumed (nothing retrains)."""

    output = str(tmp_path)
    _finish(output, 0)
    files = MemberFiles(output, 1, FINGERPRINT)
    files.save_checkpoint(_snapshot(2))
    tries = fail_reads(monkeypatch, "model.pt", errno.ESTALE)
    with pytest.raises(StorageError) as info:
        reusable_member(output, 0, FINGERPRINT)
    model = tmp_path / "members" / "member-0" / "model.pt"
    assert str(info.value) == (f"could not read {model}: {os.strerror(errno.ESTALE)} (ESTALE) (tried 3 times); "
                               f"nothing was deleted: rerun the same command once storage answers")
    assert len(tries) == 3 and (tmp_path / "members" / "member-0" / "member.json").exists()

    fail_reads(monkeypatch, "checkpoint.json", errno.EMFILE)
    with pytest.raises(StorageError, match=r"checkpoint.json: Too many open files \(EMFILE\)"):
        files.load_checkpoint()
    assert (tmp_path / "members" / "member-1" / "checkpoint.json").exists()

    monkeypatch.setattr(storage, "read_bytes", REAL_READ)
    assert reusable_member(output, 0, FINGERPRINT)[0].member == 0
    assert files.load_checkpoint()["epoch"] == 2


def test_a_record_that_is_not_json_is_damaged(tmp_path, caplog):
    """Bytes that were read and are not JSON are a damaged record (not a failed read): dropped in one line."""
    files = MemberFiles(str(tmp_path), 4, FINGERPRINT)
    files.save_checkpoint(_snapshot(1))
    (tmp_path / "members" / "member-4" / "checkpoint.json").write_text('{"epoch": 1, "fi')
    with caplog.at_level(logging.WARNING, logger="ensemble.member"):
        assert files.load_checkpoint() is None
    assert "not JSON" in caplog.text and not (tmp_path / "members" / "member-4" / "checkpoint.json").exists()
