"""A member's files under OUTPUT/members/member-<i>/ (torch + storage, no Ray).

    checkpoint-e<k>.pt + checkpoint.json   latest finished epoch k (model, optimizer, RNG, best so far)
    model.pt + val_probs.npz + member.json the finished member (member.json has status "done")

Each file is written atomically and recorded with its sha256 in a JSON record written last
(the commit point; see checkpoint.py). Only the actor's epoch loop calls ``save_checkpoint``
and ``save_final``; the driver calls ``load_finished_member`` when it resumes a run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ensemble import storage
from ensemble.checkpoint import (CheckpointError, DamagedFile, load_torch_bytes, read_json, read_verified, torch_bytes,
                                 write_file)

log = logging.getLogger("ensemble.member")


@dataclass(frozen=True)
class MemberSummary:
    """What member.json (and each member's entry of report.json) records of a finished member."""

    member: int
    seed: int
    best_epoch: int
    val_acc: float                 # at its best epoch, whose weights it keeps
    val_loss: float
    history: list                  # one dict per epoch: the fields of epochs.EpochStats
    resumed_after_epochs: list     # epochs after which an earlier process stopped and it resumed
    node: str
    device: str
    gpu_ids: list
    seconds: float                 # the last process's time on it (epochs trained before a resume excluded)
    started: float
    finished: float
    files: dict = field(default_factory=dict)  # file name -> sha256 of model.pt and val_probs.npz

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def member_dir(output: str, member: int) -> str:
    return storage.join(output, "members", f"member-{member}")


class MemberFiles:
    """The files of member ``member`` of the run in ``output`` whose fingerprint is ``fingerprint``."""

    def __init__(self, output: str, member: int, fingerprint: dict):
        self.member = member
        self.folder = member_dir(output, member)
        self.fingerprint = fingerprint

    def load_checkpoint(self) -> Optional[dict]:
        """The last epoch checkpoint (hash checked), or None when the member has none.

        A damaged one (its record not JSON, its file missing or not the one recorded: torn by a
        crash or a power loss) is logged in one line and dropped: the member starts again from
        epoch 0. A read that failed (StorageError: a timeout, ``ESTALE``) deletes nothing and stops.
        """
        record_path = storage.join(self.folder, "checkpoint.json")
        try:
            record = read_json(record_path)
            if record is None:
                return None
            if record.get("fingerprint") != self.fingerprint:
                raise CheckpointError(f"{self.folder}: its checkpoint is from a run with another config; "
                                      f"rerun with --fresh to start over")
            try:
                name, digest = record["file"], record["sha256"]
            except (KeyError, TypeError):
                raise DamagedFile(record_path, "names no file and sha256 (changed since it was written)") from None
            return load_torch_bytes(read_verified(storage.join(self.folder, name), digest, what=record_path))
        except DamagedFile as exc:
            log.warning("member %d: %s: %s; it trains again from epoch 0", self.member, exc.path, exc.problem)
            storage.remove(record_path)
            return None

    def save_checkpoint(self, snapshot: dict, *, node: str = "") -> None:
        """checkpoint-e<k>.pt, then checkpoint.json (the commit point), then drop older epochs."""
        epoch = snapshot["epoch"]
        name = f"checkpoint-e{epoch}.pt"
        digest = write_file(storage.join(self.folder, name), torch_bytes(snapshot))
        storage.write_text(storage.join(self.folder, "checkpoint.json"), json.dumps(
            {"epoch": epoch, "file": name, "sha256": digest, "fingerprint": self.fingerprint,
             "pid": os.getpid(), "node": node}))
        self._remove_old_checkpoints(keep=name)

    def save_final(self, summary: MemberSummary, state: dict, val_ids: np.ndarray, val_probs: np.ndarray,
                   config: dict) -> MemberSummary:
        """model.pt (``state``) and val_probs.npz (the best epoch's ``val_ids`` (n,) and
        ``val_probs`` (n, classes)), then member.json (status done) as the commit point.
        Returns the summary with the files' sha256."""
        buf = io.BytesIO()
        np.savez(buf, ids=val_ids, probs=val_probs)
        files = {"model.pt": write_file(storage.join(self.folder, "model.pt"), torch_bytes(state)),
                 "val_probs.npz": write_file(storage.join(self.folder, "val_probs.npz"), buf.getvalue())}
        record = {k: v for k, v in summary.to_dict().items() if k != "files"}
        record.update(status="done", sha256=files, config=config, fingerprint=self.fingerprint)
        storage.write_text(storage.join(self.folder, "member.json"), json.dumps(record, indent=2))
        if storage.exists(storage.join(self.folder, "checkpoint.json")):
            storage.remove(storage.join(self.folder, "checkpoint.json"))
        self._remove_old_checkpoints()
        return dataclasses.replace(summary, files=files)

    def _remove_old_checkpoints(self, keep: str = "") -> None:
        for name, is_dir in storage.list_dir(self.folder):
            if not is_dir and name.startswith("checkpoint-e") and name != keep:
                storage.remove(storage.join(self.folder, name))


def load_finished_member(output: str, member: int, fingerprint: dict) -> Optional[tuple[MemberSummary, dict]]:
    """(summary, best state) of a member a previous run finished, or None; hashes verified
    (DamagedFile when a file is missing or not the one recorded; StorageError when a read failed)."""
    folder = member_dir(output, member)
    what = storage.join(folder, "member.json")
    record = read_json(what)
    if record is None or record.get("status") != "done":
        return None
    if record.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder}: trained with another config; rerun with --fresh to start over")
    try:
        digests = {name: record["sha256"][name] for name in ("model.pt", "val_probs.npz")}
    except (KeyError, TypeError):
        raise DamagedFile(what, "names no model.pt and val_probs.npz sha256 (changed since it was written)") from None
    state = load_torch_bytes(read_verified(storage.join(folder, "model.pt"), digests["model.pt"], what=what))
    read_verified(storage.join(folder, "val_probs.npz"), digests["val_probs.npz"], what=what)
    names = {f.name for f in dataclasses.fields(MemberSummary)} - {"files"}
    return MemberSummary(**{k: v for k, v in record.items() if k in names}, files=record["sha256"]), state


def reusable_member(output: str, member: int, fingerprint: dict) -> Optional[tuple[MemberSummary, dict]]:
    """What the driver resumes with: ``load_finished_member``, except that a damaged finished
    member (a file missing or not the one recorded, e.g. after a power loss) is logged in one line
    and its member.json removed, so that member alone trains again (None). A read that failed
    (StorageError, after its retries) is raised as it is: the member may be whole, nothing goes."""
    try:
        return load_finished_member(output, member, fingerprint)
    except DamagedFile as exc:
        log.warning("member %d: %s: %s; training member %d again (the other members are kept)",
                    member, exc.path, exc.problem, member)
        storage.remove(storage.join(member_dir(output, member), "member.json"))
        return None


class BackgroundWriter:
    """One checkpoint write at a time, on a thread; ``wait`` re-raises a failed write."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Optional[Future] = None

    def submit(self, fn, *args, **kwargs) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
