"""Checkpoints that survive crashes and refuse tampering (torch + storage, no Ray).

Every file is written atomically (temporary name, then rename) and recorded with its sha256
in a small JSON record that is written last: the record is the commit point. A loader that finds
a file whose hash differs from its record refuses it. A member's files (member_files.py) are
written and read with these.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Any, Optional

import numpy as np
import torch

from ensemble import storage
from ensemble.errors import RunError


class CheckpointError(RunError):
    """A saved file that cannot be used (hash mismatch, other config): a damaged run; the message says what to do."""


class DamagedFile(CheckpointError):
    """A recorded file that is missing, whose bytes were read and are not the ones its record
    names (sha256), or a record that is not JSON: torn by a crash or a power loss, or changed
    since. Never loaded; a rerun of the driver trains that member again. A read that *failed*
    (a timeout, ``ESTALE``, ``EMFILE``) is not a damaged file: ``storage.read_stored`` raises
    StorageError for it and nothing is deleted. ``path``: the file; ``problem``: what is wrong."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}; refusing to load it. Rerun the driver with the same --output "
                         f"to train that member again (the others are kept)")
        self.path, self.problem = path, problem

    def __reduce__(self):
        return DamagedFile, (self.path, self.problem)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_file(path: str, data: bytes) -> str:
    """Atomic write; returns the sha256 to record."""
    storage.write_bytes(path, data)
    return sha256(data)


def read_verified(path: str, expected_sha256: str, *, what: str) -> bytes:
    """The bytes of ``path``; DamagedFile when it is missing or its sha256 is not the one ``what``
    records; StorageError when it could not be read (``storage.read_stored``)."""
    data = storage.read_stored(path)
    if data is None:
        raise DamagedFile(path, f"missing, though {what} lists it")
    if sha256(data) != expected_sha256:
        raise DamagedFile(path, f"sha256 differs from the one recorded in {what} (the file is "
                                f"{'empty' if not data else 'damaged or changed'} since it was written)")
    return data


def load_torch_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_json(path: str) -> Optional[dict]:
    """A JSON record, None when there is none; DamagedFile when its bytes are not a JSON object;
    StorageError when it could not be read (``storage.read_stored``)."""
    data = storage.read_stored(path)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        raise DamagedFile(path, "not JSON (torn or changed since it was written)") from None
    if not isinstance(record, dict):
        raise DamagedFile(path, "not a JSON object (changed since it was written)")
    return record


def rng_state() -> dict:
    """Global RNG states as tensors and plain values, so ``weights_only`` loading accepts them."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": repr(random.getstate())}


def set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate(ast.literal_eval(state["python"]))
